"""Jobs: status, listing, artifacts, cancellation."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, status
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from ..core import PLOT_PATTERN, BitplanService
from ..deps import ApiKeyDep, JobId, ServiceDep
from ..jobs import STATUSES
from ..schemas import JobPublic, JobsPublic, JobSubmitted
from . import error_responses

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[ApiKeyDep])

_ERRORS = error_responses(401, 404, 409, 422)
MAX_OFFSET = 2**53  # beyond any real listing; SQL stores offsets as 64-bit integers


@router.get("", response_model=JobsPublic, responses=error_responses(401, 422))
def list_jobs(
    svc: ServiceDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(STATUSES) + ")$")] = None,
) -> JobsPublic:
    """Jobs, newest first."""
    items, total = svc.list(offset, limit, status)
    return JobsPublic(
        items=[JobPublic.model_validate(j) for j in items], total=total, offset=offset, limit=limit
    )


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
async def get_job(job_id: JobId, svc: ServiceDep) -> Response:
    """A job's status, stage, progress, timestamps and error."""
    # The poll path: a local SQLite read (tens of microseconds) runs on the event loop, a
    # database server's in the thread pool; the body is serialised once (no response_model
    # round trip; the schema stays documented by response_model).
    job = svc.get(job_id) if svc.store.local else await run_in_threadpool(svc.get, job_id)
    return Response(JobPublic.model_validate(job).model_dump_json(),
                    media_type="application/json")


@router.post("/{job_id}/replan", status_code=status.HTTP_202_ACCEPTED,
             response_model=JobSubmitted,
             responses={**_ERRORS, **error_responses(400)})  # 400: a body that is not JSON
def replan_job(job_id: JobId, svc: ServiceDep,
               constraints: Annotated[dict[str, Any], Body()]) -> JobSubmitted:
    """Queue a new job on this job's uploads with other constraints (JSON body: the
    constraints); its sensitivity and DRQ regions are reused when their settings match."""
    job, reuses = svc.replan(job_id, constraints)
    return JobSubmitted(job_id=job.id, status=job.status, parent_id=job.parent_id,
                        reuses=reuses)


@router.get("/{job_id}/pareto", responses=_ERRORS)
def get_pareto(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The Pareto fronts of the job (pareto.json: Omega against each limited resource, with
    measured quality at up to 5 points each)."""
    return _artifact(svc, job_id, "pareto")


@router.get(
    "/{job_id}/plots/{name}",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"image/svg+xml": {}, "image/png": {}},
                                "description": "the plot"}},
)
def get_plot(job_id: JobId, name: Annotated[str, Path(pattern=PLOT_PATTERN)],
             svc: ServiceDep) -> FileResponse:
    """A plot of the job: bits.svg / bits.png (bits per layer and sensitivity), pareto.svg /
    pareto.png (the trade-off curves)."""
    path, media_type = svc.plot(job_id, name)
    return FileResponse(path, media_type=media_type)


@router.delete("/{job_id}", response_model=JobPublic, responses=_ERRORS)
def cancel_job(job_id: JobId, svc: ServiceDep) -> JobPublic:
    """Cancel a queued or running job."""
    return JobPublic.model_validate(svc.cancel(job_id))


def _artifact(
    svc: BitplanService, job_id: str, name: str, download: str | None = None
) -> FileResponse:
    path, media_type = svc.artifact(job_id, name)
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


@router.get(
    "/{job_id}/checkpoint",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                "description": "the checkpoint file"}},
)
def get_checkpoint(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The quantized checkpoint (.safetensors, streamed)."""
    return _artifact(svc, job_id, "checkpoint", download=f"{job_id}.safetensors")


@router.get(
    "/{job_id}/onnx",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                "description": "the ONNX model"}},
)
def get_onnx(job_id: JobId, svc: ServiceDep) -> FileResponse:
    """The quantized model as ONNX (opset 21 QDQ graph, checked in ONNX Runtime; 404 when
    the model holds an op the exporter cannot express: see the report's ``onnx`` section)."""
    return _artifact(svc, job_id, "onnx", download=f"{job_id}.onnx")
