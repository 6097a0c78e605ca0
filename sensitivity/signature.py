"""A ``.pt2`` archive's forward signature read from its JSON, and the submission checks run on it.

``torch.export.save`` writes the program as JSON (``<name>/models/<name>.json``: the graph,
its signature, every tensor's dtype and sizes) beside the weights. :func:`read_signature` reads
only that JSON: the forward arguments (names, dtypes, per-sample sizes, a fixed batch), the
embedding tables an input indexes (rows), the one output's sizes, and whether any conv or
linear op is present. Nothing is unpickled and no graph is built, so it takes milliseconds
where ``torch.export.load`` takes a good part of a second; the service checks an upload with it
before the 202 and leaves the full load (``intake``) to the worker.

:func:`check_inputs` checks a calibration set against a signature as ``intake`` does
(``inputs.bind_inputs``, ``inputs.check_id_ranges``, the label checks of ``intake._loss_kind``),
raising the same typed errors with the same messages; what needs the program itself (a graph
that cannot be loaded or run, buffers it mutates) is found by the worker's intake.

An archive whose JSON is not in the layout read here raises :class:`SignatureUnreadable`: the
caller falls back to loading the program.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantize.data import CalibrationSet
from solver.errors import BadCalibrationError, BadModelError

from .inputs import _INDEX_PASS, _fit_dtype, match_inputs
from .program import HOW_TO_EXPORT

# ops find_layers turns into layers (quantize.graph): a program with none has no layer
_LAYER_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "addmm", "mm", "matmul"}
_MAX_JSON_BYTES = 512 * 1024 * 1024  # far above any real program's graph JSON


class SignatureUnreadable(Exception):
    """The archive's JSON is missing or not in the layout this reader knows."""


@dataclass(frozen=True)
class InputSpec:
    """One forward argument: its name, dtype, sizes (None: dynamic) and the embedding table
    ``(FQN, rows)`` its values index, if any (the smallest, as ``inputs.embedding_inputs``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]
    table: tuple[str, int] | None = None


@dataclass(frozen=True)
class Signature:
    inputs: tuple[InputSpec, ...]
    output_shape: tuple[int | None, ...] | None  # the one tensor output's; None: not one tensor
    has_layer_ops: bool


# serialized ScalarType name -> dtype, for what a model input may be (float, integer, bool);
# torch._export.serde.serialize holds the full table but imports torch._dynamo (seconds)
_DTYPE_NAMES = {
    "BYTE": torch.uint8, "CHAR": torch.int8, "SHORT": torch.int16, "INT": torch.int32,
    "LONG": torch.int64, "HALF": torch.float16, "FLOAT": torch.float32,
    "DOUBLE": torch.float64, "BOOL": torch.bool, "BFLOAT16": torch.bfloat16,
    "UINT16": torch.uint16, "UINT32": torch.uint32, "UINT64": torch.uint64,
}


def _dtypes() -> dict[int, torch.dtype]:
    from torch._export.serde.schema import ScalarType

    return {int(e.value): _DTYPE_NAMES[e.name] for e in ScalarType if e.name in _DTYPE_NAMES}


def _schema_major() -> int:
    from torch._export.serde.schema import SCHEMA_VERSION

    return int(SCHEMA_VERSION[0])


def _program_json(path: Path) -> dict[str, Any]:
    """The program's JSON, after ``load_program``'s archive checks (every entry's CRC, the pt2
    layout), which raise BadModelError with its messages."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            bad = zf.testzip()
            if bad is not None:
                raise BadModelError(f"{path.name!r} is corrupted (entry {bad!r}). {HOW_TO_EXPORT}")
            if not any(i.filename.endswith("/archive_format") or i.filename == "version"
                       for i in infos):
                raise BadModelError(
                    f"{path.name!r} is a zip archive but not a torch.export program (is it a "
                    f"torch.save checkpoint?). {HOW_TO_EXPORT}"
                )
            found = [i for i in infos if i.filename.count("/") == 2
                     and i.filename.split("/")[1] == "models" and i.filename.endswith(".json")]
            if len(found) != 1 or found[0].file_size > _MAX_JSON_BYTES:
                raise SignatureUnreadable(f"{len(found)} program JSON entries")
            return json.loads(zf.read(found[0]))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; a CRC error is BadZipFile
        raise SignatureUnreadable(f"{type(exc).__name__}: {exc}") from None


def _sizes(meta: dict[str, Any]) -> tuple[int | None, ...]:
    return tuple(int(s["as_int"]) if "as_int" in s else None for s in meta["sizes"])


def _opname(target: str) -> str:
    parts = target.split(".")  # torch.ops.aten.<op>.<overload>
    return parts[3] if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"] else ""


def _tensor_name(arg: dict[str, Any]) -> str | None:
    return arg.get("as_tensor", {}).get("name") if isinstance(arg, dict) else None


def read_signature(path: str | Path) -> Signature:
    """The signature of the program in the ``.pt2`` at ``path``. Raises SignatureUnreadable,
    and BadModelError for an input that is not a tensor (as ``bind_inputs`` would)."""
    doc = _program_json(Path(path))
    try:
        return _parse(doc)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise SignatureUnreadable(f"{type(exc).__name__}: {exc}") from None


