"""Measured DRQ Omega: each DRQ mode's loss increase when only that layer's input runs it.

``measured_drq_omegas(intake, regions)`` runs the calibration (train) samples through the model
once in FP32 and then once per (conv layer, DRQ mode) of ``regions``
(``sensitivity.regions.RegionResult``): with that layer's input replaced by
``quantize.drq.drq_fake_quantize`` at the mode's region size and threshold on the layer's INT8
grid (``LayerRegions.scale`` / ``signed``, the grid the plan row carries), i.e. the regions the
runtime's mask marks sensitive at INT8 and the rest at INT4 over the same range. Omega is twice
the increase of the mean calibration loss, clamped at zero, on the scale of
``sensitivity.measured`` (``omega ~ 2 * delta L``); it is the activation part of a DRQ option,
as ``measured_omegas``' ``omega_a`` is of a uniform one (the weight part, mixed by the MAC
fraction, stays the solver's). ``with_measured_omegas`` returns the region result with these
values in place of the trace-weighted error estimates.

``loss`` is ``sensitivity.measured``'s: ``"job"`` (the intake's loss) or ``"label_free"`` (KL to
the FP32 model's softmax for a classifier); a DRQ mode's Omega sits beside uniform options'
only when both were measured in the same loss.

Cost: ``1 + sum over conv layers of their modes`` forward passes (one more for the FP32 targets
of a self-distillation loss), no backward pass. Like every Omega it ignores interactions
between layers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from quantize.data import run_batch
from quantize.drq import drq_fake_quantize
from quantize.graph import insert_input_modules
from sensitivity.measured import batch_loss, measured_loss_kind
from sensitivity.regions import DRQMode, LayerRegions, RegionResult

ProgressFn = Callable[[str, float], None]


class _DRQProbe(nn.Module):
    """Runs its input through one DRQ mode's fake quantizer when ``mode`` is set."""

    def __init__(self, layer: LayerRegions) -> None:
        super().__init__()
        self.layer = layer
        self.mode: DRQMode | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mode
        if m is None:
            return x
        return drq_fake_quantize(x, self.layer.scale, self.layer.signed, m.region, m.threshold,
                                 m.high_bits, m.low_bits)


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[index,return-value]


@torch.no_grad()
def measured_drq_omegas(
    intake: object,
    regions: RegionResult,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    stage: str = "regions",
    loss: str = "job",
) -> dict[str, dict[str, float]]:
    """Per conv layer of ``regions``: ``{mode tag: measured Omega}`` on the train samples of
    ``intake`` (an ``Intake``: module, layers, train, loss_kind, batch_size), in the job's
    loss or (``loss="label_free"``) KL to FP32 for a classifier."""
    kind = measured_loss_kind(intake.loss_kind, loss)  # type: ignore[attr-defined]
    device = torch.device(device)
    graphs = {layer.name: layer.graph for layer in intake.layers}  # type: ignore[attr-defined]
    todo = [r for r in regions.layers if r.name in graphs and r.modes]
    gm = copy.deepcopy(intake.module).to(device)  # type: ignore[attr-defined]
    probes = {r.name: _DRQProbe(r) for r in todo}
    insert_input_modules(gm, [graphs[r.name] for r in todo], probes, "drq_measured_probe")
    fixed = intake.batch_size is not None  # type: ignore[attr-defined]
    chunk = intake.batch_size or batch_size  # type: ignore[attr-defined]
    # a list on the device; for a streamed train set, each chunk read when a pass needs it
    batches = intake.train.chunks(chunk, fixed, device)  # type: ignore[attr-defined]
    n = len(intake.train)  # type: ignore[attr-defined]
    targets: list[torch.Tensor | None] = [None] * len(batches)
    if kind != "cross_entropy":
        targets = [_first(run_batch(gm, b)).detach() for b in batches]

    def mean_loss() -> float:
        total = 0.0
        for b, t in zip(batches, targets, strict=True):
            total += float(batch_loss(_first(run_batch(gm, b)), b, t, kind))
        return total / n

    base = mean_loss()
    out: dict[str, dict[str, float]] = {}
    for i, r in enumerate(todo):
        probe = probes[r.name]
        out[r.name] = {}
        for mode in r.modes:
            probe.mode = mode
            out[r.name][mode.tag] = max(2.0 * (mean_loss() - base), 0.0)
        probe.mode = None
        if progress is not None:
            progress(stage, (i + 1) / len(todo))
    return out


def with_measured_omegas(regions: RegionResult,
                         omegas: dict[str, dict[str, float]]) -> RegionResult:
    """``regions`` with each mode's ``omega`` replaced by its measured value (layers or modes
    missing from ``omegas`` keep theirs) and ``omega_is_raw`` cleared."""
    layers = []
    for r in regions.layers:
        got = omegas.get(r.name, {})
        modes = [dataclasses.replace(m, omega=got[m.tag]) if m.tag in got else m
                 for m in r.modes]
        layers.append(dataclasses.replace(r, modes=modes))
    return dataclasses.replace(regions, layers=layers, omega_is_raw=False)
