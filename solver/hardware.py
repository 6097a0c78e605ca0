"""Latency models: named hardware profiles and user-given per-layer latency tables.

Two kinds of profile (``"kind"`` in the JSON, one class each, looked up in ``PROFILE_KINDS``):

- ``roofline`` (:class:`HardwareProfile`, the default): peak integer MAC rates per precision
  class (``"4"``: operands of <= 4 bits, ``"8"``: 5..8 bits) and memory bandwidth. The latency
  of one layer at (w, a) bits is ``max(MACs / rate(class of max(w, a)), bytes / bandwidth)``
  with bytes = packed weight bytes + input activation bytes at ``a`` bits. These are peak
  figures, so the result is an optimistic lower bound, useful to rank precisions, not a
  measurement.
- ``drq-array`` (:class:`DRQArrayProfile`): DRQ's variable-speed mixed-precision array, where
  each PE group runs one 8x8 or four 4x4 multiplications per cycle. Latency in cycles from the
  MACs, the fraction of them at 8x8 and the number of PE groups, then ms at the stated clock.
  It runs only the precisions it lists (W8A8, W4A4 and DRQ modes); the solver offers no other.

A DRQ option's MACs split as its runtime computes them (:func:`drq_split`): a fraction f at
``w x high`` bits, the rest at ``min(w, low) x low``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from .errors import BadConstraintsError

PROFILE_DIR = Path(__file__).parent / "profiles"
CLASSES = (4, 8)


def drq_split(drq: dict) -> tuple[float, int, int]:
    """``(f, high_bits, low_bits)`` of a DRQ entry, f = fraction of the MACs at high bits (the
    one reading of a DRQ cost, used by the profiles and by ``solver.options``)."""
    f = drq.get("mac_fraction")
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f <= 1.0:
        raise BadConstraintsError(
            f"a DRQ mode needs mac_fraction in [0, 1] (fraction of MACs at high bits), got {f!r}"
        )
    return float(f), int(drq.get("high_bits", 8)), int(drq.get("low_bits", 4))


@dataclass(frozen=True)
class _Profile:
    """What every profile kind shares: a name, what it models, where its figures come from,
    the one ``latency_ms`` signature (checked by ``supports``, computed by ``_ms``) and the
    JSON reader (exactly ``KEYS``, ``kind`` aside)."""

    name: str
    description: str
    source: str

    KIND: ClassVar[str] = ""
    KEYS: ClassVar[frozenset[str]] = frozenset({"name", "description", "source"})

    def supports(self, w_bits: int, a_bits: float, drq: dict | None = None) -> bool:
        return True

    def _ms(self, macs: float, params: float, w_bits: int, a_bits: float, input_numel: float,
            drq: dict | None) -> float:
        raise NotImplementedError

    def _refusal(self, w_bits: int, a_bits: float, drq: dict | None) -> str:
        return f"profile {self.name!r} does not run w{w_bits}a{a_bits:g}"

    def latency_ms(
        self,
        macs: float,
        params: float,
        w_bits: int,
        a_bits: float,
        input_numel: float,
        drq: dict | None = None,
    ) -> float:
        """Modelled latency of one layer in ms at (w, a) bits, or a DRQ option (``drq`` with
        ``mac_fraction``, ``high_bits``, ``low_bits``; split as :func:`drq_split` says).
        Raises BadConstraintsError for a precision the profile does not run."""
        if not self.supports(w_bits, a_bits, drq):
            raise BadConstraintsError(self._refusal(w_bits, a_bits, drq))
        return self._ms(macs, params, w_bits, a_bits, input_numel, drq)

    def latency_source(self) -> dict[str, Any]:
        """The plan's ``latency_source`` for latencies from this profile (modelled)."""
        return {"kind": "modelled", "profile": self.name, "profile_kind": self.KIND,
                "source": self.source}

    @classmethod
    def _fields(cls, obj: dict[str, Any]) -> dict[str, Any]:
        """Typed constructor arguments of a checked JSON object (its kind's own fields)."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Any:
        obj = {k: v for k, v in obj.items() if k != "kind"} if isinstance(obj, dict) else obj
        if not isinstance(obj, dict) or set(obj) != cls.KEYS:
            raise BadConstraintsError(
                f"a {cls.KIND} hardware profile needs exactly the keys {sorted(cls.KEYS)} "
                "(and kind)")
        return cls(name=obj["name"], description=obj["description"], source=obj["source"],
                   **cls._fields(obj))


@dataclass(frozen=True)
class HardwareProfile(_Profile):
    """Roofline: peak integer throughput (MACs per second per precision class) and memory
    bandwidth. Every precision runs (at its class's rate)."""

    macs_per_s: dict[int, float]
    bandwidth_bytes_per_s: float

    KIND: ClassVar[str] = "roofline"
    KEYS: ClassVar[frozenset[str]] = _Profile.KEYS | {"macs_per_s", "bandwidth_bytes_per_s"}

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

    def _ms(self, macs: float, params: float, w_bits: int, a_bits: float, input_numel: float,
            drq: dict | None) -> float:
        """Roofline: ``max(compute, bytes moved / bandwidth)``. For a DRQ option a fraction f
        of the MACs are ``w x high`` multiplications at that class's rate and the rest
        ``min(w, low) x low`` at the low class's rate, as the DRQ runtime computes them; its
        input moves as high-bit codes (the predictor reads them)."""
        if drq is not None:
            f, hi, lo = drq_split(drq)
            compute = macs * (f / self.rate(max(w_bits, hi))
                              + (1 - f) / self.rate(max(min(w_bits, lo), lo)))
            a_bits = hi
        else:
            compute = macs / self.rate(max(w_bits, a_bits))
        moved = math.ceil(params * w_bits / 8) + input_numel * a_bits / 8
        return max(compute, moved / self.bandwidth_bytes_per_s) * 1e3

    @classmethod
    def _fields(cls, obj: dict[str, Any]) -> dict[str, Any]:
        return {"macs_per_s": {int(k): float(v) for k, v in obj["macs_per_s"].items()},
                "bandwidth_bytes_per_s": float(obj["bandwidth_bytes_per_s"])}


@dataclass(frozen=True)
class DRQArrayProfile(_Profile):
    """DRQ's variable-speed mixed-precision array (Song et al., ISCA 2020).

    ``pe_groups`` PE groups, each running one 8x8 or four 4x4 multiplications per cycle, at
    ``clock_hz``. A multiplication whose operands both fit 4 bits is 4x4, any other 8x8.
    ``precisions``: the plain (w, a) pairs it runs, e.g. ``[[8, 8], [4, 4]]``;
    ``drq_weight_bits``: the weight widths its DRQ modes run with. Compute-bound by assumption
    (see ``assumptions``): cycles = MACs_8x8 / groups + MACs_4x4 / (4 groups).
    """

    assumptions: str
    pe_groups: int
    clock_hz: float
    precisions: tuple[tuple[int, int], ...]
    drq_weight_bits: tuple[int, ...]

    KIND: ClassVar[str] = "drq-array"
    KEYS: ClassVar[frozenset[str]] = _Profile.KEYS | {
        "assumptions", "pe_groups", "clock_hz", "precisions", "drq_weight_bits"}

    def __post_init__(self) -> None:
        if self.pe_groups < 1 or not (math.isfinite(self.clock_hz) and self.clock_hz > 0):
            raise BadConstraintsError(
                f"profile {self.name!r}: pe_groups and clock_hz must be positive"
            )

    @staticmethod
    def _per_cycle(w_bits: float, a_bits: float) -> int:
        """Multiplications one PE group runs per cycle at these operand widths."""
        return 4 if max(w_bits, a_bits) <= 4 else 1

    def supports(self, w_bits: int, a_bits: float, drq: dict | None = None) -> bool:
        if drq is not None:
            return w_bits in self.drq_weight_bits
        return (w_bits, a_bits) in self.precisions

    def _refusal(self, w_bits: int, a_bits: float, drq: dict | None) -> str:
        return (f"{super()._refusal(w_bits, a_bits, drq)}"
                f"{' with DRQ' if drq is not None else ''}; it runs "
                f"{[f'w{w}a{a}' for w, a in self.precisions]} and DRQ at weight bits "
                f"{list(self.drq_weight_bits)}")

    def cycles(self, macs: float, w_bits: int, a_bits: float, drq: dict | None = None) -> float:
        """Cycles of one layer: each part of its MACs over the multiplications per cycle."""
        if drq is None:
            return macs / (self.pe_groups * self._per_cycle(w_bits, a_bits))
        f, hi, lo = drq_split(drq)
        high = f * macs / (self.pe_groups * self._per_cycle(w_bits, hi))
        low = (1 - f) * macs / (self.pe_groups * self._per_cycle(min(w_bits, lo), lo))
        return high + low

    def _ms(self, macs: float, params: float, w_bits: int, a_bits: float, input_numel: float,
            drq: dict | None) -> float:
        """:meth:`cycles` at the clock (``params`` / ``input_numel`` do not enter: the model
        is compute-bound)."""
        return self.cycles(macs, w_bits, a_bits, drq) / self.clock_hz * 1e3

    @classmethod
    def _fields(cls, obj: dict[str, Any]) -> dict[str, Any]:
        return {"assumptions": obj["assumptions"], "pe_groups": int(obj["pe_groups"]),
                "clock_hz": float(obj["clock_hz"]),
                "precisions": tuple((int(w), int(a)) for w, a in obj["precisions"]),
                "drq_weight_bits": tuple(int(w) for w in obj["drq_weight_bits"])}


Profile = HardwareProfile | DRQArrayProfile
PROFILE_KINDS: dict[str, type[HardwareProfile] | type[DRQArrayProfile]] = {
    "roofline": HardwareProfile,
    "drq-array": DRQArrayProfile,
}


def load_profile(obj: dict[str, Any]) -> Profile:
    """A profile from its JSON object, by ``kind`` (default ``roofline``)."""
    kind = obj.get("kind", "roofline") if isinstance(obj, dict) else None
    if kind not in PROFILE_KINDS:
        raise BadConstraintsError(
            f"unknown hardware profile kind {kind!r}; known: {sorted(PROFILE_KINDS)}"
        )
    return PROFILE_KINDS[kind].from_dict(obj)


@cache
def profiles() -> dict[str, Profile]:
    """The shipped profiles by name."""
    out = {}
    for path in sorted(PROFILE_DIR.glob("*.json")):
        p = load_profile(json.loads(path.read_text()))
        out[p.name] = p
    return out


def get_profile(name: str) -> Profile:
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
