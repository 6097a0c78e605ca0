"""`bitplan quantize` end to end on files."""

from __future__ import annotations

import json

import torch

from quantize import load
from service.cli import main


def test_cli_writes_checkpoint_and_report(cnn_pt2, calib_path, cnn_program, plan_for, tmp_path,
                                          capsys) -> None:
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_for(cnn_program, w_bits=lambda i, _: 4 if i else 8)))
    out = tmp_path / "out" / "model.safetensors"
    rc = main(["quantize", str(cnn_pt2), "--plan", str(plan_path), "--calib", str(calib_path),
               "--out", str(out), "--holdout-fraction", "0.5"])
    assert rc == 0
    report = json.loads((out.parent / "report.json").read_text())
    assert report["version"] == 1 and report["metrics"]["samples"] == 198
    assert report["metrics"]["fp32_accuracy"] is not None
    assert "accuracy on 198 held-out samples" in capsys.readouterr().out
    module = load(out, cnn_program)
    with torch.no_grad():
        assert module(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_cli_reports_a_bad_plan(cnn_pt2, calib_path, mlp_program, plan_for, tmp_path,
                                capsys) -> None:
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_for(mlp_program)))  # made for another model
    rc = main(["quantize", str(cnn_pt2), "--plan", str(plan_path), "--calib", str(calib_path),
               "--out", str(tmp_path / "m.safetensors")])
    assert rc == 2
    assert "bad_plan" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_bias_correction_and_calibration_flags(cnn_pt2, calib_path, cnn_program, plan_for,
                                                   tmp_path) -> None:
    """--bias-correction and --calibration reach QuantizeConfig (the report's config), and the
    CLI's spelled-out choices are quantize.config's."""
    from quantize.config import BIAS_CORRECTIONS, CALIBRATION_METHODS
    from service.commands import quantize as command

    assert command.BIAS_CORRECTIONS == BIAS_CORRECTIONS
    assert command.CALIBRATIONS == CALIBRATION_METHODS
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_for(cnn_program, w_bits=lambda i, _: 4)))
    reports = {}
    for mode in ("none", "layer"):
        out = tmp_path / mode / "model.safetensors"
        rc = main(["quantize", str(cnn_pt2), "--plan", str(plan_path), "--calib",
                   str(calib_path), "--out", str(out), "--bias-correction", mode,
                   "--calibration", "mse"])
        assert rc == 0
        reports[mode] = json.loads((out.parent / "report.json").read_text())
        assert reports[mode]["config"]["bias_correction"] == mode
        assert reports[mode]["config"]["calibration"] == "mse"
    # the correction changes the checkpoint's output (4-bit weights shift the means)
    assert reports["none"]["metrics"]["kl_mean"] != reports["layer"]["metrics"]["kl_mean"]
