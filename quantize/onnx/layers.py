"""Quantized layers as ONNX: integer weight initializers, QDQ inputs, and the DRQ subgraph.

A quantized conv / linear becomes

    x -> [Q/DQ on the input grid] -> Conv | Gemm(transB) <- DQ(weight codes, S_w, axis 0)
                                                         <- DQ(bias_q int32, S_w * S_in)

with the weight codes stored as they are in the checkpoint (INT8, or INT4 packed two per byte
for <= 4-bit weights, so the initializer holds the plan's bytes). Per-group weight scales
(checkpoint v2) are a blocked DequantizeLinear (axis 1 of the [out, fan_in] codes,
``block_size`` = the group size) and the bias sits on the largest group scale. The layer's
output grid is applied by the exporter at the end of the grid-preserving chain after the layer
(ReLU / view), so ONNX Runtime sees DQ -> Conv -> (Relu) -> Q and fuses the int8 paths.

A DRQ conv becomes, from standard operators only:

    q8 = QuantizeLinear(x, S_in)           (+ Clip to the symmetric grid when signed)
    s  = ReduceSum(|Cast(q8)|, channels)   exact integer sums in float32
    a  = AveragePool(s, region, stride = region, ceil, count_include_pad = 0)
    m  = Cast(a >= threshold * C - 1/(2 * pixels per region))    (exact, see below)
    m  = Slice(Resize(m, nearest, scales = region), H, W)
    y  = Conv(DQ(q8) * m, W_high) + Conv(DQ(Q4(x)) * (1 - m), W_low) + bias

``a`` is the region's channel-summed code total divided by its pixel count; the compare is
exact while ``threshold * C * pixels < 2^21`` (then float32's rounding of the division moves
``a`` by far less than half of the ``1/pixels`` spacing of the true values); a larger layer is
refused by name.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from solver.errors import UnsupportedExportError

from ..checkpoint import Checkpoint, packed, storage_bits
from ..drq import low_scale
from ..graph import GraphLayer
from ..points import Grid
from ..primitives import pack_nibbles
from ..rows import PlanRow
from .context import Context, shape
from .ops import conv, linear

EXACT_MASK_LIMIT = 2**21


def weight_initializer(ctx: Context, base: str, codes: torch.Tensor, w_bits: int) -> str:
    """Signed weight codes as an INT8 or packed-INT4 initializer (the checkpoint's bytes)."""
    dims = list(codes.shape)
    if packed(w_bits):
        data = pack_nibbles(codes).numpy().tobytes()
        return ctx.builder.raw(base, TensorProto.INT4, dims, data)
    arr = codes.to(torch.int8).numpy()
    return ctx.builder.raw(base, TensorProto.INT8, dims, arr.tobytes())


def dequantized_weight(ctx: Context, base: str, codes: torch.Tensor, scale: torch.Tensor,
                       w_bits: int) -> str:
    """DequantizeLinear(codes, per-output-channel scale, axis 0); packed INT4 codes go
    through a Cast to INT8 first when the builder asks for INT8 kernels (the file keeps the
    INT4 bytes; ONNX Runtime folds the Cast at load and fuses the layer into its INT8 kernel)."""
    w = weight_initializer(ctx, base + "_q", codes, w_bits)
    if packed(w_bits) and ctx.builder.int8_kernels:
        w = ctx.builder.op("Cast", [w], base + "_q8", to=TensorProto.INT8)
    s = ctx.builder.tensor(base + "_scale", scale.to(torch.float32).numpy())
    return ctx.builder.op("DequantizeLinear", [w, s], base + "_dq", axis=0)


def grouped_weight(ctx: Context, base: str, codes: torch.Tensor, scale: torch.Tensor,
                   w_bits: int, group_size: int) -> str:
    """Per-group weights: codes as a 2-D [out, fan_in] initializer (the checkpoint's bytes),
    DequantizeLinear blocked along axis 1 (``block_size`` = the group size, scales
    [out, fan_in / group]), reshaped back to the weight's shape for a conv."""
    out = codes.shape[0]
    w = weight_initializer(ctx, base + "_q", codes.reshape(out, -1), w_bits)
    s = ctx.builder.tensor(base + "_scale", scale.to(torch.float32).numpy())
    dq = ctx.builder.op("DequantizeLinear", [w, s], base + "_dq", axis=1,
                        block_size=int(group_size))
    if codes.dim() == 2:
        return dq
    return ctx.builder.op("Reshape", [dq, ctx.builder.const(list(codes.shape), np.int64)],
                          base + "_shape")


def _emit_op(ctx: Context, layer: GraphLayer, node: fx.Node, x: str, w: str,
             b: str | None) -> str:
    if layer.kind == "linear":
        return linear(ctx, x, w, b, len(shape(node.args[0])), node.name)
    kernel = tuple(layer.weight_shape[2:])
    return conv(ctx, x, w, b, kernel, layer.stride, layer.padding, layer.dilation,
                layer.groups, node.name)


def quantized_layer(ctx: Context, node: fx.Node, layer: GraphLayer, row: PlanRow,
                    ckpt: Checkpoint) -> str:
    """A conv / linear with integer weights and a QDQ input; returns its float output."""
    name = layer.name
    g_in = ckpt.input_grid(name)
    # With 8-bit weights (or 4-bit ones cast to INT8) ONNX Runtime fuses DQ -> Conv/MatMul ->
    # Q into QLinearConv / QLinearMatMul, which have no 4-bit input type: a <= 4-bit input is
    # then stored in the 8-bit type on its own grid (the same values), and runs the INT8 kernel.
    s_w = ckpt.tensors[f"{name}.weight_scale"]
    int8_kernel = row.w_bits > 4 or (ctx.builder.int8_kernels and s_w.dim() == 1)
    x = ctx.builder.qdq(ctx.value(node.args[0], widen=False), g_in, name + "_in",
                        wide=int8_kernel)
    if s_w.dim() == 2:  # per-group scales along the flattened fan-in: blocked DQ
        w = grouped_weight(ctx, name + "_w", ckpt.codes(name), s_w, row.w_bits,
                           int(row.group_size))
        s_bias = s_w.to(torch.float64).amax(dim=1)  # bias_q's grid: the largest group scale
    else:
        w = dequantized_weight(ctx, name + "_w", ckpt.codes(name), s_w, row.w_bits)
        s_bias = s_w.to(torch.float64)
    bias_q = ckpt.tensors[f"{name}.bias_q"].to(torch.int32).numpy()
    acc = (s_bias * g_in.scale).to(torch.float32).numpy()
    bq = ctx.builder.tensor(name + "_bias_q", bias_q)
    bs = ctx.builder.tensor(name + "_bias_scale", acc)
    b = ctx.builder.op("DequantizeLinear", [bq, bs], name + "_bias_dq", axis=0)
    return _emit_op(ctx, layer, node, x, w, b)


def weight_bytes(w_bits: int, numel: int) -> int:
    """Bytes of one weight initializer as stored (nibbles for <= 4 bits)."""
    return math.ceil(numel * storage_bits(w_bits) / 8)


def drq_layer(ctx: Context, node: fx.Node, layer: GraphLayer, row: PlanRow,
              ckpt: Checkpoint) -> str:
    """The DRQ conv of ``quantize.drq.DRQConv2d`` from standard ONNX operators."""
    assert row.drq is not None
    name, spec = layer.name, row.drq
    w_low_bits = min(row.w_bits, spec.low_bits)
    bias = ckpt.tensors[f"{name}.bias"].to(torch.float32).numpy()
    high = (ckpt.codes(name), ckpt.tensors[f"{name}.weight_scale"], row.w_bits)
    return drq_graph(ctx, layer, ctx.value(node.args[0], widen=False), shape(node.args[0]),
                     ckpt.input_grid(name), spec.region, spec.threshold, spec.high_bits,
                     spec.low_bits, high, (*ckpt.low_weight(name), w_low_bits), bias, node.name)


def drq_graph(ctx: Context, layer: GraphLayer, x: str, in_shape: tuple, g8: Grid,
              region: tuple[int, int], threshold: float, high_bits: int, low_bits: int,
              w_high: tuple, w_low: tuple, bias: np.ndarray, out_name: str) -> str:
    """The DRQ subgraph (module docstring) on input ``x`` of ``in_shape`` on the INT8 grid
    ``g8``; ``w_high`` / ``w_low``: (codes, per-channel scale, bits) of the two branches."""
    name, b = layer.name, ctx.builder
    channels, height, width = in_shape[1], in_shape[2], in_shape[3]
    rx, ry = region
    pixels = rx * ry
    if threshold * channels * pixels >= EXACT_MASK_LIMIT:
        raise UnsupportedExportError(
            f"DRQ layer {name!r}: threshold {threshold} x {channels} channels x "
            f"{pixels}-pixel regions is too large for an exact float32 region mask in ONNX",
            detail={"layer": name},
        )
    hi = Grid(g8.scale, high_bits, g8.signed)
    q8 = b.quantize(x, hi, name + "_drq8", exact=True)  # the mask needs the exact codes
    codes = b.op("Cast", [q8], name + "_codes", to=TensorProto.FLOAT)
    if g8.signed:
        codes = b.op("Abs", [codes], name + "_abs")
    summed = b.op("ReduceSum", [codes, b.const([1], np.int64)], name + "_csum", keepdims=1)
    avg = b.op("AveragePool", [summed], name + "_regions", kernel_shape=[ry, rx],
               strides=[ry, rx], ceil_mode=1, count_include_pad=0)
    cut = threshold * channels - 0.5 / pixels
    mask = b.op("Greater", [avg, b.const(cut)], name + "_sensitive")
    m = b.op("Cast", [mask], name + "_maskf", to=TensorProto.FLOAT)
    m = b.op("Resize", [m, "", b.const([1.0, 1.0, float(ry), float(rx)])], name + "_mask_up",
             mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    rows, cols = -(-height // ry), -(-width // rx)
    if rows * ry != height or cols * rx != width:
        m = b.op("Slice", [m, b.const([0, 0], np.int64), b.const([height, width], np.int64),
                           b.const([2, 3], np.int64)], name + "_mask")
    x8 = b.dequantize(q8, hi, name + "_drq8")
    s_low = low_scale(g8.scale, g8.signed, high_bits, low_bits)
    lo = Grid(s_low, low_bits, g8.signed)
    x4 = b.dequantize(b.quantize(x, lo, name + "_drq4", exact=True), lo, name + "_drq4")
    x_high = b.op("Mul", [x8, m], name + "_x_high")
    x_low = b.op("Mul", [x4, b.op("Sub", [b.const(1.0), m], name + "_not_mask")],
                 name + "_x_low")
    w_hi = dequantized_weight(ctx, name + "_w_high", *w_high)
    w_lo = dequantized_weight(ctx, name + "_w_low", *w_low)
    bias_name = b.tensor(name + "_bias", bias)
    kernel = tuple(layer.weight_shape[2:])
    y_hi = conv(ctx, x_high, w_hi, bias_name, kernel, layer.stride, layer.padding,
                layer.dilation, layer.groups, name + "_conv_high")
    y_lo = conv(ctx, x_low, w_lo, None, kernel, layer.stride, layer.padding, layer.dilation,
                layer.groups, name + "_conv_low")
    return b.op("Add", [y_hi, y_lo], out_name)
