"""CLI subcommands, one module each, each with ``register(subparsers)``."""


class CommandError(Exception):
    """A command cannot go on for a reason outside bitplan (e.g. ``bitplan demo`` finds no
    service); ``bitplan`` prints it as one line and exits with status 2."""
