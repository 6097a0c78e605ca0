"""A job's Pareto fronts (service/tradeoff.py) and plots (service/plots.py): the data behind
them, and what the pipeline writes."""

from __future__ import annotations

import json

import pytest
from svc_helpers import FAST_HESSIAN

from service import plots, tradeoff
from service.pipeline import run_pipeline
from solver import ParetoPoint, Problem


def _point(budget: float, choices: dict[str, int] | None) -> ParetoPoint:
    return ParetoPoint(budget, "optimal" if choices else "infeasible",
                       1.0 if choices else None, choices or {}, {"size_bytes": budget})


def test_pick_spreads_distinct_feasible_points() -> None:
    front = [_point(0, None)] + [_point(b, {"a": b // 3}) for b in range(1, 20)]
    picked = tradeoff.pick(front, 5)
    assert picked[0] == 1 and picked[-1] == 19  # both feasible ends
    assert len(picked) == len({tuple(front[i].choices.items()) for i in picked}) <= 5
    assert all(front[i].choices for i in picked)
    assert tradeoff.pick([_point(0, None)], 5) == []
    assert tradeoff.pick(front, 1) == [19] and tradeoff.pick(front, 0) == []


@pytest.fixture(scope="module")
def job(cnn_pt2, calib_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("tradeoff") / "out"
    cons = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.7, "bops_ratio": 0.9},
            "weight_bits": [2, 4, 8], "pin": {"first": None, "last": None}}
    result = run_pipeline(cnn_pt2, calib_path, cons, out, pareto_points=12, pareto_evaluate=3)
    return out, result


def test_pipeline_writes_a_front_per_limited_resource(job) -> None:
    out, result = job
    doc = tradeoff.load(json.loads((out / "pareto.json").read_text()))
    problem = Problem.from_json((out / "problem.json").read_text())
    assert set(doc["fronts"]) == {"size_bytes", "bops"}
    for r, front in doc["fronts"].items():
        pts = [p for p in front["points"] if p["objective"] is not None]
        assert len(front["points"]) == 12 and len(pts) >= 2
        # Omega never rises as the budget grows (each point is an optimum under its budget)
        objs = [p["objective"] for p in pts]
        assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(objs, objs[1:], strict=False))
        assert all(p["totals"][r] <= p["budget"] * (1 + 1e-9) for p in pts)
        # the chosen plan is the job's own, within its limit, and no front point under the
        # same budget (with the other limit held) beats it
        chosen = front["chosen"]
        assert chosen["objective"] == pytest.approx(result.plan["objective"])
        assert chosen["totals"][r] <= front["limit"] * (1 + 1e-9)
        under = [p["objective"] for p in pts if p["budget"] <= front["limit"]]
        assert all(o >= chosen["objective"] * (1 - 1e-9) for o in under)
        measured = [p for p in front["points"] if p["metrics"]]
        assert 1 <= len(measured) <= 3
        assert all(0.0 <= p["metrics"]["quant_accuracy"] <= 1.0 for p in measured)
        assert all(sum(p["options"].values()) == len(problem.layers) for p in pts)
    assert doc["fronts"]["size_bytes"]["chosen"]["metrics"] == result.report["metrics"]


def test_plots_are_written_and_drawn_from_the_plan(job) -> None:
    out, result = job
    for name in plots.NAMES:
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") if name.endswith(".png") else b"<svg" in data[:400]
    sens = json.loads((out / "sensitivity.json").read_text())
    d = plots.bits_data(result.plan, sens)
    assert d["names"] == [r["name"] for r in result.plan["layers"]]
    assert d["w_bits"] == [r["w_bits"] for r in result.plan["layers"]]
    by_name = {s["name"]: s for s in sens["layers"]}
    assert d["sensitivity"] == [pytest.approx(by_name[n]["weight_trace"] / by_name[n]["params"])
                                for n in d["names"]]
    p = plots.pareto_data(json.loads((out / "pareto.json").read_text()))
    assert p["size_bytes"]["metric"] == "quant_accuracy"
    assert p["size_bytes"]["limit"] == result.plan["limits"]["size_bytes"]


def test_a_front_swept_before_comes_from_the_cache(job, tmp_path, monkeypatch) -> None:
    import dataclasses

    from service.cache import StageCache
    from solver.problem import Limits

    out, _ = job
    problem = Problem.from_json((out / "problem.json").read_text())
    cache = StageCache(tmp_path / "cache")
    first = tradeoff.fronts(problem, 8, cache=cache)
    assert len(list((tmp_path / "cache" / "fronts").iterdir())) == 2  # size and BOPS
    # another size limit: the size front is the same sweep (its budgets replace the limit),
    # the BOPS front holds the new size limit, so it is swept again
    lim = problem.limits
    tighter = dataclasses.replace(problem, limits=Limits(size_bytes=lim.size_bytes * 0.9,
                                                         bops=lim.bops))
    swept: list[str] = []
    real = tradeoff.pareto

    def counted(p, resource, *args, **kwargs):
        swept.append(resource)
        return real(p, resource, *args, **kwargs)

    monkeypatch.setattr(tradeoff, "pareto", counted)
    again = tradeoff.fronts(tighter, 8, cache=cache)
    assert swept == ["bops"]
    assert again["size_bytes"] == first["size_bytes"] == real(tighter, "size_bytes", 8)
    assert tradeoff.fronts(problem, 8, cache=cache) == first and swept == ["bops"]
    assert tradeoff.fronts(problem, 9, cache=cache)["size_bytes"] != first["size_bytes"]
