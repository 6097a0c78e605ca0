"""Activation calibration: per-tensor ranges observed on the calibration set, streamed.

A quantized layer's input grid comes from the job's activation statistics
(``quantize.observe.ActivationStats``, measured once on the unfolded model and shared with the
sensitivity and DRQ stages) with the ``minmax`` method. Observers are small modules inserted
into a copy of the (BN-folded, float) program: one after every materialisation point whose grid
is not a layer input grid (see ``quantize.points``), and, for the ``percentile`` method (or a
layer the statistics lack), one on the layer's input (``quantize.graph.insert_input_modules``).
They keep running statistics only (min / max, and for the percentile method a fixed-size
histogram filled in a second pass), never whole tensors. Padding samples of fixed-size batches
are excluded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import fx, nn

from solver.errors import BadCalibrationError

from .config import QuantizeConfig
from .data import CalibrationSet, run_batch
from .graph import GraphLayer, insert_after_node, insert_input_modules
from .observe import ActivationStats
from .points import Grid, Point
from .primitives import activation_qrange, activation_scale

# ``mse`` calibration: the clipped ranges tried, as fractions of the observed one (1.0 keeps
# min/max; below 0.2 a grid loses most of a tensor's values on any data seen so far).
MSE_CLIP_RATIOS = tuple(round(0.2 + 0.01 * i, 2) for i in range(81))

ProgressFn = Callable[[str, float], None]


def f32(x: float) -> float:
    """``x`` rounded to float32, so grids stored as float32 tensors are reproduced exactly."""
    return float(np.float32(x))


class _BatchInfo:
    """Shared by the observers of one module: which leading rows of a batch are real."""

    def __init__(self) -> None:
        self.full: int | None = None
        self.valid: int | None = None


class RangeObserver(nn.Module):
    """Identity module that records the range (and, in phase 1, a histogram) of its input."""

    def __init__(self, info: _BatchInfo, bins: int) -> None:
        super().__init__()
        self.info = info
        self.bins = bins
        self.phase = 0
        self.amin = math.inf
        self.amax = -math.inf
        self.count = 0
        self.hist: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach()
        if self.info.valid is not None and v.dim() and v.shape[0] == self.info.full:
            v = v[: self.info.valid]
        if v.numel() == 0:
            return x
        v = v.float()
        if self.phase == 0:  # one pass: NaN propagates to both ends, +-inf shows in one
            lo, hi = (float(t) for t in torch.aminmax(v))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise BadCalibrationError(
                    "a layer input became non-finite on the calibration data; check the inputs"
                )
            self.amin = min(self.amin, lo)
            self.amax = max(self.amax, hi)
            self.count += v.numel()
        elif self.amax > self.amin:
            h = torch.histc(v, bins=self.bins, min=self.amin, max=self.amax).to(torch.float64)
            self.hist = h if self.hist is None else self.hist + h
        return x

    def value_range(self, method: str, percentile: float,
                    bits: int | None = None) -> tuple[float, float]:
        """(amin, amax) by min/max, by the percentile pair of the streamed histogram, or
        (``mse``, needs ``bits``) the clipped range whose ``bits``-bit grid has the least
        squared error over the histogram."""
        if self.count == 0:
            raise BadCalibrationError(
                "a quantized layer never ran on the calibration data; is it reachable?"
            )
        if method == "minmax" or self.hist is None or self.amax <= self.amin:
            return self.amin, self.amax
        if method == "mse" and bits is not None:
            return self._mse_range(bits)
        cdf = torch.cumsum(self.hist, 0)
        total = float(cdf[-1])
        width = (self.amax - self.amin) / self.bins
        q_hi = percentile / 100.0
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(q_hi * total, dtype=torch.float64)))
        amax = min(self.amax, self.amin + (hi_bin + 1) * width)
        amin = self.amin
        if self.amin < 0:  # clip the low tail only for signed tensors; ReLU outputs keep 0
            lo_bin = int(
                torch.searchsorted(cdf, torch.tensor((1 - q_hi) * total, dtype=torch.float64))
            )
            amin = min(max(self.amin, self.amin + lo_bin * width), 0.0)
        return amin, max(amax, 0.0)


    def _mse_range(self, bits: int) -> tuple[float, float]:
        """The range among ``MSE_CLIP_RATIOS`` x (amin, amax) (the low end scaled only for
        signed tensors) whose grid minimises ``sum_i h_i (Q(c_i) - c_i)^2`` over the histogram's
        bin centres ``c_i`` and counts ``h_i``."""
        assert self.hist is not None
        width = (self.amax - self.amin) / self.bins
        centers = self.amin + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
        best: tuple[float, float, float] | None = None
        for t in MSE_CLIP_RATIOS:
            lo = self.amin * t if self.amin < 0 else self.amin
            hi = self.amax * t if self.amax > 0 else self.amax
            scale, signed = activation_scale(lo, hi, bits)
            qlo, qhi = activation_qrange(bits, signed)
            err = float((self.hist * (torch.round(centers / scale).clamp(qlo, qhi) * scale
                                      - centers).pow(2)).sum())
            if best is None or err < best[0]:
                best = (err, lo, hi)
        assert best is not None
        return best[1], best[2]


def insert_after(gm: fx.GraphModule, modules: dict[str, nn.Module], prefix: str,
                 recompile: bool = True) -> fx.GraphModule:
    """Insert ``modules[node]`` right after each named node (all uses rewired), in place
    (``recompile=False``: the caller lints and recompiles once after more rewrites)."""
    for node_name, module in modules.items():
        insert_after_node(gm, node_name, module, f"_bitplan_{prefix}_{node_name}")
    if recompile:
        gm.graph.lint()
        gm.recompile()
    return gm


def _unfolded_ranges(gm: fx.GraphModule, stats: ActivationStats,
                     points: list[Point]) -> dict[str, tuple[float, float]]:
    """(min, max) of the free points whose values the job's activation statistics observed on
    the unfolded model (``ActivationStats.points``: a folded layer returns what its conv + BN
    returned, up to float rounding), by chain-end node. A point whose observed per-sample
    shape differs from the folded node's (another graph) is left to the pass."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, tuple[float, float]] = {}
    for p in points:
        s = stats.points.get(p.end)
        if p.consumer is not None or s is None or not s.seen or p.end not in nodes:
            continue
        val = nodes[p.end].meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is not None and all(isinstance(d, int) for d in shape[1:]) \
                and tuple(shape[1:]) != s.shape:
            continue
        out[p.end] = (s.lo, s.hi)
    return out


