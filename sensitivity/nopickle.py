"""A guard that keeps ``torch.export.load`` from unpickling the user's bytes.

``torch.export.load`` is not pickle-free: a pt2 archive may carry pickled payloads (a legacy
``weights/<model>.pt``, weights or constants flagged ``use_pickle``, "opaque" and TorchScript
custom objects), and when the restricted ``torch.load(weights_only=True)`` refuses one, torch
retries it with ``weights_only=False``, i.e. full pickle, which runs any code the archive names.
Inside :func:`refuse_pickles`, in the calling thread only, ``pickle.load(s)``,
``pickle.Unpickler``, ``torch._C._pickle_load_obj`` and ``torch.load(weights_only=False)`` raise
:class:`PickleRefused`; ``torch.load`` runs with ``weights_only=True`` (torch's allow-list
unpickler of tensors and plain containers, which is what a ``torch.export.save`` archive of
plain tensors uses for its sample inputs). Other threads are not affected (Huey pickles its
task messages while a request loads a model).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_state = threading.local()
_patch_lock = threading.Lock()  # one patch / restore at a time; nesting counts per thread
_depth = [0]


class PickleRefused(pickle.UnpicklingError):
    """The archive asked for a full unpickle of its bytes."""


def _guarded() -> bool:
    return getattr(_state, "active", False)


def _refuse(what: str) -> PickleRefused:
    return PickleRefused(
        f"refused to unpickle data from the uploaded archive ({what}); a torch.export.save "
        "archive of a plain model holds none"
    )


def _wrap_function(name: str, original: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _guarded():
            raise _refuse(name)
        return original(*args, **kwargs)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    return guarded


def _wrap_unpickler(original: type) -> type:
    class GuardedUnpickler(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if _guarded():
                raise _refuse("pickle.Unpickler")
            super().__init__(*args, **kwargs)

    return GuardedUnpickler


def _wrap_torch_load(original: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _guarded():
            if kwargs.get("weights_only") is False:
                raise _refuse("torch.load(weights_only=False)")
            kwargs["weights_only"] = True
        return original(*args, **kwargs)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    return guarded


@contextmanager
def refuse_pickles() -> Iterator[None]:
    """Within the block, this thread cannot run a full unpickle (see the module docstring)."""
    with _patch_lock:
        if _depth[0] == 0:
            saved = {
                (pickle, "loads"): pickle.loads,
                (pickle, "load"): pickle.load,
                (pickle, "Unpickler"): pickle.Unpickler,
                (torch._C, "_pickle_load_obj"): torch._C._pickle_load_obj,
                (torch, "load"): torch.load,
            }
            _refuse_all(saved)
        _depth[0] += 1
    was_active = _guarded()
    _state.active = True
    try:
        yield
    finally:
        _state.active = was_active
        with _patch_lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                for (module, name), value in _RESTORE[0].items():
                    setattr(module, name, value)


_RESTORE: list[dict] = [{}]


def _refuse_all(saved: dict) -> None:
    _RESTORE[0] = dict(saved)
    pickle.loads = _wrap_function("pickle.loads", saved[(pickle, "loads")])
    pickle.load = _wrap_function("pickle.load", saved[(pickle, "load")])
    pickle.Unpickler = _wrap_unpickler(saved[(pickle, "Unpickler")])
    torch._C._pickle_load_obj = _wrap_function(
        "torch._C._pickle_load_obj", saved[(torch._C, "_pickle_load_obj")]
    )
    torch.load = _wrap_torch_load(saved[(torch, "load")])
