"""``bitplan serve``: the API plus its worker (the default set-up, ``make serve``).

The worker is a child process (``bitplan worker``) at a lower CPU priority
(``BITPLAN_WORKER_NICE``): a job's Python code then never holds the API's interpreter lock, and
the kernel gives the CPU to the requests first, so polls and uploads stay quick while jobs run.
It dies with the API (SIGKILL included: its jobs are then retried by the next worker's reaper,
as after any crash) and is stopped with SIGTERM when the API stops (its running jobs go back to
the queue).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

WORKER_STOP_S = 30.0  # the worker's own stop waits up to 10 s for its jobs to yield
RESTART_DELAY_S = 2.0  # a worker that cannot start at all is not restarted in a tight loop


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the REST API (and a worker, unless --no-worker)",
        description="Start the REST API on BITPLAN_HOST:BITPLAN_PORT and a worker in a child "
        "process at lower CPU priority. All settings come from BITPLAN_* environment variables; "
        "the flags override them.",
    )
    p.add_argument("--host", help="override BITPLAN_HOST")
    p.add_argument("--port", type=int, help="override BITPLAN_PORT")
    p.add_argument("--data-dir", help="override BITPLAN_DATA_DIR")
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="API only (run `bitplan worker` elsewhere, e.g. with BITPLAN_REDIS_URL)",
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    from ..settings import Settings

    overrides = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir))
        if v is not None
    }
    if getattr(args, "no_worker", False):
        overrides["embedded_worker"] = False
    return Settings(**overrides)


class WorkerProcess:
    """``bitplan worker`` on the same settings (the environment, and the data directory given
    here), niced by ``BITPLAN_WORKER_NICE``, tied to this process's life; started again if it
    dies while the API runs (e.g. killed for memory: the reaper of the new one retries its
    jobs)."""

    def __init__(self, settings: Settings) -> None:
        self.cmd = [sys.executable, "-m", "service.cli", "worker",
                    "--data-dir", str(settings.data_dir.resolve()),
                    "--nice", str(settings.worker_nice), "--parent-pid", str(os.getpid())]
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # stop() never misses a worker started meanwhile
        self.proc = subprocess.Popen(self.cmd)
        self._watch = threading.Thread(target=self._restart, name="bitplan-worker-watch",
                                       daemon=True)
        self._watch.start()

    def _restart(self) -> None:
        while True:
            code = self.proc.wait()
            if self._stopping.wait(RESTART_DELAY_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                log.warning("worker process %d ended (exit %s); starting another",
                            self.proc.pid, code)
                self.proc = subprocess.Popen(self.cmd)

    def stop(self) -> None:
        """SIGTERM (running jobs go back to the queue), then SIGKILL after WORKER_STOP_S."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WORKER_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %g s; killed", proc.pid, WORKER_STOP_S)
                proc.kill()
                proc.wait(10)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..app import create_app
    from ..core import BitplanService

    logging.getLogger("service").setLevel(logging.INFO)
    settings = settings_from_args(args)
    svc = BitplanService.from_settings(settings)  # the job store answers before a worker starts
    worker = WorkerProcess(settings) if settings.embedded_worker else None
    print(
        f"bitplan: serving on http://{settings.host}:{settings.port} "
        f"(data in {settings.data_dir.resolve()}, "
        f"{f'worker process {worker.proc.pid}' if worker else 'no worker'})",
        flush=True,
    )
    try:
        uvicorn.run(
            create_app(settings, svc), host=settings.host, port=settings.port, log_level="warning"
        )
    finally:
        if worker is not None:
            worker.stop()
        svc.close()
    return 0
