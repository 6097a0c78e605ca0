"""Measured Omega: each layer's loss increase when only that layer is quantized.

``measured_omegas(intake, weight_bits, activation_bits, ...)`` runs the calibration set through
the model once in FP32, then once per (layer, bit width): with that layer's weights on the b-bit
grid (the same symmetric per-output-channel quantizer the checkpoint uses), or with its input on
the a-bit per-tensor grid of the job's activation statistics (``quantize.observe``: min/max
over the same samples, the grid ``sensitivity.engine`` and the quantize stage use; observed
here first when not given). Omega is twice the increase of the mean calibration loss,
clamped at zero, so it sits on the scale of the Hessian estimates (``omega ~ 2 * delta L``,
see ``engine.py``).

``bias_correction`` (``QuantizeConfig.bias_correction``) measures the layer as the checkpoint
stores it: ``"weight"`` and ``"layer"`` subtract from the quantized-weight layer's output the
mean shift ``mu_o = E[op(x, Q(W) - W)]_o`` (x the layer's input in the FP32 model, the mean
over the calibration samples and output positions, as ``quantize.biascorr`` measures it);
``"layer"`` also subtracts ``E[op(Q_a(x) - x, W)]_o`` from the quantized-input layer's output
(the correction of its own input rounding). The shifts come from one more pass.

``loss`` picks what the increase is measured in: ``"job"`` the intake's own loss, or
``"label_free"``: for a cross-entropy (classifier) job the KL divergence of the quantized
model's softmax to the FP32 model's own (``sum_c p_c (log p_c - log q_c)`` per sample), other
jobs their own loss (already a distance to the FP32 outputs). A cross-entropy difference on a
few hundred samples carries a first-order term ``(p - y) . dz`` per sample whose spread swamps
the second-order increase Omega stands for; KL to FP32 is zero at the FP32 model with zero
gradient there, so its increase is second order (docs/drq.md, "Measured Omega by KL").

Cost: ``1 + L * (|weight_bits| + |activation_bits|)`` forward passes over the calibration set
(one more for the FP32 targets of a self-distillation loss, one more to observe the ranges
when they are not given, one more for the shifts of a bias correction), no backward pass. The
sum over layers ignores interactions between layers, as every Omega does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantize.biascorr import layer_op, weight_delta
from quantize.clip import ClipRatios
from quantize.data import Batch, run_batch
from quantize.graph import GraphLayer, insert_input_modules, insert_output_modules
from quantize.observe import ActivationStats, observe
from quantize.primitives import fake_quantize_activation, fake_quantize_weight

BIAS_CORRECTIONS = ("none", "weight", "layer")
LOSSES = ("job", "label_free")

ProgressFn = Callable[[str, float], None]


@dataclass(frozen=True)
class MeasuredOmegas:
    """Per layer: ``{bits: omega}`` for weights and for the input activation, and the FP32 loss
    they were measured against."""

    omega_w: dict[str, dict[int, float]]
    omega_a: dict[str, dict[int, float]]
    fp32_loss: float
    passes: int
    bias_correction: str = "none"
    loss_kind: str = "cross_entropy"  # the loss the increases were measured in


class _InputQuant(nn.Module):
    """Fake-quantizes its input when ``grid`` is set; hands the first ``rows`` rows (the real
    ones) to ``observer`` when set."""

    def __init__(self) -> None:
        super().__init__()
        self.grid: tuple[float, int, bool] | None = None
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x if self.rows is None else x[: self.rows])
        if self.grid is None:
            return x
        scale, bits, signed = self.grid
        return fake_quantize_activation(x, scale, bits, signed)


class _OutputShift(nn.Module):
    """Subtracts ``shift`` (per output channel, on ``axis``) from the layer's output when set."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.shift: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return y
        axis = self.axis % y.dim()
        return y - self.shift.to(y.dtype).reshape([-1 if i == axis else 1
                                                   for i in range(y.dim())])


