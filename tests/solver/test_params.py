"""The search's tuning constants: one frozen object, each field with its one-line reason in
solver/params.py and its measurement in docs/solver.md."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from solver.params import PARAMS, SearchParams

ROOT = Path(__file__).resolve().parents[2]


def test_params_are_frozen_and_replaced_by_copy() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PARAMS.beam_width = 1  # type: ignore[misc]
    changed = dataclasses.replace(PARAMS, beam_width=1)
    assert changed.beam_width == 1 and PARAMS.beam_width == SearchParams().beam_width


def test_every_param_has_a_reason_and_a_documented_value() -> None:
    source = (ROOT / "solver" / "params.py").read_text()
    doc = (ROOT / "docs" / "solver.md").read_text()
    for f in dataclasses.fields(SearchParams):
        # the line before the field is its one-line reason (a comment)
        assert re.search(rf"\n    # [^\n]+\n    {f.name}: ", source), f.name
        assert f"`{f.name}`" in doc, f"{f.name} is not in docs/solver.md"
