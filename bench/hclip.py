"""Hessian-weighted per-channel weight clipping, measured at fixed plans before any wiring.

    python bench/hclip.py [--models cnn,resnet18]

For each model and budget of bench/quality.py, bitplan's plan (the pipeline's Omega, the
library's defaults) is quantized three ways and scored on the held-out samples (paired KL to
FP32 against ``max``): ``max`` (the library's scales, max|W| per channel), ``mse`` (the scale
among ``CLIP_RATIOS`` x max|W| with the least squared rounding error per channel) and
``hessian`` (the same grid, least ``sum_i H_ii (Q(w)_i - w_i)^2`` per channel, H's diagonal
from the sensitivity sweep's probes, ``HessianConfig(diagonal=True)`` on the pipeline's train
split; channels whose diagonal sums to <= 0 fall back to ``mse``). Only the checkpoint's
weights change (the plan, Omega and the bias correction's codes follow the chosen scales), so
the rows say whether the quantizer helps at the plan, not how Omega would price it. A folded
BatchNorm scales a channel's weights and its Hessian diagonal by constants, which leaves the
per-channel argmin unchanged, so the unfolded diagonal serves the folded weight.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

import quantize.api as qapi  # noqa: E402
from quantize import primitives  # noqa: E402
from quantize.primitives import CLIP_RATIOS, qmax_signed  # noqa: E402
from sensitivity import zoo  # noqa: E402
from sensitivity.engine import measure  # noqa: E402
from sensitivity.hessian import HessianConfig  # noqa: E402
from sensitivity.intake import IntakeConfig, intake  # noqa: E402
from solver import SolveConfig, solve  # noqa: E402
from solver.problem import Limits, Problem  # noqa: E402

ORIGINAL = qapi.quantize_weight


def weighted_scales(w: torch.Tensor, h: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel, the scale among CLIP_RATIOS x max|W| / qmax with the least
    ``sum_i h_i (Q(w)_i - w_i)^2`` (``h`` clamped at 0; plain squared error where a channel's
    weights sum to 0)."""
    flat, hf = w.detach().float().flatten(1), h.float().clamp_min(0).flatten(1)
    hf = torch.where(hf.sum(1, keepdim=True) > 0, hf, torch.ones_like(hf))
    q = qmax_signed(bits)
    absmax = flat.abs().amax(1)
    best = torch.full_like(absmax, math.inf)
    chosen = (absmax / q).clamp_min(1e-12)
    for ratio in CLIP_RATIOS:
        s = (absmax * ratio / q).clamp_min(1e-12)
        err = (hf * (torch.round(flat / s[:, None]).clamp(-q, q) * s[:, None] - flat).pow(2)).sum(1)
        better = err < best
        best, chosen = torch.where(better, err, best), torch.where(better, s, chosen)
    return chosen


def patched(diags: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """``quantize_weight`` for quantize.api that picks Hessian-weighted per-channel scales for
    the layer whose (unfolded) weight the given (folded) weight is a per-row multiple of."""
    def quantize_weight(weight, bits, scale=None, group_size=None):
        if scale is not None or group_size is not None:
            return ORIGINAL(weight, bits, scale, group_size)
        f = weight.detach().float().flatten(1)
        best, diag = -1.0, None
        for orig, h in diags.values():
            if orig.shape != weight.shape:
                continue
            o = orig.flatten(1)
            cos = ((f * o).sum(1) / (f.norm(dim=1) * o.norm(dim=1)).clamp_min(1e-30)).mean()
            if float(cos) > best:
                best, diag = float(cos), h
        if diag is None or best < 0.999:
            raise RuntimeError("no layer's weight matches")
        return ORIGINAL(weight, bits, weighted_scales(weight, diag, bits), None)
    return quantize_weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            pt2, x, y = quality.trained(name, work)
            cal_y = None if y is None else y[:quality.N_CALIB]
            calib = zoo.save_calibration(work / f"{name}-h.safetensors", x[:quality.N_CALIB],
                                         cal_y)
            it = intake(pt2, calib, IntakeConfig(holdout_fraction=0.1, seed=0))
            sens = measure(it, HessianConfig(diagonal=True, sampling="auto"))
            params = dict(it.module.named_parameters())
            diags = {i.name: (params[i.graph.weight].detach().float(), sens.diagonals[i.name])
                     for i in it.layers}
            for resource, abits, fractions in (("size_bytes", [8], [0.25, 0.5, 0.75]),
                                               ("bops", [4, 8], [0.5])):
                problem, template, ev, _ = quality.prepare(name, work, abits)
                for label, limit in quality.budgets(problem, resource, fractions):
                    sol = solve(Problem(problem.layers, Limits(**{resource: limit}),
                                        problem.ties), SolveConfig())
                    plan = quality.plan_for(template, problem, dict(sol.choices))
                    _, kl_max = ev.score(plan)
                    primitives.WEIGHT_CLIP = "mse"
                    try:
                        _, kl_mse = ev.score(plan)
                    finally:
                        primitives.WEIGHT_CLIP = "max"
                    qapi.quantize_weight = patched(diags)
                    try:
                        _, kl_h = ev.score(plan)
                    finally:
                        qapi.quantize_weight = ORIGINAL
                    n = len(kl_max)
                    cells = [f"max {float(kl_max.mean()):.5f}"]
                    for tag, kl in (("mse", kl_mse), ("hessian", kl_h)):
                        d = kl - kl_max
                        cells.append(f"{tag} {float(kl.mean()):.5f} ({float(d.mean()):+.5f}, "
                                     f"se {float(d.std()) / math.sqrt(n):.5f})")
                    print(f"{name} {label}: {quality.plan_bits(problem, dict(sol.choices))}\n"
                          f"    KL to FP32: {'; '.join(cells)}", flush=True)


if __name__ == "__main__":
    main()
