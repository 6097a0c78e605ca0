"""Model intake: load a ``torch.export`` program and a ``.safetensors`` calibration file, check
that they fit each other, and describe every quantizable layer.

Nothing here unpickles user bytes directly: the model goes through ``torch.export.load`` only
(after checking it is a pt2 zip archive), the calibration through ``safetensors`` only, and the
safetensors header is validated (sizes, names, dtypes) before any tensor is read.

Training-mode exports: a program exported from a model in ``train()`` mode computes BatchNorm
from batch statistics, bumps ``num_batches_tracked`` and applies dropout. bitplan rewrites such a
graph to eval semantics (BN uses its running statistics, dropout is the identity, the counter
update is dropped); this is what the user's model computes after ``model.eval()``. Any other
in-place update of a buffer is refused, since a sensitivity measured on a graph that changes
itself while it runs would be meaningless.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import struct
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from quantize.data import CalibrationSet
from quantize.graph import GraphLayer, find_layers
from solver.errors import BadCalibrationError, BadModelError, TooLargeError

log = logging.getLogger(__name__)
aten = torch.ops.aten

HOW_TO_EXPORT = (
    "Upload a torch.export program: `ep = torch.export.export(model.eval(), (example_input,))` "
    "then `torch.export.save(ep, 'model.pt2')`."
)
HOW_TO_CALIBRATE = (
    "Write the calibration file with safetensors: "
    "`safetensors.torch.save_file({'inputs': x, 'labels': y}, 'calib.safetensors')` where x is "
    "[N, ...] float (N >= 2 samples) and y (optional) is int64 [N]; a model with several inputs "
    "uses one 'input.<argument name>' tensor per forward argument instead of 'inputs'."
)

_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}
# torch.export.load keeps the graph being deserialised in a module-level global and asserts
# that it is unset on entry: two loads at once in one process (two requests' intakes, or a
# request and a worker thread) fail with "_CURRENT_DESERIALIZER is already set" (seen in the
# end-to-end test with two jobs submitted together). Loads take this lock.
_EXPORT_LOAD_LOCK = threading.Lock()
_INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

_SDPA_OPS = {
    "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
}
# Kept undecomposed when SDPA forces a decomposition, so find_layers still sees the layers.
_KEEP_OPS = (aten.linear.default, aten.conv1d.default, aten.conv2d.default)
_DROPOUT_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
}
_BN_TRAIN_INDEX = {aten.batch_norm.default: 5, aten._native_batch_norm_legit.default: 5}


# ----------------------------------------------------------------------------- model


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` file written by ``torch.export.save``.

    Raises:
        BadModelError: the file is missing, not a zip archive, truncated, not a pt2 archive
            (e.g. a pickle or a ``torch.save`` checkpoint), or holds no ExportedProgram.
    """
    path = Path(path)
    if not path.is_file():
        raise BadModelError(f"model file {path.name!r} does not exist. {HOW_TO_EXPORT}")
    if not zipfile.is_zipfile(path):
        raise BadModelError(
            f"{path.name!r} is not a .pt2 archive (a .pt2 is a zip file; pickles and raw "
            f"state dicts are not accepted). {HOW_TO_EXPORT}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BadModelError(
            f"{path.name!r} is a damaged or truncated zip archive ({exc}). {HOW_TO_EXPORT}"
        ) from None
    if bad is not None:
        raise BadModelError(f"{path.name!r} is corrupted (entry {bad!r}). {HOW_TO_EXPORT}")
    # A pt2 archive has <root>/archive_format (or, in the legacy layout, a top-level
    # "version"). A torch.save checkpoint is also a zip but has neither: refuse it here, so its
    # pickle is never handed to anything.
    if not any(n.endswith("/archive_format") or n == "version" for n in names):
        raise BadModelError(
            f"{path.name!r} is a zip archive but not a torch.export program (is it a "
            f"torch.save checkpoint?). {HOW_TO_EXPORT}"
        )
    export_log = logging.getLogger("torch.export")
    with _EXPORT_LOAD_LOCK:
        level = export_log.level
        export_log.setLevel(logging.ERROR)  # torch logs a traceback before raising; ours is enough
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch raises many types for a damaged archive
            raise BadModelError(
                f"could not load {path.name!r} as a torch.export program "
                f"({type(exc).__name__}: {str(exc)[:200]}). {HOW_TO_EXPORT}"
            ) from None
        finally:
            export_log.setLevel(level)
    if not isinstance(program, torch.export.ExportedProgram):
        raise BadModelError(f"{path.name!r} does not hold an ExportedProgram. {HOW_TO_EXPORT}")
    return program


def _uses_sdpa(program: torch.export.ExportedProgram) -> bool:
    return any(
        n.op == "call_function" and str(getattr(n.target, "_overloadpacket", n.target)) in _SDPA_OPS
        for n in program.graph.nodes
    )


