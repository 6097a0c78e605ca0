"""The job's activation statistics: observed once (with the sensitivity), handed to measured
Omega, regions and quantize (the chosen plan and every evaluated Pareto point), and taken from
the cache on a re-plan."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from svc_helpers import FAST_HESSIAN

import quantize.api
import quantize.observe
import sensitivity.engine
import sensitivity.measured
import sensitivity.regions
from service.cache import StageCache
from service.pipeline import run_pipeline


@pytest.fixture
def observe_calls(monkeypatch) -> list[int]:
    """Counts every call of ``quantize.observe.observe``, under whatever name a module imported
    it."""
    original = quantize.observe.observe
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    assert {quantize.api, sensitivity.engine, sensitivity.measured, sensitivity.regions} <= {
        m for m in list(sys.modules.values()) if getattr(m, "observe", None) is original}
    for module in list(sys.modules.values()):
        if getattr(module, "observe", None) is original:
            monkeypatch.setattr(module, "observe", spy)
    return calls


def test_a_job_observes_the_activations_once(cnn_pt2, calib_path, tmp_path, observe_calls):
    cons = {"hessian": {**FAST_HESSIAN, "omega": "measured"}, "limits": {"bops_ratio": 0.6},
            "activation_bits": [4, 8], "drq": {"region_sizes": [2], "sensitive_fractions": [0.3]}}
    cache = StageCache(tmp_path / "cache")
    first = run_pipeline(cnn_pt2, calib_path, cons, tmp_path / "a", cache=cache,
                         pareto_points=4, pareto_evaluate=2)
    assert (tmp_path / "a" / "regions.json").is_file()
    assert first.plan["status"] == "optimal"
    # quantize ran for the chosen plan and for some Pareto points too
    pareto = json.loads((tmp_path / "a" / "pareto.json").read_text())
    assert any(p.get("metrics") for f in pareto["fronts"].values() for p in f["points"])
    assert observe_calls == [1]
    # a re-plan takes sensitivity, regions and the statistics from the cache: no pass at all
    observe_calls.clear()
    again = run_pipeline(cnn_pt2, calib_path, cons, tmp_path / "b", cache=cache,
                         pareto_points=4, pareto_evaluate=2)
    assert {"sensitivity", "regions"} <= set(again.reused) and observe_calls == []
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_result_without_statistics_is_observed_by_the_pipeline(cnn_pt2, calib_path) -> None:
    """A sensitivity result measured without activation traces carries no statistics; the
    pipeline then observes them itself, with the same numbers (up to float rounding between
    chunkings)."""
    from sensitivity import HessianConfig, measure
    from sensitivity.intake import IntakeConfig, intake
    from service.pipeline import _observe

    it = intake(cnn_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))
    with_stats = measure(it, HessianConfig(max_iter=4, min_iter=2, tol=0.5))
    without = measure(it, HessianConfig(max_iter=4, min_iter=2, tol=0.5, activations=False))
    assert without.activations is None
    observed = _observe(it, without, torch.device("cpu"))
    assert observed.layers.keys() == with_stats.activations.layers.keys()
    for name, s in observed.layers.items():
        t = with_stats.activations[name]
        assert (s.numel, s.shape) == (t.numel, t.shape)
        assert (s.lo, s.hi) == pytest.approx((t.lo, t.hi), rel=1e-6, abs=1e-7)
