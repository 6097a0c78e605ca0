"""Fixtures for the sensitivity tests: tiny calibration files and exact Hessian-block traces
from ``torch.func.hessian`` (the reference the Hutchinson estimates are checked against)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantize.graph import insert_input_modules
from sensitivity import zoo
from sensitivity.intake import Intake


class AddDelta(nn.Module):
    """x + delta, with delta set from outside (None: identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.delta: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.delta is None else x + self.delta


class TanhMLP(nn.Module):
    """Not piecewise linear: its blocks need full HVPs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _loss(kind: str, out: torch.Tensor, labels: torch.Tensor | None,
          target: torch.Tensor | None) -> torch.Tensor:
    if kind == "cross_entropy":
        return F.cross_entropy(out, labels)
    if kind == "kl":
        return F.kl_div(F.log_softmax(out, 1), F.log_softmax(target, 1), log_target=True,
                        reduction="batchmean")
    return F.mse_loss(out, target)


def exact_traces(it: Intake) -> tuple[dict[str, float], dict[str, float]]:
    """Exact Tr of each layer's weight block and input-activation block of the mean loss over
    ``it.train`` (one dynamic batch). Activation blocks are summed per sample: with eval-mode
    BN the samples do not interact, so the block is block-diagonal over samples."""
    gm = copy.deepcopy(it.module)
    layers = [layer.graph for layer in it.layers]
    probes = {layer.name: AddDelta() for layer in layers}
    insert_input_modules(gm, layers, probes, "exact")
    (x,) = it.train.args
    labels = it.train.labels
    with torch.no_grad():
        target = gm(x) if it.loss_kind != "cross_entropy" else None
    weights: dict[str, float] = {}
    acts: dict[str, float] = {}
    for layer in layers:
        w0 = dict(gm.named_parameters())[layer.weight].detach()

        def f_w(w: torch.Tensor, name: str = layer.weight) -> torch.Tensor:
            out = torch.func.functional_call(gm, {name: w}, (x,), strict=False)
            return _loss(it.loss_kind, out, labels, target)

        h = torch.func.hessian(f_w)(w0)
        weights[layer.name] = float(h.detach().reshape(w0.numel(), -1).diagonal().sum())
        total = 0.0
        probe = probes[layer.name]
        with torch.no_grad():
            shape = _input_shape(gm, probe, x)
        for n in range(x.shape[0]):
            def f_a(d: torch.Tensor, n: int = n, shape: tuple[int, ...] = shape,
                    probe: AddDelta = probe) -> torch.Tensor:
                full = torch.zeros(shape, dtype=d.dtype)
                full = full.index_put((torch.tensor([n]),), d.unsqueeze(0))
                probe.delta = full
                try:
                    return _loss(it.loss_kind, gm(x), labels, target)
                finally:
                    probe.delta = None

            d0 = torch.zeros(shape[1:])
            ha = torch.func.hessian(f_a)(d0)
            total += float(ha.reshape(d0.numel(), d0.numel()).diagonal().sum())
        acts[layer.name] = total
    return weights, acts


def _input_shape(gm: nn.Module, probe: AddDelta, x: torch.Tensor) -> tuple[int, ...]:
    seen: list[tuple[int, ...]] = []
    handle = probe.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        gm(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture(scope="session")
def tiny_calib(calib_digits, artifacts) -> Path:
    """10 labelled digits: 8 train + 2 held out, small enough for exact Hessians."""
    x, y = calib_digits
    return zoo.save_calibration(artifacts / "tiny_calib.safetensors", x[:10], y[:10])


@pytest.fixture(scope="session")
def tiny_calib_unlabelled(calib_digits, artifacts) -> Path:
    x, _ = calib_digits
    return zoo.save_calibration(artifacts / "tiny_calib_nolabels.safetensors", x[10:20])


@pytest.fixture(scope="session")
def tanh_pt2(digits, artifacts) -> Path:
    torch.manual_seed(0)
    x, y = digits
    model = zoo.train(TanhMLP(), x[:1400], y[:1400], epochs=3, seed=0)
    return zoo.save_model(model, x[:4], artifacts / "tanh_mlp.pt2")


@pytest.fixture()
def one_thread():
    """Tiny graphs run faster on one thread, and far faster when other jobs share the cores
    (OpenMP workers spin against each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
