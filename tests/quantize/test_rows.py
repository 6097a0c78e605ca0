"""quantize reads plans through the solver's one validator (solver.plan.Plan.from_dict)."""

from __future__ import annotations

import copy

import pytest

from quantize.graph import find_layers
from quantize.rows import match_rows, parse_rows
from solver.errors import BadPlanError
from solver.plan import Plan, PlanRow


def test_rows_are_the_solver_plan_rows(cnn_program, plan_for) -> None:
    plan = plan_for(cnn_program)
    rows = parse_rows(plan)
    assert all(isinstance(r, PlanRow) for r in rows)
    assert rows == list(Plan.from_dict(plan).rows) == parse_rows(Plan.from_dict(plan))
    matched = match_rows(rows, find_layers(cnn_program.module()))
    assert list(matched) == ["conv1", "conv2", "fc"]


@pytest.mark.parametrize("mutate", [
    lambda p: p["layers"][0].update(a_bits=12),  # quantize accepted 2..16 before
    lambda p: p["layers"][0].update(params=None),  # quantize accepted a missing size before
    lambda p: p["layers"][0].pop("omega"),
    lambda p: p.update(version=1),
    lambda p: p["layers"][2].update(drq={"region": [2, 2], "threshold": 1,
                                         "sensitive_fraction": 0.5, "mac_fraction": 0.5,
                                         "high_bits": 8, "low_bits": 4, "scale": 0.1,
                                         "signed": False}, a_bits=6.0),  # drq on a linear
])
def test_quantize_refuses_what_the_solver_refuses(cnn_program, plan_for, mutate) -> None:
    plan = copy.deepcopy(plan_for(cnn_program))
    mutate(plan)
    with pytest.raises(BadPlanError) as solver_err:
        Plan.from_dict(plan)
    with pytest.raises(BadPlanError) as quantize_err:
        parse_rows(plan)
    assert str(quantize_err.value) == str(solver_err.value)
