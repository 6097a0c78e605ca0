"""The layer table: one ``LayerInfo`` per quantizable layer of the graph, with its per-sample
input and output shapes (recorded on one calibration batch) and multiply-accumulates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from quantize.data import CalibrationSet
from quantize.graph import GraphLayer
from solver.errors import BadModelError


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer. Shapes are per sample (batch dimension removed); ``macs`` are
    multiply-accumulates per sample."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    groups: int
    params: int
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    out_channels: int
    bn: str | None
    graph: GraphLayer = field(repr=False, compare=False)

    @property
    def input_numel(self) -> int:
        return math.prod(self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape),
            "groups": self.groups, "params": self.params, "macs": self.macs,
            "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
            "out_channels": self.out_channels, "bn": self.bn,
        }


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and records the input and output shapes of the layer nodes."""

    def __init__(self, gm: fx.GraphModule, nodes: set[str]) -> None:
        super().__init__(gm)
        self.nodes = nodes
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.nodes:
            x = self.env[n.args[0]]
            self.shapes[n.name] = (tuple(x.shape), tuple(out.shape))
        return out


def _per_sample(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    if shape and shape[0] == batch:
        return shape[1:]
    # Batch merged into the first dim (e.g. [B*T, D] before a linear): report [T, D].
    if shape and shape[0] % batch == 0:
        return (shape[0] // batch,) + shape[1:]
    return shape


def layer_table(gm: fx.GraphModule, layers: list[GraphLayer], calib: CalibrationSet,
                batch_size: int | None) -> tuple[list[LayerInfo], tuple[int, ...], torch.Tensor]:
    """The table for ``layers``, the model's per-sample output shape and its output on one
    batch of ``calib`` (positional inputs, see ``inputs.positional``)."""
    size = batch_size or min(len(calib), 2)
    batch = next(calib.batches(size, fixed=batch_size is not None))
    rec = _ShapeRecorder(gm, {layer.node for layer in layers})
    with torch.no_grad():
        try:
            out = rec.run(*batch.args)
        except Exception as exc:
            raise BadModelError(
                f"the model failed on the calibration data ({type(exc).__name__}: "
                f"{str(exc)[:300]})."
            ) from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    infos = []
    for layer in layers:
        xs, ys = rec.shapes[layer.node]
        x_ps, y_ps = _per_sample(xs, size), _per_sample(ys, size)
        w = layer.weight_shape
        out_numel = math.prod(ys) // size
        if layer.kind == "linear":
            macs = out_numel * w[1]
        else:
            macs = out_numel * w[1] * math.prod(w[2:])  # w[1] is already Cin / groups
        infos.append(LayerInfo(
            name=layer.name, kind=layer.kind, weight_shape=w, groups=layer.groups,
            params=math.prod(w), macs=int(macs), input_shape=x_ps, output_shape=y_ps,
            out_channels=w[0], bn=layer.bn, graph=layer,
        ))
    return infos, tuple(out.shape[1:]), out


FLOAT_SHARE_LISTED = 0.01  # a parameter left in float is listed from 1 % of all parameters


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "_opname", getattr(node.target, "__name__", node.target)))


def float_params(gm: fx.GraphModule, layers: list[GraphLayer]) -> list[dict[str, Any]]:
    """The parameters that stay in floating point, from ``FLOAT_SHARE_LISTED`` of the model's
    parameters up, largest first: ``{name, op, params, share}`` with ``op`` the aten op that
    reads it in float (``embedding`` for token tables, which stay in floating point by design).
    A table tied to a quantized layer (GPT-2's ``wte`` / ``lm_head``) is listed for its float
    use, with ``tied_to`` naming the layer that quantizes its other use."""
    by_id: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    params = dict(gm.named_parameters())
    fqn_id = {name: i for i, names in by_id.items() for name in names}
    layer_of = {fqn_id[w]: layer.name for layer in layers
                for w in (layer.weight, layer.bias) if w in fqn_id}
    layer_nodes = {layer.node for layer in layers}
    float_ops: dict[int, str] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or str(node.target) not in fqn_id:
            continue
        users = [u for u in node.users if u.op == "call_function" and u.name not in layer_nodes]
        if users:
            float_ops.setdefault(fqn_id[str(node.target)], _op_name(users[0]))
    read = {fqn_id[str(n.target)] for n in gm.graph.nodes
            if n.op == "get_attr" and str(n.target) in fqn_id}
    params = {name: p for name, p in params.items() if id(p) in read}  # unread aliases dropped
    total = sum(int(p.numel()) for p in params.values()) or 1
    out = []
    for name, p in params.items():
        share = int(p.numel()) / total
        key = id(p)
        if share < FLOAT_SHARE_LISTED or key not in float_ops:
            continue
        row = {"name": name, "op": float_ops[key], "params": int(p.numel()),
               "share": round(share, 4)}
        if key in layer_of:
            row["tied_to"] = layer_of[key]
        out.append(row)
    return sorted(out, key=lambda d: -d["params"])
