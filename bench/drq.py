"""DRQ on the digits CNN: accuracy versus the fraction of regions at INT4, per candidate.

    .venv/bin/python bench/drq.py [--seeds 1] [--epochs 30] [--width 8] [--calib 256]
    .venv/bin/python bench/drq.py --low-weights [--seeds 3]
    .venv/bin/python bench/drq.py --plans [--models cnn,resnet18] [--budgets 0.1,0.25,0.5,0.75]
    .venv/bin/python bench/drq.py --plans --seeds 5 --cache DIR [--first-seed N] [--cached-only]
    .venv/bin/python bench/drq.py --drq-omega [--models cnn] [--seeds 5]
    .venv/bin/python bench/drq.py --omega-table [--models cnn] [--first-seed 1]
    .venv/bin/python bench/drq.py --issue-case [--json out.json]

For each init seed a DigitsCNN is trained on digits 0..1399 (as in the tests), exported, and
calibrated by ``sensitivity.regions.calibrate`` on the first ``--calib`` training digits. Every
candidate (region size x target sensitive fraction, the same mode on every conv) is then run
through ``quantize.drq.apply_drq`` (weights at 8 bits, W4 at 4 bits in INT4 regions) on the 397
held-out digits. Printed per candidate: the threshold per layer, the calibrated sensitive
fraction (train part), the INT4-region fraction the runtime counted on the held-out digits, the
accuracy and its difference to the all-INT8 model (the same DRQ conv with threshold 0, i.e.
input INT8 and W8 everywhere). All-INT4 (an unreachable threshold) and FP32 are baselines.
Nothing is timed against a baseline here: the numbers are accuracies.

``--low-weights`` compares the two ways to get the insensitive regions' 4-bit weights from the
8-bit ones, on DigitsCNN and DigitsResNet (15 epochs, init seeds 0..N-1), every conv in DRQ
at 2x2 regions and f = 0.1 / 0.3 / 0.5: requantising per output channel to 4 bits (what
``quantize.drq`` does) against clipping the INT8 codes to [-7, 7] at the INT8 scale. Printed:
held-out accuracy and the mean squared error of the logits against FP32.

``--plans``: does DRQ pay in a plan? For the digits CNN and a residual CNN of ResNet-18's shape
(``zoo.ResNet18Like(width=8)`` on the digits upsampled to 16x16, grey as RGB), trained on digits
0..999, bitplan's pipeline runs once per cost model (200 calibration digits, DRQ enabled, no
pins): on ``drq-array`` (latency) and on BOPS. From the same problem, the ILP is solved with
every option and with the DRQ options removed (same ILP, DRQ off), at 3 budgets each (0.25 /
0.5 / 0.75 of the way from all-W4A4 to all-W8A8, which both problems contain). Each plan is
quantized (calibrated on the 200 digits) and run on the other 597 held-out digits. Printed per
budget: accuracy with and without DRQ, the DRQ rows chosen, the share of regions at INT4 and of
the DRQ layers' multiplications at 4x4 (counted by the runtime on the held-out digits), and the
paired comparison: b / c = digits only the DRQ plan / only the plain plan gets right, with the
exact two-sided McNemar p-value (binomial, b of b + c at 1/2); a gap is called more than noise
when p < 0.05. The mean KL divergence to FP32 and its paired standard error are printed too.
Then the job's DRQ acceptance check (``quantize.drqcheck.decide``) on the 200 calibration
digits only: the per-digit cross-entropy of the best plan with DRQ rows (the ILP's; when it
has none, the best plan that forces one, marked *) and of the plan without DRQ, DRQ kept when
lower by more than one paired standard error; "checked" is the plan the check keeps, judged on
the 597 held-out digits against the plan without DRQ. The two
cost models share one stage cache, so the second pipeline reuses the sensitivity and regions.

``--plans --seeds K``: the above for K independently trained models of each (seed s: the init
and the data order; one split, so every seed is judged on the same 597 digits), then the test
of docs/drq.md: per held-out digit the mean over seeds of (correct with DRQ - correct off),
for the ILP's plan and for the job's checked plan, its mean and se over digits, a two-sided
sign-flip permutation p over digits, Holm over the budgets, for all seeds and for seeds 1..
alone. Per-seed figures are kept in ``--cache``/drq-seeds (``--first-seed`` lets a second
process train later seeds into it; ``--cached-only`` only aggregates).

``--drq-omega``: the ILP with the DRQ options' activation Omega measured
(``sensitivity.drqmeasured``) against estimated (the regions'), both in a pipeline with
``hessian.omega: measured``; ``--omega-table`` prints one model's DRQ Omegas measured with the
job's cross-entropy and with KL to FP32.

``--issue-case``: the issue's constraints on DigitsResNet (``bops_ratio`` 0.6, weights and
activations {4, 8}, DRQ enabled, default pins and Hessian): the ILP's optimum against the
job's plan (after its DRQ check) and, for each layer with DRQ options, the best plan that
runs that layer in DRQ (its other options removed), by Omega, calibration cross-entropy,
held-out accuracy and KL (paired).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.quality import plan_for  # noqa: E402
from quantize import QuantizeConfig, apply  # noqa: E402
from quantize.data import CalibrationSet  # noqa: E402
from quantize.drq import apply_drq, drq_modules  # noqa: E402
from quantize.drqcheck import CheckConfig, decide, sample_losses  # noqa: E402
from quantize.graph import find_layers  # noqa: E402
from sensitivity import zoo  # noqa: E402
from sensitivity.regions import RegionConfig, calibrate  # noqa: E402
from solver import solve  # noqa: E402
from solver.problem import LayerOptions, Limits, Problem  # noqa: E402

N_TRAIN = 1400


def _run(program, layers, settings, x, y) -> tuple[float, float]:
    gm = apply_drq(program.module(), layers, settings)
    with torch.no_grad():
        acc = float((gm(x).argmax(dim=1) == y).float().mean())
    mods = drq_modules(gm).values()
    low = sum(m.int4_regions for m in mods) / max(sum(m.total_regions for m in mods), 1)
    return acc, low


def bench_seed(seed: int, args: argparse.Namespace, x, y) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = zoo.train(zoo.DigitsCNN(width=args.width), x[:N_TRAIN], y[:N_TRAIN],
                      epochs=args.epochs, seed=seed)
    t_train = time.perf_counter() - t0
    program = zoo.export(model, x[:4])
    layers = find_layers(program.module())
    xh, yh = x[N_TRAIN:], y[N_TRAIN:]
    train = CalibrationSet((x[: args.calib],), labels=y[: args.calib])
    holdout = CalibrationSet((xh,), labels=yh)
    cfg = RegionConfig(sensitive_fractions=(0.1, 0.2, 0.3, 0.4, 0.5))
    t0 = time.perf_counter()
    res = calibrate(program.module(), layers, train, holdout, cfg)
    t_cal = time.perf_counter() - t0
    first = {layer.name: layer.modes[0] for layer in res.layers}
    base = res.drq_settings(first)
    int8 = {n: dataclasses.replace(s, threshold=0) for n, s in base.items()}
    int4 = {n: dataclasses.replace(s, threshold=1 << 20) for n, s in base.items()}
    acc8, _ = _run(program, layers, int8, xh, yh)
    acc4, _ = _run(program, layers, int4, xh, yh)
    with torch.no_grad():
        acc32 = float((program.module()(xh).argmax(dim=1) == yh).float().mean())
    print(f"\nseed {seed}: width {args.width}, {args.epochs} epochs (train {t_train:.1f} s), "
          f"calibration on {len(train)} digits {t_cal:.2f} s, {len(yh)} held-out digits")
    print(f"  FP32 {acc32:.4f}   all-INT8 {acc8:.4f}   all-INT4 (W4A4) {acc4:.4f}")
    names = [layer.name for layer in res.layers]
    print(f"  {'region':>6} {'f':>4} {'thresholds':>12} {'f calib':>8} {'INT4 held-out':>13} "
          f"{'accuracy':>8} {'vs INT8':>8}")
    for size in cfg.region_sizes:
        for f in cfg.sensitive_fractions:
            try:
                choice = {layer.name: layer.mode(size, f) for layer in res.layers}
            except KeyError:
                continue
            acc, low = _run(program, layers, res.drq_settings(choice), xh, yh)
            thr = "/".join(str(choice[n].threshold) for n in names)
            fcal = sum(choice[n].fraction_calib for n in names) / len(names)
            mark = "  <- >=60% INT4, within 1 pt" if low >= 0.6 and acc >= acc8 - 0.01 else ""
            print(f"  {size}x{size:<4} {f:4.1f} {thr:>12} {fcal:8.3f} {low:13.3f} {acc:8.4f} "
                  f"{100 * (acc - acc8):+7.2f}{mark}")


def low_weights(args: argparse.Namespace, x, y) -> None:
    from quantize.primitives import quantize_weight

    xh, yh = x[N_TRAIN:], y[N_TRAIN:]
    print(f"{'model':>12} {'seed':>4} {'f':>4} {'requant acc':>11} {'mse':>8} "
          f"{'clip acc':>9} {'mse':>8}")
    for cls in (zoo.DigitsCNN, zoo.DigitsResNet):
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = zoo.train(cls(), x[:N_TRAIN], y[:N_TRAIN], epochs=15, seed=seed)
            program = zoo.export(model, x[:4])
            layers = find_layers(program.module())
            res = calibrate(program.module(), layers, CalibrationSet((x[: args.calib],)),
                            CalibrationSet((xh,)), RegionConfig())
            with torch.no_grad():
                ref = program.module()(xh)
            for f in (0.1, 0.3, 0.5):
                choice = {layer.name: layer.mode(2, f) for layer in res.layers}
                row = []
                for clip in (False, True):
                    gm = apply_drq(program.module(), layers, res.drq_settings(choice))
                    if clip:
                        for mod in drq_modules(gm).values():
                            codes, scale = quantize_weight(mod.weight_high, 8)
                            mod.weight_low = codes.clamp(-7, 7) * scale.reshape(-1, 1, 1, 1)
                    with torch.no_grad():
                        out = gm(xh)
                    row += [float((out.argmax(1) == yh).float().mean()),
                            float((out - ref).pow(2).mean())]
                print(f"{cls.__name__:>12} {seed:4d} {f:4.1f} {row[0]:11.4f} {row[1]:8.3f} "
                      f"{row[2]:9.4f} {row[3]:8.3f}")


N_PLAN_TRAIN, N_PLAN_CALIB = 1000, 200
CHECK_LOSSES = ("cross_entropy", "kl")  # the check's loss: the job's (labels), and label-free
PLAN_MODELS = {  # name -> (factory, image side, input channels)
    "cnn": (lambda: zoo.DigitsCNN(width=8), 8, 1),
    "resnet18": (lambda: zoo.ResNet18Like(width=8), 16, 3),
    "digitsresnet": (lambda: zoo.DigitsResNet(), 8, 1),
    # bench/drqevidence.py --hard: on rotated, shifted, noisy digits (FP32 ~0.86 / 0.90)
    "cnn-hard": (lambda: zoo.DigitsCNN(width=16), 8, 1),
    "resnet-hard": (lambda: zoo.DigitsResNet(width=8), 8, 1),
}


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least this uneven | b + c discordant)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def digits_split(side: int, channels: int) -> tuple[torch.Tensor, ...]:
    """The plans' split of the digits (shuffled with seed 0, the same for every model seed):
    (train x, y: 1000, calibration x, y: 200, held-out x, y: 597)."""
    x, y = zoo.digits_data(image_size=side, seed=0)
    x = x.expand(-1, channels, -1, -1).contiguous()
    cal = slice(N_PLAN_TRAIN, N_PLAN_TRAIN + N_PLAN_CALIB)
    return (x[:N_PLAN_TRAIN], y[:N_PLAN_TRAIN], x[cal], y[cal],
            x[N_PLAN_TRAIN + N_PLAN_CALIB:], y[N_PLAN_TRAIN + N_PLAN_CALIB:])


class PlanModel:
    """One trained model, its calibration file (200 digits) and the 597 digits that judge
    (``data``: another (train, calibration, held-out) split, as ``digits_split`` returns)."""

    def __init__(self, name: str, work: Path, seed: int = 0,
                 data: tuple[torch.Tensor, ...] | None = None) -> None:
        factory, side, channels = PLAN_MODELS[name]
        xt, yt, xc, yc, xe, ye = digits_split(side, channels) if data is None else data
        torch.manual_seed(seed)  # the init
        t0 = time.perf_counter()
        model = zoo.train(factory(), xt, yt, epochs=15, seed=seed)
        self.train_seconds = time.perf_counter() - t0
        self.name, self.work, self.seed = name, work, seed
        stem = name if seed == 0 else f"{name}-s{seed}"
        self.pt2 = zoo.save_model(model, xt[:4], work / f"{stem}.pt2")
        self.calib_path = zoo.save_calibration(work / f"{stem}-calib.safetensors", xc, yc)
        self.program = torch.export.load(str(self.pt2))
        self.calib = CalibrationSet((xc,), labels=yc)
        self.x_ev, self.y_ev = xe, ye
        with torch.no_grad():
            self.fp32_logp = F.log_softmax(self.program.module()(self.x_ev), dim=1)
        self.fp32_accuracy = float((self.fp32_logp.argmax(1) == self.y_ev).float().mean())


class PlanRun:
    """One model under one set of constraints: the pipeline's problem, and plans quantized
    and scored (calibrated on the 200 calibration digits; the check's loss on those digits,
    held-out accuracy and KL on the other 597)."""

    def __init__(self, model: PlanModel, constraints: dict, cache) -> None:
        from service.pipeline import run_pipeline

        self.model = model
        omega = constraints.get("hessian", {}).get("omega", "trace")
        out = model.work / (f"{model.name}-s{model.seed}-"
                            f"{constraints.get('hardware') or 'bops'}-{omega}")
        self.out = out
        t0 = time.perf_counter()
        self.result = run_pipeline(model.pt2, model.calib_path, constraints, out,
                                   holdout_fraction=0.1, pareto_points=0, plots=False,
                                   cache=cache)
        self.seconds = time.perf_counter() - t0
        self.problem = Problem.from_json((out / "problem.json").read_text())
        self.template = json.loads((out / "plan.json").read_text())

    def without_drq(self, limits: Limits) -> Problem:
        layers = tuple(LayerOptions(la.name, tuple(o for o in la.options if o.drq is None))
                       for la in self.problem.layers)
        return Problem(layers, limits, self.problem.ties)

    def extreme(self, tag: str) -> float:
        return sum(next(getattr(o, self.resource) for o in la.options if o.tag == tag)
                   for la in self.problem.layers)

    @property
    def resource(self) -> str:
        return "latency_ms" if self.template["constraints"].get("hardware") else "bops"

    def plan(self, problem: Problem, choice: dict[str, int]) -> dict:
        return plan_for(self.template, problem, choice)

    @torch.no_grad()
    def score(self, plan: dict) -> dict:
        m = self.model
        res = apply(m.program, plan, m.calib, m.calib, QuantizeConfig())
        # the acceptance check's losses per calibration digit: cross-entropy at the labels
        # (the job's loss) and KL to FP32 (label-free)
        cal = {k: sample_losses(m.program.module(), res.module, m.calib, k, 256)
               for k in CHECK_LOSSES}
        mods = list(drq_modules(res.module).values())
        for mod in mods:
            mod.reset_stats()
        logq = F.log_softmax(res.module(m.x_ev), dim=1)
        regions = sum(mod.total_regions for mod in mods)
        macs = sum(mod.macs_high + mod.macs_low for mod in mods)
        return {
            "correct": logq.argmax(1) == m.y_ev,
            "kl": (m.fp32_logp.exp() * (m.fp32_logp - logq)).sum(1),
            "cal": cal,
            "drq_rows": len(mods),
            "int4_regions": sum(mod.int4_regions for mod in mods) / regions if regions else 0.0,
            "int4_macs": sum(mod.macs_low for mod in mods) / macs if macs else 0.0,
        }

    def compare(self, d: dict, p: dict) -> dict:
        """Paired held-out comparison of plan ``d`` against plan ``p``."""
        b = int((d["correct"] & ~p["correct"]).sum())
        c = int((~d["correct"] & p["correct"]).sum())
        dkl = d["kl"] - p["kl"]
        return {"acc": float(d["correct"].float().mean()), "b": b, "c": c,
                "mcnemar_p": mcnemar_p(b, c), "kl": float(d["kl"].mean()),
                "kl_diff_se": float(dkl.std()) / math.sqrt(len(dkl))}

    def budget(self, limit: float) -> dict:
        from service.drqcheck import solve_with_drq

        limits = Limits(**{self.resource: limit})
        with_drq = Problem(self.problem.layers, limits, self.problem.ties)
        plain = self.without_drq(limits)
        out = {"limit": limit}
        for key, prob in (("drq", with_drq), ("plain", plain)):
            sol = solve(prob)
            if not sol.choices:
                return {**out, "status": sol.status}
            out[key] = self.score(self.plan(prob, sol.choices))
            out[key]["objective"] = sol.objective
        d, p = out["drq"], out["plain"]
        drq_cmp = self.compare(d, p)
        # the job's check, on the calibration digits only: the best plan with DRQ rows (the
        # ILP's, or when it has none the best that forces one) against the best without
        cand = d
        if not d["drq_rows"]:
            forced = solve_with_drq(with_drq)
            cand = None if forced is None else self.score(self.plan(with_drq, forced.choices))
        checks, checked = {}, {}
        for loss in CHECK_LOSSES:
            if cand is None:
                kept, checks[loss] = "off", {"kept": "no DRQ plan", "forced": False}
            else:
                check = decide(cand["cal"][loss], p["cal"][loss], loss, CheckConfig())
                kept = check.kept
                checks[loss] = {"kept": kept, "forced": cand is not d,
                                "cal_loss_drq": check.loss_drq, "cal_loss_off": check.loss_off,
                                "cal_diff_se": check.diff_se, "drq_rows": cand["drq_rows"],
                                "int4_macs": cand["int4_macs"]}
            checked[loss] = self.compare(cand if kept == "drq" else p, p)
            if loss == "kl":  # the job's rule: its kept plan, per held-out image
                k = cand if kept == "drq" else p
                out["per_image"] = {
                    "ilp_correct": d["correct"].int().tolist(), "ilp_kl": d["kl"].tolist(),
                    "off_correct": p["correct"].int().tolist(), "off_kl": p["kl"].tolist(),
                    "checked_correct": k["correct"].int().tolist(), "checked_kl": k["kl"].tolist(),
                    "checked_drq_rows": k["drq_rows"], "checked_int4_macs": k["int4_macs"],
                    "checked_int4_regions": k["int4_regions"]}
        out["summary"] = {
            "acc_drq": drq_cmp["acc"], "acc_plain": float(p["correct"].float().mean()),
            "b": drq_cmp["b"], "c": drq_cmp["c"], "mcnemar_p": drq_cmp["mcnemar_p"],
            "kl_drq": drq_cmp["kl"], "kl_plain": float(p["kl"].mean()),
            "kl_diff_se": drq_cmp["kl_diff_se"],
            "objective_drq": d["objective"], "objective_plain": p["objective"],
            "drq_rows": d["drq_rows"], "int4_regions": d["int4_regions"],
            "int4_macs": d["int4_macs"], "check": checks, "checked": checked,
        }
        return out


def kept_record(kept: Path | None, cached_only: bool, compute, say: str | None = None):
    """A per-seed record: read from ``kept`` when it exists (printing ``say`` and the path,
    when given), None under ``cached_only``, else ``compute()``, saved to ``kept``."""
    if kept is not None and kept.exists():
        if say is not None:
            print(f"\n{say}: figures from {kept}")
        return json.loads(kept.read_text())
    if cached_only:
        return None
    rec = compute()
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(rec) + "\n")
    return rec


def plans(args: argparse.Namespace) -> None:
    from service.cache import StageCache

    results, per_seed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # the two cost models share the sensitivity and regions (and so do reruns, --cache)
        cache = StageCache(args.cache or Path(tmp) / "cache")
        for seed in range(args.first_seed, args.seeds):
            for name in args.models.split(","):
                kept = None if args.cache is None else args.cache / "drq-seeds"
                kept = None if kept is None else kept / f"{name}-s{seed}-b{args.budgets}.json"
                rec = kept_record(
                    kept, args.cached_only,
                    lambda name=name, seed=seed: plans_model(
                        args, PlanModel(name, Path(tmp), seed), cache),
                    say=f"{name} seed {seed}")
                if rec is None:
                    continue
                per_seed.setdefault(name, {})[seed] = rec
                if seed == 0:
                    results.update({k: {f: v for f, v in r.items() if f != "per_image"}
                                    for k, r in rec.items()})
    if args.seeds > 1:
        results["seeds"] = seeds_table(per_seed)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


SIGN_FLIPS = 200_000  # random sign vectors per permutation test (p resolves to ~0.002 at 0.05)


def sign_flip_p(d: torch.Tensor, flips: int = SIGN_FLIPS, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p of mean(d) = 0, images the exchangeable unit:
    (hits + 1) / (flips + 1), hits = random sign vectors with |mean| >= the observed."""
    d = d[d != 0].double()
    if not len(d):
        return 1.0
    obs = float(d.sum().abs()) - 1e-9
    gen = torch.Generator().manual_seed(seed)
    hits, done = 0, 0
    while done < flips:
        n = min(10_000, flips - done)
        signs = torch.randint(0, 2, (n, len(d)), generator=gen).double() * 2 - 1
        hits += int(((signs @ d).abs() >= obs).sum())
        done += n
    return (hits + 1) / (flips + 1)


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over ``ps``)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adj, run = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        run = max(run, min(1.0, (len(ps) - rank) * ps[i]))
        adj[i] = run
    return adj


