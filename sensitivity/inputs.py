"""Binding the calibration tensors to the program's forward arguments: names, per-sample shapes,
dtypes and a fixed export batch size, checked against the placeholders' recorded metadata.

Integer and bool inputs (token ids, attention masks, token types, positions) are fed as they
are: never cast to float. Their dtype must be the program's, and an input that indexes an
embedding table must hold ids in ``[0, rows)`` of that table.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx

from quantize.data import CalibrationSet
from solver.errors import BadCalibrationError, BadModelError


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


def match_inputs(wanted: list[str], calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """The calibration tensor of each forward argument in ``wanted``: the single ``inputs``
    tensor for a one-input model, else ``input.<name>`` per argument. Raises
    BadCalibrationError naming what is missing or unexpected."""
    if calib.args:
        if len(wanted) != 1:
            raise BadCalibrationError(
                f"the model takes {len(wanted)} inputs {wanted}; provide one tensor per input "
                "named 'input.<name>' instead of 'inputs'."
            )
        return {wanted[0]: calib.args[0]}
    given = dict(calib.kwargs)
    missing, extra = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    if missing or extra:
        raise BadCalibrationError(
            f"calibration inputs {sorted(given)} do not match the model's forward arguments "
            f"{wanted}: missing {['input.' + m for m in missing]}, unexpected "
            f"{['input.' + e for e in extra]}."
        )
    return given


def bind_inputs(program: torch.export.ExportedProgram, gm: fx.GraphModule,
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
    given = match_inputs(wanted, calib)
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
        given[name] = _fit_dtype(tensor_name, t, val.dtype)
    batch = None
    if batch_sizes:
        if len(batch_sizes) > 1:
            raise BadModelError(f"model inputs have different fixed batch sizes {batch_sizes}.")
        batch = batch_sizes.pop()
    args = tuple(given[n] for n in pos)
    kwargs = {n: given[n] for n in kw}
    return CalibrationSet(args, kwargs, calib.labels), batch



def _fit_dtype(tensor_name: str, t: torch.Tensor, want: torch.dtype) -> torch.Tensor:
    """Float data is cast between float dtypes; integer and bool data must match exactly."""
    if want.is_floating_point and t.is_floating_point():
        return t.to(want) if t.dtype != want else t
    if t.dtype != want:
        raise BadCalibrationError(
            f"tensor {tensor_name!r} has dtype {_dtype_name(t.dtype)}; the model's input takes "
            f"{_dtype_name(want)}. Write it as {_dtype_name(want)} (token ids and masks are fed "
            "as they are, never cast)."
        )
    return t


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


_INDEX_PASS = {"view", "reshape", "_unsafe_view", "clone", "contiguous", "_to_copy", "to",
               "alias", "unsqueeze", "squeeze", "expand"}


def embedding_inputs(gm: fx.GraphModule) -> dict[str, tuple[str, int]]:
    """Placeholder name -> (embedding table FQN, rows) for the inputs whose values index an
    ``aten.embedding`` table (directly or through reshapes); the smallest table wins."""
    params = dict(gm.named_parameters())
    params.update(dict(gm.named_buffers()))
    found: dict[str, tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        table, idx = node.args[0], node.args[1]
        if not (isinstance(table, fx.Node) and table.op == "get_attr"):
            continue
        while (isinstance(idx, fx.Node) and idx.op == "call_function"
               and getattr(idx.target, "_opname", None) in _INDEX_PASS):
            idx = idx.args[0]
        if not (isinstance(idx, fx.Node) and idx.op == "placeholder"):
            continue
        weight = params.get(str(table.target))
        if weight is None:
            continue
        rows = int(weight.shape[0])
        if idx.name not in found or rows < found[idx.name][1]:
            found[idx.name] = (str(table.target), rows)
    return found


def check_id_ranges(gm: fx.GraphModule, calib: CalibrationSet,
                    single: bool = False) -> dict[str, int]:
    """Check that every input indexing an embedding holds ids in ``[0, rows)``; returns
    {input name: rows}. ``calib`` is bound (``bind_inputs``): keyword names are the graph's;
    ``single``: the file gave the one input as ``inputs`` (named so in messages).

    Raises:
        BadCalibrationError: naming the tensor, the range found and the range allowed.
    """
    tables = embedding_inputs(gm)
    order = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    named = dict(zip(order, calib.args, strict=False)) | dict(calib.kwargs)
    out: dict[str, int] = {}
    for name, (table, rows) in tables.items():
        t = named.get(name)
        if t is None or t.is_floating_point() or t.dtype == torch.bool:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= rows:
            tensor_name = "inputs" if single else f"input.{name}"
            raise BadCalibrationError(
                f"tensor {tensor_name!r} holds ids in [{lo}, {hi}] but it indexes the embedding "
                f"{table!r} of {rows} rows: ids must lie in [0, {rows - 1}]."
            )
        out[name] = rows
    return out


def positional(calib: CalibrationSet, gm: fx.GraphModule) -> CalibrationSet:
    """The Interpreter binds placeholders positionally: order keyword inputs as the graph's."""
    if not calib.kwargs:
        return calib
    order = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(calib.args) + [calib.kwargs[str(t)] for t in order[len(calib.args):]
                               if str(t) in calib.kwargs]
    return CalibrationSet(tuple(args), {}, calib.labels)
