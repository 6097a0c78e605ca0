"""Checking an export: ``onnx.checker`` (full check) and ONNX Runtime against fake-quant.

The fake-quant module (``quantize.load``) is the reference: ONNX Runtime runs the exported
graph on the held-out samples and must agree on the top-1 class for at least
``VerifyConfig.min_top1_agreement`` of them (leaving out near-ties: samples whose reference top
two outputs are within twice the allowed output deviation, where a flip is within the output
bar; a random-weight ResNet-18 on random images has most of its samples there), with 99 % of
the output values within ``max_step_p99`` steps of an 8-bit grid over the output's range (the
output grid itself when it has 8 bits or fewer; for the default 16-bit logits grid one such
step is 256 of its steps).

The two differ only by rounding: ONNX requantises in float (round half to even) where the
checkpoint uses dyadic integer multipliers (round half up), so values that float arithmetic
puts on the other side of a rounding boundary (about 1 in 10^6 at a first layer) differ by one
code, and a deep network carries those differences on: on ResNet-18 at 224x224 (random
weights, all INT8) half of the last block's outputs differ by a code or more and the 99th
percentile of the logits is one 8-bit step, while every top-1 agrees. Steps of the fine
16-bit grid would call that 256 steps; they are also reported (``*_steps``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch

from solver.errors import (
    BadConstraintsError,
    ExportMismatchError,
    MissingDependencyError,
    UnsupportedExportError,
)

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
    # 99th percentile of |ORT - fake-quant| in steps of an 8-bit grid over the output range:
    # measured 0..1 on the digits models and ResNet-18 (module docstring); 4 leaves room
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


# ONNX Runtime 1.31 on a signed 8-bit Q/DQ pair it propagates across Transpose / Slice (a
# decoder's rotary halves): the propagated QuantizeLinear carries output_dtype INT8 and the
# s8 -> u8 rewrite then gives it a UINT8 zero point, and the session fails to load. A graph
# that hits it is loaded again with that one rewrite off (the rest of the optimiser stays on).
S8_TO_U8_FAULT = "does not match y_zero_point type"
S8_TO_U8 = "QDQS8ToU8Transformer"


def session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True,
            profile_prefix: str | None = None):  # noqa: ANN201
    """An ONNX Runtime CPU session for ``model`` (``threads`` intra-op threads; with
    ``profile_prefix``, ONNX Runtime's per-node profiler on)."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    data = model.SerializeToString()
    try:
        try:
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind classes
            if S8_TO_U8_FAULT not in str(exc):
                raise
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=[S8_TO_U8])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind classes
        # A graph the checker accepts but this ONNX Runtime has no kernel for (after its
        # fusions): not a wrong export, an inexpressible one for this runtime.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedExportError(
            f"ONNX Runtime {ort.__version__} cannot run the exported graph: {first}",
            detail={"runtime": f"onnxruntime {ort.__version__}"},
        ) from None


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


def _output_grid(ckpt: Checkpoint):  # noqa: ANN202 - Grid | None
    """The model output's grid when the output is a quantized point's value."""
    grids = [g for p, g in ckpt.points() if p.final]
    return grids[0] if len(grids) == 1 else None


def top_margin(flat: np.ndarray) -> np.ndarray:
    """Per row of ``flat`` [N, K]: its largest value minus its second largest (inf for K=1)."""
    if flat.shape[1] < 2:
        return np.full(flat.shape[0], np.inf)
    top2 = np.partition(flat, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


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
    grid = _output_grid(ckpt)
    n = 0
    agrees: list[np.ndarray] = []
    margins: list[np.ndarray] = []
    diffs: list[np.ndarray] = []
    ref_scale = 0.0
    with torch.no_grad():
        for batch in holdout.batches(fixed_batch or cfg.batch_size, fixed=fixed_batch is not None):
            if batch.kwargs:
                raise ExportMismatchError("programs with keyword inputs are not verified")
            ref = fake(*batch.args).detach().to(torch.float64).numpy()[: batch.size]
            got = run(sess, batch.args).astype(np.float64)[: batch.size]
            n += batch.size
            flat = ref.reshape(batch.size, -1)
            agrees.append(flat.argmax(1) == got.reshape(batch.size, -1).argmax(1))
            margins.append(top_margin(flat))
            diffs.append(np.abs(ref - got).reshape(-1))
            ref_scale = max(ref_scale, float(np.abs(ref).max()) if ref.size else 0.0)
    diff = np.concatenate(diffs) if diffs else np.zeros(1)
    if grid is not None:
        unit, unit8 = grid.scale, grid.scale * 2.0 ** max(0, grid.bits - 8)
    else:  # a float output: grids over its observed range
        unit, unit8 = max(ref_scale, 1e-12) / 32767.0, max(ref_scale, 1e-12) / 127.0
    steps, steps8 = diff / unit, diff / unit8
    agree = np.concatenate(agrees) if agrees else np.zeros(0, bool)
    # a sample whose reference top two are closer than two outputs each moved by the allowed
    # deviation is a tie: its top-1 may flip within the output bar, so it is not counted
    decisive = (np.concatenate(margins) if margins else np.zeros(0)) > \
        2 * cfg.max_step_p99 * unit8
    result = {
        "format": "bitplan-onnx/1",
        "opset": int(model.opset_import[0].version),
        "samples": n,
        "top1_agreement": float(agree.mean()) if n else None,
        "tied_samples": int(n - decisive.sum()),
        "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
        "output_step": unit,
        "output_grid": "model" if grid is not None else "float output: 1/32767 of its range",
        "step8": unit8,
        "max_steps8": float(steps8.max()),
        "p99_steps8": float(np.percentile(steps8, 99)),
        "max_abs_diff": float(diff.max()),
        "max_steps": float(steps.max()),
        "p99_steps": float(np.percentile(steps, 99)),
        "mean_steps": float(steps.mean()),
        "model_bytes": model.ByteSize(),
        "criteria": cfg.to_dict(),
    }
    ok = (n > 0 and result["top1_agreement_decisive"] >= cfg.min_top1_agreement
          and result["p99_steps8"] <= cfg.max_step_p99 and math.isfinite(result["max_steps"]))
    result["passed"] = bool(ok)
    if not ok:
        raise ExportMismatchError(
            f"ONNX Runtime disagrees with the fake-quant module: top-1 agreement "
            f"{result['top1_agreement_decisive']:.3f} on the {n - result['tied_samples']} "
            f"samples without a near-tie, 99th percentile {result['p99_steps8']:.2f} steps of an "
            f"8-bit output grid (need >= {cfg.min_top1_agreement} and <= {cfg.max_step_p99})",
            detail=result,
        )
    return result
