"""Hutchinson traces against exact Hessian blocks from torch.func.hessian."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import exact_traces

from sensitivity import HessianConfig, measure
from sensitivity.hessian import BlockStats
from sensitivity.intake import intake

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    # id: (model fixture, calibration fixture, estimator, expected estimator of every block)
    "mlp-ce-probe": ("mlp_pt2", "tiny_calib", "auto", "output-probe"),
    "mlp-ce-hvp": ("mlp_pt2", "tiny_calib", "hvp", "hvp"),
    "cnn-ce-probe": ("cnn_pt2", "tiny_calib", "auto", "output-probe"),
    "cnn-kl-probe": ("cnn_pt2", "tiny_calib_unlabelled", "auto", "output-probe"),
    "tanh-ce-mixed": ("tanh_pt2", "tiny_calib", "auto", None),
    "tanh-kl-probe": ("tanh_pt2", "tiny_calib_unlabelled", "auto", "output-probe"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_traces_match_exact_blocks(case, request):
    model, calib, estimator, expected = CASES[case]
    it = intake(request.getfixturevalue(model), request.getfixturevalue(calib))
    exact_w, exact_a = exact_traces(it)
    # joint HVPs carry cross-block noise and need more samples for the same error bar
    max_iter = 2000 if estimator == "hvp" else 400
    cfg = HessianConfig(max_iter=max_iter, tol=0.02, min_iter=100, seed=3, estimator=estimator,
                        vectors_per_pass=16)
    res = measure(it, cfg)
    for row in res.layers:
        for est, se, exact, how in [
            (row.weight_trace, row.weight_trace_stderr, exact_w[row.name], row.weight_estimator),
            (row.activation_trace, row.activation_trace_stderr, exact_a[row.name],
             row.activation_estimator),
        ]:
            assert exact > 0
            # meaningful: the error bar is small next to the value it brackets
            assert se < 0.15 * exact, (row.name, est, se, exact)
            # 28 comparisons (the cases' layers, weights and activations): a family-wise 1 %
            # bound is 3.57 se (Bonferroni, two-sided); measured with seed 3 on AMD EPYC: at
            # most 2.5 se. Fails for an estimator biased by more than that.
            assert abs(est - exact) < 3.57 * se, (row.name, how, est, se, exact)
            if expected is not None:
                assert how == expected


@pytest.mark.parametrize("case", ["cnn-ce-probe", "tanh-ce-mixed", "tanh-kl-probe"])
def test_drawn_chunks_converge_to_the_exact_mean_loss_traces(case, request):
    """``sampling: chunk``: each pass draws 3 of the 8 train samples; the pass means are
    unbiased for the trace of the mean loss over all 8, and their standard error (probe noise
    plus the sampling of data) brackets the exact value."""
    model, calib, estimator, _ = CASES[case]
    it = intake(request.getfixturevalue(model), request.getfixturevalue(calib))
    exact_w, exact_a = exact_traces(it)
    cfg = HessianConfig(max_iter=2400, tol=0.02, min_iter=100, seed=5, estimator=estimator,
                        vectors_per_pass=4, sampling="chunk", batch_size=3)
    res = measure(it, cfg)
    assert res.model["draw"] == 3 and res.model["sampling"] == "chunk"
    for row in res.layers:
        assert row.weight_iterations >= 100  # passes: one sample each
        for est, se, exact in [
            (row.weight_trace, row.weight_trace_stderr, exact_w[row.name]),
            (row.activation_trace, row.activation_trace_stderr, exact_a[row.name]),
        ]:
            assert se < 0.15 * exact, (row.name, est, se, exact)
            # 16 comparisons: a family-wise 1 % bound is 3.42 se (Bonferroni, two-sided)
            assert abs(est - exact) < 3.42 * se, (row.name, est, se, exact)


def test_drawn_chunks_do_not_grow_with_the_set(cnn_pt2, tiny_calib):
    """A drawn pass runs on its chunk only: the forward calls see 2 samples whatever N."""
    it = intake(cnn_pt2, tiny_calib)
    seen: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[0]) if isinstance(m, torch.fx.GraphModule)
        and args else None)
    try:
        from sensitivity.hessian import hutchinson, prepare
        p = prepare(it.module, [x.graph for x in it.layers], it.train, it.loss_kind, 8, False,
                    torch.device("cpu"))
        seen.clear()
        est = hutchinson(p, HessianConfig(max_iter=8, min_iter=4, vectors_per_pass=2,
                                          sampling="chunk", batch_size=2))
    finally:
        hook.remove()
    assert seen and set(seen) == {2}
    assert est.passes == 4 and len(p.chunks) == 1 and p.chunks[0].size == 8  # restored


def test_auto_keeps_drawing_only_while_it_is_projected_cheaper():
    from sensitivity.hessian import _drawing_costs_more

    cfg = HessianConfig(min_iter=10, tol=0.05, vectors_per_pass=8)
    blocks = {"gn": [0], "hvp": []}
    taken = {"gn": 10, "hvp": 0}
    # relative se 0.1 after 10 passes: ~30 more passes of 8 samples = 240 > 2 x 64 samples;
    # the comparison starts after hessian.AUTO_CHECK = 4 passes
    spread = BlockStats([1.0 + (0.316 if i % 2 else -0.316) for i in range(10)])
    assert spread.stderr / spread.mean == pytest.approx(0.1, rel=0.1)
    assert _drawing_costs_more([spread], blocks, taken, cfg, 8, all_floor=2 * 64)
    assert not _drawing_costs_more([spread], blocks, taken, cfg, 8, all_floor=2 * 256)
    assert not _drawing_costs_more([spread], blocks, {"gn": 3, "hvp": 0}, cfg, 8, 2 * 64)  # < 4
    tight = BlockStats([1.0 + (0.01 if i % 2 else -0.01) for i in range(10)])
    assert not _drawing_costs_more([tight], blocks, taken, cfg, 8, all_floor=16)


@pytest.mark.parametrize("draw,tol,expected", [(1, 0.03, "all (auto switched)"),
                                               (2, 0.3, "chunk"), (4, 0.03, "all")])
def test_auto_sampling_reports_its_mode_and_stays_unbiased(cnn_pt2, tiny_calib, draw, tol,
                                                           expected):
    """auto on the digits CNN (8 train samples, 4 vectors a pass: 'all' needs 3 passes of 8,
    24 samples): single-sample draws (10 at least) spread too much for tol 0.03 and it starts
    again with all samples; 2-sample draws reach tol 0.3; 4-sample draws (40) cannot beat 24
    and it never draws. Either way the estimate is of the same mean-loss trace (exact within
    the Bonferroni bound for 8 comparisons, 3.23 se)."""
    it = intake(cnn_pt2, tiny_calib)
    exact_w, exact_a = exact_traces(it)
    cfg = HessianConfig(max_iter=1200, tol=tol, min_iter=10, seed=2, vectors_per_pass=4,
                        sampling="auto", batch_size=draw)
    res = measure(it, cfg)
    assert res.model["sampling"] == expected
    for row in res.layers:
        for est, se, exact in [(row.weight_trace, row.weight_trace_stderr, exact_w[row.name]),
                               (row.activation_trace, row.activation_trace_stderr,
                                exact_a[row.name])]:
            assert abs(est - exact) < 3.23 * se, (row.name, est, se, exact)


def test_progress_moves_after_every_looped_vector(cnn_pt2, tiny_calib):
    """A large model's pass takes long: the fraction advances per vector, never backwards."""
    it = intake(cnn_pt2, tiny_calib)
    calls: list[float] = []
    measure(it, HessianConfig(max_iter=8, min_iter=2, vectors_per_pass=4, sampling="chunk",
                              batch_size=4, vectorize=False),
            progress=lambda stage, f: calls.append(f))
    assert calls == sorted(calls) and calls[-1] == 1.0
    # 2 passes of 4 output-probe vectors: a report after each of them (plus start and end)
    assert len({round(f, 6) for f in calls if 0 < f < 1}) >= 7


