"""The fake-quant module of models whose residual adds feed each other directly.

MobileNetV2's inverted residual blocks end without an activation, so one block's add is the
next block's add input. Replacing the first add by its quantized module renames that node;
the second add must still find its input's grid (this failed on MobileNetV2 with a KeyError).
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantize import apply, fakequant
from quantize.fakequant import INLINE_BLOCK, TEAM_BLOCK, FakeQuant, QuantAdd, Requant
from quantize.integer import IntegerExecutor
from quantize.points import Grid
from quantize.primitives import dyadic, fake_quantize_activation


class AddChain(nn.Module):
    """A stem conv and two residual convs whose adds follow each other with nothing between."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.c1(h)
        h = h + self.c2(h)  # the first add's output is this add's input
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def chain_program() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = AddChain().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (torch.randn(4, 1, 8, 8),),
                               dynamic_shapes=({0: batch},))


def test_chained_adds_quantize_and_run_integer(chain_program, plan_for, split,
                                               tmp_path) -> None:
    plan = plan_for(chain_program)
    res = apply(chain_program, plan, *split)
    x = split[1].args[0]
    with torch.no_grad():
        fq = res.module(x)
        ref = chain_program.module()(x)
    # all-INT8 on random weights: the outputs follow the float model closely (measured
    # correlation 0.99982; 0.98 leaves room for any CPU; a wrong add grid scales a branch)
    corr = torch.corrcoef(torch.stack([fq.flatten(), ref.flatten()]))[0, 1]
    assert float(corr) > 0.98
    path = res.save(tmp_path / "m.safetensors")
    out = IntegerExecutor.from_checkpoint(path, chain_program)(x)
    fq_codes = torch.round(fq.to(torch.float64) / out.grid.scale)
    assert float((out.codes.to(torch.float64) - fq_codes).abs().max()) <= 1.0


def test_chained_adds_export_to_onnx(chain_program, plan_for, split) -> None:
    pytest.importorskip("onnxruntime")
    from quantize.onnx import export_onnx, verify

    res = apply(chain_program, plan_for(chain_program), *split)
    model = export_onnx(chain_program, res.checkpoint)
    report = verify(chain_program, res.checkpoint, model, split[1])
    assert report["passed"]


# --- the blocked, in-place forwards against the whole-tensor float64 formulas they replace ---
# (tolerance: none. Every output is compared bit for bit, signed zeros included; NaN where the
# formula gives NaN.)

def _old_requant(x, src, b, c, grid, channel_dim):
    """Requant.forward as it was: ``codes_of`` / ``dyadic_round`` over the whole tensor."""
    def view(t):
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[channel_dim % x.dim()] = -1
        return t.reshape(shape)

    codes = torch.round(x.detach().to(torch.float64) / view(src.to(torch.float64)))
    q = torch.floor(codes * view(b).to(torch.float64)
                    / torch.exp2(view(c).to(torch.float64)) + 0.5)
    lo, hi = grid.qrange
    out = (q.clamp(lo, hi) * grid.scale).to(x.dtype)
    return x + (out - x).detach()


def _old_add(a, b, grid, in_a, in_b):
    """QuantAdd.forward as it was."""
    total = None
    for x, s in ((a, in_a.scale), (b, in_b.scale)):
        codes = torch.round(x.detach().to(torch.float64) / s)
        if s != grid.scale:
            pb, pc = dyadic(s / grid.scale)
            codes = torch.floor(codes * torch.tensor(pb, dtype=torch.int64).to(torch.float64)
                                / torch.exp2(torch.tensor(float(pc), dtype=torch.float64)) + 0.5)
        total = codes if total is None else total + codes
    lo, hi = grid.qrange
    return (total.clamp(lo, hi) * grid.scale).to(a.dtype)


def _whole_tensor_forward(m):
    """The forward a fake-quant module had before the blocked one."""
    if isinstance(m, Requant):
        grid = Grid(m.scale, m.bits, m.signed)
        return lambda t: _old_requant(t, m.src_scale, m.b, m.c, grid, m.channel_dim)
    if isinstance(m, QuantAdd):
        grid, ins = Grid(m.scale, m.bits, m.signed), [Grid(s, 8, True) for s in m.in_scales]
        return lambda a, b: _old_add(a, b, grid, *ins)
    return lambda t: fake_quantize_activation(t, m.scale, m.bits, m.signed)


def _same_bits(new: torch.Tensor, old: torch.Tensor) -> None:
    assert new.shape == old.shape and new.dtype == old.dtype
    nan = torch.isnan(old)
    assert torch.equal(torch.isnan(new), nan)
    assert torch.equal(new[~nan].view(torch.int32), old[~nan].view(torch.int32))


EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1e-30, -3.4e38, 3.4e38, math.inf, -math.inf, math.nan]


@st.composite
def _requant_case(draw):
    channels = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["conv", "linear", "tensor"]))
    src_exp = draw(st.lists(st.integers(-40, 10), min_size=channels, max_size=channels))
    src_mant = draw(st.lists(st.floats(1.0, 2.0, exclude_max=True), min_size=channels,
                             max_size=channels))
    # a power-of-two source step half the time: x / src is then exact and ties at .5 occur
    pow2 = draw(st.booleans())
    src = torch.tensor([2.0**e * (1.0 if pow2 else m) for e, m in zip(src_exp, src_mant,
                                                                           strict=True)],
                       dtype=torch.float64)
    b = torch.tensor(draw(st.lists(st.integers(-(2**31 - 1), 2**31 - 1) | st.integers(-9, 9),
                                   min_size=channels, max_size=channels)))
    c = torch.tensor(draw(st.lists(st.integers(0, 31) | st.integers(0, 3), min_size=channels,
                                   max_size=channels)))
    if layout == "tensor":
        src, b, c = src[:1], b[:1], c[:1]
    bits = draw(st.integers(2, 16))
    grid = Grid(draw(st.floats(1e-6, 10.0)), bits, draw(st.booleans()))
    shape = {"conv": (draw(st.integers(1, 3)), channels, draw(st.integers(1, 4)),
                      draw(st.integers(1, 5))),
             "linear": (draw(st.integers(1, 3)), draw(st.integers(1, 4)), channels),
             "tensor": (draw(st.integers(1, 3)), draw(st.integers(1, 7)))}[layout]
    n = math.prod(shape)
    # codes (k + half) * src on the source grid (ties at .5 when half is 0.5), plus any float32
    codes = draw(st.lists(st.integers(-(2**20), 2**20), min_size=n, max_size=n))
    half = draw(st.lists(st.sampled_from([0.0, 0.5, -0.5, 0.49999, 0.25]), min_size=n,
                         max_size=n))
    per = src.reshape(-1)
    ch = {"conv": lambda i: (i // (shape[2] * shape[3])) % channels,
          "linear": lambda i: i % channels, "tensor": lambda i: 0}[layout]
    vals = [(k + h) * float(per[ch(i)]) for i, (k, h) in enumerate(zip(codes, half,
                                                                         strict=True))]
    raw = draw(st.lists(st.floats(width=32) | st.sampled_from(EXTREMES), min_size=n,
                        max_size=n))
    mix = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    x = torch.tensor([r if m == 0 else v for v, r, m in zip(vals, raw, mix, strict=True)],
                     dtype=torch.float32).reshape(shape)
    block = draw(st.sampled_from([1, 3, 7, 16, 64, INLINE_BLOCK, TEAM_BLOCK]))
    return x, src, b, c, grid, (-1 if layout == "linear" else 1), block


@settings(max_examples=200, deadline=None)
@given(_requant_case())
def test_requant_is_bit_identical_to_the_float64_formula(case) -> None:
    x, src, b, c, grid, channel_dim, block = case
    with mock.patch.object(fakequant, "BLOCK", block):
        new = Requant(src, b, c, grid, channel_dim=channel_dim)(x)
        with torch.no_grad():  # the blocked in-place path
            new_ng = Requant(src, b, c, grid, channel_dim=channel_dim)(x)
    old = _old_requant(x, src, b, c, grid, channel_dim)
    _same_bits(new, old)
    _same_bits(new_ng, old)


def test_requant_keeps_the_straight_through_gradient() -> None:
    src = torch.tensor([0.01, 0.02])
    rq = Requant(src, torch.tensor([3, 5]), torch.tensor([2, 3]), Grid(0.05, 8, True))
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    rq(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.floats(1e-4, 1.0), st.floats(1e-4, 1.0), st.floats(1e-4, 1.0),
       st.booleans(), st.integers(4, 16), st.sampled_from([1, 5, 16, INLINE_BLOCK, TEAM_BLOCK]),
       st.data())
def test_quant_add_is_bit_identical_to_the_float64_formula(n, s_out, s_a, s_b, same, bits,
                                                          block, data) -> None:
    grid, in_a = Grid(s_out, bits, True), Grid(s_out if same else s_a, 8, True)
    in_b = Grid(s_b, 8, False)
    floats = st.floats(width=32) | st.sampled_from(EXTREMES) | st.integers(-300, 300).map(
        lambda k: (k + 0.5) * s_a)
    a = torch.tensor(data.draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float32)
    b = torch.tensor(data.draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float32)
    with mock.patch.object(fakequant, "BLOCK", block):
        new = QuantAdd(grid, in_a, in_b)(a.reshape(1, n), b.reshape(1, n))
    _same_bits(new, _old_add(a.reshape(1, n), b.reshape(1, n), grid, in_a, in_b))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.floats(1e-6, 10.0), st.integers(2, 16), st.booleans(),
       st.sampled_from([1, 5, 16, INLINE_BLOCK, TEAM_BLOCK]), st.data())
