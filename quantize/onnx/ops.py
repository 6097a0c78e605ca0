"""Float translations of the aten ops of exported programs (one handler per op, a registry).

These cover the parts of a model that stay in floating point and the ops between quantized
layers (ReLU, residual adds, pools, layout). An op without a handler is refused by name
(:class:`~solver.errors.UnsupportedExportError`) before anything is written.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from solver.errors import UnsupportedExportError

from ..graph import _conv_args
from .context import Context, Translator, shape

aten = torch.ops.aten
REGISTRY: dict[object, Translator] = {}


def handles(*targets: object):
    def wrap(fn: Translator) -> Translator:
        for t in targets:
            REGISTRY[t] = fn
        return fn
    return wrap


def _arg(node: fx.Node, i: int, name: str, default: object = None) -> object:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


def _axes(dims: object, rank: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims or range(rank))
    return sorted(int(d) % rank for d in dims)


def conv_pads(padding: object, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """ONNX ``pads`` (begins then ends) for torch's ``padding`` (ints, 'valid' or 'same')."""
    nd = len(kernel)
    if padding == "valid":
        return [0] * (2 * nd)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    p = list(padding)  # type: ignore[arg-type]
    return p + p


def conv(ctx: Context, x: str, w: str, b: str | None, kernel: tuple[int, ...], stride: tuple,
         padding: object, dilation: tuple, groups: int, base: str) -> str:
    inputs = [x, w] + ([b] if b is not None else [])
    return ctx.builder.op(
        "Conv", inputs, base, kernel_shape=list(kernel), strides=list(stride),
        pads=conv_pads(padding, kernel, dilation), dilations=list(dilation), group=int(groups),
    )


def linear(ctx: Context, x: str, w: str, b: str | None, rank: int, base: str) -> str:
    """``x @ w.T + b`` with ``w`` as [out, in]: Gemm for 2-D inputs, else MatMul (+ Add)."""
    if rank == 2:
        return ctx.builder.op("Gemm", [x, w] + ([b] if b is not None else []), base, transB=1)
    wt = ctx.builder.op("Transpose", [w], base + "_wt", perm=[1, 0])
    out = ctx.builder.op("MatMul", [x, wt], base)
    return out if b is None else ctx.builder.op("Add", [out, b], base + "_bias")


@handles(aten.conv1d.default, aten.conv2d.default, aten.convolution.default)
def _conv(ctx: Context, node: fx.Node) -> str:
    w = node.args[1]
    kernel = tuple(shape(w)[2:]) if isinstance(w, fx.Node) else ()
    nd = len(kernel)
    if node.target == aten.convolution.default:
        a = node.args
        if a[6]:
            raise UnsupportedExportError(f"{node.name}: transposed convolutions are not exported")
        args = {"stride": tuple(a[3]), "padding": tuple(a[4]), "dilation": tuple(a[5]),
                "groups": int(a[8])}
    else:
        args = _conv_args(node, nd)
    b = node.args[2] if len(node.args) > 2 else None
    return conv(ctx, ctx.value(node.args[0]), ctx.value(w),
                None if b is None else ctx.value(b), kernel, args["stride"], args["padding"],
                args["dilation"], args["groups"], node.name)


@handles(aten.linear.default)
def _linear(ctx: Context, node: fx.Node) -> str:
    b = node.args[2] if len(node.args) > 2 else None
    return linear(ctx, ctx.value(node.args[0]), ctx.value(node.args[1]),
                  None if b is None else ctx.value(b), len(shape(node.args[0])), node.name)


@handles(aten.addmm.default)
def _addmm(ctx: Context, node: fx.Node) -> str:
    if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        raise UnsupportedExportError(f"{node.name}: addmm with beta/alpha != 1")
    bias, x, w = (ctx.value(a) for a in node.args[:3])
    return ctx.builder.op("Gemm", [x, w, bias], node.name)


@handles(aten.mm.default, aten.matmul.default, aten.bmm.default)
def _matmul(ctx: Context, node: fx.Node) -> str:
    return ctx.builder.op("MatMul", [ctx.value(a) for a in node.args[:2]], node.name)


def _unary(op: str) -> Translator:
    def fn(ctx: Context, node: fx.Node) -> str:
        return ctx.builder.op(op, [ctx.value(node.args[0])], node.name)
    return fn


