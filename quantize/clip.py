"""Weight clipping: per-channel (or per-group) clip ratios, chosen once and passed as data.

A weight scale is ``ratio x max|W| / qmax`` per output channel (or per group of inputs), the
ratio from ``primitives.CLIP_RATIOS`` (1.0 down to 0.3). Three ways to choose it
(``QuantizeConfig.weight_clip``, the constraints' ``quantize.weight_clip``):

- ``"max"``: ratio 1 (max|W| maps to the largest code; no table is kept);
- ``"mse"``: per group the ratio with the least squared rounding error ``sum_i (Q(w)_i - w_i)^2``;
- ``"hessian"``: the least Hessian-weighted error ``sum_i H_ii (Q(w)_i - w_i)^2``, ``H_ii`` the
  Hutchinson diagonal of the sensitivity sweep (a group whose diagonal sums to <= 0 falls back
  to the plain squared error).

The sensitivity stage chooses the ratios (it holds the diagonal), per layer, weight width and
group size, on the weights the user trained; they travel in ``sensitivity.json``
(:meth:`ClipRatios.to_dict`) and every quantizer takes them: Omega (trace and diagonal,
grouped), the bias correction's ``Q(W) - W``, the measured Omega, the checkpoint's codes and
DRQ's low-bit weights. A BatchNorm folded into the layer multiplies a channel's weights, and
so its max|W|, by one constant ``gamma``; the folded codes are then the unfolded ones times
``sign(gamma)`` and the channel's weighted error at every ratio is scaled by ``gamma^2``
(its Hessian diagonal by ``1 / gamma^2``), so the chosen ratio is the same for the folded
weight (``tests/quantize/test_clip.py`` checks it).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .primitives import CLIP_RATIOS, _grouped, qmax_signed

CLIP_MODES = ("max", "mse", "hessian")
Key = tuple[int, int | None]  # (weight bits, group size or None for per channel)


def choose_ratios(weight: torch.Tensor, bits: int, group_size: int | None = None,
                  diag: torch.Tensor | None = None) -> torch.Tensor:
    """Per output channel (``[out]``) or per group (``[out, fan_in / group_size]``), the ratio
    among ``CLIP_RATIOS`` with the least ``sum_i h_i (Q_r(w)_i - w_i)^2``: ``h = diag`` (the
    weight's Hessian diagonal, clamped at 0) or 1 (``diag`` None: the MSE choice). Ties go to
    the larger ratio. Float32 ratio values."""
    groups = _grouped(weight, group_size).float()
    if diag is None:
        h = None
    else:
        h = _grouped(diag.reshape(weight.shape), group_size).float().clamp_min(0)
        h = torch.where(h.sum(dim=2, keepdim=True) > 0, h, torch.ones_like(h))
    q = qmax_signed(bits)
    absmax = groups.abs().amax(dim=2)
    best = torch.full_like(absmax, math.inf)
    chosen = torch.ones_like(absmax)
    for ratio in CLIP_RATIOS:
        r = torch.full_like(absmax, ratio)
        s = (absmax * r / q).clamp_min(1e-12)[..., None]
        err = (torch.round(groups / s).clamp_(-q, q) * s - groups).pow_(2)
        if h is not None:
            err = err * h
        err = err.sum(dim=2)
        better = err < best
        best = torch.where(better, err, best)
        chosen = torch.where(better, r, chosen)
    return chosen.reshape(-1) if group_size is None else chosen


def ratios_for(mode: str, weight: torch.Tensor, bits: int, group_size: int | None = None,
               diag: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ratios ``mode`` gives (None for ``"max"``); ``"hessian"`` needs ``diag``."""
    if mode == "max":
        return None
    if mode == "mse":
        return choose_ratios(weight, bits, group_size)
    if mode == "hessian":
        if diag is None:
            raise ValueError("weight clip 'hessian' needs the weight's Hessian diagonal")
        return choose_ratios(weight, bits, group_size, diag)
    raise ValueError(f"weight clip must be one of {CLIP_MODES}, got {mode!r}")


def key_str(key: Key) -> str:
    """``"4"`` per channel, ``"4g64"`` per group of 64 (the JSON key)."""
    bits, group = key
    return f"{bits}" if group is None else f"{bits}g{group}"


def parse_key(text: str) -> Key:
    bits, _, group = text.partition("g")
    return int(bits), int(group) if group else None


def _encode(ratio: torch.Tensor, grid: tuple[float, ...]) -> dict[str, Any]:
    """Indices into ``grid`` (uint8, base64) and the shape: exact for ratios from the grid."""
    values = torch.tensor(grid, dtype=torch.float32)
    idx = (ratio.to(torch.float32).reshape(-1, 1) - values).abs().argmin(dim=1).to(torch.uint8)
    return {"shape": list(ratio.shape), "index": base64.b64encode(idx.numpy().tobytes()).decode()}


def _decode(d: Mapping[str, Any], grid: tuple[float, ...]) -> torch.Tensor:
    raw = base64.b64decode(d["index"])
    idx = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long)
    shape = [int(s) for s in d["shape"]]
    if idx.numel() != math.prod(shape) or (idx.numel() and int(idx.max()) >= len(grid)):
        raise ValueError("clip ratios: index data does not fit its shape or grid")
    return torch.tensor(grid, dtype=torch.float32)[idx].reshape(shape)


@dataclass
class ClipRatios:
    """Clip ratios per layer and (bits, group size), chosen by ``mode``. ``"max"`` keeps no
    table (:meth:`ratio` is None everywhere); otherwise a missing entry is an error, since
    every quantizer of a job must use the scales Omega priced."""

    mode: str = "max"
    layers: dict[str, dict[Key, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in CLIP_MODES:
            raise ValueError(f"weight clip must be one of {CLIP_MODES}, got {self.mode!r}")

    def ratio(self, layer: str, bits: int, group_size: int | None = None
              ) -> torch.Tensor | None:
        """The ratios of ``layer`` at ``bits`` (and group size); None for ``"max"``. Raises
        KeyError naming what is missing."""
        if self.mode == "max":
            return None
        table = self.layers.get(layer)
        if table is None or (int(bits), group_size) not in table:
            raise KeyError(f"no {self.mode!r} clip ratios for layer {layer!r} at "
                           f"{key_str((int(bits), group_size))}")
        return table[(int(bits), group_size)]

    def has(self, layer: str, bits: int, group_size: int | None = None) -> bool:
        return self.mode == "max" or (int(bits), group_size) in self.layers.get(layer, {})

    def merged(self, other: ClipRatios) -> ClipRatios:
        """These ratios with ``other``'s entries added (same mode)."""
        if other.mode != self.mode:
            raise ValueError(f"cannot merge {other.mode!r} clip ratios into {self.mode!r}")
        layers = {n: dict(t) for n, t in self.layers.items()}
        for n, t in other.layers.items():
            layers.setdefault(n, {}).update(t)
        return ClipRatios(self.mode, layers)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "grid": list(CLIP_RATIOS),
                "layers": {n: {key_str(k): _encode(r, CLIP_RATIOS) for k, r in t.items()}
                           for n, t in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipRatios:
        grid = tuple(float(x) for x in d.get("grid", CLIP_RATIOS))
        return cls(str(d["mode"]), {
            n: {parse_key(k): _decode(v, grid) for k, v in t.items()}
            for n, t in d.get("layers", {}).items()})


__all__ = ["CLIP_MODES", "ClipRatios", "choose_ratios", "key_str", "parse_key", "ratios_for"]
