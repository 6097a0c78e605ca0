"""Schemathesis against the app's own OpenAPI document: the real app (``create_app``) over a real
SQLite job store in a temporary directory. Every generated request (valid and invalid, a fixed
number per operation) gets a response that is not a 5xx, whose status is documented for its
route and whose body matches the documented schema. Then each operation is called on jobs in
every state (queued, running, succeeded, failed, infeasible) so that the statuses random ids
never reach (200 with a file, 409) are checked against the document too."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from svc_helpers import fast_settings

from service.app import create_app
from service.core import BitplanService
from service.jobs import JobStore

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 15  # per operation and mode (valid, invalid): well under 60 s in all

# job name -> (final status or None for queued/running, artifacts written)
SEEDED = {
    "queued": ("queued", ()),
    "running": ("running", ()),
    "succeeded": ("succeeded", ("plan.json", "report.json", "model.safetensors",
                                "sensitivity.json")),
    "failed": ("failed", ()),
    "infeasible": ("failed", ("plan.json",)),
    "cancelled": ("cancelled", ()),
}


def _seed_jobs(svc: BitplanService) -> dict[str, str]:
    """One job in each state, with the artifacts a job in that state has. name -> id."""
    store: JobStore = svc.store
    ids = {}
    for i, (name, (status, files)) in enumerate(SEEDED.items()):
        job_id = f"{i:02d}" + "ab" * 15
        out = svc.settings.jobs_dir / job_id / "out"
        out.mkdir(parents=True)
        for f in files:
            (out / f).write_bytes(b"{}\n" if f.endswith(".json") else b"\0" * 16)
        store.create(job_id, {"limits": {"size_ratio": 0.5}}, "m.pt2", "c.safetensors", str(out))
        if status != "queued":
            store.claim(job_id)
        if status == "succeeded":
            store.mark_succeeded(job_id, {"status": "optimal"})
        elif status == "failed":
            code = "infeasible" if name == "infeasible" else "bad_model"
            store.mark_failed(job_id, code, "seeded failure", {"why": name})
        elif status == "cancelled":
            store.mark_cancelled(job_id)
        ids[name] = job_id
    return ids


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    svc = BitplanService.from_settings(fast_settings(tmp_path_factory.mktemp("fuzz") / "data"))
    ids = _seed_jobs(svc)
    yield create_app(service=svc), ids
    svc.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app[0])


def _operations(api_schema) -> list:
    return sorted((r.ok() for r in api_schema.get_all_operations()),
                  key=lambda op: (op.path, op.method))


def test_the_document_has_the_core_operations(api_schema) -> None:
    ops = {(op.method.upper(), op.path) for op in _operations(api_schema)}
    assert {("POST", "/plan"), ("GET", "/jobs"), ("GET", "/jobs/{job_id}"),
            ("DELETE", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/checkpoint"),
            ("GET", "/healthz")} <= ops


# Every operation the document lists, read from it (a new route is fuzzed without an edit here).
# schemathesis' own pytest integration (schema.parametrize / from_fixture) breaks on pytest 9:
# hypothesis drives its strategies directly.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_documented_non_5xx_responses(api_schema, mode) -> None:
    failures = []
    for operation in _operations(api_schema):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same requests on every run and machine
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE, operation
        except Exception as exc:  # noqa: BLE001 - collected, reported together below
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_every_operation_on_jobs_in_every_state_is_documented(api_schema, fuzz_app) -> None:
    """Existing jobs reach the statuses random ids cannot: 200 with a file, 409 (not ready /
    finished), 404 (no such artifact). Each response is validated against the document."""
    _, ids = fuzz_app
    seen: dict[str, set[int]] = {}
    for path in ("/jobs/{job_id}", "/jobs/{job_id}/plan", "/jobs/{job_id}/report",
                 "/jobs/{job_id}/sensitivity", "/jobs/{job_id}/checkpoint"):
        for job_id in ids.values():
            case = api_schema[path]["GET"].Case(path_parameters={"job_id": job_id})
            response = case.call()
            case.validate_response(response, checks=CHECKS)
            seen.setdefault(path, set()).add(response.status_code)
    # the artifacts of a finished job, 409 while it runs, 404 when it never made one
    assert seen["/jobs/{job_id}/checkpoint"] == {200, 404, 409}
    assert seen["/jobs/{job_id}/plan"] == {200, 404, 409}
    statuses = set()
    for name in ("queued", "succeeded"):  # DELETE: 200 for an active job, 409 for a finished one
        case = api_schema["/jobs/{job_id}"]["DELETE"].Case(path_parameters={"job_id": ids[name]})
        response = case.call()
        case.validate_response(response, checks=CHECKS)
        statuses.add(response.status_code)
    assert statuses == {200, 409}
    listing = api_schema["/jobs"]["GET"].Case(query={"status": "failed"})
    response = listing.call()
    listing.validate_response(response, checks=CHECKS)
    assert {j["error"]["code"] for j in json.loads(response.content)["items"]} == {
        "bad_model", "infeasible"}
    # found by the fuzzer: an offset past SQLite's 64-bit integers was a 500
    far = api_schema["/jobs"]["GET"].Case(query={"offset": 2**63, "limit": 1})
    response = far.call()
    far.validate_response(response, checks=CHECKS)
    assert response.status_code == 422


def test_the_document_lists_the_statuses_each_route_returns(fuzz_app) -> None:
    """What the checks above rely on: the error statuses are in the document, with the error
    body's schema (a route missing one would make status_code_conformance fail)."""
    doc = fuzz_app[0].openapi()
    plan = doc["paths"]["/plan"]["post"]["responses"]
    assert {"202", "400", "413", "422"} <= set(plan)
    for path in ("/jobs/{job_id}", "/jobs/{job_id}/plan", "/jobs/{job_id}/checkpoint"):
        assert {"200", "404", "409", "422"} <= set(doc["paths"][path]["get"]["responses"]), path
    assert {"200", "503"} <= set(doc["paths"]["/healthz"]["get"]["responses"])


def test_health_unavailable_is_documented(api_schema, fuzz_app, monkeypatch) -> None:
    svc = fuzz_app[0].state.service
    monkeypatch.setattr(svc.store, "ping", lambda: False)
    case = api_schema["/healthz"]["GET"].Case()
    response = case.call()
    assert response.status_code == 503  # by design: every check but "not a 5xx"
    case.validate_response(response, checks=CHECKS[1:])
