"""``bitplan demo``: the first five minutes. Trains a tiny CNN on scikit-learn's digits, exports
it, submits it to a running service (``make serve`` in another terminal), polls the job and
prints the plan."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import CommandError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a tiny digits model, submit it to the running service, print the plan",
    )
    p.add_argument("--url", default=os.environ.get("BITPLAN_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("BITPLAN_API_KEY"))
    p.add_argument("--size-ratio", type=float, default=0.65,
                   help="size limit relative to the all-INT8 model (default 0.65)")
    p.add_argument("--bops-ratio", type=float, default=0.5,
                   help="bit-operation limit relative to the all-INT8 model (default 0.5)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job")
    p.add_argument("--out", type=Path, help="also save plan / report / checkpoint here")
    p.set_defaults(func=run)


def make_demo_files(folder: Path) -> tuple[Path, Path, float]:
    """Train DigitsCNN on 1400 digits, export it (dynamic batch) and write 397 calibration
    digits; returns (model path, calibration path, fp32 accuracy on the calibration digits)."""
    from sensitivity import zoo

    x, y = zoo.digits_data(image_size=8, seed=0)
    model = zoo.train(zoo.DigitsCNN(), x[:1400], y[:1400], epochs=30, seed=0)
    acc = zoo.accuracy(model, x[1400:], y[1400:])
    model_path = zoo.save_model(model, x[:4], folder / "digits_cnn.pt2")
    calib_path = zoo.save_calibration(folder / "digits_calib.safetensors", x[1400:], y[1400:])
    return model_path, calib_path, acc


def _check(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            text = f"[{err['code']}] {err['message']}"
        except (ValueError, KeyError, TypeError):
            text = response.text[:500]
        raise CommandError(f"{response.request.method} {response.request.url} -> "
                        f"{response.status_code}: {text}")
    return response


def run(args: argparse.Namespace) -> int:
    import httpx

    from .plan import format_summary

    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    client = httpx.Client(base_url=args.url, headers=headers, timeout=60.0)
    try:
        client.get("/healthz").raise_for_status()
    except httpx.HTTPError as exc:
        raise CommandError(
            f"no bitplan service at {args.url} ({exc}); start one with `make serve` "
            "(or `bitplan serve`) in another terminal, or pass --url"
        ) from None
    print("training a small CNN on scikit-learn's digits...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path, calib_path, acc = make_demo_files(Path(tmp))
        print(f"  fp32 accuracy on 397 held-out digits: {acc:.3f}")
        constraints = {
            "limits": {"size_ratio": args.size_ratio, "bops_ratio": args.bops_ratio},
            "weight_bits": [2, 4, 8],
            "activation_bits": [4, 8],
            "hessian": {"max_iter": 50, "tol": 0.1, "seed": 0},
        }
        print(f"submitting to {args.url}/plan with constraints {json.dumps(constraints)}")
        with model_path.open("rb") as m, calib_path.open("rb") as c:
            r = _check(client.post(
                "/plan",
                files={"model": (model_path.name, m), "calibration": (calib_path.name, c)},
                data={"constraints": json.dumps(constraints)},
            ))
    job_id = r.json()["job_id"]
    print(f"job {job_id} queued; polling {args.url}/jobs/{job_id}")
    deadline = time.monotonic() + args.timeout
    last = None
    while True:
        job = _check(client.get(f"/jobs/{job_id}")).json()
        state = (job["status"], job["stage"])
        if state != last:
            print(f"  {job['status']:<9} {job['stage'] or '':<12} {job['progress'] * 100:5.1f}%")
            last = state
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise CommandError(f"job {job_id} still {job['status']} after {args.timeout:g} s")
        time.sleep(0.5)
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        print(f"job {job['status']}: [{err.get('code')}] {err.get('message')}", file=sys.stderr)
        return 1
    plan = _check(client.get(f"/jobs/{job_id}/plan")).json()
    report = _check(client.get(f"/jobs/{job_id}/report")).json()
    print(format_summary(plan, report))
    links = {name: f"{args.url}/jobs/{job_id}/{name}" for name in ("plan", "report", "checkpoint")}
    if args.out is None:
        print("fetch the results (they stay on the service):")
        for name, url in links.items():
            print(f"  {name:<10} {url}")
        print(f"e.g. curl -o model.safetensors {links['checkpoint']}  (or pass --out DIR)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    saved = [args.out / "plan.json", args.out / "report.json", args.out / "model.safetensors"]
    saved[0].write_text(json.dumps(plan, indent=2))
    saved[1].write_text(json.dumps(report, indent=2))
    saved[2].write_bytes(_check(client.get(links["checkpoint"])).content)
    print("downloaded: " + ", ".join(str(p) for p in saved))
    return 0
