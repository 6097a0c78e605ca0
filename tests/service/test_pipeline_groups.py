"""``weight_group_sizes``: per-group weight options from the sensitivity stage through the solver
to the checkpoint, on the trained digits MLP."""

from __future__ import annotations

import json

import pytest
import torch
from svc_helpers import FAST_HESSIAN

import quantize
from quantize.checkpoint import read_checkpoint
from quantize.primitives import weight_quant_error
from sensitivity.intake import load_program
from service.constraints import parse_constraints
from service.pipeline import run_pipeline
from solver.errors import BadConstraintsError
from solver.options import size_bytes


def test_grouped_options_are_costed_chosen_and_stored(mlp_pt2, calib_path, tmp_path) -> None:
    # fc1 (64 -> 32, fan-in 64) is free; fc2 (fan-in 32) is pinned at 8 bits, per channel.
    # At 0.8 x the INT8 size (2029 bytes) fc1 can afford 3/4-bit weights per channel (1152 B)
    # or with groups of 16 (1536 B), not groups of 8 (2048 B) nor 8 bits (2176 B).
    # (the trace Omega, whose formula is checked below; the diagonal's: test_pipeline_diagonal)
    cons = {"hessian": {**FAST_HESSIAN, "omega": "trace"}, "limits": {"size_ratio": 0.8},
            "pin": {"first": None, "last": 8}, "weight_bits": [3, 4, 8],
            "weight_group_sizes": [None, 16, 8, 64]}
    result = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "out")
    out = tmp_path / "out"
    sens = {r["name"]: r for r in json.loads((out / "sensitivity.json").read_text())["layers"]}
    weights = dict(load_program(mlp_pt2).module().named_parameters())
    # Omega of a grouping: Tr(H_w) / n * ||Q_{b,g}(W) - W||^2, for the sizes that fit a layer
    # (64 is fc1's whole fan-in, i.e. per channel, and does not divide fc2's 32: never offered)
    assert set(sens["fc1"]["omega_wg"]) == {"8", "16"}
    assert set(sens["fc2"]["omega_wg"]) == {"8", "16"}
    for name, row in sens.items():
        w = weights[f"{name}.weight"].detach()
        for g, table in row["omega_wg"].items():
            for b, omega in table.items():
                expect = row["weight_trace"] / row["params"] * weight_quant_error(w, int(b), int(g))
                expect *= row["omega_w_kept"].get(b, 1.0)  # with hessian.bias_corrected
                assert omega == pytest.approx(expect, rel=1e-6)
    problem = {la["name"]: la["options"] for la in json.loads((out / "problem.json").read_text())[
        "layers"]}
    tags = {o["tag"] for o in problem["fc1"]}
    assert tags == {f"w{b}{g}a8" for b in (3, 4, 8) for g in ("", "g8", "g16")}
    assert [o["tag"] for o in problem["fc2"]] == ["w8a8"]  # pinned: per channel
    for o in problem["fc1"]:
        g = o.get("group_size")
        assert o["size_bytes"] == size_bytes(2048, o["w_bits"], 32, g)
        table = sens["fc1"]["omega_w"] if g is None else sens["fc1"]["omega_wg"][str(g)]
        assert o["omega"] == pytest.approx(table[str(o["w_bits"])] + sens["fc1"]["omega_a"]["8"])
    # the plan takes the least Omega among fc1's options that fit (fc2's cost is fixed)
    plan = result.plan
    room = plan["limits"]["size_bytes"] - next(
        r["size_bytes"] for r in plan["layers"] if r["name"] == "fc2")
    best = min((o for o in problem["fc1"] if o["size_bytes"] <= room), key=lambda o: o["omega"])
    fc1 = next(r for r in plan["layers"] if r["name"] == "fc1")
    assert fc1["group_size"] == best.get("group_size") and fc1["w_bits"] == best["w_bits"]
    # groups of 16 pay here: a smaller weight error than per channel at the same 4 bits
    assert sens["fc1"]["omega_wg"]["16"]["4"] < sens["fc1"]["omega_w"]["4"]
    assert fc1["group_size"] == 16 and fc1["w_bits"] == 4
    ckpt = read_checkpoint(out / "model.safetensors")
    for row in plan["layers"]:
        stored = sum(ckpt.tensors[f"{row['name']}.{k}"].nbytes
                     for k in ("weight_q", "weight_scale"))
        assert stored == row["size_bytes"]
    assert ckpt.tensors["fc1.weight_scale"].shape == (32, 4)
    module = quantize.load(out / "model.safetensors", load_program(mlp_pt2))
    assert module(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    assert result.summary()["layers"] == {"w4g16a8": 1, "w8a8": 1}
    report = {r["name"]: r for r in result.report["layers"]}
    assert report["fc1"]["group_size"] == 16 and report["fc2"]["group_size"] is None


@pytest.mark.parametrize("bad", [[], [0], [None, None], [16, 16], [2.5], [True], ["8"], 8])
def test_bad_group_sizes_are_refused_naming_the_field(bad) -> None:
    with pytest.raises(BadConstraintsError, match="weight_group_sizes"):
        parse_constraints({"limits": {"size_ratio": 0.5}, "weight_group_sizes": bad})


def test_group_sizes_default_and_order() -> None:
    assert parse_constraints({"limits": {"size_ratio": 0.5}}).weight_group_sizes == [None]
    cons = parse_constraints({"limits": {"size_ratio": 0.5}, "weight_group_sizes": [64, None, 32]})
    assert cons.weight_group_sizes == [None, 32, 64]