def test_fake_quant_is_bit_identical_to_fake_quantize_activation(n, scale, bits, signed, block,
                                                                 data) -> None:
    floats = st.floats(width=32) | st.sampled_from(EXTREMES) | st.integers(-300, 300).map(
        lambda k: (k + 0.5) * scale)
    x = torch.tensor(data.draw(st.lists(floats, min_size=n, max_size=n)),
                     dtype=torch.float32).reshape(1, 1, n)
    with mock.patch.object(fakequant, "BLOCK", block), torch.no_grad():
        new = FakeQuant(Grid(scale, bits, signed))(x)
    _same_bits(new, fake_quantize_activation(x, scale, bits, signed))


def test_the_module_is_bit_identical_to_the_whole_tensor_formulas(resnet_pt2, plan_for,
                                                                  split) -> None:
    """The digits ResNet (residual adds, per-channel requants): the whole fake-quant module with
    the blocked forwards (blocks of 64 elements, so every layer spans many) against the same
    module with the whole-tensor formulas patched in."""
    program = torch.export.load(str(resnet_pt2))
    res = apply(program, plan_for(program, w_bits=lambda i, _: 4 if i % 2 else 8), *split)
    x = split[1].args[0]
    with torch.no_grad(), mock.patch.object(fakequant, "BLOCK", 64):
        new = res.module(x)
    kinds = {Requant: 0, QuantAdd: 0}
    for m in res.module.modules():
        if isinstance(m, (Requant, QuantAdd, FakeQuant)):
            m.forward = _whole_tensor_forward(m)
            kinds[type(m)] = kinds.get(type(m), 0) + 1
    assert kinds[Requant] > 0 and kinds[QuantAdd] > 0
    with torch.no_grad():
        old = res.module(x)
    _same_bits(new, old)


def test_build_fake_quant_generates_its_code_once(cnn_program, cnn_int8, monkeypatch) -> None:
    """The fake-quant module's rewrites (BN removal, output requantisers, input quantizers,
    layer replacements) regenerate the GraphModule's code once, after the last of them (each
    regeneration compiles Python: ~0.05 s a time on MobileNetV2's graph)."""
    from torch import fx

    from quantize.fakequant import build_fake_quant
    from quantize.graph import program_module

    calls = [0]
    real = fx.GraphModule.recompile

    def counting(self):
        calls[0] += 1
        return real(self)

    monkeypatch.setattr(fx.GraphModule, "recompile", counting)
    program_module(cnn_program)
    base, calls[0] = calls[0], 0  # building the program's module (its code generated once)
    build_fake_quant(cnn_program, cnn_int8.checkpoint)
    assert calls[0] == base + 1


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5),
                       st.integers(1, 5)),
       block=st.sampled_from([1, 7, 64, TEAM_BLOCK]), seed=st.integers(0, 2**31 - 1))
def test_the_chains_keep_a_channels_last_layout(shape, block, seed) -> None:
    """A channels-last input (what ``quantize.evaluate`` runs image models in) gives the
    same values as the NCHW one, in the same layout, with no layout copy: FakeQuant, a
    per-channel Requant and QuantAdd (both inputs channels-last, or one of each)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    y = torch.randn(shape, generator=gen) * 3
    cl = torch.channels_last
    acc = torch.rand(shape[1], generator=gen, dtype=torch.float64) * 0.01 + 1e-3
    b = torch.randint(1 << 20, 1 << 30, (shape[1],), generator=gen)
    modules = [FakeQuant(Grid(0.05, 8, True)),
               Requant(acc, b, torch.full((shape[1],), 31), Grid(0.07, 8, True))]
    with mock.patch.object(fakequant, "BLOCK", block), torch.no_grad():
        for m in modules:
            want, got = m(x), m(x.contiguous(memory_format=cl))
            assert torch.equal(got, want)
            assert got.is_contiguous(memory_format=cl)
        add = QuantAdd(Grid(0.1, 8, True), Grid(0.05, 8, True), Grid(0.07, 8, True))
        want = add(x, y)
        for a, c in ((x.contiguous(memory_format=cl), y.contiguous(memory_format=cl)),
                     (x.contiguous(memory_format=cl), y)):
            assert torch.equal(add(a, c), want)
