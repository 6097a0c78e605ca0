"""DRQ runtime: the region predictor and a convolution that mixes INT8 and INT4 inputs.

DRQ (dynamic region-based quantization) marks regions of a conv layer's input feature map as
sensitive at run time and computes those at INT8, the rest at INT4:

1. quantize the input to INT8 codes with the layer's calibrated scale (one scale per tensor);
2. split the H x W plane into regions of ``x`` pixels wide (along W) by ``y`` high (along H);
   the last row / column of regions may be partial and then averages only its own pixels;
3. mean of |code| over each region and over all channels;
4. ``mean >= threshold`` (threshold in INT8 code units) -> sensitive (1), else 0.

``DRQConv2d`` then computes ``conv(x8 * m, W8) + conv(x4 * (1 - m), W4) + bias`` with ``m`` the
mask upsampled to pixels. Because a convolution is linear and its zero padding is the same for
both terms, this equals running each region at its own precision.

The insensitive regions' weights are the layer's weights requantised per output channel to
``min(w_bits, low_bits)`` bits (derived at load from the stored codes; nothing extra is
stored). Clipping the INT8 codes to the INT4 range instead was measured far less accurate
(``bench/drq.py --low-weights``, docs/drq.md).

Each forward also counts the multiplications per precision from the mask it used: a MAC whose
input pixel lies in a sensitive region is a ``w x high`` multiplication, every other one
(insensitive pixels and the zero padding) a ``min(w, low) x low`` one. The solver's DRQ cost
model (``solver.options``) charges the same split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantize import fold
from quantize.graph import GraphLayer, module_name, node_by_name
from quantize.primitives import (
    activation_qrange,
    expand_scales,
    fake_quantize_weight,
    quantize_activation,
    quantize_weight,
)

log = logging.getLogger(__name__)

aten = torch.ops.aten

DRQ_PREFIX = "drq"


def _check_region(region: tuple[int, int]) -> tuple[int, int]:
    if len(region) != 2 or any(int(r) != r or int(r) < 1 for r in region):
        raise ValueError(f"region must be two positive integers (x, y), got {region!r}")
    return int(region[0]), int(region[1])


def region_grid(height: int, width: int, region: tuple[int, int]) -> tuple[int, int]:
    """Number of region rows and columns, ``(ceil(H / y), ceil(W / x))`` (partial edges count)."""
    x, y = _check_region(region)
    return -(-height // y), -(-width // x)


def region_sums(x_int: torch.Tensor, region: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of |code| over each region and over channels, and each region's element count.

    ``x_int`` is ``[N, C, H, W]`` with integer values (any dtype). Returns ``(sums, counts)``:
    ``sums`` float64 ``[N, ceil(H/y), ceil(W/x)]`` (exact: integer values far below 2^53) and
    ``counts`` float64 ``[ceil(H/y), ceil(W/x)]`` = channels x pixels in the (possibly partial)
    region.
    """
    return plane_region_sums(channel_plane(x_int), region, x_int.shape[1])


def channel_plane(x_int: torch.Tensor) -> torch.Tensor:
    """Sum of |value| over channels of an ``[N, C, H, W]`` map, float64 ``[N, H, W]``: the part
    of :func:`region_sums` that does not depend on the region size (computed once, pooled by
    each size with :func:`plane_region_sums`)."""
    if x_int.dim() != 4:
        raise ValueError(
            f"region statistics need an [N, C, H, W] map, got shape {tuple(x_int.shape)}"
        )
    # Summing over channels first keeps the big tensor in its own dtype; a float32 sum of INT8
    # codes (|q| <= 255) is exact for C < 65793 channels, and only the channel-reduced map moves
    # to float64. int8 is widened first because abs(-128) overflows in int8.
    if x_int.dtype in (torch.int8, torch.uint8):
        x_int = x_int.to(torch.int16)
    acc = None
    if x_int.is_floating_point():
        acc = torch.float64 if x_int.dtype == torch.float64 else torch.float32
    return x_int.abs().sum(dim=1, dtype=acc).to(torch.float64)


