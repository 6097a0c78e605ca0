"""Measured Omega: each layer's loss increase when only that layer is quantized.

``measured_omegas(intake, weight_bits, activation_bits, ...)`` runs the calibration set through
the model once in FP32, then once per (layer, bit width): with that layer's weights on the b-bit
grid (the same symmetric per-output-channel quantizer the checkpoint uses), or with its input on
the a-bit per-tensor grid of the job's activation statistics (``quantize.observe``: min/max
over the same samples, the grid ``sensitivity.engine`` and the quantize stage use; observed
here first when not given). Omega is twice the increase of the mean calibration loss,
clamped at zero, so it sits on the scale of the Hessian estimates (``omega ~ 2 * delta L``,
see ``engine.py``).

Cost: ``1 + L * (|weight_bits| + |activation_bits|)`` forward passes over the calibration set
(one more for the FP32 targets of a self-distillation loss, and one more to observe the ranges
when they are not given), no backward pass. The sum over layers ignores interactions between
layers, as every Omega does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantize.data import Batch, run_batch
from quantize.graph import insert_input_modules
from quantize.observe import ActivationStats, observe
from quantize.primitives import fake_quantize_activation, fake_quantize_weight

ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class MeasuredOmegas:
    """Per layer: ``{bits: omega}`` for weights and for the input activation, and the FP32 loss
    they were measured against."""

    omega_w: dict[str, dict[int, float]]
    omega_a: dict[str, dict[int, float]]
    fp32_loss: float
    passes: int


class _InputQuant(nn.Module):
    """Fake-quantizes its input when ``grid`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.grid: tuple[float, int, bool] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            return x
        scale, bits, signed = self.grid
        return fake_quantize_activation(x, scale, bits, signed)


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[index,return-value]


def batch_loss(out: torch.Tensor, b: Batch, target: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Sum over the batch's real rows of the per-sample loss (mean over tokens for [N, T, V])."""
    out = out[: b.size].float()
    if kind == "cross_entropy":
        labels = b.labels[: b.size]
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1),
                              reduction="none").reshape(labels.shape)
    elif kind == "kl":
        assert target is not None
        logp = F.log_softmax(target.float(), dim=-1)
        per = (logp.exp() * (logp - F.log_softmax(out, dim=-1))).sum(-1)
    elif kind == "mse":
        assert target is not None
        per = (out - target.float()).pow(2)
    else:
        raise ValueError(f"measured Omega has no loss for loss kind {kind!r}")
    return per.reshape(b.size, -1).mean(1).sum()


@torch.no_grad()
def measured_omegas(
    intake: object,
    weight_bits: Sequence[int],
    activation_bits: Sequence[int],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    stage: str = "sensitivity",
    activations: ActivationStats | None = None,
) -> MeasuredOmegas:
    """Measured Omega tables for every layer of ``intake`` (an ``Intake``: module, layers,
    train, loss_kind, batch_size) on its training calibration samples; ``activations``: their
    layer input statistics (``quantize.observe``; observed here when None)."""
    device = torch.device(device)
    layers = [layer.graph for layer in intake.layers]  # type: ignore[attr-defined]
    fixed = intake.batch_size is not None  # type: ignore[attr-defined]
    chunk = intake.batch_size or batch_size  # type: ignore[attr-defined]
    passes = 0
    if activations is None:
        activations = observe(intake.module, layers, intake.train, chunk, fixed,  # type: ignore
                              device)
        passes += 1
    gm = copy.deepcopy(intake.module).to(device)  # type: ignore[attr-defined]
    probes = {layer.name: _InputQuant() for layer in layers}
    insert_input_modules(gm, layers, probes, "measured_probe")
    batches = [b.to(device) for b in intake.train.batches(chunk, fixed=fixed)]  # type: ignore
    n = sum(b.size for b in batches)
    kind = intake.loss_kind  # type: ignore[attr-defined]

    def loss() -> float:
        nonlocal passes
        passes += 1
        total = 0.0
        for b, t in zip(batches, targets, strict=True):
            total += float(batch_loss(_first(run_batch(gm, b)), b, t, kind))
        return total / n

    targets: list[torch.Tensor | None] = [None] * len(batches)
    if kind != "cross_entropy":
        targets = [_first(run_batch(gm, b)).detach() for b in batches]
        passes += 1
    base = loss()
    params = dict(gm.named_parameters())
    omega_w: dict[str, dict[int, float]] = {}
    omega_a: dict[str, dict[int, float]] = {}
    for i, layer in enumerate(layers):
        w = params[layer.weight]
        original = w.detach().clone()
        omega_w[layer.name] = {}
        for bits in weight_bits:
            w.copy_(fake_quantize_weight(original, int(bits)))
            omega_w[layer.name][int(bits)] = max(2.0 * (loss() - base), 0.0)
        w.copy_(original)
        probe = probes[layer.name]
        omega_a[layer.name] = {}
        if activations[layer.name].seen:
            for bits in activation_bits:
                scale, signed = activations.grid(layer.name, int(bits))
                probe.grid = (scale, int(bits), signed)
                omega_a[layer.name][int(bits)] = max(2.0 * (loss() - base), 0.0)
            probe.grid = None
        if progress is not None:
            progress(stage, (i + 1) / len(layers))
    return MeasuredOmegas(omega_w, omega_a, base, passes)
