"""A small ONNX graph builder: unique names, initializers, and the Q/DQ pairs of a grid.

Everything the exporter writes goes through :class:`GraphBuilder`, so initializer bytes and
node names are managed in one place. Types of a grid (``quantize.points.Grid``):

======  ==========  ============
bits    signed      unsigned
======  ==========  ============
2..4    INT4        UINT4
5..8    INT8        UINT8
9..16   INT16       UINT16
======  ==========  ============

ONNX's QuantizeLinear saturates to the whole type range; where a grid is narrower (fewer bits
than the type, e.g. a 6-bit grid in UINT8) a ``Clip`` to the grid's range comes first, so the
codes equal the checkpoint's. A symmetric signed grid (``[-(2^(b-1)-1), 2^(b-1)-1]``) at a
full type width is not clipped: only a value more than 2^(b-1)-1/2 steps below zero, i.e.
outside the calibrated range, lands one code lower (-2^(b-1)) than in the checkpoint, and
leaving the Clip out lets ONNX Runtime fuse the int8 paths (a Clip between a Conv and its
output QuantizeLinear stops QLinearConv fusion).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..points import Grid

OPSET = 21
IR_VERSION = 10


def grid_type(grid: Grid) -> int:
    """The ONNX element type that holds the grid's codes."""
    if grid.bits <= 4:
        return TensorProto.INT4 if grid.signed else TensorProto.UINT4
    if grid.bits <= 8:
        return TensorProto.INT8 if grid.signed else TensorProto.UINT8
    return TensorProto.INT16 if grid.signed else TensorProto.UINT16


def _type_range(elem: int) -> tuple[int, int]:
    return {
        TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
        TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
        TensorProto.INT16: (-32768, 32767), TensorProto.UINT16: (0, 65535),
    }[elem]


def needs_clip(grid: Grid) -> bool:
    """Whether QuantizeLinear alone would allow codes beyond the grid's positive end or beyond
    its negative end by more than the one extra code of a full-width signed type."""
    lo, hi = grid.qrange
    t_lo, t_hi = _type_range(grid_type(grid))
    return hi < t_hi or lo > t_lo + 1


@dataclass
class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one ONNX graph."""

    name: str = "bitplan"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    _used: set[str] = field(default_factory=set)
    _consts: dict[tuple, str] = field(default_factory=dict)
    # value name -> grid, for values that are the direct output of a DequantizeLinear
    dq_grid: dict[str, Grid] = field(default_factory=dict)
    # <= 4-bit per-channel weights: packed INT4 initializer -> Cast(INT8) -> DequantizeLinear,
    # which ONNX Runtime folds at load into an INT8 weight of its QLinearConv / QLinearMatMul
    # (False: DequantizeLinear of the INT4 codes, a float Conv in ONNX Runtime 1.31)
    int8_kernels: bool = True

    def fresh(self, base: str) -> str:
        base = base.replace("/", "_") or "v"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def node(self, op: str, inputs: list[str], base: str, n_out: int = 1,
             **attrs: object) -> list[str]:
        """Append a node; returns its output names."""
        outs = [self.fresh(f"{base}" if n_out == 1 else f"{base}_{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"{base}_{op}"),
                                           **attrs))
        return outs

    def op(self, op: str, inputs: list[str], base: str, **attrs: object) -> str:
        return self.node(op, inputs, base, 1, **attrs)[0]

    def tensor(self, base: str, array: np.ndarray) -> str:
        """A float / int initializer from a numpy array (its dtype kept)."""
        name = self.fresh(base)
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
            array = array.copy(order="C")
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def raw(self, base: str, elem: int, dims: list[int], data: bytes) -> str:
        """An initializer from raw bytes (packed INT4: two per byte, low nibble first)."""
        name = self.fresh(base)
        self.initializers.append(helper.make_tensor(name, elem, dims, data, raw=True))
        return name

    def const(self, value: float | int | list, dtype: type = np.float32) -> str:
        """A shared small constant initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor("const", arr)
        return self._consts[key]

    def zero_point(self, grid: Grid) -> str:
        elem = grid_type(grid)
        key = ("zp", elem)
        if key not in self._consts:
            width = 2 if elem in (TensorProto.INT16, TensorProto.UINT16) else 1
            self._consts[key] = self.raw("zp_" + TensorProto.DataType.Name(elem).lower(),
                                         elem, [], b"\x00" * width)
        return self._consts[key]

    def clip(self, value: str, grid: Grid, base: str) -> str:
        """``value`` clipped to the grid's range (in float). Before a 4-bit QuantizeLinear
        this is Max + Min, not Clip: ONNX Runtime 1.31's Clip + Q fusion fails on 4-bit zero
        points ("Unexpected data type for QuantizeLinear input y_zero_point")."""
        lo, hi = (self.const(v * grid.scale) for v in grid.qrange)
        if grid.bits <= 4:
            return self.op("Min", [self.op("Max", [value, lo], base + "_max"), hi], base + "_min")
        return self.op("Clip", [value, lo, hi], base + "_clip")

    def quantize(self, value: str, grid: Grid, base: str, exact: bool = False) -> str:
        """QuantizeLinear onto ``grid`` (after a Clip where the grid is narrower than its
        type, or always with ``exact``); returns the integer codes' value name."""
        scale = self.const(float(grid.scale))
        if exact or needs_clip(grid):
            value = self.clip(value, grid, base)
        return self.op("QuantizeLinear", [value, scale, self.zero_point(grid)], base + "_q")

    def dequantize(self, codes: str, grid: Grid, base: str) -> str:
        scale = self.const(float(grid.scale))
        out = self.op("DequantizeLinear", [codes, scale, self.zero_point(grid)], base + "_dq")
        self.dq_grid[out] = grid
        return out

    def qdq(self, value: str, grid: Grid, base: str, wide: bool = False) -> str:
        """``value`` rounded onto ``grid`` (Q then DQ); a value already the output of a DQ on
        the same grid is returned as it is. With ``wide``, a <= 4-bit grid is stored in the
        8-bit type (clipped to the grid's range: the same values), for the inputs of float
        ops that ONNX Runtime would otherwise fuse into int4 kernels it does not have."""
        if wide and grid.bits <= 4:
            store = Grid(grid.scale, 8, grid.signed)
            if self.dq_grid.get(value) == store:
                return value
            clipped = self.clip(value, grid, base)
            return self.dequantize(self.quantize(clipped, store, base), store, base)
        if self.dq_grid.get(value) == grid:
            return value
        return self.dequantize(self.quantize(value, grid, base), grid, base)

    def widened(self, value: str, grid: Grid) -> str:
        """A <= 4-bit DQ output re-quantized to the 8-bit type on the same scale (exact:
        every code of the narrow grid is a code of the wide one); cached per value."""
        key = ("widened", value)
        if key not in self._consts:
            wide = Grid(grid.scale, 8, grid.signed)
            self._consts[key] = self.dequantize(self.quantize(value, wide, value + "_w8"),
                                                wide, value + "_w8")
        return self._consts[key]

    def model(self, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bitplan", doc_string=doc)
        m.ir_version = IR_VERSION
        return m
