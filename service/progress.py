"""Progress reporting shared by the CLI (a terminal bar) and the worker (the job record).

Stages call ``progress(stage, fraction)`` with fraction in [0, 1] for that stage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressFn = Callable[[str, float], None]


def no_progress(stage: str, fraction: float) -> None:
    """A progress callback that ignores everything."""


class TerminalProgress:
    """Draws ``stage [#####-----] 42%`` on stderr when it is a terminal, else one line a stage."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        if not self.tty:
            if stage != self._stage:
                self.stream.write(f"{stage}...\n")
                self.stream.flush()
                self._stage = stage
            return
        now = time.monotonic()
        if stage == self._stage and fraction < 1.0 and now - self._last < 0.1:
            return
        if self._stage is not None and stage != self._stage:
            self.stream.write("\n")
        self._stage, self._last = stage, now
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{stage:<12} [{bar}] {fraction * 100:5.1f}%")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()
