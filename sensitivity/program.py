"""The user's ``torch.export`` program: loading it safely and rewriting it to what the model
computes after ``model.eval()``.

The model goes through ``torch.export.load`` only, after checking it is a pt2 zip archive, and
inside ``nopickle.refuse_pickles`` (torch would unpickle some archive payloads in full), so no
user pickle is ever handed to anything.

Training-mode exports: a program exported from a model in ``train()`` mode computes BatchNorm
from batch statistics, bumps ``num_batches_tracked`` and applies dropout. bitplan rewrites such a
graph to eval semantics (BN uses its running statistics, dropout is the identity, the counter
update is dropped); this is what the user's model computes after ``model.eval()``. Any other
in-place update of a buffer is refused, since a sensitivity measured on a graph that changes
itself while it runs would be meaningless.

Attention: ``scaled_dot_product_attention`` has no double backward on CPU, so a program that
uses it is decomposed to core ops (linear and conv kept whole, so the layers are still found).
"""

from __future__ import annotations

import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import fx

from solver.errors import BadModelError

from .nopickle import refuse_pickles

aten = torch.ops.aten

HOW_TO_EXPORT = (
    "Upload a torch.export program: `ep = torch.export.export(model.eval(), (example_input,))` "
    "then `torch.export.save(ep, 'model.pt2')`."
)
# torch.export.load keeps the graph being deserialised in a module-level global and asserts
# that it is unset on entry: two loads at once in one process (two requests' intakes, or a
# request and a worker thread) fail with "_CURRENT_DESERIALIZER is already set" (seen in the
# end-to-end test with two jobs submitted together). Loads take this lock.
_EXPORT_LOAD_LOCK = threading.Lock()

