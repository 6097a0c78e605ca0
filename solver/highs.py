"""highspy, imported once and quietly.

The first ``highspy.Highs()`` of a process prints HiGHS's banner to the C-level stdout from
its constructor, before any option (``output_flag``) can be set; ``msg=False`` in PuLP cannot
stop it either. On stdout it would corrupt output that is piped on (and the issue asks for a
quiet solver), so the first instance is built here with file descriptor 1 pointed at
/dev/null for the ~1 ms it takes. Later instances print nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from types import ModuleType

_LOCK = threading.Lock()
_LOADED: ModuleType | None = None
_MISSING = False


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):  # no C library to reach (e.g. Windows): best effort
        import ctypes

        ctypes.CDLL(None).fflush(None)


def load_highspy() -> ModuleType | None:
    """The highspy module with its banner already spent, or None when it is not installed."""
    global _LOADED, _MISSING
    if _LOADED is not None or _MISSING:
        return _LOADED
    with _LOCK:
        if _LOADED is not None or _MISSING:
            return _LOADED
        try:
            import highspy
        except ImportError:
            _MISSING = True
            return None
        with contextlib.suppress(Exception):  # a stream without a descriptor: let it print
            sys.stdout.flush()
        saved = None
        try:
            fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else 1
            saved = os.dup(fd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no redirect: let it print
            if saved is not None:
                os.close(saved)
            saved = None
        try:
            highspy.Highs()
        finally:
            if saved is not None:
                _flush_c_stdio()
                os.dup2(saved, fd)
                os.close(saved)
        _LOADED = highspy
        return highspy
