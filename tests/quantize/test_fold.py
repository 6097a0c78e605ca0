"""BN folding equals conv + BN in eval mode, as a function and as a graph rewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantize.fold import fold_bn, fold_layers
from quantize.graph import find_layers


def _random_bn(bn: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(n, generator=gen))
        bn.bias.copy_(torch.randn(n, generator=gen))
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.05)
    bn.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_folded_conv_equals_conv_bn(bias: bool, groups: int) -> None:
    gen = torch.Generator().manual_seed(groups + 2 * bias)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(6, eps=1e-3)
    _random_bn(bn, gen)
    x = torch.randn(3, 4, 7, 7, generator=gen)
    w, b = fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                   bn.running_var, bn.eps)
    folded = nn.functional.conv2d(x, w, b, padding=1, groups=groups)
    with torch.no_grad():
        torch.testing.assert_close(folded, bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_folded_linear_equals_linear_bn1d_without_affine() -> None:
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(8, 5)
    bn = nn.BatchNorm1d(5, affine=False)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=gen))
        bn.running_var.copy_(torch.rand(5, generator=gen) + 0.1)
    bn.eval()
    x = torch.randn(4, 8, generator=gen)
    w, b = fold_bn(lin.weight, lin.bias, None, None, bn.running_mean, bn.running_var, bn.eps)
    with torch.no_grad():
        torch.testing.assert_close(nn.functional.linear(x, w, b), bn(lin(x)), rtol=1e-5,
                                   atol=1e-5)


def test_graph_fold_removes_bn_and_keeps_outputs(resnet_program, calib_digits) -> None:
    gm = resnet_program.module()
    layers = find_layers(gm)
    assert sum(layer.bn is not None for layer in layers) == 3
    folded = fold_layers(gm, layers)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets)
    assert set(folded) == {layer.name for layer in layers}
    x = calib_digits[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), resnet_program.module()(x), rtol=1e-4, atol=1e-4)
