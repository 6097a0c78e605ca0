"""The job's report and the `bitplan plan` output say which trace blocks stopped at max_iter."""

from __future__ import annotations

import json

from service.cli import main
from service.commands.plan import format_summary
from service.pipeline import run_pipeline

FREE_FIRST = {"first": None, "last": 8}


def test_report_names_the_blocks_stopped_at_max_iter(mlp_pt2, calib_path, tmp_path) -> None:
    # tol 1e-4 cannot be reached in 4 vectors: every block stops at max_iter
    capped = {"limits": {"size_ratio": 0.7}, "pin": FREE_FIRST,
              "hessian": {"max_iter": 4, "tol": 1e-4, "seed": 0}}
    result = run_pipeline(mlp_pt2, calib_path, capped, tmp_path / "capped")
    s = result.report["sensitivity"]
    assert s["max_iter"] == 4 and s["converged"] == 0
    assert s["blocks"] == len(s["stopped_at_max_iter"]) >= 2
    assert "fc1 (weight)" in s["stopped_at_max_iter"]
    on_disk = json.loads((tmp_path / "capped" / "report.json").read_text())
    assert on_disk["sensitivity"] == s
    assert "stopped at max_iter (4 vectors)" in format_summary(result.plan, result.report)
    # a tolerance every block reaches: nothing named, no line
    loose = {**capped, "hessian": {"max_iter": 400, "tol": 0.5, "seed": 0}}
    result = run_pipeline(mlp_pt2, calib_path, loose, tmp_path / "loose")
    s = result.report["sensitivity"]
    assert s["stopped_at_max_iter"] == [] and s["converged"] == s["blocks"]
    assert "max_iter" not in format_summary(result.plan, result.report)


def test_plan_command_prints_the_blocks_stopped_at_max_iter(mlp_pt2, calib_path, tmp_path,
                                                            capsys) -> None:
    code = main(["plan", str(mlp_pt2), "--calib", str(calib_path), "--size-ratio", "0.7",
                 "--pin-first", "none", "--max-iter", "4", "--tol", "0.0001",
                 "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Hessian trace blocks stopped at max_iter (4 vectors)" in out and "fc1 (weight)" in out
