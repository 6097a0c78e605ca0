"""What the routes call: submit a plan request, read jobs, cancel, find artifacts.

The routes translate HTTP into these calls and typed errors back into HTTP; everything with
state (files, the job store, the queue) happens here or below.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from solver.errors import NotFoundError

from . import jobs as J
from .cache import StageCache, reusable
from .constraints import parse_constraints
from .errors import ConflictError, storage_error
from .jobs import Job, JobStore, is_job_id, new_job_id
from .queue import JobQueue
from .settings import Settings
from .uploads import receive_plan_upload
from .validation import validate_submission

log = logging.getLogger(__name__)

MAX_CONCURRENT_VALIDATIONS = 2

# artifact name -> (file name in the job's output directory, media type)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "plan": ("plan.json", "application/json"),
    "report": ("report.json", "application/json"),
    "checkpoint": ("model.safetensors", "application/octet-stream"),
    "onnx": ("model.onnx", "application/octet-stream"),
    "sensitivity": ("sensitivity.json", "application/json"),
    "pareto": ("pareto.json", "application/json"),
}
PLOT_PATTERN = r"^(bits|pareto)\.(svg|png)$"
_PLOT_TYPES = {"svg": "image/svg+xml", "png": "image/png"}


class BitplanService:
    """The service's state: settings, job store and queue."""

    def __init__(self, settings: Settings, store: JobStore, queue: JobQueue) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self._validations = threading.BoundedSemaphore(MAX_CONCURRENT_VALIDATIONS)
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> BitplanService:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.resolved_database_url)
        return cls(settings, store, JobQueue(settings, store))

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):  # ids become directory names: never anything path-like
            raise NotFoundError(f"no job {job_id!r}")
        return self.settings.jobs_dir / job_id

    async def submit(
        self,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterator[bytes],
    ) -> Job:
        """Stream the upload into a new job directory, validate it, record and enqueue the job.

        Raises TooLargeError, BadRequestError, BadModelError, BadCalibrationError,
        BadConstraintsError; nothing is kept on disk when it raises.
        """
        job_id = new_job_id()
        job_dir = self.job_dir(job_id)
        upload_dir = job_dir / "upload"
        upload_dir.mkdir(parents=True)
        try:
            upload = await receive_plan_upload(
                content_type, content_length, body, upload_dir,
                self.settings.upload_limits, self.settings.max_upload_bytes,
            )
            constraints = parse_constraints(upload.fields["constraints"])
            await run_in_threadpool(
                self._validate,
                upload.files["model"],
                upload.files["calibration"],
                constraints,
                self.settings.holdout_fraction,
                self.settings.upload_limits["calibration"],
            )
            job = self.store.create(
                job_id,
                constraints.to_dict(),
                str(upload.files["model"].resolve()),
                str(upload.files["calibration"].resolve()),
                str((job_dir / "out").resolve()),
                model_name=upload.filenames.get("model"),
            )
        except BaseException as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            if isinstance(exc, OSError) and (full := storage_error(exc, "the upload")):
                raise full from None  # 507, not a 500
            raise
        self.queue.enqueue(job_id)
        log.info("job %s queued (%d bytes uploaded)", job_id, upload.total_bytes)
        return job

    def replan(self, parent_id: str, constraints_json: Any) -> tuple[Job, list[str]]:
        """A new job on ``parent_id``'s uploads with other constraints; returns it and the
        stages it will take from the cache (no upload, and no Hessian passes when the Hessian
        settings are unchanged). Settings the parent did not compute for (another Hessian
        seed, DRQ regions it did not calibrate) are computed by the new job.

        Raises NotFoundError (no such job, or its uploads were deleted), ConflictError (the
        parent failed or was cancelled before its sensitivity was measured),
        BadConstraintsError.
        """
        parent = self.store.get(parent_id)
        constraints = parse_constraints(constraints_json)
        if not (Path(parent.out_dir) / "sensitivity.json").is_file():
            if parent.status in J.ACTIVE:
                raise ConflictError(f"job {parent_id} is {parent.status} and has no sensitivity "
                                    "yet; re-plan it once it has")
            raise ConflictError(
                f"job {parent_id} {parent.status} before its sensitivity was measured; "
                "nothing to re-plan from: submit the model again with POST /plan")
        sources = {"model": Path(parent.model_path), "calibration": Path(parent.calib_path)}
        if not all(p.is_file() for p in sources.values()):
            raise NotFoundError(f"the uploads of job {parent_id} were deleted")
        job_id = new_job_id()
        job_dir = self.job_dir(job_id)
        upload_dir = job_dir / "upload"
        upload_dir.mkdir(parents=True)
        try:
            copies = {k: _link_or_copy(p, upload_dir / p.name) for k, p in sources.items()}
            reused = reusable(StageCache(self.settings.cache_dir), copies["model"],
                              copies["calibration"], constraints, self.settings.holdout_fraction)
            job = self.store.create(
                job_id, constraints.to_dict(), str(copies["model"].resolve()),
                str(copies["calibration"].resolve()), str((job_dir / "out").resolve()),
                model_name=parent.model_name, parent_id=parent.id,
            )
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self.queue.enqueue(job_id)
        log.info("job %s queued: re-plan of %s (reuses %s)", job_id, parent_id,
                 ", ".join(["uploads", *reused]))
        return job, ["uploads", *reused]

    def _validate(self, *args: Any) -> None:
        # Validation loads the model and runs it over the calibration data: bound how many run
        # at once so a burst of uploads cannot exhaust the API's memory.
        with self._validations:
            validate_submission(*args)

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self, offset: int, limit: int, status: str | None) -> tuple[list[Job], int]:
        return self.store.list(offset, limit, status)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job. Raises NotFoundError, ConflictError (finished)."""
        job = self.store.get(job_id)
        if not self.queue.cancel(job_id):
            job = self.store.get(job_id)
            raise ConflictError(f"job {job_id} has already {job.status}; nothing to cancel")
        return self.store.get(job.id)

    def artifact(self, job_id: str, name: str) -> tuple[Path, str]:
        """(path, media type) of a finished job's artifact.

        Raises NotFoundError, ConflictError when the job has not produced it (yet).
        """
        job = self.store.get(job_id)
        filename, media_type = ARTIFACTS[name]
        path = Path(job.out_dir) / filename
        # The plan of an infeasible job exists (it carries the diagnosis); other artifacts only
        # exist for succeeded jobs.
        if path.is_file() and (job.status == J.SUCCEEDED or name == "plan"):
            return path, media_type
        if job.status in J.ACTIVE:
            raise ConflictError(f"job {job_id} is {job.status}; the {name} is not ready yet")
        raise NotFoundError(f"job {job_id} {job.status} without a {name}")

    def plot(self, job_id: str, name: str) -> tuple[Path, str]:
        """(path, media type) of a succeeded job's plot ``name`` (see PLOT_PATTERN), drawn
        the first time it is asked for.

        Raises NotFoundError (no such job or plot), ConflictError (not finished yet)."""
        if not re.match(PLOT_PATTERN, name):
            raise NotFoundError(f"no plot {name!r}: use bits.svg, bits.png, pareto.svg, pareto.png")
        from .plots import ensure

        job = self.store.get(job_id)
        path = ensure(job.out_dir, name) if job.status == J.SUCCEEDED else None
        if path is not None:  # drawn on its first request, then kept
            return path, _PLOT_TYPES[name.rsplit(".", 1)[1]]
        if job.status in J.ACTIVE:
            raise ConflictError(f"job {job_id} is {job.status}; its plots are not ready yet")
        raise NotFoundError(f"job {job_id} {job.status} without the plot {name}")

    def close(self) -> None:
        self.store.close()


def _link_or_copy(src: Path, dst: Path) -> Path:
    """A re-plan's own copy of an upload: a hard link (no bytes copied) where the file system
    allows one, else a copy; the digest sidecar comes along so the file is not hashed again.
    The parent's retention then never takes the child's inputs."""
    for a, b in ((src, dst), (src.with_name(src.name + ".sha256"),
                              dst.with_name(dst.name + ".sha256"))):
        if not a.is_file():
            continue
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    return dst
