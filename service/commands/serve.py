"""``bitplan serve``: the API plus an embedded worker (the default set-up, ``make serve``)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the REST API (and a worker, unless --no-worker)",
        description="Start the REST API on BITPLAN_HOST:BITPLAN_PORT with an embedded worker. "
        "All settings come from BITPLAN_* environment variables; the flags override them.",
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..app import create_app
    from ..core import BitplanService
    from ..queue import Worker

    logging.getLogger("service").setLevel(logging.INFO)
    settings = settings_from_args(args)
    svc = BitplanService.from_settings(settings)
    worker = Worker(svc.queue) if settings.embedded_worker else None
    if worker is not None:
        worker.start()  # before uvicorn, whose signal handlers then take over
    print(
        f"bitplan: serving on http://{settings.host}:{settings.port} "
        f"(data in {settings.data_dir.resolve()}, "
        f"{'embedded worker' if worker else 'no worker'})",
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