def seeds_table(per_seed: dict) -> dict:
    """The multi-seed test (docs/drq.md): per held-out image the mean over seeds of
    (correct with DRQ - correct off), its mean and se over images, the sign-flip p, Holm over
    the budgets of each comparison; for all seeds and for seeds 1.. alone (each model over
    the seeds it has)."""
    out = {}
    for arm in ("ilp", "checked"):
        for fresh in (False, True):
            label = f"{arm}, {'seeds 1.. (unseen)' if fresh else 'all seeds'}"
            rows = []
            for recs in per_seed.values():
                seeds = sorted(s for s in recs if s > 0 or not fresh)
                if not seeds:
                    continue
                for key in recs[seeds[0]]:
                    got = [recs[s][key]["per_image"] for s in seeds if "per_image" in recs[s][key]]
                    if len(got) < len(seeds):
                        continue
                    t = {f: torch.tensor([g[f] for g in got], dtype=torch.float64)
                         for f in ("ilp_correct", "off_correct", "checked_correct", "ilp_kl",
                                   "off_kl", "checked_kl")}
                    d = (t[f"{arm}_correct"] - t["off_correct"]).mean(0)
                    dkl = (t[f"{arm}_kl"] - t["off_kl"]).mean(0)
                    n = len(d)
                    drq = [recs[s][key]["drq_rows"] if arm == "ilp"
                           else recs[s][key]["per_image"]["checked_drq_rows"] for s in seeds]
                    macs = [recs[s][key]["int4_macs"] if arm == "ilp"
                            else recs[s][key]["per_image"]["checked_int4_macs"] for s in seeds]
                    with_rows = [m for m, r in zip(macs, drq, strict=True) if r]
                    rows.append({
                        "budget": key, "acc_drq": float(t[f"{arm}_correct"].mean()),
                        "acc_off": float(t["off_correct"].mean()), "gain": float(d.mean()),
                        "gain_se": float(d.std()) / math.sqrt(n), "p": sign_flip_p(d),
                        "kl_drq": float(t[f"{arm}_kl"].mean()), "kl_off": float(t["off_kl"].mean()),
                        "kl_diff_se": float(dkl.std()) / math.sqrt(n),
                        "seeds_with_drq": sum(1 for r in drq if r), "seeds": len(seeds),
                        "int4_macs": sum(with_rows) / len(with_rows) if with_rows else 0.0})
            for row, adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
                row["p_holm"] = adj
            out[label] = rows
            print(f"\n{label} (per image the mean over seeds of correct "
                  f"DRQ - correct off; p: sign-flip over images, {SIGN_FLIPS} flips)")
            print(f"  {'budget':>28} {'acc DRQ':>8} {'acc off':>8} {'gain pt':>8} {'+-se':>5} "
                  f"{'p':>7} {'Holm':>6} {'KL DRQ':>7} {'KL off':>7} {'d/se':>6} {'DRQ in':>6} "
                  f"{'4x4 MACs':>8}")
            for r in rows:
                z = (r["kl_drq"] - r["kl_off"]) / r["kl_diff_se"] if r["kl_diff_se"] else 0.0
                print(f"  {r['budget']:>28} {r['acc_drq']:8.4f} {r['acc_off']:8.4f} "
                      f"{100 * r['gain']:+8.2f} {100 * r['gain_se']:5.2f} {r['p']:7.4f} "
                      f"{r['p_holm']:6.3f} {r['kl_drq']:7.4f} {r['kl_off']:7.4f} {z:+6.1f} "
                      f"{r['seeds_with_drq']:3d}/{r['seeds']:<2} {r['int4_macs']:8.3f}")
    return out


