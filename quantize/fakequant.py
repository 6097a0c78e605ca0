"""The runnable fake-quant module rebuilt from a checkpoint and the exported program.

It computes in floating point but rounds at exactly the points the integer model materialises
tensors (``quantize.points``), with the checkpoint's scales and the same dyadic arithmetic, so
that it reproduces the integer reference (``quantize.integer``) code for code:

- each quantized layer: BN node removed, weight = codes * S_w, bias = bias_q * S_w * S_in (the
  bias the integer model adds, so its rounding is simulated too), input fake-quantized on its
  input grid (``FakeQuant``; a ``Requant`` when it arrives on another grid); the output is
  rounded onto the accumulator grid S_w * S_in and requantised with the checkpoint's
  ``requant_b`` / ``requant_c`` (round half up), then clamped to the output grid (``Requant``);
- residual adds: each input requantised onto the add's grid, summed, clamped (``QuantAdd``);
- global average pools: integer sum of the input codes and one dyadic rescale (``QuantMean``);
- DRQ rows: the op becomes ``quantize.drq.DRQConv2d`` (folded float bias, dequantized weight),
  its float output rounded onto the output grid;
- rows with per-group weight scales: the op becomes ``GroupedLayer``, which computes each
  group's dot product of integer codes exactly (float64), combines them with the checkpoint's
  per-group multipliers ``requant_b[o, g] / 2^requant_c[o]`` in one int64 fixed point and
  rounds once, as the integer model does (a float accumulator of the whole fan-in is on no
  single grid, so its codes could not be recovered by rounding).

Rounding a float value back to integer codes is exact while its accumulated float error stays
below half a step (float32 conv accumulators below about 2^22 units; the reference models are
far below). The dyadic products run in float64, exact while ``|codes * b| < 2^53``.

The elementwise chains (``Requant``, ``QuantAdd``, ``FakeQuant``) run block by block
(``TEAM_BLOCK`` or ``INLINE_BLOCK`` elements, in place on one float64 copy of the block): the
same torch operations in the same order on each element as the whole-tensor formulas
(``codes_of``, ``dyadic_round``, ``fake_quantize_activation``), so the outputs are
bit-identical to them, without a dozen full-size temporaries that each go through memory
once. The multiplier is applied as
``codes * (b / 2^c)``: ``b / 2^c`` is exact in float64 (|b| < 2^31, c <= 31) and scaling by a
power of two commutes with rounding, so ``fl(codes * b) / 2^c == fl(codes * (b / 2^c))``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from solver.errors import BadCheckpointError, BadModelError

from .calibrate import insert_after
from .checkpoint import Checkpoint
from .fold import remove_bn, set_layer_params
from .graph import (
    GraphLayer,
    find_layers,
    insert_input_modules,
    module_name,
    node_by_name,
    program_module,
)
from .points import TRANSPARENT_OPS, Grid
from .primitives import (
    activation_qrange,
    dyadic,
    expand_scales,
    fake_quantize_activation,
    round_shift,
)
from .rows import PlanRow, match_rows

# Elements a fused chain works on at once, so its ~10 in-place passes stay in cache instead of
# streaming full-size tensors through memory. TEAM_BLOCK (512 KiB in float64): each op runs on
# torch's thread team (bench/fakequant.py: 3.1x the whole-tensor formulas idle). INLINE_BLOCK:
# below torch's intra-op grain (32768), each op runs on the calling thread: on an oversubscribed
# machine a descheduled team thread stalls every op (load ~10 on 2 cores: TEAM_BLOCK 0.38x the
# whole-tensor formulas, INLINE_BLOCK 1.7-2.3x; load 3: TEAM_BLOCK 2.2x faster than INLINE).
TEAM_BLOCK = 1 << 16
INLINE_BLOCK = 1 << 14
OVERSUBSCRIBED = 2.0  # 1-minute load average per core above which INLINE_BLOCK is used
BLOCK: int | None = None  # a fixed block size (tests), else chosen per call by _block_size


def _block_size() -> int:
    if BLOCK:
        return BLOCK
    try:
        busy = os.getloadavg()[0] > OVERSUBSCRIBED * (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average on this platform
        busy = False
    return INLINE_BLOCK if busy or torch.get_num_threads() <= 1 else TEAM_BLOCK


def _as3d(x: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """``x`` (contiguous) as ``[outer, channels, inner]`` around ``channel_dim`` (None: one
    channel)."""
    if channel_dim is None or x.dim() == 0:
        return x.reshape(1, 1, -1)
    d = channel_dim % x.dim()
    return x.reshape(math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:]))


_NHWC = (0, 2, 3, 1)  # a channels-last 4-D tensor's dims in memory order


def _channels_last(x: torch.Tensor) -> bool:
    """Stored channels-last and not also plain contiguous (e.g. 1x1 maps are both)."""
    return x.dim() == 4 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last)


def _dense(x: torch.Tensor, channel_dim: int | None = None
           ) -> tuple[torch.Tensor, int | None, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` (detached) as a contiguous tensor in its own memory order, ``channel_dim``'s
    place in it, and the inverse for a result of that shape: a channels-last 4-D tensor is
    viewed as NHWC (no copy) and the result viewed back as channels-last NCHW, so the chains
    keep the layout the convolutions chose (``quantize.evaluate`` runs image models
    channels-last); any other tensor is made contiguous."""
    x = x.detach()
    if _channels_last(x):
        dim = None if channel_dim is None else _NHWC.index(channel_dim % 4)
        return x.permute(*_NHWC), dim, lambda y: y.permute(0, 3, 1, 2)
    return x.contiguous(), channel_dim, lambda y: y


