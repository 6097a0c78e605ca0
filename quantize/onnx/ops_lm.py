"""Float translations of the ops a Hugging Face decoder's exported graph adds: the causal mask
(arange, expand, cumsum, diff, comparisons, boolean and, advanced indexing), rotary tables
(cos, sin), RMSNorm (pow), dtype casts and scaled dot-product attention, all standard ONNX
operators (Range, Expand, CumSum, GatherND, Equal, LessOrEqual, And, Cast, Cos, Sin, Pow,
MatMul, Softmax, Where).

A dynamic dimension read by ``aten.sym_size.int`` is a 0-d int64 value (Shape + Gather), so
``arange(batch)`` and ``expand(x, [batch, -1])`` follow the batch the model is run with.
Scalars next to a tensor take the tensor's element type (an int64 ``arange + 0`` stays int64).
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from solver.errors import UnsupportedExportError

from .context import Context, shape
from .ops import _arg, _axes, aten, handles

_ONNX = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE,
         torch.float16: TensorProto.FLOAT16, torch.int64: TensorProto.INT64,
         torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL}
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
          torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def dtype_of(node: object) -> torch.dtype:
    """The torch dtype of an fx node's value (export metadata)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, (int, torch.SymInt)):  # a size read by sym_size: an int64 scalar
        return torch.int64
    if not isinstance(val, torch.Tensor):
        raise UnsupportedExportError(f"{getattr(node, 'name', node)!r} has no tensor metadata")
    return val.dtype


def _onnx_type(dtype: torch.dtype, where: str) -> int:
    if dtype not in _ONNX:
        raise UnsupportedExportError(f"{where}: dtype {dtype} is not exported")
    return _ONNX[dtype]


def typed(ctx: Context, arg: object, dtype: torch.dtype) -> str:
    """An fx argument as an ONNX value; a Python scalar becomes a constant of ``dtype``."""
    if isinstance(arg, fx.Node):
        return ctx.value(arg)
    if isinstance(arg, (bool, int, float)):
        return ctx.builder.const(arg, _NUMPY.get(dtype, np.float32))
    raise UnsupportedExportError(f"cannot express the argument {arg!r} in ONNX")


def shape_tensor(ctx: Context, items: list, keep: int | None = None) -> str:
    """A 1-D int64 shape from ints and dynamic-size nodes; ``keep`` replaces -1 (Expand: 1)."""
    parts = []
    for d in items:
        if isinstance(d, fx.Node):
            parts.append(ctx.builder.op("Unsqueeze", [ctx.value(d),
                                                      ctx.builder.const([0], np.int64)],
                                        d.name + "_1d"))
        else:
            v = int(d)
            parts.append(ctx.builder.const([keep if v == -1 and keep is not None else v],
                                           np.int64))
    if len(parts) == 1:
        return parts[0]
    return ctx.builder.op("Concat", parts, "shape", axis=0)


@handles(aten.sym_size.int)
def _sym_size(ctx: Context, node: fx.Node) -> str:
    dims = ctx.builder.op("Shape", [ctx.value(node.args[0])], node.name + "_shape")
    return ctx.builder.op("Gather", [dims, ctx.builder.const(int(node.args[1]), np.int64)],
                          node.name, axis=0)


@handles(aten._assert_tensor_metadata.default)
def _no_value(ctx: Context, node: fx.Node) -> tuple:
    return ()  # a check torch.export keeps in the graph; nothing reads it


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ctx: Context, node: fx.Node) -> str:
    dtype = dtype_of(node)
    args = list(node.args)
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args[:2], args[2]
                                                                 if len(args) > 2 else 1)
    if all(isinstance(a, (int, float)) for a in (start, end, step)):
        return ctx.builder.tensor(node.name, np.arange(start, end, step,
                                                       dtype=_NUMPY[dtype]))
    ins = [typed(ctx, a, dtype) for a in (start, end, step)]
    ins = [ctx.builder.op("Cast", [v], node.name + "_cast", to=_onnx_type(dtype, node.name))
           if isinstance(a, fx.Node) and dtype_of(a) != dtype else v
           for a, v in zip((start, end, step), ins, strict=True)]
    return ctx.builder.op("Range", ins, node.name)


