"""quantize.clip: the chosen clip ratios minimise the (Hessian-weighted) rounding error over the
grid, a constant diagonal gives the MSE choice, a folded BatchNorm leaves the choice (and the
codes, up to sign) unchanged, the ratios round-trip through JSON, and the quantize stage refuses
a Hessian clip without ratios."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize import QuantizeConfig, apply
from quantize.clip import ClipRatios, choose_ratios, parse_key, ratios_for
from quantize.primitives import CLIP_RATIOS, expand_scales, qmax_signed, quantize_weight
from solver.errors import BadConstraintsError, BadPlanError


def _errors(w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Brute force: ``[ratios, out, groups]`` weighted error of every grid ratio, in float64."""
    q = qmax_signed(bits)
    out = w.shape[0]
    g = w[0].numel() if group is None else group
    wg = w.reshape(out, -1, g).double()
    hg = h.reshape(out, -1, g).double()
    absmax = w.reshape(out, -1, g).abs().amax(2)
    errs = []
    for r in CLIP_RATIOS:
        s = (absmax * torch.tensor(r, dtype=torch.float32) / q).clamp_min(1e-12).double()
        deq = torch.round(wg / s[..., None]).clamp(-q, q) * s[..., None]
        errs.append((hg * (deq - wg).pow(2)).sum(2))
    return torch.stack(errs)


def _index(ratio: float) -> int:
    """The grid index of a (float32) ratio."""
    return min(range(len(CLIP_RATIOS)), key=lambda i: abs(CLIP_RATIOS[i] - ratio))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([None, 4, 8]), outlier=st.floats(1.0, 20.0))
