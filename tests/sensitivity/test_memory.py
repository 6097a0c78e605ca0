"""Memory budget: chunk sizes from a counted per-sample cost; the counted bytes of the sweep
stay within the budget; one sample too large is a typed error, never an OOM kill."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sensitivity import HessianConfig, measure, zoo
from sensitivity import memory as mem
from sensitivity.intake import intake
from sensitivity.memory import MemoryParams, PeakMeter, TensorMeter, plan_chunks
from service.pipeline import run_pipeline
from solver.errors import ResourceLimitError

MB = 2**20
SAMPLE = 48 * MB  # what the synthetic pass allocates per sample


def _touch(m: int) -> None:
    x = torch.ones(m * SAMPLE // 4)  # float32
    del x


def test_tensor_meter_counts_new_storages_until_freed():
    w = torch.randn(256, 256, requires_grad=True)
    with TensorMeter() as meter:
        a = torch.ones(1000)  # 4000 bytes
        assert meter.live == 4000
        a.mul_(2)  # in place: no new storage
        view = a[:10].view(2, 5)  # a view of a's storage
        assert meter.live == 4000
        del a, view
        assert meter.live == 0
        x = torch.randn(8, 256)
        y = (x @ w).tanh().sum()  # tanh's output is saved for the backward
        saved = meter.live
        assert saved >= 2 * 8 * 256 * 4
        (g,) = torch.autograd.grad(y, w)
        assert meter.peak >= saved + g.numel() * 4
        del x, y
        assert meter.live == g.numel() * 4  # only the gradient is alive
    assert meter.peak < 256 * 256 * 4 + 5 * 8 * 256 * 4 + 4000  # nothing counted twice


def test_per_sample_cost_is_counted_exactly(monkeypatch):
    monkeypatch.setattr(mem.PeakMeter, "held", lambda self: 0)  # the resident set drifts
    plan = plan_chunks(_touch, _touch, 40, None, 0, 64 * 2**30, torch.device("cpu"))
    params = MemoryParams()
    assert plan.method == "tensors"
    # counted bytes do not depend on the machine or the heap: exact
    assert plan.per_sample_bytes == int(SAMPLE * params.safety)
    assert plan.fixed_bytes == params.slack_bytes
    budget = plan.held_bytes + plan.fixed_bytes + int(3.5 * plan.per_sample_bytes)
    tight = plan_chunks(_touch, _touch, 40, None, 0, budget, torch.device("cpu"))
    assert tight.hessian_chunk == 3


def test_cpu_chunk_is_capped_and_does_not_follow_n(monkeypatch):
    """Below the budget a CPU chunk holds at most ``hessian_max_bytes``: the same chunk for
    40 or 400 samples, and whatever the process already holds (the data grows with N)."""
    params = MemoryParams()
    cap = params.hessian_max_bytes // int(SAMPLE * params.safety)  # 17 samples of 60 MiB
    chunks = set()
    for n, held in ((40, 1 * 2**30), (400, 3 * 2**30)):
        monkeypatch.setattr(mem.PeakMeter, "held", lambda self, h=held: h)
        plan = plan_chunks(_touch, _touch, n, None, 0, 64 * 2**30, torch.device("cpu"))
        chunks.add(plan.hessian_chunk)
    assert chunks == {cap}
    # a budget below the cap still decides (room for 3.5 samples: 3)
    monkeypatch.setattr(mem.PeakMeter, "held", lambda self: 0)
    budget = params.slack_bytes + int(3.5 * SAMPLE * params.safety)
    assert plan_chunks(_touch, _touch, 400, None, 0, budget,
                       torch.device("cpu")).hessian_chunk == 3


def test_plan_memory_does_not_count_the_train_set_on_cpu(cnn_pt2, calib_digits, tmp_path):
    """On the CPU the sweep's chunks are views of the one resident copy (held already): the
    accumulators are the per-vector weight sums alone, the same for 20 or 80 samples."""
    from sensitivity.engine import plan_memory
    from sensitivity.structure import gauss_newton_exact

    x, y = calib_digits
    cfg = HessianConfig(vectors_per_pass=3, memory_budget=64 * 2**30)
    found = []
    for n in (20, 80):
        it = intake(cnn_pt2, zoo.save_calibration(tmp_path / f"c{n}.safetensors", x[:n], y[:n]))
        graphs = [layer.graph for layer in it.layers]
        exact = gauss_newton_exact(it.module, graphs, it.loss_kind)
        plan = plan_memory(it, cfg, torch.device("cpu"), exact, directions=2)
        weights = dict(it.module.named_parameters())
        weight_bytes = sum(weights[g.weight].numel() * 4 for g in graphs)
        kinds = len({exact.get(layer.name, (False, False))[0] for layer in it.layers})
        assert plan.accumulator_bytes == (3 * kinds + 2) * weight_bytes
        found.append(plan.accumulator_bytes)
    assert found[0] == found[1]


def test_one_sample_over_budget_is_resource_limit():
    with pytest.raises(ResourceLimitError) as err:
        plan_chunks(_touch, _touch, 40, None, 0, 10 * MB, torch.device("cpu"))
    detail = err.value.detail
    assert err.value.code == "resource_limit"
    assert detail["budget_bytes"] == 10 * MB and detail["per_sample_bytes"] > 0
    assert "BITPLAN_MEMORY_GB" in err.value.message


def test_peak_meter_sees_a_transient_allocation():
    with PeakMeter(torch.device("cpu")) as m:
        _touch(2)
    assert m.peak == 2 * SAMPLE


@pytest.fixture
def calib40(calib_digits, tmp_path):
    x, y = calib_digits
    return zoo.save_calibration(tmp_path / "c40.safetensors", x[:40], y[:40])


@pytest.mark.parametrize("sampling", ["all", "chunk"])
def test_the_sweep_stays_within_the_budget(cnn_pt2, calib40, monkeypatch, sampling):
    """The whole measurement (the measuring passes, the copy of the model and data, every
    probe pass, the activation statistics), counted tensor by tensor, fits the room the
    budget leaves above what the process held. No slack, and the resident set (which drifts
    by more than this tiny model's samples between runs) read as 0: only counted bytes."""
    monkeypatch.setattr(mem, "MemoryParams", lambda: MemoryParams(slack_bytes=0))
    monkeypatch.setattr(mem.PeakMeter, "held", lambda self: 0)
    it = intake(cnn_pt2, calib40)  # 32 train samples
    cfg = HessianConfig(max_iter=4, min_iter=2, seed=1, vectors_per_pass=2, sampling=sampling,
                        draw_size=32)
    free = measure(it, dataclasses.replace(cfg, memory_budget=64 * 2**30)).model["memory"]
    # room for 8.5 samples over the counted fixed part and the accumulators
    budget = (free["held_bytes"] + free["fixed_bytes"] + free["accumulator_bytes"]
              + int(8.5 * free["per_sample_bytes"]))
    with TensorMeter() as meter:
        small = measure(it, dataclasses.replace(cfg, memory_budget=budget))
    plan = small.model["memory"]
    assert 4 <= plan["hessian_chunk"] < len(it.train)  # chunked by the budget
    if sampling == "chunk":
        assert small.model["draw"] == plan["hessian_chunk"]
    assert meter.peak <= plan["budget_bytes"] - plan["held_bytes"]


def test_budget_chunks_the_hessian_and_keeps_the_estimate(cnn_pt2, tiny_calib, monkeypatch):
    monkeypatch.setattr(mem.PeakMeter, "held", lambda self: 0)  # the resident set drifts
    it = intake(cnn_pt2, tiny_calib)
    cfg = HessianConfig(max_iter=6, min_iter=6, seed=1, vectors_per_pass=3)
    whole = measure(it, cfg)
    big = measure(it, HessianConfig(**{**cfg.to_dict(), "memory_budget": 64 * 2**30}))
    mem_plan = big.model["memory"]
    assert mem_plan["hessian_chunk"] == len(it.train)  # everything fits: one chunk
    budget = (mem_plan["held_bytes"] + mem_plan["fixed_bytes"] + mem_plan["accumulator_bytes"]
              + int(2.5 * mem_plan["per_sample_bytes"]))
    small = measure(it, HessianConfig(**{**cfg.to_dict(), "memory_budget": budget}))
    assert 1 < small.model["chunk"] < len(it.train)
    assert small.model["chunk"] == small.model["memory"]["hessian_chunk"]
    for a, b in zip(whole.layers, small.layers, strict=True):
        assert b.weight_trace == pytest.approx(a.weight_trace, rel=1e-4)
        assert b.activation_trace == pytest.approx(a.activation_trace, rel=1e-4)


def test_pipeline_with_a_tiny_budget_fails_with_resource_limit(cnn_pt2, tiny_calib, tmp_path):
    cons = {"limits": {"size_ratio": 0.9}, "weight_bits": [4, 8], "drq": {"enabled": False}}
    with pytest.raises(ResourceLimitError) as err:
        run_pipeline(cnn_pt2, tiny_calib, cons, tmp_path, memory_budget=1 * MB)
    assert err.value.detail["budget_bytes"] == 1 * MB
    result = run_pipeline(cnn_pt2, tiny_calib, cons, tmp_path / "ok", memory_budget=8 * 2**30)
    assert result.plan["status"] in ("optimal", "feasible")
