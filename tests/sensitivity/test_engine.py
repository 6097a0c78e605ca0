"""measure(): Omega tables, JSON format, determinism, chunked / fixed-batch data, label-free."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from quantize.primitives import activation_scale, fake_quantize_activation, weight_quant_error
from sensitivity import HessianConfig, SensitivityResult, measure
from sensitivity.engine import ACTIVATION_BITS, WEIGHT_BITS
from sensitivity.intake import intake

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_KEYS = {"name", "kind", "params", "macs", "weight_trace", "weight_trace_stderr",
              "activation_trace", "activation_trace_stderr", "omega_w", "omega_a"}
FAST = HessianConfig(max_iter=24, min_iter=8, tol=0.05, seed=0)


@pytest.fixture(scope="module")
def cnn_result(cnn_pt2, tiny_calib):
    it = intake(cnn_pt2, tiny_calib)
    return it, measure(it, FAST)


def test_json_schema_and_round_trip(cnn_result):
    _, res = cnn_result
    d = json.loads(res.to_json())
    assert d["version"] == 4
    assert {"model", "layers", "iterations", "seconds"} <= set(d)
    assert d["model"]["layers"] == 3 and d["model"]["loss"] == "cross_entropy"
    for row in d["layers"]:
        assert LAYER_KEYS <= set(row)
        assert set(row["omega_w"]) == {str(b) for b in WEIGHT_BITS}
        assert set(row["omega_a"]) == {str(a) for a in ACTIVATION_BITS}
    back = SensitivityResult.from_json(res.to_json())
    assert back.to_json() == res.to_json()
    # version 2 carries the layer input statistics the activation Omegas used
    assert back.activations == res.activations and set(d["activations"]["layers"]) == {
        row["name"] for row in d["layers"]}
    # version 1 (no statistics) is still read
    old = SensitivityResult.from_dict({k: v for k, v in {**d, "version": 1}.items()
                                       if k != "activations"})
    assert old.activations is None and old.layers == res.layers
    with pytest.raises(ValueError):
        SensitivityResult.from_dict({**d, "version": 5})


def test_omega_tables(cnn_result):
    it, res = cnn_result
    params = dict(it.module.named_parameters())
    for info, row in zip(it.layers, res.layers, strict=True):
        w = params[info.graph.weight]
        for b in WEIGHT_BITS:
            expect = row.weight_trace / info.params * weight_quant_error(w, b)
            assert row.omega_w[b] == pytest.approx(expect, rel=1e-9)
        # fewer bits, more error
        assert row.omega_w[2] > row.omega_w[4] > row.omega_w[8] > 0
        assert row.omega_a[4] > row.omega_a[8] > 0
        assert row.activation_numel == len(it.train) * math.prod(info.input_shape)


def test_activation_omega_matches_direct_computation(cnn_result):
    it, res = cnn_result
    # the input of conv1 is the calibration images themselves
    x = it.train.args[0]
    for a in ACTIVATION_BITS:
        scale, signed = activation_scale(float(x.min()), float(x.max()), a)
        err = float((fake_quantize_activation(x, scale, a, signed) - x).double().pow(2).sum())
        row = res.layer("conv1")
        assert row.omega_a[a] == pytest.approx(row.activation_trace / x.numel() * err, rel=1e-6)


def test_deterministic_given_seed(cnn_pt2, tiny_calib, cnn_result):
    it, _ = cnn_result
    res = measure(it, FAST)
    again = measure(intake(cnn_pt2, tiny_calib), FAST)
    other = measure(it, HessianConfig(**{**FAST.to_dict(), "seed": 1}))
    for a, b, c in zip(res.layers, again.layers, other.layers, strict=True):
        assert a.to_dict() == b.to_dict()
        assert a.weight_trace != c.weight_trace


def test_progress_is_reported(cnn_result):
    it, _ = cnn_result
    calls: list[tuple[str, float]] = []
    measure(it, FAST, progress=lambda s, f: calls.append((s, f)))
    fractions = [f for s, f in calls if s == "sensitivity"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions) and len(fractions) > 3


def test_chunked_and_fixed_batch_agree_with_one_batch(cnn_pt2, cnn_fixed_batch_pt2, calib_path):
    """The same mean-loss Hessian fed three ways: one chunk, chunks of 64 (dynamic program),
    and the fixed-batch-16 export with a padded last chunk. Estimates of the same traces must
    agree within their joint error bars."""
    cfg = HessianConfig(max_iter=64, min_iter=32, tol=0.02, seed=2)
    one = measure(intake(cnn_pt2, calib_path), cfg)
    chunked = measure(intake(cnn_pt2, calib_path), HessianConfig(**{**cfg.to_dict(),
                                                                    "batch_size": 64}))
    fixed_it = intake(cnn_fixed_batch_pt2, calib_path)
    assert len(fixed_it.train) % 16 != 0  # the last chunk really is padded
    fixed = measure(fixed_it, cfg)
    assert fixed.model["batch_size"] == 16
    for a, b, c in zip(one.layers, chunked.layers, fixed.layers, strict=True):
        for x, y in [(a, b), (a, c)]:
            se = math.hypot(x.weight_trace_stderr, y.weight_trace_stderr)
            assert abs(x.weight_trace - y.weight_trace) < 4 * se, (x.name, x.weight_trace,
                                                                  y.weight_trace, se)
            se = math.hypot(x.activation_trace_stderr, y.activation_trace_stderr)
            assert abs(x.activation_trace - y.activation_trace) < 4 * se
        assert c.activation_numel == a.activation_numel  # padding rows are not counted


def test_label_free_calibration(cnn_pt2, calib_unlabelled_path):
    it = intake(cnn_pt2, calib_unlabelled_path)
    assert it.loss_kind == "kl"
    res = measure(it, FAST)
    assert res.model["loss"] == "kl"
    assert all(r.weight_trace > 0 and r.activation_trace > 0 for r in res.layers)


def test_weights_only(cnn_result):
    it, _ = cnn_result
    res = measure(it, HessianConfig(max_iter=8, min_iter=4, activations=False))
    row = res.layers[0]
    assert row.activation_trace is None and row.omega_a == {}
    assert json.loads(res.to_json())["layers"][0]["activation_trace"] is None


def test_measure_leaves_intake_module_untouched(cnn_result):
    it, _ = cnn_result
    names = [n.name for n in it.module.graph.nodes]
    assert not any("hessian_probe" in n for n in names)
    assert all(p.requires_grad for p in it.module.parameters())
    x = it.train.args[0][:2]
    with torch.no_grad():
        assert it.module(x).shape == (2, 10)


def test_handed_down_activation_statistics_give_the_same_result(cnn_result):
    """measure() with the statistics observed outside (as a caller that already has them)
    equals measure() observing them itself; they come back in ``result.activations``."""
    from quantize.observe import observe

    it, _ = cnn_result
    res = measure(it, FAST)  # on this test's thread count (the fixture ran before one_thread)
    graphs = [info.graph for info in it.layers]
    stats = observe(it.module, graphs, it.train, it.chunk_size(FAST.batch_size))
    assert res.activations == stats
    handed = measure(it, FAST, activations=stats)
    assert handed.activations is stats
    assert [(r.omega_w, r.omega_a, r.activation_numel) for r in handed.layers] == [
        (r.omega_w, r.omega_a, r.activation_numel) for r in res.layers]
    # the statistics are used: another range gives other activation Omegas
    wide = dataclasses.replace(stats, layers={
        n: dataclasses.replace(s, hi=2 * s.hi) for n, s in stats.layers.items()})
    other = measure(it, FAST, activations=wide)
    assert all(a.omega_a[8] != b.omega_a[8] for a, b in zip(other.layers, res.layers,
                                                             strict=True))


@pytest.mark.parametrize("signed", [True, False])
def test_rounding_error_is_the_fake_quantized_error(signed) -> None:
    """The in-place float32 error equals ``||fake_quantize_activation(x) - x||^2`` in float64
    (1e-5 relative; measured ~1e-7), also for values clipped at the grid's ends."""
    from sensitivity.engine import rounding_error

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 9, 9, generator=gen) * 3 + (0 if signed else 2)
    x = x if signed else x.clamp_min(0)
    for bits, scale in [(8, 0.05), (4, 0.3), (4, 0.02)]:  # 0.02 at 4 bits clips most values
        exact = float((fake_quantize_activation(x.double(), scale, bits, signed)
                       - x.double()).pow(2).sum())
        assert rounding_error(x, scale, bits, signed) == pytest.approx(exact, rel=1e-5)


