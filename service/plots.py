"""A job's two plots, as SVG and PNG (matplotlib, Agg backend, no display):

- ``bits``: weight and activation bits per layer (DRQ layers marked with their INT8 share),
  with each layer's sensitivity (weight Hessian trace per parameter, log scale) beside them;
- ``pareto``: predicted Omega against each limited resource along the job's Pareto front, the
  limit as a line, the chosen plan marked, and the measured quality of the evaluated points.

The figures are drawn from plain data (``bits_data`` / ``pareto_data``), which the tests check;
``render(plan, sensitivity, pareto)`` returns ``{file name: bytes}`` (what ``bitplan plan --out``
writes). A service job draws nothing while it runs: ``ensure(out_dir, name)`` draws one file
from the job's ``plan.json``, ``sensitivity.json`` and ``pareto.json`` the first time it is
asked for, and keeps it in ``out_dir/plots/``.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import storage_error
from .tradeoff import primary_metric

NAMES = ("bits.svg", "bits.png", "pareto.svg", "pareto.png")
_UNITS = {"size_bytes": ("model size", 1e6, "MB"), "bops": ("bit operations", 1e9, "GBOPs"),
          "latency_ms": ("latency", 1.0, "ms")}


def bits_data(plan: Mapping[str, Any], sensitivity: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per plan row: name, weight bits, activation bits (expected bits for DRQ), DRQ INT8 share
    (or None) and sensitivity (Tr(H_w) / n, None when unknown)."""
    traces = {}
    for s in (sensitivity or {}).get("layers", []):
        if s.get("weight_trace") is not None and s.get("params"):
            traces[s["name"]] = float(s["weight_trace"]) / int(s["params"])
    rows = plan.get("layers", [])
    return {
        "names": [r["name"] for r in rows],
        "w_bits": [int(r["w_bits"]) for r in rows],
        "a_bits": [float(r["a_bits"]) for r in rows],
        "drq": [None if not r.get("drq") else float(r["drq"]["sensitive_fraction"])
                for r in rows],
        "sensitivity": [traces.get(r["name"]) for r in rows],
    }


def pareto_data(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Per front: budgets, Omega and totals of the feasible points, the limit, the chosen
    point, and the evaluated points' primary metric (name and values)."""
    out = {}
    for r, front in doc.get("fronts", {}).items():
        pts = [p for p in front["points"] if p["objective"] is not None]
        measured = [(p["totals"][r], primary_metric(p["metrics"])) for p in pts if p["metrics"]]
        measured = [(x, m) for x, m in measured if m is not None]
        chosen = front.get("chosen") or {}
        out[r] = {
            "x": [p["totals"][r] for p in pts],
            "omega": [p["objective"] for p in pts],
            "limit": front.get("limit"),
            "chosen": (chosen.get("totals", {}).get(r), chosen.get("objective")),
            "metric": measured[0][1][0] if measured else None,
            "metric_x": [x for x, _ in measured],
            "metric_y": [m[1] for _, m in measured],
        }
    return out


def _figure_bytes(fig: Any, exts: tuple[str, ...] = ("svg", "png")) -> dict[str, bytes]:
    out = {}
    for ext in exts:
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=100)
        out[ext] = buf.getvalue()
    return out


