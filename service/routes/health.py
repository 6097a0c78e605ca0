"""GET /healthz (never needs the API key)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from ..deps import ServiceDep
from ..schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz(svc: ServiceDep) -> HealthPublic:
    """Liveness: the API answers and the job store is reachable (else 503)."""
    if not svc.store.ping():
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail="job store unreachable")
    return HealthPublic(status="ok", version="1")
