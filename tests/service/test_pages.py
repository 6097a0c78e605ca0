"""The job pages (service/pages.py) in-process: listing, a job's page, the re-plan form with
its cross-site protection, escaping, and the login with an API key."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from svc_helpers import FAST_HESSIAN, fast_settings, post_plan

from service import jobs as J
from service.app import create_app
from service.core import BitplanService


def _cons(**extra) -> dict:
    return {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.8},
            "pin": {"first": None, "last": 8}, **extra}


def _csrf(client: TestClient, page: str) -> str:
    r = client.get(page)
    assert r.status_code == 200
    token = client.cookies.get("bitplan_csrf")
    assert token and f'value="{token}"' in r.text
    return token


@pytest.fixture
def done(client, service, mlp_pt2, calib_path) -> str:
    r = post_plan(client, mlp_pt2.read_bytes(), calib_path.read_bytes(), json.dumps(_cons()))
    job_id = r.json()["job_id"]
    service.queue.run_job(job_id)
    return job_id


def test_list_and_job_page(client, done) -> None:
    r = client.get("/ui")
    assert r.status_code == 200 and done[:12] in r.text and "succeeded" in r.text
    page = client.get(f"/ui/jobs/{done}").text
    for text in ("Plan", "fc1", "bits.svg", "pareto.svg", "Downloads", "Re-plan",
                 "quant_accuracy"):  # the plots are listed before their first request
        assert text in page, text
    assert client.get(f"/ui/jobs/{done}/plots/bits.svg").headers["content-type"].startswith(
        "image/svg+xml")
    assert client.get(f"/ui/jobs/{done}/files/plan").json()["format"].startswith("bitplan-plan/")
    assert client.get(f"/ui/jobs/{done}/files/..%2Fupload").status_code == 404
    assert client.get("/ui/static/style.css").status_code == 200
    assert client.get("/ui/jobs/" + "0" * 32).status_code == 404


def test_replan_form(client, service, done) -> None:
    token = _csrf(client, f"/ui/jobs/{done}")
    cons = json.dumps(_cons(limits={"size_ratio": 0.6}))
    r = client.post(f"/ui/jobs/{done}/replan", data={"csrf": token, "constraints": cons},
                    follow_redirects=False)
    assert r.status_code == 303
    child = r.headers["location"].rsplit("/", 1)[1]
    assert service.get(child).parent_id == done
    # a bad constraint re-renders the form with the message, escaped, and queues nothing
    before = service.list(0, 100, None)[1]
    bad = json.dumps({"limits": {"size_ratio": 0.5}, "weight_bits": ["<script>x</script>"]})
    r = client.post(f"/ui/jobs/{done}/replan", data={"csrf": token, "constraints": bad})
    assert r.status_code == 422 and "<script>x" not in r.text and "&lt;script&gt;" in r.text
    assert service.list(0, 100, None)[1] == before


def test_forms_refuse_cross_site_submissions(client, service, done) -> None:
    token = _csrf(client, f"/ui/jobs/{done}")
    before = service.list(0, 100, None)[1]
    cons = json.dumps(_cons())
    r = client.post(f"/ui/jobs/{done}/replan", data={"csrf": "forged", "constraints": cons})
    assert r.status_code == 403
    r = client.post(f"/ui/jobs/{done}/replan", data={"csrf": token, "constraints": cons},
                    headers={"origin": "https://evil.example"})
    assert r.status_code == 403
    assert service.list(0, 100, None)[1] == before


def test_job_names_are_escaped(client, service, tmp_path) -> None:
    job_id = J.new_job_id()
    service.store.create(job_id, _cons(), "m", "c", str(tmp_path / "o"),
                         model_name='<img src=x onerror="alert(1)">')
    for page in ("/ui", f"/ui/jobs/{job_id}"):
        text = client.get(page).text
        assert "<img src=x" not in text and "&lt;img src=x" in text
    assert '<meta http-equiv="refresh"' in client.get(f"/ui/jobs/{job_id}").text  # queued


def test_pages_need_the_key_when_one_is_set(tmp_path) -> None:
    settings = fast_settings(tmp_path / "data", api_key="s3cret-key-123")
    svc = BitplanService.from_settings(settings)
    try:
        with TestClient(create_app(service=svc)) as client:
            r = client.get("/ui", follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
            token = _csrf(client, "/ui/login")
            r = client.post("/ui/login", data={"csrf": token, "key": "wrong", "next": "/ui"})
            assert r.status_code == 401
            r = client.post("/ui/login", data={"csrf": token, "key": "s3cret-key-123",
                                               "next": "https://evil.example/"},
                            follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/ui"  # no open redirect
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
            assert "s3cret-key-123" not in cookie
            assert client.get("/ui").status_code == 200
    finally:
        svc.close()
