"""Settings come from BITPLAN_* variables and refuse unsafe values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_and_derived_values(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BITPLAN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BITPLAN_MAX_UPLOAD_MB", "1.5")
    monkeypatch.setenv("BITPLAN_MAX_CALIBRATION_MB", "2.25")
    monkeypatch.setenv("BITPLAN_MAX_CONCURRENT_JOBS", "3")
    monkeypatch.setenv("BITPLAN_REDIS_URL", "")
    s = Settings()
    assert s.data_dir == tmp_path and s.max_concurrent_jobs == 3
    assert s.max_upload_bytes == 1_500_000 and s.redis_url is None
    assert s.upload_limits == {"model": 1_000_000_000, "calibration": 2_250_000,
                               "evaluation": 500_000_000}
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'jobs.db'}"
    assert s.torch_device().type == "cpu"  # auto on a machine without CUDA
    assert Settings(database_url="postgresql+psycopg://u@h/db").resolved_database_url.startswith(
        "postgresql"
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_upload_mb": 0}, "greater than 0"),
        ({"max_upload_mb": -5}, "greater than 0"),
        ({"max_upload_mb": float("inf")}, "finite"),
        ({"max_model_mb": 0}, "greater than 0"),
        ({"max_calibration_mb": -1}, "greater than 0"),
        ({"max_evaluation_mb": float("nan")}, "finite"),
        ({"max_concurrent_jobs": 0}, "greater than or equal to 1"),
        ({"port": 70000}, "less than or equal"),
        ({"device": "tpu"}, "BITPLAN_DEVICE"),
        ({"api_key": "short"}, "at least 8"),
        ({"heartbeat_interval_s": 10, "heartbeat_timeout_s": 15}, "3 x"),
        ({"holdout_fraction": 1.0}, "less than 1"),
        ({"job_timeout_s": 0}, "greater than 0"),
    ],
)
def test_unsafe_values_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Settings(**kwargs)


def test_upload_defaults_admit_standard_models() -> None:
    """The per-part defaults admit what [9/9] names: a ResNet-50 .pt2 (25.56M fp32 parameters,
    102 MB, plus program overhead), a ~100M-parameter transformer (400 MB fp32) and 256
    calibration images of 3x224x224 fp32 (154 MB); no whole-body cap unless one is set."""
    s = Settings(_env_file=None)
    assert s.upload_limits["model"] >= 100e6 * 4 * 1.2  # 20 % over the transformer's weights
    assert s.upload_limits["model"] >= 25.56e6 * 4 * 1.2
    images = 256 * 3 * 224 * 224 * 4
    assert s.upload_limits["calibration"] >= 2 * images  # room for a few hundred samples more
    assert s.upload_limits["evaluation"] >= 2 * images
    assert s.max_upload_bytes is None
    assert Settings(max_upload_mb="").max_upload_bytes is None  # an empty variable: no cap
