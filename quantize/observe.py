"""Activation statistics: each quantizable layer's input range, measured once in one pass.

``observe(module, layers, data, batch_size)`` streams ``data`` through a copy of the module's
graph with a probe on the input of every listed layer and returns ``ActivationStats``: per layer
the min / max over every real sample (padding rows of fixed-size batches dropped), the element
count and the per-sample shape. These are the numbers every stage derives its activation grid
from, ``ActivationStats.grid(name, bits) = activation_scale(lo, hi, bits)``:

- ``sensitivity.engine``: the per-tensor quantizer of the activation Omega;
- ``sensitivity.measured``: the input quantizer of the measured activation Omega;
- ``sensitivity.regions``: the INT8 grid of the DRQ statistics (stored in the plan row);
- ``quantize.calibrate``: the input grid of each quantized layer (``minmax`` calibration).

The same pass also sums each layer's input per weight tap (``InputSums``: for a conv, the input
summed over samples and output positions at each (input channel, kernel offset) a weight
touches, padding zeros included; for a linear layer, summed over every row), so the mean output
of the layer's op with any weight, ``E[op(x, D)]``, is ``InputSums.mean_output(D)`` without a
pass (the op is linear in ``x``): ``quantize.biascorr``'s ``weight`` correction of any plan.
Their size is the weight's input side (``C_in x kernel`` float64 per layer: 0.25 / 0.44 /
0.59 MB for ResNet-18 / ResNet-50 / MobileNetV2), in ``to_dict`` as base64 (exact), so a
cached sensitivity result hands them to a re-plan too.

The same pass also takes the min / max of every value that can be a free point of the quantize
stage (``quantize.points.point_ends``: a layer output, residual add or pool whose grid is not a
layer input grid), on the unfolded model: ``ActivationStats.points``, keyed by the chain-end
node's name on the BN-folded graph. A folded conv returns what conv + BN returned (up to float
rounding), so ``quantize.calibrate`` takes a free point's grid from there, and the quantize
stage's ``minmax`` calibration needs no pass of its own. A point end that is a layer's input
(most of them) is not observed twice: its range is that layer's.

``ActivationStats.outputs`` (in memory only) keeps what ``quantize.apply`` measured on the
BN-folded float model for points not in ``points`` (none on the zoo's models), per set of
quantized layers (the folded graph depends on it), so the next plan of the same job (a Pareto
point) calibrates without a pass.

A job measures them once (``sensitivity.measure`` returns them in
``SensitivityResult.activations``) and hands them to the other stages; each entry point also
measures them itself when called without them. Memory: one no-grad forward of ``batch_size``
samples at a time; the statistics are a few numbers per layer, plus the sums above.
"""

from __future__ import annotations

import base64
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from solver.errors import BadCalibrationError

from .data import CalibrationSet
from .graph import GraphLayer, insert_after_node, insert_input_modules
from .points import EndValue, point_ends
from .primitives import activation_scale

# 2: the layer input sums (``InputSums``); 3: the free points' ranges (``points``); 1 and 2 are
# still read (without them)
VERSION = 3
ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class InputStats:
    """One layer input over the observed samples: ``lo`` / ``hi`` (min / max; +inf / -inf when
    the layer never ran), ``numel`` (elements seen) and ``shape`` (per sample)."""

    lo: float
    hi: float
    numel: int
    shape: tuple[int, ...]

    @property
    def seen(self) -> bool:
        return self.numel > 0

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo if self.seen else None, "hi": self.hi if self.seen else None,
                "numel": self.numel, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputStats:
        seen = d.get("lo") is not None and d.get("hi") is not None
        return cls(float(d["lo"]) if seen else math.inf, float(d["hi"]) if seen else -math.inf,
                   int(d["numel"]), tuple(int(s) for s in d["shape"]))


