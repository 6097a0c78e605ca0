"""Integer-only reference executor for a quantized checkpoint.

It interprets the BN-folded graph with integer tensors only: the float model input is
quantized once onto the first layer's input grid, then every value is a tensor of integer codes
on a known grid (``quantize.points``):

- conv / linear: int32 accumulation of int codes (computed exactly in int64 and checked to fit
  int32), ``+ bias_q``, then the per-channel dyadic requantisation ``(acc * b + 2^(c-1)) >> c``
  (round half up, ``quantize.primitives.dyadic_requantize``) and a clamp to the output grid;
- conv / linear with per-group weight scales (``group_size`` rows): one int32 accumulator per
  group of ``group_size`` consecutive inputs, then all groups of an output rescaled in one
  wider fixed point: ``(sum_g acc_g b[o, g] + bias_q max_g b[o, g] + 2^(c-1)) >> c[o]`` in
  int64 (one shift per output channel, multipliers bounded so the sum fits), one rounding;
- ReLU: ``max(q, 0)``; flatten / view / reshape act on the codes;
- residual add: both inputs requantised with their own dyadic multiplier ``S_x / S_add`` onto
  the add's grid, summed, clamped (two requantisations);
- global average pool (``mean``): an integer sum, then one dyadic rescale
  ``S_x / (count * S_next)`` onto the next grid;
- a layer whose input sits on another grid (two consumers with different bits) requantises it
  with the dyadic ``S_x / S_in``;
- DRQ conv (``quantize.drq``): the region mask from the INT8 input codes (integer sums against
  ``threshold * count``), the input also on the low-bit grid of the same range, one integer
  convolution per precision (W and W_low, the latter derived once at load as the fake-quant
  module derives it), and both accumulators rescaled onto the output grid with one common
  shift: ``((acc_8 + bias_q) b_8 + acc_4 b_4 + 2^(c-1)) >> c``.

Supported are the graphs of the reference models (``sensitivity.zoo`` DigitsMLP, DigitsCNN,
DigitsResNet) and anything built from the same ops; anything else raises UnsupportedOpError
naming the op. Dyadic constants are derived from the checkpoint's float32 scales when the
executor is built (once), never during inference.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

from solver.errors import BadModelError

from .checkpoint import Checkpoint, read_checkpoint
from .drq import low_scale, region_mask, upsample_mask
from .fakequant import prepare
from .graph import GraphLayer
from .points import RELU_OPS, TRANSPARENT_OPS, Grid, Point
from .primitives import (
    dyadic,
    dyadic_group_requantize,
    dyadic_requantize,
    quantize_activation,
)
from .rows import PlanRow

aten = torch.ops.aten

_INT32 = (-(2**31), 2**31 - 1)
_LAYOUT_OPS = TRANSPARENT_OPS - RELU_OPS


class UnsupportedOpError(BadModelError):
    """The integer reference cannot execute an op of the model's graph."""


@dataclass(frozen=True)
class QTensor:
    """Integer codes (int32) on a per-tensor grid: value = codes * grid.scale."""

    codes: torch.Tensor
    grid: Grid

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(torch.float64) * self.grid.scale