def _parse(doc: dict[str, Any]) -> Signature:
    if int(doc["schema_version"]["major"]) != _schema_major():
        raise SignatureUnreadable(f"schema version {doc['schema_version']}")
    gm = doc["graph_module"]
    graph, specs = gm["graph"], gm["signature"]
    values = graph["tensor_values"]
    dtypes = _dtypes()
    tables: dict[str, str] = {}  # graph tensor -> parameter / buffer / constant FQN
    user: list[dict[str, Any]] = []
    for spec in specs["input_specs"]:
        kind, body = next(iter(spec.items()))
        if kind == "user_input":
            user.append(body["arg"])
        else:
            fqn = next((v for k, v in body.items() if k.endswith("_name")), None)
            name = body["arg"].get("name")
            if fqn is not None and name is not None:
                tables[name] = fqn
    call = next(e for e in gm["module_call_graph"] if e["fqn"] == "")
    arg_names = call["signature"].get("forward_arg_names") or []
    names = [_tensor_name(a) for a in user]
    if len(arg_names) != len(names):  # placeholder names follow the forward's arguments
        arg_names = [n or f"arg{i}" for i, n in enumerate(names)]
    producers: dict[str, dict[str, Any]] = {}
    found: dict[str, tuple[str, int]] = {}
    layer_ops = False
    for node in graph["nodes"]:
        op = _opname(node["target"])
        layer_ops = layer_ops or op in _LAYER_OPS
        for out in node["outputs"]:
            if (t := _tensor_name(out)) is not None:
                producers[t] = node
        if op != "embedding":
            continue
        weight, idx = (_tensor_name(i["arg"]) for i in node["inputs"][:2])
        while idx in producers and _opname(producers[idx]["target"]) in _INDEX_PASS:
            idx = _tensor_name(producers[idx]["inputs"][0]["arg"])
        if weight not in tables or idx not in names:
            continue
        rows = int(values[weight]["sizes"][0]["as_int"])
        if idx not in found or rows < found[idx][1]:
            found[idx] = (tables[weight], rows)
    inputs = []
    for arg_name, graph_name in zip(arg_names, names, strict=True):
        if graph_name is None:
            raise BadModelError(f"model input {arg_name!r} is not a tensor; bitplan needs tensors.")
        meta = values[graph_name]
        dtype = dtypes.get(int(meta["dtype"]))
        if dtype is None:  # complex, float8, ...: the full load says what is wrong
            raise SignatureUnreadable(f"input {arg_name!r} of dtype code {meta['dtype']}")
        inputs.append(InputSpec(arg_name, dtype, _sizes(meta),
                                found.get(graph_name)))
    outs = [s["user_output"]["arg"] for s in specs["output_specs"] if "user_output" in s]
    out_name = _tensor_name(outs[0]) if len(outs) == 1 else None
    out_shape = _sizes(values[out_name]) if out_name is not None else None
    return Signature(tuple(inputs), out_shape, layer_ops)


def check_inputs(sig: Signature, calib: CalibrationSet) -> None:
    """Check ``calib`` (as ``load_calibration`` returns it) against ``sig`` as the intake would:
    tensor names, per-sample shapes, dtypes (integer and bool exactly), one fixed batch size,
    embedding ids in range, labels that fit the output; and that the program has a conv or
    linear op. Raises BadCalibrationError / BadModelError with the intake's messages."""
    if not sig.has_layer_ops:
        raise BadModelError(
            "the model has no quantizable layer (no Conv1d, Conv2d or Linear weight was found "
            "in the exported graph); bitplan quantizes conv and linear weights."
        )
    wanted = [spec.name for spec in sig.inputs]
    given = match_inputs(wanted, calib)
    batch_sizes: set[int] = set()
    for spec in sig.inputs:
        t = given[spec.name]
        tensor_name = "inputs" if calib.args else f"input.{spec.name}"
        fits = t.dim() == len(spec.shape) and all(
            d is None or d == s for d, s in zip(spec.shape[1:], t.shape[1:], strict=True))
        if not fits:
            want = ["N", *(d if d is not None else "*" for d in spec.shape[1:])]
            raise BadCalibrationError(
                f"tensor {tensor_name!r} has shape {list(t.shape)}; the model expects "
                f"{want} (N samples first)."
            )
        if spec.shape and spec.shape[0] is not None:
            batch_sizes.add(spec.shape[0])
        t = _fit_dtype(tensor_name, t, spec.dtype)
        if spec.table is not None and not t.is_floating_point() and t.dtype != torch.bool:
            table, rows = spec.table
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= rows:
                raise BadCalibrationError(
                    f"tensor {tensor_name!r} holds ids in [{lo}, {hi}] but it indexes the "
                    f"embedding {table!r} of {rows} rows: ids must lie in [0, {rows - 1}]."
                )
    if len(batch_sizes) > 1:
        raise BadModelError(f"model inputs have different fixed batch sizes {batch_sizes}.")
    if calib.labels is not None and sig.output_shape is not None:
        _check_labels(calib.labels, sig.output_shape)


def _check_labels(labels: torch.Tensor, out: tuple[int | None, ...]) -> None:
    """``intake._loss_kind``'s label checks on the output's recorded sizes (a dynamic size
    matches any)."""
    inner = out[1:-1]
    fits = len(out) in (2, 3) and labels.dim() - 1 == len(inner) and all(
        d is None or d == s for d, s in zip(inner, labels.shape[1:], strict=True))
    if not fits:
        shown = ["N", *(d if d is not None else "*" for d in out[1:])]
        raise BadCalibrationError(
            f"'labels' of shape {list(labels.shape)} do not fit the model's output "
            f"{shown}: give [N] class indices for [N, classes] outputs or [N, T] "
            "token targets for [N, T, classes] logits, or drop the labels to use the "
            "label-free loss."
        )
    classes = out[-1]
    if classes is not None and int(labels.max()) >= classes:
        raise BadCalibrationError(
            f"tensor 'labels' has class index {int(labels.max())} but the model has "
            f"{classes} outputs; labels must be in [0, {classes - 1}]."
        )
