"""The service's settings: one pydantic-settings class, read from ``BITPLAN_*`` variables.

Only the service reads settings; the library packages take plain values (a ``torch.device``, a
``HessianConfig``...) from the pipeline. Validators refuse values that would make the service
unsafe or useless (a non-positive upload limit, a heartbeat timeout shorter than the interval
between heartbeats, ...) with a message naming the variable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Settings(BaseSettings):
    """Every knob of the service. Environment variables are ``BITPLAN_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="BITPLAN_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path("data"), description="uploads, artifacts, SQLite files")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store (default sqlite under data_dir)"
    )
    redis_url: str | None = Field(
        None, description="Huey on Redis when set (workers on other machines), else SqliteHuey"
    )
    api_key: str | None = Field(None, description="when set, every route but /healthz needs it")
    docs_public: bool | None = Field(
        None, description="serve /docs, /redoc and /openapi.json without the API key "
        "(default: only when no API key is set; with a key, /openapi.json then needs it too)"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str = Field("auto", description='"auto" (CUDA when present), "cpu" or "cuda[:N]"')
    # Upload limits per part of POST /plan, MB = 1e6 bytes. The defaults admit a ResNet-50 .pt2
    # (~103 MB of fp32 weights) and a ~100M-parameter transformer (~400 MB fp32) with program
    # overhead, and a few hundred 224x224 fp32 images (256 of them: 154 MB).
    max_model_mb: PositiveFloat = Field(1000.0, description="the model part (.pt2), MB")
    max_calibration_mb: PositiveFloat = Field(
        500.0, description="the calibration part (.safetensors), MB"
    )
    max_evaluation_mb: PositiveFloat = Field(
        500.0, description="the optional evaluation part (.safetensors), MB"
    )
    max_upload_mb: PositiveFloat | None = Field(
        None, description="optional cap on the whole POST /plan body, MB (unset: the sum of "
        "the part limits)"
    )
    max_concurrent_jobs: int = Field(1, ge=1, le=64, description="worker threads per worker")
    job_timeout_s: PositiveFloat = Field(3600.0, description="a running job is failed after this")
    heartbeat_interval_s: PositiveFloat = Field(5.0, description="how often a running job beats")
    heartbeat_timeout_s: PositiveFloat = Field(
        60.0, description="a running job whose last beat is older is taken as orphaned"
    )
    max_attempts: int = Field(2, ge=1, le=10, description="runs of a job before it is failed")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the calibration samples kept for evaluation"
    )
    memory_gb: PositiveFloat | None = Field(
        None, description="memory a job's passes may use, GB = 1e9 B (default: a quarter of "
        "the machine's available RAM, or half the GPU's memory); chunk sizes follow from it"
    )
    poll_interval_s: PositiveFloat = Field(0.5, description="longest idle wait of a worker")
    embedded_worker: bool = Field(True, description="`bitplan serve` also runs a worker")
    worker_nice: int = Field(
        10, ge=0, le=19, description="niceness of the worker `bitplan serve` starts: its jobs "
        "take the CPU time the API's requests leave (0: the API's priority)"
    )
    retention_days: float | None = Field(
        30.0, gt=0, description="a job that ended longer ago is deleted with its files "
        "(by a worker's maintenance pass); empty keeps jobs forever"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if len(v) < 8:
            raise ValueError("BITPLAN_API_KEY must be at least 8 characters (or unset)")
        return v

    @field_validator("max_upload_mb", mode="before")
    @classmethod
    def _empty_is_no_cap(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("database_url", "redis_url")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("retention_days", mode="before")
    @classmethod
    def _empty_keeps_forever(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _timing(self) -> Settings:
        if self.heartbeat_timeout_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                "BITPLAN_HEARTBEAT_TIMEOUT_S must be at least 3 x BITPLAN_HEARTBEAT_INTERVAL_S, "
                "or live jobs would be taken for dead ones"
            )
        if self.job_timeout_s < self.heartbeat_interval_s:
            raise ValueError("BITPLAN_JOB_TIMEOUT_S must exceed BITPLAN_HEARTBEAT_INTERVAL_S")
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def upload_limits(self) -> dict[str, int]:
        """Most bytes of each file part of POST /plan (``BITPLAN_MAX_<PART>_MB``)."""
        parts = {"model": self.max_model_mb, "calibration": self.max_calibration_mb,
                 "evaluation": self.max_evaluation_mb}
        return {part: int(math.floor(mb * 1e6)) for part, mb in parts.items()}

    @property
    def max_upload_bytes(self) -> int | None:
        """The optional cap on the whole POST /plan body (``BITPLAN_MAX_UPLOAD_MB``)."""
        return None if self.max_upload_mb is None else int(math.floor(self.max_upload_mb * 1e6))

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def cache_dir(self) -> Path:
        """Stage results reused across jobs (sensitivity, DRQ regions), by content hash."""
        return self.data_dir / "cache"

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.db"

    def torch_device(self):  # -> torch.device (torch is imported lazily)
        return resolve_device(self.device)

    def memory_budget_bytes(self, device) -> int:  # device: torch.device
        """``memory_gb`` in bytes, or the default share of the device's memory."""
        return memory_budget(self.memory_gb, device)


def check_device(value: str) -> str:
    """Normalise a device setting; raises ValueError unless auto / cpu / cuda / cuda:N."""
    v = value.strip().lower()
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(
        f'device (BITPLAN_DEVICE / --device) must be "auto", "cpu", "cuda" or "cuda:N", '
        f'not {value!r}'
    )


DEFAULT_MEMORY_SHARE = 0.25  # of the available RAM: the rest for the OS, the service and
# other jobs; with the counted per-sample cost a job stays within it (docs/benchmarks.md)
DEFAULT_GPU_MEMORY_SHARE = 0.5  # of the GPU's memory: the GPU runs one job's passes


def memory_budget(memory_gb: float | None, device) -> int:
    """Bytes a job's passes may use on ``device``: ``memory_gb`` x 1e9, or by default
    ``DEFAULT_GPU_MEMORY_SHARE`` of the GPU's memory / ``DEFAULT_MEMORY_SHARE`` of the RAM
    available now."""
    if memory_gb is not None:
        return int(memory_gb * 1e9)
    from sensitivity.memory import available_bytes

    share = DEFAULT_GPU_MEMORY_SHARE if device.type == "cuda" else DEFAULT_MEMORY_SHARE
    return int(share * available_bytes(device))


def resolve_device(value: str):  # -> torch.device
    """The torch device for a device setting: ``auto`` is CUDA when present, else CPU."""
    import torch

    v = check_device(value)
    if v == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(v)
