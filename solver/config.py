"""The solver's typed configuration (:class:`SolveConfig`) and result (:class:`Solution`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from .errors import BadProblemError

VERSION = 1
SOLVERS = ("cbc", "highs")
STATUSES = ("optimal", "infeasible", "time_limit")


@dataclass(frozen=True)
class SolveConfig:
    """How to solve. ``solver``: ``"cbc"`` (bundled with PuLP) or ``"highs"`` (needs highspy);
    ``time_limit_s``: wall-clock limit per solve, search and MILP together (None = none);
    ``gap_rel``: relative optimality gap at which the MILP solver may stop (0 = exact);
    ``prune``: drop dominated options before the MILP solver (exact; off because CBC was
    measured faster without, docs/solver.md); ``shortcut``: no search when the minimum-Omega
    choice fits (exact); ``fix``: with the presolve off, Lagrangian reduced-cost fixing with a
    heuristic incumbent (exact, solver.lagrange); ``presolve``: the exact in-process search
    (solver.presolve), which hands the MILP solver only what it does not close within
    ``bnb_nodes`` children evaluated (a budget of work, not time, keeps results deterministic;
    0 = always hand over; the value is measured in docs/solver.md)."""

    solver: str = "cbc"
    time_limit_s: float | None = 60.0
    gap_rel: float = 0.0
    threads: int = 1
    prune: bool = False
    shortcut: bool = True
    fix: bool = True
    presolve: bool = True
    bnb_nodes: int = 8_000_000
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise BadProblemError(f"unknown solver {self.solver!r}; use one of {list(SOLVERS)}")
        if self.time_limit_s is not None and not (
            isinstance(self.time_limit_s, int | float) and self.time_limit_s > 0
        ):
            raise BadProblemError(f"time_limit_s must be > 0 or null, got {self.time_limit_s!r}")
        if not (isinstance(self.gap_rel, int | float) and 0 <= self.gap_rel < 1):
            raise BadProblemError(f"gap_rel must be in [0, 1), got {self.gap_rel!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise BadProblemError(f"threads must be an int >= 1, got {self.threads!r}")
        if isinstance(self.bnb_nodes, bool) or not isinstance(self.bnb_nodes, int) \
                or self.bnb_nodes < 0:
            raise BadProblemError(f"bnb_nodes must be an int >= 0, got {self.bnb_nodes!r}")
        if self.version != VERSION:
            raise BadProblemError(f"SolveConfig version {self.version!r} is not supported")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> SolveConfig:
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise BadProblemError(f"SolveConfig has unknown keys {unknown}")
        return cls(**obj)


@dataclass
class Solution:
    """The answer (``bitplan solve`` output, ``version: 1``). ``choices`` maps each layer to the
    index of its chosen option in the problem; empty when no assignment was found
    (infeasible, or a time limit hit before the first feasible one)."""

    status: str
    objective: float | None
    choices: dict[str, int]
    totals: dict[str, float | None]
    limits: dict[str, float | None]
    binding: list[str]
    solver: dict[str, Any]
    diagnosis: dict[str, Any] | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise BadProblemError(f"solution status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "objective": self.objective,
            "choices": dict(self.choices),
            "totals": dict(self.totals),
            "limits": dict(self.limits),
            "binding": list(self.binding),
            "solver": dict(self.solver),
            "diagnosis": self.diagnosis,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, obj: Any) -> Solution:
        keys = {"version", "status", "objective", "choices", "totals", "limits", "binding",
                "solver", "diagnosis"}
        if not isinstance(obj, dict):
            raise BadProblemError("a solution must be a JSON object")
        # `bitplan solve --pareto` adds its sweep beside the solution; it is not part of it.
        obj = {k: v for k, v in obj.items() if k != "pareto"}
        if set(obj) != keys:
            raise BadProblemError(
                f"solution keys must be {sorted(keys)}; got {sorted(obj)}"
            )
        if obj["version"] != VERSION:
            raise BadProblemError(f"solution version {obj['version']!r} is not supported")
        return cls(
            status=obj["status"],
            objective=obj["objective"],
            choices={str(k): int(v) for k, v in obj["choices"].items()},
            totals=dict(obj["totals"]),
            limits=dict(obj["limits"]),
            binding=list(obj["binding"]),
            solver=dict(obj["solver"]),
            diagnosis=obj["diagnosis"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Solution:
        try:
            obj = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise BadProblemError(f"solution is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)
