"""quantize/calibrate.py's range observer: one min/max pass that still refuses NaN and inf."""

from __future__ import annotations

import pytest
import torch

from quantize.calibrate import RangeObserver, _BatchInfo
from solver.errors import BadCalibrationError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 7, 63])
def test_a_non_finite_value_anywhere_is_refused(bad, where) -> None:
    obs = RangeObserver(_BatchInfo(), bins=16)
    x = torch.randn(4, 16)
    obs(x)
    y = torch.randn(4, 16)
    y.view(-1)[where] = bad
    with pytest.raises(BadCalibrationError, match="non-finite"):
        obs(y)


def test_range_and_count_over_batches_and_padding() -> None:
    info = _BatchInfo()
    obs = RangeObserver(info, bins=16)
    a = torch.tensor([[0.5, -2.0], [1.0, 3.0]])
    info.full, info.valid = 3, 2  # the third row is padding: its 100 is not seen
    obs(torch.cat([a, torch.tensor([[100.0, -100.0]])]))
    obs(torch.tensor([[-3.0, 0.0]]))
    assert (obs.amin, obs.amax, obs.count) == (-3.0, 3.0, 6)
    assert obs.value_range("minmax", 99.9) == (-3.0, 3.0)


# --- free points: ranges from the job's one statistics pass on the unfolded model ----------

def _count_passes(monkeypatch) -> list[int]:
    """Counts the forward batches of quantize.calibrate's calibration pass."""
    import quantize.calibrate as calibrate_mod

    calls = [0]
    real = calibrate_mod.run_batch

    def counting(module, batch):
        calls[0] += 1
        return real(module, batch)

    monkeypatch.setattr(calibrate_mod, "run_batch", counting)
    return calls


def _without_points(stats):
    from quantize.observe import ActivationStats

    return ActivationStats(stats.layers, stats.samples, sums=stats.sums)


def _free_grids(result) -> dict[str, object]:
    return {p["node"]: p["grid"] for p in result.checkpoint.quant["points"]
            if p["consumer"] is None}