def plans_model(args: argparse.Namespace, model: PlanModel, cache) -> dict:
    """Both cost models at every budget for one trained model: printed, and returned per
    budget (summary and per-image vectors)."""
    results = {}
    name = model.name
    fracs = [float(f) for f in args.budgets.split(",")]
    for hardware in ("drq-array", None):
        constraints = {"limits": {"bops_ratio": 1.0}, "weight_bits": [4, 8],
                       "activation_bits": [4, 8], "drq": {"enabled": True},
                       "pin": {"first": None, "last": None}, "hardware": hardware}
        run = PlanRun(model, constraints, cache)
        lo, hi = run.extreme("w4a4"), run.extreme("w8a8")
        print(f"\n{name} seed {model.seed}, {run.resource} ({hardware or 'BOPS'}): "
              f"{len(run.problem.layers)} layers, pipeline {run.seconds:.1f} s "
              f"(reused {run.result.reused}), "
              f"{len(model.y_ev)} held-out digits (one = {100 / len(model.y_ev):.2f} pt), "
              f"FP32 accuracy {model.fp32_accuracy:.4f}")
        print(f"  {'budget':>6} {'acc DRQ':>8} {'acc off':>8} {'b':>3} {'c':>3} "
              f"{'McNemar p':>9} {'KL DRQ':>7} {'KL off':>7} {'+-se':>6} "
              f"{'DRQ rows':>8} {'INT4 reg':>8} {'4x4 MACs':>8}")
        rows = []
        for frac in fracs:
            r = run.budget(lo + frac * (hi - lo))
            key = f"{name} {run.resource} {frac}"
            if "summary" not in r:
                print(f"  {frac:6.2f} {r['status']}")
                results[key] = {"status": r["status"]}
                continue
            sm = r["summary"]
            results[key] = {"limit": r["limit"], **sm, "per_image": r["per_image"]}
            rows.append((frac, sm))
            print(f"  {frac:6.2f} {sm['acc_drq']:8.4f} {sm['acc_plain']:8.4f} "
                  f"{sm['b']:3d} {sm['c']:3d} {sm['mcnemar_p']:9.3g} "
                  f"{sm['kl_drq']:7.4f} {sm['kl_plain']:7.4f} {sm['kl_diff_se']:6.4f} "
                  f"{sm['drq_rows']:8d} {sm['int4_regions']:8.3f} {sm['int4_macs']:8.3f}")
        print("  the check (* = forced DRQ candidate), by calibration loss; the kept plan "
              "on the held-out digits against off:")
        print(f"  {'budget':>6} {'loss':>13} {'kept':>4} {'cal d/se':>9} {'acc':>7} "
              f"{'b':>3} {'c':>3} {'p':>6} {'KL':>7} {'KL off':>7} {'d/se':>6}")
        for frac, sm in rows:
            for loss in CHECK_LOSSES:
                ck, cd = sm["check"][loss], sm["checked"][loss]
                dse = f"{'-':>8}"
                if "cal_loss_drq" in ck:
                    z = (ck["cal_loss_drq"] - ck["cal_loss_off"]) / ck["cal_diff_se"]
                    dse = f"{z:+8.1f}"
                kdse = ((cd["kl"] - sm["kl_plain"]) / cd["kl_diff_se"]
                        if cd["kl_diff_se"] > 0 else 0.0)
                print(f"  {frac:6.2f} {loss:>13} {ck['kept'][:4]:>4} {dse}"
                      f"{'*' if ck['forced'] else ' '} {cd['acc']:7.4f} {cd['b']:3d} "
                      f"{cd['c']:3d} {cd['mcnemar_p']:6.3g} {cd['kl']:7.4f} "
                      f"{sm['kl_plain']:7.4f} {kdse:+6.1f}")
    return results


