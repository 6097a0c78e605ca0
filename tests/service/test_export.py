"""`bitplan export`, the pipeline's export stage (model.onnx + the report's onnx section)."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert section["exported"] and section["passed"] and section["top1_agreement_decisive"] >= 0.99
    # Over all 79 held-out samples, near-ties included: ONNX Runtime's kernels differ by CPU, so
    # a near-tie may flip on another one. Measured 0 flips (here: 0 of 397, the smallest
    # reference top-2 gap 0.047 against the largest output difference 0.020); 3 allowed.
    assert section["top1_agreement"] >= 1 - 3 / section["samples"]
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
    assert printed["samples"] == 100 and printed["top1_agreement"] >= 0.97  # 3 flips (above)
    x = load_calibration(calib_path).args[0][:50]
    got = session(onnx.load(str(out))).run(None, {"x": x.numpy()})[0]
    module = quantize.load(out_dir / "model.safetensors", load_program(mlp_pt2))
    with torch.no_grad():
        want = module(x).numpy()
    assert (got.argmax(1) != want.argmax(1)).sum() <= 3  # of 50; measured 0 (see above)


def test_export_command_refuses_a_checkpoint_of_another_model(job, cnn_pt2,
                                                              tmp_path) -> None:
    _, out_dir, _ = job
    out = tmp_path / "m.onnx"
    assert main(["export", str(out_dir / "model.safetensors"), "--program", str(cnn_pt2),
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_profile_writes_a_latency_table_the_constraints_accept(cnn_pt2, tmp_path) -> None:
    from quantize.graph import find_layers
    from quantize.onnx.profile import ProfileConfig, layer_model
    from service.constraints import parse_constraints

    out = tmp_path / "latency.json"
    assert main(["profile", str(cnn_pt2), "--runtime", "onnxruntime", "--batch", "2",
                 "--weight-bits", "4,8", "--activation-bits", "4,8", "--warmup", "1",
                 "--repeat", "3", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    table = doc["latency_table"]
    assert set(table) == {"conv1", "conv2", "fc"}
    for row in table.values():
        assert set(row) == {"w4a4", "w4a8", "w8a4", "w8a8"}
        assert all(v > 0 for v in row.values())
    assert doc["input_shapes"]["conv2"] == [2, 8, 8, 8] and doc["config"]["batch"] == 2
    cons = parse_constraints({"limits": {"latency_ratio": 0.9}, "latency_table": table})
    assert cons.latency_table == table
    # the timed graph is the export's layer subgraph: int4 weights -> DQ -> Conv, QDQ around
    layer = next(x for x in find_layers(load_program(cnn_pt2).module()) if x.name == "conv2")
    model = layer_model(layer, (2, 8, 8, 8), 4, 8)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and "Conv" in ops
    assert ProfileConfig().repeat >= 10
    # each layer alone instead of inside the model: the same table shape, no glue figures
    iso = tmp_path / "iso.json"
    assert main(["profile", str(cnn_pt2), "--method", "isolated", "--warmup", "0",
                 "--repeat", "2", "--out", str(iso)]) == 0
    doc = json.loads(iso.read_text())
    assert doc["method"] == "isolated" and "rest_ms" not in doc
    assert set(doc["latency_table"]) == {"conv1", "conv2", "fc"}


def test_hardware_onnxruntime_cpu_measures_latency_once(mlp_pt2, calib_path, tmp_path) -> None:
    """The job measures its latency table in ONNX Runtime, writes latency.json, and a re-plan
    of the same model and options reuses the cached measurement."""
    from service.cache import StageCache
    from service.constraints import parse_constraints
    from service.pipeline import _measured_latency

    cache = StageCache(tmp_path / "cache")
    cons = {"hessian": FAST_HESSIAN, "limits": {"latency_ratio": 1.5},
            "hardware": "onnxruntime-cpu", "weight_bits": [4, 8], "pin": {"first": None}}
    first = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "a", cache=cache, pareto_points=0)
    doc = json.loads((tmp_path / "a" / "latency.json").read_text())
    table = doc["latency_table"]
    assert set(table) == {"fc1", "fc2"} and set(table["fc1"]) == {"w4a8", "w8a8"}
    assert doc["runtime"].startswith("onnxruntime") and doc["config"]["batch"] == 1
    assert "latency" not in first.reused
    for row in first.plan["layers"]:  # the plan's latencies are the measured ones
        assert row["latency_ms"] == pytest.approx(table[row["name"]][f"w{row['w_bits']}a8"])
    source = first.plan["latency_source"]  # and the plan says where they were measured
    assert source["kind"] == "measured" and source["file"] == "latency.json"
    assert source["runtime"] == doc["runtime"] and source["cpu"] == doc["cpu"]
    assert source["method"] == "context" and source["batch"] == 1 and source["threads"] == 1
    assert source["cache_key"]
    # a re-plan of the same model and options: the cached table, no intake needed
    reused: list[str] = []
    again, again_source = _measured_latency(mlp_pt2, None, parse_constraints(cons), cache,
                                            reused, tmp_path)
    assert reused == ["latency"] and again == table and again_source == source
    assert json.loads((tmp_path / "latency.json").read_text()) == doc


def test_get_onnx_route(client, service, mlp_pt2, calib_path) -> None:
    """GET /jobs/{id}/onnx: 409 while queued, the file once succeeded, 404 for a succeeded job
    without one (a model the exporter cannot express)."""
    from svc_helpers import constraints, post_plan

    ids = []
    for _ in range(2):
        r = post_plan(client, mlp_pt2.read_bytes(), calib_path.read_bytes(),
                      constraints(size_mb=0.01))
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    r = client.get(f"/jobs/{ids[0]}/onnx")
    assert r.status_code == 409
    assert client.get(f"/jobs/{ids[0]}").json()["links"]["onnx"] == f"/jobs/{ids[0]}/onnx"
    for i, job_id in enumerate(ids):
        job = service.store.claim(job_id)
        assert job is not None
        if i == 0:
            Path(job.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(job.out_dir) / "model.onnx").write_bytes(b"onnx-bytes")
        assert service.store.mark_succeeded(job_id)
    r = client.get(f"/jobs/{ids[0]}/onnx")
    assert r.status_code == 200 and r.content == b"onnx-bytes"
    assert r.headers["content-disposition"].endswith(f'{ids[0]}.onnx"')
    assert client.get(f"/jobs/{ids[1]}/onnx").status_code == 404


def test_measured_drq_options_take_the_timed_drq_entries(cnn_pt2, calib_path,
                                                          tmp_path) -> None:
    """With DRQ modes and hardware onnxruntime-cpu, every DRQ option's latency is the timed
    DRQ subgraph of its layer and region, not the plain entries mixed by the MAC fraction."""
    cons = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.9},
            "hardware": "onnxruntime-cpu", "weight_bits": [4, 8], "activation_bits": [4, 8],
            "drq": {"region_sizes": [2], "sensitive_fractions": [0.3]}}
    run_pipeline(cnn_pt2, calib_path, cons, tmp_path, pareto_points=0, plots=False)
    table = json.loads((tmp_path / "latency.json").read_text())["latency_table"]
    problem = json.loads((tmp_path / "problem.json").read_text())
    drq_options = [(la["name"], o) for la in problem["layers"] for o in la["options"]
                   if o.get("drq")]
    assert drq_options
    for name, o in drq_options:
        assert o["latency_ms"] == pytest.approx(table[name][f"w{o['w_bits']}drq2x2"])
