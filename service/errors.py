"""The one place that maps bitplan's typed errors to HTTP statuses and to job errors.

Request-time failures (a bad upload, a bad id) become HTTP responses through one exception
handler (``service/app.py``) and the table :data:`HTTP_STATUS`; run-time failures (the worker's
pipeline) become the job's ``error = {code, message, detail}``. Unknown exceptions are never
shown raw: the job gets code ``internal`` and the log keeps the traceback.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from solver.errors import BitplanError, StorageError

log = logging.getLogger(__name__)


class ConflictError(BitplanError):
    """The request does not fit the job's state (e.g. the plan of a job that has not finished)."""

    code = "conflict"


class InvalidRequestError(BitplanError):
    """A path or query parameter failed FastAPI's validation (``detail``: field, message)."""

    code = "invalid_request"


class UnavailableError(BitplanError):
    """A backend the service needs (the job store) does not answer."""

    code = "unavailable"


# Typed error code -> HTTP status: the only such table. bad_* about the request's content are
# 422 (well-formed HTTP, unusable content); a malformed multipart body is 400.
HTTP_STATUS: dict[str, int] = {
    "bad_request": 400,
    "invalid_request": 422,
    "bad_model": 422,
    "bad_calibration": 422,
    "bad_constraints": 422,
    "bad_problem": 422,
    "bad_plan": 422,
    "bad_checkpoint": 422,
    "infeasible": 422,
    "unsupported_export": 422,
    "not_found": 404,
    "conflict": 409,
    "cancelled": 409,
    "too_large": 413,
    "resource_limit": 422,  # one sample's pass exceeds the memory budget: the input, not us
    "unavailable": 503,
    "storage": 507,  # the data directory is full: Insufficient Storage
    "export_mismatch": 500,  # the export computes something else: a bitplan bug, not the input
    "missing_dependency": 501,  # this installation lacks an optional extra
}


def http_status(error: BitplanError) -> int:
    """The HTTP status for a request that failed with ``error`` (500 only for unknown codes)."""
    return HTTP_STATUS.get(error.code, 500)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def storage_error(exc: BaseException, what: str) -> StorageError | None:
    """The typed error for a write that failed because the disk is full, else None. Besides
    OSError, this knows the Rust libraries' wording (safetensors: "... (os error 28)")."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        code = next((c for c in NO_SPACE if f"(os error {c})" in str(exc)), None)
    if code not in NO_SPACE:
        return None
    return StorageError(
        f"no space left on the data directory while writing {what} ({errno.errorcode[code]}); "
        "free space under BITPLAN_DATA_DIR (or lower BITPLAN_RETENTION_DAYS) and resubmit",
        detail={"errno": code, "file": what},
    )


def job_error(exc: BaseException) -> dict[str, Any]:
    """The ``{code, message, detail}`` recorded on a job that failed with ``exc``."""
    if not isinstance(exc, BitplanError) and (typed := storage_error(exc, "a file")):
        exc = typed
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
