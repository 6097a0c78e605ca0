"""Content-addressed cache of the expensive stages (sensitivity, DRQ regions, the metrics of
plans evaluated along a Pareto front, and the fronts themselves).

The ILP takes milliseconds, the Hessian minutes: a job whose model bytes, calibration bytes and
the settings a stage depends on match an earlier job's reuses that stage's result. Keys are
SHA-256 digests of those inputs (``stage_key``); entries are files under ``root/<stage>/`` written
atomically, so a reader sees a whole entry or none; ``prune`` removes entries not used for a
while (the worker's retention pass calls it). File digests are remembered beside the file
(``<file>.sha256``, with its size and mtime) so each upload is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STAGES = ("sensitivity", "regions", "evaluations", "latency", "fronts")
SENSITIVITY_FORMAT = 4  # sensitivity.json's version: a new format measures again
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered in ``<path>.sha256`` (trusted while the file's
    size and mtime are unchanged)."""
    path = Path(path)
    st = path.stat()
    side = path.with_name(path.name + ".sha256")
    try:
        memo = json.loads(side.read_text())
        if memo.get("size") == st.st_size and memo.get("mtime_ns") == st.st_mtime_ns:
            return str(memo["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        side.write_text(json.dumps({"sha256": digest, "size": st.st_size,
                                    "mtime_ns": st.st_mtime_ns}))
    except OSError:
        pass  # a read-only upload directory only costs a re-hash next time
    return digest


def stage_key(stage: str, files: Mapping[str, str | Path], settings: Mapping[str, Any]) -> str:
    """The cache key of ``stage`` for these input files and settings (JSON-able)."""
    if stage not in STAGES:
        raise ValueError(f"unknown cached stage {stage!r}")
    doc = {"stage": stage, "files": {k: file_digest(p) for k, p in sorted(files.items())},
           "settings": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    """Stage results by key under ``root`` (``None``: a cache that keeps nothing)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root)

    def _path(self, stage: str, key: str) -> Path:
        assert self.root is not None
        if stage not in STAGES or not all(c in "0123456789abcdef" for c in key):
            raise ValueError("bad cache entry name")
        return self.root / stage / f"{key}.json"

    def get(self, stage: str, key: str) -> str | None:
        """The stored text, or None. A hit refreshes the entry's mtime (for ``prune``)."""
        if self.root is None:
            return None
        path = self._path(stage, key)
        try:
            text = path.read_text()
            os.utime(path)
            return text
        except OSError:
            return None

    def has(self, stage: str, key: str) -> bool:
        return self.root is not None and self._path(stage, key).is_file()

    def put(self, stage: str, key: str, text: str) -> None:
        """Store ``text`` atomically (a temporary file renamed into place)."""
        if self.root is None:
            return
        path = self._path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def prune(self, older_than_s: float) -> int:
        """Remove entries not written or read for ``older_than_s`` seconds; returns the count."""
        if self.root is None:
            return 0
        cutoff, removed = time.time() - older_than_s, 0
        for stage in STAGES:
            for path in (self.root / stage).glob("*.json"):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed


def sensitivity_key(model: str | Path, calib: str | Path, constraints: Any,
                    holdout_fraction: float) -> str:
    """The sensitivity stage's key: the two files, the Hessian settings, the calibration split
    and, for measured Omega, the bit widths it was measured at (for diagonal Omega, the group
    sizes its grouped tables were computed for)."""
    settings: dict[str, Any] = {"format": SENSITIVITY_FORMAT,
                                "hessian": constraints.hessian.model_dump(),
                                "holdout_fraction": holdout_fraction}
    if constraints.hessian.omega == "measured":
        settings["bits"] = [sorted(constraints.weight_bits), sorted(constraints.activation_bits),
                            constraints.uses_drq]
    if constraints.loss != "auto":  # the loss whose curvature (or increase) was measured
        settings["loss"] = constraints.loss
    if constraints.quantize.weight_clip != "max":  # the clip ratios Omega used
        settings["weight_clip"] = constraints.quantize.weight_clip
    if constraints.hessian.omega == "diagonal" or constraints.quantize.weight_clip == "hessian":
        settings["group_sizes"] = sorted(g for g in constraints.weight_group_sizes if g)
    return stage_key("sensitivity", {"model": model, "calibration": calib}, settings)


def regions_key(model: str | Path, calib: str | Path, constraints: Any, sens_key: str) -> str:
    """The DRQ regions' key: the sensitivity they were calibrated with and the DRQ settings."""
    return stage_key("regions", {"model": model, "calibration": calib},
                     {"sensitivity": sens_key, "drq": constraints.drq.model_dump()})


def reusable(cache: StageCache, model: str | Path, calib: str | Path, constraints: Any,
             holdout_fraction: float) -> list[str]:
    """The stages a job with these inputs would take from ``cache`` (what a re-plan reuses)."""
    key = sensitivity_key(model, calib, constraints, holdout_fraction)
    out = ["sensitivity"] if cache.has("sensitivity", key) else []
    if out and constraints.uses_drq and cache.has(
            "regions", regions_key(model, calib, constraints, key)):
        out.append("regions")
    return out


def evaluation_key(model: str | Path, calib: str | Path, plan: Any, split: Any) -> str:
    """A plan's evaluation key: the two files, the calibration split and what each row runs
    (bits, DRQ, grouping); Omega and costs do not change what the quantized model computes."""
    rows = [[r["name"], r["w_bits"], r["a_bits"], r.get("drq"), r.get("group_size")]
            for r in plan["layers"]]
    return stage_key("evaluations", {"model": model, "calibration": calib},
                     {"rows": rows, "split": split})