for _t, _op in [
    (aten.relu.default, "Relu"), (aten.relu_.default, "Relu"), (aten.sigmoid.default, "Sigmoid"),
    (aten.tanh.default, "Tanh"), (aten.neg.default, "Neg"), (aten.abs.default, "Abs"),
    (aten.exp.default, "Exp"), (aten.sqrt.default, "Sqrt"),
    (aten.clone.default, "Identity"), (aten.alias.default, "Identity"),
    (aten.contiguous.default, "Identity"), (aten.detach.default, "Identity"),
    (aten.dropout.default, "Identity"),
]:
    REGISTRY[_t] = _unary(_op)


@handles(aten.rsqrt.default)
def _rsqrt(ctx: Context, node: fx.Node) -> str:
    s = ctx.builder.op("Sqrt", [ctx.value(node.args[0])], node.name + "_sqrt")
    return ctx.builder.op("Reciprocal", [s], node.name)


@handles(aten.silu.default, aten.silu_.default)
def _silu(ctx: Context, node: fx.Node) -> str:
    x = ctx.value(node.args[0])
    return ctx.builder.op("Mul", [x, ctx.builder.op("Sigmoid", [x], node.name + "_sig")],
                          node.name)


@handles(aten.gelu.default)
def _gelu(ctx: Context, node: fx.Node) -> str:
    approx = str(node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none"))
    return ctx.builder.op("Gelu", [ctx.value(node.args[0])], node.name, approximate=approx)


@handles(aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default,
         aten.clamp_min.default, aten.clamp_max.default)
def _clip(ctx: Context, node: fx.Node) -> str:
    """``Clip``: hardtanh's bounds default to -1 / 1; a clamp's missing bound is no bound
    (``clamp(x, 1.0)`` is ``clamp_min``)."""
    target = str(node.target)
    if "hardtanh" in target:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    elif "clamp_min" in target:
        lo, hi = _arg(node, 1, "min"), None
    elif "clamp_max" in target:
        lo, hi = None, _arg(node, 1, "max")
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    ins = [ctx.value(node.args[0]),
           "" if lo is None else ctx.builder.const(float(lo)),
           "" if hi is None else ctx.builder.const(float(hi))]
    return ctx.builder.op("Clip", ins, node.name)


def _binary(op: str) -> Translator:
    def fn(ctx: Context, node: fx.Node) -> str:
        if _arg(node, 2, "alpha", 1) != 1:
            raise UnsupportedExportError(f"{node.name}: {node.target} with alpha != 1")
        # a Python scalar takes the result's element type (int64 index arithmetic stays int)
        return ctx.builder.op(op, [ctx.value(a) if isinstance(a, fx.Node)
                                   else ctx.scalar(a, node) for a in node.args[:2]],
                              node.name)
    return fn


for _t, _op in [
    (aten.add.Tensor, "Add"), (aten.add_.Tensor, "Add"), (aten.sub.Tensor, "Sub"),
    (aten.mul.Tensor, "Mul"), (aten.mul_.Tensor, "Mul"), (aten.div.Tensor, "Div"),
    (aten.add.Scalar, "Add"), (aten.mul.Scalar, "Mul"),
]:
    REGISTRY[_t] = _binary(_op)


@handles(aten.mean.dim)
def _mean(ctx: Context, node: fx.Node) -> str:
    rank = len(shape(node.args[0]))
    axes = _axes(_arg(node, 1, "dim"), rank)
    keep = int(bool(_arg(node, 2, "keepdim", False)))
    return ctx.builder.op("ReduceMean", [ctx.value(node.args[0]),
                                         ctx.builder.const(axes, np.int64)],
                          node.name, keepdims=keep)


@handles(aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default)
def _adaptive(ctx: Context, node: fx.Node) -> str:
    in_shape = shape(node.args[0])
    size = [int(s) for s in node.args[1]]
    spatial = [int(d) for d in in_shape[2:]]
    x = ctx.value(node.args[0])
    if all(s == 1 for s in size):
        return ctx.builder.op("GlobalAveragePool", [x], node.name)
    if any(d % s for d, s in zip(spatial, size, strict=True)):
        raise UnsupportedExportError(
            f"{node.name}: adaptive average pooling from {spatial} to {size} is not a uniform "
            "pooling and is not exported")
    k = [d // s for d, s in zip(spatial, size, strict=True)]
    return ctx.builder.op("AveragePool", [x], node.name, kernel_shape=k, strides=k)


@handles(aten.avg_pool2d.default, aten.avg_pool1d.default)
def _avg_pool(ctx: Context, node: fx.Node) -> str:
    nd = len(shape(node.args[0])) - 2
    kernel = [int(k) for k in node.args[1]] * (nd if len(node.args[1]) == 1 else 1)
    stride = list(_arg(node, 2, "stride", None) or kernel)
    pad = list(_arg(node, 3, "padding", [0] * nd))
    ceil = int(bool(_arg(node, 4, "ceil_mode", False)))
    incl = int(bool(_arg(node, 5, "count_include_pad", True)))
    if _arg(node, 6, "divisor_override", None) is not None:
        raise UnsupportedExportError(f"{node.name}: avg_pool with divisor_override")
    return ctx.builder.op("AveragePool", [ctx.value(node.args[0])], node.name,
                          kernel_shape=kernel, strides=[int(s) for s in stride],
                          pads=[int(p) for p in pad] * 2, ceil_mode=ceil,
                          count_include_pad=incl)


@handles(aten.max_pool2d.default, aten.max_pool1d.default)
def _max_pool(ctx: Context, node: fx.Node) -> str:
    nd = len(shape(node.args[0])) - 2
    kernel = [int(k) for k in node.args[1]]
    kernel = kernel * nd if len(kernel) == 1 else kernel
    stride = [int(s) for s in (_arg(node, 2, "stride", None) or kernel)]
    stride = stride * nd if len(stride) == 1 else stride
    pad = [int(p) for p in _arg(node, 3, "padding", [0] * nd)]
    pad = pad * nd if len(pad) == 1 else pad
    dil = [int(d) for d in _arg(node, 4, "dilation", [1] * nd)]
    dil = dil * nd if len(dil) == 1 else dil
    ceil = int(bool(_arg(node, 5, "ceil_mode", False)))
    return ctx.builder.op("MaxPool", [ctx.value(node.args[0])], node.name, kernel_shape=kernel,
                          strides=stride, pads=pad * 2, dilations=dil, ceil_mode=ceil)


def reshape_to(ctx: Context, x: str, node: fx.Node, src: fx.Node) -> str:
    """Reshape ``x`` to the node's output shape: static dims as they are, a dynamic batch
    dim copied from the input (0), at most one other unknown (-1)."""
    out, inp = shape(node), shape(src)
    sym_out, sym_in = node.meta["val"].shape, src.meta["val"].shape
    target = []
    for i, d in enumerate(out):
        if d is not None:
            target.append(d)
        elif i == 0 and inp and inp[0] is None and str(sym_out[0]) == str(sym_in[0]):
            target.append(0)  # the same dynamic batch (not e.g. batch x heads)
        else:
            target.append(-1)
    if target.count(-1) > 1:
        raise UnsupportedExportError(f"{node.name}: reshape with several dynamic dimensions")
    return ctx.builder.op("Reshape", [x, ctx.builder.const(target, np.int64)], node.name)


@handles(aten.flatten.using_ints, aten.view.default, aten.reshape.default,
         aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim,
         aten.squeeze.dims)
def _reshape(ctx: Context, node: fx.Node) -> str:
    return reshape_to(ctx, ctx.value(node.args[0]), node, node.args[0])


@handles(aten.permute.default)
def _permute(ctx: Context, node: fx.Node) -> str:
    rank = len(shape(node.args[0]))
    perm = [int(p) % rank for p in node.args[1]]
    return ctx.builder.op("Transpose", [ctx.value(node.args[0])], node.name, perm=perm)


@handles(aten.transpose.int, aten.t.default)
def _transpose(ctx: Context, node: fx.Node) -> str:
    rank = len(shape(node.args[0]))
    perm = list(range(rank))
    a, b = (0, 1) if node.target == aten.t.default else (int(node.args[1]) % rank,
                                                          int(node.args[2]) % rank)
    perm[a], perm[b] = perm[b], perm[a]
    return ctx.builder.op("Transpose", [ctx.value(node.args[0])], node.name, perm=perm)


@handles(aten.cat.default)
def _cat(ctx: Context, node: fx.Node) -> str:
    rank = len(shape(node))
    axis = int(_arg(node, 1, "dim", 0)) % rank
    return ctx.builder.op("Concat", [ctx.value(a) for a in node.args[0]], node.name, axis=axis)


@handles(aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
         aten.log_softmax.int)
def _softmax(ctx: Context, node: fx.Node) -> str:
    op = "LogSoftmax" if "log" in str(node.target) else "Softmax"
    return ctx.builder.op(op, [ctx.value(node.args[0])], node.name, axis=int(node.args[1]))


@handles(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def _batch_norm(ctx: Context, node: fx.Node) -> object:
    x, w, b, mean, var = node.args[:5]
    if node.target == aten.batch_norm.default:
        if node.args[5]:
            raise UnsupportedExportError(f"{node.name}: a BatchNorm in training mode")
        eps = float(node.args[7])
    else:
        eps = float(node.args[6])
    c = shape(x)[1]
    ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
    scale = ctx.value(w) if w is not None else ctx.builder.tensor(node.name + "_w", ones)
    bias = ctx.value(b) if b is not None else ctx.builder.tensor(node.name + "_b", zeros)
    out = ctx.builder.op("BatchNormalization",
                         [ctx.value(x), scale, bias, ctx.value(mean), ctx.value(var)],
                         node.name, epsilon=eps)
    if node.target == aten.batch_norm.default:
        return out
    return (out, None, None)


@handles(aten.layer_norm.default, aten.native_layer_norm.default)
def _layer_norm(ctx: Context, node: fx.Node) -> object:
    """``LayerNormalization``; ``native_layer_norm`` (the decomposed graph's form) returns
    (out, mean, rstd), of which only ``out`` is exported."""
    native = node.target == aten.native_layer_norm.default
    x, normalized = node.args[0], list(node.args[1])
    w = _arg(node, 2, "weight")
    b = _arg(node, 3, "bias")
    eps = float(node.args[4]) if native else float(_arg(node, 4, "eps", 1e-5))
    scale = ctx.value(w) if w is not None else ctx.builder.const(np.ones(normalized))
    bias = ctx.value(b) if b is not None else ctx.builder.const(np.zeros(normalized))
    out = ctx.builder.op("LayerNormalization", [ctx.value(x), scale, bias], node.name,
                         axis=-len(normalized), epsilon=eps)
    return (out, None, None) if native else out


@handles(aten.embedding.default)
def _embedding(ctx: Context, node: fx.Node) -> str:
    return ctx.builder.op("Gather", [ctx.value(node.args[0]), ctx.value(node.args[1])],
                          node.name, axis=0)


@handles(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)
def _split(ctx: Context, node: fx.Node) -> tuple:
    vals = node.meta.get("val")
    rank = len(shape(node.args[0]))
    dim = int(_arg(node, 2, "dim", 0)) % rank
    sizes = [int(v.shape[dim]) for v in vals]  # static along the split dim
    return tuple(ctx.builder.node("Split", [ctx.value(node.args[0]),
                                            ctx.builder.const(sizes, np.int64)],
                                  node.name, n_out=len(sizes), axis=dim))


@handles(operator.getitem)
def _getitem(ctx: Context, node: fx.Node) -> str:
    src = ctx.env[node.args[0].name]  # type: ignore[union-attr]
    item = src[int(node.args[1])] if isinstance(src, tuple) else None  # type: ignore[arg-type]
    if not isinstance(item, str):
        raise UnsupportedExportError(f"{node.name}: an output of {node.args[0]} that is not "
                                     "exported")
    return item


def translate(ctx: Context, node: fx.Node) -> object:
    """The ONNX value(s) of a float call_function node; refuses unknown ops by name."""
    fn = REGISTRY.get(node.target)
    if fn is None:
        raise UnsupportedExportError(
            f"the ONNX exporter cannot express op {node.target} (node {node.name!r}); "
            "supported: conv, linear, matmul, element-wise, pooling, layout and BatchNorm ops",
            detail={"node": node.name, "op": str(node.target)},
        )
    return fn(ctx, node)
