"""The Pareto points' evaluations use a bounded, seeded random share of the held-out set."""

from __future__ import annotations

import torch

from sensitivity.intake import intake
from service.pipeline import _holdout_subset


def test_points_are_evaluated_on_a_seeded_random_subset(cnn_pt2, calib_path):
    it = intake(cnn_pt2, calib_path)
    n = len(it.holdout)
    assert n > 8
    sub = _holdout_subset(it, 8, seed=0)
    assert len(sub.holdout) == 8 and len(sub.train) == len(it.train)
    rows = {tuple(x.flatten().tolist()) for x in it.holdout.args[0]}
    picked = [tuple(x.flatten().tolist()) for x in sub.holdout.args[0]]
    assert all(r in rows for r in picked)  # held-out samples only
    again = _holdout_subset(it, 8, seed=0)
    assert torch.equal(again.holdout.args[0], sub.holdout.args[0])  # deterministic
    first = it.holdout.args[0][:8]
    assert not torch.equal(sub.holdout.args[0], first)  # not the file's first samples
    assert _holdout_subset(it, n, seed=0) is it


def test_points_reuse_the_jobs_measurements(cnn_pt2, calib_path, tmp_path, monkeypatch):
    """The Pareto points calibrate and correct their biases without a pass over the train set
    (the chosen plan's free-point ranges, the job's layer input sums) and run the FP32 model
    once for all of them (its outputs on the points' held-out samples, kept)."""
    import json

    from svc_helpers import FAST_HESSIAN

    import quantize.biascorr
    import quantize.calibrate
    import quantize.evaluate
    from service.pipeline import run_pipeline

    calls = {"calibrate": 0, "shifts": 0, "reference": 0}
    run_batch, shifts = quantize.calibrate.run_batch, quantize.biascorr.output_shifts
    reference = quantize.evaluate.reference_outputs

    def counting(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(quantize.calibrate, "run_batch", counting("calibrate", run_batch))
    monkeypatch.setattr(quantize.biascorr, "output_shifts", counting("shifts", shifts))
    monkeypatch.setattr(quantize.evaluate, "reference_outputs", counting("reference", reference))
    res = run_pipeline(cnn_pt2, calib_path, {"hessian": FAST_HESSIAN,
                                             "limits": {"size_ratio": 0.8}}, tmp_path,
                       pareto_points=6, pareto_evaluate=3)
    pareto = json.loads((tmp_path / "pareto.json").read_text())
    evaluated = [p for f in pareto["fronts"].values() for p in f["points"] if p.get("metrics")]
    assert len(evaluated) >= 2 and res.plan["status"] == "optimal"
    it = intake(cnn_pt2, calib_path)
    # the chosen plan's one calibration pass (batches of 64), none for the points
    assert calls == {"calibrate": -(-len(it.train) // 64), "shifts": 0, "reference": 1}