def _assert_same_grids(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for node, g in a.items():
        assert (g["bits"], g["signed"]) == (b[node]["bits"], b[node]["signed"]), node
        # float rounding only: the unfolded conv + BN vs the folded conv differ by a few float32
        # ulps (measured <= 3e-5 relative through ResNet-50's 54 layers, 0 to 2e-6 here)
        assert g["scale"] == pytest.approx(b[node]["scale"], rel=1e-5), node


def _apply_both(program, plan, train, holdout, monkeypatch, **kw):
    """apply() with the statistics observe() gives (free points included) and with the same
    statistics less the points (today's calibration pass): (result, passes) of each."""
    from quantize import QuantizeConfig, apply
    from quantize.graph import find_layers
    from quantize.observe import observe

    gm = program.module()
    stats = observe(gm, find_layers(gm), train, 16)
    calls = _count_passes(monkeypatch)
    new = apply(program, plan, train, holdout, QuantizeConfig(), activations=stats, **kw)
    passes_new, calls[0] = calls[0], 0
    old = apply(program, plan, train, holdout, QuantizeConfig(),
                activations=_without_points(stats), **kw)
    return stats, (new, passes_new), (old, calls[0])


@pytest.mark.parametrize("only", [None, {"stem", "conv1", "fc"}])
def test_free_points_need_no_calibration_pass_on_a_residual_model(
        resnet_program, plan_for, split, monkeypatch, only) -> None:
    """DigitsResNet (BN after every conv, a residual add, a pool): every free point of a plan
    (all layers, or a subset: other points are free then) is taken from the statistics pass,
    the quantize stage runs no forward of its own, and the grids are today's pass's."""
    train, holdout = split
    _, (new, passes), (old, old_passes) = _apply_both(
        resnet_program, plan_for(resnet_program, only=only), train, holdout, monkeypatch)
    assert passes == 0 and old_passes > 0
    _assert_same_grids(_free_grids(new), _free_grids(old))
    kinds = {p["kind"] for p in new.checkpoint.quant["points"] if p["consumer"] is None}
    assert kinds == ({"layer", "add"} if only is None else {"layer"})


def test_free_points_need_no_calibration_pass_on_a_tiny_llama(plan_for, monkeypatch) -> None:
    """The tiny Llama-style decoder (rotary, attention with a -inf mask add, gated MLP): its
    projections' outputs are free points; no pass, the same grids."""
    import hf_zoo

    from quantize.data import CalibrationSet

    ids = hf_zoo.calibration_ids(24, 16)
    program = hf_zoo.export(hf_zoo.trained_llama(), (ids[:2],))
    train, holdout = CalibrationSet((ids[:16],)), CalibrationSet((ids[16:],))
    _, (new, passes), (old, old_passes) = _apply_both(
        program, plan_for(program), train, holdout, monkeypatch, token_input=0)
    assert passes == 0 and old_passes > 0
    _assert_same_grids(_free_grids(new), _free_grids(old))
    assert len(_free_grids(new)) >= 2 * 6  # q/k/v/o, gate/up of each layer are free points


def test_a_point_missing_from_the_statistics_is_observed_alone(resnet_program, plan_for, split,
                                                                monkeypatch) -> None:
    """Correctness first: a free point the statistics lack (or whose shape disagrees with the
    folded graph's) goes to the calibration pass; the others keep the statistics' ranges."""
    from dataclasses import replace

    from quantize import QuantizeConfig, apply
    from quantize.graph import find_layers
    from quantize.observe import InputStats, observe

    train, holdout = split
    gm = resnet_program.module()
    stats = observe(gm, find_layers(gm), train, 16)
    plan = plan_for(resnet_program)
    full = apply(resnet_program, plan, train, holdout, QuantizeConfig(), activations=stats)
    ends = {p["node"]: p["end"] for p in full.checkpoint.quant["points"] if p["consumer"] is None}
    dropped, bent = sorted(ends.values())[:2]
    s = stats.points[bent]
    points = {**stats.points, bent: InputStats(s.lo, s.hi, s.numel, (*s.shape, 1))}
    del points[dropped]
    calls = _count_passes(monkeypatch)
    part = apply(resnet_program, plan, train, holdout, QuantizeConfig(),
                 activations=replace(stats, points=points))
    assert calls[0] > 0
    ranges = part.activations.outputs[frozenset(r["name"] for r in plan["layers"])]
    for end in ends.values():
        if end not in (dropped, bent):
            assert ranges[end] == (stats.points[end].lo, stats.points[end].hi)
    _assert_same_grids(_free_grids(part), _free_grids(full))


def test_point_ends_locate_every_free_point_before_folding(resnet_program) -> None:
    """quantize.points.point_ends on the unfolded graph names every free point's chain end of
    the folded graph; a layer with a BN is read at the BN's output, and a point whose value
    is a layer's input says so (observed once, as that input)."""
    import operator

    import torch

    from quantize.fold import fold_layers
    from quantize.graph import find_layers, node_by_name
    from quantize.points import find_points, point_ends

    gm = resnet_program.module()
    layers = find_layers(gm)
    ends = point_ends(gm, layers)
    folded = resnet_program.module()
    qlayers = {layer.name: layer for layer in find_layers(folded)}
    fold_layers(folded, list(qlayers.values()))
    points = find_points(folded, qlayers)
    assert {p.end for p in points} <= ends.keys()
    by_name = {layer.name: layer for layer in layers}
    aten = torch.ops.aten
    for p in points:
        value = node_by_name(gm, ends[p.end].node)
        if p.kind == "layer" and p.end == p.node and by_name[p.layer].bn is not None:
            assert value.target in (operator.getitem, aten.batch_norm.default)  # its output
        if p.consumer is not None:
            assert ends[p.end].input_of == p.consumer
