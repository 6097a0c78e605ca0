"""The Pareto points' evaluations use a bounded, seeded random share of the held-out set."""

from __future__ import annotations

import torch

from sensitivity.intake import intake
from service.pipeline import _holdout_subset


def test_points_are_evaluated_on_a_seeded_random_subset(cnn_pt2, calib_path):
    it = intake(cnn_pt2, calib_path)
    n = len(it.holdout)
    assert n > 8
    sub = _holdout_subset(it, 8, seed=0)
    assert len(sub.holdout) == 8 and len(sub.train) == len(it.train)
    rows = {tuple(x.flatten().tolist()) for x in it.holdout.args[0]}
    picked = [tuple(x.flatten().tolist()) for x in sub.holdout.args[0]]
    assert all(r in rows for r in picked)  # held-out samples only
    again = _holdout_subset(it, 8, seed=0)
    assert torch.equal(again.holdout.args[0], sub.holdout.args[0])  # deterministic
    first = it.holdout.args[0][:8]
    assert not torch.equal(sub.holdout.args[0], first)  # not the file's first samples
    assert _holdout_subset(it, n, seed=0) is it
