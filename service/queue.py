"""The task queue (Huey) and the worker that runs jobs.

- ``make_huey(settings)``: ``SqliteHuey`` under the data directory (embedded, durable across
  restarts) or ``RedisHuey`` when ``BITPLAN_REDIS_URL`` is set (workers on other machines run
  the same code against the same Redis and job database).
- ``JobQueue``: enqueue jobs and run one (``run_job``, the one Huey task) through the pipeline,
  writing progress and heartbeats to the job store.
- ``Worker``: a Huey consumer (``max_concurrent_jobs`` threads) plus a reaper that requeues jobs
  whose worker died (stale heartbeat; once, then they fail with a reason), fails jobs that
  exceed the job timeout, and re-enqueues queued jobs missing from the queue.

Cancellation is cooperative: DELETE marks the job cancelled in the store; a queued job is then
skipped when its task comes up, a running pipeline sees ``should_cancel()`` turn true at its
next progress point and raises ``CancelledError``.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey

from solver.errors import CancelledError

from . import jobs as J
from .cache import StageCache
from .errors import job_error
from .jobs import JobStore, age_cutoff
from .loaded import LoadedModels
from .progress import Eta
from .settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "bitplan.run_job"

# Share of the whole job spent in each stage, for the job's overall progress 0..1.
STAGE_WEIGHTS: dict[str, float] = {
    "intake": 0.05,
    "sensitivity": 0.45,
    "regions": 0.10,
    "solve": 0.10,
    "quantize": 0.15,
    "evaluate": 0.12,
    "export": 0.03,
}

Pipeline = Callable[..., Any]


def overall_progress(stage: str, fraction: float) -> float:
    """Progress of the whole job when ``stage`` is ``fraction`` done (stages in order)."""
    done = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return min(1.0, done + weight * min(max(fraction, 0.0), 1.0))
        done += weight
    return done


def make_huey(settings: Settings) -> Huey:
    """Huey on Redis when ``redis_url`` is set, else SQLite under ``data_dir``."""
    if settings.redis_url:
        return RedisHuey("bitplan", url=settings.redis_url, results=False)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey("bitplan", filename=str(settings.queue_path), results=False)


def _default_pipeline(*args: Any, **kwargs: Any) -> Any:
    from .pipeline import run_pipeline  # torch and friends load only where jobs run

    return run_pipeline(*args, **kwargs)



def _evaluation_file(calib_path: str) -> Path | None:
    """The job's optional evaluation upload, stored beside its calibration file."""
    path = Path(calib_path).with_name("evaluation.safetensors")
    return path if path.is_file() else None