_SDPA_OPS = {
    "aten.scaled_dot_product_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
}
# Kept undecomposed when SDPA forces a decomposition, so find_layers still sees the layers.
_KEEP_OPS = (aten.linear.default, aten.conv1d.default, aten.conv2d.default)
_DROPOUT_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
}
_BN_TRAIN_INDEX = {aten.batch_norm.default: 5, aten._native_batch_norm_legit.default: 5}


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` file written by ``torch.export.save``.

    Raises:
        BadModelError: the file is missing, not a zip archive, truncated, not a pt2 archive
            (e.g. a pickle or a ``torch.save`` checkpoint), or holds no ExportedProgram.
    """
    path = Path(path)
    if not path.is_file():
        raise BadModelError(f"model file {path.name!r} does not exist. {HOW_TO_EXPORT}")
    if not zipfile.is_zipfile(path):
        raise BadModelError(
            f"{path.name!r} is not a .pt2 archive (a .pt2 is a zip file; pickles and raw "
            f"state dicts are not accepted). {HOW_TO_EXPORT}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BadModelError(
            f"{path.name!r} is a damaged or truncated zip archive ({exc}). {HOW_TO_EXPORT}"
        ) from None
    if bad is not None:
        raise BadModelError(f"{path.name!r} is corrupted (entry {bad!r}). {HOW_TO_EXPORT}")
    # A pt2 archive has <root>/archive_format (or, in the legacy layout, a top-level
    # "version"). A torch.save checkpoint is also a zip but has neither: refuse it here, so its
    # pickle is never handed to anything.
    if not any(n.endswith("/archive_format") or n == "version" for n in names):
        raise BadModelError(
            f"{path.name!r} is a zip archive but not a torch.export program (is it a "
            f"torch.save checkpoint?). {HOW_TO_EXPORT}"
        )
    export_log = logging.getLogger("torch.export")
    with _EXPORT_LOAD_LOCK:
        level = export_log.level
        export_log.setLevel(logging.ERROR)  # torch logs a traceback before raising; ours is enough
        try:
            with refuse_pickles():  # torch.export.load would unpickle some payloads
                program = torch.export.load(str(path))
        except Exception as exc:  # torch raises many types for a damaged archive
            raise BadModelError(
                f"could not load {path.name!r} as a torch.export program "
                f"({type(exc).__name__}: {str(exc)[:200]}). {HOW_TO_EXPORT}"
            ) from None
        finally:
            export_log.setLevel(level)
    if not isinstance(program, torch.export.ExportedProgram):
        raise BadModelError(f"{path.name!r} does not hold an ExportedProgram. {HOW_TO_EXPORT}")
    return program


def uses_sdpa(program: torch.export.ExportedProgram) -> bool:
    """Whether the graph calls scaled_dot_product_attention (any of its kernels)."""
    return any(
        n.op == "call_function" and str(getattr(n.target, "_overloadpacket", n.target)) in _SDPA_OPS
        for n in program.graph.nodes
    )


def decompose_sdpa(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Lower SDPA (no double backward on CPU) to core ops; linear/conv stay whole."""
    table = torch.export.default_decompositions()
    for op in _KEEP_OPS:
        table.pop(op, None)
    _views_to_reshapes(program)
    try:
        return program.run_decompositions(table)
    except Exception as exc:
        raise BadModelError(
            f"the model uses scaled_dot_product_attention and could not be decomposed for "
            f"Hessian products ({type(exc).__name__}: {str(exc)[:200]})."
        ) from None


def _views_to_reshapes(program: torch.export.ExportedProgram) -> None:
    """``view`` -> ``reshape`` in a graph without in-place ops (where the two compute the same).

    The decomposed attention's output has other strides than the fused kernel's, so a
    ``view`` traced after the kernel (GPT-2 merges heads with ``view``) can fail on
    re-tracing; ``reshape`` copies where a view is impossible."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    names = [str(getattr(n.target, "_opname", "")) for n in nodes]
    if any(m.endswith("_") and not m.endswith("__") for m in names):  # in place (not __and__)
        return
    changed = False
    for n in nodes:
        if n.target == aten.view.default:
            n.target = aten.reshape.default
            changed = True
    if changed:
        program.graph_module.recompile()


def _is_buffer_ref(node: Any, buffers: set[str]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return str(node.target) in buffers
    return node.op == "placeholder" and str(node.target) in buffers


def to_eval_semantics(program: torch.export.ExportedProgram) -> list[str]:
    """Rewrite a training-mode export in place to what ``model.eval()`` computes.

    Returns the list of rewrites made (empty for an eval-mode export).

    Raises:
        BadModelError: the graph mutates a buffer in a way that is not a BN counter update.
    """
    gm = program.graph_module
    sig = program.graph_signature
    # Buffers appear as placeholders (lifted graph) named by the signature.
    buffer_nodes = set(sig.inputs_to_buffers) | set(sig.buffers)
    counters = {
        n for n, fqn in sig.inputs_to_buffers.items() if fqn.endswith("num_batches_tracked")
    }
    done: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _BN_TRAIN_INDEX:
            i = _BN_TRAIN_INDEX[node.target]
            if len(node.args) > i and node.args[i]:
                node.args = node.args[:i] + (False,) + node.args[i + 1 :]
                done.append(f"{node.name}: batch norm uses running statistics")
        elif node.target in _DROPOUT_OPS and len(node.args) > 2 and node.args[2]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            done.append(f"{node.name}: dropout removed")
        elif node.target == aten.add_.Tensor and isinstance(node.args[0], fx.Node) and (
            node.args[0].name in counters
        ) and not node.users:
            gm.graph.erase_node(node)
            done.append(f"{node.name}: num_batches_tracked update removed")
    mutating = [
        n.name for n in gm.graph.nodes
        if n.op == "call_function" and str(getattr(n.target, "__name__", "")).split(".")[0]
        .endswith("_") and n.args and _is_buffer_ref(n.args[0], buffer_nodes)
    ]
    if sig.buffers_to_mutate or mutating:
        raise BadModelError(
            "the model updates its own buffers while it runs (it was exported in training mode "
            f"with state bitplan cannot turn off: {sorted(sig.buffers_to_mutate) or mutating}). "
            + HOW_TO_EXPORT
        )
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done
