"""``hessian.bias_corrected``: the plan's Omega prices the quantize stage's bias correction."""

from __future__ import annotations

import json

import pytest
from svc_helpers import FAST_HESSIAN

from service.pipeline import run_pipeline


@pytest.mark.parametrize("omega", ["trace", "measured"])
def test_bias_corrected_omega_is_recorded_and_reaches_the_problem(cnn_pt2, calib_path, tmp_path,
                                                                  omega) -> None:
    base = {"limits": {"size_ratio": 0.7}, "pin": {"first": None, "last": None}}
    sens = {}
    for corrected in (False, True):
        cons = {**base, "hessian": {**FAST_HESSIAN, "omega": omega,
                                    "bias_corrected": corrected}}
        out = tmp_path / f"{omega}-{corrected}"
        result = run_pipeline(cnn_pt2, calib_path, cons, out)
        assert result.plan["constraints"]["hessian"]["bias_corrected"] is corrected
        sens[corrected] = json.loads((out / "sensitivity.json").read_text())
        # the quantize stage's correction (QuantizeConfig's default) is the one priced
        assert sens[corrected]["config"]["bias_correction"] == ("weight" if corrected else "none")
        problem = json.loads((out / "problem.json").read_text())
        rows = {r["name"]: r for r in sens[corrected]["layers"]}
        for layer in problem["layers"]:
            for o in layer["options"]:
                row = rows[layer["name"]]
                assert o["omega"] == pytest.approx(
                    row["omega_w"][str(o["w_bits"])] + row["omega_a"]["8"], rel=1e-9)
    for raw, cor in zip(sens[False]["layers"], sens[True]["layers"], strict=True):
        assert raw["omega_w_kept"] == {}
        if omega == "trace":  # the same traces, times the kept share
            for b, kept in cor["omega_w_kept"].items():
                assert cor["omega_w"][b] == pytest.approx(raw["omega_w"][b] * kept, rel=1e-9)
        else:  # measured on the corrected layer: no kept shares, a lower 4-bit increase
            assert cor["omega_w_kept"] == {}
    if omega == "trace":  # the kept shares from the sweep's own probe vectors
        assert sens[True]["model"]["kept_probes"] == {"sweep": sens[True]["model"]["vectors"],
                                                      "separate": 0}
    if omega == "measured":
        assert sum(r["omega_w"]["4"] for r in sens[True]["layers"]) < sum(
            r["omega_w"]["4"] for r in sens[False]["layers"])


def test_bias_corrected_is_the_default() -> None:
    from service.constraints import parse_constraints

    assert parse_constraints({"limits": {"size_ratio": 0.5}}).hessian.bias_corrected is True
