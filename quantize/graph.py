"""Finding quantizable layers in a ``torch.export`` GraphModule and rewriting around them.

An exported program's ``.module()`` has no ``nn.Conv2d`` modules to hook: its layers are aten
calls (``aten.conv2d``, ``aten.linear``, ``aten.convolution`` after decompositions) whose weight
argument is a ``get_attr`` of the original parameter FQN (``features.0.weight``). A layer is
named by that FQN minus ``.weight`` (torchao-style FQN keys), which is what plans, sensitivity
tables and checkpoints use.

To act on a layer's input (activation quantization, activation-Hessian probes, DRQ), a small
``nn.Module`` is inserted as a ``call_module`` node between the input and the op.

A matrix product with a parameter, ``x @ W (+ b)`` with ``W`` stored ``[in, out]`` (GPT-2's
``Conv1D`` is ``addmm(b, x, W)``; also ``mm`` / ``matmul``), is a linear layer too:
``find_layers`` first rewrites it in place to ``aten.linear(x, W^T, b)`` with ``W^T`` stored under
``W``'s own FQN (``canonical_linears``), so every later stage sees a linear layer whose output
channels are axis 0, as for ``nn.Linear``. Every consumer builds its module from the program
and calls ``find_layers``, so sensitivity, checkpoint, fake-quant and the integer model agree.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

aten = torch.ops.aten

_CONV_OPS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_LINEAR_OPS = {aten.linear.default}
# (op, index of the eps argument, index of the training flag or None)
_BN_OPS = {
    aten.batch_norm.default: (7, 5),
    aten._native_batch_norm_legit_no_training.default: (6, None),
    aten._native_batch_norm_legit.default: (7, 5),
    aten._native_batch_norm_legit_functional.default: (7, 5),
}


@dataclass(frozen=True)
class GraphLayer:
    """Static facts about one quantizable op in an exported graph."""

    name: str  # parameter FQN prefix, e.g. "features.0"
    kind: str  # "conv1d" | "conv2d" | "linear"
    node: str  # fx node name of the op
    weight: str  # FQN of the weight parameter
    bias: str | None  # FQN of the bias parameter, if any
    weight_shape: tuple[int, ...]
    groups: int = 1
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    bn: str | None = None  # FQN prefix of the BatchNorm applied directly to the output
    bn_eps: float | None = None
    bn_training: bool = False  # the BN node was exported in training mode
    transposed: bool = False  # the model stores the weight [in, out] (a Conv1D / x @ W)


def _attr_target(node: object) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def _tuple(v: object, n: int, default: int) -> tuple[int, ...]:
    if v is None:
        return (default,) * n
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(x) for x in v)  # type: ignore[union-attr]
    return t * n if len(t) == 1 else t


def _conv_args(node: fx.Node, nd: int) -> dict:
    a = list(node.args) + [None] * 8
    kw = node.kwargs
    stride = _tuple(kw.get("stride", a[3]), nd, 1)
    raw_padding = kw.get("padding", a[4])
    padding = raw_padding if isinstance(raw_padding, str) else _tuple(raw_padding, nd, 0)
    dilation = _tuple(kw.get("dilation", a[5]), nd, 1)
    groups = int(kw.get("groups", a[6]) or 1)
    return {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}


def _classify(node: fx.Node, params: Mapping[str, torch.Tensor]) -> GraphLayer | None:
    if node.op != "call_function":
        return None
    target = node.target
    weight = _attr_target(node.args[1]) if len(node.args) > 1 else None
    if weight is None or weight not in params:
        return None
    bias = _attr_target(node.args[2]) if len(node.args) > 2 else None
    shape = tuple(params[weight].shape)
    name = weight[: -len(".weight")] if weight.endswith(".weight") else weight
    if target in _LINEAR_OPS:
        return GraphLayer(name, "linear", node.name, weight, bias, shape)
    if target in _CONV_OPS:
        nd = _CONV_OPS[target]
        if nd == 3:
            return None
        return GraphLayer(
            name, f"conv{nd}d", node.name, weight, bias, shape, **_conv_args(node, nd)
        )
    if target == aten.convolution.default:
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        a = node.args
        if a[6]:  # transposed convolutions are not quantized
            return None
        nd = len(shape) - 2
        if nd not in (1, 2):
            return None
        return GraphLayer(
            name,
            f"conv{nd}d",
            node.name,
            weight,
            bias,
            shape,
            groups=int(a[8]),
            stride=_tuple(a[3], nd, 1),
            padding=_tuple(a[4], nd, 0),
            dilation=_tuple(a[5], nd, 1),
        )
    return None


def _following_bn(node: fx.Node) -> tuple[str | None, float | None, bool]:
    users = list(node.users)
    if len(users) != 1:
        return None, None, False
    user = users[0]
    if user.op != "call_function" or user.target not in _BN_OPS or user.args[0] is not node:
        return None, None, False
    eps_index, train_index = _BN_OPS[user.target]
    weight = _attr_target(user.args[1])
    mean = _attr_target(user.args[3])
    if weight is None or mean is None:
        return None, None, False
    training = bool(user.args[train_index]) if train_index is not None else False
    return weight[: -len(".weight")], float(user.args[eps_index]), training


# x @ W (+ b) ops: (input position, weight position, bias position or None)
_MATMUL_OPS = {aten.addmm.default: (1, 2, 0), aten.mm.default: (0, 1, None),
               aten.matmul.default: (0, 1, None)}
TRANSPOSED = "bitplan_transposed"  # node.meta key of a linear rewritten from x @ W


def _attr_uses(gm: fx.GraphModule) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            uses[str(n.target)] = uses.get(str(n.target), 0) + len(n.users)
    return uses


def _matmul_parts(node: fx.Node, params: Mapping[str, torch.Tensor],
                  uses: Mapping[str, int]) -> tuple[fx.Node, str, object] | None:
    """(input, weight FQN, bias node or None) of an ``x @ W (+ b)`` with a 2-D parameter
    ``W`` read by this op alone (a tied weight, e.g. an embedding, is left as it is)."""
    if node.op != "call_function" or node.target not in _MATMUL_OPS:
        return None
    i_x, i_w, i_b = _MATMUL_OPS[node.target]
    if len(node.args) <= i_w or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    weight = _attr_target(node.args[i_w])
    if weight is None or weight not in params or params[weight].dim() != 2:
        return None
    if uses.get(weight, 0) != 1 or not isinstance(node.args[i_x], fx.Node):
        return None
    bias = node.args[i_b] if i_b is not None else None
    if bias is not None:
        b = _attr_target(bias)
        if b is None or b not in params or tuple(params[b].shape) != (params[weight].shape[1],):
            return None
    return node.args[i_x], weight, bias


def canonical_linears(gm: fx.GraphModule) -> list[str]:
    """Rewrite every ``x @ W (+ b)`` with a parameter ``W [in, out]`` read by that op alone to
    ``aten.linear(x, W^T, b)``, in place, storing ``W^T`` (contiguous) under ``W``'s FQN.
    Returns the weight FQNs rewritten (idempotent: a second call finds none)."""
    params = dict(gm.named_parameters())
    uses = _attr_uses(gm)
    done: list[str] = []
    for node in list(gm.graph.nodes):
        parts = _matmul_parts(node, params, uses)
        if parts is None:
            continue
        x, weight, bias = parts
        owner, _, leaf = weight.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        old = params[weight]
        setattr(module, leaf, nn.Parameter(old.detach().t().contiguous(),
                                           requires_grad=old.requires_grad))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.linear.default, (x, node.args[
                _MATMUL_OPS[node.target][1]], bias))
        new.meta = {**node.meta, TRANSPOSED: True}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done.append(weight)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def find_layers(gm: fx.GraphModule) -> list[GraphLayer]:
    """All Conv1d/Conv2d/Linear ops of ``gm`` in graph order, with the BN that follows each.

    Matrix products with a parameter are first rewritten to linear ops, in place (see
    :func:`canonical_linears`). A weight used by several ops (weight sharing) is reported once,
    at its first use.
    """
    canonical_linears(gm)
    params = dict(gm.named_parameters())
    layers: list[GraphLayer] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        layer = _classify(node, params)
        if layer is None or layer.weight in seen:
            continue
        seen.add(layer.weight)
        if node.meta.get(TRANSPOSED):
            layer = GraphLayer(**{**layer.__dict__, "transposed": True})
        bn, eps, training = _following_bn(node)
        if bn is not None:
            layer = GraphLayer(
                **{**layer.__dict__, "bn": bn, "bn_eps": eps, "bn_training": training}
            )
        layers.append(layer)
    return layers


_UNLIFTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNLIFTED_LOCK = threading.Lock()


def program_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """A new GraphModule of ``program.module()``: its own graph and module tree, free to rewrite
    (``find_layers``, folding, inserted modules), on the program's own weight tensors (nothing
    copied, as ``program.module()`` itself). The program is unlifted once, at its first call;
    later calls copy that graph, several times cheaper (docs/internals.md). Unlike
    ``program.module()`` the copy has no input-check hook (the graph's own shape guards still
    run): it is for the stages' internal passes on data bound at intake."""
    with _UNLIFTED_LOCK:
        template = _UNLIFTED.get(program)
        if template is None:
            template = _UNLIFTED[program] = program.module()
    with warnings.catch_warnings():
        # torch's own pytree spec copy warns about a deprecated isinstance check.
        warnings.simplefilter("ignore", FutureWarning)
        return fx.GraphModule(template, copy.deepcopy(template.graph))


