"""The FastAPI application (OpenAPI at /docs; with an API key, only /openapi.json, keyed).
``create_app(settings)`` builds one; the routes live in ``service/routes/``, one router per
resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .core import BitplanService
from .deps import ApiKeyDep
from .routes import health, jobs, plans
from .settings import Settings

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 422: "bad_request", 503: "unavailable"}


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    # Routes put the typed error's {code, message, detail} in ``detail``; Starlette's own
    # errors (404 for an unknown path, 405) carry a plain string.
    body = exc.detail
    if not (isinstance(body, dict) and "code" in body):
        body = {"code": _CODES.get(exc.status_code, "error"), "message": str(body), "detail": None}
    return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
    ]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    body = {"code": "bad_request", "message": f"invalid request: {text}", "detail": problems}
    return JSONResponse({"error": body}, status_code=422)


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
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.include_router(health.router)
    app.include_router(plans.router)
    app.include_router(jobs.router)
    return app
