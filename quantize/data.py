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

    def split(
        self, holdout_fraction: float, seed: int = 0
    ) -> tuple[CalibrationSet, CalibrationSet]:
        """Deterministic (train, holdout) split; both parts keep at least one sample."""
        n = len(self)
        if n < 2:
            raise ValueError("need at least two calibration samples to hold some out")
        n_hold = min(max(1, round(n * holdout_fraction)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_hold:].sort().values), self.subset(perm[:n_hold].sort().values)

    def batches(self, batch_size: int, fixed: bool = False) -> Iterator[Batch]:
        """Chunks of ``batch_size`` samples; with ``fixed`` the last chunk is padded."""
        n = len(self)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            size = len(idx)
            if fixed and size < batch_size:
                idx = torch.cat([idx, idx[:1].repeat(batch_size - size)])
            part = self.subset(idx)
            yield Batch(part.args, part.kwargs, part.labels, size)


def run_batch(module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The module's output for the real samples of ``batch`` (padding dropped)."""
    out = module(*batch.args, **batch.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[: batch.size]
