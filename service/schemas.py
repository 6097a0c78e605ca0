"""Pydantic schemas of the REST API (``XCreate`` in, ``XPublic`` out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from .jobs import Job


class ErrorPublic(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorResponse(BaseModel):
    error: ErrorPublic


class JobLinks(BaseModel):
    self: str
    plan: str
    report: str
    checkpoint: str
    cancel: str


def job_links(job_id: str) -> JobLinks:
    base = f"/jobs/{job_id}"
    return JobLinks(
        self=base,
        plan=f"{base}/plan",
        report=f"{base}/report",
        checkpoint=f"{base}/checkpoint",
        cancel=base,
    )


class JobSubmitted(BaseModel):
    job_id: str
    status: str
    links: JobLinks


class JobPublic(BaseModel):
    id: str
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    stage: str | None = Field(None, description="current pipeline stage")
    progress: float = Field(description="0..1 over the whole job")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    model_name: str | None
    constraints: dict[str, Any]
    error: ErrorPublic | None = None
    summary: dict[str, Any] | None = Field(None, description="plan totals and evaluation")
    links: JobLinks

    @classmethod
    def from_job(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id,
            status=job.status,
            stage=job.stage,
            progress=job.progress,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            attempts=job.attempts,
            model_name=job.model_name,
            constraints=job.constraints,
            error=job.error,
            summary=job.summary,
            links=job_links(job.id),
        )


class JobsPublic(BaseModel):
    items: list[JobPublic]
    total: int
    offset: int
    limit: int


class HealthPublic(BaseModel):
    status: str
    version: str
