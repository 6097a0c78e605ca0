"""``export_onnx``: an integer checkpoint + its exported program -> an ONNX model (opset 21).

The graph is built directly with ``onnx.helper`` from the program's fx graph (torch's own ONNX
export writes neither INT4 nor blocked DequantizeLinear): every node is translated in order;
quantized layers go through :mod:`.layers`, everything else through the float op registry of
:mod:`.ops`. Where the integer model materialises a tensor (``quantize.points``: layer
outputs, residual adds, pools), a QuantizeLinear / DequantizeLinear pair on the checkpoint's
grid is placed at the end of the grid-preserving chain after it (ReLU, view), which rounds the
same values (ReLU and reshapes commute with rounding onto the grid) and lets ONNX Runtime fuse
Conv + ReLU + Q into QLinearConv. Nothing is written before the whole graph is built, so an op
the exporter cannot express is refused (``UnsupportedExportError``, naming it) first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import fx

from solver.errors import UnsupportedExportError

from ..checkpoint import Checkpoint, read_checkpoint
from ..fakequant import prepare
from ..points import Grid
from . import ops_lm  # noqa: F401 - registers the decoder ops
from .builder import GraphBuilder
from .context import Context, shape
from .layers import drq_layer, quantized_layer
from .ops import translate

log = logging.getLogger(__name__)

FORMAT = "bitplan-onnx/1"
# model property: JSON {chain-end fx node of each materialised point: its ONNX value name},
# which ``verify`` reads to check every point on its own (``point_check``)
POINTS_PROP = "bitplan_points"

_DTYPES = {
    torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE,
    torch.float16: TensorProto.FLOAT16, torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL,
}


def _value_info(name: str, node: fx.Node) -> onnx.ValueInfoProto:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in _DTYPES:
        raise UnsupportedExportError(f"input / output {node.name!r} is not a tensor of a "
                                     "supported dtype")
    dims = [d if d is not None else ("batch" if i == 0 else f"{name}_d{i}")
            for i, d in enumerate(shape(node))]
    return helper.make_tensor_value_info(name, _DTYPES[val.dtype], dims)


def export_onnx(
    program: torch.export.ExportedProgram, checkpoint: Checkpoint | str | Path | None,
    int8_kernels: bool = True,
) -> onnx.ModelProto:
    """The ONNX model (opset 21) of ``checkpoint`` applied to ``program`` (``None``: the
    float model, every layer as it is, e.g. a latency baseline).

    ``int8_kernels``: <= 4-bit per-channel weights (packed INT4 in the file) pass a Cast to
    INT8 before their DequantizeLinear, so ONNX Runtime runs the layer on its INT8 kernel
    (False: DequantizeLinear of the INT4 codes, DQ + float Conv in ONNX Runtime 1.31).

    Weights are INT8 / INT4 initializers feeding DequantizeLinear (axis 0, per output
    channel), biases int32 at ``S_w * S_in``, activations Q/DQ on the checkpoint's grids,
    DRQ layers from standard operators; unquantized parts stay float. A quantized weight
    that another op also reads (a tied embedding table) stays float for that op, as in the
    fake-quant module: the file holds both.
    Raises BadCheckpointError / BadPlanError when the checkpoint does not fit the program,
    UnsupportedExportError (naming the op or layer) when a part cannot be expressed.
    """
    if checkpoint is None:  # the float model (a baseline for latency)
        ckpt, gm, qlayers, rows = None, program.module(), {}, {}
    else:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        gm, qlayers, rows = prepare(program, ckpt)
    by_node = {layer.node: layer for layer in qlayers.values()}
    points = ckpt.points() if ckpt is not None else []
    end_grid = {p.end: g for p, g in points}
    # chain ends of layer outputs keep their type (a 4-bit consumer reads them directly;
    # float readers get a widened copy); adds and pools are stored at >= 8 bits
    layer_ends = {p.end for p, _ in points if p.kind == "layer"}
    add_grid = {p.node: g for p, g in points if p.kind == "add"}
    builder = GraphBuilder(int8_kernels=int8_kernels)
    ctx = Context(gm, builder)
    point_values: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            builder.inputs.append(_value_info(node.name, node))
            builder._used.add(node.name)
            ctx.env[node.name] = node.name
        elif node.op == "get_attr":
            continue  # made on first use (quantized layers never use their float weight)
        elif node.op == "call_module":
            if node.users:
                raise UnsupportedExportError(f"submodule call {node.target!r} is not exported")
        elif node.op == "call_function":
            layer = by_node.get(node.name)
            if node.name in add_grid:
                # each input requantised onto the add's step, unclamped (16-bit), as the
                # integer model does; the sum is clamped by the add's own Q/DQ at its end
                g = add_grid[node.name]
                step = Grid(g.scale, 16, True)
                terms = [builder.qdq(ctx.value(a), step, f"{node.name}_in{i}")
                         for i, a in enumerate(node.args)]
                out = builder.op("Add", terms, node.name)
            elif layer is None:
                out = translate(ctx, node)
            elif rows[layer.name].drq is not None:
                out = drq_layer(ctx, node, layer, rows[layer.name], ckpt)
            else:
                out = quantized_layer(ctx, node, layer, rows[layer.name], ckpt)
            if node.name in end_grid:
                if not isinstance(out, str):
                    raise UnsupportedExportError(f"{node.name}: a quantized point with several "
                                                 "outputs")
                out = builder.qdq(out, end_grid[node.name], node.name + "_out",
                                  wide=node.name not in layer_ends)
                point_values[node.name] = out
            ctx.env[node.name] = out
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for i, res in enumerate(results):
                if not isinstance(res, fx.Node):
                    raise UnsupportedExportError(f"model output {i} is not a tensor")
                name = "output" if len(results) == 1 else f"output_{i}"
                builder.nodes.append(helper.make_node("Identity", [ctx.value(res)], [name],
                                                      name=builder.fresh(name + "_id")))
                builder.outputs.append(_value_info(name, res))
    model = builder.model(doc="bitplan integer model: QDQ graph from a bitplan checkpoint")
    props = {"format": FORMAT}
    if ckpt is not None:
        meta = ckpt.metadata()
        props["checkpoint_sha256"] = meta["sha256"]
        props["plan_sha256"] = hashlib.sha256(meta["plan"].encode()).hexdigest()
        props[POINTS_PROP] = json.dumps(point_values, sort_keys=True)
    helper.set_model_props(model, props)
    log.info("exported %d quantized layers, %d nodes", len(qlayers), len(builder.nodes))
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` (one file; parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every integer weight initializer (INT8 / packed INT4) by initializer name."""
    out = {}
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.INT8, TensorProto.INT4) and init.dims:
            out[init.name] = len(init.raw_data)
    return out
