"""Which blocks equal their Gauss-Newton block: the static graph analysis."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantize.graph import find_layers
from sensitivity import zoo
from sensitivity.structure import gauss_newton_exact

pytestmark = pytest.mark.usefixtures("one_thread")


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.gate = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.max_pool1d(self.b(h).unsqueeze(1), 1).squeeze(1) + h  # piecewise linear
        h = h * self.gate(x)  # one dependent factor per product: still linear in a, b, gate
        h = torch.sigmoid(self.c(h))  # not piecewise linear
        return self.head(h)


def _exact(model, loss_kind="cross_entropy"):
    ep = zoo.export(model, torch.rand(2, 6))
    gm = ep.module()
    return gauss_newton_exact(gm, find_layers(gm), loss_kind)


def test_structure_analysis():
    ex = _exact(_Mixed())
    assert ex["head"] == (True, True)  # last layer: logits linear in it
    assert ex["c"] == (False, False)  # sigmoid downstream
    assert ex["gate"] == (False, False)  # sigmoid downstream too
    assert ex["a"] == (False, False)


def test_product_of_dependent_tensors_is_not_linear():
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return self.head(h * h)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.a(F.relu(self.a(x))))

    ex = _exact(Square())
    assert ex["a"] == (False, False) and ex["head"] == (True, True)
    ex = _exact(Shared())
    # the shared weight enters twice (quadratic in it); its input activation only once
    assert ex["a"] == (False, True)


def test_resnet_is_piecewise_linear_and_distillation_is_always_exact():
    model = zoo.ResNet18Like(width=4)
    ep = zoo.export(model, torch.rand(2, 3, 32, 32))
    gm = ep.module()
    layers = find_layers(gm)
    assert len(layers) == 21
    assert all(v == (True, True) for v in gauss_newton_exact(gm, layers, "cross_entropy").values())
    tanh = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    gm = zoo.export(tanh, torch.rand(2, 6)).module()
    assert gauss_newton_exact(gm, find_layers(gm), "cross_entropy")["0"] == (False, False)
    assert gauss_newton_exact(gm, find_layers(gm), "kl")["0"] == (True, True)
    assert gauss_newton_exact(gm, find_layers(gm), "mse")["0"] == (True, True)
