"""GET /healthz (never needs the API key)."""

from __future__ import annotations

from fastapi import APIRouter

from ..schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    """Liveness: the API answers."""
    return HealthPublic(status="ok", version="1")
