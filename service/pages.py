"""The job pages: server-rendered HTML (Jinja2) from the same app, no JavaScript.

``/ui`` lists jobs; ``/ui/jobs/{id}`` shows a job (refreshing itself while it runs), then its
plan table, plots, metrics, downloads and a form to re-plan it with other limits. With
``BITPLAN_API_KEY`` set every page needs a session: ``/ui/login`` takes the key and sets an
HttpOnly, SameSite=Strict cookie holding a keyed hash of it (never the key). Every form carries
a per-browser token that must match its cookie (double submit) and a cross-site ``Origin`` is
refused, so another site cannot submit a form in the user's name. Templates autoescape
everything they show.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from solver.errors import BitplanError

from . import jobs as J
from .core import BitplanService
from .errors import http_status
from .plots import available
from .tradeoff import primary_metric

router = APIRouter(prefix="/ui", include_in_schema=False)
_HERE = Path(__file__).parent
_ENV = Environment(loader=FileSystemLoader(_HERE / "templates"),
                   autoescape=select_autoescape(["html"]))
SESSION, CSRF = "bitplan_session", "bitplan_csrf"
_FILES = {"plan": "plan.json", "report": "report.json", "checkpoint": "model.safetensors",
          "sensitivity": "sensitivity.json", "pareto": "pareto.json"}


def _svc(request: Request) -> BitplanService:
    return request.app.state.service


def _session_value(key: str) -> str:
    return hmac.new(key.encode(), b"bitplan-ui-session", hashlib.sha256).hexdigest()


def _signed_in(request: Request) -> bool:
    key = _svc(request).settings.api_key
    if key is None:
        return True
    given = request.cookies.get(SESSION, "")
    return hmac.compare_digest(given.encode(), _session_value(key).encode())


def _render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    token = request.cookies.get(CSRF) or secrets.token_urlsafe(24)
    html = _ENV.get_template(name).render(csrf=token, **ctx)
    resp = HTMLResponse(html, status_code=status)
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
    if CSRF not in request.cookies:
        resp.set_cookie(CSRF, token, httponly=True, samesite="strict", path="/ui")
    return resp


async def _checked_form(request: Request) -> dict[str, str] | None:
    """The posted form when it comes from our own page (token and origin), else None."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            return None
    form = {k: str(v) for k, v in (await request.form()).items()}
    cookie = request.cookies.get(CSRF, "")
    if not cookie or not hmac.compare_digest(form.get("csrf", "").encode(), cookie.encode()):
        return None
    return form


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)


def _forbidden(request: Request) -> HTMLResponse:
    return _render(request, "message.html", 403, title="Refused",
                   message="This form did not come from this site's page (or the page is old): "
                           "open the page again and resubmit.")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/ui") -> HTMLResponse:
    return _render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await _checked_form(request)
    if form is None:
        return _forbidden(request)
    key = _svc(request).settings.api_key
    target = _safe_next(form.get("next", "/ui"))
    if key is not None and not hmac.compare_digest(form.get("key", "").encode(), key.encode()):
        return _render(request, "login.html", 401, next=target, error="wrong key")
    resp = RedirectResponse(target, status_code=303)
    if key is not None:
        resp.set_cookie(SESSION, _session_value(key), httponly=True, samesite="strict",
                        path="/ui")
    return resp


def _safe_next(target: str) -> str:
    """Only a path of these pages (no scheme, host or '//'): never an open redirect."""
    return target if target.startswith("/ui") and not target.startswith("//") else "/ui"


def _row(job: J.Job) -> dict[str, Any]:
    summary = job.summary or {}
    metric = primary_metric(summary.get("metrics"))
    keys = ("size_bytes", "bops", "latency_ms")
    totals, limits = summary.get("totals") or {}, summary.get("limits") or {}
    return {"job": job, "totals": {k: totals.get(k) for k in keys},
            "limits": {k: limits.get(k) for k in keys}, "metric": metric}


@router.get("", response_class=HTMLResponse)
def jobs_page(request: Request, offset: int = 0) -> Response:
    if not _signed_in(request):
        return _login_redirect(request)
    offset = max(offset, 0)
    items, total = _svc(request).list(offset, 50, None)
    active = any(j.status in J.ACTIVE for j in items)
    return _render(request, "jobs.html", rows=[_row(j) for j in items], total=total,
                   offset=offset, refresh=active)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_context(svc: BitplanService, job_id: str) -> dict[str, Any]:
    job = svc.get(job_id)
    out = Path(job.out_dir)
    plan = _json(out / "plan.json") if job.status in (J.SUCCEEDED, J.FAILED) else None
    report = _json(out / "report.json") if job.status == J.SUCCEEDED else None
    plots = [n for n in available(out) if n.endswith(".svg")] if job.status == J.SUCCEEDED \
        else []  # drawn when the page's <img> asks for them
    files = [k for k, f in _FILES.items() if job.status == J.SUCCEEDED and (out / f).is_file()]
    return {"job": job, "plan": plan, "report": report, "plots": plots, "files": files,
            "constraints": json.dumps(job.constraints, indent=2),
            "replannable": (out / "sensitivity.json").is_file(),
            "refresh": job.status in J.ACTIVE, "error": None}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> Response:
    if not _signed_in(request):
        return _login_redirect(request)
    try:
        ctx = _job_context(_svc(request), job_id)
    except BitplanError as e:
        return _render(request, "message.html", http_status(e), title="No such job",
                       message=e.message)
    return _render(request, "job.html", **ctx)


@router.post("/jobs/{job_id}/replan", response_class=HTMLResponse)
async def replan(request: Request, job_id: str) -> Response:
    if not _signed_in(request):
        return _login_redirect(request)
    form = await _checked_form(request)
    if form is None:
        return _forbidden(request)
    svc = _svc(request)
    try:
        constraints = json.loads(form.get("constraints", ""))
        child, _ = svc.replan(job_id, constraints)
    except (ValueError, BitplanError) as e:
        try:
            ctx = _job_context(svc, job_id)
        except BitplanError as missing:
            return _render(request, "message.html", http_status(missing), title="No such job",
                           message=missing.message)
        status = http_status(e) if isinstance(e, BitplanError) else 422
        message = e.message if isinstance(e, BitplanError) else f"not JSON: {e}"
        ctx.update(constraints=form.get("constraints", ""), error=message)
        return _render(request, "job.html", status, **ctx)
    return RedirectResponse(f"/ui/jobs/{child.id}", status_code=303)


@router.get("/jobs/{job_id}/files/{name}")
def job_file(request: Request, job_id: str, name: str) -> Response:
    if not _signed_in(request):
        return _login_redirect(request)
    svc = _svc(request)
    try:
        if name not in _FILES:
            raise KeyError(name)
        path, media_type = svc.artifact(job_id, name)
    except (BitplanError, KeyError):
        return Response("not found", status_code=404, media_type="text/plain")
    download = f"{job_id}.safetensors" if name == "checkpoint" else None
    return FileResponse(path, media_type=media_type, filename=download)


@router.get("/jobs/{job_id}/plots/{name}")
def job_plot(request: Request, job_id: str, name: str) -> Response:
    if not _signed_in(request):
        return _login_redirect(request)
    try:
        path, media_type = _svc(request).plot(job_id, name)
    except BitplanError:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(path, media_type=media_type)


@router.get("/static/style.css")
def stylesheet() -> FileResponse:
    return FileResponse(_HERE / "static" / "style.css", media_type="text/css")