def _bits_figure(d: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    n = len(d["names"])
    fig = Figure(figsize=(max(6.0, 0.35 * n + 2), 4.2))
    fig.subplots_adjust(left=0.08, right=0.88, bottom=0.28, top=0.92)  # fixed: no layout pass
    ax = fig.add_subplot()
    xs = range(n)
    ax.bar([x - 0.2 for x in xs], d["w_bits"], width=0.4, label="weight bits", color="#3b6ea8")
    ax.bar([x + 0.2 for x in xs], d["a_bits"], width=0.4, label="activation bits",
           color="#e0a040")
    for x, share in zip(xs, d["drq"], strict=True):
        if share is not None:
            ax.annotate(f"DRQ {share:.0%}", (x + 0.2, 8.3), ha="center", fontsize=7, rotation=90)
    ax.set_ylim(0, 10)
    ax.set_ylabel("bits")
    ax.set_xticks(list(xs), d["names"], rotation=70, ha="right", fontsize=7)
    if any(s is not None for s in d["sensitivity"]):
        ax2 = ax.twinx()
        pts = [(x, s) for x, s in zip(xs, d["sensitivity"], strict=True) if s is not None]
        ax2.plot([x for x, _ in pts], [s for _, s in pts], "k.-", lw=0.8,
                 label="sensitivity Tr(H)/n")
        if all(s > 0 for _, s in pts):
            ax2.set_yscale("log")
        ax2.set_ylabel("sensitivity: Tr(H_w) / n")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("bits per layer")
    return fig


def _pareto_figure(d: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * max(len(d), 1), 4.2))
    fig.subplots_adjust(left=0.14, right=0.86, bottom=0.13, top=0.92, wspace=0.45)
    for k, (r, f) in enumerate(d.items()):
        label, scale, unit = _UNITS.get(r, (r, 1.0, ""))
        ax = fig.add_subplot(1, len(d), k + 1)
        ax.plot([x / scale for x in f["x"]], f["omega"], "o-", ms=3, label="predicted Omega")
        if f["limit"] is not None:
            ax.axvline(f["limit"] / scale, color="red", ls="--", lw=1, label="limit")
        cx, cy = f["chosen"]
        if cx is not None and cy is not None:
            ax.plot([cx / scale], [cy], "r*", ms=12, label="chosen plan")
        ax.set_yscale("symlog", linthresh=max(min((v for v in f["omega"] if v > 0),
                                                  default=1e-6), 1e-12))
        ax.set_xlabel(f"{label} ({unit})")
        ax.set_ylabel("predicted Omega (lower is better)")
        if f["metric"]:
            ax2 = ax.twinx()
            ax2.plot([x / scale for x in f["metric_x"]], f["metric_y"], "gs", ms=6,
                     label=f"measured {f['metric']}")
            ax2.set_ylabel(f"measured {f['metric']}")
            ax2.legend(loc="center right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"Omega vs {label}")
    return fig


def render(plan: Mapping[str, Any], sensitivity: Mapping[str, Any] | None,
           pareto: Mapping[str, Any] | None) -> dict[str, bytes]:
    """``{"bits.svg": ..., "bits.png": ..., "pareto.svg": ..., "pareto.png": ...}`` (the
    Pareto pair only when the job has a front)."""
    out = {}
    for ext, data in _figure_bytes(_bits_figure(bits_data(plan, sensitivity))).items():
        out[f"bits.{ext}"] = data
    if pareto and pareto.get("fronts"):
        for ext, data in _figure_bytes(_pareto_figure(pareto_data(pareto))).items():
            out[f"pareto.{ext}"] = data
    return out


def render_one(name: str, plan: Mapping[str, Any], sensitivity: Mapping[str, Any] | None,
               pareto: Mapping[str, Any] | None) -> bytes | None:
    """One file of ``NAMES`` (one figure, one format); None for ``pareto.*`` without fronts."""
    if name not in NAMES:
        raise ValueError(f"no plot {name!r}")
    stem, ext = name.split(".")
    if stem == "bits":
        fig = _bits_figure(bits_data(plan, sensitivity))
    elif pareto and pareto.get("fronts"):
        fig = _pareto_figure(pareto_data(pareto))
    else:
        return None
    return _figure_bytes(fig, (ext,))[ext]


_DRAWING = threading.Lock()  # matplotlib's text and font caches are shared: one figure at a time


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def available(out_dir: str | Path) -> list[str]:
    """The plot files a finished job has, drawn yet or not: ``bits.*`` with a plan that has
    layers, ``pareto.*`` with a front in ``pareto.json``."""
    out = Path(out_dir)
    plan = _read(out / "plan.json")
    names = ["bits.svg", "bits.png"] if plan and plan.get("layers") else []
    pareto = _read(out / "pareto.json")
    if names and isinstance(pareto, dict) and pareto.get("fronts"):
        names += ["pareto.svg", "pareto.png"]
    return names


def ensure(out_dir: str | Path, name: str) -> Path | None:
    """``out_dir/plots/name``, drawn on first request from the job's files and kept (written
    whole or not at all); None when the job has no such plot. A full disk is a StorageError."""
    out = Path(out_dir)
    path = out / "plots" / name
    if path.is_file():
        return path
    if name not in available(out):
        return None
    with _DRAWING:
        if path.is_file():  # drawn by the request that held the lock before this one
            return path
        data = render_one(name, _read(out / "plan.json"), _read(out / "sensitivity.json"),
                          _read(out / "pareto.json"))
        if data is None:
            return None
        tmp = path.with_name(f".{name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(exc, f"plots/{name}") or exc from None
    return path
