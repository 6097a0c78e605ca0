"""Turn a model's layer table and sensitivity results into a solver :class:`Problem`.

Per layer and candidate (w, a) bits: ``omega = omega_w[w] + omega_a[a]`` (the weight and
activation perturbations add, as in HAWQ), ``size_bytes = ceil(params * s / 8) + 4 *
out_channels`` where ``s`` is the *storage* width of the checkpoint format (two's-complement
nibbles for w <= 4, int8 for 5..8 bits), so the planned size is what the checkpoint holds;
plus one float32 scale per output channel, or with a weight group size ``g`` (constraints'
``weight_group_sizes``; tag ``w<w>g<g>a<a>``) one per group, ``4 * params / g`` bytes, and the
Omega of that grouping (``LayerSpec.omega_wg``). ``bops = macs * w * a`` (bit operations per
sample), and latency from a named hardware profile (roofline) or a user table
``{layer: {tag: ms}}`` (a grouped tag missing from the table costs as the per-channel tag).

A DRQ :class:`ActivationMode` adds options costed as its runtime computes
(``quantize.drq.DRQConv2d``): with ``f`` the fraction of the layer's multiplications that read a
sensitive pixel on the calibration data (``drq["mac_fraction"]``), a fraction ``f`` of the MACs
are ``w x 8`` and the rest ``min(w, 4) x 4`` multiplications (high / low bits in general):

- BOPS = MACs * (f * w * high + (1 - f) * min(w, low) * low);
- latency: the same split in a hardware profile (each part at its precision class) and in a
  latency table without an entry for the DRQ tag (``f * t[w<w>a8] + (1 - f) * t[w<min>a4]``);
- size: what the checkpoint stores, the w-bit codes only (the low-bit weights are derived from
  them at load, so they cost no bytes);
- Omega: the weight perturbation mixes the same way,
  ``f * omega_w[w] + (1 - f) * omega_w[min(w, low)]``, plus the mode's activation perturbation;
- activation bits: the expected bits per MAC ``high * f + low * (1 - f)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BadConstraintsError
from .hardware import check_latency_table, drq_split, get_profile, table_latency
from .problem import LayerOptions, Limits, Option, Problem, tie_components

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
SCALE_BYTES = 4  # one float32 scale per output channel
VERSION = 1


@dataclass(frozen=True)
class ActivationMode:
    """A DRQ activation mode of one layer: ``tag`` (e.g. ``"drq2x2f0.3"``; the option tag is
    ``"w<bits>" + tag``), expected activation bits, its activation Omega, and the DRQ
    parameters carried into the plan (region, threshold, sensitive_fraction, high/low bits)."""

    tag: str
    expected_bits: float
    omega: float
    drq: dict


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer as the solver sees it (no tensors). ``macs`` per sample,
    ``input_numel`` = elements of the layer's input per sample, ``omega_w`` / ``omega_a`` map
    bits to the weight / activation perturbation at those bits."""

    name: str
    kind: str
    params: int
    macs: int
    out_channels: int
    input_numel: int
    omega_w: dict[int, float]
    omega_a: dict[int, float]
    activation_modes: list[ActivationMode] = field(default_factory=list)
    weight_trace: float | None = None
    # {group size: {bits: omega}}: weight perturbation with one scale per group of inputs
    omega_wg: dict[int, dict[int, float]] = field(default_factory=dict)

    @property
    def fan_in(self) -> int:
        """Inputs per output channel (``in_features``, or ``in / groups * kh * kw``)."""
        return self.params // max(self.out_channels, 1)


def _group_sizes(values: Any) -> tuple[int | None, ...]:
    """Candidate weight group sizes: None (per output channel) and positive ints, distinct,
    None first then ascending."""
    try:
        items = list(values)
    except TypeError as exc:
        raise BadConstraintsError(
            f"weight_group_sizes must be a list of null / positive integers, got {values!r}"
        ) from exc
    if not items:
        raise BadConstraintsError("weight_group_sizes must not be empty")
    bad = [g for g in items if g is not None and (isinstance(g, bool) or not isinstance(g, int)
                                                  or g < 1)]
    if bad:
        raise BadConstraintsError(f"weight_group_sizes {bad} must be null or positive integers")
    if len(set(items)) != len(items):
        raise BadConstraintsError("weight_group_sizes must be distinct")
    return ((None,) if None in items else ()) + tuple(sorted(g for g in items if g is not None))


