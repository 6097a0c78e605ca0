"""What POST /plan checks before the 202 without loading the model, and where a model that only
the full load finds broken ends: a job failed with ``bad_model``."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from svc_helpers import constraints, post_plan

import sensitivity.intake
import sensitivity.program
from service.jobs import FAILED, SUCCEEDED
from service.queue import JobQueue


def _rewrite(src: Path, out: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))
    return out


def _intake_only(model_path, calib_path, constraints_, out_dir, **kwargs):
    """The worker's pipeline cut after its first stage (the real intake, typed as there)."""
    from sensitivity.intake import IntakeConfig
    from service.validation import checked_intake

    checked_intake(model_path, calib_path,
                   IntakeConfig(holdout_fraction=kwargs["holdout_fraction"]))


def test_a_good_upload_is_accepted_without_loading_the_model(
        client, service, mlp_pt2, calib_path, monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded on the request path")

    monkeypatch.setattr(sensitivity.program, "load_program", no_load)
    monkeypatch.setattr(sensitivity.intake, "load_program", no_load)
    monkeypatch.setattr("torch.export.load", no_load)
    r = post_plan(client, mlp_pt2.read_bytes(), calib_path.read_bytes(), constraints())
    assert r.status_code == 202, r.text
    assert service.queue.pending_ids() == {r.json()["job_id"]}


def test_a_model_only_the_full_load_finds_broken_fails_its_job_typed(
        client, service, settings, mlp_pt2, calib_path, tmp_path) -> None:
    # a weight entry of the wrong size: the JSON (signature) is intact, torch.export.load fails
    broken = _rewrite(mlp_pt2, tmp_path / "broken.pt2",
                      lambda n, b: b[:10] if n.endswith("weights/weight_0") else b)
    r = post_plan(client, broken.read_bytes(), calib_path.read_bytes(), constraints())
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    JobQueue(settings, service.store, pipeline=_intake_only).run_job(job_id)
    job = service.store.get(job_id)
    assert job.status == FAILED and job.error_code == "bad_model", job.error
    assert "torch.export" in job.error_message  # says what to upload
    # the same upload intact succeeds through the same worker stage
    r = post_plan(client, mlp_pt2.read_bytes(), calib_path.read_bytes(), constraints())
    JobQueue(settings, service.store, pipeline=_intake_only).run_job(r.json()["job_id"])
    assert service.store.get(r.json()["job_id"]).status == SUCCEEDED


@pytest.mark.parametrize("damage", ["unknown JSON layout", "unreadable JSON"])
def test_an_archive_the_reader_does_not_know_is_loaded_at_submission(
        damage, client, mlp_pt2, calib_path, tmp_path) -> None:
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        if damage == "unreadable JSON":
            return data[: len(data) // 2]
        doc = json.loads(data)
        doc["graph_module"]["graph"]["nodes"] = "?"
        return json.dumps(doc).encode()

    model = _rewrite(mlp_pt2, tmp_path / "odd.pt2", edit)
    r = post_plan(client, model.read_bytes(), calib_path.read_bytes(), constraints())
    assert r.status_code == 422, r.text
    body = r.json()["error"]
    assert body["code"] == "bad_model" and "torch.export" in body["message"]
    assert client.get("/jobs").json()["items"] == []  # nothing was queued