def test_plan_memory_probes_a_looped_pass_with_two_vectors(cnn_pt2, tiny_calib, monkeypatch):
    """A looped (CPU) probe pass frees each vector's gradients before the next, so the memory
    plan measures it with 2 vectors: the measured peak is the same as with the sweep's 8
    (the tensors a pass keeps per vector are a few floats), and a vmap-batched sweep is still
    measured with all of its vectors."""
    from sensitivity import engine
    from sensitivity.hessian import prepare
    from sensitivity.memory import PeakMeter
    from sensitivity.structure import gauss_newton_exact

    it = intake(cnn_pt2, tiny_calib)
    graphs = [layer.graph for layer in it.layers]
    exact = gauss_newton_exact(it.module, graphs, it.loss_kind)
    peaks = {}
    for k in (2, 8):
        cfg = HessianConfig(max_iter=k, min_iter=2, vectors_per_pass=k, sampling="all")
        q = prepare(it.module, graphs, it.train, it.loss_kind, len(it.train), False,
                    torch.device("cpu"))
        with PeakMeter(torch.device("cpu")) as pm:
            engine.hutchinson(q, cfg, None, "sensitivity", exact)
        peaks[k] = pm.peak
    # equal up to what a pass holds per vector: its output-space probe ([n, 10] float32, made
    # for every vector up front) and a row of the [k, blocks] float64 samples; bounded with 3
    # probes' and 16 blocks' bytes per extra vector (measured: 368 bytes a vector)
    per_vector = 3 * len(it.train) * 10 * 4 + 16 * 8
    assert abs(peaks[8] - peaks[2]) <= 6 * per_vector < 0.05 * peaks[2]
    seen = []
    real = engine.hutchinson
    monkeypatch.setattr(engine, "hutchinson",
                        lambda p, cfg, *a, **kw: seen.append(cfg) or real(p, cfg, *a, **kw))
    for vectorize, expected in ((None, 2), (True, 8)):
        seen.clear()
        engine.plan_memory(it, HessianConfig(vectors_per_pass=8, vectorize=vectorize,
                                             memory_budget=8 * 2**30),
                           torch.device("cpu"), exact)
        assert seen and all(c.vectors_per_pass == expected for c in seen)


