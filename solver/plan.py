"""The plan: the solver's answer in the form the quantizer reads.

:class:`Plan` (totals, limits, status, ...) with one :class:`PlanRow` per quantized layer keyed
by FQN (weight FQN minus ``.weight``); layers without a row stay in floating point. The solver
builds it (:func:`build_plan`), the quantize stage reads it (``quantize.rows``), and both go
through the one validator, :meth:`Plan.from_dict`. Its serialized form is ``plan.json``
(version 3, format ``bitplan-plan/3``; :meth:`Plan.to_dict`); docs/internals.md has the schema.
A version 2 plan (no ``latency_source``) is read as well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import STATUSES, Solution
from .errors import BadPlanError
from .options import LayerSpec
from .problem import RESOURCES, Problem

# 2: a drq entry carries mac_fraction (the share of MACs at high bits) and the INT8 input grid
# its threshold was calibrated on (scale, signed)
# 3: latency_source, where the latencies of the rows and totals come from
VERSION = 3
FORMAT = "bitplan-plan/3"
READ_FORMATS = {2: "bitplan-plan/2", 3: FORMAT}  # version -> format this reader accepts
LATENCY_KINDS = ("measured", "modelled", "table")
KINDS = ("conv2d", "conv1d", "linear")
_MODEL_KEYS = ("layers", "params", "macs", "quantized_params", "other_params")
# optional: the parameter tensors left in floating point ({name, op, params, share[, tied_to]})
_FLOAT_PARAMS = "float_params"
_TOP_KEYS = {"version", "format", "model", "constraints", "status", "objective", "totals",
             "limits", "binding", "layers", "diagnosis"}
_TOP_OPTIONAL = frozenset({"latency_source"})  # absent in version 2
_ROW_KEYS = {"name", "kind", "params", "macs", "w_bits", "a_bits", "weight_trace", "omega",
             "size_bytes", "bops", "latency_ms", "drq"}
_DRQ_KEYS = {"region", "threshold", "sensitive_fraction", "mac_fraction", "high_bits",
             "low_bits", "scale", "signed"}


def _num(v: Any, where: str, *, nullable: bool = False, integer: bool = False) -> None:
    if v is None and nullable:
        return
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not math.isfinite(v):
        kind = "an integer" if integer else "a finite number"
        raise BadPlanError(f"plan {where} must be {kind}{' or null' if nullable else ''}, "
                           f"got {v!r}")


def _keys(obj: Any, required: set[str], where: str, optional: frozenset[str] = frozenset()
          ) -> None:
    if not isinstance(obj, dict):
        raise BadPlanError(f"plan {where} must be an object")
    missing, unknown = sorted(required - set(obj)), sorted(set(obj) - required - optional)
    if missing:
        raise BadPlanError(f"plan {where} is missing keys {missing}")
    if unknown:
        raise BadPlanError(f"plan {where} has unknown keys {unknown}")


@dataclass(frozen=True)
class DRQEntry:
    """A DRQ row's runtime settings: ``region`` (x = width along W, y = height along H),
    ``threshold`` in INT8 code units of the input grid ``scale`` / ``signed`` it was calibrated
    on, the calibrated fraction of regions at high bits and of MACs at high bits."""

    region: tuple[int, int]
    threshold: int
    sensitive_fraction: float
    mac_fraction: float
    scale: float
    signed: bool
    high_bits: int = 8
    low_bits: int = 4

    @classmethod
    def from_dict(cls, drq: Any, where: str) -> DRQEntry:
        _keys(drq, _DRQ_KEYS, f"{where}.drq")
        reg = drq["region"]
        if not (isinstance(reg, list | tuple) and len(reg) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in reg)):
            raise BadPlanError(f"plan {where}.drq.region must be [x, y] positive integers")
        _num(drq["threshold"], f"{where}.drq.threshold", integer=True)
        if not 0 <= drq["threshold"] <= 255:
            raise BadPlanError(f"plan {where}.drq.threshold must be in 0..255 (INT8 code units)")
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
        return cls((reg[0], reg[1]), drq["threshold"], drq["sensitive_fraction"],
                   drq["mac_fraction"], drq["scale"], drq["signed"], drq["high_bits"],
                   drq["low_bits"])

    def to_dict(self) -> dict[str, Any]:
        return {"region": list(self.region), "threshold": self.threshold,
                "sensitive_fraction": self.sensitive_fraction,
                "mac_fraction": self.mac_fraction, "high_bits": self.high_bits,
                "low_bits": self.low_bits, "scale": self.scale, "signed": self.signed}


@dataclass(frozen=True)
class PlanRow:
    """One quantized layer: bits (``a_bits``: an integer, or for a DRQ row the expected bits
    per MAC), its costs as the solver counted them, and its DRQ / weight-group settings."""

    name: str
    kind: str
    params: int
    macs: int
    w_bits: int
    a_bits: float
    weight_trace: float | None
    omega: float
    size_bytes: float
    bops: float
    latency_ms: float | None
    drq: DRQEntry | None = None
    group_size: int | None = None  # None: one weight scale per output channel

    @property
    def input_bits(self) -> int:
        """Bits of the layer's input grid (a DRQ layer's input is quantized at high_bits)."""
        return self.drq.high_bits if self.drq is not None else int(self.a_bits)

    @classmethod
    def from_dict(cls, row: Any, where: str) -> PlanRow:
        _keys(row, _ROW_KEYS, where, frozenset({"group_size"}))
        name = row["name"]
        if not isinstance(name, str) or not name:
            raise BadPlanError(f"plan {where}.name must be a non-empty string")
        where = f"layer {name!r}"
        if row["kind"] not in KINDS:
            raise BadPlanError(f"plan {where} kind must be one of {list(KINDS)}")
        for k in ("params", "macs"):
            _num(row[k], f"{where}.{k}", integer=True)
        if row["params"] < 1:
            raise BadPlanError(f"plan {where}.params must be positive")
        _num(row["w_bits"], f"{where}.w_bits", integer=True)
        if not 2 <= row["w_bits"] <= 8:
            raise BadPlanError(f"plan {where}.w_bits must be in 2..8, got {row['w_bits']}")
        _num(row["weight_trace"], f"{where}.weight_trace", nullable=True)
        for k in ("omega", "size_bytes", "bops"):
            _num(row[k], f"{where}.{k}")
        _num(row["latency_ms"], f"{where}.latency_ms", nullable=True)
        drq = None if row["drq"] is None else DRQEntry.from_dict(row["drq"], where)
        a = row["a_bits"]
        if drq is None:
            _num(a, f"{where}.a_bits", integer=True)
            if not 2 <= a <= 8:
                raise BadPlanError(f"plan {where}.a_bits must be in 2..8, got {a}")
        else:
            _num(a, f"{where}.a_bits")
            if not drq.low_bits <= a <= drq.high_bits:
                raise BadPlanError(f"plan {where}.a_bits of a drq row must be in "
                                   f"[{drq.low_bits}, {drq.high_bits}], got {a}")
            if row["kind"] != "conv2d":
                raise BadPlanError(f"plan {where}: drq applies to conv2d layers only")
        group = row.get("group_size")
        _num(group, f"{where}.group_size", nullable=True, integer=True)
        if group is not None and (group < 1 or row["params"] % group or drq is not None):
            raise BadPlanError(f"plan {where}.group_size must be null or a positive divisor of "
                               "the layer's fan-in (and null on a drq row)")
        return cls(name, row["kind"], row["params"], row["macs"], row["w_bits"], a,
                   row["weight_trace"], row["omega"], row["size_bytes"], row["bops"],
                   row["latency_ms"], drq, group)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params, "macs": self.macs,
                "w_bits": self.w_bits, "a_bits": self.a_bits, "weight_trace": self.weight_trace,
                "omega": self.omega, "size_bytes": self.size_bytes, "bops": self.bops,
                "latency_ms": self.latency_ms,
                "drq": None if self.drq is None else self.drq.to_dict(),
                "group_size": self.group_size}


@dataclass(frozen=True)
class Plan:
    """The solver's answer: ``rows`` (one per quantized layer, model order) and ``totals``
    (``{size_bytes, bops, latency_ms}`` summed over the rows), the ``limits`` it was solved
    under, the ``binding`` ones, ``status`` / ``objective`` / ``diagnosis``, the echoed
    ``constraints`` and the ``model`` summary."""

    model: dict[str, Any]
    constraints: dict[str, Any]
    status: str
    objective: float | None
    totals: dict[str, float | None]
    limits: dict[str, float | None]
    binding: list[str]
    rows: tuple[PlanRow, ...] = ()
    diagnosis: dict[str, Any] | None = None
    version: int = VERSION
    # where latency_ms comes from: None (no latency model) or {"kind": "measured" (a runtime's
    # timed table: runtime, method, cpu, batch, threads, file, cache_key), "modelled" (a named
    # hardware profile: profile, profile_kind, source) or "table" (a user-given table), ...}
    latency_source: dict[str, Any] | None = None

    def row(self, name: str) -> PlanRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"the plan has no row for layer {name!r}")

    @classmethod
    def from_dict(cls, obj: Any) -> Plan:
        """The one validator of a plan (parsed JSON); raises BadPlanError naming the first bad
        field."""
        if not isinstance(obj, dict):
            raise BadPlanError("a plan must be a JSON object")
        version = obj.get("version")
        if isinstance(version, bool) or version not in READ_FORMATS:
            raise BadPlanError(
                f"plan version {version!r} is not supported (use {VERSION})"
            )
        if obj.get("format") != READ_FORMATS[version]:
            raise BadPlanError(f"plan format must be {READ_FORMATS[version]!r}, got "
                               f"{obj.get('format')!r}")
        _keys(obj, _TOP_KEYS, "", _TOP_OPTIONAL if version >= 3 else frozenset())
        source = obj.get("latency_source")
        if source is not None and not (isinstance(source, dict)
                                       and source.get("kind") in LATENCY_KINDS):
            raise BadPlanError(f"plan latency_source must be null or an object whose kind is "
                               f"one of {list(LATENCY_KINDS)}")
        model = obj["model"]
        if not isinstance(model, dict) or set(model) - {_FLOAT_PARAMS} != set(_MODEL_KEYS):
            raise BadPlanError(f"plan model must have exactly the keys {list(_MODEL_KEYS)} "
                               f"(and optionally {_FLOAT_PARAMS!r})")
        for k in _MODEL_KEYS:
            _num(model[k], f"model.{k}", integer=True)
        floats = model.get(_FLOAT_PARAMS, [])
        if not isinstance(floats, list) or not all(
                isinstance(f, dict) and isinstance(f.get("name"), str) for f in floats):
            raise BadPlanError(f"plan model.{_FLOAT_PARAMS} must be a list of objects with a "
                               "'name'")
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
        if not isinstance(obj["binding"], list) or any(b not in RESOURCES
                                                       for b in obj["binding"]):
            raise BadPlanError(f"plan binding must be a list of {list(RESOURCES)}")
        if obj["diagnosis"] is not None and not isinstance(obj["diagnosis"], dict):
            raise BadPlanError("plan diagnosis must be an object or null")
        if not isinstance(obj["layers"], list):
            raise BadPlanError("plan layers must be a list")
        rows = tuple(PlanRow.from_dict(r, f"layers[{i}]") for i, r in enumerate(obj["layers"]))
        names = [r.name for r in rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BadPlanError(f"plan layers {dup} appear twice; names must be unique")
        return cls(dict(model), obj["constraints"], obj["status"], obj["objective"],
                   dict(obj["totals"]), dict(obj["limits"]), list(obj["binding"]), rows,
                   obj["diagnosis"], latency_source=None if source is None else dict(source))

    def to_dict(self) -> dict[str, Any]:
        """The serialized form (``plan.json``)."""
        return {
            "version": VERSION,
            "format": FORMAT,
            "model": dict(self.model),
            "constraints": self.constraints,
            "status": self.status,
            "objective": self.objective,
            "totals": dict(self.totals),
            "limits": dict(self.limits),
            "binding": list(self.binding),
            "layers": [r.to_dict() for r in self.rows],
            "diagnosis": self.diagnosis,
            "latency_source": self.latency_source,
        }


def build_plan(
    problem: Problem,
    solution: Solution,
    specs: Sequence[LayerSpec],
    constraints: dict[str, Any],
    model: dict[str, Any],
    latency_source: dict[str, Any] | None = None,
) -> Plan:
    """The plan of a solved problem. ``specs`` supply kind / params / MACs / trace per layer
    name; ``constraints`` are echoed; ``model`` is the summary {layers, params, macs,
    quantized_params, other_params} (+ ``float_params`` when given: the parameters left in
    floating point); ``latency_source`` says where the latencies come from (see
    :class:`Plan`). Raises BadPlanError when they disagree."""
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
    return Plan.from_dict({
        "version": VERSION,
        "format": FORMAT,
        "model": {k: model.get(k) for k in _MODEL_KEYS}
        | ({_FLOAT_PARAMS: list(model[_FLOAT_PARAMS])} if _FLOAT_PARAMS in model else {}),
        "constraints": constraints,
        "status": solution.status,
        "objective": solution.objective,
        "totals": dict(solution.totals),
        "limits": dict(solution.limits),
        "binding": list(solution.binding),
        "layers": rows,
        "diagnosis": solution.diagnosis,
        "latency_source": latency_source,
    })


def make_plan(
    problem: Problem,
    solution: Solution,
    specs: Sequence[LayerSpec],
    constraints: dict[str, Any],
    model: dict[str, Any],
    latency_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`build_plan` in its serialized form (the plan.json object)."""
    return build_plan(problem, solution, specs, constraints, model, latency_source).to_dict()


def parse_plan(obj: Plan | Any) -> Plan:
    """A :class:`Plan` from a plan object (validated by :meth:`Plan.from_dict`), or the plan
    itself."""
    return obj if isinstance(obj, Plan) else Plan.from_dict(obj)


def load_plan(obj: Any) -> dict[str, Any]:
    """Validate a plan (already parsed JSON) and return its serialized form; raises
    BadPlanError naming the first bad field."""
    return Plan.from_dict(obj).to_dict()
