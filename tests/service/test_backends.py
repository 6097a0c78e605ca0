"""The service on its scale-out backends: PostgreSQL as the job store (SQLAlchemy + psycopg) and
Redis as the queue (RedisHuey), both real servers that these tests start on loopback ports.

The worker-side tests of test_queue.py run again here on them (imported below, so pytest
collects them in this module with its ``settings``), then the real API and a separate worker
process run a job through them. Every test skips, saying what to install, where a server
program (``redis-server``; PostgreSQL's ``initdb`` / ``pg_ctl``) or a driver (the ``redis`` /
``postgres`` extras) is missing; ``.ci/run`` installs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from svc_helpers import FAST_HESSIAN, fast_settings, free_port, run_worker_until_done

# The worker-side behaviour, on PostgreSQL and Redis (each runs with this module's fixtures).
from test_queue import (  # noqa: F401  (collected here again)
    _job,
    test_cancel_while_running_stops_the_pipeline,
    test_failures_become_job_errors,
    test_jobs_past_retention_are_deleted_with_their_files,
    test_orphaned_job_is_retried_once_then_failed,
    test_queued_job_missing_from_the_queue_is_enqueued,
    test_success_records_progress_and_summary,
    test_worker_shutdown_puts_the_running_job_back,
)

from service.jobs import JobStore
from service.queue import JobQueue
from service.settings import Settings

START_TIMEOUT = 30.0


def _wait_for(check, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout} s (last error: {last!r})")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[tuple[str, int]]:
    """A throwaway redis-server on a free loopback port, without persistence: (host, port)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the redis extra: pip install -e '.[redis]'")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bitplan-redis-")
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        _wait_for(lambda: proc.poll() is None and client.ping(), "redis-server")
        yield "127.0.0.1", port
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server programs off PATH, per major version: the newest (by number:
    # "9" sorts after "15" as text)
    found_all = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    newest = max(found_all, default=None,
                 key=lambda p: [int(x) for x in Path(p).parts[4].split(".") if x.isdigit()])
    return newest


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[tuple[str, int]]:
    """A throwaway PostgreSQL cluster (trust authentication, user ``bitplan``) on a free loopback
    port: (host, port). As root it runs as the ``postgres`` system user, as PostgreSQL
    requires."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's server programs are not installed (Debian/Ubuntu: apt-get "
                    "install postgresql)")
    psycopg = pytest.importorskip("psycopg",
                                  reason="the postgres extra: pip install -e '.[postgres]'")
    as_user: list[str] = []
    workdir = tempfile.mkdtemp(prefix="bitplan-pg-")
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = None
        if runuser is None or pw is None:
            shutil.rmtree(workdir, ignore_errors=True)
            pytest.skip("running as root needs the 'postgres' system user and runuser")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    data = os.path.join(workdir, "data")
    port = free_port()
    run = lambda *cmd: subprocess.run(  # noqa: E731
        [*as_user, *cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run(initdb, "-D", data, "-U", "bitplan", "--auth=trust", "-E", "UTF8")
        run(pg_ctl, "-D", data, "-l", os.path.join(workdir, "log"), "-w", "-o",
            f"-p {port} -h 127.0.0.1 -k {workdir} -c fsync=off", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode()}") from None
    try:
        _wait_for(lambda: psycopg.connect(host="127.0.0.1", port=port, user="bitplan",
                                          dbname="postgres").close() is None, "PostgreSQL")
        yield "127.0.0.1", port
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def backend_urls(postgres_server, redis_server) -> Iterator[dict[str, str]]:
    """A fresh database and an empty Redis for each test: {database_url, redis_url}."""
    import psycopg
    import redis

    host, port = postgres_server
    name = f"bitplan_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=host, port=port, user="bitplan", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    r_host, r_port = redis_server
    client = redis.Redis(host=r_host, port=r_port)
    client.flushall()
    client.close()
    yield {
        "database_url": f"postgresql+psycopg://bitplan@{host}:{port}/{name}",
        "redis_url": f"redis://{r_host}:{r_port}/0",
    }
    try:  # (the whole cluster goes at the end of the module anyway)
        with psycopg.connect(host=host, port=port, user="bitplan", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # PostgreSQL 13+
    except psycopg.Error:
        pass


@pytest.fixture
def settings(tmp_path: Path, backend_urls: dict[str, str]) -> Settings:
    """test_queue's settings, on PostgreSQL and Redis."""
    return fast_settings(tmp_path / "data", **backend_urls)


def test_the_backends_are_the_real_ones(settings: Settings, store: JobStore) -> None:
    """No SQLite file stands in: the store speaks PostgreSQL, the queue Redis."""
    assert store.engine.dialect.name == "postgresql"
    q = JobQueue(settings, store)
    assert type(q.huey).__name__ == "RedisHuey"
    q.enqueue("some-job")
    assert q.pending_ids() == {"some-job"}
    assert not list(settings.data_dir.glob("*.db"))


def test_each_job_is_claimed_once_by_concurrent_workers(settings: Settings, store: JobStore,
                                                         tmp_path: Path) -> None:
    """Four workers, each with its own connection pool, race to claim the same 30 jobs: the
    conditional UPDATE lets exactly one of them have each."""
    ids = [_job(store, tmp_path) for _ in range(30)]
    won: list[list[str]] = []
    start = threading.Barrier(4)

    def worker() -> None:
        own = JobStore(settings.resolved_database_url)
        try:
            start.wait()
            won.append([job_id for job_id in ids if own.claim(job_id) is not None])
        finally:
            own.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [job_id for part in won for job_id in part]
    assert len(won) == 4 and sorted(claimed) == sorted(ids)
    assert all(store.get(job_id).attempts == 1 for job_id in ids)


def test_api_and_worker_processes_over_postgres_and_redis(
        start_server, backend_urls, mlp_pt2, calib_path, tmp_path) -> None:
    env = {f"BITPLAN_{k.upper()}": v for k, v in backend_urls.items()}
    api = start_server("--no-worker", **env)
    job_id = api.submit(mlp_pt2, calib_path, {"hessian": FAST_HESSIAN,
                                              "limits": {"size_ratio": 0.7},
                                              "pin": {"first": None}})
    assert api.client.get(f"/jobs/{job_id}").json()["status"] == "queued"
    job = run_worker_until_done(api, job_id, tmp_path / "data", tmp_path / "worker.log", **env)
    assert job["status"] == "succeeded", job.get("error")
    plan = api.client.get(f"/jobs/{job_id}/plan").json()
    assert plan["status"] == "optimal" and 4 in {row["w_bits"] for row in plan["layers"]}
    pg_store = JobStore(backend_urls["database_url"])  # what the API answered is in PostgreSQL
    try:
        recorded = pg_store.get(job_id)
        assert recorded.status == "succeeded" and recorded.attempts == 1
    finally:
        pg_store.close()
    assert not list((tmp_path / "data").glob("*.db"))  # no SQLite store or queue on the side