@dataclass(frozen=True)
class InputSums:
    """A layer's input summed per weight tap over ``count`` output elements per channel.

    ``total``: float64, ``[groups, C_in / groups, *kernel]`` for a conv (the input value each
    weight element multiplies, summed over samples and output positions), ``[D]`` for a linear
    layer (summed over samples and tokens); ``count``: samples x output positions (rows for
    a linear layer)."""

    total: torch.Tensor
    count: int

    def mean_output(self, weight: torch.Tensor) -> torch.Tensor:
        """``E[op(x, weight)]`` per output channel (float64 ``[out]``, no bias), the mean over
        the summed samples and positions; ``weight`` in the layer's own shape."""
        w = weight.to(torch.float64)
        if self.total.dim() == 1:  # linear
            return (w @ self.total.to(w.device)) / max(self.count, 1)
        groups = self.total.shape[0]  # output channel o reads the taps of group o // (out/g)
        taps = self.total.to(w.device).reshape(groups, -1, 1)
        per_group = w.reshape(groups, w.shape[0] // groups, -1)
        return torch.bmm(per_group, taps).reshape(-1) / max(self.count, 1)

    @property
    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()

    def to_dict(self) -> dict[str, Any]:
        """JSON: the float64 sums exactly, as base64 of their little-endian bytes."""
        data = self.total.detach().cpu().to(torch.float64).contiguous().numpy().astype("<f8")
        return {"count": self.count, "shape": list(self.total.shape),
                "float64": base64.b64encode(data.tobytes()).decode("ascii")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSums:
        raw = np.frombuffer(base64.b64decode(d["float64"]), dtype="<f8")
        shape = tuple(int(s) for s in d["shape"])
        if raw.size != math.prod(shape):
            raise ValueError(f"input sums of {raw.size} values for shape {shape}")
        return cls(torch.from_numpy(raw.astype(np.float64)).reshape(shape), int(d["count"]))


def _pads(layer: GraphLayer, kernel: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dim, as torch's conv pads (``"same"``: the
    total ``d (k - 1)`` split with the odd one after)."""
    nd = len(kernel)
    dil = tuple(layer.dilation) or (1,) * nd
    if layer.padding == "valid":
        return [(0, 0)] * nd
    if layer.padding == "same":
        total = [d * (k - 1) for d, k in zip(dil, kernel, strict=True)]
        return [(t // 2, t - t // 2) for t in total]
    pad = tuple(layer.padding) or (0,) * nd
    return [(p, p) for p in pad]


def tap_sums(layer: GraphLayer, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``InputSums.total``, ``count``) of the batch ``x`` (real rows only) for ``layer``: the
    batch summed first (the op is linear; in the input's dtype, a cascade sum over the rows of
    one batch, then float64), then per tap the summed image's padded values at the positions
    that tap reads (one strided slice per kernel offset: ``start = offset x dilation``, step
    the stride, one per output position)."""
    v = x.detach()
    if layer.kind == "linear":
        rows = v.reshape(-1, v.shape[-1])
        return rows.sum(0).to(torch.float64).cpu(), rows.shape[0]
    if layer.kind not in ("conv1d", "conv2d"):
        raise ValueError(f"no tap sums for a {layer.kind} layer")
    kernel = tuple(int(k) for k in layer.weight_shape[2:])
    nd = len(kernel)
    stride = tuple(layer.stride) or (1,) * nd
    dil = tuple(layer.dilation) or (1,) * nd
    summed = v.sum(0).to(torch.float64)  # [C, *spatial]
    pads = _pads(layer, kernel)
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad: last dim first
    padded = nn.functional.pad(summed, flat) if any(flat) else summed
    out = [(padded.shape[1 + i] - dil[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i in range(nd)]
    if min(out) < 1:
        raise ValueError(f"layer {layer.name!r}: input {tuple(v.shape)} is smaller than its "
                         f"kernel {kernel}")
    total = summed.new_empty((summed.shape[0], *kernel))
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                       for o, d, s, n in zip(offset, dil, stride, out, strict=True))
        total[(slice(None), *offset)] = padded[(slice(None), *window)].sum(
            dim=tuple(range(1, nd + 1)))
    groups = int(layer.groups)
    return (total.reshape(groups, summed.shape[0] // groups, *kernel).cpu(),
            v.shape[0] * math.prod(out))


@dataclass(frozen=True)
class ActivationStats:
    """``InputStats`` per layer name, measured on ``samples`` samples; ``sums``: the layers'
    ``InputSums``; ``points``: ``InputStats`` of each possible free point's value, by its
    chain-end node on the BN-folded graph (``quantize.points.point_ends``); ``outputs``: per
    frozenset of quantized layer names, the (min, max) of each free point's end node in the
    BN-folded float model (minmax calibration, ``quantize.calibrate``; in memory only)."""

    layers: dict[str, InputStats] = field(default_factory=dict)
    samples: int = 0
    version: int = VERSION
    sums: dict[str, InputSums] = field(default_factory=dict, repr=False, compare=False)
    points: dict[str, InputStats] = field(default_factory=dict, repr=False, compare=False)
    outputs: dict[frozenset[str], dict[str, tuple[float, float]]] = field(
        default_factory=dict, repr=False, compare=False)

    def with_outputs(self, layers: frozenset[str],
                     ranges: Mapping[str, tuple[float, float]]) -> ActivationStats:
        """These statistics with the free-point ranges of quantized layer set ``layers``."""
        return replace(self, outputs={**self.outputs, layers: dict(ranges)})

    @property
    def sums_bytes(self) -> int:
        """Bytes held by ``sums`` (counted in memory estimates)."""
        return sum(s.nbytes for s in self.sums.values())

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> InputStats:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no activation statistics for layer {name!r}") from None

    def grid(self, name: str, bits: int) -> tuple[float, bool]:
        """(scale, signed) of layer ``name``'s input at ``bits`` (``activation_scale``).
        Raises BadCalibrationError when the layer never ran on the observed samples."""
        s = self[name]
        if not s.seen:
            raise BadCalibrationError(
                f"layer {name!r} never ran on the calibration data; is it reachable?"
            )
        return activation_scale(s.lo, s.hi, bits)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "samples": self.samples,
                "layers": {n: s.to_dict() for n, s in self.layers.items()},
                "sums": {n: s.to_dict() for n, s in self.sums.items()},
                "points": {n: s.to_dict() for n, s in self.points.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationStats:
        if d.get("version") not in (1, 2, VERSION):  # 1: without the sums, 2: the points
            raise ValueError(f"unsupported activation statistics version {d.get('version')!r}")
        return cls({n: InputStats.from_dict(s) for n, s in d["layers"].items()},
                   int(d["samples"]),
                   sums={n: InputSums.from_dict(s) for n, s in d.get("sums", {}).items()},
                   points={n: InputStats.from_dict(s) for n, s in d.get("points", {}).items()})


class _Probe(nn.Module):
    """Passes its input through and keeps its running min / max / count (and, with a layer,
    its ``InputSums``)."""

    def __init__(self, name: str, layer: GraphLayer | None = None, strict: bool = True) -> None:
        super().__init__()
        self.name = name
        self.layer = layer
        self.strict = strict  # else NaN/inf marks the statistics unusable (``bad``)
        self.bad = False
        self.total: torch.Tensor | None = None
        self.count = 0
        self.full: int | None = None  # rows of the current batch, padding included
        self.valid: int | None = None  # real rows of the current batch
        self.lo, self.hi, self.numel = math.inf, -math.inf, 0
        self.shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach()
        if self.valid is not None and v.dim() and v.shape[0] == self.full:
            v = v[: self.valid]  # a batch-leading tensor: drop the padding rows
        if v.numel() == 0 or self.bad:
            return x
        lo, hi = (float(t) for t in torch.aminmax(v))  # one pass; NaN propagates to both
        if not (math.isfinite(lo) and math.isfinite(hi)):
            if not self.strict:  # e.g. an attention mask's add: never a point in use
                self.bad = True
                return x
            raise BadCalibrationError(
                f"the input of layer {self.name!r} has NaN/inf values on the calibration data"
            )
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.numel += v.numel()
        self.shape = tuple(v.shape[1:])
        if self.layer is not None:
            total, count = tap_sums(self.layer, v)
            self.total = total if self.total is None else self.total + total
            self.count += count
        return x

    def stats(self) -> InputStats:
        return InputStats(self.lo, self.hi, self.numel, self.shape)

    def sums(self) -> InputSums | None:
        return None if self.total is None else InputSums(self.total, self.count)


def graph_copy(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A GraphModule with a copied graph on ``device``. It shares the parameters when they are
    on ``device`` already (no weight copy); otherwise the weights are copied, because moving
    shared parameters would move the caller's module too."""
    on_device = all(t.device == device for t in [*gm.parameters(), *gm.buffers()])
    with warnings.catch_warnings():
        # torch's own pytree spec copy warns about a deprecated isinstance check.
        warnings.simplefilter("ignore", FutureWarning)
        if on_device:
            return fx.GraphModule(gm, copy.deepcopy(gm.graph))
        return copy.deepcopy(gm).to(device)


@torch.no_grad()
def observe(
    module: fx.GraphModule,
    layers: Sequence[GraphLayer],
    data: CalibrationSet,
    batch_size: int,
    fixed: bool = False,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    stage: str = "observe",
    sums: bool = True,
    ends: Mapping[str, EndValue] | None = None,
) -> ActivationStats:
    """Input statistics of every layer in ``layers`` over all samples of ``data`` (with
    ``sums``, also their ``InputSums``), and of every possible free point (``ends``, by
    default ``quantize.points.point_ends(module, layers)``; give them when ``module`` carries
    inserted modules of its own, from the clean graph it was copied from: node names are kept).

    ``module`` is left unchanged (the probes go on a graph copy that shares its parameters when
    they are on ``device``); ``batch_size`` samples per forward, padded to it when ``fixed``
    (the program's fixed export batch). ``progress(stage, fraction)`` once a batch. Raises
    BadCalibrationError when a layer input (or a point) is NaN/inf.
    """
    device = torch.device(device)
    probes = {layer.name: _Probe(layer.name, layer if sums else None) for layer in layers}
    gm = insert_input_modules(graph_copy(module, device), list(layers), probes, "observe")
    if ends is None:
        ends = point_ends(module, layers)
    names = {n.name for n in gm.graph.nodes}
    own = {e.node for e in ends.values() if e.input_of not in probes and e.node in names}
    end_probes = {node: _Probe(node, strict=False) for node in sorted(own)}
    for i, (node, probe) in enumerate(end_probes.items()):
        insert_after_node(gm, node, probe, f"_bitplan_observe_point_{i}")
    if end_probes:
        gm.graph.lint()
        gm.recompile()
    every = [*probes.values(), *end_probes.values()]
    planned = max(1, math.ceil(len(data) / batch_size))
    for i, batch in enumerate(data.batches(batch_size, fixed=fixed)):
        b = batch.to(device)
        first = b.args[0] if b.args else next(iter(b.kwargs.values()))
        for p in every:
            p.full, p.valid = int(first.shape[0]), b.size
        gm(*b.args, **b.kwargs)
        if progress is not None:
            progress(stage, (i + 1) / planned)
    found = {n: p.sums() for n, p in probes.items()}
    points = {}
    for key, e in ends.items():
        probe = probes.get(e.input_of or "") or end_probes.get(e.node)
        if probe is not None and probe.numel and not probe.bad:
            points[key] = probe.stats()
    return ActivationStats({n: p.stats() for n, p in probes.items()}, len(data),
                           sums={n: s for n, s in found.items() if s is not None},
                           points=points)


__all__ = ["ActivationStats", "InputStats", "InputSums", "graph_copy", "observe", "tap_sums"]
