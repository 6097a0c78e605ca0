"""SolveConfig and Solution: validation and JSON round trips."""

from __future__ import annotations

import pytest
from bitplan_solver_cases import two_layer_problem

from solver import Limits, Solution, SolveConfig, solve
from solver.errors import BadProblemError


def test_solution_json_round_trip() -> None:
    for lim in (Limits(size_bytes=1.5e6), Limits(size_bytes=1.0)):
        sol = solve(two_layer_problem(lim))
        back = Solution.from_json(sol.to_json())
        assert back == sol


def test_solution_from_json_rejects_bad_input() -> None:
    with pytest.raises(BadProblemError):
        Solution.from_json("{")
    obj = solve(two_layer_problem(Limits())).to_dict()
    obj["extra"] = 1
    with pytest.raises(BadProblemError, match="solution keys"):
        Solution.from_dict(obj)


def test_solve_config_validation_and_round_trip() -> None:
    cfg = SolveConfig(solver="highs", time_limit_s=5.0, gap_rel=0.0)
    assert SolveConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BadProblemError, match="unknown solver"):
        SolveConfig(solver="gurobi")
    with pytest.raises(BadProblemError, match="time_limit_s"):
        SolveConfig(time_limit_s=0)
    with pytest.raises(BadProblemError, match="unknown keys"):
        SolveConfig.from_dict({"bogus": 1})
