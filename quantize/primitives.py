"""Pure tensor functions for quantization: scales, (fake-)quantizers, nibble packing, dyadics.

Conventions used everywhere in bitplan:
- Weights: symmetric per-output-channel (dim 0), signed integers in [-(2^(b-1)-1), 2^(b-1)-1]
  (the most negative code is unused so the grid is symmetric); or per group: one scale per
  ``group_size`` consecutive inputs of an output channel (along the flattened fan-in).
- Activations: one scale per tensor. Signed symmetric grid as for weights, or, when the
  calibrated range is non-negative (after ReLU), unsigned [0, 2^b - 1].
- Rounding is round-half-to-even (``torch.round``) in both fake-quant and integer paths, so the
  two agree bit for bit before accumulation.
"""

from __future__ import annotations

import math

import torch

# A channel whose weights are all zero still needs a positive scale.
_MIN_SCALE = 1e-12


def qmax_signed(bits: int) -> int:
    """Largest code of a symmetric signed b-bit grid."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    return 2 ** (bits - 1) - 1


def qmax_unsigned(bits: int) -> int:
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    return 2**bits - 1


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``weight`` as ``[out, groups, group_size]`` (per channel: one group of the whole fan-in).

    Groups run along the flattened input dimension (``in_features``, or ``in/groups * kh * kw``
    of a conv in the weight's memory order); ``group_size`` must divide that fan-in.
    """
    flat = weight.detach().reshape(weight.shape[0], -1)
    fan_in = flat.shape[1]
    if group_size is None:
        return flat.reshape(flat.shape[0], 1, fan_in)
    if isinstance(group_size, bool) or group_size < 1 or fan_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the fan-in {fan_in}")
    return flat.reshape(flat.shape[0], fan_in // group_size, group_size)


# The clip-ratio grid: a weight scale is ``ratio x max|W| / qmax`` per channel (or group) with
# ratio 1.0 (max|W|, no clipping) or one of these; ``quantize.clip`` chooses ratios (least
# squared or Hessian-weighted rounding error) and every quantizer takes them as data.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(29))  # 1.0 down to 0.3


def weight_scales(
    weight: torch.Tensor, bits: int, group_size: int | None = None,
    ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric weight scales (float32): ``ratio x max|W| / qmax`` per group (``ratio`` None:
    1, each group's max|W| maps to the largest code; else a float tensor of the scales'
    shape, ``quantize.clip``'s clip ratios).

    Per output channel (``group_size=None``): shape ``[out]``. Per group of ``group_size``
    consecutive inputs: shape ``[out, fan_in / group_size]``.
    """
    groups = _grouped(weight, group_size).float()
    q = qmax_signed(bits)
    absmax = groups.abs().amax(dim=2)
    if ratio is not None:
        ratio = ratio.to(torch.float32).reshape(absmax.shape)
        absmax = absmax * ratio
    scale = (absmax / q).clamp_min(_MIN_SCALE).to(torch.float32)
    return scale.reshape(-1) if group_size is None else scale


def expand_scales(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-element scales in the shape of ``like`` (a weight) from per-channel ``[out]`` or
    per-group ``[out, groups]`` scales."""
    if scale.dim() <= 1:
        return scale.reshape((-1,) + (1,) * (like.dim() - 1)).expand(like.shape)
    out, groups = scale.shape
    per_input = like[0].numel() // groups
    return scale.reshape(out, groups, 1).expand(out, groups, per_input).reshape(like.shape)


def quantize_weight(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
    group_size: int | None = None, ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int32, weight's shape) and scales (``[out]`` per channel, ``[out, groups]``
    per group) of ``weight`` at ``bits``; the scales given, else ``weight_scales(weight, bits,
    group_size, ratio)``."""
    if scale is None:
        scale = weight_scales(weight, bits, group_size, ratio)
    q = qmax_signed(bits)
    codes = torch.round(weight.detach() / expand_scales(scale, weight)).clamp_(-q, q)
    return codes.to(torch.int32), scale


def fake_quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int | None = None,
    ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Q_b(W): weight rounded to the symmetric per-channel (or per-group) b-bit grid, in float
    (``ratio``: the clip ratios of the scales, ``weight_scales``)."""
    codes, scale = quantize_weight(weight, bits, group_size=group_size, ratio=ratio)
    return codes.to(weight.dtype) * expand_scales(scale, weight).to(weight.dtype)


def weight_quant_error(weight: torch.Tensor, bits: int, group_size: int | None = None,
                       ratio: torch.Tensor | None = None) -> float:
    """||Q_b(W) - W||^2 (sum of squares), the HAWQ perturbation's data term; ``group_size``
    None for per-channel scales, else one scale per ``group_size`` consecutive inputs;
    ``ratio``: the scales' clip ratios (None: max|W|)."""
    w = weight.detach()
    return float((fake_quantize_weight(w, bits, group_size, ratio) - w).pow(2).sum())


def activation_scale(amin: float, amax: float, bits: int) -> tuple[float, bool]:
    """Per-tensor scale and signedness for an activation range [amin, amax].

    Non-negative ranges use the unsigned grid (one more bit of resolution after ReLU).
    """
    signed = amin < 0.0
    if signed:
        scale = max(abs(amin), abs(amax)) / qmax_signed(bits)
    else:
        scale = amax / qmax_unsigned(bits)
    return max(float(scale), _MIN_SCALE), signed


def activation_qrange(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        q = qmax_signed(bits)
        return -q, q
    return 0, qmax_unsigned(bits)


def quantize_activation(x: torch.Tensor, scale: float, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (same dtype as ``x``, integral values) of an activation tensor."""
    lo, hi = activation_qrange(bits, signed)
    return torch.round(x / scale).clamp_(lo, hi)


def fake_quantize_activation(
    x: torch.Tensor, scale: float, bits: int, signed: bool
) -> torch.Tensor:
    """Q_a(x) in float. Gradients pass straight through (STE) so it can sit in a graph."""
    q = quantize_activation(x.detach(), scale, bits, signed) * scale
    return x + (q - x).detach()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed codes in [-8, 7] as two's-complement nibbles, two per byte, low nibble first.

    The flattened input is padded with one zero nibble when its length is odd. Returns uint8 of
    length ceil(numel / 2).
    """
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError("nibble packing needs codes in [-8, 7]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = flat & 0xF
    return (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int8 codes, first ``numel`` values."""
    p = packed.reshape(-1).to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    nib = torch.stack([lo, hi], dim=1).reshape(-1)[:numel]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)


def dyadic(m: float, max_bits: int = 31, max_shift: int = 31) -> tuple[int, int]:
    """Integers (b, c) with b / 2^c closest to ``m``; |b| < 2^max_bits, c in [0, max_shift].

    The largest admissible c gives the finest grid, so the error is at most 2^-(c+1) (half a
    step) unless b would overflow, in which case c is reduced until it fits.
    """
    if not math.isfinite(m):
        raise ValueError(f"dyadic needs a finite multiplier, got {m}")
    limit = 2**max_bits - 1
    for c in range(max_shift, -1, -1):
        b = round(m * 2**c)
        if abs(b) <= limit:
            return int(b), c
    raise ValueError(f"multiplier {m} is too large for a {max_bits}-bit dyadic number")


def dyadic_many(m: torch.Tensor, max_bits: int = 31,
                max_shift: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dyadic` of every element of ``m`` at once: int64 ``b`` and ``c`` of ``m``'s shape,
    equal to the scalar function's (``m * 2^c`` is exact in float64, and ``torch.round`` rounds
    half to even as Python's ``round``)."""
    m64 = m.detach().to(torch.float64)
    if not bool(torch.isfinite(m64).all()):
        raise ValueError("dyadic needs finite multipliers")
    shifts = torch.arange(max_shift, -1, -1, dtype=torch.float64)  # the largest c first
    b = torch.round(m64.reshape(-1, 1) * torch.exp2(shifts))
    fits = b.abs() <= 2**max_bits - 1
    if not bool(fits.any(dim=1).all()):
        raise ValueError(f"a multiplier is too large for a {max_bits}-bit dyadic number")
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first c that fits
    return (b.gather(1, first).reshape(m.shape).to(torch.int64),
            (max_shift - first).reshape(m.shape).to(torch.int64))


def round_shift(total: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Integer ``round(total / 2^c)``, half up: ``(total + 2^(c-1)) >> c`` in int64 (``c``
    broadcasts against ``total``; ``c = 0`` adds nothing)."""
    c64 = c.to(torch.int64)
    half = torch.where(
        c64 > 0, torch.ones_like(c64) << (c64 - 1).clamp_min(0), torch.zeros_like(c64)
    )
    return (total.to(torch.int64) + half) >> c64


def dyadic_requantize(acc: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Integer-only ``round(acc * b / 2^c)``: ``(acc * b + 2^(c-1)) >> c`` in int64.

    Rounds half up (towards +inf) via the added half step and an arithmetic shift, the usual
    choice of integer-only inference engines. ``b``/``c`` broadcast against ``acc``.
    """
    return round_shift(acc.to(torch.int64) * b.to(torch.int64), c)


def group_dyadic(m: torch.Tensor, max_bits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Dyadic multipliers ``b[o, g] / 2^c[o]`` ~= ``m[o, g]`` with one shift per row.

    ``m`` is ``[out, groups]`` (positive: S_w[o, g] S_in / S_out). Each row's shift is the
    largest at which its largest multiplier fits ``max_bits`` bits (as :func:`dyadic`), so the
    row's products share one fixed point and are rounded once. Returns int64 ``b [out,
    groups]`` and ``c [out]``.
    """
    m64 = m.detach().to(torch.float64)
    c = dyadic_many(m64.abs().amax(dim=1), max_bits=max_bits)[1]
    b = torch.round(m64 * torch.exp2(c.to(torch.float64)).unsqueeze(1)).to(torch.int64)
    return b, c


def dyadic_group_requantize(
    acc: torch.Tensor, b: torch.Tensor, c: torch.Tensor, bias_q: torch.Tensor
) -> torch.Tensor:
    """Integer-only requantisation of per-group accumulators, channels and groups last.

    ``acc`` int ``[..., out, groups]`` (each group's integer dot product), ``b [out, groups]``,
    ``c [out]``, ``bias_q [out]`` (the bias on the grid of the row's largest group scale, so
    its multiplier is ``max_g b[o, g]``). Returns int64 ``[..., out]``:
    ``(sum_g acc[g] b[g] + bias_q max_g b[g] + 2^(c-1)) >> c``, one rounding (half up) per
    output, all in int64 (the caller bounds ``b`` so the sum cannot overflow).
    """
    b64 = b.to(torch.int64)
    total = (acc.to(torch.int64) * b64).sum(dim=-1) + bias_q.to(torch.int64) * b64.amax(dim=1)
    return round_shift(total, c)


def group_multiplier_bits(fan_in: int, w_bits: int, in_bits: int, bias_bound: int = 0) -> int:
    """Bits a per-group multiplier may use so that ``dyadic_group_requantize`` stays below
    2^63: the sum of |acc| over a row is at most ``fan_in * qmax_w * 2^in_bits`` (+ |bias_q|);
    at most 31 (``requant_b`` is stored as int32)."""
    bound = fan_in * qmax_signed(w_bits) * 2**in_bits + abs(int(bias_bound)) + 1
    return max(1, min(31, 62 - math.ceil(math.log2(bound))))
