"""Does a plan's DRQ pay? The plan with DRQ rows against the same problem's best plan without DRQ
options, both quantized and scored on the calibration samples with the job's loss.

The ILP ranks plans by a sum of second-order Omegas, and a DRQ option adds one more estimate
(the activation error of its mixed INT8 / INT4 grid), so the proxy can prefer a DRQ plan that
measures worse. ``compare`` measures both plans on the samples they were calibrated on (never
the held-out or evaluation samples: those judge the result) and keeps the DRQ plan only when its
mean loss is lower by more than ``margin_se`` paired standard errors of the per-sample
difference. Ties and noise-sized gains go to the plan without DRQ, which needs no DRQ runtime.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .api import apply
from .config import QuantizeConfig
from .data import CalibrationSet
from .evaluate import REFERENCE_MAX_BYTES, Reference, Runner, reference_outputs
from .graph import program_module

KINDS = ("cross_entropy", "kl", "mse")


@dataclass(frozen=True)
class CheckConfig:
    """``margin_se``: DRQ is kept only when its mean calibration loss is lower than the plan
    without DRQ by more than this many paired standard errors (1: a gain larger than the noise
    of the difference on these samples). ``label_free``: score a classifier (job loss
    cross-entropy) by KL to the FP32 outputs instead of cross-entropy at the labels: two
    plans' per-sample cross-entropy differs by a first-order term ``(p - y) . dz`` that is zero
    only on average and buries the second-order gain in noise, while KL to FP32 has no
    first-order term (docs/drq.md measures both). ``batch_size``: samples per forward pass of
    a dynamic-batch program."""

    margin_se: float = 1.0
    label_free: bool = True
    batch_size: int = 64

    def loss(self, loss_kind: str) -> str:
        """The check's loss for a job whose loss is ``loss_kind``."""
        return "kl" if self.label_free and loss_kind == "cross_entropy" else loss_kind

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin_se) and self.margin_se >= 0):
            raise ValueError("margin_se must be a finite number >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class CheckResult:
    """The two plans' mean per-sample loss on ``samples`` calibration samples, the paired
    standard error of their difference (DRQ minus off), and the plan kept (``"drq"`` or
    ``"off"``) with the reason."""

    kept: str
    loss_drq: float
    loss_off: float
    diff_se: float
    samples: int
    loss_kind: str
    margin_se: float
    reason: str
    seconds: float = 0.0

    @property
    def diff(self) -> float:
        return self.loss_drq - self.loss_off

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "loss_drq": self.loss_drq, "loss_off": self.loss_off,
                "diff": self.diff, "diff_se": self.diff_se, "samples": self.samples,
                "loss_kind": self.loss_kind, "margin_se": self.margin_se,
                "reason": self.reason, "seconds": self.seconds}


def sample_losses(reference: nn.Module | Reference | None, module: nn.Module, data: CalibrationSet,
                  loss_kind: str, batch_size: int, fixed: bool = False,
                  device: torch.device | None = None) -> torch.Tensor:
    """``module``'s loss per sample of ``data`` ([N], float64): cross-entropy at the labels,
    KL(softmax(reference) || softmax(module)) over the last dim, or MSE to ``reference``'s
    outputs (the job's loss kinds, as ``sensitivity.measured``; a mean over tokens for
    [N, T, V] outputs). Cross-entropy without labels falls back to KL. ``reference``: the FP32
    module, or its outputs on ``data`` measured once (``quantize.evaluate.reference_outputs``);
    unused (may be None) for cross-entropy at labels."""
    if loss_kind not in KINDS:
        raise ValueError(f"loss kind must be one of {KINDS}, got {loss_kind!r}")
    if loss_kind == "cross_entropy" and data.labels is None:
        loss_kind = "kl"
    if loss_kind != "cross_entropy" and reference is None:
        raise ValueError(f"loss kind {loss_kind!r} needs the FP32 reference")
    device = device or torch.device("cpu")
    out = []
    start = 0
    fp32 = reference if isinstance(reference, nn.Module) and loss_kind != "cross_entropy" \
        else None
    run = Runner([module, fp32])  # channels-last for image models, as evaluate runs them
    with torch.no_grad():
        try:
            for b in data.batches(batch_size, fixed=fixed):
                b = b.to(device)
                rows = slice(start, start + b.size)
                start += b.size
                outs = run(b)
                q = outs[0].to(torch.float64)
                if loss_kind == "cross_entropy":
                    labels = b.labels[: b.size]
                    per = F.cross_entropy(q.reshape(-1, q.shape[-1]), labels.reshape(-1),
                                          reduction="none").reshape(labels.shape)
                else:
                    t = (reference.outputs[rows].to(device) if isinstance(reference, Reference)
                         else outs[1]).to(torch.float64)
                    if loss_kind == "kl":
                        logp = F.log_softmax(t, dim=-1)
                        per = (logp.exp() * (logp - F.log_softmax(q, dim=-1))).sum(-1)
                    else:
                        per = (q - t).pow(2)
                out.append(per.reshape(b.size, -1).mean(1).cpu())
        finally:
            run.close()
    return torch.cat(out)


