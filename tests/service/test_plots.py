"""service/plots.py's drawing on request: ``available`` names the plots a finished job has,
``ensure`` draws one file from the job's JSON files the first time and keeps it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from service import plots

PLAN = {"layers": [{"name": "conv1", "w_bits": 8, "a_bits": 8.0, "drq": None},
                   {"name": "fc", "w_bits": 4, "a_bits": 6.2,
                    "drq": {"sensitive_fraction": 0.25}}]}
SENSITIVITY = {"layers": [{"name": "conv1", "weight_trace": 3.0, "params": 30},
                          {"name": "fc", "weight_trace": 1.0, "params": 100}]}


def _point(size: float, omega: float, metrics: dict | None) -> dict:
    return {"budget": size, "status": "optimal", "objective": omega,
            "totals": {"size_bytes": size}, "options": {"w8a8": 2}, "metrics": metrics}


PARETO = {"version": 1, "format": "bitplan-pareto/1", "fronts": {"size_bytes": {
    "limit": 90.0,
    "points": [_point(60.0, 2.0, {"quant_accuracy": 0.7}), _point(80.0, 0.5, None),
               _point(100.0, 0.0, {"quant_accuracy": 0.95})],
    "chosen": {"objective": 0.5, "totals": {"size_bytes": 80.0}, "metrics": None}}}}


def _job_dir(tmp_path: Path, pareto: dict | None = PARETO) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps(PLAN))
    (out / "sensitivity.json").write_text(json.dumps(SENSITIVITY))
    if pareto is not None:
        (out / "pareto.json").write_text(json.dumps(pareto))
    return out


def test_ensure_draws_each_plot_once_and_keeps_it(tmp_path, monkeypatch) -> None:
    out = _job_dir(tmp_path)
    assert plots.available(out) == list(plots.NAMES)
    assert not (out / "plots").exists()  # nothing drawn before it is asked for
    for name in plots.NAMES:
        path = plots.ensure(out, name)
        assert path == out / "plots" / name
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") if name.endswith(".png") else b"<svg" in data[:400]
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(plots.NAMES)  # no temps

    def fail(*args, **kwargs):
        raise AssertionError("drawn again")

    monkeypatch.setattr(plots, "render_one", fail)
    assert plots.ensure(out, "bits.svg") == out / "plots" / "bits.svg"  # kept, not redrawn


def test_a_drawn_file_matches_what_render_writes(tmp_path) -> None:
    out = _job_dir(tmp_path)
    svg = plots.ensure(out, "pareto.svg").read_text()
    whole = plots.render(PLAN, SENSITIVITY, PARETO)["pareto.svg"].decode()
    # the same figure: same text drawn (matplotlib's SVG ids and dates may differ)
    for text in ("Omega vs model size", "measured quant_accuracy", "chosen plan"):
        assert text in svg and text in whole, text


def test_no_front_no_pareto_plot_and_no_plan_no_plot(tmp_path) -> None:
    out = _job_dir(tmp_path, pareto={**PARETO, "fronts": {}})
    assert plots.available(out) == ["bits.svg", "bits.png"]
    assert plots.ensure(out, "pareto.png") is None and not (out / "plots").exists()
    assert plots.ensure(out, "bits.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plots.available(empty) == [] and plots.ensure(empty, "bits.svg") is None
    with pytest.raises(ValueError):
        plots.render_one("other.svg", PLAN, SENSITIVITY, PARETO)


def test_concurrent_first_requests_draw_once(tmp_path, monkeypatch) -> None:
    out = _job_dir(tmp_path)
    calls = []
    real = plots.render_one

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "render_one", counted)
    paths: list[Path | None] = []
    threads = [threading.Thread(target=lambda: paths.append(plots.ensure(out, "bits.png")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths == [out / "plots" / "bits.png"] * 4 and len(calls) == 1
