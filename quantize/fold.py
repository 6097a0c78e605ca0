"""BatchNorm folding, as a pure tensor function and as a rewrite of an exported graph.

For a conv (or linear) followed by BN in eval mode,
``BN(conv(x, W) + bias) = conv(x, W') + bias'`` with, per output channel,
``W' = W * gamma / sqrt(var + eps)`` and ``bias' = beta + (bias - mean) * gamma / sqrt(var + eps)``
(``bias = 0`` when the conv has none). The graph rewrite removes the BN node and points the op
at new (root-level) weight / bias attributes, so a weight shared with another op is never
modified in place.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx

from solver.errors import BadModelError

from .graph import _BN_OPS, GraphLayer, node_by_name

aten = torch.ops.aten


def fold_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded ``(W', bias')`` in the weight's dtype; computed in float64 to lose nothing.

    ``weight`` is ``[out, ...]``; ``gamma``/``beta`` may be None (BN without affine).
    """
    out = weight.shape[0]
    w64 = weight.detach().to(torch.float64)
    ones = torch.ones(out, dtype=torch.float64, device=weight.device)
    g = ones if gamma is None else gamma.detach().to(torch.float64)
    be = torch.zeros_like(ones) if beta is None else beta.detach().to(torch.float64)
    b = torch.zeros_like(ones) if bias is None else bias.detach().to(torch.float64)
    factor = g / torch.sqrt(var.detach().to(torch.float64) + eps)
    w_f = w64 * factor.reshape((-1,) + (1,) * (weight.dim() - 1))
    b_f = be + (b - mean.detach().to(torch.float64)) * factor
    return w_f.to(weight.dtype), b_f.to(weight.dtype)


def fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor behind a ``get_attr`` target (a dotted FQN)."""
    return functools.reduce(getattr, target.split("."), gm)


def _attr(node: object) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def bn_node(gm: fx.GraphModule, layer: GraphLayer) -> fx.Node:
    """The BN node that directly follows ``layer``'s op (``layer.bn`` must be set)."""
    op = node_by_name(gm, layer.node)
    users = list(op.users)
    if len(users) != 1 or users[0].target not in _BN_OPS:
        raise BadModelError(f"layer {layer.name!r}: expected a BatchNorm right after the op")
    return users[0]


def bn_params(
    gm: fx.GraphModule, layer: GraphLayer
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, float]:
    """(gamma, beta, running_mean, running_var, eps) of the BN after ``layer``."""
    bn = bn_node(gm, layer)
    names = [_attr(a) for a in bn.args[1:5]]
    if names[2] is None or names[3] is None:
        raise BadModelError(f"BatchNorm after {layer.name!r} has no running statistics")
    gamma = None if names[0] is None else fetch(gm, names[0])
    beta = None if names[1] is None else fetch(gm, names[1])
    return gamma, beta, fetch(gm, names[2]), fetch(gm, names[3]), float(layer.bn_eps or 1e-5)


def remove_bn(gm: fx.GraphModule, layer: GraphLayer) -> None:
    """Delete the BN node after ``layer``'s op; its users read the op's output instead."""
    if layer.bn_training:
        raise BadModelError(
            f"the BatchNorm after {layer.name!r} was exported in training mode (batch "
            "statistics); export the model after model.eval() so BN can be folded"
        )
    op = node_by_name(gm, layer.node)
    bn = bn_node(gm, layer)
    if bn.target == aten.batch_norm.default:
        bn.replace_all_uses_with(op)
    else:  # the _native_batch_norm_legit* variants return (out, saved_mean, saved_invstd)
        for user in list(bn.users):
            if user.target is not operator.getitem:
                raise BadModelError(f"unexpected use of the BatchNorm after {layer.name!r}")
            if user.args[1] != 0:
                if user.users:
                    raise BadModelError(
                        f"the BatchNorm after {layer.name!r} exposes its batch statistics; "
                        "it cannot be folded"
                    )
            else:
                user.replace_all_uses_with(op)
            gm.graph.erase_node(user)
    gm.graph.erase_node(bn)


def set_layer_params(
    gm: fx.GraphModule, layer: GraphLayer, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Point ``layer``'s op at new root attributes holding ``weight`` and ``bias``."""
    op = node_by_name(gm, layer.node)
    key = layer.name.replace(".", "_")
    wname, bname = f"_bitplan_w_{key}", f"_bitplan_b_{key}"
    gm.register_buffer(wname, weight.detach().clone())
    args = list(op.args) + [None] * max(0, 3 - len(op.args))
    with gm.graph.inserting_before(op):
        args[1] = gm.graph.get_attr(wname)
        if bias is not None:
            gm.register_buffer(bname, bias.detach().clone())
            args[2] = gm.graph.get_attr(bname)
        else:
            args[2] = None
    kwargs = {k: v for k, v in op.kwargs.items() if k != "bias"}
    op.args, op.kwargs = tuple(args), kwargs


def layer_bias(gm: fx.GraphModule, layer: GraphLayer) -> torch.Tensor | None:
    return None if layer.bias is None else fetch(gm, layer.bias)


def fold_layers(
    gm: fx.GraphModule, layers: list[GraphLayer]
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Fold the BN of every listed layer into it, in place; returns ``{name: (W', bias')}``.

    Layers without a BN are returned unchanged (their own weight and bias).
    """
    folded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for layer in layers:
        weight = fetch(gm, layer.weight).detach()
        bias = layer_bias(gm, layer)
        if layer.bn is None:
            folded[layer.name] = (weight, None if bias is None else bias.detach())
            continue
        gamma, beta, mean, var, eps = bn_params(gm, layer)
        w_f, b_f = fold_bn(weight, bias, gamma, beta, mean, var, eps)
        remove_bn(gm, layer)
        set_layer_params(gm, layer, w_f, b_f)
        folded[layer.name] = (w_f, b_f)
    gm.graph.lint()
    gm.recompile()
    return folded