def node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name!r} in the graph")


def module_name(layer_name: str, prefix: str) -> str:
    """A submodule name that cannot collide with the model's own FQNs."""
    return f"_bitplan_{prefix}_" + layer_name.replace(".", "_")


def insert_after_node(gm: fx.GraphModule, node_name: str, module: nn.Module, target: str) -> None:
    """Add ``module`` as submodule ``target`` and call it on node ``node_name``'s output, with
    every other use of that output rewired to the module's (no lint / recompile)."""
    node = node_by_name(gm, node_name)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def insert_output_modules(gm: fx.GraphModule, layers: Sequence[GraphLayer],
                          modules: Mapping[str, nn.Module], prefix: str) -> fx.GraphModule:
    """Insert ``modules[layer.name]`` on the output of each layer's op (every user rewired),
    in place. Returns ``gm`` (recompiled)."""
    for layer in layers:
        if layer.name in modules:
            insert_after_node(gm, layer.node, modules[layer.name], module_name(layer.name, prefix))
    gm.graph.lint()
    gm.recompile()
    return gm


def insert_input_modules(
    gm: fx.GraphModule, layers: list[GraphLayer], modules: Mapping[str, nn.Module], prefix: str,
    recompile: bool = True,
) -> fx.GraphModule:
    """Insert ``modules[layer.name]`` on the input of each listed layer's op, in place.

    Only the layer's own use of the input is rewired; other consumers still see the original
    tensor. Returns ``gm`` (recompiled).
    """
    for layer in layers:
        if layer.name not in modules:
            continue
        op = node_by_name(gm, layer.node)
        target = module_name(layer.name, prefix)
        gm.add_submodule(target, modules[layer.name])
        with gm.graph.inserting_before(op):
            new = gm.graph.call_module(target, (op.args[0],))
        op.args = (new,) + tuple(op.args[1:])
    if recompile:  # else the caller lints and recompiles once after more rewrites
        gm.graph.lint()
        gm.recompile()
    return gm
