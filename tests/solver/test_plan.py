"""plan.json: built from a solution, validated, JSON round-trip."""

from __future__ import annotations

import copy
import json

import pytest

from solver import (
    ActivationMode,
    LayerSpec,
    Limits,
    OptionsConfig,
    build_problem,
    load_plan,
    make_plan,
    solve,
)
from solver.errors import BadPlanError
from solver.plan import Plan, PlanRow, build_plan, parse_plan

DRQ = {"region": [2, 2], "threshold": 17, "sensitive_fraction": 0.3, "mac_fraction": 0.3,
       "high_bits": 8, "low_bits": 4, "scale": 0.02, "signed": False}


def _specs() -> list[LayerSpec]:
    out = []
    for i, kind in enumerate(["conv2d", "conv2d", "linear"]):
        modes = [ActivationMode("drq2x2f0.3", 5.2, 1e-6, DRQ)] if kind == "conv2d" else []
        out.append(LayerSpec(
            name=f"l{i}", kind=kind, params=1000 * (i + 1), macs=50000, out_channels=10,
            input_numel=200, omega_w={4: 1.0, 8: 0.01}, omega_a={8: 0.001},
            activation_modes=modes, weight_trace=float(i) if i else None))
    return out


MODEL = {"layers": 3, "params": 7000, "macs": 150000, "quantized_params": 6000,
         "other_params": 1000}
CONSTRAINTS = {"version": 1, "limits": {"size_mb": 0.005}}


def _plan(limits: Limits) -> dict:
    specs = _specs()
    cfg = OptionsConfig(pin_first=None, hardware="nvidia-t4")
    problem = build_problem(specs, cfg, limits)
    return make_plan(problem, solve(problem), specs, CONSTRAINTS, MODEL)


def test_plan_rows_and_round_trip() -> None:
    plan = _plan(Limits(size_bytes=5000.0))
    assert plan["version"] == 3 and plan["format"] == "bitplan-plan/3"
    assert plan["status"] == "optimal" and plan["constraints"] == CONSTRAINTS
    rows = {r["name"]: r for r in plan["layers"]}
    assert list(rows) == ["l0", "l1", "l2"]
    assert rows["l2"]["w_bits"] == 8 and rows["l2"]["a_bits"] == 8  # pinned last layer
    assert rows["l0"]["drq"] == DRQ and rows["l0"]["a_bits"] == 5.2  # DRQ is cheapest here
    assert rows["l1"]["weight_trace"] == 1.0 and rows["l0"]["weight_trace"] is None
    assert sum(r["size_bytes"] for r in rows.values()) == plan["totals"]["size_bytes"]
    assert load_plan(json.loads(json.dumps(plan))) == plan


def test_latency_source_round_trips_and_a_version_2_plan_is_read() -> None:
    specs = _specs()
    problem = build_problem(specs, OptionsConfig(pin_first=None, hardware="nvidia-t4"),
                            Limits(size_bytes=5000.0))
    source = {"kind": "measured", "runtime": "onnxruntime 1.31.1", "method": "context",
              "cpu": "AMD EPYC", "batch": 1, "threads": 1, "file": "latency.json",
              "cache_key": "abc"}
    plan = make_plan(problem, solve(problem), specs, CONSTRAINTS, MODEL, source)
    assert plan["latency_source"] == source
    assert load_plan(json.loads(json.dumps(plan))) == plan
    assert _plan(Limits(size_bytes=5000.0))["latency_source"] is None
    old = {k: v for k, v in plan.items() if k != "latency_source"}
    old.update(version=2, format="bitplan-plan/2")  # what an older bitplan wrote
    read = Plan.from_dict(old)
    assert read.latency_source is None and read.rows == Plan.from_dict(plan).rows
    assert read.to_dict()["version"] == 3
    with pytest.raises(BadPlanError, match="unknown keys"):
        Plan.from_dict({**old, "latency_source": source})  # not a version 2 key
    with pytest.raises(BadPlanError, match="latency_source"):
        Plan.from_dict({**plan, "latency_source": {"kind": "guessed"}})
    with pytest.raises(BadPlanError, match="format"):
        Plan.from_dict({**plan, "format": "bitplan-plan/2"})


def test_infeasible_plan_has_no_rows_and_a_diagnosis() -> None:
    plan = _plan(Limits(size_bytes=10.0))
    assert plan["status"] == "infeasible" and plan["layers"] == []
    assert "size limit" in plan["diagnosis"]["message"]


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p.update(version=1), "version"),
    (lambda p: p.update(format="other"), "format"),
    (lambda p: p.pop("totals"), "missing keys"),
    (lambda p: p.update(extra=1), "unknown keys"),
    (lambda p: p["layers"][0].update(kind="conv3d"), "kind"),
    (lambda p: p["layers"][0].update(w_bits=9), "w_bits"),
    (lambda p: p["layers"][0].update(w_bits=4.5), "w_bits must be an integer"),
    (lambda p: p["layers"][0].update(omega=float("nan")), "omega"),
    (lambda p: p["layers"][1].update(name="l0"), "unique"),
    (lambda p: p["layers"][0]["drq"].update(region=[0, 2]), "region"),
    (lambda p: p["layers"][0]["drq"].update(low_bits=2), "low_bits 4"),
    (lambda p: p["layers"][0]["drq"].update(mac_fraction=1.5), "mac_fraction"),
    (lambda p: p["layers"][0]["drq"].pop("mac_fraction"), "missing keys .'mac_fraction'."),
    (lambda p: p["layers"][0]["drq"].update(scale=0.0), "scale"),
    (lambda p: p["layers"][0]["drq"].update(signed=1), "signed"),
    (lambda p: p["model"].pop("macs"), "model"),
    (lambda p: p.update(status="done"), "status"),
    (lambda p: p.update(binding=["energy"]), "binding"),
])
def test_load_plan_rejects(mutate, match) -> None:
    plan = copy.deepcopy(_plan(Limits(size_bytes=5000.0)))
    mutate(plan)
    with pytest.raises(BadPlanError, match=match):
        load_plan(plan)


def test_typed_plan_round_trip() -> None:
    specs = _specs()
    cfg = OptionsConfig(pin_first=None, hardware="nvidia-t4")
    problem = build_problem(specs, cfg, Limits(size_bytes=5000.0))
    plan = build_plan(problem, solve(problem), specs, CONSTRAINTS, MODEL)
    assert isinstance(plan, Plan) and all(isinstance(r, PlanRow) for r in plan.rows)
    row = plan.row("l0")
    assert row.drq is not None and row.drq.region == (2, 2) and row.drq.scale == 0.02
    assert row.input_bits == 8 and plan.row("l2").input_bits == 8
    text = json.dumps(plan.to_dict())
    assert Plan.from_dict(json.loads(text)) == plan
    assert parse_plan(plan) is plan
    with pytest.raises(KeyError):
        plan.row("nope")


@pytest.mark.parametrize("a_bits, ok", [(8, True), (2, True), (12, False), (5.5, False)])
def test_activation_bits_of_a_plain_row(a_bits, ok) -> None:
    """One rule for solver and quantize: a row without DRQ has integer activation bits 2..8."""
    plan = copy.deepcopy(_plan(Limits(size_bytes=5000.0)))
    plan["layers"][2]["a_bits"] = a_bits
    if ok:
        assert Plan.from_dict(plan).rows[2].a_bits == a_bits
    else:
        with pytest.raises(BadPlanError, match="a_bits"):
            Plan.from_dict(plan)
