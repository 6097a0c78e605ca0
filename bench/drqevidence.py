"""More evidence for DRQ in a plan (docs/drq.md; each design committed before its run).

    nice -n 19 .venv/bin/python bench/drqevidence.py --kl-omega --models cnn --seeds 5 --cache DIR
    nice -n 19 .venv/bin/python bench/drqevidence.py --hard --models cnn-hard,resnet-hard \\
        --seeds 5 --cache DIR [--first-seed N] [--cached-only] [--json out.json]

``--kl-omega``: does a label-free measured Omega give the ILP better plans? For each seed and
cost model (``drq-array`` latency, BOPS) the pipeline runs with ``hessian.omega: measured``
twice: measured in the job's cross-entropy (problem J) and in KL to the FP32 softmax (problem
K; ``hessian.measured_loss: label_free``), DRQ modes by the regions' estimate in both; problem
KM is K with each DRQ option's activation Omega measured in KL too
(``sensitivity.drqmeasured``, ``loss="label_free"``). At every budget each problem's ILP
optimum is quantized and judged on the 597 held-out digits; per image the mean over seeds of
the KL difference (K - J, KM - K), its mean and paired se over images; accuracy likewise with
the sign-flip p.

``--hard``: the seeds test of ``bench/drq.py --plans --seeds`` on a harder task built from the
same digits (8x8): each image rotated (uniform +-10 degrees), shifted (uniform +-1 px) and
with Gaussian noise (sd 0.1) added, by generators seeded per split and never by the model
seed; models DigitsCNN width 16 ("cnn-hard") and DigitsResNet width 8 ("resnet-hard"); 4
variants of each of the 1000 training digits, 1 of each of the 200 calibration digits, 8 of
each of the 597 held-out digits (4776 images). The unit of the test is the held-out digit:
d_i = the mean over seeds and over the digit's 8 variants of (correct with DRQ - correct
off); two-sided sign-flip p over the 597 digits; Holm over every budget of the comparison.
Per-seed figures are kept in ``--cache``/drq-hard.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.drq import (  # noqa: E402
    SIGN_FLIPS,
    PlanModel,
    PlanRun,
    digits_split,
    holm,
    kept_record,
    measured_drq_problem,
    plans_model,
    sign_flip_p,
)
from solver import solve  # noqa: E402
from solver.problem import Limits, Problem  # noqa: E402

HARD_SIDE = 8
HARD_ROTATION_DEG = 10.0  # uniform +-: FP32 ~0.86 / 0.90 on the calibration digits (seed 0)
HARD_SHIFT_PX = 1.0  # uniform +-, of 8 px
HARD_NOISE_SD = 0.1  # Gaussian, on pixels in [0, 1]
HARD_VARIANTS = {"train": 4, "calib": 1, "holdout": 8}  # variants per digit in each split
HARD_SPLIT_SEEDS = {"train": 101, "calib": 102, "holdout": 103}  # never the model's seed


def distort(x: torch.Tensor, variants: int, seed: int) -> torch.Tensor:
    """``variants`` rotated, shifted and noisy copies of each image of ``x`` [N, 1, S, S],
    digit-major (image i's copies at rows i * variants ...), from a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = x.repeat_interleave(variants, dim=0)
    n, side = len(x), x.shape[-1]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(HARD_ROTATION_DEG)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * HARD_SHIFT_PX * 2 / side
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + HARD_NOISE_SD * torch.randn(out.shape, generator=gen)).contiguous()


def hard_split() -> tuple[torch.Tensor, ...]:
    """The hard task's (train, calibration, held-out) split: the plans' digits split at 16x16,
    each part distorted (``distort``) with its own variants and generator."""
    xt, yt, xc, yc, xe, ye = digits_split(HARD_SIDE, 1)
    out = []
    for part, (x, y) in zip(("train", "calib", "holdout"), ((xt, yt), (xc, yc), (xe, ye)),
                            strict=True):
        k = HARD_VARIANTS[part]
        out += [distort(x, k, HARD_SPLIT_SEEDS[part]), y.repeat_interleave(k)]
    return tuple(out)


def _kept(cache: Path | None, folder: str, name: str) -> Path | None:
    return None if cache is None else cache / folder / name


