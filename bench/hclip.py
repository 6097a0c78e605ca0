"""Hessian-weighted per-channel weight clipping, measured at fixed plans (the quantizer alone).

    python bench/hclip.py [--models cnn,resnet18]

For each model and budget of bench/quality.py, bitplan's plan (the pipeline's Omega, the
library's defaults, ``quantize.weight_clip: max``) is quantized three ways and scored on the
held-out samples (paired KL to FP32 against ``max``): ``max`` (max|W| per channel), ``mse``
(``QuantizeConfig(weight_clip="mse")``: the scale among ``CLIP_RATIOS`` x max|W| with the least
squared rounding error per channel) and ``hessian`` (the clip ratios
``sensitivity.measure(..., weight_clip="hessian")`` chooses on the pipeline's train split: the
same grid, least ``sum_i H_ii (Q(w)_i - w_i)^2`` per channel with the sweep's Hutchinson
diagonal; a channel whose diagonal sums to <= 0 falls back to ``mse``), handed to
``quantize.apply(clip=...)``. Only the checkpoint's scales change (the bias correction follows
them), so the rows say whether the quantizer helps at a fixed plan; ``bench/quality.py
--clip-rows hessian`` measures the job with the clip (its Omega and plan too).

``--cost`` instead times the sensitivity stage (``sensitivity.measure`` with the pipeline's
Hessian defaults and its bias correction, ``weight``) with ``weight_clip`` max and hessian,
alternating in one process (``--repeats`` each), and prints the median seconds and their
ratio: what the Hessian clip adds (the diagonal's running sums, the ratio search, and the
kept shares' separate probe passes, since its directions are known only after the sweep).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from quantize import QuantizeConfig  # noqa: E402
from sensitivity import zoo  # noqa: E402
from sensitivity.engine import measure  # noqa: E402
from sensitivity.hessian import HessianConfig  # noqa: E402
from sensitivity.intake import IntakeConfig, intake  # noqa: E402
from solver import SolveConfig, solve  # noqa: E402
from solver.problem import Limits, Problem  # noqa: E402


def cost(models: list[str], repeats: int, bias_correction: str = "weight") -> None:
    """Median seconds of the sensitivity stage with weight_clip max and hessian, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in models:
            pt2, x, y = quality.trained(name, work)
            cal_y = None if y is None else y[:quality.N_CALIB]
            calib = zoo.save_calibration(work / f"{name}-c.safetensors", x[:quality.N_CALIB],
                                         cal_y)
            it = intake(pt2, calib, IntakeConfig(holdout_fraction=0.1, seed=0))
            cfg = HessianConfig(sampling="auto")  # the pipeline's defaults (tol 0.05)
            times: dict[str, list[float]] = {"max": [], "hessian": []}
            for _ in range(repeats):
                for mode in times:
                    t0 = time.perf_counter()
                    res = measure(it, cfg, bias_correction=bias_correction, weight_clip=mode)
                    times[mode].append(time.perf_counter() - t0)
                    print(f"{name} {mode}: {times[mode][-1]:.1f} s, kept probes "
                          f"{res.model.get('kept_probes')}", flush=True)
            med = {m: statistics.median(t) for m, t in times.items()}
            print(f"{name}: measure() median max {med['max']:.1f} s, hessian "
                  f"{med['hessian']:.1f} s: {med['hessian'] / med['max']:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cost", action="store_true", help="time measure() max vs hessian")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bias-correction", default="weight", choices=["none", "weight"],
                    help="--cost: measure()'s bias correction (none: no kept shares, so the "
                    "diagonal and the ratio search alone)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        cost(args.models.split(","), args.repeats, args.bias_correction)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            pt2, x, y = quality.trained(name, work)
            cal_y = None if y is None else y[:quality.N_CALIB]
            calib = zoo.save_calibration(work / f"{name}-h.safetensors", x[:quality.N_CALIB],
                                         cal_y)
            it = intake(pt2, calib, IntakeConfig(holdout_fraction=0.1, seed=0))
            clip = measure(it, HessianConfig(sampling="auto"), weight_clip="hessian").clip
            for resource, abits, fractions in (("size_bytes", [8], [0.25, 0.5, 0.75]),
                                               ("bops", [4, 8], [0.5])):
                problem, template, ev, _ = quality.prepare(name, work, abits)
                for label, limit in quality.budgets(problem, resource, fractions):
                    sol = solve(Problem(problem.layers, Limits(**{resource: limit}),
                                        problem.ties), SolveConfig())
                    plan = quality.plan_for(template, problem, dict(sol.choices))
                    _, kl_max = ev.score(plan)
                    _, kl_mse = ev.score(plan, QuantizeConfig(weight_clip="mse"))
                    _, kl_h = ev.score(plan, QuantizeConfig(weight_clip="hessian"), clip)
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
