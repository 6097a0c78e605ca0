"""Layer recognition: GPT-2's ``Conv1D`` (``addmm(b, x, W)`` with ``W`` stored ``[in, out]``) and
plain ``x @ W`` with a parameter are linear layers whose output channels are the weight's
columns; scales, checkpoint, fake-quant and the integer model all use that axis."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantize import apply
from quantize import load as load_checkpoint
from quantize.graph import find_layers
from quantize.integer import IntegerExecutor
from quantize.primitives import weight_scales
from sensitivity import zoo


class _Conv1DMLP(nn.Module):
    """GPT-2's MLP shape on digits: Conv1D(64 -> 24), ReLU, x @ W (24 -> 10, a bare matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = Conv1D(24, 64)  # Conv1D(nf=out, nx=in): weight [64, 24]
        self.proj = nn.Parameter(torch.randn(24, 10) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x.flatten(1))) @ self.proj


@pytest.fixture(scope="module")
def conv1d_program(digits) -> tuple[nn.Module, torch.export.ExportedProgram]:
    x, y = digits
    torch.manual_seed(0)
    model = zoo.train(_Conv1DMLP(), x[:1400], y[:1400], epochs=10, seed=0)
    return model, zoo.export(model.eval(), x[:4])


def test_conv1d_and_matmul_are_linear_layers_with_output_axis_first(conv1d_program) -> None:
    model, program = conv1d_program
    gm = program.module()
    fc, proj = find_layers(gm)
    assert (fc.name, fc.kind, fc.weight_shape, fc.bias) == ("fc", "linear", (24, 64), "fc.bias")
    assert (proj.name, proj.kind, proj.weight_shape, proj.bias) == ("proj", "linear", (10, 24),
                                                                     None)
    assert fc.transposed and proj.transposed
    params = dict(gm.named_parameters())
    assert params["fc.weight"].equal(model.fc.weight.t())
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert [g.name for g in find_layers(gm)] == ["fc", "proj"]  # rewriting is idempotent


def test_conv1d_quantized_per_output_column_and_integer_model_agrees(
        conv1d_program, plan_for, split, tmp_path) -> None:
    model, program = conv1d_program
    res = apply(program, plan_for(program, w_bits=4), *split)
    # one scale per output channel = per column of the [in, out] Conv1D weight
    scale = res.checkpoint.tensors["fc.weight_scale"]
    assert scale.shape == (24,)
    assert torch.allclose(scale, weight_scales(model.fc.weight.detach().t(), 4))
    assert res.checkpoint.codes("fc").shape == (24, 64)
    assert res.checkpoint.quant["layers"]["fc"]["transposed"] is True  # said in the metadata
    path = res.save(tmp_path / "m.safetensors")
    x = split[1].args[0]
    loaded = load_checkpoint(path, program)
    with torch.no_grad():
        fq = res.module(x)
        assert torch.equal(loaded(x), fq)
        ref = model(x)
    assert float((fq.argmax(1) == ref.argmax(1)).float().mean()) > 0.9  # W4A8 of a 2-layer MLP
    out = IntegerExecutor.from_checkpoint(path, program)(x)
    lsb = (out.codes.double() - torch.round(fq.double() / out.grid.scale)).abs()
    assert float(lsb.max()) <= 1.0  # same bound as the reference models' integer test


class _SplitQKV(nn.Module):
    """Separate q/k/v Conv1D projections of one input (each reads its own view of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = Conv1D(8, 16), Conv1D(8, 16), Conv1D(8, 16)
        self.out = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.q(x), self.k(x), self.v(x)], -1)).sum(1)


def test_conv1d_projections_of_one_input_are_tied(tmp_path) -> None:
    from safetensors.torch import save_file

    from sensitivity.intake import intake
    from service.pipeline import shared_input_ties

    torch.manual_seed(0)
    x = torch.randn(6, 5, 16)
    path = tmp_path / "m.pt2"
    torch.export.save(zoo.export(_SplitQKV().eval(), x[:2]), str(path))
    save_file({"inputs": x}, str(tmp_path / "c.safetensors"))
    it = intake(path, tmp_path / "c.safetensors")
    assert [layer.name for layer in it.layers] == ["q", "k", "v", "out"]
    assert shared_input_ties(it.module, it.layers) == [("q", "k"), ("q", "v")]


def test_program_module_copies_are_independent_and_share_the_weights(conv1d_program, resnet,
                                                                       digits, monkeypatch) -> None:
    """``program_module``: the program is unlifted once; each call is a fresh module whose
    rewrites (linear canonicalisation, BN folding) reach neither the next copy nor
    ``program.module()``, on the program's own weight tensors (no copy)."""
    from quantize.fold import fold_layers
    from quantize.graph import program_module

    x, _ = digits
    _, program = conv1d_program
    unlifts = [0]
    real = torch.export.ExportedProgram.module

    def counting(self, *args, **kwargs):
        unlifts[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "module", counting)
    fresh = zoo.export(resnet.eval(), x[:4])  # a program never unlifted before
    first = program_module(fresh)
    layers = find_layers(first)
    assert any(la.bn is not None for la in layers)
    fold_layers(first, layers)  # BN removed and weights replaced, in ``first`` only
    second = program_module(fresh)
    assert unlifts[0] == 1
    assert [la.bn for la in find_layers(second)] == [la.bn for la in layers]
    with torch.no_grad():
        assert torch.equal(second(x[:8]), real(fresh)(x[:8]))
    stored = {t.data_ptr() for t in fresh.state_dict.values()}
    assert {p.data_ptr() for p in second.parameters()} <= stored

    a = program_module(program)  # GPT-2 Conv1D: find_layers stores W^T under W's name
    find_layers(a)
    b = program_module(program)
    assert dict(a.named_parameters())["fc.weight"].shape == (24, 64)
    assert dict(b.named_parameters())["fc.weight"].shape == (64, 24)  # still as exported
