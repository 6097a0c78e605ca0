"""service/loaded.py: a worker keeps the model its last job loaded for the next job on the same
files (a re-plan), and that job computes exactly what a fresh load computes."""

from __future__ import annotations

import json

import pytest
import torch
from svc_helpers import FAST_HESSIAN

import service.validation
from sensitivity import zoo
from service import loaded as L
from service.cache import StageCache
from service.pipeline import run_pipeline


def _cons(ratio: float) -> dict:
    return {"hessian": FAST_HESSIAN, "limits": {"size_ratio": ratio},
            "pin": {"first": None, "last": 8}}


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The model files the pipeline loaded (checked_intake calls)."""
    seen: list[str] = []
    real = service.validation.checked_intake

    def counted(model_path, *args):
        seen.append(str(model_path))
        return real(model_path, *args)

    monkeypatch.setattr(service.validation, "checked_intake", counted)
    return seen


def _run(model, calib, ratio, out, cache, loaded, **kw):
    return run_pipeline(model, calib, _cons(ratio), out, cache=cache, loaded=loaded,
                        pareto_points=6, pareto_evaluate=2, plots=False, **kw)


def test_the_next_job_on_the_same_files_takes_the_kept_model(
        mlp_pt2, calib_path, tmp_path, loads) -> None:
    kept, cache = L.LoadedModels(), StageCache(tmp_path / "cache")
    _run(mlp_pt2, calib_path, 0.8, tmp_path / "parent", cache, kept)
    child = _run(mlp_pt2, calib_path, 0.6, tmp_path / "child", cache, kept)
    assert loads == [str(mlp_pt2)]  # the re-plan loaded nothing
    fresh = _run(mlp_pt2, calib_path, 0.6, tmp_path / "fresh", cache, None)
    assert len(loads) == 2
    # the same job as with a fresh load: plan, metrics, front, checkpoint and ONNX bytes
    assert child.plan == fresh.plan
    assert child.report["metrics"] == fresh.report["metrics"]
    for name in ("pareto.json", "model.onnx"):
        assert (tmp_path / "child" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    a, b = (_checkpoint(tmp_path / d / "model.safetensors") for d in ("child", "fresh"))
    assert a[1] == b[1] and a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _checkpoint(path):
    """(tensors, metadata): the file's bytes order its metadata differently on every write."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_other_files_a_failed_job_and_large_files_keep_nothing(
        mlp_pt2, calib_path, calib_digits, tmp_path, loads, monkeypatch) -> None:
    from solver.errors import InfeasibleError

    kept, cache = L.LoadedModels(), StageCache(tmp_path / "cache")
    x, y = calib_digits
    other = zoo.save_calibration(tmp_path / "other.safetensors", x[:200], y[:200])
    _run(mlp_pt2, calib_path, 0.8, tmp_path / "a", cache, kept)
    _run(mlp_pt2, other, 0.8, tmp_path / "b", cache, kept)  # other bytes: loads, drops a's
    _run(mlp_pt2, calib_path, 0.8, tmp_path / "c", cache, kept)
    assert len(loads) == 3
    with pytest.raises(InfeasibleError):  # a failed job puts nothing back
        run_pipeline(mlp_pt2, calib_path, {**_cons(0.8), "limits": {"size_mb": 1e-6}},
                     tmp_path / "d", cache=cache, loaded=kept, pareto_points=0)
    assert len(loads) == 3  # it took c's model
    _run(mlp_pt2, calib_path, 0.8, tmp_path / "e", cache, kept)
    assert len(loads) == 4
    monkeypatch.setattr(L, "KEEP_BYTES", 1)
    _run(mlp_pt2, calib_path, 0.7, tmp_path / "f", cache, kept)
    _run(mlp_pt2, calib_path, 0.7, tmp_path / "g", cache, kept)
    assert len(loads) == 6 and kept.take(None) is None


def test_an_evaluation_file_does_not_leak_into_the_kept_model(
        mlp_pt2, calib_path, calib_digits, tmp_path, loads) -> None:
    kept, cache = L.LoadedModels(), StageCache(tmp_path / "cache")
    x, y = calib_digits
    evaluation = zoo.save_calibration(tmp_path / "e.safetensors", x[:300], y[:300])
    first = _run(mlp_pt2, calib_path, 0.8, tmp_path / "a", cache, kept, eval_path=evaluation)
    assert first.report["evaluation"]["source"] == "evaluation file"
    second = _run(mlp_pt2, calib_path, 0.8, tmp_path / "b", cache, kept)
    assert len(loads) == 1
    assert second.report["evaluation"]["source"] == "held-out calibration share"
    assert second.report["metrics"]["samples"] < 300
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["layers"] == \
        first.plan["layers"]
