"""Bit allocation as an integer linear program (numpy; PuLP only when a MILP solver is needed;
never imports torch).

Entry points: :func:`solve` (problem in, :class:`Solution` out), :func:`pareto` (a sweep over
one resource), :func:`build_problem` (layer table + sensitivity -> problem) and
:func:`make_plan` (solution -> plan.json).
"""

from .config import Solution, SolveConfig
from .driver import solve
from .options import ActivationMode, LayerSpec, OptionsConfig, build_problem
from .pareto import ParetoPoint, pareto
from .plan import load_plan, make_plan
from .problem import LayerOptions, Limits, Option, Problem

__all__ = [
    "ActivationMode",
    "LayerOptions",
    "LayerSpec",
    "Limits",
    "Option",
    "OptionsConfig",
    "ParetoPoint",
    "Problem",
    "Solution",
    "SolveConfig",
    "build_problem",
    "load_plan",
    "make_plan",
    "pareto",
    "solve",
]
