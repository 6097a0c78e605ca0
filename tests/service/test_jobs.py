"""The job store's snapshots: every column of the jobs table is a field of Job, built in one
place (Job.from_row), with timezone-aware times, the same from get() and list()."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC

from service.jobs import Job, JobRow, new_job_id


def test_every_column_is_a_job_field() -> None:
    assert {f.name for f in fields(Job)} == {c.name for c in JobRow.__table__.columns}


def test_get_and_list_give_the_same_snapshot(store) -> None:
    job_id = new_job_id()
    created = store.create(job_id, {"limits": {"size_mb": 1.0}}, "/m", "/c", "/o",
                           model_name="m.pt2")
    store.claim(job_id)
    store.update_progress(job_id, "sensitivity", 0.3, eta_s=12.5)
    store.mark_failed(job_id, "bad_model", "broken", {"why": [1, 2]})
    job = store.get(job_id)
    (listed,), total = store.list()
    assert total == 1 and listed == job
    assert job.constraints == {"limits": {"size_mb": 1.0}} and job.model_name == "m.pt2"
    assert (job.status, job.stage, job.progress, job.stage_eta_s, job.attempts) == (
        "failed", "sensitivity", 0.3, 12.5, 1)
    assert job.error == {"code": "bad_model", "message": "broken", "detail": {"why": [1, 2]}}
    for t in (job.created_at, job.started_at, job.heartbeat_at, job.finished_at):
        assert t is not None and t.tzinfo == UTC
    assert job.created_at == created.created_at and job.finished_at >= job.started_at
