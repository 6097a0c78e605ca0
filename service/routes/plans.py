"""POST /plan: submit a model, calibration data and constraints."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from ..constraints import Constraints
from ..deps import ApiKeyDep, ServiceDep
from ..schemas import JobSubmitted
from . import error_responses

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
                            "description": "torch.export program (.pt2), at most "
                            "BITPLAN_MAX_MODEL_MB",
                        },
                        "calibration": {
                            "type": "string",
                            "format": "binary",
                            "description": ".safetensors with 'inputs' [N, ...], optional "
                            "'labels', at most BITPLAN_MAX_CALIBRATION_MB",
                        },
                        "evaluation": {
                            "type": "string",
                            "format": "binary",
                            "description": "optional .safetensors in the calibration's format, "
                            "used only to evaluate the plan (default: the held-out share of "
                            "the calibration), at most BITPLAN_MAX_EVALUATION_MB",
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

_ERRORS = error_responses(400, 401, 413, 422, 507)  # 507: the data directory is full


@router.post(
    "/plan",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=_FORM,
    responses=_ERRORS,
    response_model=JobSubmitted,
)
async def submit_plan(request: Request, svc: ServiceDep) -> JobSubmitted:
    """Validate and queue a mixed-precision search (multipart: model, calibration, optional
    evaluation, constraints)."""
    job = await svc.submit(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
    )
    return JobSubmitted(job_id=job.id, status=job.status)


@router.get("/constraints/schema")
def constraints_schema() -> dict:
    """The JSON schema of the constraints field."""
    return Constraints.model_json_schema()