@handles(aten.expand.default)
def _expand(ctx: Context, node: fx.Node) -> str:
    target = shape_tensor(ctx, list(node.args[1]), keep=1)  # -1 (keep) is 1 in broadcasting
    return ctx.builder.op("Expand", [ctx.value(node.args[0]), target], node.name)


@handles(aten.slice.Tensor)
def _slice(ctx: Context, node: fx.Node) -> str:
    rank = len(shape(node.args[0]))
    dim = int(_arg(node, 1, "dim", 0)) % rank
    start = _arg(node, 2, "start", None)
    end = _arg(node, 3, "end", None)
    step = int(_arg(node, 4, "step", 1))
    starts = shape_tensor(ctx, [0 if start is None else start])
    ends = shape_tensor(ctx, [2**63 - 1 if end is None else end])
    return ctx.builder.op("Slice", [ctx.value(node.args[0]), starts, ends,
                                    ctx.builder.const([dim], np.int64),
                                    ctx.builder.const([step], np.int64)], node.name)


@handles(aten.diff.default)
def _diff(ctx: Context, node: fx.Node) -> str:
    n, dim = int(_arg(node, 1, "n", 1)), int(_arg(node, 2, "dim", -1))
    prepend, append = _arg(node, 3, "prepend"), _arg(node, 4, "append")
    if n != 1:
        raise UnsupportedExportError(f"{node.name}: diff with n={n} is not exported")
    rank = len(shape(node.args[0]))
    axis = dim % rank
    parts = [ctx.value(a) for a in (prepend, node.args[0], append) if a is not None]
    x = parts[0] if len(parts) == 1 else ctx.builder.op("Concat", parts, node.name + "_cat",
                                                        axis=axis)
    b = ctx.builder

    def part(s: int, e: int, tag: str) -> str:
        return b.op("Slice", [x, b.const([s], np.int64), b.const([e], np.int64),
                              b.const([axis], np.int64)], node.name + tag)

    return b.op("Sub", [part(1, 2**63 - 1, "_hi"), part(0, -1, "_lo")], node.name)


@handles(aten.sum.dim_IntList)
def _sum(ctx: Context, node: fx.Node) -> str:
    """``ReduceSum`` in the result's type (e.g. an encoder's masked mean pooling: a mask
    summed over the tokens)."""
    x, dtype = ctx.value(node.args[0]), dtype_of(node)
    if dtype_of(node.args[0]) != dtype:
        x = ctx.builder.op("Cast", [x], node.name + "_cast", to=_onnx_type(dtype, node.name))
    axes = _axes(_arg(node, 1, "dim"), len(shape(node.args[0])))
    return ctx.builder.op("ReduceSum", [x, ctx.builder.const(axes, np.int64)], node.name,
                          keepdims=int(bool(_arg(node, 2, "keepdim", False))))


@handles(aten.cumsum.default)
def _cumsum(ctx: Context, node: fx.Node) -> str:
    x, dtype = ctx.value(node.args[0]), dtype_of(node)
    if dtype_of(node.args[0]) != dtype:  # e.g. a bool mask summed as int64
        x = ctx.builder.op("Cast", [x], node.name + "_cast", to=_onnx_type(dtype, node.name))
    rank = len(shape(node.args[0]))
    return ctx.builder.op("CumSum", [x, ctx.builder.const(int(node.args[1]) % rank, np.int64)],
                          node.name)


def _compare(op: str, negate: bool = False):  # noqa: ANN202 - a translator
    def fn(ctx: Context, node: fx.Node) -> str:
        dtype = dtype_of(node.args[0])
        out = ctx.builder.op(op, [typed(ctx, a, dtype) for a in node.args[:2]],
                             node.name + ("_eq" if negate else ""))
        return ctx.builder.op("Not", [out], node.name) if negate else out
    return fn


for _t, _op, _neg in [
    (aten.eq.Tensor, "Equal", False), (aten.eq.Scalar, "Equal", False),
    (aten.ne.Tensor, "Equal", True), (aten.ne.Scalar, "Equal", True),
    (aten.le.Tensor, "LessOrEqual", False), (aten.le.Scalar, "LessOrEqual", False),
    (aten.lt.Tensor, "Less", False), (aten.lt.Scalar, "Less", False),
    (aten.ge.Tensor, "GreaterOrEqual", False), (aten.ge.Scalar, "GreaterOrEqual", False),
    (aten.gt.Tensor, "Greater", False), (aten.gt.Scalar, "Greater", False),
]:
    handles(_t)(_compare(_op, _neg))