def grouped_table(per_seed: dict, variants: int) -> dict:
    """The test of docs/drq.md ("A harder task"): per held-out digit the mean over seeds and
    over its ``variants`` images of (correct with DRQ - correct off), for the ILP's plan and
    the job's checked plan; mean and se over digits, two-sided sign-flip p, Holm over every
    budget of each comparison (all models)."""
    out = {}
    for arm in ("checked", "ilp"):
        rows = []
        for name, recs in per_seed.items():
            seeds = sorted(recs)
            for key in recs[seeds[0]]["budgets"]:
                got = [recs[s]["budgets"][key].get("per_image") for s in seeds]
                if any(g is None for g in got):
                    continue
                t = {f: torch.tensor([g[f] for g in got], dtype=torch.float64)
                     for f in ("ilp_correct", "off_correct", "checked_correct", "ilp_kl",
                               "off_kl", "checked_kl")}

                def per_digit(v: torch.Tensor) -> torch.Tensor:
                    return v.mean(0).reshape(-1, variants).mean(1)

                d = per_digit(t[f"{arm}_correct"] - t["off_correct"])
                dkl = per_digit(t[f"{arm}_kl"] - t["off_kl"])
                n = len(d)
                rows_drq = [recs[s]["budgets"][key]["drq_rows"] if arm == "ilp"
                            else recs[s]["budgets"][key]["per_image"]["checked_drq_rows"]
                            for s in seeds]
                kl_se = float(dkl.std()) / math.sqrt(n)
                rows.append({
                    "model": name, "budget": key, "seeds": len(seeds),
                    "seeds_with_drq": sum(1 for r in rows_drq if r),
                    "acc_drq": float(t[f"{arm}_correct"].mean()),
                    "acc_off": float(t["off_correct"].mean()),
                    "gain": float(d.mean()), "gain_se": float(d.std()) / math.sqrt(n),
                    "p": sign_flip_p(d), "kl_drq": float(t[f"{arm}_kl"].mean()),
                    "kl_off": float(t["off_kl"].mean()), "kl_diff_se": kl_se,
                    "kl_z": float(dkl.mean()) / kl_se if kl_se > 0 else 0.0})
        for row, adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
            row["p_holm"] = adj
        out[arm] = rows
        print(f"\n{arm} plan against off: per held-out digit the mean over seeds and its "
              f"{variants} variants of correct DRQ - correct off (p: sign-flip over digits, "
              f"{SIGN_FLIPS} flips; Holm over the {len(rows)} budgets)")
        print(f"  {'budget':>34} {'DRQ in':>6} {'acc DRQ':>8} {'acc off':>8} {'gain pt':>8} "
              f"{'+-se':>5} {'p':>8} {'Holm':>6} {'KL DRQ':>7} {'KL off':>7} {'d/se':>6}")
        for r in rows:
            print(f"  {r['budget']:>34} {r['seeds_with_drq']:3d}/{r['seeds']:<2} "
                  f"{r['acc_drq']:8.4f} {r['acc_off']:8.4f} {100 * r['gain']:+8.2f} "
                  f"{100 * r['gain_se']:5.2f} {r['p']:8.2g} {r['p_holm']:6.3f} "
                  f"{r['kl_drq']:7.4f} {r['kl_off']:7.4f} {r['kl_z']:+6.1f}")
    checked = out["checked"]
    win = [r["budget"] for r in checked
           if r["gain"] > 0 and r["p_holm"] < 0.05 and r["seeds_with_drq"] > 0]
    worse = [r["budget"] for r in checked if r["gain"] < 0 and r["p"] < 0.05]
    out["verdict"] = {"win": win, "worse": worse}
    print(f"\npre-registered verdict: win (checked gain > 0, Holm p < 0.05, DRQ kept in a "
          f"seed) at {win or 'no budget'}; worse (gain < 0, p < 0.05) at {worse or 'no budget'}")
    return out


def _hard_seed(args: argparse.Namespace, name: str, seed: int, data, tmp: Path, cache) -> dict:
    """One model seed of the harder task: its FP32 accuracy and every budget's plans."""
    t0 = time.perf_counter()
    model = PlanModel(name, tmp, seed, data=data)
    return {"fp32_accuracy": model.fp32_accuracy, "budgets": plans_model(args, model, cache),
            "seconds": time.perf_counter() - t0}


