"""DRQ region calibration: per conv layer, region sizes, thresholds, reached fractions, Omega.

For every conv2d layer of an exported program this measures, on the calibration data, how the
layer's input behaves under the DRQ predictor (see ``quantize.drq``) and turns each candidate
(region size, target sensitive fraction f) into a ``DRQMode`` the solver can choose:

- the INT8 input grid: min/max of the input over the whole train part (the job's activation
  statistics, ``quantize.observe``, shared with the sensitivity and quantize stages, so a layer
  has one input grid whether or not it runs DRQ) -> ``quantize.primitives.activation_scale``,
  rounded to float32 (the precision the checkpoint stores it in). The plan's drq entry
  carries this scale and signedness (:meth:`LayerRegions.drq_dict`), and the quantize stage
  and every runtime use it as the layer's input grid, so the threshold is applied on the grid
  it was calibrated on;
- the threshold: the (1 - f) quantile of the region means over the train part, on the integer
  grid of INT8 code units the plan stores. Because a region is sensitive iff
  ``mean >= T`` and T is an integer, ``mean >= T`` iff ``floor(mean) >= T``; a histogram of
  ``floor(mean)`` (one bin per INT8 code) therefore gives the exact reached fraction of every
  admissible threshold. Of all integers, the one whose reached fraction is closest to f is
  chosen (ties: the lower threshold, i.e. more regions at INT8). When many regions share one
  integer bin the reached fraction can differ from f; it is reported, and the expected bits
  use it, not f;
- the reached fraction on the train part and on the held-out part (same scale, same T);
- the MAC fraction: the share of the conv's multiplications that read a pixel of a sensitive
  region (taps on the zero padding count as insensitive), which is what the DRQ runtime counts
  (``quantize.drq.DRQConv2d.macs_high``) and what the solver charges at ``w x 8`` bits; each
  region's weight is the number of multiplications that read its pixels
  (``quantize.drq.input_uses``), accumulated per histogram bin like the errors;
- ``Omega = activation_trace / activation_numel * E||Q_drq(a) - a||^2``, sensitive regions at
  INT8, the rest at INT4 (INT4 grid over the same range). The squared error of every region at
  INT8 and at INT4 is accumulated per histogram bin, so the error of each threshold is exact
  without another pass.

Memory stays bounded: batches are streamed and each (layer, region size) keeps three vectors of
``2^high_bits`` numbers (counts, INT8 error, INT4 error), never the feature maps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from quantize.calibrate import f32
from quantize.data import CalibrationSet
from quantize.drq import (
    DRQLayerSettings,
    channel_plane,
    input_uses,
    low_scale,
    plane_region_sums,
    region_grid,
    region_sums,
)
from quantize.graph import GraphLayer, insert_input_modules
from quantize.observe import ActivationStats, graph_copy, observe
from quantize.primitives import activation_qrange, quantize_activation
from solver.errors import BadCalibrationError, BadConstraintsError

log = logging.getLogger(__name__)

VERSION = 2  # 2: modes carry mac_fraction
FORMAT = "bitplan-regions/2"
CONFIG_VERSION = 1
STAGE = "regions"

ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class RegionConfig:
    """Candidates and limits of the region calibration.

    ``region_sizes``: square region sides in pixels (a size larger than a layer's map is skipped
    for that layer); ``sensitive_fractions``: target fractions f in (0, 1) of regions at
    ``high_bits``; ``max_samples``: at most this many train (and held-out) samples are used
    for the region statistics (the first ones; None = all; the INT8 grid is that of all train
    samples); ``batch_size``: samples per forward pass when the program does not fix it.
    Raises BadConstraintsError when a field is out of range.
    """

    region_sizes: tuple[int, ...] = (2, 4, 8)
    sensitive_fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    high_bits: int = 8
    low_bits: int = 4
    max_samples: int | None = 1024
    batch_size: int = 64
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        sizes = tuple(self.region_sizes)
        fracs = tuple(float(f) for f in self.sensitive_fractions)
        object.__setattr__(self, "region_sizes", sizes)
        object.__setattr__(self, "sensitive_fractions", fracs)
        if self.version != CONFIG_VERSION:
            raise BadConstraintsError(
                f"region config version {self.version} is not supported; use {CONFIG_VERSION}"
            )
        if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise BadConstraintsError(
                f"drq region_sizes must be a non-empty list of positive integers, got {list(sizes)}"
            )
        if len(set(sizes)) != len(sizes):
            raise BadConstraintsError(f"drq region_sizes has duplicates: {list(sizes)}")
        if not fracs or any(not (0.0 < f < 1.0) or not math.isfinite(f) for f in fracs):
            raise BadConstraintsError(
                "drq sensitive_fractions must be numbers strictly between 0 and 1, "
                f"got {list(fracs)}"
            )
        if len(set(fracs)) != len(fracs):
            raise BadConstraintsError(f"drq sensitive_fractions has duplicates: {list(fracs)}")
        if not (2 <= self.low_bits < self.high_bits <= 16):
            raise BadConstraintsError(
                f"drq bits need 2 <= low_bits < high_bits <= 16, got low_bits={self.low_bits}, "
                f"high_bits={self.high_bits}"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise BadConstraintsError(
                f"max_samples must be positive or null, got {self.max_samples}"
            )
        if self.batch_size < 1:
            raise BadConstraintsError(f"batch_size must be positive, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["region_sizes"] = list(self.region_sizes)
        d["sensitive_fractions"] = list(self.sensitive_fractions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegionConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BadConstraintsError(
                f"unknown region config fields {unknown}; known: {sorted(known)}"
            )
        kw = dict(d)
        for key in ("region_sizes", "sensitive_fractions"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> RegionConfig:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class DRQMode:
    """One DRQ candidate of a layer.

    ``threshold`` in INT8 code units (regions with mean |code| >= threshold run at INT8);
    ``fraction_calib`` / ``fraction_holdout``: fraction of regions at INT8 reached on the train /
    held-out part; ``mac_fraction``: fraction of the conv's multiplications that read a
    sensitive pixel (train part); ``omega``: activation perturbation (see module doc); ``mse``:
    mean squared error per input element under this mode (train part); ``expected_bits`` =
    high_bits * mac_fraction + low_bits * (1 - mac_fraction), the activation bits per MAC.
    """

    region: tuple[int, int]
    target_fraction: float
    threshold: int
    fraction_calib: float
    fraction_holdout: float
    omega: float
    expected_bits: float
    mac_fraction: float
    mse: float = 0.0
    high_bits: int = 8
    low_bits: int = 4

    @property
    def tag(self) -> str:
        """A short stable name for the solver's option tag, e.g. ``drq-4x4-f0.3``."""
        return f"drq-{self.region[0]}x{self.region[1]}-f{self.target_fraction:g}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["region"] = list(self.region)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DRQMode:
        kw = dict(d)
        kw["region"] = tuple(int(v) for v in kw["region"])
        return cls(**kw)