def group_fits(fan_in: int, group_size: int) -> bool:
    """The one rule for per-group weight scales: a layer can use ``group_size`` when it divides
    the layer's fan-in (inputs per output channel, along the flattened ``in * kh * kw`` of a
    conv) and is smaller than it (a group of the whole fan-in is the per-channel scale)."""
    return 1 <= group_size < fan_in and fan_in % group_size == 0


def _bits(values: Any, what: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in values}))
    except (TypeError, ValueError) as exc:
        raise BadConstraintsError(f"{what} must be a list of integers, got {values!r}") from exc
    if not bits:
        raise BadConstraintsError(f"{what} must not be empty")
    bad = [b for b in bits if b not in ALLOWED_BITS]
    if bad:
        raise BadConstraintsError(f"{what} {bad} not supported; allowed bits: {list(ALLOWED_BITS)}")
    return bits


@dataclass(frozen=True)
class OptionsConfig:
    """Candidate bit sets, pins and the latency model. ``pin_first`` / ``pin_last``: bits that
    the first / last layer keep for both weights and activations (None = not pinned).
    ``hardware``: a profile name from :func:`solver.hardware.profiles`; ``latency_table``:
    ``{layer: {tag: ms}}``; give at most one (none = no latency costs)."""

    weight_bits: tuple[int, ...] = (4, 8)
    activation_bits: tuple[int, ...] = (8,)
    pin_first: int | None = 8
    pin_last: int | None = 8
    hardware: str | None = None
    latency_table: dict | None = None
    weight_group_sizes: tuple[int | None, ...] = (None,)
    version: int = VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_bits", _bits(self.weight_bits, "weight_bits"))
        object.__setattr__(self, "weight_group_sizes", _group_sizes(self.weight_group_sizes))
        object.__setattr__(self, "activation_bits", _bits(self.activation_bits, "activation_bits"))
        for name in ("pin_first", "pin_last"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v not in ALLOWED_BITS):
                raise BadConstraintsError(
                    f"{name} must be null or one of {list(ALLOWED_BITS)}, got {v!r}"
                )
        if self.hardware is not None and self.latency_table is not None:
            raise BadConstraintsError("give either a hardware profile or a latency_table, not both")
        if self.hardware is not None:
            get_profile(self.hardware)
        if self.latency_table is not None:
            check_latency_table(self.latency_table)
        if self.version != VERSION:
            raise BadConstraintsError(f"OptionsConfig version {self.version!r} is not supported")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_bits"] = list(self.weight_bits)
        d["activation_bits"] = list(self.activation_bits)
        d["weight_group_sizes"] = list(self.weight_group_sizes)
        return d

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> OptionsConfig:
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise BadConstraintsError(f"OptionsConfig has unknown keys {unknown}")
        return cls(**obj)


def storage_bits(w_bits: int) -> int:
    """Bits one weight occupies in the checkpoint (bitplan-qckpt/1): nibbles up to 4 bits, int8
    above."""
    return 4 if w_bits <= 4 else 8


def size_bytes(params: int, w_bits: int, out_channels: int, group_size: int | None = None
               ) -> float:
    """Checkpoint weight bytes (packed, rounded up to a whole byte) plus float32 scales: one
    per output channel, or one per group of ``group_size`` inputs of each output channel."""
    scales = out_channels if group_size is None else params // group_size
    return float(math.ceil(params * storage_bits(w_bits) / 8) + SCALE_BYTES * scales)


def _omega(table: dict[int, float], bits: int, layer: str, what: str) -> float:
    if bits not in table:
        raise BadConstraintsError(
            f"layer {layer!r} has no {what} for {bits} bits (has {sorted(table)}); measure "
            f"sensitivity at every candidate bit width"
        )
    v = float(table[bits])
    if not math.isfinite(v):
        raise BadConstraintsError(f"layer {layer!r} {what}[{bits}] is not finite")
    return v


