"""Bias correction: remove the expected output shift that weight quantization causes.

A quantized layer computes ``op(x, Q(W)) + b = op(x, W) + b + op(x, Q(W) - W)``. The last term
has, per output channel ``o``, a mean ``mu_o = E[op(x, Q(W) - W)]_o`` over the calibration
inputs (and over every output position of a conv / every token of a sequence) that the float
layer does not have. Bias correction (Nagel et al., "Data-Free Quantization", 2019, the
empirical variant) stores ``b - mu`` instead of ``b``: the quantized layer's output mean then
equals the float layer's on the calibration inputs. Two variants
(``QuantizeConfig.bias_correction``): ``"weight"`` corrects the weight error's shift above;
``"layer"`` also the shift of the layer's own input rounding,
``mu = E[op(Q_a(x), Q(W)) - op(x, W)]`` with ``Q_a`` the layer's input grid (DRQ rows, whose
input grid varies by region, get the ``"weight"`` correction).

``mu`` is exact, not from a per-channel input mean. The op is linear in ``x``, so the
``"weight"`` shift is ``E[op(x, dW)] = op(E[x], dW)`` averaged over output positions, i.e. ``dW``
against the layer input summed per weight tap (``quantize.observe.InputSums``, padding zeros of
the conv included): given those sums (measured once per job with the activation statistics),
the correction of any plan needs no data (``sums=``). Otherwise, and always for ``"layer"``
(``Q_a`` is not linear), one no-grad pass of the calibration set through the BN-folded float
model, with a probe on each corrected layer's input that runs the layer's op on ``Q(W) - W``
(no bias) and sums the result per output channel (padding rows of fixed-size batches dropped).
``x`` is the float model's input to the layer (the classic choice: the correction of one layer
does not depend on the others'); the sums come from the unfolded model, whose layer inputs are
the same up to float rounding (the BN folded or not).

The corrected bias is what ``quantize.apply`` writes to the checkpoint (``bias`` and
``bias_q``), so fake-quant, the integer executor and the exports compute with it. ``Q(W)`` is
the quantizer the checkpoint uses (``quantize.primitives.quantize_weight``, the plan row's
bits and group size, with the job's clip ratios, ``quantize.clip``). Cost: with the sums, one
weight-sized product per layer; without, one forward pass plus one extra float64 op per
corrected layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from .data import CalibrationSet
from .graph import GraphLayer, insert_input_modules
from .observe import InputSums, graph_copy
from .points import Grid
from .primitives import expand_scales, fake_quantize_activation, quantize_weight


def weight_delta(weight: torch.Tensor, bits: int, group_size: int | None,
                 ratio: torch.Tensor | None = None) -> torch.Tensor:
    """``Q(W) - W`` in float64, with the checkpoint's quantizer (``ratio``: the scales' clip
    ratios, ``quantize.clip``; None: max|W|)."""
    w = weight.detach().cpu().to(torch.float32)
    return codes_delta(w, *quantize_weight(w, bits, group_size=group_size, ratio=ratio))


def codes_delta(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``Q(W) - W`` in float64 from the codes and scales ``quantize_weight`` gave for
    ``weight`` (float32, CPU): what :func:`weight_delta` computes, for a caller that holds
    them already."""
    deq = codes.to(torch.float64) * expand_scales(scales.to(torch.float64), codes)
    return deq - weight.to(torch.float64)


