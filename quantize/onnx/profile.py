"""Measured per-layer latency in ONNX Runtime: a ``latency_table`` for the constraints.

Two methods (``ProfileConfig.method``):

- ``context`` (default, :mod:`.incontext`): every layer timed inside the whole exported model,
  one model per option with every layer at that option, from ONNX Runtime's per-node profile;
  the glue no layer owns and the per-run overhead are measured on the all-W8A8 model and
  spread over the layers (the same amount on each option of a layer). The sum of a plan's
  entries is its predicted whole-model latency.
- ``isolated``: every layer alone, as the QDQ subgraph the export writes for it (input Q/DQ
  on an activation grid of the option's bits, integer weight initializer -> DequantizeLinear,
  int32 bias, Conv / Gemm / MatMul, output Q/DQ on an 8-bit grid) at the layer's real input
  shape. It misses the glue between layers and counts a Transpose pair and a run overhead per
  layer; ``context`` falls back to it for an option whose uniform model fails and for a layer
  no node of the optimised graph is named after.

Weights in ``isolated`` are random codes of the right width, inputs of ``context`` random
samples (the kernels' speed does not depend on the values). Each timing is the median of
``repeat`` runs after ``warmup`` runs. Tags are the solver's ``w<w>a<a>``, and
``w<w>g<g>a<a>`` for per-group weights (``group_sizes``: one scale per ``g`` inputs, a blocked
DequantizeLinear, which ONNX Runtime 1.31 runs as DQ + a float Conv / MatMul; only for the
layers whose fan-in ``g`` fits, ``solver.options.group_fits``); DRQ tags are left to the
solver, which mixes ``w<w>a8`` and ``w<min(w,4)>a4`` by the DRQ fraction.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from solver.errors import BadConstraintsError
from solver.options import group_fits

from ..graph import GraphLayer, find_layers
from ..points import Grid
from .builder import GraphBuilder
from .context import Context
from .layers import dequantized_weight, grouped_weight
from .ops import conv, linear
from .verify import onnxruntime, session

FORMAT = "bitplan-latency/1"
VERSION = 2  # 2: method, rest_ms, whole_ms, fallback (the table itself as in 1)
METHODS = ("context", "isolated")


@dataclass(frozen=True)
class ProfileConfig:
    """What is timed and how (each field with its reason)."""

    version: int = 1
    weight_bits: tuple[int, ...] = (4, 8)
    activation_bits: tuple[int, ...] = (8,)
    batch: int = 1  # deployment batch (latency, not throughput)
    threads: int = 1  # intra-op threads; 1 is steady on a shared machine
    warmup: int = 5  # first runs allocate and pick kernels
    repeat: int = 30  # the median of these runs is reported
    seed: int = 0  # the random weight codes and inputs
    layers: tuple[str, ...] | None = field(default=None)  # None: every quantizable layer
    method: str = "context"  # in the whole model (module docstring); "isolated": layer alone
    int8_kernels: bool = True  # as export_onnx: 4-bit weights cast to INT8 for its kernels
    drq_regions: tuple[int, ...] = ()  # square DRQ region sizes to time (conv2d layers)
    group_sizes: tuple[int, ...] = ()  # per-group weight options to time (w<w>g<g>a<a>)

    def __post_init__(self) -> None:
        if self.version != 1:
            raise BadConstraintsError(f"unsupported profile config version {self.version}")
        bad = [b for b in (*self.weight_bits, *self.activation_bits) if not 2 <= int(b) <= 8]
        if bad or not self.weight_bits or not self.activation_bits:
            raise BadConstraintsError(f"bits must be in 2..8 and non-empty, got {bad}")
        if min(self.batch, self.threads, self.warmup + 1, self.repeat) < 1:
            raise BadConstraintsError("batch, threads and repeat must be >= 1, warmup >= 0")
        if any(int(k) < 1 for k in self.drq_regions):
            raise BadConstraintsError("DRQ region sizes must be >= 1")
        if any(int(g) < 1 for g in self.group_sizes) or \
                len(set(self.group_sizes)) != len(self.group_sizes):
            raise BadConstraintsError("group sizes must be distinct positive integers")
        if self.method not in METHODS:
            raise BadConstraintsError(f"profile method must be one of {METHODS}, "
                                      f"got {self.method!r}")
        if self.method == "context" and self.layers is not None:
            raise BadConstraintsError("the context method times the whole model: "
                                      "give no layer subset (or method 'isolated')")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def option_tag(w: int, a: int, group: int | None = None) -> str:
    """The solver's tag of an option (``solver.options``)."""
    return f"w{w}a{a}" if group is None else f"w{w}g{group}a{a}"


