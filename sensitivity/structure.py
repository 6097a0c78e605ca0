"""Which Hessian blocks equal their Gauss-Newton block exactly (a static graph analysis).

With logits z(theta) and loss l(z), the Hessian block of a parameter group theta_i is
    H_ii = J_i^T (d2l/dz2) J_i  +  sum_k (dl/dz_k) d2z_k/dtheta_i^2.
The second term vanishes exactly when
- the loss is a self-distillation loss at the FP32 point (KL to the model's own softmax, or
  MSE to its own outputs): dl/dz = 0 there, for every block; or
- z is piecewise linear in theta_i alone: every op on every path from the layer to the output
  is linear or piecewise linear in its theta_i-dependent argument (conv/linear with a constant
  other operand, eval BatchNorm, ReLU, max/avg pooling, add, reshapes, ...), no product of two
  dependent tensors, and the weight is used once. Then d2z/dtheta_i^2 = 0 wherever it exists
  (autograd's double backward of ReLU and max pooling is zero everywhere).
The same holds for a layer's input activation (the path starts at the same op).

Such blocks' traces Tr(J_i^T S J_i) can be estimated by Hutchinson in the tiny output space,
with no cross-layer noise (see ``hessian.py``). Any op not known to be piecewise linear makes
the analysis answer False, which only costs speed: those blocks use full HVPs.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

from torch import fx

from quantize.graph import GraphLayer

# ops linear or piecewise linear in each tensor argument taken alone
_PWL = {
    "relu", "relu_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "clamp", "clamp_min",
    "clamp_max", "max_pool1d", "max_pool2d", "max_pool2d_with_indices", "max_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "sum", "view", "_unsafe_view",
    "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "expand", "contiguous", "clone", "alias", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "cat", "stack", "add", "sub", "neg", "pad",
    "constant_pad_nd", "upsample_nearest1d", "upsample_nearest2d", "_to_copy", "to", "detach",
    "dropout", "feature_dropout", "index", "index_select", "gather", "repeat", "flip", "roll",
    "amax", "max", "where", "masked_fill", "zeros_like", "ones_like", "full_like",
}
# multilinear: (positions of the multiplied operands); at most one may depend on the layer
_MULTILINEAR = {
    "mul": (0, 1), "matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1), "linear": (0, 1),
    "conv1d": (0, 1), "conv2d": (0, 1), "convolution": (0, 1), "addmm": (1, 2),
    "baddbmm": (1, 2), "div": (1,),  # div: only the numerator may depend
}
_BATCH_NORM = {"batch_norm", "_native_batch_norm_legit_no_training"}


def _opname(node: fx.Node) -> str | None:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "_opname", None)  # torch OpOverload
    if name is None:
        name = getattr(target, "__name__", None)
    return None if name is None else str(name)


def _flat(args: Iterable[object]) -> list[object]:
    out: list[object] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        else:
            out.append(a)
    return out


def _pwl_use(node: fx.Node, dep: set[fx.Node], probes: Sequence[str]) -> bool:
    if node.op == "output":
        return True
    if node.op == "call_module":
        return str(node.target).startswith(("_guards", *probes))
    if node.op != "call_function":
        return False
    name = _opname(node)
    if name is None:
        return False
    if name == "getitem":
        return True
    if name in _MULTILINEAR:
        if name == "div":
            return not (len(node.args) > 1 and node.args[1] in dep)
        positions = _MULTILINEAR[name]
        hits = sum(1 for i in positions if i < len(node.args) and node.args[i] in dep)
        return hits <= 1
    if name in _BATCH_NORM:
        if name == "batch_norm" and len(node.args) > 5 and node.args[5]:
            return False  # training-mode BN normalises by batch statistics: not linear
        return all(a not in dep for a in node.args[1:])
    if name in ("dropout", "feature_dropout"):
        return len(node.args) > 2 and not node.args[2]
    return name in _PWL


def gauss_newton_exact(
    gm: fx.GraphModule, layers: Sequence[GraphLayer], loss_kind: str,
    probes: Sequence[str] = ("_bitplan_",),
) -> dict[str, tuple[bool, bool]]:
    """Per layer (weight block exact, activation block exact): True where H_ii equals the
    Gauss-Newton block exactly (see the module docstring)."""
    if loss_kind in ("kl", "mse"):
        return {layer.name: (True, True) for layer in layers}
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    attr_uses: dict[str, int] = {}
    for n in nodes:
        if n.op == "get_attr":
            attr_uses[str(n.target)] = attr_uses.get(str(n.target), 0) + len(n.users)
    out: dict[str, tuple[bool, bool]] = {}
    for layer in layers:
        start = nodes[index[layer.node]]
        dep = {start}
        ok = True
        for n in nodes[index[layer.node] + 1 :]:
            if not any(isinstance(a, fx.Node) and a in dep for a in _flat(n.args) +
                       _flat(n.kwargs.values())):
                continue
            if not _pwl_use(n, dep, probes):
                ok = False
                break
            dep.add(n)
        single_use = attr_uses.get(layer.weight, 1) == 1
        out[layer.name] = (ok and single_use, ok)
    return out
