"""The constraints' ``loss``: the job's loss as asked (not as the output's shape suggests),
recorded, and a separate sensitivity cache entry."""

from __future__ import annotations

import json

from svc_helpers import FAST_HESSIAN

from service.cache import StageCache
from service.pipeline import run_pipeline


def test_the_asked_loss_is_measured_recorded_and_cached_apart(mlp_pt2, calib_path,
                                                              tmp_path) -> None:
    base = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.8},
            "pin": {"first": None, "last": None}}
    cache = StageCache(tmp_path / "cache")
    runs = {}
    for name, loss in (("mse", "mse"), ("auto", "auto"), ("mse-again", "mse")):
        runs[name] = run_pipeline(mlp_pt2, calib_path, {**base, "loss": loss},
                                  tmp_path / name, cache=cache)
    sens = {n: json.loads((tmp_path / n / "sensitivity.json").read_text()) for n in runs}
    # the labelled digits would give cross-entropy; asked for MSE to FP32, the job takes it
    assert sens["mse"]["model"]["loss"] == "mse"
    assert sens["auto"]["model"]["loss"] == "cross_entropy"
    assert runs["mse"].plan["constraints"]["loss"] == "mse"
    # another loss, another curvature: not taken from the cache; the same loss is
    assert "sensitivity" not in runs["auto"].reused
    assert "sensitivity" in runs["mse-again"].reused
    traces = {n: [r["weight_trace"] for r in s["layers"]] for n, s in sens.items()}
    assert traces["mse"] != traces["auto"] and traces["mse"] == traces["mse-again"]
