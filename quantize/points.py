"""Where the integer model materialises tensors, and on which grid (scale, bits, signedness).

Both the fake-quant module and the integer reference quantize at exactly these points, which is
what makes their outputs agree to within one LSB:

- the input of every quantized layer, on the layer's calibrated input grid;
- the output of every quantized layer (after its folded BN), on the grid ``S_out``;
- every residual ``add`` whose two inputs are quantized (each input requantised onto the add's
  grid, then summed and clamped);
- every ``mean`` (global average pool) of a quantized tensor (integer sum, dyadic rescale);
  adds and pools only where their result reaches a quantized layer (directly or through
  other such points), so a float tail of a partly quantized model sees no extra rounding.

Choosing ``S_out``: starting at the producer, follow single-user ops that do not change the
grid (ReLU, flatten, view/reshape, clone): these commute with rounding onto a grid (ReLU after
clamping to an unsigned grid is the clamp itself). If the tensor at the end of that chain is
read by a quantized layer, the producer writes straight onto that layer's input grid (so no
second requantisation is needed). Otherwise (it feeds an add, a pool, a float op, or the model
output) the grid is calibrated on that tensor with ``QuantizeConfig.out_bits`` (``final_bits``
for a model output, 16 by default, as runtimes keep logits wide). An average pool
is not treated as transparent: its input spans a wider range than its output, so the pool
input gets its own grid and the pool rescales onto its consumer's grid.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from .graph import GraphLayer
from .primitives import activation_qrange

aten = torch.ops.aten

TRANSPARENT_OPS = {
    aten.relu.default,
    aten.relu_.default,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.alias.default,
}
RELU_OPS = {aten.relu.default, aten.relu_.default}
ADD_OPS = {aten.add.Tensor}
POOL_OPS = {aten.mean.dim}


@dataclass(frozen=True)
class Grid:
    """A per-tensor integer grid: value = code * scale, codes in ``qrange``."""

    scale: float
    bits: int
    signed: bool

    @property
    def qrange(self) -> tuple[int, int]:
        return activation_qrange(self.bits, self.signed)

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "bits": int(self.bits), "signed": bool(self.signed)}

    @classmethod
    def from_dict(cls, obj: dict) -> Grid:
        return cls(float(obj["scale"]), int(obj["bits"]), bool(obj["signed"]))


@dataclass(frozen=True)
class Point:
    """A materialisation point: the fx node that produces a new grid."""

    node: str  # producer node (the layer op, the add, the mean)
    kind: str  # "layer" | "add" | "pool"
    end: str  # last node of the grid-preserving chain after the producer
    layer: str | None = None  # layer name for kind == "layer"
    consumer: str | None = None  # quantized layer whose input grid this point writes onto
    final: bool = False  # the chain end is a model output


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in ADD_OPS
        and len(node.args) == 2
        and all(isinstance(a, fx.Node) for a in node.args)
        and node.kwargs.get("alpha", 1) == 1
    )


def chain_end(node: fx.Node) -> fx.Node:
    """Follow single-user grid-preserving ops from ``node``."""
    end = node
    while len(end.users) == 1:
        user = next(iter(end.users))
        if user.op != "call_function" or user.target not in TRANSPARENT_OPS:
            break
        if user.args[0] is not end:
            break
        end = user
    return end


def find_points(gm: fx.GraphModule, layers: dict[str, GraphLayer]) -> list[Point]:
    """The materialisation points of ``gm`` (BN already removed) for the quantized ``layers``."""
    by_node = {layer.node: layer for layer in layers.values()}
    quantized: set[str] = set()  # nodes whose value lies on a quantized grid
    points: list[Point] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kind = None
        if node.name in by_node:
            kind = "layer"
        elif node.target in TRANSPARENT_OPS:
            if isinstance(node.args[0], fx.Node) and node.args[0].name in quantized:
                quantized.add(node.name)
            continue
        elif _is_add(node) and all(a.name in quantized for a in node.args):
            kind = "add"
        elif (
            node.target in POOL_OPS
            and isinstance(node.args[0], fx.Node)
            and node.args[0].name in quantized
        ):
            kind = "pool"
        if kind is None:
            continue
        quantized.add(node.name)
        end = chain_end(node)
        consumer = None
        for user in end.users:
            if user.name in by_node and user.args[0] is end:
                consumer = by_node[user.name].name
                break
        layer = by_node[node.name].name if kind == "layer" else None
        final = any(u.op == "output" for u in end.users)
        points.append(Point(node.name, kind, end.name, layer, consumer, final))
    return _prune(gm, points, set(by_node))


def _prune(gm: fx.GraphModule, points: list[Point], layer_nodes: set[str]) -> list[Point]:
    """Drop add / pool points whose result never reaches a quantized layer: where the integer
    part of the model hands over to float ops, rounding an add or a pool again is only error.
    Layer outputs are always kept (the integer model's layers write integer outputs)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    kept: set[str] = set(layer_nodes)
    out: list[Point] = []
    for p in reversed(points):
        if p.kind != "layer":
            users = nodes[p.end].users
            if not any(u.name in kept for u in users):
                continue
        kept.add(p.node)
        out.append(p)
    return out[::-1]


@dataclass(frozen=True)
class EndValue:
    """Where a possible free point's value lives in the unfolded graph: ``node`` (the BN's
    output for a layer with a BN, as folding makes the layer op return it), and ``input_of``,
    a layer whose input is that same value (its input statistics then are the point's)."""

    node: str
    input_of: str | None = None


def _bn_output(node: fx.Node) -> fx.Node | None:
    """The node holding the output of the BN right after layer op ``node`` (a BN variant
    returning a tuple: its ``getitem(bn, 0)``); None when it cannot be told."""
    from .graph import _BN_OPS  # the BN ops find_layers folds

    users = list(node.users)
    if len(users) != 1 or users[0].target not in _BN_OPS or users[0].args[0] is not node:
        return None
    bn = users[0]
    if bn.target == aten.batch_norm.default:
        return bn
    outs = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
    return outs[0] if len(outs) == 1 else None


def point_ends(gm: fx.GraphModule, layers: Sequence[GraphLayer]) -> dict[str, EndValue]:
    """Every node that can be a free point's chain end once some of ``layers`` are quantized
    and BN-folded (``find_points`` on the folded graph), by its name on the folded graph, with
    where its value lives in the unfolded ``gm`` (which still has its BatchNorms).

    A point starts at a layer op, an ``add`` or a ``mean``, and its chain end depends on the
    graph alone, not on which layers are quantized (``chain_end``); folding a layer removes
    its BN, so the layer op takes the BN output's place: the chain then starts at the BN
    output, and ends at the op itself when nothing transparent follows. A layer whose BN
    cannot be located is left out (its points are calibrated on the folded model)."""
    by_node = {layer.node: layer for layer in layers}
    inputs: dict[str, str] = {}  # node name -> a layer reading it as its input
    for node in gm.graph.nodes:
        if node.name in by_node and node.args and isinstance(node.args[0], fx.Node):
            inputs.setdefault(node.args[0].name, by_node[node.name].name)
    ends: dict[str, EndValue] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        start: fx.Node | None = node
        if node.name in by_node:
            if by_node[node.name].bn is not None:
                start = _bn_output(node)
        elif not (_is_add(node) or (node.target in POOL_OPS and node.args
                                    and isinstance(node.args[0], fx.Node))):
            continue
        if start is None:
            continue
        end = chain_end(start)
        key = node.name if end is start else end.name
        ends[key] = EndValue(end.name, inputs.get(end.name))
    return ends
