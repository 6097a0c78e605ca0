"""Fixtures for the service tests: settings in a temporary data directory, the job store, an
in-process app (no worker: jobs stay queued unless a test runs them), and real `bitplan serve`
subprocesses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import Server, fast_settings

from service.app import create_app
from service.core import BitplanService
from service.jobs import JobStore
from service.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return fast_settings(tmp_path / "data")


@pytest.fixture
def service(settings: Settings) -> Iterator[BitplanService]:
    svc = BitplanService.from_settings(settings)
    yield svc
    svc.close()


@pytest.fixture
def client(service: BitplanService) -> Iterator[TestClient]:
    with TestClient(create_app(service=service)) as c:
        yield c


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    """The job store of ``settings`` (SQLite in the data directory unless it says otherwise)."""
    settings.data_dir.mkdir(parents=True)
    s = JobStore(settings.resolved_database_url)
    yield s
    s.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """start(*cli_args, **BITPLAN_env) -> a running `bitplan serve` on tmp_path/data; all are
    stopped after the test."""
    servers: list[Server] = []

    def start(*extra: str, **env: str) -> Server:
        server = Server(tmp_path / "data", tmp_path / "server.log", *extra, **env)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
