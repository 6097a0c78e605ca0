"""``plan.json`` (version 2, format ``bitplan-plan/2``): the solver's answer in the form the
quantizer reads. One row per quantized layer keyed by FQN (weight FQN minus ``.weight``);
layers absent from ``layers`` stay in floating point. See PLAN_FORMAT in the issue tracker /
docs/internals.md for the schema this module writes and validates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import BadPlanError
from .ilp import RESOURCES, STATUSES, Solution
from .options import LayerSpec
from .problem import Problem

# 2: a drq entry carries mac_fraction (the share of MACs at high bits) and the INT8 input grid
# its threshold was calibrated on (scale, signed)
VERSION = 2
FORMAT = "bitplan-plan/2"
KINDS = ("conv2d", "conv1d", "linear")
_MODEL_KEYS = ("layers", "params", "macs", "quantized_params", "other_params")
_TOP_KEYS = {"version", "format", "model", "constraints", "status", "objective", "totals",
             "limits", "binding", "layers", "diagnosis"}
_ROW_KEYS = {"name", "kind", "params", "macs", "w_bits", "a_bits", "weight_trace", "omega",
             "size_bytes", "bops", "latency_ms", "drq"}
_DRQ_KEYS = {"region", "threshold", "sensitive_fraction", "mac_fraction", "high_bits",
             "low_bits", "scale", "signed"}


def make_plan(
    problem: Problem,
    solution: Solution,
    specs: Sequence[LayerSpec],
    constraints: dict[str, Any],
    model: dict[str, Any],
) -> dict[str, Any]:
    """Build plan.json from a solved problem. ``specs`` supply kind / params / MACs / trace per
    layer name; ``constraints`` are echoed; ``model`` is the summary {layers, params, macs,
    quantized_params, other_params}. Raises BadPlanError when they disagree."""
    by_name = {s.name: s for s in specs}
    rows = []
    if solution.choices:
        for la in problem.layers:
            spec = by_name.get(la.name)
            if spec is None:
                raise BadPlanError(f"layer {la.name!r} of the problem has no LayerSpec")
            o = la.options[solution.choices[la.name]]
            rows.append({
                "name": la.name,
                "kind": spec.kind,
                "params": int(spec.params),
                "macs": int(spec.macs),
                "w_bits": int(o.w_bits),
                "a_bits": o.a_bits,
                "weight_trace": spec.weight_trace,
                "omega": o.omega,
                "size_bytes": o.size_bytes,
                "bops": o.bops,
                "latency_ms": o.latency_ms,
                "drq": None if o.drq is None else dict(o.drq),
                "group_size": o.group_size,
            })
    plan = {
        "version": VERSION,
        "format": FORMAT,
        "model": {k: model.get(k) for k in _MODEL_KEYS},
        "constraints": constraints,
        "status": solution.status,
        "objective": solution.objective,
        "totals": dict(solution.totals),
        "limits": dict(solution.limits),
        "binding": list(solution.binding),
        "layers": rows,
        "diagnosis": solution.diagnosis,
    }
    return load_plan(plan)


def _num(v: Any, where: str, *, nullable: bool = False, integer: bool = False) -> None:
    if v is None and nullable:
        return
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not math.isfinite(v):
        kind = "an integer" if integer else "a finite number"
        raise BadPlanError(f"plan {where} must be {kind}{' or null' if nullable else ''}, "
                           f"got {v!r}")


def load_plan(obj: Any) -> dict[str, Any]:
    """Validate a plan (already parsed JSON) and return it; raises BadPlanError naming the
    first bad field."""
    if not isinstance(obj, dict):
        raise BadPlanError("a plan must be a JSON object")
    if obj.get("version") != VERSION:
        raise BadPlanError(
            f"plan version {obj.get('version')!r} is not supported (use {VERSION})"
        )
    if obj.get("format") != FORMAT:
        raise BadPlanError(f"plan format must be {FORMAT!r}, got {obj.get('format')!r}")
    missing = sorted(_TOP_KEYS - set(obj))
    if missing:
        raise BadPlanError(f"plan is missing keys {missing}")
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise BadPlanError(f"plan has unknown keys {unknown}")
    model = obj["model"]
    if not isinstance(model, dict) or set(model) != set(_MODEL_KEYS):
        raise BadPlanError(f"plan model must have exactly the keys {list(_MODEL_KEYS)}")
    for k in _MODEL_KEYS:
        _num(model[k], f"model.{k}", integer=True)
    if not isinstance(obj["constraints"], dict):
        raise BadPlanError("plan constraints must be an object")
    if obj["status"] not in STATUSES:
        raise BadPlanError(f"plan status must be one of {list(STATUSES)}")
    _num(obj["objective"], "objective", nullable=True)
    for key in ("totals", "limits"):
        d = obj[key]
        if not isinstance(d, dict) or set(d) != set(RESOURCES):
            raise BadPlanError(f"plan {key} must have exactly the keys {list(RESOURCES)}")
        for r in RESOURCES:
            _num(d[r], f"{key}.{r}", nullable=True)
    if not isinstance(obj["binding"], list) or any(b not in RESOURCES for b in obj["binding"]):
        raise BadPlanError(f"plan binding must be a list of {list(RESOURCES)}")
    if obj["diagnosis"] is not None and not isinstance(obj["diagnosis"], dict):
        raise BadPlanError("plan diagnosis must be an object or null")
    if not isinstance(obj["layers"], list):
        raise BadPlanError("plan layers must be a list")
    seen: set[str] = set()
    for i, row in enumerate(obj["layers"]):
        where = f"layers[{i}]"
        if not isinstance(row, dict) or not _ROW_KEYS <= set(row) <= _ROW_KEYS | {"group_size"}:
            raise BadPlanError(f"plan {where} must have exactly the keys {sorted(_ROW_KEYS)} "
                               "(and optionally group_size)")
        name = row["name"]
        if not isinstance(name, str) or not name or name in seen:
            raise BadPlanError(f"plan {where}.name must be a unique non-empty string")
        seen.add(name)
        where = f"layer {name!r}"
        if row["kind"] not in KINDS:
            raise BadPlanError(f"plan {where} kind must be one of {list(KINDS)}")
        for k in ("params", "macs"):
            _num(row[k], f"{where}.{k}", integer=True)
        _num(row["w_bits"], f"{where}.w_bits", integer=True)
        if not 2 <= row["w_bits"] <= 8:
            raise BadPlanError(f"plan {where}.w_bits must be in 2..8, got {row['w_bits']}")
        _num(row["a_bits"], f"{where}.a_bits")
        if not 2 <= row["a_bits"] <= 8:
            raise BadPlanError(f"plan {where}.a_bits must be in [2, 8], got {row['a_bits']}")
        _num(row["weight_trace"], f"{where}.weight_trace", nullable=True)
        for k in ("omega", "size_bytes", "bops"):
            _num(row[k], f"{where}.{k}")
        _num(row["latency_ms"], f"{where}.latency_ms", nullable=True)
        group = row.get("group_size")
        _num(group, f"{where}.group_size", nullable=True, integer=True)
        if group is not None and (group < 1 or row["params"] % group or row["drq"] is not None):
            raise BadPlanError(f"plan {where}.group_size must be null or a positive divisor of "
                               "the layer's fan-in (and null on a drq row)")
        drq = row["drq"]
        if drq is not None:
            if not isinstance(drq, dict) or set(drq) != _DRQ_KEYS:
                raise BadPlanError(f"plan {where}.drq must have exactly the keys "
                                   f"{sorted(_DRQ_KEYS)}")
            reg = drq["region"]
            if not (isinstance(reg, list | tuple) and len(reg) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                            for x in reg)):
                raise BadPlanError(f"plan {where}.drq.region must be [x, y] positive integers")
            _num(drq["threshold"], f"{where}.drq.threshold", integer=True)
            for k in ("sensitive_fraction", "mac_fraction"):
                _num(drq[k], f"{where}.drq.{k}")
                if not 0 <= drq[k] <= 1:
                    raise BadPlanError(f"plan {where}.drq.{k} must be in [0, 1]")
            _num(drq["scale"], f"{where}.drq.scale")
            if drq["scale"] <= 0:
                raise BadPlanError(f"plan {where}.drq.scale must be > 0 (the INT8 input scale)")
            if not isinstance(drq["signed"], bool):
                raise BadPlanError(f"plan {where}.drq.signed must be true or false")
            if drq["high_bits"] != 8 or drq["low_bits"] != 4:
                raise BadPlanError(f"plan {where}.drq must have high_bits 8 and low_bits 4")
    return obj
