"""GET /healthz (never needs the API key)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ServiceDep
from ..errors import UnavailableError
from ..schemas import HealthPublic
from . import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, responses=error_responses(503))
def healthz(svc: ServiceDep) -> HealthPublic:
    """Liveness: the API answers and the job store is reachable (else 503)."""
    if not svc.store.ping():
        raise UnavailableError("the job store does not answer; check BITPLAN_DATABASE_URL")
    return HealthPublic(status="ok", version="1")
