"""Request helpers and the real-server harness shared by the service tests (imported as a plain
module: tests/ has no packages)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from service.settings import Settings

# Small enough to keep every service test quick: a handful of Hutchinson samples.
FAST_HESSIAN = {"max_iter": 4, "tol": 0.5, "seed": 0}


def constraints(**limits: Any) -> str:
    return json.dumps({"limits": limits or {"size_ratio": 0.8}, "hessian": FAST_HESSIAN})


def post_plan(
    client: TestClient,
    model: bytes,
    calib: bytes,
    constraints_json: str,
    headers: dict[str, str] | None = None,
):
    files = {
        "model": ("model.pt2", model, "application/octet-stream"),
        "calibration": ("calib.safetensors", calib, "application/octet-stream"),
    }
    return client.post(
        "/plan", files=files, data={"constraints": constraints_json}, headers=headers or {}
    )


ROOT = Path(__file__).resolve().parents[2]  # the repository
START_TIMEOUT = 90.0
JOB_TIMEOUT = 120.0


def free_port() -> int:
    """A free TCP port on loopback (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a `bitplan` process the tests start: fast heartbeats, the CPU,
    ``data_dir``, and ``overrides`` (BITPLAN_* variables)."""
    env = dict(os.environ)
    env.update(
        BITPLAN_DATA_DIR=str(data_dir),
        BITPLAN_HEARTBEAT_INTERVAL_S="0.5",
        BITPLAN_HEARTBEAT_TIMEOUT_S="10",
        BITPLAN_POLL_INTERVAL_S="0.2",
        BITPLAN_MAX_CONCURRENT_JOBS="1",
        BITPLAN_DEVICE="cpu",
        PYTHONPATH=str(ROOT),
    )
    env.update(overrides)
    env.pop("BITPLAN_API_KEY", None)
    return env


class Server:
    """`python -m service.cli serve` as a subprocess on a free port, driven over HTTP."""

    def __init__(self, data_dir: Path, log: Path, *extra: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), *extra],
            cwd=ROOT, env=env_for(data_dir, **env), stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=30.0)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer within {START_TIMEOUT} s; see {log}")

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-job, nothing is cleaned up."""
        self.proc.kill()
        self.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.client.close()
        self.log.close()

    def submit(self, model: Path, calib: Path, constraints: dict) -> str:
        with model.open("rb") as m, calib.open("rb") as c:
            r = self.client.post(
                "/plan",
                files={"model": (model.name, m), "calibration": (calib.name, c)},
                data={"constraints": json.dumps(constraints)},
            )
        assert r.status_code == 202, r.text
        return r.json()["job_id"]

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT, until=None) -> dict:
        """Poll until the job is finished (or ``until(job)`` holds)."""
        until = until or (lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            seen.append((job["status"], job["stage"], job["progress"]))
            if until(job):
                job["seen"] = seen
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not there in {timeout} s: last {seen[-3:]}")


def fast_settings(data_dir: Path, **extra: Any) -> Settings:
    """Settings for in-process service tests: quick heartbeats and polls, small uploads."""
    return Settings(data_dir=data_dir, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0,
                    poll_interval_s=0.1, max_model_mb=5.0, max_calibration_mb=5.0, **extra)


def run_worker_until_done(api: Server, job_id: str, data_dir: Path, log: Path,
                          **env: str) -> dict:
    """Start `bitplan worker` (a process of its own, ``env`` added), wait until ``api`` reports
    ``job_id`` finished, stop the worker with SIGTERM (it must exit 0); the job."""
    with log.open("ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            cwd=ROOT, env=env_for(data_dir, **env), stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            job = api.wait(job_id)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(20) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    return job
