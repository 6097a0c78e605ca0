"""One router per resource: plans (submission), jobs, health. Routes raise bitplan's typed
errors; the app's one exception handler turns them into HTTP (``service/errors.py``)."""

from __future__ import annotations

from ..schemas import ErrorResponse


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """The OpenAPI ``responses`` entry for the error statuses a route can answer."""
    return {code: {"model": ErrorResponse} for code in statuses}
