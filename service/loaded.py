"""The model a job loaded, kept by its worker for the next job on the same files: a re-plan
runs on its parent's uploads, so it need not load, check and describe the model again.

``LoadedModels`` holds at most one intake (``sensitivity.intake.Intake``). A job takes it out
(``take``: no two jobs share one; a different model's is dropped before the job loads its
own, so a worker never holds two) and puts its own back only when it finished (``keep``), for
files up to ``KEEP_BYTES``. Each ``JobQueue`` has its own; ``run_pipeline(loaded=None)``, as
``bitplan plan`` calls it, keeps nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from .cache import file_digest

KEEP_BYTES = 256 << 20  # model + calibration file bytes an idle worker keeps loaded at most


def load_key(model_path: str | Path, calib_path: str | Path, config: Any) -> str | None:
    """The key of a loaded model: the two files' digests and the intake config (a dataclass);
    None for files too large to keep."""
    if Path(model_path).stat().st_size + Path(calib_path).stat().st_size > KEEP_BYTES:
        return None
    doc = {"model": file_digest(model_path), "calibration": file_digest(calib_path),
           "config": dataclasses.asdict(config)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class LoadedModels:
    """At most one loaded model, by ``load_key``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._intake: Any = None

    def take(self, key: str | None) -> Any:
        """The kept intake for ``key`` (the caller owns it now), else None; whatever else was
        kept is dropped."""
        with self._lock:
            kept, intake = self._key, self._intake
            self._key = self._intake = None
        return intake if key is not None and kept == key else None

    def keep(self, key: str | None, intake: Any) -> None:
        """Keep ``intake`` (as the job loaded it) for the next job with ``key``."""
        if key is None:
            return
        with self._lock:
            self._key, self._intake = key, intake
