"""HiGHS stays quiet: its one-off banner never reaches stdout (solver.highs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("highspy")

# Two limits, so the presolve's LP goes to highspy; then the MILP itself through PuLP's HiGHS.
SCRIPT = textwrap.dedent("""
    from solver import Problem, SolveConfig, solve

    layers = [{"name": f"l{i}", "options": [
        {"w_bits": b, "a_bits": 8, "omega": (i + 1) * 4.0 ** -b, "size_bytes": 10 * b,
         "bops": 7 * b + i, "latency_ms": 0.1 * b, "tag": f"w{b}a8"} for b in (2, 4, 8)]}
        for i in range(6)]
    problem = Problem.from_dict({"version": 1, "layers": layers, "ties": [],
                                 "limits": {"size_bytes": 300, "bops": 250, "latency_ms": None}})
    a = solve(problem)
    b = solve(problem, SolveConfig(solver="highs", presolve=False, fix=False))
    assert a.status == b.status == "optimal" and a.objective == b.objective, (a, b)
    assert b.solver["closed_by"] == "highs", b.solver
    print("done")
""")


def test_no_banner_on_stdout() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout == "done\n"