def measured_drq_problem(run: PlanRun, loss: str = "job") -> Problem:
    """``run``'s problem with each DRQ option's activation Omega (the regions' estimate) replaced
    by the measured one (``sensitivity.drqmeasured``, on the pipeline's train split); the weight
    part and every other option unchanged."""
    from sensitivity.drqmeasured import measured_drq_omegas
    from sensitivity.intake import IntakeConfig, intake
    from sensitivity.regions import RegionResult

    regions = RegionResult.from_json((run.out / "regions.json").read_text())
    it = intake(run.model.pt2, run.model.calib_path, IntakeConfig(holdout_fraction=0.1, seed=0))
    measured = measured_drq_omegas(it, regions, loss=loss)
    layers = []
    for la in run.problem.layers:
        modes = {m.tag: m for m in regions.layer(la.name).modes} if la.name in measured else {}
        opts = []
        for o in la.options:
            if o.drq is not None:
                tag = o.tag[o.tag.index("drq"):]  # w8drq-2x2-f0.5 -> the mode's drq-2x2-f0.5
                o = dataclasses.replace(o, omega=o.omega - modes[tag].omega
                                        + measured[la.name][tag])
            opts.append(o)
        layers.append(LayerOptions(la.name, tuple(opts)))
    return Problem(tuple(layers), run.problem.limits, run.problem.ties)


