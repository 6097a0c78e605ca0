"""Building options from layer specs: costs, pins, ties, DRQ modes, latency sources."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solver import ActivationMode, LayerSpec, Limits, OptionsConfig, build_problem, solve
from solver.errors import BadConstraintsError
from solver.hardware import get_profile
from solver.options import reference_totals

DRQ = {"region": [2, 2], "threshold": 17, "sensitive_fraction": 0.3, "mac_fraction": 0.3,
       "high_bits": 8, "low_bits": 4, "scale": 0.02, "signed": False}


def spec(name: str, params: int = 1001, modes=()) -> LayerSpec:
    return LayerSpec(
        name=name, kind="conv2d", params=params, macs=params * 16, out_channels=7,
        input_numel=500,
        omega_w={b: 2.0 ** -b * params for b in (2, 3, 4, 5, 6, 8)},
        omega_a={b: 0.5 * 2.0 ** -b for b in (4, 8)},
        activation_modes=list(modes), weight_trace=1.5,
    )


def test_costs_and_tags() -> None:
    cfg = OptionsConfig(weight_bits=(3, 4, 8), activation_bits=(4, 8), pin_first=None,
                        pin_last=None)
    p = build_problem([spec("a")], cfg, Limits())
    opts = {o.tag: o for o in p.layers[0].options}
    assert sorted(opts) == ["w3a4", "w3a8", "w4a4", "w4a8", "w8a4", "w8a8"]
    o = opts["w3a8"]
    # 3-bit codes are stored as nibbles in the checkpoint, so they cost 4 bits each
    assert o.size_bytes == math.ceil(1001 * 4 / 8) + 4 * 7  # 501 + 28
    assert opts["w4a8"].size_bytes == o.size_bytes
    assert opts["w8a8"].size_bytes == 1001 + 4 * 7
    assert o.bops == 1001 * 16 * 3 * 8
    assert o.omega == pytest.approx(2.0 ** -3 * 1001 + 0.5 * 2.0 ** -8)
    assert o.latency_ms is None and o.drq is None


def test_pins_and_default_bits() -> None:
    specs = [spec("first"), spec("mid"), spec("last")]
    p = build_problem(specs, OptionsConfig(), Limits(size_bytes=1.0e9))
    assert [o.tag for o in p.layers[0].options] == ["w8a8"]
    assert [o.tag for o in p.layers[1].options] == ["w4a8", "w8a8"]
    assert [o.tag for o in p.layers[2].options] == ["w8a8"]
    sol = solve(build_problem(specs, OptionsConfig(), Limits(size_bytes=1.0)))
    assert sol.status == "infeasible"  # pins hold even when nothing fits
    tight = solve(build_problem(specs, OptionsConfig(pin_first=4, pin_last=None), Limits()))
    assert p.layers[0].options[0].w_bits == 8
    assert sol.diagnosis["limits"]["size_bytes"]["min_reachable"] > 1.0
    assert tight.choices["first"] == 0


def test_tie_with_a_pinned_layer_pins_the_group() -> None:
    specs = [spec("first"), spec("mid"), spec("last")]
    p = build_problem(specs, OptionsConfig(pin_last=None), Limits(), [("first", "mid")])
    assert [o.tag for o in p.layers[1].options] == ["w8a8"]
    with pytest.raises(BadConstraintsError, match="share no candidate"):
        build_problem(specs, OptionsConfig(pin_first=4, weight_bits=(8,)), Limits(),
                      [("first", "mid")])


def test_drq_modes_give_fractional_options() -> None:
    mode = ActivationMode("drq2x2f0.3", 8 * 0.3 + 4 * 0.7, 0.01, DRQ)
    cfg = OptionsConfig(pin_first=None, pin_last=None, hardware="nvidia-t4")
    p = build_problem([spec("a", modes=[mode])], cfg, Limits())
    opts = {o.tag: o for o in p.layers[0].options}
    o = opts["w4drq2x2f0.3"]
    assert o.a_bits == pytest.approx(5.2) and o.drq == DRQ
    assert o.omega == pytest.approx(2.0 ** -4 * 1001 + 0.01)
    # at 8-bit weights the insensitive 70% of regions run with W requantised to 4 bits
    o8 = opts["w8drq2x2f0.3"]
    assert o8.omega == pytest.approx(0.3 * 2.0 ** -8 * 1001 + 0.7 * 2.0 ** -4 * 1001 + 0.01)
    # sensitive MACs are w x 8, the others min(w, 4) x 4 multiplications
    assert o.bops == pytest.approx(1001 * 16 * (0.3 * 4 * 8 + 0.7 * 4 * 4))
    assert o8.bops == pytest.approx(1001 * 16 * (0.3 * 8 * 8 + 0.7 * 4 * 4))
    assert opts["w8a8"].bops > o8.bops > 1001 * 16 * 4 * 4
    # size: the stored w-bit codes only (the low-bit weights are derived at load)
    assert o8.size_bytes == opts["w8a8"].size_bytes and o.size_bytes == opts["w4a8"].size_bytes
    t4 = get_profile("nvidia-t4")
    assert o.latency_ms == pytest.approx(t4.latency_ms(1001 * 16, 1001, 4, 5.2, 500, DRQ))
    # T4: INT8 at 65e12 MAC/s, INT4 at 130e12; the 70 % low part runs at the INT4 rate even
    # with 8-bit weights (compute-bound here: 16016 MACs vs ~1.5 kB moved)
    compute = 1001 * 16 * (0.3 / 65e12 + 0.7 / 130e12)
    moved = (1001 + 500) / 320e9  # 8-bit weights, input read as INT8 codes
    assert o8.latency_ms == pytest.approx(max(compute, moved) * 1e3)


def test_drq_latency_from_a_table_splits_by_mac_fraction() -> None:
    mode = ActivationMode("drq2x2f0.3", 8 * 0.3 + 4 * 0.7, 0.01, DRQ)
    table = {"a": {"w8a8": 2.0, "w4a4": 1.0, "w8a4": 1.5, "w4a8": 1.8}}
    cfg = OptionsConfig(pin_first=None, pin_last=None, activation_bits=(4, 8),
                        latency_table=table)
    opts = {o.tag: o for o in build_problem([spec("a", modes=[mode])], cfg,
                                            Limits()).layers[0].options}
    assert opts["w8drq2x2f0.3"].latency_ms == pytest.approx(0.3 * 2.0 + 0.7 * 1.0)
    assert opts["w4drq2x2f0.3"].latency_ms == pytest.approx(0.3 * 1.8 + 0.7 * 1.0)
    measured = {"a": {**table["a"], "w8drq2x2f0.3": 1.1, "w4drq2x2f0.3": 0.9}}
    cfg = OptionsConfig(pin_first=None, pin_last=None, activation_bits=(4, 8),
                        latency_table=measured)
    opts = {o.tag: o for o in build_problem([spec("a", modes=[mode])], cfg,
                                            Limits()).layers[0].options}
    assert opts["w8drq2x2f0.3"].latency_ms == 1.1  # a measured DRQ entry wins


def test_latency_table() -> None:
    table = {"a": {"w4a8": 1.0, "w8a8": 2.0}}
    cfg = OptionsConfig(pin_first=None, pin_last=None, latency_table=table)
    p = build_problem([spec("a")], cfg, Limits(latency_ms=1.5))
    assert [o.latency_ms for o in p.layers[0].options] == [1.0, 2.0]
    assert solve(p).choices == {"a": 0}
    with pytest.raises(BadConstraintsError, match="'b'"):
        build_problem([spec("a"), spec("b")], cfg, Limits())
    with pytest.raises(BadConstraintsError, match="'w4a8'"):
        build_problem([spec("a")], OptionsConfig(pin_first=None, pin_last=None,
                                                 latency_table={"a": {"w8a8": 1.0}}), Limits())


@pytest.mark.parametrize("kwargs, match", [
    ({"weight_bits": (4, 7)}, "allowed bits"),
    ({"activation_bits": ()}, "must not be empty"),
    ({"pin_first": 16}, "pin_first"),
    ({"hardware": "tpu-v9"}, "unknown hardware profile"),
    ({"hardware": "nvidia-t4", "latency_table": {}}, "not both"),
    ({"latency_table": {"a": {"w4a8": -1}}}, "finite number >= 0"),
])
def test_config_validation(kwargs, match) -> None:
    with pytest.raises(BadConstraintsError, match=match):
        OptionsConfig(**kwargs)


def test_config_round_trip() -> None:
    cfg = OptionsConfig(weight_bits=(2, 4, 8), activation_bits=(4, 8), hardware="nvidia-a100")
    assert OptionsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BadConstraintsError, match="unknown keys"):
        OptionsConfig.from_dict({"bits": 4})


def test_missing_omega_names_layer_and_bits() -> None:
    with pytest.raises(BadConstraintsError, match=r"'a' has no omega_a for 2 bits"):
        build_problem([spec("a")], OptionsConfig(activation_bits=(2, 4), pin_first=None,
                                                 pin_last=None), Limits())


def test_reference_totals() -> None:
    """The all-INT8 totals that ratio limits are relative to (the service converts the
    request's limits: tests/service/test_constraints.py)."""
    specs = [spec("a"), spec("b", params=3000)]
    ref = reference_totals(specs, OptionsConfig(hardware="nvidia-t4"))
    assert ref["size_bytes"] == 1001 + 28 + 3000 + 28
    assert ref["bops"] == (1001 + 3000) * 16 * 64
    assert ref["latency_ms"] is not None and ref["latency_ms"] > 0
    assert reference_totals(specs, OptionsConfig())["latency_ms"] is None  # nothing to cost


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_pins_and_ties_hold_in_every_solution(data) -> None:
    n = data.draw(st.integers(2, 6))
    specs = []
    for i in range(n):
        params = data.draw(st.integers(1, 5000))
        specs.append(LayerSpec(
            name=f"l{i}", kind="linear", params=params, macs=params * 3, out_channels=4,
            input_numel=50,
            omega_w={b: data.draw(st.floats(0, 10)) for b in (2, 4, 8)},
            omega_a={b: data.draw(st.floats(0, 10)) for b in (4, 8)}))
    pin_first = data.draw(st.sampled_from([None, 4, 8]))
    pin_last = data.draw(st.sampled_from([None, 4, 8]))
    cfg = OptionsConfig(weight_bits=(2, 4, 8), activation_bits=(4, 8), pin_first=pin_first,
                        pin_last=pin_last)
    ties = []
    if n >= 3 and data.draw(st.booleans()):
        ties = [("l1", "l2")]
    free = build_problem(specs, cfg, Limits(), ties)
    lo = sum(min(o.size_bytes for o in la.options) for la in free.layers)
    hi = sum(max(o.size_bytes for o in la.options) for la in free.layers)
    frac = data.draw(st.floats(0, 1))
    problem = build_problem(specs, cfg, Limits(size_bytes=lo + frac * (hi - lo)), ties)
    sol = solve(problem)
    assert sol.status == "optimal"
    chosen = {la.name: la.options[sol.choices[la.name]] for la in problem.layers}
    if pin_first is not None:
        assert (chosen["l0"].w_bits, chosen["l0"].a_bits) == (pin_first, pin_first)
    if pin_last is not None:
        last = chosen[f"l{n - 1}"]
        assert (last.w_bits, last.a_bits) == (pin_last, pin_last)
    for a, b in ties:
        assert chosen[a].tag == chosen[b].tag