def test_non_piecewise_linear_layer_uses_hvps(tanh_pt2, tiny_calib):
    it = intake(tanh_pt2, tiny_calib)
    res = measure(it, HessianConfig(max_iter=20, min_iter=10))
    # fc1 feeds tanh: its block has a curvature term the Gauss-Newton factor misses
    assert res.layer("fc1").weight_estimator == "hvp"
    assert res.layer("fc1").activation_estimator == "hvp"
    assert res.layer("fc2").weight_estimator == "output-probe"


def test_stopping_rule_and_iterations(mlp_pt2, tiny_calib):
    it = intake(mlp_pt2, tiny_calib)
    loose = measure(it, HessianConfig(max_iter=400, tol=0.2, min_iter=10, vectors_per_pass=2))
    assert all(r.weight_converged and r.activation_converged for r in loose.layers)
    assert loose.iterations < 400
    for r in loose.layers:
        assert r.weight_trace_stderr <= 0.2 * r.weight_trace
    capped = measure(it, HessianConfig(max_iter=6, tol=1e-3, min_iter=2, vectors_per_pass=4))
    assert capped.iterations == 6
    assert all(r.weight_iterations == 6 and not r.weight_converged for r in capped.layers)


def test_block_stats_rule():
    s = BlockStats([1.0, 1.1, 0.9, 1.0])
    assert math.isclose(s.mean, 1.0)
    assert s.converged(0.1)
    neg = BlockStats([-1.0, -1.1, -0.9])
    assert not neg.converged(0.5)  # a negative mean never satisfies the relative rule
    assert not BlockStats([2.0]).converged(0.5)