@dataclass(frozen=True)
class LayerRegions:
    """Region calibration of one conv layer.

    ``scale`` / ``signed``: the INT8 input grid used (and to be used by the runtime);
    ``input_shape``: per-sample (C, H, W); ``samples`` / ``holdout_samples``: samples seen;
    ``omega_high`` / ``omega_low``: Omega of the whole input at high / low bits under the same
    normalisation as the modes (for comparison with the sensitivity engine's omega_a).
    """

    name: str
    input_shape: tuple[int, ...]
    scale: float
    signed: bool
    samples: int
    holdout_samples: int
    omega_high: float
    omega_low: float
    modes: list[DRQMode] = field(default_factory=list)

    def drq_dict(self, mode: DRQMode) -> dict[str, Any]:
        """The plan row's ``drq`` entry for one of this layer's modes (with the INT8 grid the
        threshold was calibrated on)."""
        return {
            "region": [mode.region[0], mode.region[1]],
            "threshold": int(mode.threshold),
            "sensitive_fraction": float(mode.fraction_calib),
            "mac_fraction": float(mode.mac_fraction),
            "high_bits": mode.high_bits,
            "low_bits": mode.low_bits,
            "scale": float(self.scale),
            "signed": bool(self.signed),
        }

    def mode(self, region: int | tuple[int, int], fraction: float) -> DRQMode:
        """The mode for a region size and target fraction; KeyError when absent."""
        r = (region, region) if isinstance(region, int) else tuple(region)
        for m in self.modes:
            if m.region == r and math.isclose(m.target_fraction, fraction):
                return m
        raise KeyError(f"layer {self.name!r} has no DRQ mode region={r} fraction={fraction}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "scale": self.scale,
            "signed": self.signed,
            "samples": self.samples,
            "holdout_samples": self.holdout_samples,
            "omega_high": self.omega_high,
            "omega_low": self.omega_low,
            "modes": [m.to_dict() for m in self.modes],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerRegions:
        kw = dict(d)
        kw["input_shape"] = tuple(kw["input_shape"])
        kw["modes"] = [DRQMode.from_dict(m) for m in kw["modes"]]
        return cls(**kw)


@dataclass(frozen=True)
class RegionResult:
    """Per conv layer DRQ statistics. ``omega_is_raw``: no activation traces were given, so
    every omega is the bare error term E||Q_drq(a) - a||^2 (per sample), not trace-weighted."""

    layers: list[LayerRegions]
    config: RegionConfig
    omega_is_raw: bool
    seconds: float = 0.0
    version: int = VERSION

    def layer(self, name: str) -> LayerRegions:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no region calibration for layer {name!r}")

    def drq_settings(
        self, choice: Mapping[str, DRQMode], w_bits: int | Mapping[str, int] = 8
    ) -> dict[str, DRQLayerSettings]:
        """Runtime settings (``quantize.drq.apply_drq``) for a chosen mode per layer."""
        out = {}
        for name, mode in choice.items():
            layer = self.layer(name)
            bits = w_bits if isinstance(w_bits, int) else w_bits[name]
            out[name] = DRQLayerSettings(
                layer.scale, layer.signed, mode.region, mode.threshold, bits,
                mode.high_bits, mode.low_bits,
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "format": FORMAT,
            "config": self.config.to_dict(),
            "omega_is_raw": self.omega_is_raw,
            "seconds": self.seconds,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegionResult:
        if d.get("version") != VERSION or d.get("format", FORMAT) != FORMAT:
            raise ValueError(
                f"not a version-{VERSION} region result (format {d.get('format')!r}, "
                f"version {d.get('version')!r})"
            )
        return cls(
            layers=[LayerRegions.from_dict(layer) for layer in d["layers"]],
            config=RegionConfig.from_dict(d["config"]),
            omega_is_raw=bool(d["omega_is_raw"]),
            seconds=float(d.get("seconds", 0.0)),
        )

    @classmethod
    def from_json(cls, text: str) -> RegionResult:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass
class RegionStats:
    """Streaming per-bin statistics of one (layer, region size).

    Bin k holds the regions whose mean |INT8 code| over channels and pixels has floor k.
    ``count[k]``: regions; ``err_high[k]`` / ``err_low[k]``: summed squared error of their
    elements at the high / low grid; ``macs[k]``: multiplications (per input and output
    channel pair) that read their pixels. ``uses``: that weight per region ``[rows, cols]``
    (None: MACs are not counted); ``taps``: multiplications per channel pair of one sample,
    padding taps included; ``samples``: samples added.
    """

    region: tuple[int, int]
    count: torch.Tensor
    err_high: torch.Tensor
    err_low: torch.Tensor
    macs: torch.Tensor
    uses: torch.Tensor | None = None
    taps: float = 0.0
    samples: int = 0

    @classmethod
    def empty(
        cls,
        region: tuple[int, int],
        bins: int,
        device: torch.device,
        uses: torch.Tensor | None = None,
        taps: float = 0.0,
    ) -> RegionStats:
        z = torch.zeros(bins, dtype=torch.float64, device=device)
        if uses is not None:
            uses = region_sums(uses[None, None], region)[0][0].to(device)
        return cls(region, z.clone(), z.clone(), z.clone(), z.clone(), uses, float(taps))

    @property
    def total(self) -> float:
        return float(self.count.sum())

    def reached(self) -> torch.Tensor:
        """reached[T] = fraction of regions with mean >= T, for T = 0 .. bins (last is 0)."""
        tail = torch.cat([self.count.flip(0).cumsum(0).flip(0), self.count.new_zeros(1)])
        return tail / max(self.total, 1.0)

    def error(self, threshold: int) -> float:
        """Summed squared error with regions of mean >= threshold at high bits, others low."""
        t = min(max(int(threshold), 0), self.count.numel())
        return float(self.err_high[t:].sum() + self.err_low[:t].sum())

    def mac_fraction(self, threshold: int) -> float:
        """Fraction of the multiplications that read a pixel of a region of mean >= threshold."""
        if self.uses is None or not self.samples or not self.taps:
            raise ValueError("these statistics do not count MACs")
        t = min(max(int(threshold), 0), self.count.numel())
        return float(self.macs[t:].sum()) / (self.samples * self.taps)


def _omega(err: float, numel: int, samples: int, trace: tuple[float, int] | None) -> float:
    """Omega from a summed squared error over ``numel`` input elements of ``samples`` samples.

    With ``trace = (Tr(H_a), n_a)`` (the trace over an activation of n_a elements):
    ``Tr / n_a * E||Q(a) - a||^2`` where the expected squared error over those n_a elements is
    ``n_a`` times the mean squared error per element measured here, so Omega = Tr * mse
    whatever n_a counts (one sample or the whole set), as long as trace and n_a agree. Without
    a trace: the raw error term E||Q(a) - a||^2 per sample.
    """
    if trace is None:
        return err / samples
    tr, n_a = trace
    return tr / n_a * (err / numel * n_a)


def choose_threshold(reached: torch.Tensor, fraction: float) -> int:
    """The integer threshold whose reached fraction is closest to ``fraction`` (ties: lower)."""
    gap = (reached - fraction).abs()
    return int(torch.nonzero(gap == gap.min())[0, 0])


def layer_codes(
    a: torch.Tensor, scale: float, signed: bool, high_bits: int, low_bits: int,
    with_error: bool = True,
) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
    """What every region size of a layer bins, for a batch of its inputs ``a`` [N, C, H, W]:
    the channel planes (``quantize.drq.channel_plane``, float64 [N, H, W]) of the INT8 codes'
    |value| and, ``with_error``, of the squared error of every value at INT8 and at INT4;
    and the channel count."""
    codes = quantize_activation(a, scale, high_bits, signed)
    if not with_error:
        return channel_plane(codes), a.shape[1], None, None
    s_low = low_scale(scale, signed, high_bits, low_bits)
    # Differences in the activation dtype (as the runtime computes them), squares in float64.
    e_high = (codes * scale - a).to(torch.float64).pow(2)
    e_low = (quantize_activation(a, s_low, low_bits, signed) * s_low - a).to(torch.float64).pow(2)
    # squares are >= 0: their channel plane is their sum over channels (no abs pass)
    return channel_plane(codes), a.shape[1], e_high.sum(dim=1), e_low.sum(dim=1)


def add_stats(stats: RegionStats, codes: torch.Tensor, channels: int,
              e_high: torch.Tensor | None, e_low: torch.Tensor | None) -> None:
    """Add a batch's ``layer_codes`` (channel planes) to ``stats`` (its region size's sums
    and histograms)."""
    sums, counts = plane_region_sums(codes, stats.region, channels)
    # floor(sum / count) is exact here: sums and counts are exact integers far below 2^53.
    bins = torch.floor(sums / counts).to(torch.int64).clamp_(0, stats.count.numel() - 1).reshape(-1)
    stats.count += torch.bincount(bins, minlength=stats.count.numel()).to(torch.float64)
    stats.samples += codes.shape[0]
    if stats.uses is not None:
        uses = stats.uses.expand(codes.shape[0], -1, -1).reshape(-1)
        stats.macs += torch.bincount(bins, weights=uses, minlength=stats.macs.numel())
    if e_high is None or e_low is None:
        return
    for err, acc in ((e_high, stats.err_high), (e_low, stats.err_low)):
        per_region = plane_region_sums(err, stats.region, channels)[0].reshape(-1)
        acc += torch.bincount(bins, weights=per_region, minlength=acc.numel())


# --------------------------------------------------------------------------------------------
# Collecting layer inputs


class _Probe(nn.Module):
    """Passes its input through and hands the real samples to a callback."""

    def __init__(self, name: str, sink: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.name = name
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sink(self.name, x.detach())
        return x


def _conv_uses(layer: GraphLayer, height: int, width: int) -> tuple[torch.Tensor, float]:
    """Per-pixel multiplication counts of a conv2d layer's input (``quantize.drq.input_uses``)
    and the multiplications of one sample per (input, output) channel pair, padding included."""
    kernel = tuple(layer.weight_shape[2:])
    uses = input_uses(height, width, kernel, layer.stride, layer.padding, layer.dilation)
    probe = torch.zeros(1, 1, height, width)
    out = torch.nn.functional.conv2d(
        probe, torch.zeros(1, 1, *kernel), None, layer.stride, layer.padding, layer.dilation
    )
    return uses, float(out.numel() * math.prod(kernel))


def _grids(convs: list[GraphLayer], stats: ActivationStats, bits: int
           ) -> tuple[dict[str, tuple[float, bool]], dict[str, tuple[int, ...]]]:
    """Each conv layer's INT8 input grid (``activation_scale`` of its observed range, rounded to
    float32 as stored) and per-sample input shape; BadCalibrationError for an input that is not
    an [N, C, H, W] map."""
    grids, shapes = {}, {}
    for layer in convs:
        s = stats[layer.name]
        if s.seen and len(s.shape) != 3:
            raise BadCalibrationError(
                f"conv layer {layer.name!r} gets a {len(s.shape) + 1}-D input; DRQ needs "
                "[N, C, H, W] maps"
            )
        scale, signed = stats.grid(layer.name, bits)
        grids[layer.name], shapes[layer.name] = (f32(scale), signed), s.shape
    return grids, shapes


def _first(data: CalibrationSet, limit: int | None) -> CalibrationSet:
    if limit is None or len(data) <= limit:
        return data
    return data.subset(torch.arange(limit))


class _Runner:
    """Streams a calibration set through the probed module, calling ``fn(name, a)`` per layer
    input (padding of fixed-size batches dropped)."""

    def __init__(
        self,
        module: fx.GraphModule,
        convs: list[GraphLayer],
        batch_size: int,
        fixed: bool,
        device: torch.device,
    ) -> None:
        self._fn: Callable[[str, torch.Tensor], None] | None = None
        self._size = 0
        probes = {layer.name: _Probe(layer.name, self._sink) for layer in convs}
        self.module = insert_input_modules(graph_copy(module, device), convs, probes, STAGE)
        self.batch_size = batch_size
        self.fixed = fixed
        self.device = device

    def _sink(self, name: str, x: torch.Tensor) -> None:
        if self._fn is not None:
            self._fn(name, x[: self._size])

    @torch.no_grad()
    def run(
        self,
        data: CalibrationSet,
        fn: Callable[[str, torch.Tensor], None],
        tick: Callable[[], None],
    ) -> None:
        self._fn = fn
        try:
            for batch in data.batches(self.batch_size, self.fixed):
                self._size = batch.size
                b = batch.to(self.device)
                self.module(*b.args, **b.kwargs)
                tick()
        finally:
            self._fn = None


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_traces(convs: list[GraphLayer], traces: Mapping[str, tuple[float, int]] | None
                  ) -> None:
    if traces is not None:
        missing = [layer.name for layer in convs if layer.name not in traces]
        if missing:
            raise ValueError(f"activation_traces has no entry for conv layers {missing}")


class _Ticker:
    """Reports ``progress("regions", batches done / batches planned)`` once a batch."""

    def __init__(self, progress: ProgressFn | None, planned: int) -> None:
        self.progress, self.planned, self.done = progress, planned, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(STAGE, self.done / self.planned)


def _region_tables(
    convs: list[GraphLayer],
    shapes: Mapping[str, tuple[int, ...]],
    cfg: RegionConfig,
    bins: int,
    device: torch.device,
) -> dict[str, list[RegionStats]]:
    """Empty statistics per conv layer and region size that fits its map."""
    out = {}
    for layer in convs:
        _, h, w = shapes[layer.name]
        uses, taps = _conv_uses(layer, h, w)
        sizes = [s for s in cfg.region_sizes if s <= h and s <= w]
        out[layer.name] = [RegionStats.empty((s, s), bins, device, uses, taps) for s in sizes]
    return out


def _whole_map_tables(
    shapes: Mapping[str, tuple[int, ...]],
    tables: Mapping[str, list[RegionStats]],
    bins: int,
    device: torch.device,
) -> dict[str, list[RegionStats]]:
    """A layer whose map is smaller than every region size gets no modes, but its whole-map
    errors at high / low bits are still reported (one region covering the map)."""
    return {
        name: [RegionStats.empty((w, h), bins, device)]
        for name, (_, h, w) in shapes.items()
        if not tables[name]
    }


class _Collector:
    """The region passes: adds a batch of a layer's inputs to every table's statistics."""

    def __init__(
        self,
        tables: Sequence[Mapping[str, list[RegionStats]]],
        grids: Mapping[str, tuple[float, bool]],
        cfg: RegionConfig,
        with_error: bool,
    ) -> None:
        self.tables, self.grids, self.cfg, self.with_error = tables, grids, cfg, with_error

    def __call__(self, name: str, a: torch.Tensor) -> None:
        scale, signed = self.grids[name]
        stats = [st for table in self.tables for st in table.get(name, ())]
        if stats:  # the codes and errors once, binned by every region size
            done = layer_codes(a, scale, signed, self.cfg.high_bits, self.cfg.low_bits,
                               self.with_error)
            for st in stats:
                add_stats(st, *done)


def _modes(
    train_stats: list[RegionStats],
    hold_stats: list[RegionStats],
    cfg: RegionConfig,
    numel: int,
    to_omega: Callable[[float], float],
) -> list[DRQMode]:
    """One mode per (region size, target fraction) of a layer."""
    modes = []
    for st, hst in zip(train_stats, hold_stats, strict=True):
        reached = st.reached()
        reached_hold = hst.reached()
        for f in cfg.sensitive_fractions:
            t = choose_threshold(reached, f)
            mac_frac = st.mac_fraction(t)
            err = st.error(t)
            modes.append(
                DRQMode(
                    region=st.region,
                    target_fraction=f,
                    threshold=t,
                    fraction_calib=float(reached[t]),
                    fraction_holdout=float(reached_hold[t]),
                    omega=to_omega(err),
                    expected_bits=cfg.high_bits * mac_frac + cfg.low_bits * (1.0 - mac_frac),
                    mac_fraction=mac_frac,
                    mse=err / numel,
                    high_bits=cfg.high_bits,
                    low_bits=cfg.low_bits,
                )
            )
    return modes


def _layer_result(
    name: str,
    shape: tuple[int, ...],
    grid: tuple[float, bool],
    tables: tuple[list[RegionStats], list[RegionStats], list[RegionStats]],
    samples: tuple[int, int],
    cfg: RegionConfig,
    trace: tuple[float, int] | None,
    bins: int,
) -> LayerRegions:
    """A layer's modes and its pure high / low Omega from its train, held-out and whole-map
    statistics."""
    train_stats, hold_stats, whole = tables
    n_train, n_hold = samples
    c, h, w = shape
    numel = n_train * c * h * w

    def to_omega(err: float) -> float:
        return _omega(err, numel, n_train, trace)

    modes = _modes(train_stats, hold_stats, cfg, numel, to_omega)
    # Pure high / low grids: any region size's bins hold the whole error.
    st0 = (train_stats or whole)[0]
    if not train_stats:
        log.info("layer %s: map %dx%d is smaller than every region size", name, h, w)
    return LayerRegions(name, (c, h, w), grid[0], grid[1], n_train, n_hold,
                        to_omega(st0.error(0)), to_omega(st0.error(bins)), modes)


def calibrate(
    module: fx.GraphModule,
    layers: Sequence[GraphLayer],
    train: CalibrationSet,
    holdout: CalibrationSet,
    cfg: RegionConfig | None = None,
    activation_traces: Mapping[str, tuple[float, int]] | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    activations: ActivationStats | None = None,
) -> RegionResult:
    """DRQ region calibration of every conv2d layer in ``layers`` (others are ignored).

    ``module``: the exported program's GraphModule (left unchanged: probes go on a copy that
    shares its parameters); ``train`` fixes scales and thresholds, ``holdout`` only reports the
    reached fractions; ``activation_traces``: ``{layer: (Tr(H_a), numel of the activation the
    trace was taken over)}`` from the sensitivity engine (None: omega is the raw error term and
    ``omega_is_raw`` is set); ``batch_size``: the program's fixed export batch size (batches are
    then padded to it), else ``cfg.batch_size`` samples per pass. ``progress("regions", f)``
    is called once a batch. ``activations``: the input statistics of all of ``train``
    (``quantize.observe``; the job's, measured once), which fix the INT8 grids; without them
    they are observed here first. The region statistics use the first ``cfg.max_samples``
    train and held-out samples. Raises BadCalibrationError for empty data, a non-4-D conv input
    or non-finite activations; ValueError when ``activation_traces`` lacks a conv layer.
    """
    cfg = cfg or RegionConfig()
    device = _device(device)
    start = time.perf_counter()
    convs = [layer for layer in layers if layer.kind == "conv2d"]
    _check_traces(convs, activation_traces)
    raw = activation_traces is None
    if not convs:
        return RegionResult([], cfg, raw, time.perf_counter() - start)
    observed = train
    train = _first(train, cfg.max_samples)
    holdout = _first(holdout, cfg.max_samples)
    if len(train) == 0 or len(holdout) == 0:
        raise BadCalibrationError(
            "region calibration needs at least one train and one held-out sample"
        )
    bs = batch_size if batch_size is not None else cfg.batch_size
    fixed = batch_size is not None
    own = 0 if activations is not None else -(-len(observed) // bs)  # batches of our own pass
    tick = _Ticker(progress, own + -(-len(train) // bs) + -(-len(holdout) // bs))
    if activations is None:  # the input ranges of the whole train part -> INT8 grids
        activations = observe(module, convs, observed, bs, fixed, device,
                              lambda stage, f: tick())
    grids, shapes = _grids(convs, activations, cfg.high_bits)
    runner = _Runner(module, convs, bs, fixed, device)
    bins = activation_qrange(cfg.high_bits, False)[1] + 1  # mean |code| lies in [0, qmax]
    train_stats = _region_tables(convs, shapes, cfg, bins, device)
    hold_stats = _region_tables(convs, shapes, cfg, bins, device)
    whole = _whole_map_tables(shapes, train_stats, bins, device)
    # Region statistics on the train part (thresholds, errors), then the held-out counts.
    runner.run(train, _Collector((train_stats, whole), grids, cfg, True), tick)
    runner.run(holdout, _Collector((hold_stats,), grids, cfg, False), tick)

    results = [
        _layer_result(
            layer.name, shapes[layer.name], grids[layer.name],
            (train_stats[layer.name], hold_stats[layer.name], whole.get(layer.name, [])),
            (len(train), len(holdout)), cfg,
            None if raw else activation_traces[layer.name], bins,
        )
        for layer in convs
    ]
    return RegionResult(results, cfg, raw, time.perf_counter() - start)


__all__ = [
    "DRQMode",
    "LayerRegions",
    "RegionConfig",
    "RegionResult",
    "RegionStats",
    "add_stats",
    "calibrate",
    "choose_threshold",
    "layer_codes",
    "region_grid",
]
