"""Checking an export: ``onnx.checker`` (full check) and ONNX Runtime against fake-quant.

The fake-quant module (``quantize.load``) is the reference: ONNX Runtime runs the exported
graph on the held-out samples and must agree on the top-1 class for at least
``VerifyConfig.min_top1_agreement`` of them, with outputs within ``max_step_p99`` steps of the
output grid for 99 % of the values. The two differ only by rounding: ONNX requantises in float
(round half to even) where the checkpoint uses dyadic multipliers (round half up), and a
one-code difference before a layer moves its outputs by a few steps of a fine output grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch

from solver.errors import BadConstraintsError, ExportMismatchError, MissingDependencyError

from ..checkpoint import Checkpoint
from ..data import CalibrationSet
from ..fakequant import build_fake_quant

EXTRA = "onnx"


@dataclass(frozen=True)
class VerifyConfig:
    """Pass criteria of an export (each with its reason)."""

    version: int = 1
    # the bar: ORT picks the fake-quant module's class on >= 99 % of the samples
    min_top1_agreement: float = 0.99
    # 99th percentile of |ORT - fake-quant| in steps of the model's output grid: the two
    # round differently only at ties (float half-to-even vs dyadic half-up), 1 step where
    # they do (README, "Deploying a plan"); 4 leaves room for ties upstream
    max_step_p99: float = 4.0
    batch_size: int = 64
    threads: int = 1  # deterministic and light on a shared machine

    def __post_init__(self) -> None:
        if self.version != 1:
            raise BadConstraintsError(f"unsupported verify config version {self.version}")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise BadConstraintsError("min_top1_agreement must be in [0, 1]")
        if not self.max_step_p99 > 0 or self.batch_size < 1 or self.threads < 1:
            raise BadConstraintsError("max_step_p99, batch_size and threads must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def onnxruntime():  # noqa: ANN201 - the module
    """The ``onnxruntime`` module, or MissingDependencyError naming the extra to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError(
            f"ONNX Runtime is not installed; install bitplan's [{EXTRA}] extra "
            f"(pip install -e \".[{EXTRA}]\")", detail={"extra": EXTRA},
        ) from exc
    return ort


def session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True):  # noqa: ANN201
    """An ONNX Runtime CPU session for ``model`` (``threads`` intra-op threads)."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def run(sess, args: tuple[torch.Tensor, ...]) -> np.ndarray:  # noqa: ANN001
    """The first output of ``sess`` for positional tensor inputs."""
    names = [i.name for i in sess.get_inputs()]
    feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}
    return sess.run(None, feed)[0]


def check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with the full check (shape inference); ExportMismatchError if not."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportMismatchError(f"the exported ONNX model is not valid: {exc}") from exc


def _output_step(ckpt: Checkpoint) -> float | None:
    """Step of the model output's grid when the output is a quantized point's value."""
    steps = [g.scale for p, g in ckpt.points() if p.final]
    return steps[0] if len(steps) == 1 else None


def verify(
    program: torch.export.ExportedProgram,
    ckpt: Checkpoint,
    model: onnx.ModelProto,
    holdout: CalibrationSet,
    cfg: VerifyConfig | None = None,
    fixed_batch: int | None = None,
) -> dict[str, Any]:
    """Check ``model`` and run it in ONNX Runtime against the fake-quant module on
    ``holdout``; returns the ``onnx`` section of report.json.

    Raises ExportMismatchError (``detail`` = the measured numbers) when the criteria of
    ``cfg`` fail, MissingDependencyError without ONNX Runtime.
    """
    cfg = cfg or VerifyConfig()
    check(model)
    sess = session(model, cfg.threads)
    fake = build_fake_quant(program, ckpt)
    step = _output_step(ckpt)
    n = agree = 0
    diffs: list[np.ndarray] = []
    ref_scale = 0.0
    with torch.no_grad():
        for batch in holdout.batches(fixed_batch or cfg.batch_size, fixed=fixed_batch is not None):
            if batch.kwargs:
                raise ExportMismatchError("programs with keyword inputs are not verified")
            ref = fake(*batch.args).detach().to(torch.float64).numpy()[: batch.size]
            got = run(sess, batch.args).astype(np.float64)[: batch.size]
            n += batch.size
            agree += int((ref.reshape(batch.size, -1).argmax(1)
                          == got.reshape(batch.size, -1).argmax(1)).sum())
            diffs.append(np.abs(ref - got).reshape(-1))
            ref_scale = max(ref_scale, float(np.abs(ref).max()) if ref.size else 0.0)
    diff = np.concatenate(diffs) if diffs else np.zeros(1)
    unit = step if step is not None else max(ref_scale, 1e-12) / 32767.0
    steps = diff / unit
    result = {
        "format": "bitplan-onnx/1",
        "opset": int(model.opset_import[0].version),
        "samples": n,
        "top1_agreement": agree / n if n else None,
        "output_step": unit,
        "output_grid": "model" if step is not None else "float output: 1/32767 of its range",
        "max_abs_diff": float(diff.max()),
        "max_steps": float(steps.max()),
        "p99_steps": float(np.percentile(steps, 99)),
        "mean_steps": float(steps.mean()),
        "model_bytes": model.ByteSize(),
        "criteria": cfg.to_dict(),
    }
    ok = (n > 0 and result["top1_agreement"] >= cfg.min_top1_agreement
          and result["p99_steps"] <= cfg.max_step_p99 and math.isfinite(result["max_steps"]))
    result["passed"] = bool(ok)
    if not ok:
        raise ExportMismatchError(
            f"ONNX Runtime disagrees with the fake-quant module: top-1 agreement "
            f"{result['top1_agreement']}, 99th percentile {result['p99_steps']:.1f} output steps "
            f"(need >= {cfg.min_top1_agreement} and <= {cfg.max_step_p99})", detail=result,
        )
    return result