def _blocks(shape: tuple[int, int, int]):
    """Index tuples into an ``[outer, channels, inner]`` tensor covering it in pieces of about
    ``_block_size()`` elements (whole inner rows where they fit, whole channel planes where
    those fit)."""
    outer, channels, inner = shape
    block = _block_size()
    if inner >= block:
        for o in range(outer):
            for ch in range(channels):
                for i in range(0, inner, block):
                    yield slice(o, o + 1), slice(ch, ch + 1), slice(i, i + block)
    elif channels * inner >= block:
        step = block // inner
        for o in range(outer):
            for ch in range(0, channels, step):
                yield slice(o, o + 1), slice(ch, ch + step), slice(None)
    else:
        step = max(1, block // max(channels * inner, 1))
        for o in range(0, outer, step):
            yield slice(o, o + step), slice(None), slice(None)


def _blockwise(fn: Callable[[tuple[slice, slice, slice]], None],
               shape: tuple[int, int, int]) -> None:
    """``fn(idx)`` for every block of ``shape`` (``_blocks``), in order, without autograd."""
    with torch.no_grad():
        for idx in _blocks(shape):
            fn(idx)


def _per_channel(t: torch.Tensor | float, ch: slice) -> torch.Tensor | float:
    """A ``[C]`` parameter's view for the channels ``ch`` of a 3-d block (0-d / float as is)."""
    if not isinstance(t, torch.Tensor):
        return t
    return t[ch].reshape(1, -1, 1) if t.numel() > 1 else t.reshape(())


class FakeQuant(nn.Module):
    """Rounds its input onto a per-tensor grid (straight-through gradient)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.scale, self.bits, self.signed = grid.scale, grid.bits, grid.signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or not x.is_floating_point():
            return fake_quantize_activation(x, self.scale, self.bits, self.signed)
        # fake_quantize_activation's operations, block by block, in place
        lo, hi = activation_qrange(self.bits, self.signed)
        xd, _, back = _dense(x)
        x3 = _as3d(xd, None)
        out = torch.empty_like(x3)

        def block(idx: tuple[slice, slice, slice]) -> None:
            xs, o = x3[idx], out[idx]
            torch.div(xs, self.scale, out=o)
            o.round_().clamp_(lo, hi).mul_(self.scale).sub_(xs).add_(xs)

        _blockwise(block, tuple(x3.shape))
        return back(out.reshape(xd.shape))

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, bits={self.bits}, signed={self.signed}"


def dyadic_round(codes: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``floor(codes * b / 2^c + 1/2)`` in float64: the integer path's round-half-up
    multiply-shift, exact while ``|codes * b| < 2^53``."""
    return torch.floor(codes * b.to(torch.float64) / torch.exp2(c.to(torch.float64)) + 0.5)


def codes_of(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """The integer codes (float64) of a value on a grid of step ``scale``: exact while the
    float error of ``x`` is below half a step."""
    return torch.round(x.detach().to(torch.float64) / scale)


class Requant(nn.Module):
    """Moves a tensor from a source grid (per-tensor, or per channel for an accumulator) onto
    ``grid`` with the dyadic multiplier ``b / 2^c``, as the integer model does.

    The input's codes are recovered by rounding ``x / src_scale`` (exact while the float error
    of ``x`` is below half a source step, e.g. a float32 accumulator of < 2^22 units)."""

    def __init__(self, src_scale: torch.Tensor, b: torch.Tensor, c: torch.Tensor, grid: Grid,
                 channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("src_scale", src_scale.to(torch.float64).reshape(-1))
        self.register_buffer("b", b.to(torch.int64).reshape(-1))
        self.register_buffer("c", c.to(torch.int64).reshape(-1))
        # b / 2^c, exact in float64 (see the module docstring)
        self.register_buffer("multiplier", self.b.to(torch.float64)
                             / torch.exp2(self.c.to(torch.float64)), persistent=False)
        self.scale, self.bits, self.signed = grid.scale, grid.bits, grid.signed
        self.lo, self.hi = grid.qrange
        self.channel_dim = channel_dim

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_dim % x.dim()] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # the straight-through gradient
            with torch.no_grad():
                out = self._requant(x, ste=False)
            return x + (out - x).detach()
        return self._requant(x, ste=True)

    def _requant(self, x: torch.Tensor, ste: bool) -> torch.Tensor:
        """``(clamp(dyadic_round(codes_of(x, src), b, c)) * scale).to(x.dtype)``, block by block
        (``+ x - x`` in place when ``ste``: the forward value of ``x + (out - x)``)."""
        channels = max(self.src_scale.numel(), self.multiplier.numel())
        xd, dim, back = _dense(x, self.channel_dim if channels > 1 else None)
        x3 = _as3d(xd, dim)
        if channels > 1 and x3.shape[1] != channels:
            raise BadCheckpointError(f"a requantisation of {channels} channels got a tensor "
                                     f"of shape {tuple(x.shape)}")
        out = torch.empty_like(x3)

        def block(idx: tuple[slice, slice, slice]) -> None:
            xs, o = x3[idx], out[idx]
            # codes_of: x promoted to float64 (exactly: the divisor is a dimensioned float64
            # tensor, which sets the type) and divided, in one pass
            src = self.src_scale[idx[1]] if self.src_scale.numel() > 1 else self.src_scale
            y = torch.div(xs, src.reshape(1, -1, 1)).round_()
            y.mul_(_per_channel(self.multiplier, idx[1])).add_(0.5).floor_()  # dyadic_round
            # the grid value in float64, stored as x's dtype in the same pass
            torch.mul(y.clamp_(self.lo, self.hi), self.scale, out=o)
            if ste:
                o.sub_(xs).add_(xs)

        _blockwise(block, tuple(x3.shape))
        return back(out.reshape(xd.shape))

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, bits={self.bits}, signed={self.signed}"


def _dyadic_pair(m: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = dyadic(m)
    return torch.tensor(b, dtype=torch.int64), torch.tensor(c, dtype=torch.int64)


class QuantAdd(nn.Module):
    """``a + b`` as the integer model computes it: each input requantised onto the add's grid
    (dyadic ``S_in / S_add``; unchanged when the scales are equal), summed and clamped."""

    def __init__(self, grid: Grid, in_a: Grid, in_b: Grid) -> None:
        super().__init__()
        self.scale, self.bits, self.signed = grid.scale, grid.bits, grid.signed
        self.lo, self.hi = grid.qrange
        self.in_scales = (in_a.scale, in_b.scale)
        self.pairs = [None if s == grid.scale else _dyadic_pair(s / grid.scale)
                      for s in self.in_scales]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dtype != b.dtype:  # broadcasting: whole-tensor formulas
            total = None
            for x, s, pair in zip((a, b), self.in_scales, self.pairs, strict=True):
                codes = codes_of(x, s)
                q = codes if pair is None else dyadic_round(codes, *pair)
                total = q if total is None else total + q
            return (total.clamp(self.lo, self.hi) * self.scale).to(a.dtype)
        # the same operations block by block (b / 2^c as one exact float64 multiplier)
        mults = [None if p is None else float(p[0]) / 2.0 ** int(p[1]) for p in self.pairs]
        if _channels_last(a) == _channels_last(b):
            (ad, _, back), (bd, _, _) = _dense(a), _dense(b)
        else:  # the two in different layouts: both contiguous NCHW
            ad, bd, back = a.detach().contiguous(), b.detach().contiguous(), lambda y: y
        a3, b3 = _as3d(ad, None), _as3d(bd, None)
        out = torch.empty_like(a3)

        def block(idx: tuple[slice, slice, slice]) -> None:
            total = None
            for x3, s, mult in zip((a3, b3), self.in_scales, mults, strict=True):
                y = x3[idx].to(torch.float64)
                y.div_(s).round_()
                if mult is not None:
                    y.mul_(mult).add_(0.5).floor_()
                total = y if total is None else total.add_(y)
            out[idx].copy_(total.clamp_(self.lo, self.hi).mul_(self.scale))

        _blockwise(block, tuple(a3.shape))
        return back(out.reshape(ad.shape))

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, bits={self.bits}, signed={self.signed}"


class QuantMean(nn.Module):
    """Global average pool as the integer model computes it: the sum of the input codes, then
    one dyadic rescale ``S_in / (count * S_out)`` onto the output grid."""

    def __init__(self, dims: list[int], keepdim: bool, src: Grid, grid: Grid) -> None:
        super().__init__()
        self.dims, self.keepdim = list(dims), bool(keepdim)
        self.src_scale = src.scale
        self.scale, self.bits, self.signed = grid.scale, grid.bits, grid.signed
        self.lo, self.hi = grid.qrange

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d % x.dim() for d in self.dims]
        count = math.prod(x.shape[d] for d in dims)
        codes = codes_of(x, self.src_scale)
        total = codes.sum(dim=dims, keepdim=self.keepdim)
        q = dyadic_round(total, *_dyadic_pair(self.src_scale / (count * self.scale)))
        return (q.clamp(self.lo, self.hi) * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, scale={self.scale:.6g}, bits={self.bits}"


def weight_parts(codes: torch.Tensor, b: torch.Tensor, group_size: int,
                 bits: int) -> list[torch.Tensor]:
    """The integer weights ``codes[o, f] * b[o, f // group_size]`` (each group's dyadic
    multiplier folded into its codes; ``f`` along the flattened fan-in, the weight's memory
    order), split into float64 parts of ``bits`` bits in ``codes``' shape:
    ``sum_j parts[j] * 2^(bits * j)`` is that product exactly. The parts below the top one lie
    in ``[0, 2^bits)``; the top one carries the sign."""
    out = codes.shape[0]
    prod = (codes.to(torch.int64).reshape(out, -1, group_size)
            * b.to(torch.int64).unsqueeze(-1)).reshape(codes.shape)
    parts = []
    while bool((prod.abs() >= 1 << bits).any()):
        parts.append((prod & ((1 << bits) - 1)).to(torch.float64))  # the low bits, >= 0
        prod = prod >> bits  # arithmetic: prod == (prod >> bits) * 2^bits + (prod & mask)
    return [*parts, prod.to(torch.float64)]


def part_bits(fan_in: int, x_max: int) -> int:
    """The widest part (``weight_parts``) whose products with ``fan_in`` input codes of
    magnitude <= ``x_max`` sum below 2^52 in float64, where every partial sum of integers is
    exact whatever the summation order."""
    return max(1, 52 - math.ceil(math.log2(fan_in * max(x_max, 1) + 1)))


def grouped_total(x_codes: torch.Tensor, parts: Sequence[torch.Tensor], bits: int,
                  layer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_g acc[g] * b[g]`` per output (int64, the layer's output layout): each part of the
    folded weights (``weight_parts``) applied to the input codes by ``layer`` (a float64 linear
    or convolution, exact by ``part_bits``), shifted into place and summed in int64."""
    total = None
    for j, part in enumerate(parts):
        s = torch.round(layer(x_codes, part)).to(torch.int64) << (bits * j)
        total = s if total is None else total + s
    assert total is not None
    return total


class GroupedLayer(nn.Module):
    """A linear or conv layer with one weight scale per group of ``group_size`` inputs.

    Forward: the input's codes on the layer's input grid; the sum over groups of each group's
    integer dot product times its dyadic multiplier, as one layer applied to weights with the
    multipliers folded in (``weight_parts``: float64 parts small enough that every sum is exact,
    ``grouped_total``); the bias and the rounding shift of
    ``quantize.primitives.dyadic_group_requantize`` in int64, the same integers; the clamp to
    the output grid. The float layer with the dequantized weight gives the straight-through
    gradient.
    """

    def __init__(self, layer: GraphLayer, ckpt: Checkpoint, group_size: int, grid: Grid) -> None:
        super().__init__()
        name = layer.name
        t = ckpt.tensors
        codes = ckpt.codes(name)
        s_w = t[f"{name}.weight_scale"]
        self.s_in = float(t[f"{name}.input_scale"])
        self.kind, self.group_size = layer.kind, group_size
        self.conv = (layer.stride, layer.padding, layer.dilation, layer.groups)
        self.scale, self.lo, self.hi = grid.scale, *grid.qrange
        bias = t[f"{name}.bias_q"].to(torch.float64) * s_w.amax(dim=1).to(torch.float64)
        self.register_buffer("weight", codes.to(torch.float32) * expand_scales(s_w, codes))
        self.register_buffer("bias", (bias * self.s_in).to(torch.float32))
        b = t[f"{name}.requant_b"].to(torch.int64)
        lo, hi = ckpt.input_grid(name).qrange
        self.bits = part_bits(codes[0].numel(), max(abs(lo), abs(hi)))
        parts = weight_parts(codes, b, group_size, self.bits)
        self.n_parts = len(parts)
        for j, part in enumerate(parts):
            self.register_buffer(f"part{j}", part)
        self.register_buffer("c", t[f"{name}.requant_c"].to(torch.int64))
        # the bias on the grid of the row's largest group multiplier, as the integer model adds it
        self.register_buffer("bias_b", t[f"{name}.bias_q"].to(torch.int64) * b.amax(dim=1))

    def _float(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return nn.functional.linear(x, w, bias)
        conv = nn.functional.conv1d if self.kind == "conv1d" else nn.functional.conv2d
        return conv(x, w, bias, *self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = self._float(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        x_codes = torch.round(x.detach().to(torch.float64) / self.s_in)
        parts = [getattr(self, f"part{j}") for j in range(self.n_parts)]
        total = grouped_total(x_codes, parts, self.bits, lambda v, w: self._float(v, w, None))
        shape = [1] * total.dim()
        shape[-1 if self.kind == "linear" else 1] = -1
        q = round_shift(total + self.bias_b.reshape(shape), self.c.reshape(shape))
        out = (q.clamp(self.lo, self.hi).to(torch.float64) * self.scale).to(x.dtype)
        return ref + (out - ref).detach()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, group_size={self.group_size}, out_scale={self.scale:.6g}"


def prepare(
    program: torch.export.ExportedProgram, ckpt: Checkpoint, recompile: bool = True
) -> tuple[fx.GraphModule, dict[str, GraphLayer], dict[str, PlanRow]]:
    """A fresh module of ``program`` with the checkpoint's layers matched and their BN removed
    (``recompile=False``: its code not regenerated yet, for a caller that rewrites more)."""
    gm = program_module(program)
    layers = find_layers(gm)
    rows = match_rows(list(ckpt.rows.values()), layers)
    qlayers = {layer.name: layer for layer in layers if layer.name in rows}
    for name, layer in qlayers.items():
        if tuple(layer.weight_shape) != ckpt.weight_shape(name):
            raise BadCheckpointError(
                f"checkpoint layer {name!r} has weight shape {ckpt.weight_shape(name)} but the "
                f"model's is {tuple(layer.weight_shape)}; was it made for another model?"
            )
        if (layer.bn is not None) != bool(ckpt.quant["layers"][name].get("bn")):
            raise BadCheckpointError(f"layer {name!r}: BatchNorm folding disagrees with the model")
        if layer.bn is not None:
            remove_bn(gm, layer)
    if recompile:
        gm.graph.lint()
        gm.recompile()
    return gm, qlayers, rows


def _drq_module(layer: GraphLayer, row: PlanRow, ckpt: Checkpoint) -> nn.Module:
    try:
        from quantize.drq import DRQConv2d
    except ImportError as exc:  # written by another package owner; report clearly if absent
        raise BadModelError(
            f"layer {layer.name!r} uses DRQ but quantize.drq.DRQConv2d is not available ({exc})"
        ) from exc
    assert row.drq is not None
    grid = ckpt.input_grid(layer.name)
    return DRQConv2d(
        ckpt.dequantized_weight(layer.name),
        ckpt.tensors[f"{layer.name}.bias"].clone(),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        input_scale=grid.scale,
        input_signed=grid.signed,
        region=row.drq.region,
        threshold=row.drq.threshold,
        w_bits=row.w_bits,
        high_bits=row.drq.high_bits,
        low_bits=row.drq.low_bits,
        low_scale=ckpt.tensors[f"{layer.name}.drq_low_scale"],
    )


def value_grids(gm: fx.GraphModule, points: dict[str, Grid]) -> dict[str, Grid]:
    """Grid of every node whose value lies on a quantized grid (points and the grid-preserving
    ops after them)."""
    grids: dict[str, Grid] = {}
    for node in gm.graph.nodes:
        if node.name in points:
            grids[node.name] = points[node.name]
        elif (
            node.op == "call_function" and node.target in TRANSPARENT_OPS
            and isinstance(node.args[0], fx.Node) and node.args[0].name in grids
        ):
            grids[node.name] = grids[node.args[0].name]
    return grids


def _replace(gm: fx.GraphModule, node: fx.Node, target: str, module: nn.Module,
             args: tuple) -> None:
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def build_fake_quant(program: torch.export.ExportedProgram, ckpt: Checkpoint) -> fx.GraphModule:
    """The fake-quant GraphModule for ``ckpt`` on ``program``.

    Raises BadPlanError / BadCheckpointError when the checkpoint does not fit the model.
    """
    gm, qlayers, rows = prepare(program, ckpt, recompile=False)  # one recompile, at the end
    for name, layer in qlayers.items():
        s_w = ckpt.tensors[f"{name}.weight_scale"].to(torch.float64)
        if s_w.dim() == 2:  # per group: bias_q is on the grid of the largest group scale
            s_w = s_w.amax(dim=1)
        s_in = float(ckpt.tensors[f"{name}.input_scale"])
        bias = (ckpt.tensors[f"{name}.bias_q"].to(torch.float64) * s_w * s_in).to(torch.float32)
        set_layer_params(gm, layer, ckpt.dequantized_weight(name), bias)
    points = ckpt.points()
    grids = value_grids(gm, {p.node: g for p, g in points})
    sources = {n: grids.get(node_by_name(gm, layer.node).args[0].name)
               for n, layer in qlayers.items()}
    # the grids of each add / pool input, read before any node is replaced: an add that feeds
    # another add directly (MobileNetV2's residual chain) is renamed by its replacement
    arg_grids = {p.node: [grids.get(a.name) if isinstance(a, fx.Node) else None
                          for a in node_by_name(gm, p.node).args]
                 for p, _ in points if p.kind in ("add", "pool")}
    after: dict[str, nn.Module] = {}
    for point, grid in points:
        node = node_by_name(gm, point.node)
        if point.kind == "add":
            a, b = node.args
            module = QuantAdd(grid, *arg_grids[point.node][:2])
            _replace(gm, node, f"_bitplan_add_{point.node}", module, tuple(node.args))
        elif point.kind == "pool":
            x = node.args[0]
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            module = QuantMean(list(node.args[1]), bool(keep), arg_grids[point.node][0], grid)
            _replace(gm, node, f"_bitplan_pool_{point.node}", module, (x,))
        elif rows[point.layer].drq is not None or rows[point.layer].group_size is not None:
            after[point.node] = FakeQuant(grid)  # DRQ / GroupedLayer output: on the grid
        else:
            name = str(point.layer)
            acc = ckpt.tensors[f"{name}.weight_scale"].to(torch.float64) * float(
                ckpt.tensors[f"{name}.input_scale"])
            after[point.node] = Requant(
                acc, ckpt.tensors[f"{name}.requant_b"], ckpt.tensors[f"{name}.requant_c"], grid,
                channel_dim=-1 if qlayers[name].kind == "linear" else 1,
            )
    insert_after(gm, after, "outq", recompile=False)
    inputs: dict[str, nn.Module] = {}
    for name, row in rows.items():
        if row.drq is not None:
            continue
        g_in = ckpt.input_grid(name)
        src = sources[name]
        if src is None or src.scale == g_in.scale:
            inputs[name] = FakeQuant(g_in)  # float source (model input), or already on grid
        else:
            b, c = _dyadic_pair(src.scale / g_in.scale)
            inputs[name] = Requant(torch.tensor(src.scale), b, c, g_in)
    insert_input_modules(gm, list(qlayers.values()), inputs, "inq", recompile=False)
    for name, row in rows.items():
        layer = qlayers[name]
        op = node_by_name(gm, layer.node)
        if row.drq is not None:
            _replace(gm, op, module_name(name, "drq"), _drq_module(layer, row, ckpt),
                     (op.args[0],))
        elif row.group_size is not None:
            out_grid = ckpt.output_grid(name)
            _replace(gm, op, module_name(name, "group"),
                     GroupedLayer(layer, ckpt, row.group_size, out_grid), (op.args[0],))
    gm.graph.lint()
    gm.recompile()
    return gm
