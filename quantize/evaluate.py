"""What a plan costs: FP32 vs quantized outputs on the held-out calibration samples."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .data import CalibrationSet, run_batch

ProgressFn = Callable[[str, float], None]


def _flat(out: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, K] float64 (K = classes for logits)."""
    return out.detach().to(torch.float64).reshape(out.shape[0], -1)


def evaluate(
    fp32_module: nn.Module,
    quant_module: nn.Module,
    holdout: CalibrationSet,
    batch_size: int,
    *,
    fixed: bool = False,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Metrics of ``quant_module`` against ``fp32_module`` on ``holdout``.

    Returns a dict with ``samples``; ``fp32_accuracy`` / ``quant_accuracy`` / ``accuracy_drop``
    (fractions; None without labels); ``top1_agreement`` (argmax over the last output dim);
    ``kl_mean`` (nats: mean over samples of KL(softmax(fp32) || softmax(quant)) over the last
    dim); ``sqnr_db`` (10 log10 of signal over quantization-noise energy of the outputs; None
    when the outputs are identical) and ``output_mse``. With ``fixed`` every batch has exactly
    ``batch_size`` rows (padded), for programs exported with a fixed batch size.
    """
    device = device or torch.device("cpu")
    n = correct_f = correct_q = agree = 0
    kl_sum = signal = noise = 0.0
    labels = holdout.labels is not None
    n_batches = max(1, math.ceil(len(holdout) / batch_size))
    with torch.no_grad():
        for i, batch in enumerate(holdout.batches(batch_size, fixed=fixed)):
            batch = batch.to(device)
            f = _flat(run_batch(fp32_module, batch))
            q = _flat(run_batch(quant_module, batch))
            n += batch.size
            top_f, top_q = f.argmax(dim=1), q.argmax(dim=1)
            agree += int((top_f == top_q).sum())
            if labels:
                y = batch.labels[: batch.size].reshape(-1)
                correct_f += int((top_f == y).sum())
                correct_q += int((top_q == y).sum())
            logp, logq = torch.log_softmax(f, dim=1), torch.log_softmax(q, dim=1)
            kl_sum += float((logp.exp() * (logp - logq)).sum())
            signal += float(f.pow(2).sum())
            noise += float((f - q).pow(2).sum())
            if progress is not None:
                progress("evaluate", (i + 1) / n_batches)
    fp32_acc = correct_f / n if labels else None
    quant_acc = correct_q / n if labels else None
    numel = n * (f.shape[1] if n else 1)
    return {
        "samples": n,
        "labelled": labels,
        "fp32_accuracy": fp32_acc,
        "quant_accuracy": quant_acc,
        "accuracy_drop": None if not labels else fp32_acc - quant_acc,
        "top1_agreement": agree / n,
        "kl_mean": kl_sum / n,
        "sqnr_db": None if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-300) / noise),
        "output_mse": noise / max(numel, 1),
    }
