"""`bitplan export`, the pipeline's export stage (model.onnx + the report's onnx section)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from svc_helpers import FAST_HESSIAN

import quantize
from quantize.onnx import session
from sensitivity.intake import load_calibration, load_program
from service.cli import main
from service.pipeline import STAGES, run_pipeline


@pytest.fixture(scope="module")
def job(mlp_pt2, calib_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_job")
    calls: list[str] = []
    result = run_pipeline(mlp_pt2, calib_path,
                          {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.7},
                           "pin": {"first": None, "last": 8}},
                          out, progress=lambda s, f: calls.append(s))
    return result, out, calls


def test_pipeline_writes_a_verified_onnx_model(job, calib_path) -> None:
    result, out, calls = job
    assert calls[-1] == "export" and "export" in STAGES
    section = json.loads((out / "report.json").read_text())["onnx"]
    assert section == result.report["onnx"]
    assert section["exported"] and section["passed"] and section["top1_agreement"] >= 0.99
    model = onnx.load(str(out / "model.onnx"))
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["fc1_w_q"] == onnx.TensorProto.INT4  # the 0.7 x INT8 plan's 4-bit layer
    x = load_calibration(calib_path).args[0][:8]
    got = session(model).run(None, {"x": x.numpy()})[0]
    assert np.isfinite(got).all() and got.shape == (8, 10)


def test_export_command_writes_a_model_ort_runs(job, mlp_pt2, calib_path, tmp_path,
                                                capsys) -> None:
    _, out_dir, _ = job
    out = tmp_path / "cli.onnx"
    code = main(["export", str(out_dir / "model.safetensors"), "--program", str(mlp_pt2),
                 "--out", str(out), "--calib", str(calib_path), "--samples", "100"])
    assert code == 0 and out.is_file()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["samples"] == 100 and printed["top1_agreement"] >= 0.99
    x = load_calibration(calib_path).args[0][:50]
    got = session(onnx.load(str(out))).run(None, {"x": x.numpy()})[0]
    module = quantize.load(out_dir / "model.safetensors", load_program(mlp_pt2))
    with torch.no_grad():
        want = module(x).numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_export_command_refuses_a_checkpoint_of_another_model(job, cnn_pt2,
                                                              tmp_path) -> None:
    _, out_dir, _ = job
    out = tmp_path / "m.onnx"
    assert main(["export", str(out_dir / "model.safetensors"), "--program", str(cnn_pt2),
                 "--out", str(out)]) == 2
    assert not out.exists()