def hard(args: argparse.Namespace) -> None:
    from service.cache import StageCache

    data = hard_split()
    per_seed: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = StageCache(args.cache / "stages" if args.cache else Path(tmp) / "cache")
        for seed in range(args.first_seed, args.seeds):
            for name in args.models.split(","):
                kept = _kept(args.cache, "drq-hard", f"{name}-s{seed}.json")
                rec = kept_record(
                    kept, args.cached_only,
                    lambda name=name, seed=seed: _hard_seed(
                        args, name, seed, data, Path(tmp), cache),
                    say=f"{name} seed {seed}")
                if rec is None:
                    continue
                per_seed.setdefault(name, {})[seed] = rec
    for name, recs in per_seed.items():
        accs = [recs[s]["fp32_accuracy"] for s in sorted(recs)]
        print(f"{name}: seeds {sorted(recs)}, FP32 held-out accuracy "
              f"{min(accs):.4f}..{max(accs):.4f}")
    results = grouped_table(per_seed, HARD_VARIANTS["holdout"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def kl_omega(args: argparse.Namespace) -> None:
    """Problems J (measured in cross-entropy), K (measured in KL to FP32) and KM (K with the
    DRQ modes measured in KL) at every budget, judged on the held-out digits (docs/drq.md,
    "Measured Omega by KL"); per-seed records in ``--cache``/kl-omega."""
    from service.cache import StageCache

    fracs = [float(f) for f in args.budgets.split(",")]
    names = ("J", "K", "KM")
    per: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = StageCache(args.cache / "stages" if args.cache else Path(tmp) / "cache")
        for seed in range(args.first_seed, args.seeds):
            for name in args.models.split(","):
                kept = _kept(args.cache, "kl-omega", f"{name}-s{seed}.json")
                recs = kept_record(
                    kept, args.cached_only, lambda name=name, seed=seed: kl_omega_seed(
                        PlanModel(name, Path(tmp), seed), cache, fracs, names))
                if recs is None:
                    continue
                for key, rec in recs.items():
                    per.setdefault(key, []).append(rec)
    print(f"\nper image the mean over seeds; d/se = KL difference over its paired se; p: "
          f"sign-flip of the accuracy difference ({SIGN_FLIPS} flips)")
    print(f"  {'budget':>28} {'seeds':>5} {'KL J':>7} {'KL K':>7} {'KL KM':>7} {'K-J d/se':>8} "
          f"{'KM-K d/se':>9} {'acc J':>7} {'acc K':>7} {'acc KM':>7} {'p K-J':>7} {'p KM-K':>7}")
    summary = {}
    for key, recs in per.items():
        t = {f"{a}_{f}": torch.tensor([r[a][f] for r in recs], dtype=torch.float64)
             for a in names for f in ("correct", "kl")}
        row: dict = {"seeds": len(recs)}
        for a in names:
            row[f"kl_{a}"], row[f"acc_{a}"] = (float(t[f"{a}_kl"].mean()),
                                              float(t[f"{a}_correct"].mean()))
        for new, old in (("K", "J"), ("KM", "K")):
            dkl = (t[f"{new}_kl"] - t[f"{old}_kl"]).mean(0)
            se = float(dkl.std()) / math.sqrt(len(dkl))
            row[f"{new}-{old}_z"] = float(dkl.mean()) / se if se > 0 else 0.0
            row[f"{new}-{old}_p"] = sign_flip_p((t[f"{new}_correct"] - t[f"{old}_correct"])
                                                .mean(0))
            row[f"{new}-{old}_differ"] = sum(r[new]["choices"] != r[old]["choices"] for r in recs)
        summary[key] = row
        print(f"  {key:>28} {row['seeds']:5d} {row['kl_J']:7.4f} {row['kl_K']:7.4f} "
              f"{row['kl_KM']:7.4f} {row['K-J_z']:+8.1f} {row['KM-K_z']:+9.1f} "
              f"{row['acc_J']:7.4f} {row['acc_K']:7.4f} {row['acc_KM']:7.4f} "
              f"{row['K-J_p']:7.3f} {row['KM-K_p']:7.3f}")
    for new, old in (("K", "J"), ("KM", "K")):
        zs = [r[f"{new}-{old}_z"] for r in summary.values()]
        helps = any(z < -2 for z in zs) and not any(z > 2 for z in zs)
        print(f"rule for {new} against {old}: lower beyond 2 se at {sum(z < -2 for z in zs)}, "
              f"higher beyond 2 se at {sum(z > 2 for z in zs)} of {len(zs)} budgets: "
              f"{'helps' if helps else 'does not help'}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def kl_omega_seed(model: PlanModel, cache, fracs: list[float], names: tuple[str, ...]) -> dict:
    """One trained model: per cost model and budget, each problem's plan on the held-out
    digits (choices, per-image correct and KL)."""
    out = {}
    for hardware in ("drq-array", None):
        runs = {}
        for loss in ("job", "label_free"):
            constraints = {"limits": {"bops_ratio": 1.0}, "weight_bits": [4, 8],
                           "activation_bits": [4, 8], "drq": {"enabled": True},
                           "pin": {"first": None, "last": None}, "hardware": hardware,
                           "hessian": {"omega": "measured", "measured_loss": loss}}
            runs[loss] = PlanRun(model, constraints, cache)
        run = runs["label_free"]
        t0 = time.perf_counter()
        problems = {"J": runs["job"].problem, "K": run.problem,
                    "KM": measured_drq_problem(run, loss="label_free")}
        lo, hi = run.extreme("w4a4"), run.extreme("w8a8")
        print(f"\n{model.name} seed {model.seed}, {run.resource}: pipelines "
              f"{runs['job'].seconds:.1f} / {run.seconds:.1f} s, measured DRQ Omega "
              f"{time.perf_counter() - t0:.1f} s, FP32 accuracy {model.fp32_accuracy:.4f}")
        for frac in fracs:
            limits = Limits(**{run.resource: lo + frac * (hi - lo)})
            rec = {}
            for a in names:
                prob = Problem(problems[a].layers, limits, problems[a].ties)
                sol = solve(prob)
                if not sol.choices:
                    break
                s = run.score(run.plan(prob, sol.choices))
                rec[a] = {"choices": sol.choices, "correct": s["correct"].int().tolist(),
                          "kl": s["kl"].tolist(), "drq_rows": s["drq_rows"]}
            if len(rec) < len(names):
                print(f"  {frac:5.2f} infeasible")
                continue
            print(f"  {frac:5.2f} " + "  ".join(
                f"{a}: KL {sum(rec[a]['kl']) / len(rec[a]['kl']):.4f} acc "
                f"{sum(rec[a]['correct']) / len(rec[a]['correct']):.4f} DRQ rows "
                f"{rec[a]['drq_rows']}" for a in names))
            out[f"{model.name} {run.resource} {frac}"] = rec
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl-omega", action="store_true",
                        help="the ILP with Omega measured in KL to FP32 against cross-entropy")
    parser.add_argument("--hard", action="store_true",
                        help="the seeds test on rotated, shifted, noisy digits")
    parser.add_argument("--models", default=None,
                        help="default: cnn (--kl-omega), cnn-hard,resnet-hard (--hard)")
    parser.add_argument("--seeds", type=int, default=5, help="model seeds 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train from this seed on (a second process into the same cache)")
    parser.add_argument("--budgets", default=None,
                        help="fractions from all-W4A4 to all-W8A8 (default: --kl-omega "
                        "0.1,0.25,0.5,0.75; --hard 0.25,0.5,0.75)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keeps the stage cache and the per-seed figures between runs")
    parser.add_argument("--cached-only", action="store_true",
                        help="only aggregate the per-seed figures already in --cache")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()
    if args.kl_omega:
        args.models = args.models or "cnn"
        args.budgets = args.budgets or "0.1,0.25,0.5,0.75"
        kl_omega(args)
    elif args.hard:
        args.models = args.models or "cnn-hard,resnet-hard"
        args.budgets = args.budgets or "0.25,0.5,0.75"
        hard(args)
    else:
        parser.error("pick --kl-omega or --hard")


if __name__ == "__main__":
    main()
