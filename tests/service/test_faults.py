"""Faults: the data directory full while a job writes its artifacts (a real size-limited tmpfs
when this process may mount one, and ENOSPC injected into the checkpoint write on any machine),
a full disk during an upload, the job store unreachable at start, a worker killed in the
quantize stage."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file
from svc_helpers import ROOT, constraints, env_for, free_port, post_plan

import quantize.checkpoint
from service import uploads as uploads_module
from service.constraints import parse_constraints
from service.core import BitplanService

ARTIFACTS = ("plan", "report", "sensitivity", "checkpoint")


def _job(service: BitplanService, model: Path, calib: Path, out: Path) -> str:
    job_id = uuid.uuid4().hex
    cons = parse_constraints(constraints(size_mb=1.0)).to_dict()
    service.store.create(job_id, cons, str(model), str(calib), str(out))
    return job_id


def _assert_failed_storage_nothing_half_written(service, client, job_id: str, out: Path) -> None:
    job = service.store.get(job_id)
    assert job.status == "failed" and job.error_code == "storage", job.error
    assert "BITPLAN_DATA_DIR" in job.error_message
    leftovers = [p.name for p in out.rglob("*") if "partial" in p.name]
    assert leftovers == []
    for p in out.glob("*.json"):  # whatever was written is whole
        json.loads(p.read_text())
    assert not (out / "model.safetensors").exists() or load_file(out / "model.safetensors")
    for name in ARTIFACTS:
        r = client.get(f"/jobs/{job_id}/{name}")
        if name == "plan" and r.status_code == 200:  # a plan written before the disk filled
            json.loads(r.content)
        else:
            assert r.status_code == 404, (name, r.status_code)


def test_full_disk_at_the_checkpoint_fails_the_job_with_storage(
    service, client, mlp_pt2, calib_path, tmp_path, monkeypatch
) -> None:
    """ENOSPC injected: the checkpoint write gets half its bytes out, then the disk is full."""
    def half_then_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(quantize.checkpoint, "save_file", half_then_full)
    out = tmp_path / "out"
    job_id = _job(service, mlp_pt2, calib_path, out)
    service.queue.run_job(job_id)  # the worker's entry point: never raises for a job
    _assert_failed_storage_nothing_half_written(service, client, job_id, out)
    assert (out / "plan.json").is_file()  # written whole before the checkpoint


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 512 kB tmpfs (needs root and a kernel that lets this process mount), else skip."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "bitplan-test", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_tmpfs_fails_the_job_with_storage(service, client, mlp_pt2, calib_path,
                                                   small_tmpfs) -> None:
    """A real full file system: 20 kB left (five 4 kB pages: the small JSON files fit, the
    checkpoint and report after them do not; whichever write fails, the job must fail the
    same way)."""
    out = small_tmpfs / "out"
    out.mkdir()
    st = os.statvfs(small_tmpfs)
    free = st.f_bavail * st.f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 20 * 1024))
    job_id = _job(service, mlp_pt2, calib_path, out)
    service.queue.run_job(job_id)
    _assert_failed_storage_nothing_half_written(service, client, job_id, out)


class _FullFile(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_an_upload_is_a_507_and_leaves_nothing(client, service, monkeypatch,
                                                               mlp_pt2, calib_path) -> None:
    monkeypatch.setattr(uploads_module, "open", lambda *a, **k: _FullFile(), raising=False)
    r = post_plan(client, mlp_pt2.read_bytes(), calib_path.read_bytes(), constraints(size_mb=1))
    assert r.status_code == 507, r.text
    assert r.json()["error"]["code"] == "storage"
    assert list(service.settings.jobs_dir.iterdir()) == []
    assert service.store.list()[1] == 0


def _start(command: str, database_url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = env_for(tmp_path / "data", BITPLAN_DATABASE_URL=database_url)
    args = [sys.executable, "-m", "service.cli", command]
    if command == "serve":
        args += ["--port", str(free_port())]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_unreachable_job_store_at_start_is_a_clear_exit(command, tmp_path) -> None:
    pytest.importorskip("psycopg")
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://bitplan:s3cret-pw@127.0.0.1:{port}/bitplan"
    done = _start(command, url, tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "bitplan: error [unavailable]: the job store at" in done.stderr
    assert "BITPLAN_DATABASE_URL" in done.stderr and f"127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in text and "s3cret-pw" not in text


def test_unopenable_sqlite_job_store_is_a_clear_exit(tmp_path) -> None:
    done = _start("serve", f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'jobs.db'}", tmp_path)
    assert done.returncode == 2, done.stderr
    assert "[unavailable]" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # two server starts and two CNN jobs: about a minute on a shared 2-core box
def test_worker_killed_in_quantize_is_retried(start_server, cnn_pt2, calib_path) -> None:
    fast_reaper = {"BITPLAN_HEARTBEAT_TIMEOUT_S": "3"}
    server = start_server(**fast_reaper)
    job_id = server.submit(cnn_pt2, calib_path, json.loads(constraints(size_mb=1.0)))
    # Poll without pause: quantize takes 0.3-2 s on the CNN (idle to loaded machine) and a
    # poll answers in milliseconds, so the kill lands inside it.
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = server.client.get(f"/jobs/{job_id}").json()
        seen.append((job["status"], job["stage"]))
        if job["stage"] in ("quantize", "evaluate") or job["status"] not in ("queued",
                                                                              "running"):
            break
    server.kill()
    assert job["stage"] == "quantize", seen[-3:]

    server = start_server(**fast_reaper)  # its reaper finds the stale heartbeat, requeues once
    job = server.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert server.client.get(f"/jobs/{job_id}/checkpoint").status_code == 200
