"""Model intake: load a ``torch.export`` program and a ``.safetensors`` calibration file, check
that they fit each other, and describe every quantizable layer.

The jobs live in their own files: ``program`` (loading the pt2 safely, train-to-eval rewrites,
attention decomposition), ``calibration`` (the safetensors header parser and loader),
``inputs`` (binding tensors to the forward arguments) and ``layers`` (the layer table). This
module runs them in order and holds the result; ``load_program``, ``load_calibration`` and
``LayerInfo`` are importable from here too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from quantize.data import CalibrationSet
from quantize.graph import find_layers
from solver.errors import BadCalibrationError, BadModelError

from .calibration import HOW_TO_CALIBRATE, load_calibration
from .inputs import bind_inputs, positional
from .layers import LayerInfo, layer_table
from .program import HOW_TO_EXPORT, decompose_sdpa, load_program, to_eval_semantics, uses_sdpa

__all__ = [
    "HOW_TO_CALIBRATE", "HOW_TO_EXPORT", "Intake", "IntakeConfig", "LayerInfo", "intake",
    "load_calibration", "load_program", "to_eval_semantics",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeConfig:
    """``holdout_fraction`` of the calibration samples is kept for evaluation (split by
    ``seed``); ``max_calib_bytes`` bounds the calibration tensors."""

    holdout_fraction: float = 0.2
    seed: int = 0
    max_calib_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.max_calib_bytes is not None and self.max_calib_bytes <= 0:
            raise ValueError("max_calib_bytes must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntakeConfig:
        return cls(**d)


@dataclass
class Intake:
    """A validated model + calibration pair, ready for the sensitivity stages."""

    program: torch.export.ExportedProgram
    module: fx.GraphModule
    batch_size: int | None
    layers: list[LayerInfo]
    train: CalibrationSet
    holdout: CalibrationSet
    loss_kind: str  # "cross_entropy" | "kl" | "mse"
    output_shape: tuple[int, ...] = ()  # per sample
    rewrites: list[str] = field(default_factory=list)
    decomposed: bool = False
    name: str = "model"

    def summary(self) -> dict[str, Any]:
        """The ``model`` block of sensitivity / plan JSON."""
        return {
            "name": self.name,
            "layers": len(self.layers),
            "params": sum(layer.params for layer in self.layers),
            "macs": sum(layer.macs for layer in self.layers),
            "batch_size": self.batch_size,
            "loss": self.loss_kind,
            "output_shape": list(self.output_shape),
            "calibration": {"train": len(self.train), "holdout": len(self.holdout)},
            "rewrites": list(self.rewrites),
            "decomposed_attention": self.decomposed,
        }

    def chunk_size(self, requested: int | None) -> int:
        """Samples per forward pass: the fixed export batch, else ``requested`` (or all)."""
        if self.batch_size is not None:
            return self.batch_size
        return min(requested or len(self.train), len(self.train))


def intake(
    model_path: str | Path, calib_path: str | Path, cfg: IntakeConfig | None = None
) -> Intake:
    """Load, validate and describe a model + calibration pair.

    Raises:
        BadModelError: unloadable program, no quantizable layer, a graph that mutates state.
        BadCalibrationError / TooLargeError: see :func:`load_calibration`, plus shape, label and
            input-name mismatches with the program.
    """
    cfg = cfg or IntakeConfig()
    program = load_program(model_path)
    calib = load_calibration(calib_path, cfg.max_calib_bytes)
    rewrites = to_eval_semantics(program)
    decomposed = False
    if uses_sdpa(program):
        program = decompose_sdpa(program)
        decomposed = True
    try:
        gm = program.module()
    except Exception as exc:
        raise BadModelError(f"could not build a module from the program ({exc}). "
                            + HOW_TO_EXPORT) from None
    layers = find_layers(gm)
    if not layers:
        raise BadModelError(
            "the model has no quantizable layer (no Conv1d, Conv2d or Linear weight was found "
            "in the exported graph); bitplan quantizes conv and linear weights."
        )
    calib, batch_size = bind_inputs(program, gm, calib)
    infos, out_shape, out = layer_table(gm, layers, positional(calib, gm), batch_size)
    if calib.labels is not None:
        if out.dim() != 2:
            raise BadCalibrationError(
                f"'labels' were given but the model's output has shape {list(out.shape)}, not "
                "[N, classes]; drop the labels to use the label-free loss."
            )
        classes = int(out.shape[1])
        if int(calib.labels.max()) >= classes:
            raise BadCalibrationError(
                f"tensor 'labels' has class index {int(calib.labels.max())} but the model has "
                f"{classes} outputs; labels must be in [0, {classes - 1}]."
            )
        loss_kind = "cross_entropy"
    else:
        loss_kind = "kl" if out.dim() == 2 else "mse"
    train, holdout = calib.split(cfg.holdout_fraction, cfg.seed)
    if rewrites:
        log.info("training-mode export rewritten to eval semantics: %s", rewrites)
    return Intake(
        program=program, module=gm, batch_size=batch_size, layers=infos, train=train,
        holdout=holdout, loss_kind=loss_kind, output_shape=out_shape, rewrites=rewrites,
        decomposed=decomposed, name=Path(model_path).name,
    )
