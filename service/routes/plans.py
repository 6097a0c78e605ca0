"""POST /plan: submit a model, calibration data and constraints."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from solver.errors import BitplanError

from ..constraints import Constraints
from ..deps import ApiKeyDep, ServiceDep
from ..schemas import ErrorResponse, JobSubmitted, job_links
from . import http_error

router = APIRouter(tags=["plans"], dependencies=[ApiKeyDep])

_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "calibration", "constraints"],
                    "properties": {
                        "model": {
                            "type": "string",
                            "format": "binary",
                            "description": "torch.export program (.pt2)",
                        },
                        "calibration": {
                            "type": "string",
                            "format": "binary",
                            "description": ".safetensors with 'inputs' [N, ...], optional 'labels'",
                        },
                        "constraints": {
                            "type": "string",
                            "description": "JSON, schema Constraints",
                        },
                    },
                }
            }
        },
    }
}

_ERRORS = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 413, 422)
}


@router.post(
    "/plan",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=_FORM,
    responses=_ERRORS,
    response_model=JobSubmitted,
)
async def submit_plan(request: Request, svc: ServiceDep) -> JobSubmitted:
    """Validate and queue a mixed-precision search (multipart: model, calibration, constraints)."""
    try:
        job = await svc.submit(
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
        )
    except BitplanError as exc:
        raise http_error(exc) from None
    return JobSubmitted(job_id=job.id, status=job.status, links=job_links(job.id))


@router.get("/constraints/schema")
def constraints_schema() -> dict:
    """The JSON schema of the constraints field."""
    return Constraints.model_json_schema()