def layer_op(layer: GraphLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's op on ``x`` with ``weight`` and no bias (output channels on axis -1 for
    linear, axis 1 for conv)."""
    if layer.kind == "linear":
        return nn.functional.linear(x, weight)
    conv = {"conv1d": nn.functional.conv1d, "conv2d": nn.functional.conv2d,
            "conv3d": nn.functional.conv3d}[layer.kind]
    return conv(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


class _ShiftProbe(nn.Module):
    """Passes its input through; sums ``op(x, dW)`` per output channel over real samples
    (with ``grid``: ``op(Q_a(x), W + dW) - op(x, W)``)."""

    def __init__(self, layer: GraphLayer, delta: torch.Tensor, weight: torch.Tensor,
                 grid: Grid | None = None) -> None:
        super().__init__()
        self.layer, self.grid = layer, grid
        self.register_buffer("delta", delta)
        self.register_buffer("weight", weight.detach().to(torch.float64))
        self.full: int | None = None
        self.valid: int | None = None
        self.total = torch.zeros(delta.shape[0], dtype=torch.float64)
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach()
        if self.valid is not None and v.dim() and v.shape[0] == self.full:
            v = v[: self.valid]
        if v.numel() == 0:
            return x
        v = v.to(torch.float64)
        if self.grid is None:
            y = layer_op(self.layer, v, self.delta)
        else:
            g = self.grid
            vq = fake_quantize_activation(v, g.scale, g.bits, g.signed)
            y = layer_op(self.layer, vq, self.weight + self.delta) - layer_op(self.layer, v,
                                                                              self.weight)
        axis = y.dim() - 1 if self.layer.kind == "linear" else 1
        y = y.movedim(axis, -1).reshape(-1, y.shape[axis])
        self.total += y.sum(0).cpu()
        self.count += y.shape[0]
        return x

    def shift(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


@torch.no_grad()
def output_shifts(
    gm: fx.GraphModule,
    layers: Mapping[str, GraphLayer],
    deltas: Mapping[str, torch.Tensor],
    data: CalibrationSet,
    batch_size: int,
    fixed: bool = False,
    device: torch.device | str = "cpu",
    weights: Mapping[str, torch.Tensor] | None = None,
    grids: Mapping[str, Grid] | None = None,
) -> dict[str, torch.Tensor]:
    """``E[op(x, deltas[name])]`` per output channel (float64 ``[out]``) for each named layer,
    ``x`` the layer's input in ``gm`` (the BN-folded float module; left unchanged). A layer in
    ``grids`` (its float weight in ``weights``) gets ``E[op(Q_a(x), W + dW) - op(x, W)]``."""
    device = torch.device(device)
    weights, grids = weights or {}, grids or {}
    probes = {n: _ShiftProbe(layers[n], d.to(device),
                             weights.get(n, torch.zeros(0)).to(device), grids.get(n))
              for n, d in deltas.items()}
    copy = insert_input_modules(graph_copy(gm, device), [layers[n] for n in probes], probes,
                                "biascorr")
    for batch in data.batches(batch_size, fixed=fixed):
        b = batch.to(device)
        first = b.args[0] if b.args else next(iter(b.kwargs.values()))
        for p in probes.values():
            p.full, p.valid = int(first.shape[0]), b.size
        copy(*b.args, **b.kwargs)
    return {n: p.shift() for n, p in probes.items()}


def correct_biases(
    gm: fx.GraphModule | None,
    layers: Mapping[str, GraphLayer],
    folded: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]],
    bits: Mapping[str, tuple[int, int | None]],
    data: CalibrationSet,
    batch_size: int,
    fixed: bool = False,
    device: torch.device | str = "cpu",
    grids: Mapping[str, Grid] | None = None,
    sums: Mapping[str, InputSums] | None = None,
    deltas: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W, b - mu)}`` for every layer in ``bits`` (``(w_bits, group_size)``, or with
    a third entry, the clip ratios of the scales), from the BN-folded ``(W, b)`` of ``folded``
    (``b`` None counts as zero); float32 biases. Layers in
    ``grids`` (their input grids) get the ``"layer"`` correction, the others ``"weight"``: from
    their ``sums`` (the train inputs summed per tap, ``quantize.observe``) when given, no pass;
    the pass over ``data`` through ``gm`` runs only for the layers left (none: ``gm`` unused).
    ``deltas``: ``Q(W) - W`` of some layers, computed already (:func:`codes_delta`)."""
    grids, sums, given = grids or {}, sums or {}, deltas or {}
    deltas = {n: given[n] if n in given else weight_delta(folded[n][0], *bits[n]) for n in bits}
    shifts = {n: sums[n].mean_output(d) for n, d in deltas.items()
              if n in sums and n not in grids}
    rest = {n: d for n, d in deltas.items() if n not in shifts}
    if rest:
        weights = {n: folded[n][0].detach().cpu() for n in grids if n in rest}
        if gm is None:
            raise ValueError(f"no input sums for {sorted(rest)}: the pass needs the model")
        shifts.update(output_shifts(gm, layers, rest, data, batch_size, fixed, device, weights,
                                    {n: g for n, g in grids.items() if n in rest}))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (weight, bias) in folded.items():
        if name not in shifts:
            continue
        b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else \
            bias.detach().cpu().to(torch.float64)
        out[name] = (weight, (b - shifts[name]).to(torch.float32))
    return out


__all__ = ["codes_delta", "correct_biases", "layer_op", "output_shifts", "weight_delta"]
