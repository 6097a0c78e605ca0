"""Calibration data as plain tensors, and running a (possibly fixed-batch) program over it.

A ``CalibrationSet`` holds the model's inputs for N samples: positional ``args`` (each
``[N, ...]``), keyword ``kwargs`` and optional ``labels``. Loading and validating the user's
``.safetensors`` file is the intake's job (``sensitivity.intake``); everything downstream works
on this type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


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
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0])

    def subset(self, index: torch.Tensor) -> CalibrationSet:
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
        write into a batch's tensors."""
        n = len(self)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            size = stop - start
            if fixed and size < batch_size:
                idx = torch.arange(start, stop)
                part = self.subset(torch.cat([idx, idx[:1].repeat(batch_size - size)]))
            else:
                part = self.rows(start, stop)
            yield Batch(part.args, part.kwargs, part.labels, size)


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
