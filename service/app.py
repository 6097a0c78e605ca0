"""The FastAPI application (OpenAPI at /docs; with an API key, only /openapi.json, keyed).
``create_app(settings)`` builds one; the routes live in ``service/routes/``, one router per
resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from solver.errors import BitplanError

from . import pages
from .core import BitplanService
from .deps import ApiKeyDep
from .errors import InvalidRequestError, http_status
from .routes import health, jobs, plans
from .settings import Settings

log = logging.getLogger(__name__)


def _error_response(
    error: BitplanError, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=http_status(error), headers=headers)


async def _typed_error(request: Request, exc: BitplanError) -> JSONResponse:
    """Every typed error a route (or what it calls) raises: status from the one table."""
    return _error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
    ]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return _error_response(InvalidRequestError(f"invalid request: {text}", detail=problems))


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    # Starlette's own errors (404 for an unknown path, 405) and the API-key check (401): the
    # code is the status's name, e.g. "method_not_allowed".
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        code = "error"
    body = {"code": code, "message": str(exc.detail), "detail": None}
    return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)


def create_app(settings: Settings | None = None, service: BitplanService | None = None) -> FastAPI:
    """The API bound to ``service`` (or one built from ``settings``, or from the environment)."""
    svc = service or BitplanService.from_settings(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if service is None:  # we built it, we close it
            svc.close()

    # The API's description is public only when the API is (or when asked for): with a key,
    # the interactive pages are off and the schema needs the key like every other route.
    settings = svc.settings
    public = settings.api_key is None if settings.docs_public is None else settings.docs_public
    app = FastAPI(
        title="bitplan",
        version="0.1.0",
        summary="Mixed-precision search for PyTorch models (HAWQ-V3 ILP + DRQ regions)",
        lifespan=lifespan,
        docs_url="/docs" if public else None,
        redoc_url="/redoc" if public else None,
        openapi_url="/openapi.json" if public else None,
    )
    if not public:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[ApiKeyDep])
        def openapi_schema() -> dict:
            return app.openapi()
    app.state.service = svc
    app.add_exception_handler(BitplanError, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_exception)
    app.include_router(health.router)
    app.include_router(plans.router)
    app.include_router(jobs.router)
    app.include_router(pages.router)
    return app
