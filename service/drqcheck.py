"""The DRQ acceptance check of a job. The ILP's Omega is a second-order proxy, and a DRQ option
adds one more estimate, so the measured loss decides between the ILP's two candidates: the
best plan with DRQ rows and the best plan without DRQ options. When the chosen plan has DRQ
rows, the other is the same problem solved with the DRQ options removed; when it has none
(but DRQ options were offered), the other is the best plan that runs at least one layer in DRQ.
Both are quantized and scored on the calibration (train) samples with the job's loss
(``quantize.drqcheck``); the DRQ plan is kept only when it measures better by more than the
margin. The report records both losses and the decision (``drq_check``)."""

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


def solve_with_drq(problem: Problem, cfg: SolveConfig | None = None) -> Solution | None:
    """The best solution of ``problem`` that runs at least one layer in DRQ (the lowest
    objective over one solve per tie group with DRQ options, that group restricted to them),
    its choices indexing ``problem``'s options; None when no such assignment meets the
    limits."""
    best = None
    pos = {la.name: k for k, la in enumerate(problem.layers)}
    for group in problem.tie_groups():
        keep = {n: [i for i, o in enumerate(problem.layers[pos[n]].options) if o.drq is not None]
                for n in group}
        if not all(keep.values()):
            continue
        layers = list(problem.layers)
        for n in group:
            la = problem.layers[pos[n]]
            layers[pos[n]] = LayerOptions(n, tuple(la.options[i] for i in keep[n]))
        sol = solve(Problem(tuple(layers), problem.limits, problem.ties, problem.source),
                    cfg or SolveConfig())
        if not sol.choices or (best is not None and sol.objective >= best.objective):
            continue
        choices = {**sol.choices, **{n: keep[n][sol.choices[n]] for n in group}}
        best = dataclasses.replace(sol, choices=choices)
    return best


def offers_drq(problem: Problem) -> bool:
    return any(o.drq is not None for la in problem.layers for o in la.options)


def check_drq(intake: Any, problem: Problem, solution: Solution,
              make: Callable[[Solution], dict[str, Any]], device: torch.device,
              chunk: int | None = None, activations: Any = None,
              cfg: Any = None, clip: Any = None) -> tuple[Solution, dict[str, Any], dict[str, Any]]:
    """(solution, plan, record) to keep, for a problem that offers DRQ options: the best plan
    with DRQ rows or the best without DRQ options (one of them is ``solution``, the ILP's
    optimum; ``make`` turns a solution into its plan), by the calibration loss of both
    (``quantize.drqcheck.compare`` on ``intake.train``, never the held-out samples)."""
    from quantize.drqcheck import CheckConfig, compare

    cfg = cfg or (CheckConfig() if chunk is None else CheckConfig(batch_size=chunk))
    plan = make(solution)
    chosen = "drq" if any(r.get("drq") for r in plan["layers"]) else "off"
    t0 = time.perf_counter()
    other = solve_without_drq(problem) if chosen == "drq" else solve_with_drq(problem)
    sols = {chosen: solution, ("off" if chosen == "drq" else "drq"): other}
    record: dict[str, Any] = {"chosen_by_ilp": chosen, "solve_seconds": time.perf_counter() - t0}
    if other is None:
        record.update(kept=chosen, reason="no plan " + ("without DRQ options" if chosen == "drq"
                                                       else "with a DRQ row")
                      + " meets the limits")
        return solution, plan, record
    plans = {k: plan if k == chosen else make(s) for k, s in sols.items()}
    record.update(drq_rows=sum(1 for r in plans["drq"]["layers"] if r.get("drq")),
                  objective_drq=sols["drq"].objective, objective_off=sols["off"].objective)
    result = compare(intake.program, plans, intake.train, intake.loss_kind, cfg,
                     batch_size=intake.batch_size, device=device, activations=activations,
                     clip=clip)
    record.update(result.to_dict())
    return sols[result.kept], plans[result.kept], record
