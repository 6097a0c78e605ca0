"""The REST layer against bad input: every refusal is a 4xx with a message, never a 500, and
nothing is queued or left on disk. Also ids, cancellation, the API key and listing."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save
from svc_helpers import FAST_HESSIAN, constraints, post_plan

from service.app import create_app
from service.core import BitplanService
from service.errors import HTTP_STATUS
from service.settings import Settings
from solver.errors import BitplanError


@pytest.fixture(scope="module")
def good(mlp_pt2: Path, calib_path: Path) -> tuple[bytes, bytes]:
    return mlp_pt2.read_bytes(), calib_path.read_bytes()


def _st(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def _bad_uploads(model: bytes, calib: bytes) -> dict[str, tuple[bytes, bytes, str, int, str]]:
    """name -> (model bytes, calib bytes, constraints, expected status, expected error code)."""
    x = torch.rand(20, 1, 8, 8)
    ok = constraints(size_mb=1.0)
    pickled = pickle.dumps({"weights": [1, 2, 3]})
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    nan = x.clone()
    nan[3, 0, 2, 2] = float("nan")
    return {
        "garbage model": (b"\x00garbage" * 100, calib, ok, 422, "bad_model"),
        "empty model": (b"", calib, ok, 422, "bad_model"),
        "truncated model": (model[: len(model) // 2], calib, ok, 422, "bad_model"),
        "pickle as model": (pickled, calib, ok, 422, "bad_model"),
        "torch.save zip as model": (buf.getvalue(), calib, ok, 422, "bad_model"),
        "garbage calibration": (model, b"not safetensors at all", ok, 422, "bad_calibration"),
        "pickle as calibration": (model, pickled, ok, 422, "bad_calibration"),
        "truncated calibration": (model, calib[: len(calib) // 2], ok, 422, "bad_calibration"),
        "wrong tensor name": (model, _st({"images": x}), ok, 422, "bad_calibration"),
        "wrong shape": (model, _st({"inputs": torch.rand(20, 1, 5, 5)}), ok, 422,
                        "bad_calibration"),
        "NaN in inputs": (model, _st({"inputs": nan}), ok, 422, "bad_calibration"),
        "labels out of range": (
            model, _st({"inputs": x, "labels": torch.full((20,), 42)}), ok, 422,
            "bad_calibration",
        ),
        "one sample": (model, _st({"inputs": x[:1]}), ok, 422, "bad_calibration"),
        "cross-entropy without labels": (
            model, _st({"inputs": x}),
            json.dumps({"limits": {"size_mb": 1}, "loss": "cross_entropy"}), 422,
            "bad_calibration",
        ),
        "unknown loss": (
            model, calib, json.dumps({"limits": {"size_mb": 1}, "loss": "hinge"}), 422,
            "bad_constraints",
        ),
        "constraints not JSON": (model, calib, "{size_mb: 1", 422, "bad_constraints"),
        "no limit": (model, calib, json.dumps({"limits": {}}), 422, "bad_constraints"),
        "negative limit": (model, calib, constraints(size_mb=-1.0), 422, "bad_constraints"),
        "zero ratio": (model, calib, constraints(size_ratio=0), 422, "bad_constraints"),
        "both size and ratio": (
            model, calib, constraints(size_mb=1.0, size_ratio=0.5), 422, "bad_constraints",
        ),
        "unknown field": (
            model, calib, json.dumps({"limits": {"size_mb": 1}, "colour": "red"}), 422,
            "bad_constraints",
        ),
        "unknown limit": (
            model, calib, json.dumps({"limits": {"size_gb": 1}}), 422, "bad_constraints",
        ),
        "impossible bits": (
            model, calib, json.dumps({"limits": {"size_mb": 1}, "weight_bits": [1, 16]}), 422,
            "bad_constraints",
        ),
        "latency without hardware": (
            model, calib, json.dumps({"limits": {"latency_ms": 1}}), 422, "bad_constraints",
        ),
        "unknown hardware": (
            model, calib, json.dumps({"limits": {"size_mb": 1}, "hardware": "abacus"}), 422,
            "bad_constraints",
        ),
        "wrong version": (
            model, calib, json.dumps({"version": 2, "limits": {"size_mb": 1}}), 422,
            "bad_constraints",
        ),
        "bad hessian": (
            model, calib, json.dumps({"limits": {"size_mb": 1}, "hessian": {"tol": 0}}), 422,
            "bad_constraints",
        ),
    }


CASES = list(_bad_uploads(b"", b"").keys())


@pytest.mark.parametrize("case", CASES)
def test_bad_submission_is_a_4xx_with_a_message(
    case: str, client: TestClient, service: BitplanService, good: tuple[bytes, bytes]
) -> None:
    model, calib, cons, status, code = _bad_uploads(*good)[case]
    r = post_plan(client, model, calib, cons)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert len(err["message"]) > 10
    assert service.queue.pending_ids() == set()
    assert service.store.list()[1] == 0
    assert list(service.settings.jobs_dir.iterdir()) == []  # the upload was removed


def test_malformed_requests(client: TestClient, good: tuple[bytes, bytes]) -> None:
    model, calib = good
    r = client.post("/plan", json={"model": "x"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    r = client.post("/plan", files={"model": ("m.pt2", model)}, data={"constraints": "{}"})
    assert r.status_code == 400 and "calibration" in r.json()["error"]["message"]
    r = client.post(
        "/plan",
        files={"model": ("m.pt2", model), "calibration": ("c", calib), "extra": ("e", b"1")},
        data={"constraints": constraints()},
    )
    assert r.status_code == 400 and "extra" in r.json()["error"]["message"]


def test_submit_queues_a_job_and_reads_it_back(
    client: TestClient, service: BitplanService, good: tuple[bytes, bytes]
) -> None:
    r = post_plan(client, *good, constraints(size_mb=0.01))
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["job_id"]
    assert body["status"] == "queued"
    assert body["links"]["checkpoint"] == f"/jobs/{job_id}/checkpoint"
    assert service.queue.pending_ids() == {job_id}
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["progress"] == 0.0
    assert job["constraints"]["limits"]["size_mb"] == 0.01
    assert job["constraints"]["weight_bits"] == [4, 8]  # defaults filled in
    assert job["constraints"]["hessian"].items() >= FAST_HESSIAN.items()  # + defaults
    assert job["model_name"] == "model.pt2"
    # not ready yet: 409, not 404 / 500
    for what in ("plan", "report", "checkpoint"):
        r = client.get(f"/jobs/{job_id}/{what}")
        assert r.status_code == 409 and "queued" in r.json()["error"]["message"]
    listing = client.get("/jobs").json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == job_id


def test_cancel_queued_job_then_the_worker_skips_it(
    client: TestClient, service: BitplanService, good: tuple[bytes, bytes]
) -> None:
    job_id = post_plan(client, *good, constraints()).json()["job_id"]
    r = client.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["error"]["code"] == "cancelled"
    calls = []
    service.queue.pipeline = lambda *a, **k: calls.append(a)
    service.queue.run_job(job_id)  # what the worker does when the task comes up
    assert calls == [] and service.store.get(job_id).status == "cancelled"
    r = client.delete(f"/jobs/{job_id}")
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "path,status",
    [
        ("/jobs/" + "0" * 32, 404),
        ("/jobs/" + "0" * 32 + "/plan", 404),
        ("/jobs/" + "0" * 32 + "/checkpoint", 404),
        ("/jobs/not-a-job", 422),
        ("/jobs/..%2F..%2Fetc%2Fpasswd", (404, 422)),
        ("/jobs/%2E%2E/plan", (404, 422)),
        ("/jobs/../../etc/passwd", (404, 422)),
        ("/jobs/%2e%2e%2f%2e%2e%2fjobs.db/plan", (404, 422)),
        ("/jobs/" + "A" * 32, 422),
        ("/jobs/" + "0" * 31 + "g/report", 422),
    ],
)
def test_unknown_and_path_like_ids(
    client: TestClient, path: str, status: int | tuple[int, ...]
) -> None:
    allowed = status if isinstance(status, tuple) else (status,)
    for method in ("GET", "DELETE") if path.count("/") == 2 else ("GET",):
        r = client.request(method, path)
        assert r.status_code in allowed, (method, path, r.text)
        assert r.json()["error"]["message"]
        assert "root:" not in r.text and "SQLite" not in r.text


def test_listing_is_paged_and_filtered(
    client: TestClient, service: BitplanService, good: tuple[bytes, bytes]
) -> None:
    ids = [post_plan(client, *good, constraints()).json()["job_id"] for _ in range(3)]
    service.store.mark_cancelled(ids[0])
    page = client.get("/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = client.get("/jobs", params={"limit": 2, "offset": 2}).json()
    assert {j["id"] for j in page["items"] + rest["items"]} == set(ids)
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get("/jobs", params={"limit": 0}).status_code == 422


def test_api_key(tmp_path: Path, good: tuple[bytes, bytes]) -> None:
    settings = Settings(data_dir=tmp_path, api_key="s3cret-key-123")
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        for method, path in (("GET", "/jobs"), ("GET", "/jobs/" + "0" * 32),
                             ("DELETE", "/jobs/" + "0" * 32), ("POST", "/plan")):
            r = c.request(method, path)
            assert r.status_code == 401, (method, path)
            assert "API key" in r.json()["error"]["message"]
        assert c.get("/jobs", headers={"X-API-Key": "wrong-key-1234"}).status_code == 401
        assert c.get("/jobs", headers={"X-API-Key": "s3cret-key-123"}).status_code == 200
        bearer = {"Authorization": "Bearer s3cret-key-123"}
        assert c.get("/jobs", headers=bearer).status_code == 200
        assert post_plan(c, *good, constraints(), headers=bearer).status_code == 202
        # the API's description is not public either: no pages, the schema needs the key
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
        assert c.get("/openapi.json").status_code == 401
        assert "/plan" in c.get("/openapi.json", headers=bearer).json()["paths"]


def test_docs_public_by_setting(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_key="s3cret-key-123", docs_public=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/docs").status_code == 200
        assert "/plan" in c.get("/openapi.json").json()["paths"]
        assert c.get("/jobs").status_code == 401
    with TestClient(create_app(Settings(data_dir=tmp_path / "b"))) as c:  # no key: public
        assert c.get("/docs").status_code == 200


def test_openapi_documents_the_form(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    form = spec["paths"]["/plan"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(form["schema"]["required"]) == {"model", "calibration", "constraints"}
    assert "/jobs/{job_id}/checkpoint" in spec["paths"]
    schema = client.get("/constraints/schema").json()
    assert "limits" in schema["required"]


def _typed_errors() -> list[type[BitplanError]]:
    """Every BitplanError subclass of the packages a request reaches (the CLI's own errors in
    service.commands never reach HTTP)."""
    import quantize.integer  # noqa: F401  (defines UnsupportedOpError)
    import service.uploads  # noqa: F401  (defines BadRequestError)

    found, todo = [], [BitplanError]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in ("solver", "sensitivity", "quantize", "service") \
                    and not sub.__module__.startswith("service.commands"):
                found.append(sub)
    return found


def test_every_typed_error_code_has_one_http_status() -> None:
    errors = _typed_errors()
    codes = {e.code for e in errors}
    assert len(errors) >= 14 and "error" not in codes  # each subclass names its own code
    missing = sorted(c for c in codes if c not in HTTP_STATUS)
    assert not missing, f"typed error codes without an HTTP status: {missing}"
    stale = sorted(set(HTTP_STATUS) - codes)
    assert not stale, f"HTTP_STATUS entries no typed error has: {stale}"
    assert all(400 <= s < 600 for s in HTTP_STATUS.values())


def test_the_exception_handler_answers_each_typed_error_with_the_table(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    errors = {e.__name__: e for e in _typed_errors()}

    @app.get("/raise/{name}")
    def raise_it(name: str) -> None:
        raise errors[name]("what to fix", detail={"name": name})

    with TestClient(app) as c:
        for name, error in errors.items():
            r = c.get(f"/raise/{name}")
            assert r.status_code == HTTP_STATUS[error.code], name
            assert r.json() == {"error": {"code": error.code, "message": "what to fix",
                                          "detail": {"name": name}}}


def test_framework_errors_share_the_error_body(client: TestClient) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put("/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = client.get("/jobs", params={"limit": 0})
    assert r.status_code == HTTP_STATUS["invalid_request"] == 422
    assert r.json()["error"]["code"] == "invalid_request"
    assert r.json()["error"]["detail"][0]["field"] == "query.limit"


def test_job_schema_is_read_from_the_job(client: TestClient, good: tuple[bytes, bytes]) -> None:
    job_id = post_plan(client, *good, constraints()).json()["job_id"]
    body = client.get(f"/jobs/{job_id}").json()
    assert body["links"]["checkpoint"] == f"/jobs/{job_id}/checkpoint"
    assert body["status"] == "queued" and body["error"] is None and body["attempts"] == 0
    assert "model_path" not in body and "out_dir" not in body  # worker paths stay private


def test_evaluation_part_reaches_the_pipeline(
    client: TestClient, service: BitplanService, good: tuple[bytes, bytes]
) -> None:
    model, calib = good
    files = {
        "model": ("model.pt2", model, "application/octet-stream"),
        "calibration": ("calib.safetensors", calib, "application/octet-stream"),
        "evaluation": ("eval.safetensors", calib, "application/octet-stream"),
    }
    r = client.post("/plan", files=files, data={"constraints": constraints()})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    seen = {}

    def pipeline(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    service.queue.pipeline = pipeline
    service.queue.run_job(job_id)
    assert seen["eval_path"].name == "evaluation.safetensors"
    assert seen["eval_path"].read_bytes() == calib
    assert seen["memory_budget"] > 0
    # without the part, no evaluation file
    job2 = post_plan(client, *good, constraints()).json()["job_id"]
    service.queue.run_job(job2)
    assert seen["eval_path"] is None
