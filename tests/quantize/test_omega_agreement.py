"""Omega and the checkpoint agree on the quantizer: the weight error behind a layer's Omega is
the error of the weights the checkpoint stores, for every way of choosing scales (max|W|, MSE
and Hessian-weighted clip ratios from the sensitivity stage), with or without bias correction
(which changes the stored bias only; Omega does not model it here)."""

from __future__ import annotations

import pytest
import torch

from quantize import QuantizeConfig, apply, primitives
from quantize.checkpoint import decode_weight
from quantize.clip import choose_ratios
from quantize.primitives import expand_scales
from sensitivity import HessianConfig, measure
from sensitivity.engine import diagonal_omega
from sensitivity.intake import IntakeConfig, intake


def _stored_error(res, name: str, w: torch.Tensor, diag: torch.Tensor | None = None) -> float:
    codes = decode_weight(res.tensors[f"{name}.weight_q"], tuple(w.shape))
    scale = res.tensors[f"{name}.weight_scale"]
    err = (codes.double() * expand_scales(scale.double(), w) - w.double()).pow(2)
    return float(err.sum() if diag is None else (diag.double() * err).sum())


@pytest.mark.parametrize(("clip", "bias_correction"),
                         [("max", "none"), ("mse", "none"), ("hessian", "none"),
                          ("max", "layer"), ("hessian", "weight")])
def test_omega_uses_the_checkpoints_quantizer(clip, bias_correction, mlp_pt2, calib_path,
                                               plan_for) -> None:
    job = intake(mlp_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))
    sens = measure(job, HessianConfig(max_iter=4, tol=0.5, min_iter=2, activations=False),
                   weight_clip=clip)
    assert sens.clip.mode == clip and sens.config["weight_clip"] == clip
    plan = plan_for(job.program, w_bits=4)
    res = apply(job.program, plan, job.train, job.holdout,
                QuantizeConfig(bias_correction=bias_correction, weight_clip=clip),
                clip=sens.clip)
    weights = dict(job.program.module().named_parameters())
    for s in sens.layers:  # the MLP has no BatchNorm: stored weights are the trained ones
        w = weights[f"{s.name}.weight"].detach()
        omega_error = s.omega_w[4] / (s.weight_trace / s.params)
        assert omega_error == pytest.approx(_stored_error(res, s.name, w), rel=1e-5)
        if clip == "hessian":  # the checkpoint's scales: the ratios minimising the weighted error
            assert torch.equal(sens.clip.ratio(s.name, 4),
                               choose_ratios(w, 4, None, sens.diagonals[s.name]))


def test_diagonal_omega_of_a_hessian_clip_is_the_checkpoints_weighted_error(
        mlp_pt2, calib_path, plan_for) -> None:
    job = intake(mlp_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))
    sens = measure(job, HessianConfig(max_iter=4, tol=0.5, min_iter=2, activations=False,
                                      diagonal=True), weight_clip="hessian")
    plan = plan_for(job.program, w_bits=4)
    res = apply(job.program, plan, job.train, job.holdout,
                QuantizeConfig(bias_correction="none", weight_clip="hessian"), clip=sens.clip)
    weights = dict(job.program.module().named_parameters())
    for s in sens.layers:
        w, diag = weights[f"{s.name}.weight"].detach(), sens.diagonals[s.name]
        assert s.omega_w[4] == pytest.approx(_stored_error(res, s.name, w, diag), rel=1e-6)
        # and no lower than the same Omega at max|W| scales, since 1.0 is among the ratios
        assert s.omega_w[4] <= diagonal_omega(diag, w, 4) * (1 + 1e-9)


def test_grouped_omega_uses_the_checkpoints_grouped_quantizer(mlp_pt2, calib_path,
                                                              plan_for) -> None:
    from sensitivity.engine import group_omegas

    job = intake(mlp_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))
    sens = measure(job, HessianConfig(max_iter=4, tol=0.5, min_iter=2, activations=False),
                   weight_clip="hessian")
    sens = group_omegas(job, sens, [None, 16])
    plan = plan_for(job.program, w_bits=4)
    for row in plan["layers"]:
        row["group_size"] = 16
    res = apply(job.program, plan, job.train, job.holdout,
                QuantizeConfig(bias_correction="none", weight_clip="hessian"), clip=sens.clip)
    weights = dict(job.program.module().named_parameters())
    for s in sens.layers:
        w = weights[f"{s.name}.weight"].detach()
        assert res.tensors[f"{s.name}.weight_scale"].dim() == 2
        omega_error = s.omega_wg[16][4] / (s.weight_trace / s.params)
        assert omega_error == pytest.approx(_stored_error(res, s.name, w), rel=1e-5)
        assert torch.equal(sens.clip.ratio(s.name, 4, 16),
                           choose_ratios(w, 4, 16, sens.diagonals[s.name]))


def test_mse_clipping_never_increases_the_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    w[0, 0] = 8.0  # an outlier: max-abs scaling wastes most of channel 0's grid
    for bits in (2, 3, 4, 8):
        e_max = primitives.weight_quant_error(w, bits)
        e_mse = primitives.weight_quant_error(w, bits, ratio=choose_ratios(w, bits))
        assert e_mse <= e_max * (1 + 1e-6)  # 1.0 is among the clip ratios tried
    e4 = primitives.weight_quant_error(w, 4)
    assert primitives.weight_quant_error(w, 4, ratio=choose_ratios(w, 4)) < 0.9 * e4
    # (measured 0.55-0.8 x on such weights)
