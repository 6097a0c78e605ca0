"""The solver package must never load torch (it runs where torch is not installed)."""

from __future__ import annotations

import subprocess
import sys


def test_solver_does_not_import_torch() -> None:
    code = ("import solver, solver.options, solver.plan, solver.pareto, solver.hardware, "
            "solver.ilp, solver.problem, solver.errors, sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
