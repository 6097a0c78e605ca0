"""Calibration data as plain tensors, and running a (possibly fixed-batch) program over it.

A ``CalibrationSet`` holds the model's inputs for N samples: positional ``args`` (each
``[N, ...]``), keyword ``kwargs`` and optional ``labels``. Loading and validating the user's
``.safetensors`` file is the intake's job (``sensitivity.intake``); everything downstream works
on this type.

An input may also be a ``FileRows``: its rows stay in the calibration file and are read when a
batch needs them (``load_calibration(stream=True)``), so the data is not resident while a job
runs. ``rows`` / ``subset`` / ``split`` of such an input only select rows; ``batches`` and
``chunks`` read one chunk at a time; ``resident()`` reads everything.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from solver.errors import BadCalibrationError


class OpenFile:
    """An open calibration file shared by the ``FileRows`` of its tensors: positional reads
    under a lock; the file's size and modification time at opening must still hold at every
    read (the data was validated then). A copy (``copy.deepcopy``) shares it; pickling
    reopens the path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - lives with the object
        self.stamp = self._stamp()
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[int, int]:
        st = os.fstat(self._file.fileno())
        return st.st_size, st.st_mtime_ns

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the file's bytes from ``offset``."""
        with self._lock:
            if self._stamp() != self.stamp:
                raise BadCalibrationError(
                    f"the calibration file {self.path.name!r} changed while the job was using "
                    "it; submit it again.")
            self._file.seek(offset)
            done = 0
            while done < len(view):
                got = self._file.readinto(view[done:])
                if not got:
                    raise BadCalibrationError(
                        f"the calibration file {self.path.name!r} ends inside its data.")
                done += got

    def __deepcopy__(self, memo: dict[int, Any]) -> OpenFile:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "stamp": self.stamp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])
        if self.stamp != tuple(state["stamp"]):
            raise BadCalibrationError(f"the calibration file {self.path.name!r} changed.")

    def __del__(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()


class FileRows:
    """Rows of one tensor of a ``.safetensors`` file, read on demand: row i is the file's row
    ``index[i]`` of the tensor stored at byte ``offset`` (little-endian ``stored`` dtype,
    rows of ``sample_shape``), returned as ``dtype``. Answers the tensor questions the
    binding asks (``shape``, ``dtype``, ``dim()``, ...) without reading; ``a[start:stop]``
    and ``a[index]`` select rows (no read); ``read()`` reads the selected rows, one file read
    per run of consecutive rows."""

    def __init__(self, source: OpenFile, offset: int, sample_shape: Sequence[int],
                 stored: torch.dtype, index: torch.Tensor, dtype: torch.dtype | None = None
                 ) -> None:
        self.source = source
        self.offset = int(offset)
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.stored = stored
        self.index = index.to(torch.int64)
        self._dtype = dtype or stored

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), *self.sample_shape))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def dim(self) -> int:
        return 1 + len(self.sample_shape)

    def is_floating_point(self) -> bool:
        return self._dtype.is_floating_point

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self._dtype).element_size()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: slice | torch.Tensor) -> FileRows:
        if not isinstance(key, (slice, torch.Tensor)):
            raise TypeError("FileRows selects rows with a slice or an index tensor; read() "
                            "them for anything else")
        return FileRows(self.source, self.offset, self.sample_shape, self.stored,
                        self.index[key], self._dtype)

    def to(self, dtype: torch.dtype) -> FileRows:
        """The same rows read as ``dtype`` (a float cast, as ``Tensor.to``)."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError("FileRows.to takes a dtype; read() the rows to move them")
        return FileRows(self.source, self.offset, self.sample_shape, self.stored,
                        self.index, dtype)

    def read(self) -> torch.Tensor:
        """The selected rows as one new tensor."""
        out = torch.empty(self.shape, dtype=self.stored)
        row = out[0].numel() * out.element_size() if len(out) else 0
        if row:
            idx = self.index.tolist()
            start = 0
            for i in range(1, len(idx) + 1):
                if i == len(idx) or idx[i] != idx[i - 1] + 1:  # end of a run of rows
                    part = out[start:i].view(-1).view(torch.uint8)
                    self.source.read_into(self.offset + idx[start] * row,
                                          memoryview(part.numpy()))
                    start = i
        return out if self._dtype == self.stored else out.to(self._dtype)

    def __repr__(self) -> str:
        return (f"FileRows({self.source.path.name!r}, shape={list(self.shape)}, "
                f"dtype={self._dtype})")


Column = torch.Tensor | FileRows


def _read(a: Column) -> torch.Tensor:
    return a.read() if isinstance(a, FileRows) else a


@dataclass(frozen=True)
class Batch:
    """One chunk of samples. ``size`` is the number of real samples; when the program needs a
    fixed batch size the chunk is padded (by repeating its first sample) beyond ``size``."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    size: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            tuple(a.to(device) for a in self.args),
            {k: v.to(device) for k, v in self.kwargs.items()},
            None if self.labels is None else self.labels.to(device),
            self.size,
        )