@pytest.mark.parametrize("correction", ["none", "weight"])
def test_progress_moves_after_the_sweep_until_the_stage_ends(cnn_pt2, tiny_calib, monkeypatch,
                                                             correction):
    """The passes after the sweep (activation statistics and errors) advance the fraction
    chunk by chunk from where the sweep left it: every report of those passes is higher than
    the one before, all below 1, and 1 comes once, last."""
    from sensitivity import engine

    it = intake(cnn_pt2, tiny_calib)
    calls: list[tuple[str, float, bool]] = []
    phase = {"after": False}
    real = engine.observe

    def observe(*a, **kw):
        phase["after"] = True
        return real(*a, **kw)

    monkeypatch.setattr(engine, "observe", observe)
    measure(it, dataclasses.replace(FAST, batch_size=4), bias_correction=correction,
            progress=lambda s, f: calls.append((s, f, phase["after"])))
    fractions = [f for s, f, _ in calls if s == "sensitivity"]
    assert fractions == sorted(fractions) and fractions.count(1.0) == 1
    assert fractions[-1] == 1.0
    after = [f for s, f, a in calls[:-1] if a]
    chunks = math.ceil(len(it.train) / 4)
    assert len(after) == 2 * chunks  # observe, then the activation errors
    assert all(b > a for a, b in zip(after, after[1:], strict=False)) and after[-1] < 1.0


def test_activation_statistics_carry_every_free_point(resnet_pt2, tiny_calib):
    """The one statistics pass also takes the free points' ranges, on the Hessian's model copy
    (input probes, and shift leaves on every layer output with the bias correction): located
    on the clean graph, they equal the ones observed on the intake's module, and cover every
    free point of the BN-folded model quantize.apply calibrates (so it runs no pass)."""
    from quantize.fold import fold_layers
    from quantize.graph import find_layers
    from quantize.observe import observe
    from quantize.points import find_points

    it = intake(resnet_pt2, tiny_calib)
    res = measure(it, FAST, bias_correction="weight")
    graphs = [info.graph for info in it.layers]
    clean = observe(it.module, graphs, it.train, it.chunk_size(FAST.batch_size))
    assert res.activations.points == clean.points
    folded = it.program.module()
    qlayers = {layer.name: layer for layer in find_layers(folded)}
    fold_layers(folded, list(qlayers.values()))
    free = {p.end for p in find_points(folded, qlayers) if p.consumer is None}
    assert free and free <= res.activations.points.keys()


@pytest.mark.parametrize("batch_size", [None, 5])
def test_streamed_calibration_measures_the_same(cnn_pt2, tiny_calib, cnn_result,
                                                batch_size):
    """The pipeline's intake streams the calibration file (``IntakeConfig(stream=True)``):
    the Hessian's chunks are read from the file pass by pass (``CalibrationSet.chunks``, not a
    list of the whole train set) and every estimate equals the in-memory intake's up to float
    rounding (fresh chunk tensors instead of views: 3e-8 relative measured; 1e-6 allowed)."""
    from quantize.data import Chunks
    from sensitivity.hessian import prepare
    from sensitivity.intake import IntakeConfig

    it, res = cnn_result
    streamed = intake(cnn_pt2, tiny_calib, IntakeConfig(stream=True))
    assert streamed.train.streamed
    p = prepare(streamed.module, [layer.graph for layer in streamed.layers], streamed.train,
                streamed.loss_kind, 4, False, torch.device("cpu"))
    assert isinstance(p.chunks, Chunks)
    cfg = HessianConfig(**{**FAST.to_dict(), "batch_size": batch_size})
    want = res if batch_size is None else measure(it, cfg)
    got = measure(streamed, cfg)
    for a, b in zip(want.layers, got.layers, strict=True):
        da, db = a.to_dict(), b.to_dict()
        assert da.keys() == db.keys()
        for key in da:
            if isinstance(da[key], float):
                assert db[key] == pytest.approx(da[key], rel=1e-6), key
            elif isinstance(da[key], dict):
                assert db[key] == pytest.approx(da[key], rel=1e-6), key
            else:
                assert db[key] == da[key], key