def _dyadic_tensor(m: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = dyadic(m)
    return torch.tensor(b, dtype=torch.int64), torch.tensor(c, dtype=torch.int64)


def requantize(q: QTensor, grid: Grid) -> torch.Tensor:
    """Codes of ``q`` moved onto ``grid`` (dyadic rescale when the scales differ; no clamp)."""
    if q.grid.scale == grid.scale:
        return q.codes
    b, c = _dyadic_tensor(q.grid.scale / grid.scale)
    return dyadic_requantize(q.codes, b, c).to(torch.int64)


def clamp(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    lo, hi = grid.qrange
    return codes.clamp(lo, hi).to(torch.int32)


def _check_int32(acc: torch.Tensor, what: str) -> None:
    if acc.numel() and (int(acc.min()) < _INT32[0] or int(acc.max()) > _INT32[1]):
        raise UnsupportedOpError(f"{what}: the accumulator overflows int32")


def _columns(
    x: torch.Tensor,
    w_shape: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """im2col of int codes for a 1-D or 2-D convolution: int64 ``[N, C, Ho, Wo, kh, kw]``
    (``Ho = 1`` for 1-D)."""
    if len(w_shape) == 3:
        x, w_shape = x.unsqueeze(2), (*w_shape[:2], 1, w_shape[2])
        stride, dilation = (1, *stride), (1, *dilation)
        if not isinstance(padding, str):
            padding = (0, *padding)
    kh, kw = w_shape[2], w_shape[3]
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            raise UnsupportedOpError(f"convolution padding mode {padding!r}")
    else:
        pads = (padding[1], padding[1], padding[0], padding[0])
    x = F.pad(x.to(torch.int64), pads)
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    cols = x.unfold(2, span_h, stride[0]).unfold(3, span_w, stride[1])
    return cols[..., :: dilation[0], :: dilation[1]]  # [N, C, Ho, Wo, kh, kw]


def int_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """Exact integer convolution (1-D or 2-D) of int codes; returns int64 ``[N, O, ...]``."""
    cols = _columns(x, tuple(w.shape), stride, padding, dilation)
    n, c, ho, wo, kh, kw = cols.shape
    o = w.shape[0]
    cols = cols.reshape(n, groups, c // groups, ho, wo, kh, kw)
    wg = w.to(torch.int64).reshape(groups, o // groups, c // groups, kh, kw)
    acc = torch.einsum("ngchwij,gocij->ngohw", cols, wg).reshape(n, o, ho, wo)
    return acc.squeeze(2) if w.dim() == 3 else acc


def int_group_sums(
    x: torch.Tensor,
    w: torch.Tensor,
    group_size: int,
    conv: tuple | None = None,
) -> torch.Tensor:
    """Exact per-group integer dot products of a linear (``conv=None``) or convolution
    (``conv = (stride, padding, dilation, groups)``) layer, groups of ``group_size``
    consecutive inputs along the flattened fan-in (``in/groups * kh * kw``, the weight's
    memory order). Returns int64 ``[..., O, G]`` for linear, ``[N, O, G, ...]`` for conv."""
    o = w.shape[0]
    fan_in = w[0].numel()
    n_groups = fan_in // group_size
    wg = w.to(torch.int64).reshape(o, n_groups, group_size)
    if conv is None:
        xg = x.to(torch.int64).reshape(*x.shape[:-1], n_groups, group_size)
        return torch.einsum("...gk,ogk->...og", xg, wg)
    stride, padding, dilation, groups = conv
    cols = _columns(x, tuple(w.shape), stride, padding, dilation)
    n, c, ho, wo, kh, kw = cols.shape
    cols = cols.reshape(n, groups, c // groups, ho, wo, kh, kw).permute(0, 1, 3, 4, 2, 5, 6)
    cols = cols.reshape(n, groups, ho, wo, n_groups, group_size)
    wg = wg.reshape(groups, o // groups, n_groups, group_size)
    acc = torch.einsum("nthwgk,togk->ntoghw", cols, wg).reshape(n, o, n_groups, ho, wo)
    return acc.squeeze(3) if w.dim() == 3 else acc


@dataclass(frozen=True)
class _DRQLayer:
    """What a DRQ conv needs beyond its INT8 weights, derived once from the checkpoint."""

    region: tuple[int, int]
    threshold: int
    low: Grid  # the low-bit input grid (same range as the INT8 input grid)
    weight_low: torch.Tensor  # int codes at min(w_bits, low_bits)
    b_high: torch.Tensor  # int64 [1, out, 1, 1]: S_w S_in / S_out = b_high / 2^shift
    b_low: torch.Tensor  # int64 [1, out, 1, 1]: S_w_low S_low / S_out = b_low / 2^shift
    shift: int


def _drq_layer(ckpt: Checkpoint, name: str, row: PlanRow) -> _DRQLayer:
    assert row.drq is not None
    g_in, g_out = ckpt.input_grid(name), ckpt.output_grid(name)
    high, low_bits = row.drq.high_bits, row.drq.low_bits
    low = Grid(low_scale(g_in.scale, g_in.signed, high, low_bits), low_bits, g_in.signed)
    # W_low as the fake-quant DRQ conv derives it (the dequantized weight rounded per channel
    # at min(w_bits, low_bits) on the stored drq_low_scale): computed once, not in inference.
    weight_low, s_w_low = ckpt.low_weight(name)
    m_high = ckpt.tensors[f"{name}.weight_scale"].to(torch.float64) * g_in.scale / g_out.scale
    m_low = s_w_low.to(torch.float64) * low.scale / g_out.scale
    # one shift for both terms: the largest at which every multiplier fits 30 bits, so that
    # (int32 accumulator) x b stays below 2^61 and the sum of two below 2^63
    _, shift = dyadic(float(torch.cat([m_high, m_low]).abs().max()), max_bits=30)
    return _DRQLayer(
        row.drq.region, row.drq.threshold, low, weight_low,
        torch.round(m_high * 2**shift).to(torch.int64).reshape(1, -1, 1, 1),
        torch.round(m_low * 2**shift).to(torch.int64).reshape(1, -1, 1, 1),
        shift,
    )


class IntegerExecutor:
    """Runs a checkpoint on integer tensors. ``forward(*inputs) -> QTensor`` (the model output).

    Raises UnsupportedOpError for an op (or a float layer) it cannot run on integers.
    """

    def __init__(self, program: torch.export.ExportedProgram, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.gm, qlayers, rows = prepare(program, ckpt)
        self.layers = {layer.node: layer for layer in qlayers.values()}
        self.points: dict[str, tuple[Point, Grid]] = {p.node: (p, g) for p, g in ckpt.points()}
        self.weights = {name: ckpt.codes(name) for name in qlayers}
        self.rows = rows
        self.drq = {name: _drq_layer(ckpt, name, row) for name, row in rows.items()
                    if row.drq is not None}

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, program: torch.export.ExportedProgram
    ) -> IntegerExecutor:
        return cls(program, read_checkpoint(path))

    def _layer(self, node: fx.Node, x: object) -> QTensor:
        layer = self.layers[node.name]
        name = layer.name
        t = self.ckpt.tensors
        g_in = self.ckpt.input_grid(name)
        if isinstance(x, QTensor):
            codes = clamp(requantize(x, g_in), g_in)
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            # The one float -> int conversion: the model input, at the graph boundary.
            codes = quantize_activation(x, g_in.scale, g_in.bits, g_in.signed).to(torch.int32)
        else:
            raise UnsupportedOpError(f"layer {name!r} reads a value the integer model lacks")
        w = self.weights[name]
        if name in self.drq:
            return self._drq(layer, x, codes, w)
        row = self.rows[name]
        if row.group_size is not None:
            return self._grouped(layer, codes, w, row.group_size)
        if layer.kind == "linear":
            acc = torch.matmul(codes.to(torch.int64), w.to(torch.int64).t())
            ch_dim = acc.dim() - 1
        else:
            acc = int_conv(codes, w, layer.stride, layer.padding, layer.dilation, layer.groups)
            ch_dim = 1
        _check_int32(acc, f"layer {name!r}")
        shape = [1] * acc.dim()
        shape[ch_dim] = -1
        acc = acc + t[f"{name}.bias_q"].to(torch.int64).reshape(shape)
        _check_int32(acc, f"layer {name!r} (with bias)")
        b = t[f"{name}.requant_b"].to(torch.int64).reshape(shape)
        c = t[f"{name}.requant_c"].to(torch.int64).reshape(shape)
        g_out = self.ckpt.output_grid(name)
        return QTensor(clamp(dyadic_requantize(acc, b, c), g_out), g_out)

    def _grouped(self, layer: GraphLayer, codes: torch.Tensor, w: torch.Tensor,
                 group_size: int) -> QTensor:
        """Per-group weight scales: one exact integer dot product per group (each checked to
        fit int32), then every group's sum times its multiplier ``b[o, g]`` and the bias times
        ``max_g b[o, g]`` added in one int64 fixed point of ``2^-c[o]``, rounded once
        (``quantize.primitives.dyadic_group_requantize``)."""
        name = layer.name
        t = self.ckpt.tensors
        conv = None if layer.kind == "linear" else (
            layer.stride, layer.padding, layer.dilation, layer.groups)
        acc = int_group_sums(codes, w, group_size, conv)
        _check_int32(acc, f"layer {name!r} (a group)")
        if conv is not None:  # [N, O, G, ...] -> [N, ..., O, G]
            acc = acc.movedim((1, 2), (-2, -1))
        out = dyadic_group_requantize(acc, t[f"{name}.requant_b"], t[f"{name}.requant_c"],
                                      t[f"{name}.bias_q"])
        if conv is not None:
            out = out.movedim(-1, 1)
        g_out = self.ckpt.output_grid(name)
        return QTensor(clamp(out, g_out), g_out)

    def _drq(self, layer: GraphLayer, x: object, codes: torch.Tensor,
             w: torch.Tensor) -> QTensor:
        """A DRQ conv: sensitive regions (``quantize.drq.region_mask`` on the INT8 codes) with
        the INT8 input and W, the rest with the low-bit input and W_low, both accumulators
        scaled onto the output grid with one shift, so the output is rounded once."""
        name = layer.name
        d = self.drq[name]
        if isinstance(x, QTensor):  # from the source grid directly, as the fake-quant conv does
            low = clamp(requantize(x, d.low), d.low)
        else:
            low = quantize_activation(x, d.low.scale, d.low.bits, d.low.signed).to(torch.int32)
        mask = region_mask(codes, d.region, d.threshold)
        m = upsample_mask(mask, d.region, codes.shape[-2], codes.shape[-1]).to(torch.int64)
        conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
        acc_high = int_conv(codes.to(torch.int64) * m, w, *conv)
        acc_low = int_conv(low.to(torch.int64) * (1 - m), d.weight_low, *conv)
        _check_int32(acc_high, f"DRQ layer {name!r} (INT8 regions)")
        _check_int32(acc_low, f"DRQ layer {name!r} (low-bit regions)")
        bias = self.ckpt.tensors[f"{name}.bias_q"].to(torch.int64).reshape(1, -1, 1, 1)
        acc = (acc_high + bias) * d.b_high + acc_low * d.b_low
        out = (acc + (1 << (d.shift - 1) if d.shift else 0)) >> d.shift
        g_out = self.ckpt.output_grid(name)
        return QTensor(clamp(out, g_out), g_out)

    def _call(self, node: fx.Node, env: dict[str, object]) -> object:
        def val(a: object) -> object:
            if isinstance(a, fx.Node):
                return env[a.name]
            if isinstance(a, (list, tuple)):
                return type(a)(val(v) for v in a)
            return a

        if node.name in self.layers:
            return self._layer(node, val(node.args[0]))
        args = [val(a) for a in node.args]
        kwargs = {k: val(v) for k, v in node.kwargs.items()}
        target = node.target
        x = args[0] if args else None
        if node.name in self.points:
            point, grid = self.points[node.name]
            if point.kind == "add":
                a, b = args
                return QTensor(clamp(requantize(a, grid) + requantize(b, grid), grid), grid)
            if point.kind == "pool":
                dims = [d % x.codes.dim() for d in args[1]]
                keep = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim", False))
                count = math.prod(x.codes.shape[d] for d in dims)
                total = x.codes.to(torch.int64).sum(dim=dims, keepdim=keep)
                b, c = _dyadic_tensor(x.grid.scale / (count * grid.scale))
                return QTensor(clamp(dyadic_requantize(total, b, c), grid), grid)
        if target in RELU_OPS and isinstance(x, QTensor):
            return QTensor(x.codes.clamp_min(0), x.grid)
        if target in _LAYOUT_OPS:
            if isinstance(x, QTensor):
                return QTensor(target(x.codes, *args[1:], **kwargs), x.grid)
            if isinstance(x, torch.Tensor):
                return target(x, *args[1:], **kwargs)  # layout only, on the raw model input
        if target is aten.sym_size.int and isinstance(x, (QTensor, torch.Tensor)):
            shape = x.codes.shape if isinstance(x, QTensor) else x.shape
            return int(shape[args[1]])
        if target is operator.getitem and isinstance(x, (tuple, list)):
            return x[args[1]]
        raise UnsupportedOpError(
            f"the integer reference does not support {target} (node {node.name!r}); "
            "only quantized conv/linear, ReLU, flatten/view, residual add and global mean are"
        )

    def forward(self, *inputs: torch.Tensor) -> QTensor:
        env: dict[str, object] = {}
        feed = iter(inputs)
        out = None
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    try:
                        env[node.name] = next(feed)
                    except StopIteration:
                        raise UnsupportedOpError("too few inputs for the model") from None
                elif node.op == "get_attr":
                    env[node.name] = None  # weights come from the checkpoint
                elif node.op == "call_module":
                    if not str(node.target).startswith("_guards"):
                        raise UnsupportedOpError(f"module call {node.target!r} is not supported")
                    env[node.name] = None
                elif node.op == "call_function":
                    env[node.name] = self._call(node, env)
                elif node.op == "output":
                    res = node.args[0]
                    res = res[0] if isinstance(res, (tuple, list)) else res
                    out = env[res.name]
        if not isinstance(out, QTensor):
            raise UnsupportedOpError("the model output is not produced by a quantized op")
        return out

    __call__ = forward

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The dequantized model output (float32)."""
        return self.forward(*inputs).dequantize().to(torch.float32)
