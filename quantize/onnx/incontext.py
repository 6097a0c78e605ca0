"""Per-layer latency measured inside the whole model (the ``context`` method of the profile).

A layer timed alone does not cost what it costs in the model: the model's layers share
QuantizeLinear / DequantizeLinear nodes with their neighbours, ONNX Runtime keeps a run of
QLinearConvs in NHWC without the Transposes a lone layer needs, a layer whose output is the
model's 16-bit logits does not fuse into QGemm, and the glue between layers (residual Adds on
Q/DQ pairs, pooling, the NCHWc reorders, the per-run overhead) belongs to no layer. So, per
option ``w<w>a<a>``: the whole model is quantized with every layer at that option (calibrated
on synthetic inputs of the program's shapes; latency does not depend on the values), exported,
and run in ONNX Runtime with its profiler on; every node of the optimised graph is attributed
to the layer whose names it carries (the exporter names a layer's nodes after its fx node or
its layer name, and ONNX Runtime keeps the name of the node it fuses into), and a layer's entry
is the median over runs of the summed kernel times of its nodes. Nodes of no layer, and the
wall time of a run outside kernels, are the ``rest``: measured on the all-W8A8 model (wall
median minus the layers' kernel medians; negative on a model of a few microseconds, where the
profiler's own cost per node outweighs it) and spread over the layers in proportion to their
W8A8 time, the same amount on every option of a layer (so it moves no choice). An option
whose model spends more time outside kernels than the all-W8A8 one (4-bit weights: large float
weight tensors made and freed every run) has its layers' entries scaled by the same factor,
so the uniform models' sums equal their measured wall times; a plan that mixes options is
predicted from these per-layer figures, never timed whole. An entry stays >= 0. Runs of all
options' models are interleaved round by round, so a burst of load on a shared machine hits
every option alike.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch

from ..graph import GraphLayer, find_layers


def synthetic_inputs(program: torch.export.ExportedProgram, n: int,
                     seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` random samples of the program's positional inputs (float: N(0, 1); integer: ids
    0 / 1, valid for any vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for node in program.module().graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        dims = [n] + [int(getattr(getattr(d, "node", None), "hint", None) or d)
                      for d in val.shape[1:]]
        if val.dtype.is_floating_point:
            out.append(torch.randn(dims, generator=gen).to(val.dtype))
        else:
            out.append(torch.randint(0, 2, dims, generator=gen).to(val.dtype))
    return tuple(out)


def fixed_batch(program: torch.export.ExportedProgram) -> int | None:
    """The batch size a program was exported for, or None when its batch is dynamic."""
    for node in program.module().graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


def uniform_plan(layers: list[GraphLayer], w_bits: int, a_bits: int,
                 group: int | None = None) -> dict[str, Any]:
    """A plan (current format) with every layer at ``w<w_bits>a<a_bits>``; with ``group``,
    per-group weight scales on every layer whose fan-in the group fits (the others per
    channel)."""
    from solver.options import group_fits, size_bytes
    from solver.plan import FORMAT, VERSION

    rows = []
    for layer in layers:
        n = math.prod(layer.weight_shape)
        g = group if group is not None and group_fits(n // layer.weight_shape[0], group) \
            else None
        rows.append({"name": layer.name, "kind": layer.kind, "params": n, "macs": 0,
                     "w_bits": w_bits, "a_bits": a_bits, "weight_trace": None, "omega": 0.0,
                     "size_bytes": float(size_bytes(n, w_bits, layer.weight_shape[0], g)),
                     "bops": 0.0, "latency_ms": None, "drq": None,
                     **({"group_size": g} if g is not None else {})})
    params = sum(r["params"] for r in rows)
    return {"version": VERSION, "format": FORMAT,
            "model": {"layers": len(rows), "params": params, "macs": 0,
                      "quantized_params": params, "other_params": 0},
            "constraints": {}, "status": "optimal", "objective": 0.0,
            "totals": {"size_bytes": sum(r["size_bytes"] for r in rows), "bops": 0.0,
                       "latency_ms": None},
            "limits": {"size_bytes": None, "bops": None, "latency_ms": None},
            "binding": [], "layers": rows, "diagnosis": None}


def owner_of(layers: list[GraphLayer]):  # noqa: ANN201 - Callable[[str], str | None]
    """``node name -> layer name | None``: the layer whose layer name or fx node name starts
    the node's name (followed by ``_``), the longest such name winning."""
    names = {layer.name: layer.name for layer in layers}
    names.update({layer.node: layer.name for layer in layers})
    keys = sorted(names, key=len, reverse=True)

    def owner(node: str) -> str | None:
        for k in keys:
            if node == k or node.startswith(k + "_"):
                return names[k]
        return None

    return owner


def node_times(profile_file: str, skip_runs: int) -> dict[str, list[float]]:
    """Kernel times (ms) per node name per run from an ONNX Runtime profile, the first
    ``skip_runs`` runs (warm-up) left out."""
    events = json.loads(Path(profile_file).read_text())
    per: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1e3)
    return {k: v[skip_runs:] for k, v in per.items()}


