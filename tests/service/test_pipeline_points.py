"""The Pareto points' evaluations use a bounded, seeded random share of the held-out set."""

from __future__ import annotations

import torch

from sensitivity.intake import intake
from service.pipeline import _holdout_keep, _holdout_subset


def test_points_are_evaluated_on_a_seeded_random_subset(cnn_pt2, calib_path):
    it = intake(cnn_pt2, calib_path)
    n = len(it.holdout)
    assert n > 8
    sub = _holdout_subset(it, _holdout_keep(it, 8, seed=0))
    assert len(sub.holdout) == 8 and len(sub.train) == len(it.train)
    rows = {tuple(x.flatten().tolist()) for x in it.holdout.args[0]}
    picked = [tuple(x.flatten().tolist()) for x in sub.holdout.args[0]]
    assert all(r in rows for r in picked)  # held-out samples only
    again = _holdout_subset(it, _holdout_keep(it, 8, seed=0))
    assert torch.equal(again.holdout.args[0], sub.holdout.args[0])  # deterministic
    first = it.holdout.args[0][:8]
    assert not torch.equal(sub.holdout.args[0], first)  # not the file's first samples
    assert _holdout_subset(it, _holdout_keep(it, n, seed=0)) is it


def test_points_reuse_the_jobs_measurements(cnn_pt2, calib_path, tmp_path, monkeypatch):
    """Neither the chosen plan nor the Pareto points calibrate or correct their biases with a
    pass over the train set (the free-point ranges and layer input sums of the job's one
    statistics pass), and the FP32 model runs once for all of them (its outputs on the
    held-out samples, the points' cut from them)."""
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
    assert len(it.holdout) > 32  # the points' samples are a subset (PARETO_EVAL_SAMPLES)
    assert calls == {"calibrate": 0, "shifts": 0, "reference": 1}


def test_the_points_reference_is_cut_from_the_jobs(cnn_pt2, calib_path):
    """The Pareto points' FP32 outputs, cut from the job's on all held-out samples, are those
    of the FP32 model on the points' subset (other batches: float rounding only)."""
    from service.pipeline import _reference, _slice_reference

    it = intake(cnn_pt2, calib_path)
    keep = _holdout_keep(it, 8, seed=0)
    sub = _holdout_subset(it, keep)
    cut = _slice_reference(_reference(it, 64, torch.device("cpu")), keep)
    own = _reference(sub, 64, torch.device("cpu"))
    assert cut.samples == own.samples == 8
    torch.testing.assert_close(cut.outputs, own.outputs, rtol=1e-5, atol=1e-6)
    assert _holdout_keep(it, len(it.holdout), seed=0) is None
    assert _slice_reference(own, None) is own and _slice_reference(None, keep) is None