def drq_omega(args: argparse.Namespace) -> None:
    """Does the measured DRQ Omega help the ILP? (docs/drq.md, fixed before the run.) The
    pipeline with ``hessian.omega: measured`` gives one problem (uniform options measured, DRQ
    modes by the regions' trace-weighted estimate); the same problem with the DRQ options'
    activation Omega measured is the other. At every budget, each problem's ILP optimum is
    quantized and judged on the 597 held-out digits (KL to FP32 and accuracy, per image, mean
    over seeds, measured minus estimated)."""
    from service.cache import StageCache

    fracs = [float(f) for f in args.budgets.split(",")]
    per: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = StageCache(args.cache or Path(tmp) / "cache")
        for seed in range(args.seeds):
            for name in args.models.split(","):
                model = PlanModel(name, Path(tmp), seed)
                for hardware in ("drq-array", None):
                    constraints = {"limits": {"bops_ratio": 1.0}, "weight_bits": [4, 8],
                                   "activation_bits": [4, 8], "drq": {"enabled": True},
                                   "pin": {"first": None, "last": None}, "hardware": hardware,
                                   "hessian": {"omega": "measured"}}
                    run = PlanRun(model, constraints, cache)
                    t0 = time.perf_counter()
                    est_problem, meas_problem = run.problem, measured_drq_problem(run)
                    t_meas = time.perf_counter() - t0
                    lo, hi = run.extreme("w4a4"), run.extreme("w8a8")
                    print(f"\n{name} seed {seed}, {run.resource}: pipeline {run.seconds:.1f} s, "
                          f"measured DRQ Omega {t_meas:.1f} s")
                    print(f"  {'budget':>6} {'same':>4} {'acc est':>7} {'acc meas':>8} "
                          f"{'KL est':>7} {'KL meas':>7} {'d/se':>6} {'DRQ est/meas':>12}")
                    for frac in fracs:
                        limits = Limits(**{run.resource: lo + frac * (hi - lo)})
                        got = []
                        for prob in (est_problem, meas_problem):
                            prob = Problem(prob.layers, limits, prob.ties)
                            sol = solve(prob)
                            got.append((sol.choices, run.score(run.plan(prob, sol.choices))
                                        if sol.choices else None))
                        (c_est, e), (c_meas, m) = got
                        if e is None or m is None:
                            print(f"  {frac:6.2f} infeasible")
                            continue
                        dkl = m["kl"] - e["kl"]
                        se = float(dkl.std()) / math.sqrt(len(dkl))
                        z = float(dkl.mean()) / se if se > 0 else 0.0
                        print(f"  {frac:6.2f} {str(c_est == c_meas):>4} "
                              f"{float(e['correct'].float().mean()):7.4f} "
                              f"{float(m['correct'].float().mean()):8.4f} "
                              f"{float(e['kl'].mean()):7.4f} {float(m['kl'].mean()):7.4f} "
                              f"{z:+6.1f} {e['drq_rows']:5d}/{m['drq_rows']:<6d}")
                        per.setdefault(f"{name} {run.resource} {frac}", []).append({
                            "seed": seed, "same": c_est == c_meas,
                            "est_correct": e["correct"].int().tolist(),
                            "meas_correct": m["correct"].int().tolist(),
                            "est_kl": e["kl"].tolist(), "meas_kl": m["kl"].tolist(),
                            "est_drq_rows": e["drq_rows"], "meas_drq_rows": m["drq_rows"]})
    print(f"\nmeasured minus estimated DRQ Omega, per image the mean over seeds (p: sign-flip, "
          f"{SIGN_FLIPS} flips)")
    print(f"  {'budget':>28} {'seeds':>5} {'same':>4} {'KL est':>7} {'KL meas':>7} {'d/se':>6} "
          f"{'acc est':>7} {'acc meas':>8} {'p':>7}")
    summary = {}
    for key, recs in per.items():
        t = {f: torch.tensor([r[f] for r in recs], dtype=torch.float64)
             for f in ("est_correct", "meas_correct", "est_kl", "meas_kl")}
        dkl = (t["meas_kl"] - t["est_kl"]).mean(0)
        dacc = (t["meas_correct"] - t["est_correct"]).mean(0)
        se = float(dkl.std()) / math.sqrt(len(dkl))
        row = {"seeds": len(recs), "same": sum(r["same"] for r in recs),
               "kl_est": float(t["est_kl"].mean()), "kl_meas": float(t["meas_kl"].mean()),
               "kl_diff_se": se, "z": float(dkl.mean()) / se if se > 0 else 0.0,
               "acc_est": float(t["est_correct"].mean()),
               "acc_meas": float(t["meas_correct"].mean()), "p": sign_flip_p(dacc)}
        summary[key] = row
        print(f"  {key:>28} {row['seeds']:5d} {row['same']:4d} {row['kl_est']:7.4f} "
              f"{row['kl_meas']:7.4f} {row['z']:+6.1f} {row['acc_est']:7.4f} "
              f"{row['acc_meas']:8.4f} {row['p']:7.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def omega_table(args: argparse.Namespace) -> None:
    """Per conv layer of one trained model (``--models``' first, seed ``--first-seed``): each
    DRQ mode's activation Omega as the regions estimate it, as measured with the job's loss
    (cross-entropy at the labels) and as measured with KL to FP32, beside the uniform A8 / A4
    measured both ways (``sensitivity.measured``), on the pipeline's train split."""
    from quantize.observe import observe
    from sensitivity.drqmeasured import measured_drq_omegas
    from sensitivity.intake import IntakeConfig, intake
    from sensitivity.measured import measured_omegas

    with tempfile.TemporaryDirectory() as tmp:
        model = PlanModel(args.models.split(",")[0], Path(tmp), args.first_seed)
        it = intake(model.pt2, model.calib_path, IntakeConfig(holdout_fraction=0.1, seed=0))
        graphs = [la.graph for la in it.layers]
        stats = observe(it.module, graphs, it.train, 64)
        regions = calibrate(it.module, graphs, it.train, it.holdout, RegionConfig(),
                            activations=stats)
        label_free = dataclasses.replace(it, loss_kind="kl")
        ce, kl = measured_drq_omegas(it, regions), measured_drq_omegas(label_free, regions)
        uce = measured_omegas(it, [8], [4, 8], activations=stats)
        ukl = measured_omegas(label_free, [8], [4, 8], activations=stats)
    print(f"{model.name} seed {model.seed}, {len(it.train)} train digits "
          f"(regions' estimate is trace-weighted only when the pipeline gives traces: raw here)")
    for name in ce:
        print(f"  {name}: uniform A8 CE {uce.omega_a[name][8]:.5f} KL {ukl.omega_a[name][8]:.5f}"
              f", A4 CE {uce.omega_a[name][4]:.5f} KL {ukl.omega_a[name][4]:.5f}")
        for mode in regions.layer(name).modes:
            print(f"    {mode.tag:>14} CE {ce[name][mode.tag]:.5f} KL {kl[name][mode.tag]:.5f}")


def issue_case(args: argparse.Namespace) -> None:
    """The issue's exact case: DigitsResNet, bops_ratio 0.6, weights and activations {4, 8},
    DRQ enabled, default pins and Hessian settings. The pipeline's plan against the best plan
    forced to run layer L in DRQ (the same problem with L's non-DRQ options removed), for
    every layer L with DRQ options: Omega objective, calibration cross-entropy (the check's
    loss), held-out accuracy and KL to FP32, paired."""
    from service.cache import StageCache

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = PlanModel("digitsresnet", Path(tmp))
        constraints = {"limits": {"bops_ratio": 0.6}, "weight_bits": [4, 8],
                       "activation_bits": [4, 8], "drq": {"enabled": True}}
        run = PlanRun(model, constraints, StageCache(None))
        ilp = solve(run.problem)  # the ILP's optimum, before the job's DRQ check
        base = run.score(run.plan(run.problem, ilp.choices))
        tags = {r["name"]: _tag(r) for r in run.template["layers"]}
        print(f"\ndigitsresnet, bops_ratio 0.6 (the issue's case): pipeline {run.seconds:.1f} s, "
              f"the job's plan {tags}, drq_check "
              f"{run.result.report.get('drq_check', 'not run')}")
        print(f"  against the ILP's optimum (Omega {ilp.objective:.5f}, calibration CE "
              f"{float(base['cal']['cross_entropy'].mean()):.4f}, KL "
              f"{float(base['cal']['kl'].mean()):.5f}, accuracy "
              f"{float(base['correct'].float().mean()):.4f}, KL {float(base['kl'].mean()):.4f})")
        print(f"  {'plan':>18} {'tag':>16} {'Omega':>8} {'cal CE':>7} {'d/se':>5} "
              f"{'cal KL':>7} {'d/se':>5} {'acc':>7} {'b':>3} {'c':>3} {'p':>6} {'KL':>7} "
              f"{'d/se':>5}")
        rows = [("the job's plan", None, run.problem, None)]
        for k, la in enumerate(run.problem.layers):
            drq = tuple(o for o in la.options if o.drq is not None)
            if drq:
                layers = list(run.problem.layers)
                layers[k] = LayerOptions(la.name, drq)
                rows.append((f"forced {la.name}", k, Problem(tuple(layers), run.problem.limits,
                                                             run.problem.ties), la.name))
        for label, k, prob, name in rows:
            if k is None:
                scored, objective, tag = run.score(run.template), run.template["objective"], ""
            else:
                sol = solve(prob)
                if not sol.choices:
                    print(f"  {label:>18} {sol.status}")
                    continue
                scored, objective = run.score(run.plan(prob, sol.choices)), sol.objective
                tag = prob.layers[k].options[sol.choices[name]].tag
            cmp = run.compare(scored, base)
            cal = {}
            for loss in CHECK_LOSSES:
                d = scored["cal"][loss] - base["cal"][loss]
                se = float(d.std()) / math.sqrt(len(d))
                cal[loss] = {"loss": float(scored["cal"][loss].mean()),
                             "loss_ilp": float(base["cal"][loss].mean()),
                             "diff_se": se, "z": float(d.mean()) / se if se > 0 else 0.0}
            z = (cmp["kl"] - float(base["kl"].mean())) / cmp["kl_diff_se"] \
                if cmp["kl_diff_se"] > 0 else 0.0
            results[label] = {"tag": tag, "objective": objective, "objective_ilp": ilp.objective,
                              "cal": cal, **cmp, "kl_ilp": float(base["kl"].mean()),
                              "acc_ilp": float(base["correct"].float().mean())}
            ce, kl = cal["cross_entropy"], cal["kl"]
            print(f"  {label:>18} {tag:>16} {objective:8.5f} {ce['loss']:7.4f} {ce['z']:+5.1f} "
                  f"{kl['loss']:7.5f} {kl['z']:+5.1f} {cmp['acc']:7.4f} {cmp['b']:3d} "
                  f"{cmp['c']:3d} {cmp['mcnemar_p']:6.3g} {cmp['kl']:7.4f} {z:+5.1f}")
        results["drq_check"] = run.result.report.get("drq_check")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _tag(row: dict) -> str:
    return (f"w{row['w_bits']}drq{row['drq']['region'][0]}f{row['drq']['sensitive_fraction']:g}"
            if row.get("drq") else f"w{row['w_bits']}a{row['a_bits']:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1,
                        help="init seeds 0..N-1 (--plans: models per seed and the seeds test)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--calib", type=int, default=256, help="training digits to calibrate on")
    parser.add_argument("--low-weights", action="store_true",
                        help="compare requantised against clipped 4-bit weights")
    parser.add_argument("--plans", action="store_true",
                        help="best plan with DRQ options against without, at 3+3 budgets")
    parser.add_argument("--issue-case", action="store_true",
                        help="DigitsResNet at bops_ratio 0.6: the plan against forced-DRQ plans")
    parser.add_argument("--drq-omega", action="store_true",
                        help="the ILP with measured against estimated DRQ activation Omega")
    parser.add_argument("--omega-table", action="store_true",
                        help="one model's DRQ activation Omegas measured by CE and by KL")
    parser.add_argument("--models", default="cnn,resnet18", help="for --plans / --drq-omega")
    parser.add_argument("--budgets", default="0.1,0.25,0.5,0.75",
                        help="--plans: fractions of the way from all-W4A4 to all-W8A8")
    parser.add_argument("--json", type=Path, default=None, help="--plans: write figures here")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="--plans: train from this seed on (a second process in parallel; "
                        "the test takes every seed in --cache)")
    parser.add_argument("--cached-only", action="store_true",
                        help="--plans: use only the per-seed figures already in --cache")
    parser.add_argument("--cache", type=Path, default=None,
                        help="--plans: a stage cache folder kept between runs")
    args = parser.parse_args()
    if args.plans:
        plans(args)
        return
    if args.issue_case:
        issue_case(args)
        return
    if args.drq_omega:
        drq_omega(args)
        return
    if args.omega_table:
        omega_table(args)
        return
    x, y = zoo.digits_data(image_size=8, seed=0)
    if args.low_weights:
        low_weights(args, x, y)
        return
    for seed in range(args.seeds):
        bench_seed(seed, args, x, y)


if __name__ == "__main__":
    main()
