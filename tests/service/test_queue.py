"""The worker side with a scripted pipeline: final states, progress, cancellation while running,
recovery of orphaned jobs, and durability of the real SqliteHuey queue across instances."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from service.jobs import JobRow, JobStore, age_cutoff, new_job_id
from service.pipeline import STAGES
from service.queue import STAGE_WEIGHTS, JobQueue, Worker, overall_progress
from service.settings import Settings
from solver.errors import BadCalibrationError, CancelledError, InfeasibleError


class FakeResult:
    def summary(self) -> dict[str, Any]:
        return {"status": "optimal"}


class Script:
    """A pipeline that walks the stages, optionally failing or waiting to be cancelled."""

    def __init__(self, fail: BaseException | None = None, spin: bool = False) -> None:
        self.fail, self.spin = fail, spin
        self.calls: list[tuple] = []
        self.progress_points = 0
        self.started = threading.Event()

    def __call__(self, model, calib, constraints, out_dir, *, device, progress, should_cancel,
                 holdout_fraction, cache, **settings):  # settings: memory_budget, ...
        self.calls.append((model, calib, constraints, out_dir, str(device), holdout_fraction))
        self.cache_root = cache.root  # the worker hands every job the data dir's stage cache
        self.started.set()
        for stage in ("intake", "sensitivity"):
            progress(stage, 1.0)
        deadline = time.monotonic() + 20
        while self.spin and time.monotonic() < deadline:
            self.progress_points += 1
            if should_cancel():
                raise CancelledError("cancelled")
            progress("sensitivity", 0.5)
            time.sleep(0.02)
        if self.fail is not None:
            raise self.fail
        return FakeResult()


def _job(store: JobStore, tmp_path: Path) -> str:
    job_id = new_job_id()
    store.create(job_id, {"limits": {"size_mb": 1}}, str(tmp_path / "m.pt2"),
                 str(tmp_path / "c.safetensors"), str(tmp_path / "out"), "m.pt2")
    return job_id



def test_overall_progress_is_monotonic() -> None:
    assert tuple(STAGE_WEIGHTS) == STAGES  # every pipeline stage has a share, in order
    points = [overall_progress(s, f) for s in STAGES for f in (0, 0.5, 1)]
    assert points == sorted(points) and points[0] == 0 and points[-1] == pytest.approx(1.0)


def test_success_records_progress_and_summary(settings, store, tmp_path) -> None:
    script = Script()
    q = JobQueue(settings, store, script)
    job_id = _job(store, tmp_path)
    q.run_job(job_id)
    job = store.get(job_id)
    assert job.status == "succeeded" and job.progress == 1.0 and job.attempts == 1
    assert job.summary == {"status": "optimal"} and job.error is None
    model, calib, constraints, out_dir, device, holdout = script.calls[0]
    assert constraints == {"limits": {"size_mb": 1}} and holdout == settings.holdout_fraction
    assert device == "cpu" and str(out_dir).endswith("out")
    assert script.cache_root == settings.data_dir / "cache"
    q.run_job(job_id)  # a duplicate task for a finished job does nothing
    assert len(script.calls) == 1


@pytest.mark.parametrize(
    "exc,code,detail",
    [
        (InfeasibleError("size 1 MB < 2 MB reachable", {"min_size_bytes": 2e6}), "infeasible",
         {"min_size_bytes": 2e6}),
        (BadCalibrationError("NaN in inputs"), "bad_calibration", None),
        (ZeroDivisionError("boom"), "internal", None),
        (MemoryError(), "out_of_memory", None),
    ],
)
def test_failures_become_job_errors(settings, store, tmp_path, exc, code, detail) -> None:
    q = JobQueue(settings, store, Script(fail=exc))
    job_id = _job(store, tmp_path)
    q.run_job(job_id)
    job = store.get(job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error["code"] == code and job.error["message"]
    assert job.error["detail"] == detail


def _spinning_job(settings, store, tmp_path):
    """A job whose pipeline spins until stopped, running in a thread of one JobQueue; returns
    once the pipeline has started: (queue, script, job id, thread)."""
    script = Script(spin=True)
    q = JobQueue(settings, store, script)
    job_id = _job(store, tmp_path)
    t = threading.Thread(target=q.run_job, args=(job_id,))
    t.start()
    assert script.started.wait(10)
    return q, script, job_id, t


def test_cancel_while_running_stops_the_pipeline(settings, store, tmp_path) -> None:
    q, script, job_id, t = _spinning_job(settings, store, tmp_path)
    time.sleep(0.1)
    assert store.get(job_id).status == "running"
    assert q.cancel(job_id)
    t.join(10)
    assert not t.is_alive()
    assert store.get(job_id).status == "cancelled"
    assert script.progress_points < 200  # stopped within a few progress points, not at the end


def test_orphaned_job_is_retried_once_then_failed(settings, store, tmp_path) -> None:
    q = JobQueue(settings, store, Script())
    job_id = _job(store, tmp_path)
    assert store.claim(job_id) is not None  # a worker took it ... and died (no heartbeats)
    time.sleep(settings.heartbeat_timeout_s + 0.1)
    report = q.recover()
    assert report["requeued"] == [job_id]
    job = store.get(job_id)
    assert job.status == "queued" and job.attempts == 1
    assert q.pending_ids() == {job_id}
    assert store.claim(job_id).attempts == 2  # the second worker dies too
    time.sleep(settings.heartbeat_timeout_s + 0.1)
    report = q.recover()
    assert report["failed"] == [job_id]
    job = store.get(job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"
    assert "2 time(s)" in job.error["message"]


def test_live_job_keeps_beating_and_is_not_recovered(settings, store, tmp_path) -> None:
    q, script, job_id, t = _spinning_job(settings, store, tmp_path)
    time.sleep(settings.heartbeat_timeout_s * 1.5)
    other_worker = JobQueue(settings, store, Script())  # sees the heartbeats, not the thread
    assert other_worker.recover()["requeued"] == []
    assert q.recover()["requeued"] == []
    assert store.get(job_id).status == "running"
    q.cancel(job_id)
    t.join(10)


def test_own_job_is_never_taken_for_orphaned(settings, store, tmp_path, monkeypatch) -> None:
    script = Script(spin=True)
    q = JobQueue(settings, store, script)
    job_id = _job(store, tmp_path)
    # beats and progress stop reaching the database (as if its clock jumped ahead)
    monkeypatch.setattr(store, "heartbeat", lambda job_id: True)
    monkeypatch.setattr(store, "update_progress", lambda *args: True)
    t = threading.Thread(target=q.run_job, args=(job_id,))
    t.start()
    assert script.started.wait(10)
    time.sleep(settings.heartbeat_timeout_s + 0.2)
    job = store.get(job_id)
    assert job.heartbeat_at < job.started_at + timedelta(seconds=0.5)  # looks orphaned
    assert q.recover()["requeued"] == []  # but its own worker knows it is alive
    job = store.get(job_id)
    assert job.status == "running" and job.attempts == 1
    monkeypatch.undo()
    q.cancel(job_id)
    t.join(10)


def test_overdue_job_is_failed_and_its_pipeline_stops(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, job_timeout_s=0.5, heartbeat_interval_s=0.1,
                        heartbeat_timeout_s=5)
    store = JobStore(settings.resolved_database_url)
    q, script, job_id, t = _spinning_job(settings, store, tmp_path)
    time.sleep(0.7)
    assert q.recover()["overdue"] == [job_id]
    t.join(10)
    job = store.get(job_id)
    assert job.status == "failed" and job.error["code"] == "timeout"
    store.close()


def test_sqlite_queue_survives_a_new_instance_and_worker_runs_it(settings, store,
                                                                 tmp_path) -> None:
    job_id = _job(store, tmp_path)
    JobQueue(settings, store, Script()).enqueue(job_id)  # this "process" goes away
    script = Script()
    q2 = JobQueue(settings, store, script)  # a new one, same data directory
    assert q2.pending_ids() == {job_id}
    worker = Worker(q2)
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while store.get(job_id).status != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert store.get(job_id).status == "succeeded" and len(script.calls) == 1


def test_queued_job_missing_from_the_queue_is_enqueued(settings, store, tmp_path) -> None:
    q = JobQueue(settings, store, Script())
    job_id = _job(store, tmp_path)  # recorded, but its task was lost (died between the two)
    assert q.pending_ids() == set()
    # absent once may be a worker between taking the task and claiming the job: wait a pass
    assert q.recover()["missing"] == []
    assert q.recover()["missing"] == [job_id]
    assert q.pending_ids() == {job_id}
    assert q.recover()["missing"] == []  # not twice


def test_a_job_taken_off_the_queue_but_not_yet_claimed_is_not_enqueued_again(
        settings, store, tmp_path) -> None:
    q = JobQueue(settings, store, Script())
    job_id = _job(store, tmp_path)
    assert q.recover()["missing"] == []  # the task is in a worker's hands, the job not claimed
    store.claim(job_id)  # ... which it then claims
    assert q.recover()["missing"] == [] and q.pending_ids() == set()


def test_worker_shutdown_puts_the_running_job_back(settings, store, tmp_path) -> None:
    script = Script(spin=True)
    q = JobQueue(settings, store, script)
    job_id = _job(store, tmp_path)
    q.enqueue(job_id)
    worker = Worker(q)
    worker.start()
    assert script.started.wait(15)
    worker.stop()
    job = store.get(job_id)
    assert job.status == "queued" and job.attempts == 0
    assert JobQueue(settings, store).pending_ids() == {job_id}


def test_database_hiccups_in_progress_do_not_fail_the_job(settings, store, tmp_path,
                                                          monkeypatch) -> None:
    from sqlalchemy.exc import OperationalError

    def flaky(*args, **kwargs):
        raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))

    monkeypatch.setattr(store, "update_progress", flaky)
    monkeypatch.setattr(store, "heartbeat", flaky)
    q = JobQueue(settings, store, Script())
    job_id = _job(store, tmp_path)
    q.run_job(job_id)
    assert store.get(job_id).status == "succeeded"


def test_jobs_past_retention_are_deleted_with_their_files(settings, store, tmp_path) -> None:
    q = JobQueue(settings.model_copy(update={"retention_days": 1.0}), store, Script())
    old, recent, running = (_job(store, tmp_path) for _ in range(3))
    for job_id in (old, recent, running):
        (settings.jobs_dir / job_id / "out").mkdir(parents=True)
        (settings.jobs_dir / job_id / "out" / "plan.json").write_text("{}")
        assert store.claim(job_id) is not None
    store.mark_succeeded(old)
    store.mark_failed(recent, "infeasible", "no")
    # the old one ended two days ago
    with store._session() as s:
        s.execute(update(JobRow).where(JobRow.id == old)
                  .values(finished_at=age_cutoff(2 * 86400.0)))
        s.commit()
    report = q.recover()
    assert report["expired"] == [old]
    assert not (settings.jobs_dir / old).exists()
    assert {j.id for j in store.list(0, 10, None)[0]} == {recent, running}
    assert (settings.jobs_dir / recent / "out" / "plan.json").exists()
    # an unset retention keeps everything
    keep = JobQueue(settings.model_copy(update={"retention_days": None}), store, Script())
    assert keep.recover()["expired"] == []


def test_running_jobs_show_the_stages_time_left(settings, store, tmp_path) -> None:
    from service.schemas import JobPublic

    seen: list[float | None] = []

    def pipeline(*args, progress, **kwargs):
        for k in range(1, 6):  # 0.1 of the stage every 0.6 s: past the 0.5 s write throttle
            progress("sensitivity", k / 10)
            seen.append(store.get(job).stage_eta_s)
            time.sleep(0.6)
        return None

    job = _job(store, tmp_path)
    JobQueue(settings, store, pipeline).run_job(job)
    # none before three advances, then elapsed x (1 - f) / f: ~0.6 x 3 x 0.6 / 0.4 = 2.7 s at
    # f = 0.4 (bounds of 0.5 and 20 s leave room for a slow machine)
    assert seen[:3] == [None, None, None]
    assert all(v is not None and 0.5 < v < 20 for v in seen[3:]), seen
    finished = store.get(job)
    assert finished.status == "succeeded" and JobPublic.model_validate(finished).stage_eta_s is None