def decide(loss_drq: torch.Tensor, loss_off: torch.Tensor, loss_kind: str,
           cfg: CheckConfig | None = None) -> CheckResult:
    """The paired comparison of two per-sample loss vectors (same samples, same order)."""
    cfg = cfg or CheckConfig()
    if loss_drq.shape != loss_off.shape or loss_drq.numel() < 2:
        raise ValueError("need two per-sample loss vectors of the same length >= 2")
    d = (loss_drq - loss_off).to(torch.float64)
    n = d.numel()
    se = float(d.std()) / math.sqrt(n)
    gain = -float(d.mean())
    keep = gain > cfg.margin_se * se and gain > 0
    ratio = gain / se if se > 0 else (math.inf if gain > 0 else 0.0)
    reason = (f"DRQ lowers the calibration loss by {gain:.4g} ({ratio:.1f} paired se; "
              f"kept above {cfg.margin_se:g} se)" if keep else
              f"DRQ changes the calibration loss by {-gain:+.4g} ({ratio:.1f} paired se of "
              f"gain, needs more than {cfg.margin_se:g}): the plan without DRQ is kept")
    return CheckResult("drq" if keep else "off", float(loss_drq.mean()), float(loss_off.mean()),
                       se, n, loss_kind, cfg.margin_se, reason)


def compare(program: torch.export.ExportedProgram, plans: Mapping[str, Any],
            train: CalibrationSet, loss_kind: str, cfg: CheckConfig | None = None, *,
            batch_size: int | None = None, device: torch.device | None = None,
            activations: Any = None, clip: Any = None) -> CheckResult:
    """Quantize ``plans["drq"]`` and ``plans["off"]`` (calibrated on ``train``, as the job
    quantizes), score both on ``train`` with the check's loss for a job whose loss is
    ``loss_kind`` (``cfg.loss``) and decide (:func:`decide`).
    ``batch_size``: the program's fixed export batch size (None: dynamic); ``activations``:
    the job's layer input statistics of ``train`` (``quantize.observe``); ``clip``: the job's
    weight clip ratios (``quantize.clip.ClipRatios``; None: max|W| scales)."""
    cfg = cfg or CheckConfig()
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    chunk = batch_size or cfg.batch_size
    fixed = batch_size is not None
    losses = {}
    loss_kind = cfg.loss(loss_kind)
    if loss_kind == "cross_entropy" and train.labels is not None:
        reference: nn.Module | Reference | None = None  # scored at the labels alone
    else:  # the FP32 outputs, measured once for both plans (its module when too large)
        module = program_module(program).to(device)
        reference = reference_outputs(module, train, chunk, fixed=fixed, device=device,
                                      max_bytes=REFERENCE_MAX_BYTES) or module
    for key in ("drq", "off"):
        qcfg = QuantizeConfig(batch_size=cfg.batch_size,
                              weight_clip="max" if clip is None else clip.mode)
        # no evaluation inside apply: the module is scored here, once
        res = apply(program, plans[key], train, None, qcfg, batch_size=batch_size,
                    device=device, activations=activations, clip=clip)
        losses[key] = sample_losses(reference, res.module, train, loss_kind, chunk, fixed,
                                    device)
    result = decide(losses["drq"], losses["off"], loss_kind, cfg)
    return dataclasses.replace(result, seconds=time.perf_counter() - t0)
