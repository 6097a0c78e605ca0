"""POST /jobs/{id}/replan: a new job on the parent's uploads that reuses its sensitivity, and
GET /jobs/{id}/pareto and /plots/{name}."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from svc_helpers import FAST_HESSIAN, post_plan

from service import jobs as J


def _cons(**extra) -> dict:
    return {"hessian": FAST_HESSIAN, "limits": {"size_ratio": 0.8},
            "pin": {"first": None, "last": 8}, **extra}


@pytest.fixture
def parent(client, service, mlp_pt2, calib_path) -> str:
    r = post_plan(client, mlp_pt2.read_bytes(), calib_path.read_bytes(), json.dumps(_cons()))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    service.queue.run_job(job_id)
    assert service.get(job_id).status == J.SUCCEEDED
    return job_id


def test_replan_reuses_uploads_and_sensitivity(client, service, parent) -> None:
    r = client.post(f"/jobs/{parent}/replan", json=_cons(limits={"size_ratio": 0.6}))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["parent_id"] == parent and body["reuses"] == ["uploads", "sensitivity"]
    child = body["job_id"]
    assert body["links"]["self"] == f"/jobs/{child}"
    evaluations = service.settings.cache_dir / "evaluations"
    before = sorted(evaluations.iterdir())
    assert before  # the parent evaluated points along its front
    service.queue.run_job(child)
    # with one limit the front is the parent's: its evaluated points come from the cache
    assert sorted(evaluations.iterdir()) == before
    job = client.get(f"/jobs/{child}").json()
    assert job["status"] == "succeeded" and job["parent_id"] == parent
    assert job["summary"]["reused"] == ["loaded model", "sensitivity"]  # the worker kept it
    p_dir = Path(service.get(parent).out_dir)
    c_dir = Path(service.get(child).out_dir)
    assert (p_dir / "sensitivity.json").read_text() == (c_dir / "sensitivity.json").read_text()
    plan = client.get(f"/jobs/{child}/plan").json()
    assert plan["limits"]["size_bytes"] < client.get(f"/jobs/{parent}/plan").json()[
        "limits"]["size_bytes"]
    # the child owns its inputs: deleting the parent's directory leaves it runnable
    shutil.rmtree(service.job_dir(parent))
    assert Path(service.get(child).model_path).is_file()
    r = client.post(f"/jobs/{parent}/replan", json=_cons())
    assert r.status_code in (404, 409) and r.json()["error"]["message"]


def test_replan_with_other_hessian_settings_measures_again(client, service, parent) -> None:
    r = client.post(f"/jobs/{parent}/replan",
                    json=_cons(hessian={**FAST_HESSIAN, "seed": 3}))
    assert r.status_code == 202 and r.json()["reuses"] == ["uploads"]
    service.queue.run_job(r.json()["job_id"])
    assert service.get(r.json()["job_id"]).summary["reused"] == []


def test_replan_refusals(client, service, parent, tmp_path) -> None:
    assert client.post("/jobs/" + "0" * 32 + "/replan", json=_cons()).status_code == 404
    r = client.post(f"/jobs/{parent}/replan", json={"limits": {"size_ratio": -1}})
    assert r.status_code == 422 and "size_ratio" in r.text
    r = client.post(f"/jobs/{parent}/replan", content=b"not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    # a job that failed before its sensitivity: 409 saying so
    failed = J.new_job_id()
    service.store.create(failed, _cons(), str(tmp_path / "m"), str(tmp_path / "c"),
                         str(tmp_path / "out"))
    service.store.claim(failed)
    service.store.mark_failed(failed, "bad_model", "broken")
    r = client.post(f"/jobs/{failed}/replan", json=_cons())
    assert r.status_code == 409 and "before its sensitivity" in r.json()["error"]["message"]


def test_pareto_and_plots_routes(client, service, parent) -> None:
    doc = client.get(f"/jobs/{parent}/pareto").json()
    assert doc["format"] == "bitplan-pareto/1" and "size_bytes" in doc["fronts"]
    drawn = Path(service.get(parent).out_dir) / "plots"
    assert not drawn.exists()  # a job draws no plot while it runs: each on its first request
    svg = client.get(f"/jobs/{parent}/plots/bits.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content[:400]
    png = client.get(f"/jobs/{parent}/plots/pareto.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert sorted(p.name for p in drawn.iterdir()) == ["bits.svg", "pareto.png"]  # kept
    assert client.get(f"/jobs/{parent}/plots/pareto.png").content == png.content
    assert client.get(f"/jobs/{parent}/plots/../plan.json").status_code == 404
    assert client.get(f"/jobs/{parent}/plots/other.svg").status_code in (404, 422)


def test_an_older_job_store_gains_the_new_columns(tmp_path) -> None:
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    J.JobRow.__table__.create(engine)
    with engine.begin() as conn:  # the table as a bitplan without parent_id made it
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN parent_id"))
        assert "parent_id" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    engine.dispose()
    store = J.JobStore(url)
    job = store.create(J.new_job_id(), {}, "m", "c", "o", parent_id="p" * 32)
    assert store.get(job.id).parent_id == "p" * 32
    store.close()


def test_cache_format_follows_the_sensitivity_format() -> None:
    from sensitivity.engine import VERSION
    from service.cache import SENSITIVITY_FORMAT

    assert SENSITIVITY_FORMAT == VERSION
