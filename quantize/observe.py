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

A job measures them once (``sensitivity.measure`` returns them in
``SensitivityResult.activations``) and hands them to the other stages; each entry point also
measures them itself when called without them. Memory: one no-grad forward of ``batch_size``
samples at a time; the statistics are a few numbers per layer.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from solver.errors import BadCalibrationError

from .data import CalibrationSet
from .graph import GraphLayer, insert_input_modules
from .primitives import activation_scale

VERSION = 1
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
class ActivationStats:
    """``InputStats`` per layer name, measured on ``samples`` samples."""

    layers: dict[str, InputStats] = field(default_factory=dict)
    samples: int = 0
    version: int = VERSION

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
                "layers": {n: s.to_dict() for n, s in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationStats:
        if d.get("version") != VERSION:
            raise ValueError(f"unsupported activation statistics version {d.get('version')!r}")
        return cls({n: InputStats.from_dict(s) for n, s in d["layers"].items()},
                   int(d["samples"]))


class _Probe(nn.Module):
    """Passes its input through and keeps its running min / max / count."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.full: int | None = None  # rows of the current batch, padding included
        self.valid: int | None = None  # real rows of the current batch
        self.lo, self.hi, self.numel = math.inf, -math.inf, 0
        self.shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach()
        if self.valid is not None and v.dim() and v.shape[0] == self.full:
            v = v[: self.valid]  # a batch-leading tensor: drop the padding rows
        if v.numel() == 0:
            return x
        if not bool(torch.isfinite(v).all()):
            raise BadCalibrationError(
                f"the input of layer {self.name!r} has NaN/inf values on the calibration data"
            )
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))
        self.numel += v.numel()
        self.shape = tuple(v.shape[1:])
        return x

    def stats(self) -> InputStats:
        return InputStats(self.lo, self.hi, self.numel, self.shape)


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
) -> ActivationStats:
    """Input statistics of every layer in ``layers`` over all samples of ``data``.

    ``module`` is left unchanged (the probes go on a graph copy that shares its parameters when
    they are on ``device``); ``batch_size`` samples per forward, padded to it when ``fixed``
    (the program's fixed export batch). ``progress(stage, fraction)`` once a batch. Raises
    BadCalibrationError when a layer input is NaN/inf.
    """
    device = torch.device(device)
    probes = {layer.name: _Probe(layer.name) for layer in layers}
    gm = insert_input_modules(graph_copy(module, device), list(layers), probes, "observe")
    planned = max(1, math.ceil(len(data) / batch_size))
    for i, batch in enumerate(data.batches(batch_size, fixed=fixed)):
        b = batch.to(device)
        first = b.args[0] if b.args else next(iter(b.kwargs.values()))
        for p in probes.values():
            p.full, p.valid = int(first.shape[0]), b.size
        gm(*b.args, **b.kwargs)
        if progress is not None:
            progress(stage, (i + 1) / planned)
    return ActivationStats({n: p.stats() for n, p in probes.items()}, len(data))


__all__ = ["ActivationStats", "InputStats", "graph_copy", "observe"]
