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


class Eta:
    """Time left in a stage from its fraction, at the rate since the fraction first advanced:
    ``(now - t1) x (1 - f) / (f - f1)``, ``(t1, f1)`` the first advance, once the stage has
    reported ``min_updates`` advances and ``min_fraction`` of its work (before that, None).
    The stage's set-up before its first advance (a model copy, the memory probe) is not work
    the fraction counts, so it is left out of the rate. Sensitivity's fraction is of a
    projected total (``sensitivity.convergence``): while the projection moves, so does this
    estimate."""

    def __init__(self, min_updates: int = 3, min_fraction: float = 0.02) -> None:
        self.min_updates = min_updates
        self.min_fraction = min_fraction
        self._stage: str | None = None
        self._t1 = 0.0
        self._f1 = 0.0
        self._updates = 0
        self._last = -1.0

    def __call__(self, stage: str, fraction: float) -> float | None:
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._updates, self._last = stage, 0, fraction
            return None
        if fraction > self._last:
            self._updates += 1
            self._last = fraction
            if self._updates == 1:
                self._t1, self._f1 = now, fraction
        if (self._updates < self.min_updates or fraction < self.min_fraction or fraction >= 1
                or fraction <= self._f1):
            return None
        return (now - self._t1) * (1.0 - fraction) / (fraction - self._f1)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class TerminalProgress:
    """Draws ``stage [#####-----] 42% ~3m10s left`` on stderr when it is a terminal; else one
    line when a stage starts and one every ``every_s`` seconds while it advances."""

    def __init__(self, stream: TextIO | None = None, width: int = 30,
                 every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.every_s = every_s
        self.tty = self.stream.isatty()
        self.eta = Eta()
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        left = self.eta(stage, fraction)
        tail = "" if left is None else f" ~{format_seconds(left)} left"
        now = time.monotonic()
        if not self.tty:
            if stage != self._stage:
                self.stream.write(f"{stage}...\n")
                self._stage, self._last = stage, now
            elif now - self._last >= self.every_s and fraction < 1.0:
                self.stream.write(f"{stage} {fraction * 100:5.1f}%{tail}\n")
                self._last = now
            else:
                return
            self.stream.flush()
            return
        if stage == self._stage and fraction < 1.0 and now - self._last < 0.1:
            return
        if self._stage is not None and stage != self._stage:
            self.stream.write("\n")
        self._stage, self._last = stage, now
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{stage:<12} [{bar}] {fraction * 100:5.1f}%{tail:<16}")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()
