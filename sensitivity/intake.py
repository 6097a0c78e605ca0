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

from quantize.data import CalibrationSet, split_order
from quantize.graph import find_layers
from solver.errors import BadCalibrationError, BadModelError

from .calibration import HOW_TO_CALIBRATE, count_samples, load_calibration
from .inputs import bind_inputs, check_id_ranges, positional
from .layers import LayerInfo, float_params, layer_table
from .program import HOW_TO_EXPORT, decompose_sdpa, load_program, to_eval_semantics, uses_sdpa

__all__ = [
    "HOW_TO_CALIBRATE", "HOW_TO_EXPORT", "Intake", "IntakeConfig", "LayerInfo", "intake",
    "load_calibration", "load_program", "to_eval_semantics",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeConfig:
    """``holdout_fraction`` of the calibration samples is kept for evaluation (split by
    ``seed``); ``max_calib_bytes`` bounds the calibration tensors; ``stream``: the float
    inputs stay in the calibration file and every stage reads its chunks from it
    (``load_calibration(stream=True)``: the job does not hold the data; the file must stay
    in place while the intake is used)."""

    holdout_fraction: float = 0.2
    seed: int = 0
    max_calib_bytes: int | None = None
    stream: bool = False
    loss: str = "auto"  # "auto" | one of sensitivity.hessian.LOSS_KINDS (see _loss_kind)

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.loss not in ("auto", "cross_entropy", "kl", "mse"):
            raise ValueError(f"loss must be auto, cross_entropy, kl or mse, got {self.loss!r}")
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
    loss_kind: str  # "cross_entropy" | "kl" | "mse" (over the last dim; see _loss_kind)
    output_shape: tuple[int, ...] = ()  # per sample
    rewrites: list[str] = field(default_factory=list)
    decomposed: bool = False
    name: str = "model"
    # a language model's token-id input ([N, T, V] logits over its vocabulary): the keyword
    # name in ``train.kwargs``, or the index in ``train.args``; None for other models
    token_input: str | int | None = None
    float_params: list[dict[str, Any]] = field(default_factory=list)  # see layers.float_params

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
            "token_input": self.token_input,
            "float_params": list(self.float_params),
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
    # read in split order: train then held-out samples, so the split is two views of the
    # one copy of the data (no copy of the file beside it, none per part)
    order, n_train = split_order(count_samples(calib_path, cfg.max_calib_bytes),
                                 cfg.holdout_fraction, cfg.seed)
    calib = load_calibration(calib_path, cfg.max_calib_bytes, order=order, stream=cfg.stream)
    rewrites = to_eval_semantics(program)
    gm = _module(program)
    # inputs are checked before the (slow) attention decomposition, which keeps the signature
    single = bool(calib.args)  # the file's one 'inputs' tensor, not 'input.<name>' tensors
    calib, batch_size = bind_inputs(program, gm, calib)
    id_rows = check_id_ranges(gm, calib, single)
    decomposed = False
    if uses_sdpa(program):
        program = decompose_sdpa(program)
        decomposed = True
        gm = _module(program)
    layers = find_layers(gm)
    if not layers:
        raise BadModelError(
            "the model has no quantizable layer (no Conv1d, Conv2d or Linear weight was found "
            "in the exported graph); bitplan quantizes conv and linear weights."
        )
    infos, out_shape, out = layer_table(gm, layers, positional(calib, gm), batch_size)
    loss_kind, token_input = _loss_kind(out, calib.labels, id_rows, cfg.loss)
    if token_input is not None and token_input not in calib.kwargs:
        order = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
        token_input = order.index(token_input)  # positional: its index in the args
    train, holdout = calib.rows(0, n_train), calib.rows(n_train, len(calib))
    if rewrites:
        log.info("training-mode export rewritten to eval semantics: %s", rewrites)
    return Intake(
        program=program, module=gm, batch_size=batch_size, layers=infos, train=train,
        holdout=holdout, loss_kind=loss_kind, output_shape=out_shape, rewrites=rewrites,
        decomposed=decomposed, name=Path(model_path).name, token_input=token_input,
        float_params=float_params(gm, layers),
    )


def _module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    try:
        return program.module()
    except Exception as exc:
        raise BadModelError(f"could not build a module from the program ({exc}). "
                            + HOW_TO_EXPORT) from None


def check_loss_labels(loss: str, has_labels: bool) -> None:
    """BadCalibrationError when the asked ``loss`` needs labels the calibration file lacks."""
    if loss == "cross_entropy" and not has_labels:
        raise BadCalibrationError(
            "loss 'cross_entropy' needs labels: add a 'labels' tensor to the calibration file, "
            "or ask for loss 'kl' or 'mse' (or 'auto')")


def _loss_kind(out: torch.Tensor, labels: torch.Tensor | None,
               id_rows: dict[str, int], loss: str = "auto") -> tuple[str, str | int | None]:
    """(loss kind, the token-id input scored by next-token perplexity or None).

    ``loss`` "auto": labels [N] with [N, classes] outputs, or [N, T] with [N, T, classes]
    logits: cross-entropy. Without labels: KL to the FP32 softmax over the last dimension (mean
    over samples, or over tokens for [N, T, V] logits, recognised by an integer input indexing
    an embedding of V rows), else MSE to the FP32 outputs. Another ``loss`` is taken as asked
    (cross-entropy checks the labels as above; the token input is still recognised for KL).
    """
    check_loss_labels(loss, labels is not None)
    if loss == "mse":
        return "mse", None
    if labels is not None and loss in ("auto", "cross_entropy"):
        want = list(out.shape[:-1])
        if out.dim() not in (2, 3) or list(labels.shape[1:]) != want[1:]:
            raise BadCalibrationError(
                f"'labels' of shape {list(labels.shape)} do not fit the model's output "
                f"{list(out.shape)}: give [N] class indices for [N, classes] outputs or [N, T] "
                "token targets for [N, T, classes] logits, or drop the labels to use the "
                "label-free loss."
            )
        classes = int(out.shape[-1])
        if int(labels.max()) >= classes:
            raise BadCalibrationError(
                f"tensor 'labels' has class index {int(labels.max())} but the model has "
                f"{classes} outputs; labels must be in [0, {classes - 1}]."
            )
        return "cross_entropy", None
    if out.dim() == 2:
        return "kl", None
    if out.dim() == 3:
        vocab = int(out.shape[-1])
        token = next((name for name, rows in id_rows.items() if rows == vocab), None)
        if token is not None:
            return "kl", token
    return ("kl", None) if loss == "kl" else ("mse", None)