def _sessions(model: Any, threads: int, prefix: str):  # noqa: ANN202
    """A plain session (wall time) and a profiled one (kernel times) of ``model``."""
    from .verify import session

    return session(model, threads), session(model, threads, profile_prefix=prefix)


def measure(program: torch.export.ExportedProgram,
            options: list[tuple[int, int, int | None]],
            batch: int, threads: int, warmup: int, repeat: int, seed: int,
            int8_kernels: bool = True) -> dict[str, Any]:
    """Per-layer in-context latency per option ``(w, a, group | None)`` tag, the rest, and
    what was measured.

    Returns ``{"table": {layer: {tag: ms | None}}, "share": {layer: ms}, "scale": {tag: x},
    "rest_ms": float, "batch": int (the program's own batch when it was exported for one),
    "whole_ms": {tag: ms}, "unattributed": {node: ms}, "failed": {tag: reason}}``: ``table``
    holds the layers' own kernel times (None where no node of the optimised graph carries the
    layer's name), ``share`` each layer's part of the rest, ``scale`` per option the factor
    that brings its layers' kernel times to its model's wall time less the rest. An option
    whose uniform model cannot be quantized, exported or run is listed under ``failed``; the
    caller times those entries alone instead.
    """
    from solver.errors import BitplanError

    from .. import QuantizeConfig, apply
    from ..data import CalibrationSet
    from .export import export_onnx
    from .profile import option_tag

    layers = find_layers(program.module())
    owner = owner_of(layers)
    fixed = fixed_batch(program)  # a program exported for one batch size runs only at it
    if fixed is not None:
        batch = fixed
    data = synthetic_inputs(program, 2 * batch if fixed else 4 + batch, seed)
    cut = batch if fixed else 4
    train = CalibrationSet(tuple(t[:cut] for t in data))
    feed_args = tuple(t[cut:].numpy() for t in data)
    runs: dict[str, tuple[Any, Any, dict]] = {}
    failed: dict[str, str] = {}
    with TemporaryDirectory(prefix="bitplan-profile-") as tmp:
        for w, a, g in options:
            tag = option_tag(w, a, g)
            try:
                res = apply(program, uniform_plan(layers, w, a, g), train, train,
                            QuantizeConfig(batch_size=4), batch_size=fixed)
                model = export_onnx(program, res.checkpoint, int8_kernels)
                plain, prof = _sessions(model, threads, str(Path(tmp) / tag))
            except BitplanError as exc:  # session(): UnsupportedExportError when ORT fails
                failed[tag] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            feed = {i.name: x for i, x in zip(plain.get_inputs(), feed_args, strict=True)}
            runs[tag] = (plain, prof, feed)
        walls: dict[str, list[float]] = defaultdict(list)
        for r in range(warmup + repeat):  # interleaved: one run of every model per round
            for tag, (plain, _, feed) in runs.items():
                t0 = time.perf_counter()
                plain.run(None, feed)
                if r >= warmup:
                    walls[tag].append((time.perf_counter() - t0) * 1e3)
        for _ in range(warmup + repeat):  # apart: the profiler's writes would slow the above
            for _tag, (_, prof, feed) in runs.items():
                prof.run(None, feed)
        kernels = {tag: node_times(prof.end_profiling(), warmup)
                   for tag, (_, prof, _) in runs.items()}
    table: dict[str, dict[str, float | None]] = {layer.name: {} for layer in layers}
    unattributed: dict[str, dict[str, float]] = {}
    for tag, per in kernels.items():
        sums: dict[str, float] = defaultdict(float)
        rest: dict[str, float] = {}
        for node, times in per.items():
            ms = float(np.median(times)) if times else 0.0
            who = owner(node)
            if who is None:
                rest[node] = ms
            else:
                sums[who] += ms
        for layer in layers:
            table[layer.name][tag] = sums.get(layer.name)
        unattributed[tag] = rest
    whole = {tag: float(np.median(v)) for tag, v in walls.items()}
    raw = {tag: {n: row.get(tag) or 0.0 for n, row in table.items()} for tag in whole}
    # signed: on a model of a few microseconds the profiler's own cost per node (and its
    # whole-microsecond durations) make the kernels add up to more than the plain run
    rest_ms = whole["w8a8"] - sum(raw["w8a8"].values()) if "w8a8" in whole else 0.0
    total = sum(raw.get("w8a8", {}).values())
    share = {n: rest_ms * (raw["w8a8"][n] / total if total else 1 / len(table))
             for n in table}
    scale = {}
    for tag, per_layer in raw.items():  # the option's own time outside its layers' kernels
        extra = whole[tag] - sum(per_layer.values()) - rest_ms if tag != "w8a8" else 0.0
        kernels = sum(per_layer.values())
        scale[tag] = 1.0 + (extra / kernels if kernels else 0.0)
    return {"table": table, "share": share, "scale": scale, "rest_ms": rest_ms, "batch": batch,
            "whole_ms": whole, "unattributed": unattributed.get("w8a8", {}), "failed": failed}
