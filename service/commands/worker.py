"""``bitplan worker``: run queued jobs (no API). Scale out by starting more of these against the
same BITPLAN_REDIS_URL and BITPLAN_DATABASE_URL (and shared BITPLAN_DATA_DIR storage).
``bitplan serve`` starts one as its child process (``--nice``, ``--parent-pid``)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run jobs from the queue (no API)",
        description="Take jobs from the queue (SqliteHuey under BITPLAN_DATA_DIR, or Redis with "
        "BITPLAN_REDIS_URL) and run them, BITPLAN_MAX_CONCURRENT_JOBS at a time.",
    )
    p.add_argument("--data-dir", help="override BITPLAN_DATA_DIR")
    p.add_argument("--jobs", type=int, help="override BITPLAN_MAX_CONCURRENT_JOBS")
    p.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by N")
    p.add_argument("--parent-pid", type=int,
                   help="exit when process PID ends (`bitplan serve` starts its worker so)")
    p.set_defaults(func=run)


def _die_with(parent: int) -> None:
    """End this process with ``parent``: on Linux the kernel SIGKILLs it when the parent dies
    (as the worker thread of a crashed API would die); elsewhere, and if the parent is already
    gone, a watcher sends SIGTERM (a clean stop)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="bitplan-parent-watch", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    from ..jobs import JobStore
    from ..queue import JobQueue, Worker
    from ..settings import Settings

    if args.parent_pid is not None:
        _die_with(args.parent_pid)
    if args.nice:
        os.nice(args.nice)
    logging.getLogger("service").setLevel(logging.INFO)
    overrides = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.jobs is not None:
        overrides["max_concurrent_jobs"] = args.jobs
    settings = Settings(**overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.resolved_database_url)
    queue = JobQueue(settings, store)
    print(
        f"bitplan: worker with {settings.max_concurrent_jobs} thread(s) on "
        f"{'Redis' if settings.redis_url else settings.queue_path}"
        f"{f', nice {os.nice(0)}' if args.nice else ''}",
        flush=True,
    )
    try:
        Worker(queue).run()
    finally:
        store.close()
    return 0
