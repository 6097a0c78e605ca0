"""Evaluation metrics against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantize.data import CalibrationSet
from quantize.evaluate import evaluate


class _Fixed(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def test_metrics_match_direct_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(37, 5, generator=gen)
    q = f + 0.3 * torch.randn(37, 5, generator=gen)
    labels = torch.randint(0, 5, (37,), generator=gen)
    data = CalibrationSet((torch.arange(37),), labels=labels)
    got = evaluate(_Fixed(f), _Fixed(q), data, batch_size=8)
    assert got["samples"] == 37
    assert got["fp32_accuracy"] == pytest.approx(float((f.argmax(1) == labels).float().mean()))
    assert got["quant_accuracy"] == pytest.approx(float((q.argmax(1) == labels).float().mean()))
    agree = float((f.argmax(1) == q.argmax(1)).float().mean())
    assert got["top1_agreement"] == pytest.approx(agree)
    kl = torch.nn.functional.kl_div(q.log_softmax(1), f.log_softmax(1), log_target=True,
                                    reduction="batchmean")
    assert got["kl_mean"] == pytest.approx(float(kl), rel=1e-5)
    sqnr = 10 * math.log10(float(f.pow(2).sum() / (f - q).pow(2).sum()))
    assert got["sqnr_db"] == pytest.approx(sqnr, rel=1e-6)


def test_identical_outputs_and_fixed_batches_without_labels() -> None:
    f = torch.randn(10, 3)
    data = CalibrationSet((torch.arange(10),))
    got = evaluate(_Fixed(f), _Fixed(f), data, batch_size=4, fixed=True)
    assert got["samples"] == 10 and got["fp32_accuracy"] is None
    assert got["top1_agreement"] == 1.0 and got["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert got["sqnr_db"] is None and got["output_mse"] == 0.0
