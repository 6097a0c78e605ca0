"""FastAPI dependencies and their ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Path, Request, status

from .core import BitplanService

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


async def get_service(request: Request) -> BitplanService:
    # async: a plain function dependency would cost a thread-pool hop on every request
    return request.app.state.service


ServiceDep = Annotated[BitplanService, Depends(get_service)]


async def require_api_key(
    svc: ServiceDep,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """When BITPLAN_API_KEY is set, the X-API-Key header or ``Authorization: Bearer`` must match."""
    expected = svc.settings.api_key
    if expected is None:
        return
    given = x_api_key
    if given is None and authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong API key: send X-API-Key or Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


ApiKeyDep = Depends(require_api_key)

JobId = Annotated[
    str,
    Path(
        pattern=JOB_ID_PATTERN,
        description="the job id returned by POST /plan (32 hex digits)",
    ),
]
