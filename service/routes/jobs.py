"""Jobs: status, listing, artifacts, cancellation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from solver.errors import BitplanError

from ..core import BitplanService
from ..deps import ApiKeyDep, JobId, ServiceDep
from ..jobs import STATUSES
from ..schemas import ErrorResponse, JobPublic, JobsPublic
from . import http_error

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[ApiKeyDep])

_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 409)}


@router.get("", response_model=JobsPublic)
def list_jobs(
    svc: ServiceDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(STATUSES) + ")$")] = None,
) -> JobsPublic:
    """Jobs, newest first."""
    items, total = svc.list(offset, limit, status)
    return JobsPublic(
        items=[JobPublic.from_job(j) for j in items], total=total, offset=offset, limit=limit
    )


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def get_job(job_id: JobId, svc: ServiceDep) -> JobPublic:
    """A job's status, stage, progress, timestamps and error."""
    try:
        return JobPublic.from_job(svc.get(job_id))
    except BitplanError as exc:
        raise http_error(exc) from None


@router.delete("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def cancel_job(job_id: JobId, svc: ServiceDep) -> JobPublic:
    """Cancel a queued or running job."""
    try:
        return JobPublic.from_job(svc.cancel(job_id))
    except BitplanError as exc:
        raise http_error(exc) from None


def _artifact(
    svc: BitplanService, job_id: str, name: str, download: str | None = None
) -> FileResponse:
    try:
        path, media_type = svc.artifact(job_id, name)
    except BitplanError as exc:
        raise http_error(exc) from None
    return FileResponse(path, media_type=media_type, filename=download)


@router.get("/{job_id}/plan", responses=_ERRORS)
def get_plan(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The plan (plan.json, also for an infeasible job: it carries the diagnosis)."""
    return _artifact(svc, job_id, "plan")


@router.get("/{job_id}/report", responses=_ERRORS)
def get_report(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The evaluation report (report.json)."""
    return _artifact(svc, job_id, "report")


@router.get("/{job_id}/sensitivity", responses=_ERRORS)
def get_sensitivity(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The per-layer sensitivity table (sensitivity.json)."""
    return _artifact(svc, job_id, "sensitivity")


@router.get("/{job_id}/checkpoint", responses=_ERRORS)
def get_checkpoint(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The quantized checkpoint (.safetensors, streamed)."""
    return _artifact(svc, job_id, "checkpoint", download=f"{job_id}.safetensors")
