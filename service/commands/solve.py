"""``bitplan solve problem.json [--pareto RESOURCE:N] [--solver cbc|highs] --out sol.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "solve", help="solve a bit-allocation problem (JSON) with the ILP",
        description="Read a solver problem (version 1 JSON: layers with options, limits, ties), "
        "choose one option per layer minimising total Omega under every limit, and write the "
        "solution JSON. With --pareto, also sweep one resource's budget.",
    )
    p.add_argument("problem", type=Path, help="problem JSON (version 1)")
    p.add_argument("--out", type=Path, required=True, help="solution JSON path")
    p.add_argument("--pareto", default=None, metavar="RESOURCE:N",
                   help="also sweep N budgets of RESOURCE (size_bytes, bops or latency_ms), "
                   "e.g. size_bytes:20; the sweep is stored under 'pareto' in the output")
    p.add_argument("--solver", choices=("cbc", "highs"), default="cbc",
                   help="MILP solver (cbc is bundled with PuLP; highs needs highspy)")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                   help="seconds per solver call (default 60)")
    p.set_defaults(func=run)


def _parse_pareto(text: str) -> tuple[str, int]:
    from solver.errors import BadProblemError

    resource, _, n = text.partition(":")
    try:
        points = int(n)
    except ValueError:
        raise BadProblemError(
            f"--pareto expects RESOURCE:N such as size_bytes:20, got {text!r}"
        ) from None
    return resource, points


def run(args: argparse.Namespace) -> int:
    from solver import Problem, SolveConfig, pareto, solve
    from solver.errors import BadProblemError

    try:
        text = args.problem.read_text()
    except OSError as exc:
        raise BadProblemError(f"cannot read problem file {str(args.problem)!r}: {exc}") from None
    problem = Problem.from_json(text)
    cfg = SolveConfig(solver=args.solver, time_limit_s=args.time_limit)
    sweep = None
    if args.pareto:
        resource, points = _parse_pareto(args.pareto)
        sweep = pareto(problem, resource, points, cfg)
    sol = solve(problem, cfg)
    out = sol.to_dict()
    if sweep is not None:
        out["pareto"] = {"resource": resource, "points": [p.to_dict() for p in sweep]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"status: {sol.status}  objective: {sol.objective}  "
          f"({sol.solver['name']}, {sol.solver['seconds'] * 1e3:.1f} ms, "
          f"{sol.solver['variables']} variables)")
    for r, lim in sol.limits.items():
        total = sol.totals[r]
        if lim is not None or total is not None:
            mark = " (binding)" if r in sol.binding else ""
            print(f"  {r:<11} total {total if total is not None else '-'}  "
                  f"limit {lim if lim is not None else '-'}{mark}")
    if sol.choices:
        tags: dict[str, int] = {}
        for la in problem.layers:
            t = la.options[sol.choices[la.name]].tag
            tags[t] = tags.get(t, 0) + 1
        print("  precisions: " + ", ".join(f"{t} x{n}" for t, n in sorted(tags.items())))
    if sol.diagnosis:
        print(f"  infeasible: {sol.diagnosis['message']}")
    if sweep is not None:
        print(f"  pareto {resource}: {len(sweep)} points")
        for pt in sweep:
            obj = "-" if pt.objective is None else f"{pt.objective:.6g}"
            print(f"    budget {pt.budget:.6g}  {pt.status:<10} objective {obj}")
    print(f"wrote {args.out}")
    return 0
