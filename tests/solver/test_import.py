"""The solver package must never load torch (it runs where torch is not installed), and
``import solver`` loads no MILP / LP package until a solve needs one (start-up time)."""

from __future__ import annotations

import subprocess
import sys

MODULES = ("solver, solver.options, solver.plan, solver.pareto, solver.hardware, "
           "solver.problem, solver.errors, solver.arrays, solver.bounds, solver.config, "
           "solver.diagnose, solver.driver, solver.groups, solver.heuristics, solver.lagrange, "
           "solver.lp, solver.milp, solver.params, solver.presolve, solver.search, solver.highs")


def test_solver_does_not_import_torch() -> None:
    code = (f"import {MODULES}, sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_import_solver_leaves_the_milp_and_lp_packages_unloaded() -> None:
    """PuLP, scipy and highspy load on first use (a MILP hand-off, an LP with several limits),
    not with the package: a one-limit solve closed in process needs none of them."""
    code = ("import sys, solver\n"
            "from solver import Limits, Option, LayerOptions, Problem, solve\n"
            "opts = [Option(w, 8, omega=10.0 / w, size_bytes=float(w), bops=1.0, "
            "latency_ms=None, tag=f'w{w}') for w in (2, 4, 8)]\n"
            "p = Problem(tuple([LayerOptions(f'l{i}', tuple(opts)) for i in range(4)]), "
            "Limits(size_bytes=17.0))\n"
            "assert solve(p).status == 'optimal'\n"
            "loaded = sorted(m for m in ('pulp', 'scipy', 'highspy') if m in sys.modules)\n"
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
