"""Pure tensor functions for quantization: scales, (fake-)quantizers, nibble packing, dyadics.

Conventions used everywhere in bitplan:
- Weights: symmetric per-output-channel (dim 0), signed integers in [-(2^(b-1)-1), 2^(b-1)-1]
  (the most negative code is unused so the grid is symmetric).
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


def weight_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale (float32, shape ``[out]``) so that max|W_c| maps to qmax."""
    absmax = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
    return (absmax / qmax_signed(bits)).clamp_min(_MIN_SCALE).to(torch.float32)


def _channel_view(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.reshape((-1,) + (1,) * (like.dim() - 1))


def quantize_weight(
    weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int32) and per-channel scales of ``weight`` at ``bits``."""
    if scale is None:
        scale = weight_scales(weight, bits)
    q = qmax_signed(bits)
    codes = torch.round(weight.detach() / _channel_view(scale, weight)).clamp_(-q, q)
    return codes.to(torch.int32), scale


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_b(W): weight rounded to the symmetric per-channel b-bit grid, in float."""
    codes, scale = quantize_weight(weight, bits)
    return (codes.to(weight.dtype) * _channel_view(scale, weight).to(weight.dtype)).reshape(
        weight.shape
    )


def weight_quant_error(weight: torch.Tensor, bits: int) -> float:
    """||Q_b(W) - W||^2 (sum of squares), the HAWQ perturbation's data term."""
    w = weight.detach()
    return float((fake_quantize_weight(w, bits) - w).pow(2).sum())


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


def dyadic_requantize(acc: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Integer-only ``round(acc * b / 2^c)``: ``(acc * b + 2^(c-1)) >> c`` in int64.

    Rounds half up (towards +inf) via the added half step and an arithmetic shift, the usual
    choice of integer-only inference engines. ``b``/``c`` broadcast against ``acc``.
    """
    acc64 = acc.to(torch.int64)
    b64 = b.to(torch.int64)
    c64 = c.to(torch.int64)
    half = torch.where(
        c64 > 0, torch.ones_like(c64) << (c64 - 1).clamp_min(0), torch.zeros_like(c64)
    )
    return (acc64 * b64 + half) >> c64