def plane_region_sums(plane: torch.Tensor, region: tuple[int, int],
                      channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`region_sums` of a map whose :func:`channel_plane` is ``plane`` ``[N, H, W]``
    and which has ``channels`` channels."""
    x, y = _check_region(region)
    n, h, w = plane.shape
    rows, cols = region_grid(h, w, region)
    plane = F.pad(plane, (0, cols * x - w, 0, rows * y - h))
    sums = plane.reshape(n, rows, y, cols, x).sum(dim=(2, 4))
    ones = torch.zeros(rows * y, cols * x, dtype=torch.float64, device=plane.device)
    ones[:h, :w] = channels
    counts = ones.reshape(rows, y, cols, x).sum(dim=(1, 3))
    return sums, counts


def region_means(x_int: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
    """Mean |code| per region and over channels, float64 ``[N, ceil(H/y), ceil(W/x)]``."""
    sums, counts = region_sums(x_int, region)
    return sums / counts


def region_mask(x_int: torch.Tensor, region: tuple[int, int], threshold: float) -> torch.Tensor:
    """DRQ predictor: bool ``[N, ceil(H/y), ceil(W/x)]``, True (sensitive) where the region's
    mean |code| (over its own pixels and all channels) is ``>= threshold``.

    ``x_int``: ``[N, C, H, W]`` INT8 activation codes (float or integer dtype); ``region`` =
    ``(x, y)`` with x the region width (along W) and y its height (along H); ``threshold`` in
    INT8 code units. Raises ValueError for a bad region or a map that is not 4-D.
    """
    sums, counts = region_sums(x_int, region)
    # sum >= t * count is the exact form of mean >= t (no division rounding).
    return sums >= float(threshold) * counts


def upsample_mask(
    mask: torch.Tensor, region: tuple[int, int], height: int, width: int
) -> torch.Tensor:
    """Region mask ``[N, rows, cols]`` -> pixel mask ``[N, 1, H, W]`` (same dtype), cropped at
    the partial edge regions."""
    x, y = _check_region(region)
    up = mask.repeat_interleave(y, dim=1).repeat_interleave(x, dim=2)
    return up[:, None, :height, :width]


def low_scale(scale: float, signed: bool, high_bits: int = 8, low_bits: int = 4) -> float:
    """Scale of the low-bit grid that covers the same range as the high-bit grid at ``scale``."""
    hi = activation_qrange(high_bits, signed)[1]
    lo = activation_qrange(low_bits, signed)[1]
    return float(scale) * hi / lo


def input_uses(
    height: int,
    width: int,
    kernel: tuple[int, int],
    stride: tuple[int, int] | int,
    padding: tuple[int, int] | int | str,
    dilation: tuple[int, int] | int,
) -> torch.Tensor:
    """How many multiplications of a conv (per input channel and output channel) read each
    input pixel: float64 ``[H, W]`` of integers. Taps that read the zero padding read no pixel;
    they are not counted here (a DRQ conv runs them in the low-bit branch)."""
    x = torch.zeros(1, 1, height, width, dtype=torch.float64, requires_grad=True)
    ones = torch.ones(1, 1, *kernel, dtype=torch.float64)
    with torch.enable_grad():
        F.conv2d(x, ones, None, stride, padding, dilation).sum().backward()
    assert x.grad is not None
    return x.grad[0, 0].detach()


def drq_input(
    x: torch.Tensor,
    scale: float,
    signed: bool,
    region: tuple[int, int],
    threshold: float,
    high_bits: int = 8,
    low_bits: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` both ways and predict the mask.

    Returns ``(x_high, x_low, m, mask)``: the input fake-quantized (float) at ``high_bits``
    with ``scale`` and at ``low_bits`` on the same range, the pixel mask ``m`` (float 0/1,
    ``[N, 1, H, W]``) with 1 where the region is sensitive, and the region mask itself.
    """
    codes = quantize_activation(x, scale, high_bits, signed)
    mask = region_mask(codes, region, threshold)
    m = upsample_mask(mask, region, x.shape[-2], x.shape[-1]).to(x.dtype)
    s_low = low_scale(scale, signed, high_bits, low_bits)
    x_low = quantize_activation(x, s_low, low_bits, signed) * s_low
    return codes * scale, x_low, m, mask


def drq_fake_quantize(
    x: torch.Tensor,
    scale: float,
    signed: bool,
    region: tuple[int, int],
    threshold: float,
    high_bits: int = 8,
    low_bits: int = 4,
) -> torch.Tensor:
    """Q_drq(x): sensitive regions at ``high_bits``, the rest at ``low_bits`` (float)."""
    x_high, x_low, m, _ = drq_input(x, scale, signed, region, threshold, high_bits, low_bits)
    return x_high * m + x_low * (1 - m)


class DRQConv2d(nn.Module):
    """A Conv2d whose sensitive input regions run at INT8 (with W8) and the rest at INT4 (W4).

    ``weight``/``bias`` are float and already BN-folded. W8 is ``weight`` fake-quantized
    (symmetric per output channel) at ``w_bits`` and W4 at ``min(w_bits, low_bits)``, on the
    per-channel scales ``low_scale`` when given (the checkpoint's ``drq_low_scale``: the job's
    clipped scales), else max|W| / qmax. The input
    is quantized with ``input_scale`` / ``input_signed`` (the layer's calibrated INT8 grid);
    the low-bit grid covers the same range. After each forward ``last_int4_fraction`` holds the
    fraction of regions that ran at INT4; ``int4_regions`` / ``total_regions`` accumulate until
    :meth:`reset_stats`, and so do ``macs_high`` / ``macs_low``: the multiplications that read a
    sensitive pixel, and all the others (see the module docstring).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int] | int,
        padding: tuple[int, int] | int | str,
        dilation: tuple[int, int] | int,
        groups: int,
        input_scale: float,
        input_signed: bool,
        region: tuple[int, int],
        threshold: int,
        w_bits: int,
        high_bits: int = 8,
        low_bits: int = 4,
        low_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"DRQConv2d needs a 4-D conv weight, got shape {tuple(weight.shape)}")
        if not low_bits < high_bits:
            raise ValueError(f"low_bits ({low_bits}) must be below high_bits ({high_bits})")
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale}")
        self.region = _check_region(region)
        self.threshold = int(threshold)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = int(groups)
        self.input_scale = float(input_scale)
        self.input_signed = bool(input_signed)
        self.w_bits = int(w_bits)
        self.high_bits = int(high_bits)
        self.low_bits = int(low_bits)
        w = weight.detach().to(torch.float32)
        self.register_buffer("weight_high", fake_quantize_weight(w, self.w_bits))
        codes, s_low = quantize_weight(w, min(self.w_bits, self.low_bits), scale=low_scale)
        self.register_buffer("weight_low", codes.to(torch.float32) * expand_scales(s_low, codes))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.reset_stats()

    def reset_stats(self) -> None:
        self.last_int4_fraction = 0.0
        self.int4_regions = 0
        self.total_regions = 0
        self.macs_high = 0
        self.macs_low = 0

    def _count_macs(self, m: torch.Tensor) -> None:
        """Add the multiplications of this forward, split by the pixel mask ``m``."""
        out_c, in_per_group, kh, kw = self.weight_high.shape
        ones = torch.ones(1, 1, kh, kw, dtype=torch.float64)
        taps = F.conv2d(m.to(torch.float64), ones, None, self.stride, self.padding,
                        self.dilation)
        per_tap = out_c * in_per_group
        high = int(round(float(taps.sum()))) * per_tap
        total = taps.numel() * kh * kw * per_tap
        self.macs_high += high
        self.macs_low += total - high

    @property
    def int4_fraction(self) -> float:
        """Fraction of regions at INT4 over every forward since the last reset."""
        return self.int4_regions / self.total_regions if self.total_regions else 0.0

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_high, x_low, m, mask = drq_input(
            x, self.input_scale, self.input_signed, self.region, self.threshold,
            self.high_bits, self.low_bits,
        )
        total = mask.numel()
        low = total - int(mask.sum())
        self.last_int4_fraction = low / total if total else 0.0
        self.int4_regions += low
        self.total_regions += total
        self._count_macs(m)
        out = self._conv(x_high * m, self.weight_high.to(x.dtype))
        out = out + self._conv(x_low * (1 - m), self.weight_low.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"region={self.region}, threshold={self.threshold}, w_bits={self.w_bits}, "
            f"scale={self.input_scale:.4g}, signed={self.input_signed}"
        )


# --------------------------------------------------------------------------------------------
# Swapping the conv ops of an exported GraphModule for DRQConv2d (tests, benches, and a
# stand-in until the checkpoint loader does it).


@dataclass(frozen=True)
class DRQLayerSettings:
    """What one DRQ conv needs beyond its weights: the INT8 input grid, region, threshold."""

    input_scale: float
    input_signed: bool
    region: tuple[int, int]
    threshold: int
    w_bits: int = 8
    high_bits: int = 8
    low_bits: int = 4


def apply_drq(
    gm: fx.GraphModule, layers: list[GraphLayer], settings: Mapping[str, DRQLayerSettings]
) -> fx.GraphModule:
    """Replace each listed conv2d op named in ``settings`` by a :class:`DRQConv2d`, in place.

    A following eval-mode BatchNorm is folded into the DRQ conv's weights (as the checkpoint
    does); otherwise it stays in the graph after it. Returns ``gm`` (recompiled). The modules
    are reachable as ``gm.get_submodule(quantize.graph.module_name(name, "drq"))``.
    Raises ValueError for a layer that is not a conv2d or a settings name with no layer.
    """
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise ValueError(f"DRQ settings for unknown layers {unknown}; known: {sorted(by_name)}")
    for name, s in settings.items():
        layer = by_name[name]
        if layer.kind != "conv2d":
            raise ValueError(f"DRQ applies to conv2d layers only; {name!r} is {layer.kind}")
        weight = fold.fetch(gm, layer.weight).detach()
        bias = None if layer.bias is None else fold.fetch(gm, layer.bias).detach()
        folded = layer.bn is not None and not layer.bn_training
        if folded:  # fold as the checkpoint does; the BN's users then read the op directly
            weight, bias = fold.fold_bn(weight, bias, *fold.bn_params(gm, layer))
            fold.remove_bn(gm, layer)
        module = DRQConv2d(
            weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups,
            s.input_scale, s.input_signed, s.region, s.threshold, s.w_bits,
            s.high_bits, s.low_bits,
        )
        op = node_by_name(gm, layer.node)
        target = module_name(name, DRQ_PREFIX)
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(op):
            new = gm.graph.call_module(target, (op.args[0],))
        op.replace_all_uses_with(new)
        gm.graph.erase_node(op)
        log.debug("DRQ on %s: %s (BN folded: %s)", name, module.extra_repr(), folded)
    gm.graph.lint()
    gm.recompile()
    return gm


def drq_modules(gm: nn.Module) -> dict[str, DRQConv2d]:
    """The DRQConv2d submodules of ``gm`` by their submodule name."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, DRQConv2d)}
