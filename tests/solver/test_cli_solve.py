"""``bitplan solve`` in-process through service.cli.main."""

from __future__ import annotations

import json

from test_hawq import DATA

from service.cli import main
from solver import Problem, Solution


def test_solve_writes_solution(tmp_path, capsys) -> None:
    out = tmp_path / "sol.json"
    rc = main(["solve", str(DATA / "resnet18_modelsize_0.5.json"), "--out", str(out)])
    assert rc == 0
    sol = Solution.from_json(out.read_text())
    assert sol.status == "optimal" and len(sol.choices) == 19
    text = capsys.readouterr().out
    assert "status: optimal" in text and "w8a8 x16" in text


def test_solve_with_pareto(tmp_path, capsys) -> None:
    out = tmp_path / "sol.json"
    rc = main(["solve", str(DATA / "resnet18_bops_0.5.json"), "--pareto", "size_bytes:4",
               "--time-limit", "20", "--out", str(out)])
    assert rc == 0
    obj = json.loads(out.read_text())
    assert obj["pareto"]["resource"] == "size_bytes" and len(obj["pareto"]["points"]) == 4
    assert Solution.from_json(out.read_text()).status == "optimal"
    objs = [p["objective"] for p in obj["pareto"]["points"]]
    assert objs == sorted(objs, reverse=True)
    assert "pareto size_bytes: 4 points" in capsys.readouterr().out


def test_infeasible_is_a_result_not_an_error(tmp_path, capsys) -> None:
    problem = Problem.from_json((DATA / "resnet18_modelsize_0.5.json").read_text())
    obj = problem.to_dict()
    obj["limits"]["size_bytes"] = 1000
    src = tmp_path / "p.json"
    src.write_text(json.dumps(obj))
    assert main(["solve", str(src), "--out", str(tmp_path / "s.json")]) == 0
    assert "below the smallest reachable" in capsys.readouterr().out


def test_errors_exit_2(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "layers": [], "bogus": 0}')
    assert main(["solve", str(bad), "--out", str(tmp_path / "s.json")]) == 2
    assert "bad_problem" in capsys.readouterr().err
    assert main(["solve", str(tmp_path / "missing.json"), "--out", "x"]) == 2
    assert main(["solve", str(DATA / "resnet18_bops_0.5.json"), "--pareto", "size_bytes:x",
                 "--out", str(tmp_path / "s.json")]) == 2
    assert "RESOURCE:N" in capsys.readouterr().err
