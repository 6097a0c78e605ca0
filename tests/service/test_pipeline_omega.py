"""``hessian.omega``: the pipeline's Omega tables from the Hessian traces or measured."""

from __future__ import annotations

import json

import pytest
from svc_helpers import FAST_HESSIAN

from service.constraints import parse_constraints
from service.pipeline import run_pipeline
from solver.errors import BadConstraintsError


def test_measured_omega_reaches_the_problem_and_the_plan(cnn_pt2, calib_path, tmp_path) -> None:
    cons = {"hessian": {**FAST_HESSIAN, "omega": "measured"}, "limits": {"size_ratio": 0.7},
            "pin": {"first": None, "last": None}}
    result = run_pipeline(cnn_pt2, calib_path, cons, tmp_path / "out")
    out = tmp_path / "out"
    sens = json.loads((out / "sensitivity.json").read_text())
    assert sens["config"]["omega"] == "measured"
    # 1 pass (FP32; the ranges come with the sensitivity) + 1 (the mean shifts of the bias
    # correction, hessian.bias_corrected by default) + 3 layers x (2 weight widths + 1
    # activation width)
    assert sens["config"]["bias_correction"] == "weight"
    assert sens["config"]["measured_passes"] == 1 + 1 + 3 * 3
    tables = {row["name"]: row["omega_w"] for row in sens["layers"]}
    problem = json.loads((out / "problem.json").read_text())
    for layer in problem["layers"]:
        for o in layer["options"]:  # activations at 8 bits: omega = omega_w + omega_a[8]
            row = next(r for r in sens["layers"] if r["name"] == layer["name"])
            assert o["omega"] == pytest.approx(
                tables[layer["name"]][str(o["w_bits"])] + row["omega_a"]["8"], rel=1e-9)
    assert result.plan["constraints"]["hessian"]["omega"] == "measured"


def test_unknown_omega_is_refused() -> None:
    with pytest.raises(BadConstraintsError, match="omega"):
        parse_constraints({"limits": {"size_ratio": 0.5}, "hessian": {"omega": "diagonal?"}})


def test_label_free_measured_omega_is_measured_in_kl(cnn_pt2, calib_path, tmp_path) -> None:
    """``hessian.measured_loss: label_free`` on a cross-entropy job: the tables are measured in
    KL to FP32 (recorded in ``sensitivity.json``) and differ from the job-loss tables."""
    cons = {"hessian": {**FAST_HESSIAN, "omega": "measured", "measured_loss": "label_free"},
            "limits": {"size_ratio": 0.7}, "pin": {"first": None, "last": None}}
    run_pipeline(cnn_pt2, calib_path, cons, tmp_path / "kl")
    job = {**cons, "hessian": {**cons["hessian"], "measured_loss": "job"}}
    run_pipeline(cnn_pt2, calib_path, job, tmp_path / "job")
    kl, ce = (json.loads((tmp_path / d / "sensitivity.json").read_text()) for d in ("kl", "job"))
    assert kl["config"]["measured_loss"] == "kl"
    assert ce["config"]["measured_loss"] == "cross_entropy"
    assert [r["omega_w"] for r in kl["layers"]] != [r["omega_w"] for r in ce["layers"]]
