"""Reading the plan's layer rows (plan.json, written by ``solver.plan``).

``parse_rows`` checks the structure a quantizer relies on; ``match_rows`` checks the rows
against the model's quantizable layers. Both raise BadPlanError with a message saying what is
wrong. Layers of the model without a row stay in floating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from solver.errors import BadPlanError
from solver.options import group_fits
from solver.plan import FORMAT, VERSION

from .graph import GraphLayer

KINDS = ("conv1d", "conv2d", "linear")


@dataclass(frozen=True)
class DRQSpec:
    region: tuple[int, int]  # (x = width along W, y = height along H)
    threshold: int  # in INT8 code units
    sensitive_fraction: float
    high_bits: int = 8
    low_bits: int = 4
    scale: float = 0.0  # the INT8 input grid the threshold was calibrated on
    signed: bool = False


@dataclass(frozen=True)
class PlanRow:
    name: str
    kind: str
    params: int | None
    w_bits: int
    a_bits: float
    size_bytes: float | None
    drq: DRQSpec | None
    group_size: int | None = None  # None: one weight scale per output channel

    @property
    def input_bits(self) -> int:
        """Bits of the layer's input grid (a DRQ layer's input is quantized at high_bits)."""
        return self.drq.high_bits if self.drq is not None else int(self.a_bits)


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise BadPlanError(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= int(value) <= hi:
        raise BadPlanError(f"{what} must be in {lo}..{hi}, got {value}")
    return int(value)


def _drq(obj: Any, name: str) -> DRQSpec | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise BadPlanError(f"layer {name!r}: drq must be null or an object")
    region = obj.get("region")
    if not isinstance(region, (list, tuple)) or len(region) != 2:
        raise BadPlanError(f"layer {name!r}: drq.region must be [x, y], got {region!r}")
    x = _int(region[0], f"layer {name!r}: drq.region x", 1, 1 << 16)
    y = _int(region[1], f"layer {name!r}: drq.region y", 1, 1 << 16)
    threshold = _int(obj.get("threshold"), f"layer {name!r}: drq.threshold", 0, 255)
    frac = obj.get("sensitive_fraction", 0.0)
    if not isinstance(frac, (int, float)) or not 0.0 <= float(frac) <= 1.0:
        raise BadPlanError(f"layer {name!r}: drq.sensitive_fraction must be in [0, 1]")
    high = _int(obj.get("high_bits", 8), f"layer {name!r}: drq.high_bits", 2, 8)
    low = _int(obj.get("low_bits", 4), f"layer {name!r}: drq.low_bits", 2, 8)
    if low > high:
        raise BadPlanError(f"layer {name!r}: drq.low_bits must not exceed high_bits")
    scale, signed = obj.get("scale"), obj.get("signed")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise BadPlanError(f"layer {name!r}: drq.scale must be a finite number > 0 (the INT8 "
                           f"input scale the threshold was calibrated on), got {scale!r}")
    if not isinstance(signed, bool):
        raise BadPlanError(f"layer {name!r}: drq.signed must be true or false")
    return DRQSpec((x, y), threshold, float(frac), high, low, float(scale), signed)


def parse_rows(plan: Any) -> list[PlanRow]:
    """The plan's layer rows, structurally validated. Raises BadPlanError."""
    if not isinstance(plan, dict):
        raise BadPlanError(f"a plan must be a JSON object (plan.json version {VERSION})")
    if plan.get("version") != VERSION:
        raise BadPlanError(
            f"unsupported plan version {plan.get('version')!r}; expected {VERSION}"
        )
    fmt = plan.get("format", FORMAT)
    if fmt != FORMAT:
        raise BadPlanError(f"unsupported plan format {fmt!r}; expected {FORMAT!r}")
    layers = plan.get("layers")
    if not isinstance(layers, list):
        raise BadPlanError("plan.layers must be a list of layer rows")
    rows: list[PlanRow] = []
    seen: set[str] = set()
    for i, row in enumerate(layers):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise BadPlanError(f"plan.layers[{i}] must be an object with a string 'name'")
        name = row["name"]
        if name in seen:
            raise BadPlanError(f"layer {name!r} appears twice in the plan")
        seen.add(name)
        kind = row.get("kind")
        if kind not in KINDS:
            raise BadPlanError(f"layer {name!r}: kind must be one of {KINDS}, got {kind!r}")
        w_bits = _int(row.get("w_bits"), f"layer {name!r}: w_bits", 2, 8)
        drq = _drq(row.get("drq"), name)
        a_bits = row.get("a_bits")
        if isinstance(a_bits, bool) or not isinstance(a_bits, (int, float)):
            raise BadPlanError(f"layer {name!r}: a_bits must be a number, got {a_bits!r}")
        if not math.isfinite(a_bits):
            raise BadPlanError(f"layer {name!r}: a_bits must be finite")
        if drq is None:
            _int(a_bits, f"layer {name!r}: a_bits", 2, 16)
        elif kind != "conv2d":
            raise BadPlanError(f"layer {name!r}: drq applies to conv2d layers only, not {kind}")
        params = row.get("params")
        if params is not None:
            params = _int(params, f"layer {name!r}: params", 1, 1 << 40)
        size = row.get("size_bytes")
        size = float(size) if isinstance(size, (int, float)) else None
        group = row.get("group_size")
        if group is not None:
            group = _int(group, f"layer {name!r}: group_size", 1, 1 << 30)
            if drq is not None:
                raise BadPlanError(f"layer {name!r}: drq layers use per-channel weight scales "
                                   "(group_size must be null)")
        rows.append(PlanRow(name, kind, params, w_bits, float(a_bits), size, drq, group))
    return rows


def match_rows(rows: list[PlanRow], layers: list[GraphLayer]) -> dict[str, PlanRow]:
    """Rows keyed by name in the model's layer order; checks names, kinds and sizes."""
    by_name = {layer.name: layer for layer in layers}
    for row in rows:
        layer = by_name.get(row.name)
        if layer is None:
            known = ", ".join(by_name) or "none"
            raise BadPlanError(
                f"plan layer {row.name!r} is not a quantizable layer of this model "
                f"(its layers: {known}); was the plan made for another model?"
            )
        if layer.kind != row.kind:
            raise BadPlanError(
                f"plan layer {row.name!r} is a {row.kind} in the plan but a {layer.kind} in the "
                "model; was the plan made for another model?"
            )
        numel = math.prod(layer.weight_shape)
        if row.params is not None and row.params != numel:
            raise BadPlanError(
                f"plan layer {row.name!r} has {row.params} parameters in the plan but "
                f"{numel} in the model; was the plan made for another model?"
            )
        fan_in = numel // layer.weight_shape[0]
        if row.group_size is not None and not group_fits(fan_in, row.group_size):
            raise BadPlanError(
                f"plan layer {row.name!r}: group_size {row.group_size} does not fit its fan-in "
                f"{fan_in} (a group size must divide it and be smaller)"
            )
    wanted = {row.name: row for row in rows}
    return {layer.name: wanted[layer.name] for layer in layers if layer.name in wanted}
