"""The stage cache (service/cache.py) and its use by the pipeline: the same model bytes,
calibration bytes and settings reuse the stored sensitivity; anything else measures again."""

from __future__ import annotations

import json
import os
import shutil
import time

from svc_helpers import FAST_HESSIAN

from service.cache import StageCache, file_digest, stage_key
from service.pipeline import run_pipeline


def test_digest_is_remembered_until_the_file_changes(tmp_path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 10)
    d1 = file_digest(f)
    assert (tmp_path / "a.bin.sha256").is_file() and file_digest(f) == d1
    f.write_bytes(b"y" * 11)
    assert file_digest(f) != d1


def test_keys_entries_and_prune(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    k = stage_key("sensitivity", {"model": a}, {"tol": 0.05})
    assert k == stage_key("sensitivity", {"model": a}, {"tol": 0.05})
    assert k != stage_key("sensitivity", {"model": b}, {"tol": 0.05})
    assert k != stage_key("sensitivity", {"model": a}, {"tol": 0.1})
    assert k != stage_key("regions", {"model": a}, {"tol": 0.05})
    cache = StageCache(tmp_path / "cache")
    assert cache.get("sensitivity", k) is None
    cache.put("sensitivity", k, "{}")
    assert cache.get("sensitivity", k) == "{}" and cache.has("sensitivity", k)
    assert not list((tmp_path / "cache" / "sensitivity").glob(".*tmp"))
    old = time.time() - 100
    os.utime(tmp_path / "cache" / "sensitivity" / f"{k}.json", (old, old))
    assert cache.prune(50) == 1 and cache.get("sensitivity", k) is None
    assert StageCache(None).get("sensitivity", k) is None  # no root: keeps nothing


def test_pipeline_reuses_sensitivity_of_identical_inputs(mlp_pt2, calib_path, tmp_path) -> None:
    cache = StageCache(tmp_path / "cache")
    cons = {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.7},
            "pin": {"first": None, "last": 8}}
    first = run_pipeline(mlp_pt2, calib_path, cons, tmp_path / "1", cache=cache,
                         pareto_points=0)
    assert first.reused == []
    # the same bytes under another name (as a re-plan's own copy of the uploads) hit the cache
    model2 = tmp_path / "copy.pt2"
    shutil.copy(mlp_pt2, model2)
    second = run_pipeline(model2, calib_path, {**cons, "limits": {"size_ratio": 0.9}},
                          tmp_path / "2", cache=cache, pareto_points=0)
    assert second.reused == ["sensitivity"]
    s1 = json.loads((tmp_path / "1" / "sensitivity.json").read_text())
    s2 = json.loads((tmp_path / "2" / "sensitivity.json").read_text())
    assert s1 == s2
    assert second.summary()["reused"] == ["sensitivity"]
    # other Hessian settings measure again
    third = run_pipeline(mlp_pt2, calib_path,
                         {**cons, "hessian": {**FAST_HESSIAN, "seed": 7}}, tmp_path / "3",
                         cache=cache, pareto_points=0)
    assert third.reused == []
