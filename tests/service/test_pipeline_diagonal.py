"""``hessian.omega: diagonal``: the diagonal Omega tables (per channel and per group) reach the
problem, and a cached sensitivity keeps its grouped tables."""

from __future__ import annotations

import json

import pytest
from svc_helpers import FAST_HESSIAN

from service.cache import StageCache
from service.pipeline import run_pipeline


def _tables(out) -> tuple[dict, dict]:
    sens = json.loads((out / "sensitivity.json").read_text())
    problem = json.loads((out / "problem.json").read_text())
    return sens, problem


def test_diagonal_omega_reaches_the_problem_and_survives_the_cache(mlp_pt2, calib_path,
                                                                    tmp_path) -> None:
    cons = {"hessian": {**FAST_HESSIAN, "omega": "diagonal"}, "limits": {"size_ratio": 0.8},
            "pin": {"first": None, "last": None}, "weight_bits": [4, 8],
            "weight_group_sizes": [None, 16]}
    cache = StageCache(tmp_path / "cache")
    first = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "a", cache=cache)
    sens, problem = _tables(tmp_path / "a")
    assert sens["config"]["diagonal"] is True
    rows = {r["name"]: r for r in sens["layers"]}
    for layer in problem["layers"]:
        row = rows[layer["name"]]
        assert set(row["omega_wg"]) == {"16"}
        assert row["omega_w"]["4"] > row["omega_w"]["8"] > 0
        for o in layer["options"]:  # activations at 8 bits: omega = omega_w(g) + omega_a[8]
            g = o.get("group_size")
            table = row["omega_w"] if g is None else row["omega_wg"][str(g)]
            assert o["omega"] == pytest.approx(table[str(o["w_bits"])] + row["omega_a"]["8"],
                                               rel=1e-9)
    assert first.plan["constraints"]["hessian"]["omega"] == "diagonal"
    # a second job on the same files takes the sensitivity, grouped tables included, from
    # the cache (the diagonals themselves are not cached)
    second = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "b", cache=cache)
    assert "sensitivity" in second.reused
    again, _ = _tables(tmp_path / "b")
    assert [r["omega_wg"] for r in again["layers"]] == [r["omega_wg"] for r in sens["layers"]]
    # other group sizes are another sensitivity entry (their tables need the diagonal)
    other = {**cons, "weight_group_sizes": [None, 8]}
    third = run_pipeline(mlp_pt2, calib_path, other, tmp_path / "c", cache=cache)
    assert "sensitivity" not in third.reused
    assert all(set(r["omega_wg"]) == {"8"} for r in _tables(tmp_path / "c")[0]["layers"])
