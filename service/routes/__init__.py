"""One router per resource: plans (submission), jobs, health."""

from __future__ import annotations

from fastapi import HTTPException

from solver.errors import BitplanError

from ..errors import http_status


def http_error(exc: BitplanError) -> HTTPException:
    """The HTTPException for a typed error (status from service/errors.py)."""
    return HTTPException(http_status(exc), detail=exc.to_dict())