class JobQueue:
    """Enqueue jobs; run them (the Huey task ``run_job``) through ``pipeline``."""

    def __init__(
        self, settings: Settings, store: JobStore, pipeline: Pipeline | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline or _default_pipeline
        self.loaded = LoadedModels()  # the last job's model, for a re-plan on the same files
        self.huey = make_huey(settings)
        self.task = self.huey.task(name=TASK_NAME)(self.run_job)
        self._stopping = threading.Event()
        self._in_flight: set[str] = set()
        self._absent_before: set[str] = set()  # queued jobs in no queue at the last pass
        self._lock = threading.Lock()

    # Producer side ---------------------------------------------------------------------------

    def enqueue(self, job_id: str) -> None:
        self.task(job_id)

    def pending_ids(self) -> set[str]:
        """Job ids waiting in the queue (not yet taken by a worker)."""
        return {t.args[0] for t in self.huey.pending() if t.name == TASK_NAME and t.args}

    def cancel(self, job_id: str) -> bool:
        """Mark a queued or running job cancelled; False when it had already finished."""
        return self.store.mark_cancelled(job_id)

    # Consumer side ---------------------------------------------------------------------------

    def run_job(self, job_id: str) -> None:
        """Run one job to a final state (the Huey task). Never raises for a job's failure."""
        job = self.store.claim(job_id)
        if job is None:
            log.info("job %s skipped: it is %s", job_id, self.store.status(job_id))
            return
        with self._lock:
            self._in_flight.add(job_id)
        try:
            self._run_claimed(job)
        finally:
            with self._lock:
                self._in_flight.discard(job_id)

    def _run_claimed(self, job: J.Job) -> None:
        job_id = job.id
        stop_beats = threading.Event()
        lost = threading.Event()  # the store says the job is no longer running (cancel/timeout)

        def beat() -> None:
            while not stop_beats.wait(self.settings.heartbeat_interval_s):
                try:
                    alive = self.store.heartbeat(job_id)
                except Exception:  # noqa: BLE001 - a database hiccup: beat again next time
                    log.warning("heartbeat of job %s failed", job_id, exc_info=True)
                    continue
                if not alive:
                    lost.set()
                    return

        beater = threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True)
        beater.start()
        last_write = [0.0, ""]
        eta = Eta()  # sees every report, so its estimate does not depend on the write throttle

        def progress(stage: str, fraction: float) -> None:
            left = eta(stage, fraction)
            now = time.monotonic()
            # a write per new stage, else at most one per 0.5 s (a stage's end needs none: it
            # is the next stage's start, the same overall progress, and success writes 1.0)
            if stage == last_write[1] and now - last_write[0] < 0.5:
                return
            last_write[0], last_write[1] = now, stage
            try:  # progress is best effort: a failed write must not fail the job
                still_running = self.store.update_progress(
                    job_id, stage, overall_progress(stage, fraction), left
                )
            except Exception:  # noqa: BLE001
                log.warning("progress of job %s not recorded", job_id, exc_info=True)
                return
            if not still_running:
                lost.set()

        last_check = [0.0]

        def should_cancel() -> bool:
            if lost.is_set() or self._stopping.is_set():
                return True
            now = time.monotonic()
            if now - last_check[0] >= 0.25:
                last_check[0] = now
                try:
                    status = self.store.status(job_id)
                except Exception:  # noqa: BLE001 - unknown is not "cancelled"
                    status = J.RUNNING
                if status != J.RUNNING:
                    lost.set()
            return lost.is_set()

        try:
            result = self.pipeline(
                Path(job.model_path),
                Path(job.calib_path),
                job.constraints,
                Path(job.out_dir),
                device=self.settings.torch_device(),
                progress=progress,
                should_cancel=should_cancel,
                holdout_fraction=self.settings.holdout_fraction,
                cache=StageCache(self.settings.cache_dir),
                memory_budget=self.settings.memory_budget_bytes(self.settings.torch_device()),
                eval_path=_evaluation_file(job.calib_path),
                plots=False,  # drawn on first request (service.plots.ensure)
                loaded=self.loaded,
            )
        except CancelledError:
            if self._stopping.is_set() and not lost.is_set() and self.store.release(job_id):
                # The worker is shutting down, not the user: the job runs again later.
                log.info("job %s put back in the queue (worker stopping)", job_id)
                self.enqueue(job_id)
            elif self.store.status(job_id) == J.RUNNING:
                self.store.mark_cancelled(job_id)
        except BaseException as exc:  # noqa: BLE001 - every failure must end the job
            err = job_error(exc)
            self.store.mark_failed(job_id, err["code"], err["message"], err["detail"])
            log.warning("job %s failed [%s]: %s", job_id, err["code"], err["message"])
            if not isinstance(exc, Exception):
                raise
        else:
            summary = result.summary() if hasattr(result, "summary") else None
            if self.store.mark_succeeded(job_id, summary):
                log.info("job %s succeeded", job_id)
            else:
                log.info("job %s finished but was %s meanwhile", job_id, self.store.status(job_id))
        finally:
            stop_beats.set()

    # Recovery --------------------------------------------------------------------------------

    def recover(self) -> dict[str, list[str]]:
        """Requeue orphaned running jobs (or fail them after ``max_attempts``), fail overdue
        ones, re-enqueue queued jobs missing from the queue (on two passes in a row), and
        delete jobs past their retention (:meth:`expire`)."""
        s = self.settings
        overdue = self.store.fail_overdue(age_cutoff(s.job_timeout_s), s.job_timeout_s)
        with self._lock:
            mine = set(self._in_flight)
        # A job this worker runs is alive even if its heartbeat looks old (a wall-clock step,
        # a starved heartbeat thread): only other workers' jobs can be orphaned.
        requeued, failed = self.store.requeue_stale(
            age_cutoff(s.heartbeat_timeout_s), s.max_attempts, alive=mine
        )
        for job_id in requeued:
            self.enqueue(job_id)
        pending = self.pending_ids()
        with self._lock:
            mine |= self._in_flight
        absent = {
            job_id
            for job_id in self.store.ids_with_status(J.QUEUED)
            if job_id not in pending and job_id not in mine and job_id not in requeued
        }
        # A worker thread takes a task off the queue a moment before it claims the job: in
        # that window the job is queued and in no queue. Only a job absent on two passes in a
        # row is missing (seen once under load: 50 jobs, 2 threads, an extra task enqueued).
        missing = sorted(absent & self._absent_before)
        self._absent_before = absent - set(missing)
        for job_id in missing:
            self.enqueue(job_id)
        report = {"requeued": requeued, "failed": failed, "overdue": overdue, "missing": missing}
        if any(report.values()):
            log.warning("recovery: %s", report)
        report["expired"] = self.expire()  # routine, logged by expire()
        return report

    def expire(self) -> list[str]:
        """Delete the jobs that ended more than ``retention_days`` ago: files first, then the
        row (a crash in between leaves a row whose files are gone, deleted on the next pass)."""
        days = self.settings.retention_days
        if days is None:
            return []
        ids = self.store.ended_before(age_cutoff(days * 86400.0))
        for job_id in ids:
            if J.is_job_id(job_id):  # ids name directories: never anything path-like
                shutil.rmtree(self.settings.jobs_dir / job_id, ignore_errors=True)
        self.store.delete_finished(ids)
        if ids:
            log.info("deleted %d job(s) that ended more than %g days ago", len(ids), days)
        pruned = StageCache(self.settings.cache_dir).prune(days * 86400.0)
        if pruned:
            log.info("deleted %d cached stage result(s) unused for %g days", pruned, days)
        return ids

    def stop_jobs(self) -> None:
        """Ask running pipelines to stop at their next progress point (worker shutdown)."""
        self._stopping.set()


