"""``quantize.weight_clip: hessian``: a job runs with it end to end and records it (the ratios
in sensitivity.json, the mode in the plan's constraints and the report's quantize config), the
checkpoint's scales are the ratios' (per channel and per group), a cached sensitivity keeps
its grouped ratios, and bad values are refused naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from svc_helpers import FAST_HESSIAN

from quantize.checkpoint import read_checkpoint
from quantize.primitives import qmax_signed
from sensitivity.engine import SensitivityResult
from service.cache import StageCache
from service.constraints import parse_constraints
from service.pipeline import run_pipeline
from solver.errors import BadConstraintsError


def test_point_evaluations_are_not_shared_between_clips(mlp_pt2, calib_path, tmp_path) -> None:
    """A Pareto point's cached metrics belong to its scales: a hessian job evaluates its
    points itself, not with a max job's metrics of the same rows."""
    cons = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.7},
            "pin": {"first": None, "last": None}, "weight_bits": [4, 8]}
    cache = StageCache(tmp_path / "cache")
    run_pipeline(mlp_pt2, calib_path, {**cons, "quantize": {"weight_clip": "max"}},
                 tmp_path / "m", cache=cache, pareto_points=4, pareto_evaluate=2, plots=False)
    run_pipeline(mlp_pt2, calib_path, {**cons, "quantize": {"weight_clip": "hessian"}},
                 tmp_path / "h", cache=cache, pareto_points=4, pareto_evaluate=2, plots=False)
    # the front's first point is the smallest budget: every layer at its cheapest option in
    # both jobs, the same rows; its scales, and so its KL, differ
    first = [json.loads((tmp_path / d / "pareto.json").read_text())["fronts"]["size_bytes"]
             ["points"][0] for d in ("m", "h")]
    assert first[0]["options"] == first[1]["options"]
    assert first[0]["metrics"]["kl_mean"] != first[1]["metrics"]["kl_mean"]


def test_a_hessian_clip_job_runs_and_records_it(mlp_pt2, calib_path, tmp_path) -> None:
    cons = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.7},
            "pin": {"first": None, "last": None}, "weight_bits": [3, 4, 8],
            "weight_group_sizes": [None, 16], "quantize": {"weight_clip": "hessian"}}
    cache = StageCache(tmp_path / "cache")
    first = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "a", cache=cache,
                         pareto_points=0)
    assert first.plan["constraints"]["quantize"]["weight_clip"] == "hessian"
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["config"]["weight_clip"] == "hessian"
    sens = SensitivityResult.from_json((tmp_path / "a" / "sensitivity.json").read_text())
    assert sens.clip.mode == "hessian" and sens.config["weight_clip"] == "hessian"
    ckpt = read_checkpoint(tmp_path / "a" / "model.safetensors")
    weights = dict(torch.export.load(str(mlp_pt2)).module().named_parameters())
    below = 0
    for row in first.plan["layers"]:  # (the MLP has no BatchNorm: folded = trained weights)
        name, bits, group = row["name"], row["w_bits"], row.get("group_size")
        ratio = sens.clip.ratio(name, bits, group)
        w = weights[name + ".weight"].detach()
        absmax = w.reshape(w.shape[0], -1, group or w[0].numel()).abs().amax(2)
        want = (absmax * ratio.reshape(absmax.shape) / qmax_signed(bits)).reshape(ratio.shape)
        assert torch.allclose(ckpt.tensors[name + ".weight_scale"], want, rtol=1e-6)
        below += int((ratio < 1).sum())
    assert below > 0  # the clip is in use
    # a re-run takes the sensitivity (grouped ratios included) from the cache and writes the
    # same checkpoint scales; a max job is another cache entry
    second = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "b", cache=cache,
                          pareto_points=0)
    assert "sensitivity" in second.reused
    again = read_checkpoint(tmp_path / "b" / "model.safetensors")
    for row in first.plan["layers"]:
        key = row["name"] + ".weight_scale"
        assert torch.equal(again.tensors[key], ckpt.tensors[key])
    plain = run_pipeline(mlp_pt2, calib_path, {**cons, "quantize": {"weight_clip": "max"}},
                         tmp_path / "c", cache=cache, pareto_points=0)
    assert "sensitivity" not in plain.reused
    assert plain.plan["constraints"]["quantize"]["weight_clip"] == "max"


@pytest.mark.parametrize("bad", [{"weight_clip": "p99"}, {"weight_clip": None},
                                 {"clip": "max"}])
def test_bad_weight_clip_is_refused_naming_the_field(bad) -> None:
    with pytest.raises(BadConstraintsError) as err:
        parse_constraints({"limits": {"size_ratio": 0.5}, "quantize": bad})
    assert "quantize" in str(err.value.message) + json.dumps(err.value.detail)