def drq_bops_per_mac(w: int, drq: dict) -> float:
    """Bit operations per MAC of a DRQ layer with w-bit weights: ``f w high + (1 - f)
    min(w, low) low``."""
    f, high, low = drq_split(drq)
    return f * w * high + (1.0 - f) * min(w, low) * low


def _latency(spec: LayerSpec, cfg: OptionsConfig, w: int, a: float, tag: str,
             drq: dict | None) -> float | None:
    if cfg.hardware is not None:
        return get_profile(cfg.hardware).latency_ms(
            spec.macs, spec.params, w, a, spec.input_numel, drq
        )
    if cfg.latency_table is not None:
        row = cfg.latency_table.get(spec.name)
        if drq is not None and isinstance(row, dict) and tag not in row:
            f, high, low = drq_split(drq)
            return f * table_latency(cfg.latency_table, spec.name, f"w{w}a{high}") + (
                1.0 - f
            ) * table_latency(cfg.latency_table, spec.name, f"w{min(w, low)}a{low}")
        return table_latency(cfg.latency_table, spec.name, tag)
    return None


def _option(spec: LayerSpec, cfg: OptionsConfig, w: int, a: int,
            group: int | None = None) -> Option:
    tag = f"w{w}a{a}" if group is None else f"w{w}g{group}a{a}"
    if group is None:
        omega_w = _omega(spec.omega_w, w, spec.name, "omega_w")
    else:
        omega_w = _omega(spec.omega_wg.get(group, {}), w, spec.name, f"omega_w (group {group})")
    # a latency table without the grouped tag: the per-channel tag's entry (same kernel shape)
    row = cfg.latency_table.get(spec.name) if cfg.latency_table is not None else None
    lat_tag = f"w{w}a{a}" if group is not None and isinstance(row, dict) and tag not in row \
        else tag
    return Option(
        w_bits=w,
        a_bits=a,
        omega=omega_w + _omega(spec.omega_a, a, spec.name, "omega_a"),
        size_bytes=size_bytes(spec.params, w, spec.out_channels, group),
        bops=float(spec.macs * w * a),
        latency_ms=_latency(spec, cfg, w, a, lat_tag, None),
        tag=tag,
        group_size=group,
    )


def layer_groups(spec: LayerSpec, cfg: OptionsConfig) -> list[int | None]:
    """The weight group sizes a layer is offered: those of ``cfg`` that fit its fan-in
    (:func:`group_fits`); per channel (None) when listed, or when no listed size fits."""
    fits = [g for g in cfg.weight_group_sizes if g is not None and group_fits(spec.fan_in, g)]
    if None in cfg.weight_group_sizes or not fits:
        return [None, *fits]
    return fits


def _drq_weight_omega(spec: LayerSpec, w: int, drq: dict) -> float:
    """Weight perturbation of a DRQ layer: the MACs of sensitive regions use W at w bits, the
    rest W at min(w, low_bits) bits (see the module docstring)."""
    f, _, low_bits = drq_split(drq)
    low = min(w, low_bits)
    high_omega = _omega(spec.omega_w, w, spec.name, "omega_w")
    if low == w or f >= 1.0:
        return high_omega
    return f * high_omega + (1.0 - f) * _omega(spec.omega_w, low, spec.name, "omega_w")


def _drq_option(spec: LayerSpec, cfg: OptionsConfig, w: int, mode: ActivationMode) -> Option:
    tag = f"w{w}{mode.tag}"
    return Option(
        w_bits=w,
        a_bits=float(mode.expected_bits),
        omega=_drq_weight_omega(spec, w, mode.drq) + float(mode.omega),
        size_bytes=size_bytes(spec.params, w, spec.out_channels),
        bops=float(spec.macs * drq_bops_per_mac(w, mode.drq)),
        latency_ms=_latency(spec, cfg, w, mode.expected_bits, tag, mode.drq),
        tag=tag,
        drq=dict(mode.drq),
    )