@handles(aten.__and__.Tensor, aten.logical_and.default, aten.bitwise_and.Tensor)
def _and(ctx: Context, node: fx.Node) -> str:
    if dtype_of(node) != torch.bool:
        raise UnsupportedExportError(f"{node.name}: a bitwise and of integers is not exported")
    return ctx.builder.op("And", [ctx.value(a) for a in node.args[:2]], node.name)


@handles(aten.new_ones.default, aten.new_zeros.default, aten.ones.default, aten.zeros.default)
def _filled(ctx: Context, node: fx.Node) -> str:
    size = node.args[1] if "new_" in str(node.target) else node.args[0]
    if not all(isinstance(d, int) for d in size):
        raise UnsupportedExportError(f"{node.name}: a filled tensor of dynamic size")
    fill = 1 if "ones" in str(node.target) else 0
    return ctx.builder.tensor(node.name, np.full([int(d) for d in size], fill,
                                                 _NUMPY[dtype_of(node)]))


@handles(aten.full.default)
def _full(ctx: Context, node: fx.Node) -> str:
    size, fill = node.args[0], node.args[1]
    if not all(isinstance(d, int) for d in size):
        raise UnsupportedExportError(f"{node.name}: a filled tensor of dynamic size")
    return ctx.builder.tensor(node.name, np.full([int(d) for d in size], fill,
                                                 _NUMPY[dtype_of(node)]))


@handles(aten.full_like.default, aten.ones_like.default, aten.zeros_like.default)
def _full_like(ctx: Context, node: fx.Node) -> str:
    """``ConstantOfShape(Shape(x))`` with the fill value in the result's type (the shape may
    be dynamic: the batch); ``ones_like`` / ``zeros_like`` fill 1 / 0 (e.g. an all-ones
    attention mask built from the ids)."""
    from onnx import numpy_helper

    target = str(node.target)
    fill = 1 if "ones_like" in target else 0 if "zeros_like" in target else node.args[1]
    dims = ctx.builder.op("Shape", [ctx.value(node.args[0])], node.name + "_shape")
    value = numpy_helper.from_array(np.full([1], fill, _NUMPY[dtype_of(node)]))
    return ctx.builder.op("ConstantOfShape", [dims], node.name, value=value)


@handles(aten.gather.default)
def _gather(ctx: Context, node: fx.Node) -> str:
    """``torch.gather(x, dim, index)`` is ONNX ``GatherElements`` on axis ``dim`` (e.g. BERT's
    token-type ids gathered at the position ids)."""
    rank = len(shape(node.args[0]))
    return ctx.builder.op("GatherElements", [ctx.value(node.args[0]), ctx.value(node.args[2])],
                          node.name, axis=int(node.args[1]) % rank)


@handles(aten.scalar_tensor.default)
def _scalar_tensor(ctx: Context, node: fx.Node) -> str:
    return ctx.builder.tensor(node.name, np.array(node.args[0], _NUMPY[dtype_of(node)]))


@handles(aten.where.self)
def _where(ctx: Context, node: fx.Node) -> str:
    dtype = dtype_of(node)
    return ctx.builder.op("Where", [ctx.value(node.args[0])] +
                          [typed(ctx, a, dtype) for a in node.args[1:3]], node.name)


@handles(aten.logical_not.default)
def _not(ctx: Context, node: fx.Node) -> str:
    return ctx.builder.op("Not", [ctx.value(node.args[0])], node.name)


@handles(aten.any.dim)
def _any(ctx: Context, node: fx.Node) -> str:
    """ReduceMax of the values cast to int32 (ONNX has no ReduceAny), back to bool."""
    rank = len(shape(node.args[0]))
    axis = int(_arg(node, 1, "dim")) % rank
    keep = int(bool(_arg(node, 2, "keepdim", False)))
    b = ctx.builder
    ints = b.op("Cast", [ctx.value(node.args[0])], node.name + "_int", to=TensorProto.INT32)
    top = b.op("ReduceMax", [ints, b.const([axis], np.int64)], node.name + "_max",
               keepdims=keep)
    return b.op("Cast", [top], node.name, to=TensorProto.BOOL)


