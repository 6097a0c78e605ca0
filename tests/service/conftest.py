"""Fixtures for the service tests: settings in a temporary data directory, an in-process app
(no worker: jobs stay queued unless a test runs them), and request helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.core import BitplanService
from service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=1.0,
        poll_interval_s=0.1,
        max_upload_mb=5.0,
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[BitplanService]:
    svc = BitplanService.from_settings(settings)
    yield svc
    svc.close()


@pytest.fixture
def client(service: BitplanService) -> Iterator[TestClient]:
    with TestClient(create_app(service=service)) as c:
        yield c
