"""Request helpers shared by the service tests (imported as a plain module: tests/ has no
packages)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

# Small enough to keep every service test quick: a handful of Hutchinson samples.
FAST_HESSIAN = {"max_iter": 4, "tol": 0.5, "seed": 0}


def constraints(**limits: Any) -> str:
    return json.dumps({"limits": limits or {"size_ratio": 0.8}, "hessian": FAST_HESSIAN})


def post_plan(
    client: TestClient,
    model: bytes,
    calib: bytes,
    constraints_json: str,
    headers: dict[str, str] | None = None,
):
    files = {
        "model": ("model.pt2", model, "application/octet-stream"),
        "calibration": ("calib.safetensors", calib, "application/octet-stream"),
    }
    return client.post(
        "/plan", files=files, data={"constraints": constraints_json}, headers=headers or {}
    )