def _channel_sums(layer: GraphLayer, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per output channel the sum of ``y`` (float64, CPU) and the rows summed over."""
    axis = y.dim() - 1 if layer.kind == "linear" else 1
    y = y.movedim(axis, -1).reshape(-1, y.shape[axis]).double()
    return y.sum(0).cpu(), int(y.shape[0])


class _ShiftMeans:
    """Observer of a layer's input (real rows): per output channel the means of
    ``op(x, Q_b(W) - W)`` per weight width and of ``op(Q_a(x) - x, W)`` per activation grid."""

    def __init__(self, layer: GraphLayer, weight: torch.Tensor, weight_bits: Sequence[int],
                 grids: dict[int, tuple[float, bool]],
                 ratios: dict[int, torch.Tensor | None] | None = None) -> None:
        self.layer, self.weight, self.grids = layer, weight, grids
        self.ratios = ratios or {}
        self.weight_bits = [int(b) for b in weight_bits]
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.count = 0

    def _add(self, key: tuple[str, int], y: torch.Tensor) -> int:
        total, rows = _channel_sums(self.layer, y)
        self.sums[key] = self.sums[key] + total if key in self.sums else total
        return rows

    def __call__(self, x: torch.Tensor) -> None:
        v, w = x.detach(), self.weight.detach()
        rows = 0
        for b in self.weight_bits:
            delta = weight_delta(w, b, None, self.ratios.get(b)).to(device=v.device,
                                                                    dtype=v.dtype)
            rows = self._add(("w", b), layer_op(self.layer, v, delta))
        for a, (scale, signed) in self.grids.items():
            dq = fake_quantize_activation(v, scale, a, signed) - v
            rows = self._add(("a", a), layer_op(self.layer, dq, w.to(v.dtype)))
        self.count += rows

    def mean(self, key: tuple[str, int]) -> torch.Tensor:
        return self.sums[key] / max(self.count, 1)


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[index,return-value]


def measured_loss_kind(job_loss_kind: str, loss: str) -> str:
    """The loss a measured Omega uses: the job's, or for ``loss="label_free"`` KL to FP32
    when the job's loss is cross-entropy (its own loss otherwise)."""
    if loss not in LOSSES:
        raise ValueError(f"measured Omega loss must be one of {LOSSES}, got {loss!r}")
    return "kl" if loss == "label_free" and job_loss_kind == "cross_entropy" else job_loss_kind


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
    bias_correction: str = "none",
    loss: str = "job",
    clip: ClipRatios | None = None,
) -> MeasuredOmegas:
    """Measured Omega tables for every layer of ``intake`` (an ``Intake``: module, layers,
    train, loss_kind, batch_size) on its training calibration samples; ``activations``: their
    layer input statistics (``quantize.observe``; observed here when None);
    ``bias_correction``: the quantizer's (``"none"``, ``"weight"``, ``"layer"``); ``loss``:
    ``"job"`` (the intake's loss) or ``"label_free"`` (KL to FP32 for a classifier);
    ``clip``: the weight scales' clip ratios (``quantize.clip``; None: max|W|), for every
    width in ``weight_bits``."""
    clip = clip or ClipRatios()
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, "
                         f"got {bias_correction!r}")
    kind = measured_loss_kind(intake.loss_kind, loss)  # type: ignore[attr-defined]
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
    # a list on the device; for a streamed train set, each chunk read when a pass needs it
    batches = intake.train.chunks(chunk, fixed, device)  # type: ignore[attr-defined]
    n = len(intake.train)  # type: ignore[attr-defined]

    def mean_loss() -> float:
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
    base = mean_loss()
    params = dict(gm.named_parameters())
    ratios = {layer.name: {int(b): clip.ratio(layer.name, int(b)) for b in weight_bits}
              for layer in layers}
    means = _shift_means(gm, layers, probes, batches, params, weight_bits,
                         activation_bits if bias_correction == "layer" else (), activations,
                         ratios) \
        if bias_correction != "none" else {}
    passes += bool(means)
    shifts = {layer.name: _OutputShift(-1 if layer.kind == "linear" else 1) for layer in layers}
    if means:
        insert_output_modules(gm, layers, shifts, "measured_shift")
    omega_w: dict[str, dict[int, float]] = {}
    omega_a: dict[str, dict[int, float]] = {}
    for i, layer in enumerate(layers):
        w = params[layer.weight]
        original = w.detach().clone()
        omega_w[layer.name] = {}
        for bits in weight_bits:
            w.copy_(fake_quantize_weight(original, int(bits), None,
                                         ratios[layer.name][int(bits)]))
            if means:
                shifts[layer.name].shift = means[layer.name].mean(("w", int(bits))).to(device)
            omega_w[layer.name][int(bits)] = max(2.0 * (mean_loss() - base), 0.0)
        w.copy_(original)
        shifts[layer.name].shift = None
        probe = probes[layer.name]
        omega_a[layer.name] = {}
        if activations[layer.name].seen:
            for bits in activation_bits:
                scale, signed = activations.grid(layer.name, int(bits))
                probe.grid = (scale, int(bits), signed)
                if bias_correction == "layer":
                    shifts[layer.name].shift = means[layer.name].mean(("a", int(bits))).to(device)
                omega_a[layer.name][int(bits)] = max(2.0 * (mean_loss() - base), 0.0)
            probe.grid = None
            shifts[layer.name].shift = None
        if progress is not None:
            progress(stage, (i + 1) / len(layers))
    return MeasuredOmegas(omega_w, omega_a, base, passes, bias_correction, kind)


def _shift_means(gm: torch.fx.GraphModule, layers: Sequence[GraphLayer],
                 probes: dict[str, _InputQuant], batches: list[Batch],
                 params: dict[str, torch.Tensor], weight_bits: Sequence[int],
                 activation_bits: Sequence[int], activations: ActivationStats,
                 ratios: dict[str, dict[int, torch.Tensor | None]] | None = None,
                 ) -> dict[str, _ShiftMeans]:
    """One FP32 pass: every layer's mean output shifts (``_ShiftMeans``) on its float input."""
    means = {}
    for layer in layers:
        grids = {int(a): activations.grid(layer.name, int(a)) for a in activation_bits
                 if activations[layer.name].seen}
        means[layer.name] = _ShiftMeans(layer, params[layer.weight], weight_bits, grids,
                                        (ratios or {}).get(layer.name))
        probes[layer.name].observer = means[layer.name]
    try:
        for b in batches:
            for probe in probes.values():
                probe.rows = b.size
            run_batch(gm, b)
    finally:
        for probe in probes.values():
            probe.observer, probe.rows = None, None
    return means