@handles(operator.mul)
def _sym_mul(ctx: Context, node: fx.Node) -> str:
    """A product of sizes (a dynamic dim read by sym_size times an int): int64 scalars."""
    return ctx.builder.op("Mul", [typed(ctx, a, torch.int64) for a in node.args[:2]],
                          node.name)


@handles(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
         aten.type_as.default)
def _to(ctx: Context, node: fx.Node) -> str:
    x = ctx.value(node.args[0])
    if dtype_of(node) == dtype_of(node.args[0]):
        return ctx.builder.op("Identity", [x], node.name)
    return ctx.builder.op("Cast", [x], node.name, to=_onnx_type(dtype_of(node), node.name))


@handles(aten.cos.default, aten.sin.default)
def _trig(ctx: Context, node: fx.Node) -> str:
    op = "Cos" if node.target == aten.cos.default else "Sin"
    return ctx.builder.op(op, [ctx.value(node.args[0])], node.name)


@handles(aten.pow.Tensor_Scalar)
def _pow(ctx: Context, node: fx.Node) -> str:
    dtype = dtype_of(node.args[0])
    return ctx.builder.op("Pow", [ctx.value(node.args[0]), typed(ctx, node.args[1], dtype)],
                          node.name)


@handles(aten.index.Tensor)
def _index(ctx: Context, node: fx.Node) -> str:
    """``x[i0, i1, ...]`` with tensor indices on the leading dims: the indices broadcast
    against each other (added to a zero of their common shape), stacked on a last axis, and
    one GatherND."""
    idx = list(node.args[1])
    if any(i is None for i in idx):
        raise UnsupportedExportError(f"{node.name}: indexing with None (a slice) is not "
                                     "exported")
    b = ctx.builder
    vals = [ctx.value(i) for i in idx]
    zero = None
    for v, i in zip(vals, idx, strict=True):
        z = b.op("Mul", [v, b.const(0, _NUMPY[dtype_of(i)])], node.name + "_zero")
        zero = z if zero is None else b.op("Add", [zero, z], node.name + "_zero")
    cols = [b.op("Unsqueeze", [b.op("Add", [v, zero], node.name + "_bcast"),
                               b.const([-1], np.int64)], node.name + "_col") for v in vals]
    stacked = cols[0] if len(cols) == 1 else b.op("Concat", cols, node.name + "_idx", axis=-1)
    return b.op("GatherND", [ctx.value(node.args[0]), stacked], node.name)


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(ctx: Context, node: fx.Node) -> str:
    """softmax(q k^T * scale + mask) v: a boolean mask keeps where True (Where with the float
    minimum elsewhere), a float mask is added, ``is_causal`` is a lower-triangular mask."""
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    if float(_arg(node, 4, "dropout_p", 0.0)) != 0.0:
        raise UnsupportedExportError(f"{node.name}: attention dropout is not exported")
    if _arg(node, 7, "enable_gqa", False):
        raise UnsupportedExportError(f"{node.name}: enable_gqa attention is not exported")
    scale = _arg(node, 6, "scale")
    e = shape(q)[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(e)
    b = ctx.builder
    rank = len(shape(k))
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    kt = b.op("Transpose", [ctx.value(k)], node.name + "_kt", perm=perm)
    scores = b.op("Mul", [b.op("MatMul", [ctx.value(q), kt], node.name + "_qk"),
                          b.const(scale)], node.name + "_scaled")
    low = b.const(float(np.finfo(np.float32).min))
    if _arg(node, 5, "is_causal", False):
        lq, lk = shape(q)[-2], shape(k)[-2]
        tri = np.tril(np.ones((lq, lk), dtype=np.bool_))
        scores = b.op("Where", [b.tensor(node.name + "_causal", tri), scores, low],
                      node.name + "_causal")
    if mask is not None:
        if dtype_of(mask) == torch.bool:
            scores = b.op("Where", [ctx.value(mask), scores, low], node.name + "_masked")
        else:
            scores = b.op("Add", [scores, ctx.value(mask)], node.name + "_masked")
    probs = b.op("Softmax", [scores], node.name + "_probs", axis=-1)
    return b.op("MatMul", [probs, ctx.value(v)], node.name)
