"""The ``bitplan`` command line. Each subcommand lives in ``service/commands/<name>.py`` and
exposes ``register(subparsers)``; this module only discovers and dispatches them.

Start-up stays cheap: building the parser imports only ``argparse`` and the command modules,
which import what their ``run`` needs inside it (torch, the solver, FastAPI, pydantic-settings),
so ``bitplan --help`` loads none of those and each command loads only its own."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import warnings

from . import commands
from .commands import CommandError


def _device(text: str) -> str:
    from .settings import check_device

    try:
        return check_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``: auto (CUDA when present), cpu, cuda or cuda:N, checked while parsing;
    turn it into a torch.device with ``service.settings.resolve_device``."""
    parser.add_argument(
        "--device", type=_device, default=default,
        help=f"auto (CUDA when present), cpu, cuda or cuda:N (default {default})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitplan", description="Mixed-precision search for PyTorch models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch.export.load trips a deprecation inside torch itself on every load; it is noise
    # on a user's terminal, not something they can act on.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"bitplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitplan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A typed error can only come from a command that imported solver.errors; looking it
        # up here keeps the solver out of commands that never use it.
        errors = sys.modules.get("solver.errors")
        if errors is None or not isinstance(exc, errors.BitplanError):
            raise
        print(f"bitplan: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