@dataclass(frozen=True)
class CalibrationSet:
    """N samples: ``args`` / ``kwargs`` are tensors or ``FileRows`` (``[N, ...]``); ``labels``
    a tensor."""

    args: tuple[Column, ...]
    kwargs: dict[str, Column] = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0])

    @property
    def streamed(self) -> bool:
        """Whether some input is read from the file on demand (``FileRows``)."""
        return any(isinstance(a, FileRows) for a in (*self.args, *self.kwargs.values()))

    def resident(self) -> CalibrationSet:
        """This set with every input read into memory (itself when nothing is streamed)."""
        if not self.streamed:
            return self
        return CalibrationSet(tuple(_read(a) for a in self.args),
                              {k: _read(v) for k, v in self.kwargs.items()}, self.labels)

    def subset(self, index: torch.Tensor) -> CalibrationSet:
        """The samples ``index`` (a copy; for a ``FileRows`` input, a selection of rows)."""
        return CalibrationSet(
            tuple(a[index] for a in self.args),
            {k: v[index] for k, v in self.kwargs.items()},
            None if self.labels is None else self.labels[index],
        )

    def rows(self, start: int, stop: int) -> CalibrationSet:
        """Samples ``start:stop`` as views of this set's tensors (no copy)."""
        return CalibrationSet(
            tuple(a[start:stop] for a in self.args),
            {k: v[start:stop] for k, v in self.kwargs.items()},
            None if self.labels is None else self.labels[start:stop],
        )

    def split(
        self, holdout_fraction: float, seed: int = 0
    ) -> tuple[CalibrationSet, CalibrationSet]:
        """Deterministic (train, holdout) split (:func:`split_order`); both parts keep at
        least one sample. Copies the samples; a set read in ``split_order``'s order splits
        into views with ``rows``."""
        order, n_train = split_order(len(self), holdout_fraction, seed)
        return self.subset(order[:n_train]), self.subset(order[n_train:])

    def batches(self, batch_size: int, fixed: bool = False) -> Iterator[Batch]:
        """Chunks of ``batch_size`` samples; with ``fixed`` the last chunk is padded. A chunk
        that needs no padding is a view of the set's tensors (no copy): consumers must not
        write into a batch's tensors. A streamed input is read chunk by chunk."""
        for start in range(0, len(self), batch_size):
            yield self._batch(start, batch_size, fixed)

    def chunks(self, batch_size: int, fixed: bool = False,
               device: torch.device | None = None) -> Sequence[Batch]:
        """``batches`` on ``device`` as a sequence for passes that run over them many times:
        a list (device copies) for an in-memory set; for a streamed one, each chunk read
        when it is indexed (the data is not held between passes)."""
        if self.streamed:
            return Chunks(self, batch_size, fixed, device)
        return [b if device is None else b.to(device) for b in self.batches(batch_size, fixed)]

    def _batch(self, start: int, batch_size: int, fixed: bool) -> Batch:
        stop = min(start + batch_size, len(self))
        size = stop - start
        if fixed and size < batch_size:
            idx = torch.arange(start, stop)
            part = self.subset(torch.cat([idx, idx[:1].repeat(batch_size - size)]))
        else:
            part = self.rows(start, stop)
        return Batch(tuple(_read(a) for a in part.args),
                     {k: _read(v) for k, v in part.kwargs.items()}, part.labels, size)


class Chunks(Sequence[Batch]):
    """A streamed set's chunks (``CalibrationSet.chunks``), each read when indexed; the last
    one read is kept, so a pass that asks for a chunk twice in a row reads it once."""

    def __init__(self, data: CalibrationSet, batch_size: int, fixed: bool,
                 device: torch.device | None) -> None:
        self.data, self.batch_size, self.fixed, self.device = data, batch_size, fixed, device
        self._last: tuple[int, Batch] | None = None

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError("Chunks are indexed by int")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        if self._last is None or self._last[0] != i:
            b = self.data._batch(i * self.batch_size, self.batch_size, self.fixed)
            self._last = (i, b if self.device is None else b.to(self.device))
        return self._last[1]

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))


def split_order(n: int, holdout_fraction: float, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(order, n_train): the train samples (ascending) then the held-out ones (ascending), a
    permutation of ``range(n)``; ``round(n * holdout_fraction)`` held out (seeded), at least
    one in each part."""
    if n < 2:
        raise ValueError("need at least two calibration samples to hold some out")
    n_hold = min(max(1, round(n * holdout_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.cat([perm[n_hold:].sort().values, perm[:n_hold].sort().values]), n - n_hold


def run_batch(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The module's output for the real samples of ``batch`` (padding dropped)."""
    out = module(*batch.args, **batch.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[: batch.size]
