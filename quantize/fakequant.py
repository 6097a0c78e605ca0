"""The runnable fake-quant module rebuilt from a checkpoint and the exported program.

It computes in floating point but rounds at exactly the points the integer model materialises
tensors (``quantize.points``), with the checkpoint's scales:

- each quantized layer: BN node removed, weight = codes * S_w, bias = bias_q * S_w * S_in (the
  bias the integer model adds, so rounding it is simulated too), input fake-quantized on its
  input grid, output rounded onto its output grid;
- residual adds: each input rounded onto the add's grid, summed, clamped (two requantisations);
- global average pools: the float mean, rounded onto the next grid by the consumer's input
  quantizer (or onto the pool's own grid);
- DRQ rows: the op becomes ``quantize.drq.DRQConv2d`` (folded float bias, dequantized weight).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from solver.errors import BadCheckpointError, BadModelError

from .calibrate import insert_after
from .checkpoint import Checkpoint
from .fold import remove_bn, set_layer_params
from .graph import GraphLayer, find_layers, insert_input_modules, module_name, node_by_name
from .points import Grid
from .primitives import fake_quantize_activation
from .rows import PlanRow, match_rows


class FakeQuant(nn.Module):
    """Rounds its input onto a per-tensor grid (straight-through gradient)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.scale, self.bits, self.signed = grid.scale, grid.bits, grid.signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.scale, self.bits, self.signed)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, bits={self.bits}, signed={self.signed}"


class QuantAdd(nn.Module):
    """``a + b`` as the integer model computes it: each input requantised onto the grid, then
    summed and clamped to the grid's range."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.scale, self.bits, self.signed = grid.scale, grid.bits, grid.signed
        self.lo, self.hi = grid.qrange

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q = torch.round(a / self.scale) + torch.round(b / self.scale)
        return q.clamp(self.lo, self.hi) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, bits={self.bits}, signed={self.signed}"


def prepare(
    program: torch.export.ExportedProgram, ckpt: Checkpoint
) -> tuple[fx.GraphModule, dict[str, GraphLayer], dict[str, PlanRow]]:
    """A fresh module of ``program`` with the checkpoint's layers matched and their BN removed."""
    gm = program.module()
    layers = find_layers(gm)
    rows = match_rows(list(ckpt.rows.values()), layers)
    qlayers = {layer.name: layer for layer in layers if layer.name in rows}
    for name, layer in qlayers.items():
        if tuple(layer.weight_shape) != ckpt.weight_shape(name):
            raise BadCheckpointError(
                f"checkpoint layer {name!r} has weight shape {ckpt.weight_shape(name)} but the "
                f"model's is {tuple(layer.weight_shape)}; was it made for another model?"
            )
        if (layer.bn is not None) != bool(ckpt.quant["layers"][name].get("bn")):
            raise BadCheckpointError(f"layer {name!r}: BatchNorm folding disagrees with the model")
        if layer.bn is not None:
            remove_bn(gm, layer)
    gm.graph.lint()
    gm.recompile()
    return gm, qlayers, rows


def _drq_module(layer: GraphLayer, row: PlanRow, ckpt: Checkpoint) -> nn.Module:
    try:
        from quantize.drq import DRQConv2d
    except ImportError as exc:  # written by another package owner; report clearly if absent
        raise BadModelError(
            f"layer {layer.name!r} uses DRQ but quantize.drq.DRQConv2d is not available ({exc})"
        ) from exc
    assert row.drq is not None
    grid = ckpt.input_grid(layer.name)
    return DRQConv2d(
        ckpt.dequantized_weight(layer.name),
        ckpt.tensors[f"{layer.name}.bias"].clone(),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        input_scale=grid.scale,
        input_signed=grid.signed,
        region=row.drq.region,
        threshold=row.drq.threshold,
        w_bits=row.w_bits,
        high_bits=row.drq.high_bits,
        low_bits=row.drq.low_bits,
    )


def build_fake_quant(program: torch.export.ExportedProgram, ckpt: Checkpoint) -> fx.GraphModule:
    """The fake-quant GraphModule for ``ckpt`` on ``program``.

    Raises BadPlanError / BadCheckpointError when the checkpoint does not fit the model.
    """
    gm, qlayers, rows = prepare(program, ckpt)
    for name, layer in qlayers.items():
        s_w = ckpt.tensors[f"{name}.weight_scale"].to(torch.float64)
        s_in = float(ckpt.tensors[f"{name}.input_scale"])
        bias = (ckpt.tensors[f"{name}.bias_q"].to(torch.float64) * s_w * s_in).to(torch.float32)
        set_layer_params(gm, layer, ckpt.dequantized_weight(name), bias)
    adds: dict[str, Grid] = {}
    after: dict[str, nn.Module] = {}
    for point, grid in ckpt.points():
        if point.kind == "add":
            adds[point.node] = grid
        else:
            after[point.node] = FakeQuant(grid)
    for node_name, grid in adds.items():
        node = node_by_name(gm, node_name)
        target = f"_bitplan_add_{node_name}"
        gm.add_submodule(target, QuantAdd(grid))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, tuple(node.args))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    insert_after(gm, after, "outq")
    plain = {n: FakeQuant(ckpt.input_grid(n)) for n, row in rows.items() if row.drq is None}
    insert_input_modules(gm, list(qlayers.values()), plain, "inq")
    for name, row in rows.items():
        if row.drq is None:
            continue
        layer = qlayers[name]
        op = node_by_name(gm, layer.node)
        target = module_name(name, "drq")
        gm.add_submodule(target, _drq_module(layer, row, ckpt))
        with gm.graph.inserting_before(op):
            new = gm.graph.call_module(target, (op.args[0],))
        op.replace_all_uses_with(new)
        gm.graph.erase_node(op)
    gm.graph.lint()
    gm.recompile()
    return gm
