"""Per-group weight options: which layers get which group sizes, their sizes, Omegas and tags,
the problem JSON, and the plan rows (one rule: a group size divides the fan-in and is smaller)."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solver import LayerSpec, Limits, OptionsConfig, build_problem, load_plan, make_plan, solve
from solver.errors import BadConstraintsError, BadPlanError
from solver.options import group_fits, layer_groups, size_bytes
from solver.problem import Problem


def spec(name: str = "fc", out: int = 8, fan_in: int = 96, groups=(8, 32)) -> LayerSpec:
    params = out * fan_in
    return LayerSpec(
        name=name, kind="linear", params=params, macs=params, out_channels=out,
        input_numel=fan_in,
        omega_w={b: 2.0 ** -b * params for b in (2, 3, 4, 5, 6, 8)},
        omega_a={8: 0.01},
        weight_trace=1.0,
        omega_wg={g: {b: 2.0 ** -b * params * g / (g + 64) for b in (2, 3, 4, 5, 6, 8)}
                  for g in groups},
    )


def free(**kwargs) -> OptionsConfig:
    return OptionsConfig(pin_first=None, pin_last=None, **kwargs)


@settings(max_examples=80, deadline=None)
@given(out=st.integers(1, 64), fan_in=st.integers(1, 512), g=st.integers(1, 600),
       bits=st.sampled_from([2, 3, 4, 5, 6, 8]))
def test_group_size_rule_and_stored_size(out, fan_in, g, bits) -> None:
    assert group_fits(fan_in, g) == (fan_in % g == 0 and g < fan_in)
    if group_fits(fan_in, g):
        params = out * fan_in
        stored = math.ceil(params * (4 if bits <= 4 else 8) / 8)
        # packed codes + one float32 scale per group of every output channel
        assert size_bytes(params, bits, out, g) == stored + 4 * out * (fan_in // g)
        assert size_bytes(params, bits, out, g) >= size_bytes(params, bits, out)


def test_grouped_options_tags_costs_and_omegas() -> None:
    s = spec()
    cfg = free(weight_bits=(4, 8), weight_group_sizes=(None, 32, 8, 64, 96, 7))
    opts = {o.tag: o for o in build_problem([s], cfg, Limits()).layers[0].options}
    # 64 and 7 do not divide 96; 96 is the whole fan-in (per channel)
    assert sorted(opts) == sorted(f"w{b}{g}a8" for b in (4, 8) for g in ("", "g8", "g32"))
    o = opts["w4g32a8"]
    assert o.group_size == 32 and o.w_bits == 4 and o.a_bits == 8
    assert o.size_bytes == 768 / 2 + 4 * 8 * 3
    assert o.omega == pytest.approx(s.omega_wg[32][4] + 0.01)
    assert o.bops == opts["w4a8"].bops  # groups change scales, not the multiplications
    assert opts["w4a8"].group_size is None


def test_per_channel_only_when_listed_or_nothing_fits() -> None:
    s = spec(fan_in=96)
    assert layer_groups(s, free(weight_group_sizes=(32,))) == [32]
    assert layer_groups(s, free(weight_group_sizes=(None, 32))) == [None, 32]
    assert layer_groups(s, free(weight_group_sizes=(64,))) == [None]  # fallback
    # pinned layers keep per-channel scales at the pinned bits
    p = build_problem([spec("a"), spec("b")], OptionsConfig(weight_group_sizes=(None, 8),
                                                            pin_first=8, pin_last=None),
                      Limits())
    assert [o.tag for o in p.layers[0].options] == ["w8a8"]
    assert "w4g8a8" in {o.tag for o in p.layers[1].options}


def test_missing_group_omega_and_bad_sizes_are_refused() -> None:
    with pytest.raises(BadConstraintsError, match="group 16"):
        build_problem([spec(groups=())], free(weight_group_sizes=(None, 16)), Limits())
    for bad in ((), (0,), (None, None), (True,), (2.5,), "ab"):
        with pytest.raises(BadConstraintsError, match="weight_group_sizes"):
            OptionsConfig(weight_group_sizes=bad)
    cfg = OptionsConfig(weight_group_sizes=(128, None, 32))
    assert cfg.weight_group_sizes == (None, 32, 128)
    assert OptionsConfig.from_dict(cfg.to_dict()) == cfg


def test_latency_table_without_a_grouped_tag_uses_the_per_channel_entry() -> None:
    table = {"fc": {"w4a8": 1.0, "w8a8": 2.0, "w4g8a8": 1.5}}
    cfg = free(weight_group_sizes=(None, 8, 32), latency_table=table)
    opts = {o.tag: o for o in build_problem([spec()], cfg, Limits()).layers[0].options}
    assert opts["w4g8a8"].latency_ms == 1.5
    assert opts["w4g32a8"].latency_ms == 1.0 and opts["w8g32a8"].latency_ms == 2.0


def test_problem_json_and_plan_rows_carry_the_group_size() -> None:
    specs = [spec("a"), spec("b", fan_in=64, groups=(8, 32))]
    cfg = free(weight_group_sizes=(None, 8, 32))
    limits = Limits(size_bytes=sum(size_bytes(s.params, 4, 8, 8) for s in specs))
    problem = build_problem(specs, cfg, limits)
    assert Problem.from_json(problem.to_json()) == problem
    solution = solve(problem)
    plan = make_plan(problem, solution, specs, {}, {"layers": 2, "params": 1, "macs": 1,
                                                    "quantized_params": 1, "other_params": 0})
    for row in plan["layers"]:
        chosen = problem.layers[[la.name for la in problem.layers].index(row["name"])].options[
            solution.choices[row["name"]]]
        assert row["group_size"] == chosen.group_size
    assert {row["group_size"] for row in plan["layers"]} == {8}  # the least Omega that fits
    row = plan["layers"][0]
    for value in (0, 5, 2.5, True):
        bad = copy.deepcopy(plan)
        bad["layers"][0]["group_size"] = value
        with pytest.raises(BadPlanError, match="group_size"):
            load_plan(bad)
    old = copy.deepcopy(plan)  # rows written without the key read as per channel
    for r in old["layers"]:
        r.pop("group_size")
    assert load_plan(old)["layers"][0].get("group_size") is None
    assert row["size_bytes"] == size_bytes(768, 4, 8, 8)