def test_chosen_ratio_minimises_the_weighted_error(seed, bits, group, outlier) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 2, 2, 4, generator=gen) * torch.rand(6, 1, 1, 1, generator=gen)
    w[0, 0, 0, 0] *= outlier
    h = torch.rand(w.shape, generator=gen) ** 3
    h[1] = 0.0  # a channel without curvature: plain squared error
    ratios = choose_ratios(w, bits, group, h)
    errs = _errors(w, torch.where(h.sum((1, 2, 3), keepdim=True) > 0, h, torch.ones_like(h)),
                   bits, group)
    best = errs.min(0).values
    idx = torch.tensor([_index(r) for r in ratios.reshape(-1).tolist()]).reshape(best.shape)
    chosen = errs.gather(0, idx[None]).squeeze(0)
    # the float32 search and this float64 brute force agree up to rounding: 1e-5 relative
    assert torch.all(chosen <= best * (1 + 1e-5) + 1e-30)
    assert ratios.shape == ((6,) if group is None else (6, 16 // group))


def test_constant_diagonal_is_the_mse_choice() -> None:
    torch.manual_seed(1)
    w = torch.randn(32, 72) * torch.rand(32, 1)
    w[:, 0] *= 6.0
    for bits in (2, 4, 8):
        for group in (None, 8):
            mse = choose_ratios(w, bits, group)
            # a power of two scales every weighted error exactly: the same argmin, bit for bit
            assert torch.equal(choose_ratios(w, bits, group, torch.full_like(w, 4.0)), mse)
            assert torch.equal(ratios_for("hessian", w, bits, group, torch.full_like(w, 0.5)),
                               ratios_for("mse", w, bits, group))
    assert bool((choose_ratios(w, 4) < 1).any())  # the outliers are clipped


def test_a_folded_batchnorm_leaves_the_ratio_and_the_codes() -> None:
    """Folding multiplies channel c's weights by gamma_c (sign included) and its Hessian
    diagonal by 1 / gamma_c^2: every ratio's weighted error scales by one constant, so the
    argmin is the same, and the codes are the unfolded ones times sign(gamma_c)."""
    torch.manual_seed(2)
    w = torch.randn(64, 8, 3, 3) * torch.rand(64, 1, 1, 1)
    h = torch.rand(w.shape) ** 3
    gamma = (torch.rand(64) * 3 + 0.05) * torch.where(torch.rand(64) < 0.3, -1.0, 1.0)
    g4 = gamma.reshape(-1, 1, 1, 1)
    folded, h_folded = w * g4, h / g4.pow(2)
    for bits in (2, 4, 8):
        r, r_f = choose_ratios(w, bits, None, h), choose_ratios(folded, bits, None, h_folded)
        same = r == r_f
        # float rounding may flip a channel whose two best ratios tie to ~1e-7: then both
        # errors must be equal to 1e-5 (measured: no channel differs)
        for c in torch.nonzero(~same).flatten().tolist():
            e = _errors(w[c:c + 1], h[c:c + 1], bits, None)[:, 0, 0]
            i, j = _index(float(r[c])), _index(float(r_f[c]))
            assert float(e[j]) <= float(e[i]) * (1 + 1e-5)
        assert float(same.double().mean()) >= 0.95
        codes, _ = quantize_weight(w, bits, ratio=r)
        codes_f, _ = quantize_weight(folded, bits, ratio=r)
        sign = torch.sign(gamma).to(torch.int32).reshape(-1, 1, 1, 1)
        agree = (codes_f == codes * sign).double().mean()
        assert float(agree) > 0.9999  # a code may differ at an exact rounding tie (none seen)


def test_ratios_round_trip_exactly() -> None:
    torch.manual_seed(3)
    w = torch.randn(10, 32)
    h = torch.rand(10, 32)
    clip = ClipRatios("hessian", {"fc": {(4, None): choose_ratios(w, 4, None, h),
                                         (4, 8): choose_ratios(w, 4, 8, h),
                                         (2, None): choose_ratios(w, 2, None, h)}})
    back = ClipRatios.from_dict(clip.to_dict())
    assert back.mode == "hessian" and set(back.layers["fc"]) == set(clip.layers["fc"])
    for k, r in clip.layers["fc"].items():
        assert torch.equal(back.layers["fc"][k], r)
    assert parse_key("4g8") == (4, 8) and parse_key("4") == (4, None)
    assert ClipRatios().ratio("any", 4) is None  # max: no table
    with pytest.raises(KeyError, match="'fc' at 3"):
        clip.ratio("fc", 3)
    with pytest.raises(ValueError, match="weight clip must be one of"):
        ClipRatios("median")


def test_quantize_config_refuses_an_unknown_clip() -> None:
    with pytest.raises(BadConstraintsError, match="weight_clip must be one of"):
        QuantizeConfig(weight_clip="p99")
    assert QuantizeConfig.from_json(QuantizeConfig(weight_clip="hessian").to_json()) \
        == QuantizeConfig(weight_clip="hessian")


def test_hessian_clip_without_ratios_is_refused(mlp_program, plan_for, split) -> None:
    plan = plan_for(mlp_program, w_bits=4)
    with pytest.raises(BadPlanError, match="no clip ratios for layer"):
        apply(mlp_program, plan, *split, QuantizeConfig(weight_clip="hessian"))


def test_checkpoint_scales_are_the_ratios_times_max(mlp_program, plan_for, split,
                                                    clip_for) -> None:
    """The per-group and per-channel scales a Hessian clip writes are ratio x max|W| / qmax
    (the MLP has no BatchNorm: the folded weights are the trained ones)."""
    clip = clip_for(mlp_program, group_sizes=(None, 16))
    plan = plan_for(mlp_program, w_bits=lambda i, _: 4 if i % 2 else 3)
    for i, row in enumerate(plan["layers"]):
        row["group_size"] = 16 if i == 0 else None
    res = apply(mlp_program, plan, *split, QuantizeConfig(weight_clip="hessian"), clip=clip)
    weights = dict(mlp_program.module().named_parameters())
    clipped = 0
    for row in plan["layers"]:
        w, b, g = weights[row["name"] + ".weight"].detach(), row["w_bits"], row["group_size"]
        ratio = clip.ratio(row["name"], b, g)
        absmax = w.reshape(w.shape[0], -1, g or w[0].numel()).abs().amax(2)
        want = (absmax * ratio.reshape(absmax.shape) / qmax_signed(b)).reshape(ratio.shape)
        assert torch.allclose(res.tensors[row["name"] + ".weight_scale"], want, rtol=1e-6)
        clipped += int((ratio < 1).sum())
        deq = res.checkpoint.dequantized_weight(row["name"])
        assert torch.equal(deq, res.checkpoint.codes(row["name"]).float()
                           * expand_scales(res.tensors[row["name"] + ".weight_scale"], deq))
    assert clipped > 0