def layer_options(spec: LayerSpec, cfg: OptionsConfig, pin: int | None = None) -> list[Option]:
    """All candidate options of one layer (only (pin, pin) per channel when pinned), less those
    the hardware profile does not run."""
    runs = get_profile(cfg.hardware).supports if cfg.hardware is not None else None
    if pin is not None:
        if runs is not None and not runs(pin, pin):
            raise BadConstraintsError(
                f"hardware profile {cfg.hardware!r} does not run w{pin}a{pin}; pin the first / "
                "last layer to a precision it runs, or unpin them"
            )
        return [_option(spec, cfg, pin, pin)]
    opts = [_option(spec, cfg, w, a, g) for g in layer_groups(spec, cfg)
            for w in cfg.weight_bits for a in cfg.activation_bits
            if runs is None or runs(w, a)]
    for w in cfg.weight_bits:  # DRQ: per-channel weight scales only
        for mode in spec.activation_modes:
            if runs is None or runs(w, mode.expected_bits, mode.drq):
                opts.append(_drq_option(spec, cfg, w, mode))
    if not opts:
        raise BadConstraintsError(
            f"hardware profile {cfg.hardware!r} runs none of the candidate precisions of layer "
            f"{spec.name!r} (weight_bits {list(cfg.weight_bits)}, activation_bits "
            f"{list(cfg.activation_bits)}); allow bits it runs"
        )
    return opts


def build_problem(
    specs: Sequence[LayerSpec],
    cfg: OptionsConfig,
    limits: Limits,
    ties: Iterable[tuple[str, str]] = (),
) -> Problem:
    """The solver problem for ``specs`` (in model order: the first and last may be pinned).

    Tied layers keep only the tags they all offer (a pin on one member pins the group);
    raises BadConstraintsError when a tie group has no common tag, or for bad bits / tables.
    """
    if not specs:
        raise BadConstraintsError("the model has no quantizable layers")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BadConstraintsError("layer names must be unique")
    per: dict[str, list[Option]] = {}
    for i, s in enumerate(specs):
        pin = None
        if i == 0 and cfg.pin_first is not None:
            pin = cfg.pin_first
        if i == len(specs) - 1 and cfg.pin_last is not None:
            pin = cfg.pin_last
        per[s.name] = layer_options(s, cfg, pin)
    ties = [tuple(t) for t in ties]
    for t in ties:
        for n in t:
            if n not in per:
                raise BadConstraintsError(f"tie {list(t)} names unknown layer {n!r}")
    # Restrict every tie group to its common tags (a pin on one member pins the group).
    for group in tie_components(names, ties):
        if len(group) < 2:
            continue
        common = set.intersection(*({o.tag for o in per[n]} for n in group))
        if not common:
            raise BadConstraintsError(
                f"tied layers {group} share no candidate precision (pins or DRQ modes "
                "differ); unpin one or allow more bits"
            )
        for n in group:
            per[n] = [o for o in per[n] if o.tag in common]
    return Problem(
        tuple(LayerOptions(n, tuple(per[n])) for n in names),
        limits=limits,
        ties=tuple(ties),  # type: ignore[arg-type]
    )


def reference_totals(
    specs: Sequence[LayerSpec], cfg: OptionsConfig, w_bits: int = 8, a_bits: int = 8
) -> dict[str, float | None]:
    """Totals of the all-(w_bits, a_bits) model (default INT8): the base that ratio limits
    are relative to (the service converts them, ``service.constraints.Limits.to_solver``)."""
    size = bops = 0.0
    lat: float | None = 0.0
    for s in specs:
        size += size_bytes(s.params, w_bits, s.out_channels)
        bops += float(s.macs * w_bits * a_bits)
        ms = _latency(s, cfg, w_bits, a_bits, f"w{w_bits}a{a_bits}", None)
        lat = None if ms is None or lat is None else lat + ms
    return {"size_bytes": size, "bops": bops, "latency_ms": lat}
