"""bench/drqevidence.py: the harder task's data and the per-digit statistic of its test."""

from __future__ import annotations

import pytest
import torch

from bench.drqevidence import distort, grouped_table


def test_distort_is_seeded_digit_major_and_changes_every_image():
    x = torch.rand(3, 1, 8, 8)
    a, b = distort(x, 4, seed=7), distort(x, 4, seed=7)
    assert a.shape == (12, 1, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a, distort(x, 4, seed=8))
    # digit-major: rows 0..3 are digit 0's variants, each closer to digit 0 than to digit 1
    for k in range(4):
        assert (a[k] - x[0]).abs().mean() < (a[k] - x[1]).abs().mean() + 0.2
    assert all(not torch.equal(a[k], x[k // 4]) for k in range(12))


def _rec(drq: list[int], off: list[int], kept: int) -> dict:
    per = {"ilp_correct": drq, "off_correct": off, "checked_correct": drq,
           "ilp_kl": [0.0] * len(drq), "off_kl": [0.1] * len(drq),
           "checked_kl": [0.0] * len(drq), "checked_drq_rows": kept}
    return {"budgets": {"m bops 0.5": {"drq_rows": kept, "per_image": per}}}


def test_the_unit_is_the_digit_mean_over_seeds_and_variants():
    # 3 digits x 2 variants, 2 seeds: per digit d = mean of (drq - off) over seeds and variants
    s0 = _rec([1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 1, 1], kept=1)  # digit gains 0.5, 0.5, 0
    s1 = _rec([1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1], kept=0)  # digit gains 0.5, 0, -0.5
    out = grouped_table({"m": {0: s0, 1: s1}}, variants=2)
    row = out["checked"][0]
    d = torch.tensor([0.5, 0.25, -0.25], dtype=torch.float64)
    assert row["gain"] == pytest.approx(float(d.mean()))
    assert row["gain_se"] == pytest.approx(float(d.std()) / 3 ** 0.5)
    assert row["seeds_with_drq"] == 1 and row["seeds"] == 2
    assert row["kl_z"] < 0 and row["p_holm"] == row["p"]  # one budget: Holm is p itself
    # 3 digits cannot reach p < 0.05 (the smallest two-sided sign-flip p is 2 / 8)
    assert row["p"] > 0.2 and out["verdict"] == {"win": [], "worse": []}
