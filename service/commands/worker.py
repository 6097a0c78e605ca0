"""``bitplan worker``: run queued jobs (no API). Scale out by starting more of these against the
same BITPLAN_REDIS_URL and BITPLAN_DATABASE_URL (and shared BITPLAN_DATA_DIR storage)."""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run jobs from the queue (no API)",
        description="Take jobs from the queue (SqliteHuey under BITPLAN_DATA_DIR, or Redis with "
        "BITPLAN_REDIS_URL) and run them, BITPLAN_MAX_CONCURRENT_JOBS at a time.",
    )
    p.add_argument("--data-dir", help="override BITPLAN_DATA_DIR")
    p.add_argument("--jobs", type=int, help="override BITPLAN_MAX_CONCURRENT_JOBS")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs import JobStore
    from ..queue import JobQueue, Worker
    from ..settings import Settings

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
        f"{'Redis' if settings.redis_url else settings.queue_path}",
        flush=True,
    )
    try:
        Worker(queue).run()
    finally:
        store.close()
    return 0