def fan_in(layer: GraphLayer) -> int:
    """Inputs per output channel (``in_features``, or ``in / groups * kh * kw``)."""
    return math.prod(layer.weight_shape[1:])


def layer_model(layer: GraphLayer, in_shape: tuple[int, ...], w_bits: int, a_bits: int,
                seed: int = 0, int8_kernels: bool = True,
                group: int | None = None):  # noqa: ANN201 - onnx.ModelProto
    """The export's QDQ subgraph of one layer on an input of ``in_shape`` (batch included);
    with ``group``, per-group weight scales (a blocked DequantizeLinear) as the export writes
    them."""
    from onnx import TensorProto, helper

    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder(name=f"profile_{layer.name}", int8_kernels=int8_kernels)
    ctx = Context(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), b)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape)))
    g_in = Grid(0.05, a_bits, False)  # a post-ReLU grid: unsigned, as most layer inputs
    # as quantized_layer: the 8-bit type unless a <= 4-bit weight keeps its own DQ path
    x = b.qdq("x", g_in, "in", wide=w_bits > 4 or (int8_kernels and group is None))
    q = 2 ** (w_bits - 1) - 1
    codes = torch.randint(-q, q + 1, layer.weight_shape, generator=gen, dtype=torch.int32)
    out = layer.weight_shape[0]
    s_w = torch.full((out,), 0.01)
    if group is None:
        w = dequantized_weight(ctx, "w", codes, s_w, w_bits)
    else:
        w = grouped_weight(ctx, "w", codes, torch.full((out, fan_in(layer) // group), 0.01),
                           w_bits, group)
    bias = b.op("DequantizeLinear", [b.tensor("bias_q", np.zeros(out, np.int32)),
                                     b.tensor("bias_scale", (s_w * g_in.scale).numpy())],
                "bias_dq", axis=0)
    if layer.kind == "linear":
        y = linear(ctx, x, w, bias, len(in_shape), "layer")
    else:
        y = conv(ctx, x, w, bias, tuple(layer.weight_shape[2:]), layer.stride, layer.padding,
                 layer.dilation, layer.groups, "layer")
    y = b.qdq(y, Grid(0.1, 8, True), "out")
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    b.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    return b.model()


def drq_layer_model(layer: GraphLayer, in_shape: tuple[int, ...], w_bits: int, region: int,
                    seed: int = 0, int8_kernels: bool = True):  # noqa: ANN201
    """The export's DRQ subgraph of one conv layer (``layers.drq_graph``: region mask, INT8 and
    INT4 branches, two convs) with random codes; its cost does not depend on the threshold
    (both convs run dense)."""
    from onnx import TensorProto, helper

    from .layers import drq_graph

    gen = torch.Generator().manual_seed(seed)
    b = GraphBuilder(name=f"profile_drq_{layer.name}", int8_kernels=int8_kernels)
    ctx = Context(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), b)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape)))
    out = layer.weight_shape[0]

    def weights(bits: int) -> tuple:
        q = 2 ** (bits - 1) - 1
        return (torch.randint(-q, q + 1, layer.weight_shape, generator=gen, dtype=torch.int32),
                torch.full((out,), 0.01), bits)

    y = drq_graph(ctx, layer, "x", in_shape, Grid(0.05, 8, False), (region, region), 16, 8, 4,
                  weights(w_bits), weights(min(w_bits, 4)), np.zeros(out, np.float32), "y")
    b.outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    return b.model()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _input_shapes(gm: torch.fx.GraphModule, layers: list[GraphLayer],
                  batch: int) -> dict[str, tuple[int, ...]]:
    nodes = {n.name: n for n in gm.graph.nodes}
    shapes = {}
    for layer in layers:
        val = nodes[layer.node].args[0].meta.get("val")
        shapes[layer.name] = (batch, *(int(d) for d in val.shape[1:]))
    return shapes


