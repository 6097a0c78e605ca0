"""The real thing: `python -m service.cli serve` as a subprocess (embedded SqliteHuey queue and
worker) on a free port, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from svc_helpers import FAST_HESSIAN

import quantize
from sensitivity.intake import load_calibration, load_program
from service.jobs import JobStore

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0
JOB_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(data_dir: Path, **overrides: str) -> dict[str, str]:
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
    def __init__(self, data_dir: Path, log: Path, *extra: str, **env: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), *extra],
            cwd=ROOT, env=_env(data_dir, **env), stdout=self.log, stderr=subprocess.STDOUT,
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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
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


def _constraints(**extra) -> dict:
    return {"hessian": FAST_HESSIAN, **extra}


def test_submit_poll_download_and_load(start_server, mlp_pt2, calib_path, tmp_path) -> None:
    server = start_server()
    ok = server.submit(mlp_pt2, calib_path,
                       _constraints(limits={"size_ratio": 0.7}, pin={"first": None}))
    bad = server.submit(mlp_pt2, calib_path, _constraints(limits={"size_mb": 1e-6}))
    job = server.wait(ok)
    assert job["status"] == "succeeded", job.get("error")
    assert job["progress"] == 1.0 and job["attempts"] == 1, job
    assert job["started_at"] <= job["finished_at"]
    assert job["summary"]["status"] == "optimal"

    plan = server.client.get(f"/jobs/{ok}/plan").json()
    assert plan["format"] == "bitplan-plan/1" and plan["status"] == "optimal"
    assert plan["totals"]["size_bytes"] <= plan["limits"]["size_bytes"]
    assert {row["name"] for row in plan["layers"]} == {"fc1", "fc2"}
    assert 4 in {row["w_bits"] for row in plan["layers"]}  # 0.7 x INT8 forces some 4-bit
    report = server.client.get(f"/jobs/{ok}/report").json()
    assert report["metrics"]["samples"] > 0
    ckpt = tmp_path / "model.safetensors"
    with server.client.stream("GET", f"/jobs/{ok}/checkpoint") as r:
        assert r.status_code == 200
        with ckpt.open("wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
    with safe_open(str(ckpt), "pt") as f:
        assert f.metadata()["format"] == "bitplan-qckpt/1"
    module = quantize.load(ckpt, load_program(mlp_pt2))
    calib = load_calibration(calib_path)
    with torch.no_grad():
        pred = module(calib.args[0]).argmax(1)
    assert (pred == calib.labels).float().mean() > 0.8

    failed = server.wait(bad)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "infeasible"
    assert failed["error"]["detail"], "the solver's diagnosis is the detail"
    assert "size" in failed["error"]["message"]
    infeasible_plan = server.client.get(f"/jobs/{bad}/plan").json()
    assert infeasible_plan["status"] == "infeasible" and infeasible_plan["diagnosis"]
    assert server.client.get(f"/jobs/{bad}/checkpoint").status_code == 404
    listed = server.client.get("/jobs").json()
    assert {j["id"] for j in listed["items"]} == {ok, bad}


def test_job_queued_before_a_restart_runs_after_it(start_server, cnn_pt2, calib_path) -> None:
    api_only = start_server("--no-worker")
    cons = _constraints(limits={"size_ratio": 0.8}, activation_bits=[4, 8],
                        drq={"region_sizes": [2, 4], "sensitive_fractions": [0.3]})
    job_id = api_only.submit(cnn_pt2, calib_path, cons)
    time.sleep(0.5)
    assert api_only.client.get(f"/jobs/{job_id}").json()["status"] == "queued"
    api_only.stop()  # the job is only in the durable SQLite queue now

    server = start_server()
    job = server.wait(job_id)
    assert job["status"] == "succeeded", job.get("error")
    assert job["attempts"] == 1
    stages = [s for _, s, _ in job["seen"]]
    assert "done" in stages
    plan = server.client.get(f"/jobs/{job_id}/plan").json()
    assert plan["constraints"]["activation_bits"] == [4, 8]
    assert len(plan["layers"]) == 3


def test_dead_worker_job_is_retried_and_a_running_job_cancels(start_server, mlp_pt2,
                                                              calib_path, tmp_path) -> None:
    fast_reaper = {"BITPLAN_HEARTBEAT_TIMEOUT_S": "3"}
    server = start_server(**fast_reaper)
    # a sensitivity sweep that would take minutes: the job is surely running when killed
    slow = {"limits": {"size_ratio": 0.9}, "pin": {"first": None},
            "hessian": {"max_iter": 100000, "tol": 1e-6, "seed": 0}}
    job_id = server.submit(mlp_pt2, calib_path, slow)
    server.wait(job_id, until=lambda j: j["stage"] == "sensitivity")
    server.kill()

    server = start_server(**fast_reaper)  # its reaper finds the stale heartbeat
    job = server.wait(job_id, until=lambda j: j["attempts"] == 2 and j["status"] == "running")
    assert job["started_at"] is not None
    r = server.client.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    t0 = time.monotonic()
    server.stop()  # the worker's pipeline noticed: a graceful stop does not wait for the sweep
    assert time.monotonic() - t0 < 15
    store = JobStore(f"sqlite:///{tmp_path / 'data' / 'jobs.db'}")
    final = store.get(job_id)
    store.close()
    assert final.status == "cancelled" and final.attempts == 2


def test_api_and_separate_worker_processes(start_server, mlp_pt2, calib_path,
                                           tmp_path) -> None:
    api = start_server("--no-worker")
    job_id = api.submit(mlp_pt2, calib_path,
                        _constraints(limits={"bops_ratio": 0.8}, pin={"first": None}))
    log = (tmp_path / "worker.log").open("ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        cwd=ROOT, env=_env(tmp_path / "data"), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        job = api.wait(job_id)
        assert job["status"] == "succeeded", job.get("error")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        log.close()
