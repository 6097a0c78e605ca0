"""Omega and the checkpoint agree on the quantizer: the weight error behind a layer's Omega is
the error of the weights the checkpoint stores, for either way of choosing scales, with or
without bias correction (which changes the stored bias only; Omega does not model it)."""

from __future__ import annotations

import pytest
import torch

from quantize import QuantizeConfig, apply, primitives
from quantize.checkpoint import decode_weight
from quantize.primitives import expand_scales
from sensitivity import HessianConfig, measure
from sensitivity.intake import IntakeConfig, intake


@pytest.mark.parametrize(("clip", "bias_correction"),
                         [("max", "none"), ("mse", "none"), ("max", "layer")])
def test_omega_uses_the_checkpoints_quantizer(clip, bias_correction, mlp_pt2, calib_path,
                                               plan_for, monkeypatch) -> None:
    monkeypatch.setattr(primitives, "WEIGHT_CLIP", clip)
    job = intake(mlp_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))
    sens = measure(job, HessianConfig(max_iter=4, tol=0.5, min_iter=2, activations=False))
    plan = plan_for(job.program, w_bits=4)
    res = apply(job.program, plan, job.train, job.holdout,
                QuantizeConfig(bias_correction=bias_correction))
    weights = dict(job.program.module().named_parameters())
    for s in sens.layers:  # the MLP has no BatchNorm: stored weights are the trained ones
        w = weights[f"{s.name}.weight"].detach()
        codes = decode_weight(res.tensors[f"{s.name}.weight_q"], tuple(w.shape))
        scale = res.tensors[f"{s.name}.weight_scale"]
        stored_error = float((codes.float() * expand_scales(scale, w) - w).pow(2).sum())
        omega_error = s.omega_w[4] / (s.weight_trace / s.params)
        assert omega_error == pytest.approx(stored_error, rel=1e-5)


def test_mse_clipping_never_increases_the_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    w[0, 0] = 8.0  # an outlier: max-abs scaling wastes most of channel 0's grid
    for bits in (2, 3, 4, 8):
        e_max = primitives.weight_quant_error(w, bits)
        codes, scale = primitives.quantize_weight(w, bits, primitives.weight_scales(w, bits,
                                                                                   clip="mse"))
        e_mse = float((codes * expand_scales(scale, w) - w).pow(2).sum())
        assert e_mse <= e_max * (1 + 1e-6)  # 1.0 is among the clip ratios tried
    e4 = primitives.weight_quant_error(w, 4)
    s = primitives.weight_scales(w, 4, clip="mse")
    assert float(((primitives.quantize_weight(w, 4, s)[0] * expand_scales(s, w)) - w)
                 .pow(2).sum()) < 0.9 * e4  # measured 0.55-0.8 x on such weights
