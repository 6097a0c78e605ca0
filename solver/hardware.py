"""Latency models: named roofline hardware profiles and user-given per-layer latency tables.

A profile (``solver/profiles/<name>.json``) gives peak integer MAC rates per precision class
(``"4"``: operands of <= 4 bits, ``"8"``: 5..8 bits) and memory bandwidth. The roofline latency
of one layer at (w, a) bits is ``max(MACs / rate(class of max(w, a)), bytes / bandwidth)`` with
bytes = packed weight bytes + input activation bytes at ``a`` bits. These are peak figures,
so the result is an optimistic lower bound, useful to rank precisions, not a measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .errors import BadConstraintsError

PROFILE_DIR = Path(__file__).parent / "profiles"
CLASSES = (4, 8)


@dataclass(frozen=True)
class HardwareProfile:
    """Peak integer throughput (MACs per second per precision class) and memory bandwidth."""

    name: str
    description: str
    source: str
    macs_per_s: dict[int, float]
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        if set(self.macs_per_s) != set(CLASSES):
            raise BadConstraintsError(
                f"profile {self.name!r}: macs_per_s needs classes {list(CLASSES)}"
            )
        for v in (*self.macs_per_s.values(), self.bandwidth_bytes_per_s):
            if not (math.isfinite(v) and v > 0):
                raise BadConstraintsError(f"profile {self.name!r}: rates must be finite and > 0")

    def rate(self, bits: float) -> float:
        """MACs per second for operands of ``bits`` bits (the smallest class that holds them)."""
        for c in CLASSES:
            if bits <= c:
                return self.macs_per_s[c]
        raise BadConstraintsError(
            f"profile {self.name!r} has no integer rate for {bits}-bit operands (max 8)"
        )

    def latency_ms(
        self,
        macs: float,
        params: float,
        w_bits: int,
        a_bits: float,
        input_numel: float,
        drq: dict | None = None,
    ) -> float:
        """Roofline latency in ms. For a DRQ option (``drq`` with ``sensitive_fraction`` f,
        ``high_bits``, ``low_bits``) a fraction f of the MACs runs at the high class and the
        rest at the low class; ``a_bits`` is then the expected bits for the bytes moved."""
        if drq is not None:
            f = float(drq["sensitive_fraction"])
            hi, lo = drq.get("high_bits", 8), drq.get("low_bits", 4)
            compute = macs * (f / self.rate(max(w_bits, hi)) + (1 - f) / self.rate(max(w_bits, lo)))
        else:
            compute = macs / self.rate(max(w_bits, a_bits))
        moved = math.ceil(params * w_bits / 8) + input_numel * a_bits / 8
        return max(compute, moved / self.bandwidth_bytes_per_s) * 1e3

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> HardwareProfile:
        keys = {"name", "description", "source", "macs_per_s", "bandwidth_bytes_per_s"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise BadConstraintsError(f"a hardware profile needs exactly the keys {sorted(keys)}")
        return cls(
            name=obj["name"],
            description=obj["description"],
            source=obj["source"],
            macs_per_s={int(k): float(v) for k, v in obj["macs_per_s"].items()},
            bandwidth_bytes_per_s=float(obj["bandwidth_bytes_per_s"]),
        )


@cache
def profiles() -> dict[str, HardwareProfile]:
    """The shipped profiles by name."""
    out = {}
    for path in sorted(PROFILE_DIR.glob("*.json")):
        p = HardwareProfile.from_dict(json.loads(path.read_text()))
        out[p.name] = p
    return out


def get_profile(name: str) -> HardwareProfile:
    """The named profile; raises BadConstraintsError listing the known names."""
    known = profiles()
    if name not in known:
        raise BadConstraintsError(
            f"unknown hardware profile {name!r}; known profiles: {sorted(known)}"
        )
    return known[name]


def check_latency_table(table: Any) -> dict[str, dict[str, float]]:
    """Validate a per-layer latency table ``{layer: {tag: ms}}``; raises BadConstraintsError."""
    if not isinstance(table, dict):
        raise BadConstraintsError("latency_table must be an object {layer: {tag: ms}}")
    for layer, row in table.items():
        if not isinstance(row, dict):
            raise BadConstraintsError(f"latency_table[{layer!r}] must be an object {{tag: ms}}")
        for tag, ms in row.items():
            if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) \
                    or ms < 0:
                raise BadConstraintsError(
                    f"latency_table[{layer!r}][{tag!r}] must be a finite number >= 0, got {ms!r}"
                )
    return table


def table_latency(table: dict[str, dict[str, float]], layer: str, tag: str) -> float:
    """Latency of ``layer`` at option ``tag`` from a user table; a missing entry raises
    BadConstraintsError naming it."""
    row = table.get(layer)
    if row is None:
        raise BadConstraintsError(
            f"latency_table has no entry for layer {layer!r}; give {{{tag!r}: ms, ...}} for it"
        )
    if tag not in row:
        raise BadConstraintsError(
            f"latency_table[{layer!r}] has no entry for option {tag!r}; "
            f"it has {sorted(row)}"
        )
    return float(row[tag])
