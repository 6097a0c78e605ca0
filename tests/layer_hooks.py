"""Test helper: what a submodule of an nn.Module reads, captured with a forward hook."""

from __future__ import annotations

import torch


def layer_input(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The first input of submodule ``name`` when ``model`` runs on ``x`` (no grad)."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]
