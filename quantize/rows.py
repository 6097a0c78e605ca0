"""The plan's layer rows as the quantize stage reads them.

The plan is ``solver.plan.Plan`` (validated by its one validator, ``Plan.from_dict``);
``parse_rows`` returns its rows, and ``match_rows`` checks them against the model's quantizable
layers (names, kinds, sizes, weight groups). Both raise BadPlanError with a message saying what
is wrong. Layers of the model without a row stay in floating point.
"""

from __future__ import annotations

import math
from typing import Any

from solver.errors import BadPlanError
from solver.options import group_fits
from solver.plan import DRQEntry, Plan, PlanRow, parse_plan

from .graph import GraphLayer


def parse_rows(plan: Plan | Any) -> list[PlanRow]:
    """The plan's layer rows (a :class:`Plan`, or its dict form, validated). Raises
    BadPlanError."""
    return list(parse_plan(plan).rows)


def match_rows(rows: list[PlanRow], layers: list[GraphLayer]) -> dict[str, PlanRow]:
    """Rows keyed by name in the model's layer order; checks names, kinds and sizes."""
    by_name = {layer.name: layer for layer in layers}
    for row in rows:
        layer = by_name.get(row.name)
        if layer is None:
            known = ", ".join(by_name) or "none"
            raise BadPlanError(
                f"plan layer {row.name!r} is not a quantizable layer of this model "
                f"(its layers: {known}); was the plan made for another model?"
            )
        if layer.kind != row.kind:
            raise BadPlanError(
                f"plan layer {row.name!r} is a {row.kind} in the plan but a {layer.kind} in the "
                "model; was the plan made for another model?"
            )
        numel = math.prod(layer.weight_shape)
        if row.params != numel:
            raise BadPlanError(
                f"plan layer {row.name!r} has {row.params} parameters in the plan but "
                f"{numel} in the model; was the plan made for another model?"
            )
        fan_in = numel // layer.weight_shape[0]
        if row.group_size is not None and not group_fits(fan_in, row.group_size):
            raise BadPlanError(
                f"plan layer {row.name!r}: group_size {row.group_size} does not fit its fan-in "
                f"{fan_in} (a group size must divide it and be smaller)"
            )
    wanted = {row.name: row for row in rows}
    return {layer.name: wanted[layer.name] for layer in layers if layer.name in wanted}


__all__ = ["DRQEntry", "PlanRow", "match_rows", "parse_rows"]
