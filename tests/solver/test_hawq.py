"""The 18 HAWQ-V3 ILP instances (data + attribution in data/hawq_v3/README.md): the solver
must reproduce the published bit configurations, except resnet50_modelsize_0.25 where the
published one is provably dominated and the reference optimum is in solutions.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solver import Problem, solve
from solver.problem import within

DATA = Path(__file__).parent / "data" / "hawq_v3"
NAMES = sorted(p.name[: -len(".json")] for p in DATA.glob("resnet*_*[0-9].json"))
SOLUTIONS = json.loads((DATA / "solutions.json").read_text())["instances"]


def test_all_instances_present() -> None:
    assert len(NAMES) == 18


@pytest.mark.parametrize("name", NAMES)
def test_reproduces_published_bits(name: str) -> None:
    problem = Problem.from_json((DATA / f"{name}.json").read_text())
    sol = solve(problem)
    assert sol.status == "optimal"
    for r in problem.limits.active():
        assert within(sol.totals[r], problem.limits.get(r))
    bits = {la.name: la.options[sol.choices[la.name]].w_bits for la in problem.layers}
    reference = SOLUTIONS[name]
    # Holds on any CPU: every instance's optimum is unique in its bits by a relative margin of
    # at least 3.5e-4 (resnet50_latency_0.5; the best assignment with other bits, ties and
    # limits kept, by CBC), against float summation noise of ~1e-15 and the 1e-9 compared here.
    assert sol.objective == pytest.approx(reference["objective"], rel=1e-9)
    published = json.loads((DATA / f"{name}.expected.json").read_text())["bits"]
    if name == "resnet50_modelsize_0.25":
        assert bits == reference["bits"]
        assert bits != published  # the published config is feasible but dominated
    else:
        assert bits == published