def time_model(model: Any, in_shape: tuple[int, ...], cfg: ProfileConfig) -> float:
    """Median wall time (ms) of one run of ``model`` after ``cfg.warmup`` runs."""
    sess = session(model, cfg.threads)
    x = np.random.default_rng(cfg.seed).random(in_shape, dtype=np.float32) * 5
    feed = {"x": x}
    for _ in range(cfg.warmup):
        sess.run(None, feed)
    times = []
    for _ in range(cfg.repeat):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def profile(program: torch.export.ExportedProgram, cfg: ProfileConfig | None = None,
            progress: Any = None) -> dict[str, Any]:
    """``{"latency_table": {layer: {tag: ms}}, ...}`` for every quantizable layer of
    ``program``; the table is what the constraints' ``latency_table`` takes.

    Raises BadConstraintsError for a bad config or an unknown layer name in ``cfg.layers``.
    """
    ort = onnxruntime()
    cfg = cfg or ProfileConfig()
    gm = program.module()
    layers = find_layers(gm)
    if cfg.layers is not None:
        unknown = sorted(set(cfg.layers) - {layer.name for layer in layers})
        if unknown:
            raise BadConstraintsError(f"unknown layers {unknown}")
        layers = [layer for layer in layers if layer.name in cfg.layers]
    shapes = _input_shapes(gm, layers, cfg.batch)
    options: list[tuple[int, int, int | None]] = [
        (w, a, None) for w in cfg.weight_bits for a in cfg.activation_bits]
    if (8, 8, None) not in options:
        options.append((8, 8, None))  # latency ratios are relative to the all-INT8 model
    options += [(w, a, int(g)) for g in cfg.group_sizes for w in cfg.weight_bits
                for a in cfg.activation_bits]
    tags = [option_tag(*o) for o in options]
    ctx: dict[str, Any] = {}
    if cfg.method == "context":
        from .incontext import measure

        ctx = measure(program, options, cfg.batch, cfg.threads, cfg.warmup, cfg.repeat,
                      cfg.seed, cfg.int8_kernels)
        if progress is not None:
            progress("profile", 0.5)
    table: dict[str, dict[str, float]] = {}
    fallback: dict[str, list[str]] = {}
    for i, layer in enumerate(layers):
        row = ctx.get("table", {}).get(layer.name, {})
        share = ctx.get("share", {}).get(layer.name, 0.0)
        scale = ctx.get("scale", {})
        table[layer.name] = {}
        for (w, a, g), tag in zip(options, tags, strict=True):
            if g is not None and not group_fits(fan_in(layer), g):
                continue  # not offered to this layer (the solver's rule)
            ms = row.get(tag)
            if ms is not None:
                ms *= scale.get(tag, 1.0)
            else:  # isolated (the method, a failed uniform model or no named node)
                ms = time_model(layer_model(layer, shapes[layer.name], w, a, cfg.seed,
                                            cfg.int8_kernels, g), shapes[layer.name], cfg)
                if cfg.method == "context":
                    fallback.setdefault(layer.name, []).append(tag)
            table[layer.name][tag] = round(max(0.0, ms + share), 6)
        if layer.kind == "conv2d" and len(shapes[layer.name]) == 4:
            for w in cfg.weight_bits:  # DRQ alone (float convs, no fusion), plus the share
                for k in cfg.drq_regions:
                    model = drq_layer_model(layer, shapes[layer.name], w, int(k), cfg.seed,
                                            cfg.int8_kernels)
                    ms = time_model(model, shapes[layer.name], cfg)
                    table[layer.name][f"w{w}drq{k}x{k}"] = round(max(0.0, ms + share), 6)
        if progress is not None:
            progress("profile", (i + 1) / len(layers))
    out = {
        "format": FORMAT,
        "version": VERSION,
        "method": cfg.method,
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "cpu": cpu_model(),
        "config": cfg.to_dict(),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "latency_table": table,
    }
    if cfg.method == "context":
        out.update({
            "rest_ms": round(ctx["rest_ms"], 6),  # spread over the layers' entries
            "scale": {k: round(v, 6) for k, v in ctx["scale"].items()},
            "whole_ms": {k: round(v, 6) for k, v in ctx["whole_ms"].items()},
            "unattributed_ms": {k: round(v, 6) for k, v in sorted(
                ctx["unattributed"].items(), key=lambda kv: -kv[1])},
            "failed_options": ctx["failed"],
            "fallback": fallback,  # {layer: [tags timed in isolation]}
            "context_batch": ctx["batch"],  # a fixed-batch program runs at its own batch
        })
    return out


def latency_source(result: dict[str, Any], file: str | None = None,
                   cache_key: str | None = None) -> dict[str, Any]:
    """The plan's ``latency_source`` for a table made by :func:`profile` (measured)."""
    cfg = result.get("config", {})
    return {"kind": "measured", "runtime": result.get("runtime"),
            "method": result.get("method", "isolated"), "cpu": result.get("cpu"),
            "batch": cfg.get("batch"), "threads": cfg.get("threads"),
            "repeat": cfg.get("repeat"), "rest_ms": result.get("rest_ms"), "file": file,
            "cache_key": cache_key}
