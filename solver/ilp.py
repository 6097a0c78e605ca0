"""Former home of the solve entry point, kept as re-exports while solver.plan imports from it:
the configuration and result types live in solver.config, :func:`solve` in solver.driver."""

from .config import STATUSES, VERSION, Solution, SolveConfig
from .driver import solve
from .problem import RESOURCES, within

__all__ = ["RESOURCES", "STATUSES", "VERSION", "Solution", "SolveConfig", "solve", "within"]