def test_vectorized_and_looped_agree(cnn_pt2, tiny_calib):
    it = intake(cnn_pt2, tiny_calib)
    cfg = dict(max_iter=16, min_iter=16, seed=5)
    a = measure(it, HessianConfig(vectorize=False, **cfg))
    b = measure(it, HessianConfig(vectorize=True, **cfg))
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.weight_trace == pytest.approx(y.weight_trace, rel=1e-4)
        assert x.activation_trace == pytest.approx(y.activation_trace, rel=1e-4)
    h1 = measure(it, HessianConfig(estimator="hvp", vectorize=False, **cfg))
    h2 = measure(it, HessianConfig(estimator="hvp", vectorize=True, **cfg))
    for x, y in zip(h1.layers, h2.layers, strict=True):
        assert x.weight_trace == pytest.approx(y.weight_trace, rel=1e-3, abs=1e-6)


def test_config_validation_and_json():
    cfg = HessianConfig(max_iter=50, tol=0.1, seed=4, batch_size=16, estimator="hvp")
    assert HessianConfig.from_dict(cfg.to_dict()) == cfg
    import json

    assert HessianConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in [dict(max_iter=1), dict(tol=0), dict(tol=1.5), dict(batch_size=0),
                dict(estimator="exact"), dict(min_iter=1), dict(vectors_per_pass=0)]:
        with pytest.raises(ValueError):
            HessianConfig(**bad)
    with pytest.raises(ValueError):
        HessianConfig.from_dict({"max_iters": 3})


def test_runs_on_given_device(mlp_pt2, tiny_calib):
    it = intake(mlp_pt2, tiny_calib)
    res = measure(it, HessianConfig(max_iter=4, min_iter=2), device=torch.device("cpu"))
    assert res.model["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(cnn_pt2, tiny_calib):
    it = intake(cnn_pt2, tiny_calib)
    cfg = HessianConfig(max_iter=32, min_iter=32, seed=1)
    a = measure(it, cfg, device="cpu")
    b = measure(it, cfg, device="cuda")
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.weight_trace == pytest.approx(y.weight_trace, rel=1e-3)
        assert x.activation_trace == pytest.approx(y.activation_trace, rel=1e-3)


@pytest.mark.parametrize("case", ["cnn-ce-probe", "tanh-ce-mixed", "mlp-ce-hvp"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_chunked_equals_unchunked(case, vectorize, request):
    """Chunks only bound memory: every Hutchinson sample (output probes, joint HVPs, weight and
    activation blocks) is the one-chunk sample, up to float summation order."""
    model, calib, estimator, _ = CASES[case]
    it = intake(request.getfixturevalue(model), request.getfixturevalue(calib))
    assert len(it.train) == 8
    base = dict(max_iter=6, min_iter=6, seed=5, estimator=estimator, vectors_per_pass=3,
                vectorize=vectorize)
    whole = measure(it, HessianConfig(**base))
    for chunk in (1, 3):  # 8 single samples; chunks of 3, 3 and 2
        parts = measure(it, HessianConfig(**base, batch_size=chunk))
        for a, b in zip(whole.layers, parts.layers, strict=True):
            assert a.weight_iterations == b.weight_iterations == 6
            # float32 sums in another order: ~1e-6 relative; a different random vector
            # would change a sample by tens of percent
            assert b.weight_trace == pytest.approx(a.weight_trace, rel=1e-4), (chunk, a.name)
            assert b.weight_trace_stderr == pytest.approx(a.weight_trace_stderr, rel=1e-3)
            assert b.activation_trace == pytest.approx(a.activation_trace, rel=1e-4)
            assert b.activation_trace_stderr == pytest.approx(a.activation_trace_stderr,
                                                              rel=1e-3)
