"""What a plan costs: FP32 vs quantized outputs on the held-out calibration samples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import Batch, CalibrationSet, run_batch

ProgressFn = Callable[[str, float], None]


IGNORE_INDEX = -100  # a per-token label that is not scored
# FP32 outputs measured once are kept for every plan scored on the same samples up to this
# size (a classifier's are kilobytes; a language model's [N, T, V] logits may not be worth
# holding: above it, each plan runs the FP32 module again)
REFERENCE_MAX_BYTES = 256 * 2**20
Z95 = 1.959964  # two-sided 95 % normal quantile
TOO_FEW = 0.01  # an interval half-width above one point cannot tell typical plans apart


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion k / n (None for n = 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def t_quantile(df: int, z: float = Z95) -> float:
    """Student-t quantile matching the normal quantile ``z`` (Cornish-Fisher expansion: 0.7 % below
    the exact value at df = 3, 0.13 % at df = 5, under 0.01 % from df = 9)."""
    if df <= 0:
        return math.inf
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def mean_interval(total: float, squares: float, n: int) -> tuple[float, float] | None:
    """95 % t-interval of a mean from the sum and the sum of squares of n values."""
    if n < 2:
        return None
    mean = total / n
    var = max(squares - n * mean * mean, 0.0) / (n - 1)
    half = t_quantile(n - 1) * math.sqrt(var / n)
    return mean - half, mean + half


# Image models run channels-last here: the layout the CPU's convolutions are fastest in, which
# the fake-quant chains keep (quantize.fakequant._dense); measured in docs/internals.md. A graph
# that cannot run so (a view of a channels-last map) runs as exported.
CHANNELS_LAST = True


def _is_image(a: object) -> bool:
    return torch.is_tensor(a) and a.dim() == 4 and a.is_floating_point()


def _image_args(batch: Batch) -> bool:
    return any(_is_image(a) for a in [*batch.args, *batch.kwargs.values()])


def _as_channels_last(batch: Batch) -> Batch:
    def conv(a: object) -> object:
        return a.contiguous(memory_format=torch.channels_last) if _is_image(a) else a
    return Batch(tuple(conv(a) for a in batch.args),
                 {k: conv(v) for k, v in batch.kwargs.items()}, batch.labels, batch.size)


class Runner:
    """Runs ``modules`` (None entries dropped) on batches, channels-last when the first batch
    is an image batch, the modules are ``nn.Module`` s with 4-D weights and that first run
    succeeds (else as exported, the modules restored); ``close()`` gives the modules their
    layout back (their weights may be the program's own, shared)."""

    def __init__(self, modules: list[Callable[..., Any] | None]) -> None:
        self.modules = [m for m in modules if m is not None]
        self.channels_last: bool | None = None

    def _set(self, fmt: torch.memory_format) -> None:
        for m in self.modules:
            m.to(memory_format=fmt)

    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        if self.channels_last is None:
            self.channels_last = CHANNELS_LAST and _image_args(batch) \
                and all(isinstance(m, nn.Module) for m in self.modules) and any(
                    p.dim() == 4 for m in self.modules for p in [*m.parameters(), *m.buffers()])
            if self.channels_last:
                try:
                    self._set(torch.channels_last)
                    return [run_batch(m, _as_channels_last(batch)) for m in self.modules]
                except RuntimeError:  # e.g. a view of a channels-last map: run as exported
                    self.close()
                    self.channels_last = False
        if self.channels_last:
            batch = _as_channels_last(batch)
        return [run_batch(m, batch) for m in self.modules]

    def close(self) -> None:
        if self.channels_last:
            self._set(torch.contiguous_format)


def _interval(value: float | None, n: int, ci: tuple[float, float] | None,
              method: str) -> dict | None:
    if value is None or ci is None:
        return None
    return {"value": value, "n": n, "low": ci[0], "high": ci[1], "method": method}


def _flat(out: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, K] float64 (K = classes for logits)."""
    return out.detach().to(torch.float64).reshape(out.shape[0], -1)


def _rows(out: torch.Tensor) -> torch.Tensor:
    """The rows that are one softmax each: [N, C] as is, [N, T, V] logits as [N * T, V]
    (one row per token), anything else flattened per sample."""
    if out.dim() == 3:
        return out.detach().to(torch.float64).reshape(-1, out.shape[-1])
    return _flat(out)


def _token_ids(batch: Batch, token_input: str | int | None) -> torch.Tensor | None:
    if token_input is None:
        return None
    if isinstance(token_input, int):
        return batch.args[token_input][: batch.size]
    return batch.kwargs[token_input][: batch.size]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of [..., V] logits at ``targets``."""
    rows, t = logits.reshape(-1, logits.shape[-1]).to(torch.float64), targets.reshape(-1)
    keep = t != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(rows[keep], t[keep], reduction="sum")
    return float(nll), int(keep.sum())


@dataclass(frozen=True)
class Reference:
    """The FP32 module's outputs on every real sample of a held-out set, in order (rows
    ``[i, i + n)`` for the batch starting at sample ``i``): measured once, it serves every plan
    evaluated on that set (``evaluate(reference=)``)."""

    outputs: torch.Tensor
    samples: int

    @property
    def nbytes(self) -> int:
        return self.outputs.numel() * self.outputs.element_size()


@torch.no_grad()
def reference_outputs(fp32_module: nn.Module, holdout: CalibrationSet, batch_size: int, *,
                      fixed: bool = False, device: torch.device | None = None,
                      max_bytes: int | None = None) -> Reference | None:
    """``fp32_module``'s outputs on ``holdout`` (batches as ``evaluate`` runs them, kept on the
    CPU), or None when they would exceed ``max_bytes`` (known after the first batch: the
    outputs of a language model's vocabulary can be large)."""
    device = device or torch.device("cpu")
    parts: list[torch.Tensor] = []
    run = Runner([fp32_module])
    try:
        for batch in holdout.batches(batch_size, fixed=fixed):
            out = run(batch.to(device))[0].detach().cpu().contiguous()
            if max_bytes is not None and out.element_size() * out[:1].numel() * len(holdout) \
                    > max_bytes:
                return None
            parts.append(out)
    finally:
        run.close()
    return Reference(torch.cat(parts), len(holdout))


def evaluate(
    fp32_module: nn.Module | None,
    quant_module: nn.Module,
    holdout: CalibrationSet,
    batch_size: int,
    *,
    fixed: bool = False,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
    token_input: str | int | None = None,
    reference: Reference | None = None,
) -> dict:
    """Metrics of ``quant_module`` against ``fp32_module`` on ``holdout`` (against the FP32
    outputs in ``reference`` instead, when given: then ``fp32_module`` is not run).

    Returns a dict with ``samples``; ``fp32_accuracy`` / ``quant_accuracy`` / ``accuracy_drop``
    (fractions; None without labels); ``top1_agreement`` (argmax over the last output dim);
    ``kl_mean`` (nats: mean over samples of KL(softmax(fp32) || softmax(quant)) over the last
    dim); ``sqnr_db`` (10 log10 of signal over quantization-noise energy of the outputs; None
    when the outputs are identical) and ``output_mse``. With ``fixed`` every batch has exactly
    ``batch_size`` rows (padded), for programs exported with a fixed batch size.

    Language models ([N, T, V] logits): agreement, KL and accuracy are per token (mean over
    tokens); ``fp32_perplexity`` / ``quant_perplexity`` are exp of the mean token NLL, at the
    ``[N, T]`` labels (``IGNORE_INDEX`` not scored) or, without labels, at the next token of the
    integer input ``token_input`` (a keyword name or a positional index). ``cosine_mean`` is
    the mean cosine similarity of quantized to FP32 outputs for [N, D] outputs (embeddings);
    these three are None where they do not apply.
    """
    device = device or torch.device("cpu")
    if reference is not None and reference.samples != len(holdout):
        raise ValueError(f"the reference outputs are of {reference.samples} samples, "
                         f"the held-out set has {len(holdout)}")
    if reference is None and fp32_module is None:
        raise ValueError("evaluate needs the FP32 module or its reference outputs")
    n = rows_seen = correct_f = correct_q = scored = agree = 0
    kl_sum = kl_sq = signal = noise = cos_sum = 0.0
    diff_sum = diff_sq = 0  # paired per-row correctness difference fp32 - quant
    nll_f = nll_q = 0.0
    nll_tokens = 0
    labels = holdout.labels is not None
    n_batches = max(1, math.ceil(len(holdout) / batch_size))
    per_sample = 1
    out_dim = 0
    run = Runner([quant_module, fp32_module if reference is None else None])
    with torch.no_grad():
        try:
            for i, batch in enumerate(holdout.batches(batch_size, fixed=fixed)):
                batch = batch.to(device)
                outs = run(batch)
                qo = outs[0]
                fo = outs[1] if reference is None else \
                    reference.outputs[n:n + batch.size].to(device)
                out_dim = fo.dim()
                f, q = _rows(fo), _rows(qo)
                per_sample = f.shape[0] // batch.size
                n += batch.size
                rows_seen += f.shape[0]
                top_f, top_q = f.argmax(dim=1), q.argmax(dim=1)
                agree += int((top_f == top_q).sum())
                if labels:
                    y = batch.labels[: batch.size].reshape(-1)
                    keep = y != IGNORE_INDEX
                    correct_f += int((top_f == y)[keep].sum())
                    correct_q += int((top_q == y)[keep].sum())
                    d = ((top_f == y).long() - (top_q == y).long())[keep]
                    diff_sum += int(d.sum())
                    diff_sq += int(d.pow(2).sum())
                    scored += int(keep.sum())
                logp, logq = torch.log_softmax(f, dim=1), torch.log_softmax(q, dim=1)
                kl_rows = (logp.exp() * (logp - logq)).sum(dim=1)
                kl_sum += float(kl_rows.sum())
                kl_sq += float(kl_rows.pow(2).sum())
                signal += float(f.pow(2).sum())
                noise += float((f - q).pow(2).sum())
                if out_dim == 2:
                    cos_sum += float(torch.nn.functional.cosine_similarity(f, q, dim=1).sum())
                if out_dim == 3:
                    ids = _token_ids(batch, token_input)
                    if labels:
                        targets, lf, lq = batch.labels[: batch.size], fo, qo
                    elif ids is not None:
                        targets, lf, lq = ids[:, 1:], fo[:, :-1], qo[:, :-1]
                    else:
                        targets = None
                    if targets is not None:
                        a, tokens = _nll(lf, targets)
                        nll_f += a
                        nll_q += _nll(lq, targets)[0]
                        nll_tokens += tokens
                if progress is not None:
                    progress("evaluate", (i + 1) / n_batches)
        finally:
            run.close()
    fp32_acc = correct_f / max(scored, 1) if labels else None
    quant_acc = correct_q / max(scored, 1) if labels else None
    numel = rows_seen * (f.shape[1] if n else 1)
    intervals = {
        "fp32_accuracy": _interval(fp32_acc, scored, wilson(correct_f, scored) if labels
                                   else None, "wilson"),
        "quant_accuracy": _interval(quant_acc, scored, wilson(correct_q, scored) if labels
                                    else None, "wilson"),
        "accuracy_drop": _interval(None if not labels else fp32_acc - quant_acc, scored,
                                   mean_interval(diff_sum, diff_sq, scored), "paired t"),
        "top1_agreement": _interval(agree / max(rows_seen, 1), rows_seen,
                                    wilson(agree, rows_seen), "wilson"),
        "kl_mean": _interval(kl_sum / max(rows_seen, 1), rows_seen,
                             mean_interval(kl_sum, kl_sq, rows_seen), "t"),
    }
    key = "quant_accuracy" if labels else "top1_agreement"
    half = None if intervals[key] is None else (intervals[key]["high"] - intervals[key]["low"]) / 2
    return {
        "intervals": intervals,
        "too_few_samples": half is None or half > TOO_FEW,
        "resolution": None if half is None else (
            f"95 % interval of {key} on {intervals[key]['n']} rows: +-{half * 100:.1f} points; "
            "plans closer than that cannot be told apart on this evaluation set"
            + (" (too few samples: give a larger evaluation file)" if half > TOO_FEW else "")),
        "samples": n,
        "labelled": labels,
        "fp32_accuracy": fp32_acc,
        "quant_accuracy": quant_acc,
        "accuracy_drop": None if not labels else fp32_acc - quant_acc,
        "top1_agreement": agree / max(rows_seen, 1),
        "kl_mean": kl_sum / max(rows_seen, 1),
        "sqnr_db": None if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-300) / noise),
        "output_mse": noise / max(numel, 1),
        "tokens_per_sample": per_sample if out_dim == 3 else None,
        "fp32_perplexity": math.exp(nll_f / nll_tokens) if nll_tokens else None,
        "quant_perplexity": math.exp(nll_q / nll_tokens) if nll_tokens else None,
        "cosine_mean": cos_sum / n if out_dim == 2 and n else None,
    }
