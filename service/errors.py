"""The one place that maps bitplan's typed errors to HTTP statuses and to job errors.

Request-time failures (a bad upload, a bad id) become HTTP responses; run-time failures (the
worker's pipeline) become the job's ``error = {code, message, detail}``. Unknown exceptions are
never shown raw: the job gets code ``internal`` and the log keeps the traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from solver.errors import BitplanError

log = logging.getLogger(__name__)


class ConflictError(BitplanError):
    """The request does not fit the job's state (e.g. the plan of a job that has not finished)."""

    code = "conflict"


class UnauthorizedError(BitplanError):
    """Missing or wrong API key."""

    code = "unauthorized"


# code -> HTTP status. bad_* that are about the request body are 422 (well-formed HTTP,
# unusable content); a malformed multipart body is 400.
_HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "bad_model": 422,
    "bad_calibration": 422,
    "bad_constraints": 422,
    "bad_problem": 422,
    "bad_plan": 422,
    "bad_checkpoint": 422,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "infeasible": 422,
    "cancelled": 409,
}


def http_status(error: BitplanError) -> int:
    """The HTTP status for a request that failed with ``error`` (500 only for unknown codes)."""
    return _HTTP_STATUS.get(error.code, 500)


def error_body(error: BitplanError) -> dict[str, Any]:
    """The JSON body of an error response: ``{"error": {code, message, detail}}``."""
    return {"error": error.to_dict()}


def job_error(exc: BaseException) -> dict[str, Any]:
    """The ``{code, message, detail}`` recorded on a job that failed with ``exc``."""
    if isinstance(exc, BitplanError):
        return exc.to_dict()
    if isinstance(exc, MemoryError):
        return {
            "code": "out_of_memory",
            "message": "the worker ran out of memory; use a smaller calibration set or model",
            "detail": None,
        }
    log.error("job failed with an unexpected error", exc_info=exc)
    return {
        "code": "internal",
        "message": f"internal error ({type(exc).__name__}: {exc}); this is a bitplan bug",
        "detail": None,
    }
