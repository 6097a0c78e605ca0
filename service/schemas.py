"""Pydantic schemas of the REST API (``XCreate`` in, ``XPublic`` out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator


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
    onnx: str
    cancel: str
    pareto: str
    replan: str
    page: str


def job_links(job_id: str) -> JobLinks:
    base = f"/jobs/{job_id}"
    return JobLinks(
        self=base,
        plan=f"{base}/plan",
        report=f"{base}/report",
        checkpoint=f"{base}/checkpoint",
        onnx=f"{base}/onnx",
        cancel=base,
        pareto=f"{base}/pareto",
        replan=f"{base}/replan",
        page=f"/ui/jobs/{job_id}",
    )


class JobSubmitted(BaseModel):
    job_id: str
    status: str
    parent_id: str | None = Field(None, description="the job a re-plan re-uses")
    reuses: list[str] | None = Field(
        None, description="what a re-plan takes from its parent: uploads, and the stages "
        "found in the cache (sensitivity, regions); the rest is computed")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def links(self) -> JobLinks:
        return job_links(self.job_id)


class JobPublic(BaseModel):
    """A job as the API shows it, read from the job's attributes
    (``JobPublic.model_validate(job)``); paths on the worker's disk are not shown."""

    model_config = ConfigDict(from_attributes=True)

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
    parent_id: str | None = Field(None, description="the job this one re-plans")
    stage_eta_s: float | None = Field(
        None, description="estimated seconds left in the current stage (running jobs, once the "
        "stage has advanced a few times; an upper bound for sensitivity, which stops early "
        "when converged)")

    @model_validator(mode="after")
    def _eta_only_while_running(self) -> JobPublic:
        if self.status != "running":
            self.stage_eta_s = None
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def links(self) -> JobLinks:
        return job_links(self.id)


class JobsPublic(BaseModel):
    items: list[JobPublic]
    total: int
    offset: int
    limit: int


class HealthPublic(BaseModel):
    status: str
    version: str
