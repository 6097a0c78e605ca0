"""The DRQ acceptance check of a job: when the chosen plan has DRQ rows, the same problem is
solved again with the DRQ options removed, both plans are quantized and scored on the
calibration (train) samples with the job's loss (``quantize.drqcheck``), and the DRQ plan is
kept only when it measures better by more than the margin. The report records both losses and
the decision (``drq_check``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from solver import SolveConfig, solve
from solver.config import Solution
from solver.problem import LayerOptions, Problem


def without_drq(problem: Problem) -> tuple[Problem, list[list[int]]] | None:
    """``problem`` with every DRQ option removed, and per layer the indices of the kept
    options in ``problem``; None when some layer has only DRQ options."""
    layers, index = [], []
    for la in problem.layers:
        keep = [i for i, o in enumerate(la.options) if o.drq is None]
        if not keep:
            return None
        layers.append(LayerOptions(la.name, tuple(la.options[i] for i in keep)))
        index.append(keep)
    return Problem(tuple(layers), problem.limits, problem.ties, problem.source), index


def solve_without_drq(problem: Problem, cfg: SolveConfig | None = None) -> Solution | None:
    """The best solution of ``problem`` that uses no DRQ option, its choices indexing
    ``problem``'s options (so it plans, plots and re-plans like the full solution); None when
    no such assignment meets the limits."""
    off = without_drq(problem)
    if off is None:
        return None
    sub, index = off
    sol = solve(sub, cfg or SolveConfig())
    if not sol.choices:
        return None
    pos = {la.name: i for i, la in enumerate(problem.layers)}
    choices = {name: index[pos[name]][k] for name, k in sol.choices.items()}
    return dataclasses.replace(sol, choices=choices)


def check_drq(intake: Any, problem: Problem, solution: Solution,
              make: Callable[[Solution], dict[str, Any]], device: torch.device,
              chunk: int | None = None, activations: Any = None,
              cfg: Any = None) -> tuple[Solution, dict[str, Any], dict[str, Any]]:
    """(solution, plan, record) to keep for a solution whose plan (``make(solution)``) has DRQ
    rows: the DRQ one or the best one without DRQ options, by the calibration loss of both
    (``quantize.drqcheck.compare`` on ``intake.train``, never the held-out samples)."""
    from quantize.drqcheck import CheckConfig, compare

    cfg = cfg or (CheckConfig() if chunk is None else CheckConfig(batch_size=chunk))
    plan = make(solution)
    t0 = time.perf_counter()
    off = solve_without_drq(problem)
    solve_s = time.perf_counter() - t0
    record: dict[str, Any] = {"drq_rows": sum(1 for r in plan["layers"] if r.get("drq")),
                              "objective_drq": solution.objective, "solve_seconds": solve_s}
    if off is None:
        record.update(kept="drq", reason="no plan without DRQ options meets the limits")
        return solution, plan, record
    off_plan = make(off)
    result = compare(intake.program, {"drq": plan, "off": off_plan}, intake.train,
                     intake.loss_kind, cfg, batch_size=intake.batch_size, device=device,
                     activations=activations)
    record.update(result.to_dict(), objective_off=off.objective)
    if result.kept == "drq":
        return solution, plan, record
    return off, off_plan, record