def _decompose_sdpa(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Lower SDPA (no double backward on CPU) to core ops; linear/conv stay whole."""
    table = torch.export.default_decompositions()
    for op in _KEEP_OPS:
        table.pop(op, None)
    try:
        return program.run_decompositions(table)
    except Exception as exc:
        raise BadModelError(
            f"the model uses scaled_dot_product_attention and could not be decomposed for "
            f"Hessian products ({type(exc).__name__}: {str(exc)[:200]})."
        ) from None


def _is_buffer_ref(node: Any, buffers: set[str]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return str(node.target) in buffers
    return node.op == "placeholder" and str(node.target) in buffers


def to_eval_semantics(program: torch.export.ExportedProgram) -> list[str]:
    """Rewrite a training-mode export in place to what ``model.eval()`` computes.

    Returns the list of rewrites made (empty for an eval-mode export).

    Raises:
        BadModelError: the graph mutates a buffer in a way that is not a BN counter update.
    """
    gm = program.graph_module
    sig = program.graph_signature
    # Buffers appear as placeholders (lifted graph) named by the signature.
    buffer_nodes = set(sig.inputs_to_buffers) | set(sig.buffers)
    counters = {
        n for n, fqn in sig.inputs_to_buffers.items() if fqn.endswith("num_batches_tracked")
    }
    done: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _BN_TRAIN_INDEX:
            i = _BN_TRAIN_INDEX[node.target]
            if len(node.args) > i and node.args[i]:
                node.args = node.args[:i] + (False,) + node.args[i + 1 :]
                done.append(f"{node.name}: batch norm uses running statistics")
        elif node.target in _DROPOUT_OPS and len(node.args) > 2 and node.args[2]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            done.append(f"{node.name}: dropout removed")
        elif node.target == aten.add_.Tensor and isinstance(node.args[0], fx.Node) and (
            node.args[0].name in counters
        ) and not node.users:
            gm.graph.erase_node(node)
            done.append(f"{node.name}: num_batches_tracked update removed")
    mutating = [
        n.name for n in gm.graph.nodes
        if n.op == "call_function" and str(getattr(n.target, "__name__", "")).split(".")[0]
        .endswith("_") and n.args and _is_buffer_ref(n.args[0], buffer_nodes)
    ]
    if sig.buffers_to_mutate or mutating:
        raise BadModelError(
            "the model updates its own buffers while it runs (it was exported in training mode "
            f"with state bitplan cannot turn off: {sorted(sig.buffers_to_mutate) or mutating}). "
            + HOW_TO_EXPORT
        )
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done


# ----------------------------------------------------------------------------- calibration


def _read_header(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadCalibrationError(f"{path.name!r} is too short to be .safetensors. "
                                      + HOW_TO_CALIBRATE)
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise BadCalibrationError(
                f"{path.name!r} is not a .safetensors file (bad header length). "
                + HOW_TO_CALIBRATE
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadCalibrationError(
                f"{path.name!r} is not a .safetensors file (unreadable header). "
                + HOW_TO_CALIBRATE
            ) from None
    if not isinstance(header, dict):
        raise BadCalibrationError(f"{path.name!r} has a malformed header. " + HOW_TO_CALIBRATE)
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], [int(d) for d in entry["shape"]]
            start, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise BadCalibrationError(
                f"tensor {name!r}: malformed header entry. " + HOW_TO_CALIBRATE
            ) from None
        nbytes = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if dtype not in _DTYPE_BYTES or end - start != nbytes or not 0 <= start <= end <= data_size:
            raise BadCalibrationError(
                f"tensor {name!r}: header does not match the data (dtype {dtype}, shape {shape}); "
                f"the file is truncated or corrupted. " + HOW_TO_CALIBRATE
            )
    return header


def load_calibration(path: str | Path, max_bytes: int | None = None) -> CalibrationSet:
    """Read and validate a calibration ``.safetensors`` file.

    Tensors: ``inputs`` (one positional model input, [N, ...]) or ``input.<name>`` (one per
    forward argument), optional ``labels`` (integer [N], returned as int64). Inputs must be
    floating point and finite; all tensors share N >= 2. ``max_bytes`` bounds the tensor data,
    checked from the header before anything is loaded.

    Raises:
        BadCalibrationError: naming the tensor and what to fix.
        TooLargeError: the tensors exceed ``max_bytes``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BadCalibrationError(f"calibration file {path.name!r} does not exist. "
                                  + HOW_TO_CALIBRATE)
    header = _read_header(path)
    total = sum(int(e["data_offsets"][1]) - int(e["data_offsets"][0]) for e in header.values())
    if max_bytes is not None and total > max_bytes:
        raise TooLargeError(
            f"calibration tensors take {total} bytes, more than the limit of {max_bytes}; "
            "send fewer samples (a few hundred are enough)."
        )
    names = set(header)
    keyword = sorted(n for n in names if n.startswith("input."))
    unknown = sorted(names - {"inputs", "labels"} - set(keyword))
    if unknown:
        raise BadCalibrationError(
            f"unexpected tensor(s) {unknown}: only 'inputs', 'input.<name>' and 'labels' are "
            "read. " + HOW_TO_CALIBRATE
        )
    if "inputs" in names and keyword:
        raise BadCalibrationError(
            "the file has both 'inputs' and 'input.<name>' tensors; use one or the other. "
            + HOW_TO_CALIBRATE
        )
    if "inputs" not in names and not keyword:
        raise BadCalibrationError("the file has no 'inputs' tensor. " + HOW_TO_CALIBRATE)
    for name in ["inputs", *keyword]:
        if name in header and header[name]["dtype"] not in _FLOAT_DTYPES:
            raise BadCalibrationError(
                f"tensor {name!r} has dtype {header[name]['dtype']}; model inputs must be "
                "floating point (float32). " + HOW_TO_CALIBRATE
            )
        if name in header and len(header[name]["shape"]) < 1:
            raise BadCalibrationError(
                f"tensor {name!r} is a scalar; it needs a leading sample dimension [N, ...]."
            )
    if "labels" in header:
        lab = header["labels"]
        if lab["dtype"] not in _INT_DTYPES or len(lab["shape"]) != 1:
            raise BadCalibrationError(
                f"tensor 'labels' has dtype {lab['dtype']} and shape {lab['shape']}; it must be "
                "int64 class indices of shape [N]. " + HOW_TO_CALIBRATE
            )
    counts = {name: int(e["shape"][0]) for name, e in header.items()}
    if len(set(counts.values())) != 1:
        raise BadCalibrationError(
            f"tensors disagree on the number of samples {counts}; every tensor's first "
            "dimension is the sample index and must be the same N."
        )
    n = next(iter(counts.values()))
    if n < 2:
        raise BadCalibrationError(
            f"the calibration set has {n} sample(s); send at least 2 (a few hundred is typical)."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadCalibrationError(
            f"could not read {path.name!r} ({str(exc)[:200]}). " + HOW_TO_CALIBRATE
        ) from None
    for name, t in tensors.items():
        if name != "labels" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise BadCalibrationError(
                f"tensor {name!r} has {bad} NaN/Inf value(s); remove or replace those samples."
            )
    labels = tensors.get("labels")
    if labels is not None:
        labels = labels.to(torch.int64)
        if int(labels.min()) < 0:
            raise BadCalibrationError("tensor 'labels' has negative values; use class indices.")
    if "inputs" in tensors:
        return CalibrationSet((tensors["inputs"],), {}, labels)
    return CalibrationSet((), {k[len("input."):]: tensors[k] for k in keyword}, labels)


# ----------------------------------------------------------------------------- intake


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


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer. Shapes are per sample (batch dimension removed); ``macs`` are
    multiply-accumulates per sample."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    params: int
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    out_channels: int
    bn: str | None
    graph: GraphLayer = field(repr=False, compare=False)

    @property
    def input_numel(self) -> int:
        return math.prod(self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape),
            "groups": self.groups, "params": self.params, "macs": self.macs,
            "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
            "out_channels": self.out_channels, "bn": self.bn,
        }


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


def _input_names(program: torch.export.ExportedProgram) -> tuple[list[str], list[str]]:
    """(positional argument names, keyword argument names) of the exported forward."""
    user = list(program.graph_signature.user_inputs)
    if program.example_inputs is None:  # no record of how it was called: all positional
        return user, []
    args, kwargs = program.example_inputs
    return user[: len(args)], list(kwargs) or user[len(args):]


def _input_meta(program: torch.export.ExportedProgram) -> dict[str, Any]:
    return {
        n.name: n.meta.get("val") for n in program.graph.nodes
        if n.op == "placeholder" and n.name in set(program.graph_signature.user_inputs)
    }


def _bind_inputs(program: torch.export.ExportedProgram, gm: fx.GraphModule,
                 calib: CalibrationSet) -> tuple[CalibrationSet, int | None]:
    """Map calibration tensors onto the program's inputs; check per-sample shapes and dtypes;
    find a fixed batch size. Returns the re-bound set and the batch size (None if dynamic)."""
    pos, kw = _input_names(program)
    try:
        sig_names = list(inspect.signature(gm.forward).parameters)
    except (TypeError, ValueError):
        sig_names = pos + kw
    # Placeholder names follow forward argument names; use the signature where they agree.
    if len(sig_names) == len(pos) + len(kw):
        pos, kw = sig_names[: len(pos)], sig_names[len(pos):]
    wanted = pos + kw
    if calib.args:
        if len(wanted) != 1:
            raise BadCalibrationError(
                f"the model takes {len(wanted)} inputs {wanted}; provide one tensor per input "
                "named 'input.<name>' instead of 'inputs'."
            )
        given = {wanted[0]: calib.args[0]}
    else:
        given = dict(calib.kwargs)
        missing, extra = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
        if missing or extra:
            raise BadCalibrationError(
                f"calibration inputs {sorted(given)} do not match the model's forward arguments "
                f"{wanted}: missing {['input.' + m for m in missing]}, unexpected "
                f"{['input.' + e for e in extra]}."
            )
    meta = _input_meta(program)
    user = list(program.graph_signature.user_inputs)
    batch_sizes: set[int] = set()
    for name, placeholder in zip(wanted, user, strict=False):
        val, t = meta.get(placeholder), given[name]
        tensor_name = "inputs" if calib.args else f"input.{name}"
        if not isinstance(val, torch.Tensor):
            raise BadModelError(f"model input {name!r} is not a tensor; bitplan needs tensors.")
        # Symbolic (dynamic) dims accept any size; static ones must match.
        fits = t.dim() == val.dim() and all(
            not isinstance(d, int) or d == s
            for d, s in zip(val.shape[1:], t.shape[1:], strict=True)
        )
        if not fits:
            want = ["N", *(d if isinstance(d, int) else "*" for d in val.shape[1:])]
            raise BadCalibrationError(
                f"tensor {tensor_name!r} has shape {list(t.shape)}; the model expects "
                f"{want} (N samples first)."
            )
        if isinstance(val.shape[0], int):
            batch_sizes.add(int(val.shape[0]))
        if val.dtype.is_floating_point and t.dtype != val.dtype:
            given[name] = t.to(val.dtype)
    batch = None
    if batch_sizes:
        if len(batch_sizes) > 1:
            raise BadModelError(f"model inputs have different fixed batch sizes {batch_sizes}.")
        batch = batch_sizes.pop()
    args = tuple(given[n] for n in pos)
    kwargs = {n: given[n] for n in kw}
    return CalibrationSet(args, kwargs, calib.labels), batch


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and records the input and output shapes of the layer nodes."""

    def __init__(self, gm: fx.GraphModule, nodes: set[str]) -> None:
        super().__init__(gm)
        self.nodes = nodes
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.nodes:
            x = self.env[n.args[0]]
            self.shapes[n.name] = (tuple(x.shape), tuple(out.shape))
        return out


def _per_sample(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    if shape and shape[0] == batch:
        return shape[1:]
    # Batch merged into the first dim (e.g. [B*T, D] before a linear): report [T, D].
    if shape and shape[0] % batch == 0:
        return (shape[0] // batch,) + shape[1:]
    return shape


def _layer_table(gm: fx.GraphModule, layers: list[GraphLayer], calib: CalibrationSet,
                 batch_size: int | None) -> tuple[list[LayerInfo], tuple[int, ...], torch.Tensor]:
    size = batch_size or min(len(calib), 2)
    batch = next(calib.batches(size, fixed=batch_size is not None))
    rec = _ShapeRecorder(gm, {layer.node for layer in layers})
    with torch.no_grad():
        try:
            out = rec.run(*batch.args)
        except Exception as exc:
            raise BadModelError(
                f"the model failed on the calibration data ({type(exc).__name__}: "
                f"{str(exc)[:300]})."
            ) from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    infos = []
    for layer in layers:
        xs, ys = rec.shapes[layer.node]
        x_ps, y_ps = _per_sample(xs, size), _per_sample(ys, size)
        w = layer.weight_shape
        out_numel = math.prod(ys) // size
        if layer.kind == "linear":
            macs = out_numel * w[1]
        else:
            macs = out_numel * w[1] * math.prod(w[2:])  # w[1] is already Cin / groups
        infos.append(LayerInfo(
            name=layer.name, kind=layer.kind, weight_shape=w, groups=layer.groups,
            params=math.prod(w), macs=int(macs), input_shape=x_ps, output_shape=y_ps,
            out_channels=w[0], bn=layer.bn, graph=layer,
        ))
    return infos, tuple(out.shape[1:]), out


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
    if _uses_sdpa(program):
        program = _decompose_sdpa(program)
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
    calib, batch_size = _bind_inputs(program, gm, calib)
    infos, out_shape, out = _layer_table(gm, layers, _kw_positional(calib, gm), batch_size)
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


def _kw_positional(calib: CalibrationSet, gm: fx.GraphModule) -> CalibrationSet:
    """The Interpreter binds placeholders positionally: order keyword inputs as the graph's."""
    if not calib.kwargs:
        return calib
    order = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(calib.args) + [calib.kwargs[str(t)] for t in order[len(calib.args):]
                               if str(t) in calib.kwargs]
    return CalibrationSet(tuple(args), {}, calib.labels)
