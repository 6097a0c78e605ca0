"""Problem JSON: round-trip, HAWQ files load as given, validation messages."""

from __future__ import annotations

import json

import pytest
from bitplan_solver_cases import problems
from hypothesis import given, settings
from test_hawq import DATA

from solver import Problem
from solver.errors import BadProblemError


@settings(max_examples=30, deadline=None)
@given(problems())
def test_json_round_trip(problem: Problem) -> None:
    assert Problem.from_json(problem.to_json()) == problem


def test_hawq_file_loads_as_given() -> None:
    text = (DATA / "resnet50_modelsize_0.25.json").read_text()
    p = Problem.from_json(text)
    assert len(p.layers) == 52 and len(p.ties) == 4
    assert {o.tag for o in p.layers[0].options} == {"w4a4", "w8a8"}
    assert p.source.startswith("Zhen-Dong/HAWQ")
    assert json.loads(p.to_json()) == json.loads(text)


def _base() -> dict:
    opt = {"w_bits": 4, "a_bits": 8, "omega": 1.0, "size_bytes": 10, "bops": 5,
           "latency_ms": 0.1, "tag": "w4a8"}
    return {"version": 1,
            "layers": [{"name": "a", "options": [dict(opt)]},
                       {"name": "b", "options": [dict(opt)]}],
            "limits": {"size_bytes": 100, "bops": None, "latency_ms": None},
            "ties": []}


def _mut(fn):
    obj = _base()
    fn(obj)
    return json.dumps(obj)


@pytest.mark.parametrize("mutate, match", [
    (lambda o: o.update(version=2), "version"),
    (lambda o: o.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda o: o["layers"][0]["options"][0].update(colour=1), "unknown keys"),
    (lambda o: o["layers"][1].update(name="a"), "duplicate layer name 'a'"),
    (lambda o: o["layers"][0].update(options=[]), "'a' has no options"),
    (lambda o: o.update(ties=[["a", "zzz"]]), "unknown layer 'zzz'"),
    (lambda o: o["layers"][0]["options"][0].update(size_bytes=-1), "size_bytes must be >= 0"),
    (lambda o: o["layers"][0]["options"][0].update(omega=float("nan")), "omega must be finite"),
    (lambda o: o["layers"][0]["options"][0].update(bops="x"), "bops must be a number"),
    (lambda o: o["limits"].update(bops=float("inf")), "limit bops must be finite"),
    (lambda o: o["layers"][0]["options"].append(dict(o["layers"][0]["options"][0])),
     "duplicate option tags"),
    (lambda o: (o["layers"][1]["options"][0].update(tag="w8a8"), o.update(ties=[["a", "b"]])),
     "offer different option tags"),
    (lambda o: (o["layers"][0]["options"][0].update(latency_ms=None),
                o["limits"].update(latency_ms=1.0)), "has no latency_ms"),
    (lambda o: o["layers"][0]["options"][0].pop("omega"), r"missing keys \['omega'\]"),
])
def test_validation_messages(mutate, match) -> None:
    with pytest.raises(BadProblemError, match=match):
        Problem.from_json(_mut(mutate))


def test_not_json() -> None:
    with pytest.raises(BadProblemError, match="not valid JSON"):
        Problem.from_json("{nope")