class Worker:
    """A Huey consumer running ``queue``'s jobs in threads, plus the periodic reaper."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        s = queue.settings
        self.consumer = queue.huey.create_consumer(
            workers=s.max_concurrent_jobs,
            worker_type="thread",
            periodic=False,
            initial_delay=min(0.1, s.poll_interval_s),
            max_delay=s.poll_interval_s,
            check_worker_health=False,
        )
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="bitplan-reaper", daemon=True)

    def _reap(self) -> None:
        while True:
            try:
                self.queue.recover()
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the reaper
                log.exception("recovery pass failed")
            if self._stop.wait(self.queue.settings.heartbeat_interval_s):
                return

    def start(self) -> None:
        """Start the consumer threads and the reaper (returns at once)."""
        # Huey's start() installs its own SIGINT/SIGTERM/SIGHUP handlers, meant for its own
        # main loop, which we do not run: keep the host's (uvicorn's, pytest's) handlers.
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None:
                    saved[sig] = signal.getsignal(sig)
        self.consumer.start()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        self._reaper.start()

    def run(self) -> None:
        """Start, then block until SIGINT / SIGTERM (the ``bitplan worker`` command)."""
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):  # after start(): replaces Huey's handlers
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(1.0):
            pass
        self.stop()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking jobs, ask running ones to stop (they go back to the queue), wait a bit."""
        self._stop.set()
        self.queue.stop_jobs()
        self.consumer.stop_flag.set()
        deadline = time.monotonic() + grace_s
        for _, thread in self.consumer.worker_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