def calibrate(
    gm: fx.GraphModule,
    layers: dict[str, GraphLayer],
    input_bits: dict[str, int],
    given: Mapping[str, Grid],
    points: list[Point],
    data: CalibrationSet,
    cfg: QuantizeConfig,
    batch_size: int | None,
    device: torch.device,
    progress: ProgressFn | None = None,
    activations: ActivationStats | None = None,
) -> tuple[dict[str, Grid], dict[str, Grid], dict[str, tuple[float, float]]]:
    """Calibrated input grid of each quantized layer, grid of each free point, and (minmax)
    the observed (min, max) of each free point's end node.

    ``gm`` (a BN-folded float copy) is modified: observers are inserted. ``input_bits`` maps a
    layer name to its input bits; layers in ``given`` (DRQ rows: the grid their threshold was
    calibrated on, from the plan) keep that grid and are not observed; with ``minmax``, a layer
    in ``activations`` takes its grid from those statistics and is not observed either, and so
    does a free point whose range ``activations.outputs`` holds for this set of ``layers``
    (measured by an earlier call on the same model and data). No observer left: no pass.
    A free point is one with no consumer layer; its grid has ``cfg.out_bits`` bits, or
    ``cfg.final_bits`` when it is a model output.
    Raises BadCalibrationError when a tensor never shows up or is non-finite.
    """
    stats = activations if activations is not None and cfg.calibration == "minmax" else None
    known = {} if stats is None else {**_unfolded_ranges(gm, stats, points),
                                      **stats.outputs.get(frozenset(layers), {})}
    in_grids: dict[str, Grid] = dict(given)
    for name in input_bits:
        if name not in given and stats is not None and name in stats:
            scale, signed = stats.grid(name, input_bits[name])
            in_grids[name] = Grid(f32(scale), input_bits[name], signed)
    info = _BatchInfo()
    in_obs = {name: RangeObserver(info, cfg.histogram_bins) for name in input_bits
              if name not in in_grids}
    out_obs = {
        p.end: RangeObserver(info, cfg.histogram_bins) for p in points
        if p.consumer is None and p.end not in known
    }
    phases = (2 if cfg.calibration in ("percentile", "mse") else 1) if in_obs or out_obs else 0
    if phases:  # else ``gm`` is left as it is (no observer, no code regenerated)
        insert_after(gm, out_obs, "obs_out")
        insert_input_modules(gm, [layers[n] for n in in_obs], in_obs, "obs_in")
        gm.to(device)
    fixed = batch_size is not None
    size = batch_size if fixed else cfg.batch_size
    n_batches = max(1, math.ceil(len(data) / size))
    for phase in range(phases):
        for obs in [*in_obs.values(), *out_obs.values()]:
            obs.phase = phase
        with torch.no_grad():
            for i, batch in enumerate(data.batches(size, fixed=fixed)):
                first = batch.args[0] if batch.args else next(iter(batch.kwargs.values()))
                info.full, info.valid = int(first.shape[0]), batch.size
                run_batch(gm, batch.to(device))
                if progress is not None:
                    progress("calibrate", (phase * n_batches + i + 1) / (phases * n_batches))
    for name, obs in in_obs.items():
        amin, amax = obs.value_range(cfg.calibration, cfg.percentile, input_bits[name])
        scale, signed = activation_scale(amin, amax, input_bits[name])
        in_grids[name] = Grid(f32(scale), input_bits[name], signed)
    out_grids: dict[str, Grid] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for p in points:
        if p.consumer is None:
            bits = cfg.final_bits if p.final else cfg.out_bits
            amin, amax = known[p.end] if p.end in known else \
                out_obs[p.end].value_range(cfg.calibration, cfg.percentile, bits)
            ranges[p.end] = (amin, amax)
            scale, signed = activation_scale(amin, amax, bits)
            out_grids[p.node] = Grid(f32(scale), bits, signed)
    return in_grids, out_grids, ranges
