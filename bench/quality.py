"""Plan quality against baselines at the same budget: bitplan's plan, uniform INT8 / INT4, random
allocations and a greedy oracle that knows each layer's measured loss increase.

    python bench/quality.py [--models cnn,resnet18,llama,gpt2,bert]
                            [--resources size_bytes,bops]
                            [--omega trace|diagonal|measured[:bc|:raw],...]
                            [--weight-clip max|mse|hessian] [--clip-rows hessian,mse]
                            [--bias-correction none|weight|layer]
                            [--bc-rows weight,layer] [--calibration minmax|percentile|mse]
                            [--random 10]

Models: the digits CNN, a residual CNN of ResNet-18's shape (width 8, digits at 16x16), both
trained on digits 0..999 (200 calibration digits the plan sees; the other 597 only evaluate),
and the tiny Llama-style decoder (or, ``gpt2``, the tiny GPT-2 with its Conv1D projections)
of tests/hf_zoo.py trained on stdlib docstrings (200
calibration and 200 held-out sequences of 32 bytes from text it never trained on; measures:
next-token perplexity and per-token KL to FP32), and (``bert``) the tiny BERT encoder of
tests/hf_zoo.py (hidden 32, 2 layers, masked-byte training, 300 steps, seeded, one thread),
whose job's output is the last hidden state of every token, [N, 32, 32] (``TokenEncoder``;
same text; measures below). For each, bitplan's pipeline runs once
(sensitivity, options; ``problem.json`` holds every layer's options with Omega and costs).
Then, at three size budgets (0.25 / 0.5 / 0.75 of the way from all-INT4 to all-INT8 weights,
activations 8 bits) and one BOPS budget (half way between all-W4A4 and all-W8A8, activations
{4, 8}), every method picks one option per layer from the same problem and the plan is
quantized and evaluated on the held-out samples:

- ``bitplan``: the ILP on the problem's Omega (what a job returns);
- ``ilp-measured``: the same ILP on each option's *measured* loss increase (below);
- ``greedy``: the oracle: start from the most precise option of every layer and take the
  cheapest-per-resource downgrade by measured loss increase until the budget is met;
- ``random``: the median and best of ``--random`` allocations that fill the budget (layers in
  random order dropped to a random cheaper option until it fits). ``random-best`` is the best
  value and the least KL among them on the evaluation samples (each picked on the samples it
  is scored on, possibly two different plans: an optimistic bound, not a plan anyone could
  pick); ``random-picked`` is the one with the least calibration loss (the greedy oracle's
  measure), scored on the evaluation samples and paired against bitplan like the others;
- ``int8`` / ``int4``: uniform (over budget / under it, for reference).

``--all-plans`` (models with at most 64 plans, the digits CNN) also prints every plan that
fits each budget: its weight / activation bits per layer, summed Omega and held-out KL (with
each ``--bc-rows`` correction too).

``--omega trace:bc`` (``:raw``) runs the pipeline with ``hessian.bias_corrected`` true (false):
Omega priced after the quantizer's bias correction (``sensitivity/meanshift.py``) or not.

``--weight-clip MODE`` runs every pipeline with ``quantize.weight_clip`` MODE (Omega priced
with those scales) and quantizes every plan with the clip ratios its sensitivity stage chose
(``sensitivity.json``). ``--clip-rows hessian,mse`` adds, per mode, rows ``bitplan+<mode>``
(the pipeline run again with that clip: its own Omega, its own ILP plan, quantized with its
ratios), ``bitplan-plan+<mode>`` (bitplan's plan quantized with those ratios: the quantizer
alone) and ``int8+<mode>`` / ``int4+<mode>``, each paired against bitplan's row.

``--bias-correction MODE`` quantizes every plan (and every measured loss increase) with
``QuantizeConfig(bias_correction=MODE)``; ``--bc-rows weight,layer`` adds rows
``<method>+<mode>``: the same plans of bitplan, ilp-measured, greedy, int8 and int4
quantized with that correction, paired against bitplan's row.

A layer's measured loss increase for an option is the calibration loss (cross-entropy on the
200 calibration digits; for the decoder the per-token KL to FP32; for the encoder the mean
squared error to the FP32 hidden states, mean over sequences, tokens and units) with only that
layer quantized at that option, minus the FP32 loss. Nothing is tuned on the evaluation
samples. Two measures on them: top-1 accuracy (one digit is 1/597 = 0.17 points), next-token
perplexity or (encoder) the embedding cosine: per token the cosine similarity of the quantized
hidden state to the FP32 one, the mean over a sequence's tokens, averaged over sequences; and
the mean KL divergence of the quantized model's output distribution to the FP32 one
(continuous, so it separates plans that accuracy cannot), for the encoder the mean squared
error to the FP32 hidden states instead (in the same column and ``--json`` keys, ``kl``).
For each the script prints the difference to bitplan's plan, paired per sample, with its
standard error: a gap smaller than about two standard errors is noise.

Why MSE is the encoder's calibration loss (greedy, ilp-measured, random-picked) and not
1 - cosine: it is the loss the job itself differentiates for an output that is not logits
(``sensitivity.intake._loss_kind``: no labels, no vocabulary-sized last dimension -> ``mse``),
so the Hessian behind bitplan's Omega, ``hessian.omega: measured`` and the oracles all rank
options by the same quantity, and the held-out cosine tests each plan on a measure none of them
optimised. (A pooled ``hf_zoo.Encoder``, output [N, D], is a different job: the pipeline scores
a 2-D output without labels by KL of its softmax.)
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantize import QuantizeConfig, apply  # noqa: E402
from quantize.clip import ClipRatios  # noqa: E402
from quantize.data import CalibrationSet  # noqa: E402
from sensitivity import zoo  # noqa: E402
from sensitivity.engine import SensitivityResult  # noqa: E402
from service.constraints import Quantize  # noqa: E402
from service.pipeline import run_pipeline  # noqa: E402
from solver import SolveConfig, solve  # noqa: E402
from solver.problem import Limits, Option, Problem  # noqa: E402

N_TRAIN, N_CALIB = 1000, 200
# name -> (model factory, image side, input channels): the digits CNN (3 layers) and a residual
# CNN of ResNet-18's shape (21 layers, width 8) on the digits upsampled to 16x16, grey as RGB.
MODELS = {
    "cnn": (lambda: zoo.DigitsCNN(width=16), 8, 1),
    "resnet18": (lambda: zoo.ResNet18Like(width=8), 16, 3),
}
KINDS = ("classifier", "lm", "encoder")  # what a model's outputs are (see Evaluator)
# the tiny transformers of tests/hf_zoo.py, by their Evaluator kind (others: classifiers)
TRANSFORMERS = {"llama": "lm", "gpt2": "lm", "bert": "encoder"}


def option_key(o: Option) -> tuple:
    return (o.w_bits, o.a_bits, o.tag)


def totals(problem: Problem, choice: dict[str, int]) -> dict[str, float]:
    out = {"size_bytes": 0.0, "bops": 0.0}
    for la in problem.layers:
        o = la.options[choice[la.name]]
        out["size_bytes"] += o.size_bytes
        out["bops"] += o.bops
    return out


def fits(problem: Problem, choice: dict[str, int], resource: str, limit: float) -> bool:
    return totals(problem, choice)[resource] <= limit * (1 + 1e-9)


def tie_groups(problem: Problem) -> list[list[str]]:
    return problem.tie_groups()


def extreme(problem: Problem, pick) -> dict[str, int]:
    return {la.name: pick(range(len(la.options)), key=lambda i, la=la: (
        la.options[i].size_bytes, la.options[i].bops)) for la in problem.layers}


def plan_for(template: dict, problem: Problem, choice: dict[str, int]) -> dict:
    """plan.json with the rows of ``template`` (kind, params, MACs) at the chosen options."""
    plan = copy.deepcopy(template)
    rows = {r["name"]: r for r in plan["layers"]}
    for la in problem.layers:
        o = la.options[choice[la.name]]
        rows[la.name].update(w_bits=int(o.w_bits), a_bits=o.a_bits, omega=o.omega,
                             size_bytes=o.size_bytes, bops=o.bops, latency_ms=o.latency_ms,
                             drq=None if o.drq is None else dict(o.drq))
    t = totals(problem, choice)
    plan["totals"].update(size_bytes=t["size_bytes"], bops=t["bops"])
    plan["status"] = "optimal"
    return plan


class Evaluator:
    """Scores plans on held-out samples. ``kind``:

    - ``classifier`` (labels): per sample correct and KL to FP32; calibration loss
      cross-entropy;
    - ``lm`` (int64 token ids, [N, T, V] logits, no labels): per sequence the next-token NLL
      and the mean per-token KL to FP32; calibration loss that KL (label-free, as the
      pipeline's);
    - ``encoder`` (int64 token ids, [N, T, D] hidden states, no labels): per sequence the mean
      over tokens of the cosine similarity to the FP32 hidden state, and the mean squared error
      to it (in the ``kl`` slots); calibration loss that MSE (the pipeline's loss for an output
      that is not logits: ``sensitivity.intake._loss_kind``).
    """

    def __init__(self, program, calib: CalibrationSet, holdout: CalibrationSet,
                 kind: str = "classifier", qcfg: QuantizeConfig | None = None,
                 clip: ClipRatios | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"Evaluator kind: one of {KINDS}, got {kind!r}")
        self.program, self.calib, self.holdout, self.kind = program, calib, holdout, kind
        self.lm, self.encoder = kind == "lm", kind == "encoder"
        self.qcfg = qcfg or QuantizeConfig()
        self.clip = clip  # the pipeline's clip ratios (sensitivity.json), for every plan
        self.x_cal, self.y_cal = calib.args[0], calib.labels
        self.x_ev, self.y_ev = holdout.args[0], holdout.labels
        with torch.no_grad():
            fp = program.module()
            # log-probabilities (an encoder: its hidden states) of the FP32 model
            self.fp32_cal = self._out(fp(self.x_cal))
            self.fp32_logp = self._out(fp(self.x_ev))
            self.fp32_loss = (float(F.nll_loss(self.fp32_cal, self.y_cal))
                              if kind == "classifier" else 0.0)
            self.fp32_primary = self._primary(self.fp32_logp)

    def _out(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.encoder else F.log_softmax(z, dim=-1)

    def module(self, plan: dict, qcfg: QuantizeConfig | None = None,
               clip: ClipRatios | None = None):
        """The plan quantized with ``qcfg`` (default the evaluator's) and ``clip`` (default the
        evaluator's ratios; the config's weight_clip is the ratios' mode)."""
        qcfg, clip = qcfg or self.qcfg, clip or self.clip
        mode = "max" if clip is None else clip.mode
        if mode != "max" or qcfg.weight_clip == "hessian":
            qcfg = QuantizeConfig(**{**qcfg.to_dict(), "weight_clip": mode})
        return apply(self.program, plan, self.calib, self.calib, qcfg,
                     token_input=0 if self.lm else None, clip=clip).module

    def _primary(self, logq: torch.Tensor) -> torch.Tensor:
        if self.lm:  # next-token NLL per sequence
            nll = -logq[:, :-1].gather(-1, self.x_ev[:, 1:, None]).squeeze(-1)
            return nll.mean(1)
        if self.encoder:  # per sequence: cosine to FP32 per token, mean over tokens; float64,
            # as cosines within 1e-5 of 1 differ by less than float32's resolution there
            return F.cosine_similarity(logq.double(), self.fp32_logp.double(), dim=-1).mean(1)
        return logq.argmax(1) == self.y_ev

    def _distance(self, ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per sample: KL(ref || out) over the last dim, or an encoder's squared error, mean
        over tokens (and hidden units)."""
        if self.encoder:
            d = (out.double() - ref.double()).pow(2)
        else:
            d = (ref.exp() * (ref - out)).sum(-1)
        return d.reshape(d.shape[0], -1).mean(1)

    @torch.no_grad()
    def calib_loss(self, plan: dict) -> float:
        out = self._out(self.module(plan)(self.x_cal))
        if self.kind == "classifier":
            return float(F.nll_loss(out, self.y_cal))
        return float(self._distance(self.fp32_cal, out).mean())

    @torch.no_grad()
    def score(self, plan: dict, qcfg: QuantizeConfig | None = None,
              clip: ClipRatios | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per held-out sample: the primary measure (correct, next-token NLL or embedding
        cosine) and the KL to FP32 in nats (an encoder: the squared error to FP32)."""
        out = self._out(self.module(plan, qcfg, clip)(self.x_ev))
        return self._primary(out), self._distance(self.fp32_logp, out)


def measured_increase(ev: Evaluator, template: dict, problem: Problem) -> dict[str, list[float]]:
    """Per layer and option: calibration loss with only that layer quantized, minus FP32."""
    out: dict[str, list[float]] = {}
    for la in problem.layers:
        vals = []
        for i in range(len(la.options)):
            plan = plan_for(template, problem, {n.name: 0 for n in problem.layers} | {la.name: i})
            plan["layers"] = [r for r in plan["layers"] if r["name"] == la.name]
            vals.append(ev.calib_loss(plan) - ev.fp32_loss)
        out[la.name] = vals
    return out


def with_omega(problem: Problem, omega: dict[str, list[float]], limits: Limits) -> Problem:
    d = problem.to_dict()
    for la in d["layers"]:
        for i, o in enumerate(la["options"]):
            o["omega"] = max(float(omega[la["name"]][i]), 0.0)
    d["limits"] = limits.to_dict()
    return Problem.from_dict(d)


def greedy(problem: Problem, increase: dict[str, list[float]], resource: str,
           limit: float) -> dict[str, int]:
    """Measured-loss greedy: from the costliest option of every tie group, repeatedly take the
    move to a cheaper option with the least loss increase per unit of resource saved."""
    groups = tie_groups(problem)
    layers = {la.name: la for la in problem.layers}
    choice = extreme(problem, max)

    def cost(name: str, i: int) -> float:
        return layers[name].options[i].cost(resource) or 0.0

    while not fits(problem, choice, resource, limit):
        best = None
        for g in groups:
            lead = layers[g[0]]
            for i in range(len(lead.options)):
                saved = sum(cost(n, choice[n]) - cost(n, i) for n in g)
                if saved <= 0:
                    continue
                loss = sum(increase[n][i] - increase[n][choice[n]] for n in g)
                score = loss / saved
                if best is None or score < best[0]:
                    best = (score, g, i)
        if best is None:
            raise RuntimeError("greedy: no cheaper option left and the budget is not met")
        for n in best[1]:
            choice[n] = best[2]
    return choice


def random_fill(problem: Problem, resource: str, limit: float, rng: random.Random) -> dict:
    groups = tie_groups(problem)
    layers = {la.name: la for la in problem.layers}
    choice = extreme(problem, max)
    order = list(range(len(groups)))
    rng.shuffle(order)
    for gi in order:
        if fits(problem, choice, resource, limit):
            break
        g = groups[gi]
        cur = layers[g[0]].options[choice[g[0]]].cost(resource) or 0.0
        cheaper = [i for i, o in enumerate(layers[g[0]].options)
                   if (o.cost(resource) or 0.0) < cur]
        if cheaper:
            i = rng.choice(cheaper)
            for n in g:
                choice[n] = i
    if not fits(problem, choice, resource, limit):  # still over: everything to the cheapest
        choice = extreme(problem, min)
    return choice


@functools.cache
def trained(name: str, work: Path) -> tuple[Path, torch.Tensor, torch.Tensor | None]:
    if name in TRANSFORMERS:  # tests/hf_zoo.py: tiny transformers on stdlib docstrings
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import hf_zoo

        if name == "llama":
            model = hf_zoo.trained_llama(steps=300)
        elif name == "bert":  # masked-byte training; the job sees the per-token hidden states
            model = hf_zoo.TokenEncoder(hf_zoo.trained_bert(steps=300).model).eval()
        else:  # GPT-2: its projections are Conv1D (an [in, out] weight), the attention fused
            torch.manual_seed(0)
            model = hf_zoo.train_causal(hf_zoo.gpt2(), steps=300)
        ids = hf_zoo.calibration_ids(n=N_CALIB + 200, seq=32, seed=1)
        return hf_zoo.save(model, (ids[:4],), work / f"{name}.pt2"), ids, None
    factory, side, channels = MODELS[name]
    x, y = zoo.digits_data(image_size=side, seed=0)
    x = x.expand(-1, channels, -1, -1).contiguous()
    torch.manual_seed(0)
    model = zoo.train(factory(), x[:N_TRAIN], y[:N_TRAIN], epochs=15, seed=0)
    return (zoo.save_model(model, x[:4], work / f"{name}.pt2"), x[N_TRAIN:],
            y[N_TRAIN:])


def prepare(name: str, work: Path, activation_bits: list[int], omega: str = "trace",
            qcfg: QuantizeConfig | None = None, weight_clip: str | None = None) -> tuple:
    """The pipeline on ``name`` (``weight_clip``: its ``quantize.weight_clip``, default
    ``qcfg``'s): (problem, plan template, Evaluator quantizing with the pipeline's clip
    ratios, pipeline seconds)."""
    qcfg = qcfg or QuantizeConfig()
    weight_clip = weight_clip or qcfg.weight_clip
    qcfg = QuantizeConfig(**{**qcfg.to_dict(), "weight_clip": weight_clip})
    pt2, x, y = trained(name, work)  # x, y: the samples no model saw
    cal_y = None if y is None else y[:N_CALIB]
    calib = zoo.save_calibration(work / f"{name}-calib.safetensors", x[:N_CALIB], cal_y)
    out = work / (f"{name}-a{''.join(map(str, activation_bits))}-{omega.replace(':', '-')}"
                  f"-{weight_clip}")
    estimator, _, priced = omega.partition(":")
    hessian: dict = {"omega": estimator}
    if priced:  # ':bc' prices the quantizer's bias correction, ':raw' the uncorrected error
        hessian["bias_corrected"] = priced == "bc"
    constraints = {"limits": {"size_ratio": 1.0}, "weight_bits": [4, 8],
                   "activation_bits": activation_bits, "drq": {"enabled": False},
                   "pin": {"first": None, "last": None}, "hessian": hessian,
                   "quantize": {"weight_clip": weight_clip}}
    t0 = time.perf_counter()
    run_pipeline(pt2, calib, constraints, out, holdout_fraction=0.1, pareto_points=0)
    seconds = time.perf_counter() - t0
    problem = Problem.from_json((out / "problem.json").read_text())
    template = json.loads((out / "plan.json").read_text())
    program = torch.export.load(str(pt2))
    clip = SensitivityResult.from_json((out / "sensitivity.json").read_text()).clip
    ev = Evaluator(program, CalibrationSet((x[:N_CALIB],), labels=cal_y),
                   CalibrationSet((x[N_CALIB:],), labels=None if y is None else y[N_CALIB:]),
                   kind=TRANSFORMERS.get(name, "classifier"), qcfg=qcfg, clip=clip)
    return problem, template, ev, seconds


def budgets(problem: Problem, resource: str, fractions: list[float]) -> list[tuple[str, float]]:
    lo = totals(problem, extreme(problem, min))[resource]
    hi = totals(problem, extreme(problem, max))[resource]
    return [(f"{resource} {f:.2f}", lo + f * (hi - lo)) for f in fractions]


def plan_bits(problem: Problem, choice: dict[str, int]) -> str:
    """``name:w<bits>a<bits>`` per layer."""
    return " ".join(f"{la.name}:w{la.options[choice[la.name]].w_bits}"
                    f"a{la.options[choice[la.name]].a_bits}" for la in problem.layers)


def all_plans(problem: Problem, template: dict, ev: Evaluator, resource: str, limit: float,
              bc_rows: tuple[str, ...]) -> None:
    """Print every plan that fits: bits per layer, summed Omega, held-out KL per correction."""
    sizes = [range(len(la.options)) for la in problem.layers]
    if math.prod(len(r) for r in sizes) > 64:
        print("    (--all-plans: more than 64 plans, skipped)")
        return
    for combo in itertools.product(*sizes):
        c = {la.name: i for la, i in zip(problem.layers, combo, strict=True)}
        if not fits(problem, c, resource, limit):
            continue
        opts = [la.options[c[la.name]] for la in problem.layers]
        bits = plan_bits(problem, c)
        dist = "MSE" if ev.encoder else "KL"
        kls = [f"{m}: {dist} {float(ev.score(plan_for(template, problem, c), cfg)[1].mean()):.5f}"
               for m, cfg in [(ev.qcfg.bias_correction, None)]
               + [(m, QuantizeConfig(calibration=ev.qcfg.calibration, bias_correction=m))
                  for m in bc_rows]]
        print(f"    plan {bits}  Omega {sum(o.omega for o in opts):.5f}  {'  '.join(kls)}")


def run_budget(problem, template, ev, increase, resource, limit, n_random, seed,
               extra: dict[str, Problem] | None = None, bc_rows: tuple[str, ...] = (),
               clips: dict[str, tuple] | None = None) -> dict:
    """Rows of every method at one budget; ``extra``: the same options with another
    estimator's Omega (``--omega``'s later entries), solved as rows ``bitplan-<omega>``;
    ``clips``: ``{mode: (problem, template, Evaluator)}`` of the pipeline run with that
    weight clip (rows ``bitplan+<mode>``, ``bitplan-plan+<mode>``, ``int8+<mode>``,
    ``int4+<mode>``)."""
    limits = Limits(**{resource: limit})
    plans: dict[str, dict[str, int] | list[dict[str, int]]] = {}
    sol = solve(Problem(problem.layers, limits, problem.ties), SolveConfig())
    plans["bitplan"] = dict(sol.choices)
    for omega, other in (extra or {}).items():
        plans[f"bitplan-{omega}"] = dict(
            solve(Problem(other.layers, limits, other.ties), SolveConfig()).choices)
    sol_m = solve(with_omega(problem, increase, limits), SolveConfig())
    plans["ilp-measured"] = dict(sol_m.choices)
    plans["greedy"] = greedy(problem, increase, resource, limit)
    plans["int8"] = extreme(problem, max)
    plans["int4"] = extreme(problem, min)
    rng = random.Random(seed)
    scores = {k: ev.score(plan_for(template, problem, c)) for k, c in plans.items()}
    for mode, (prob_c, tmpl_c, ev_c) in (clips or {}).items():
        own = dict(solve(Problem(prob_c.layers, limits, prob_c.ties), SolveConfig()).choices)
        for k, c in ((f"bitplan+{mode}", own), (f"bitplan-plan+{mode}", plans["bitplan"]),
                     (f"int8+{mode}", plans["int8"]), (f"int4+{mode}", plans["int4"])):
            plans[k] = c
            scores[k] = ev_c.score(plan_for(tmpl_c, prob_c, c))
    for mode in bc_rows:  # the same plans with a bias correction
        bc = QuantizeConfig(calibration=ev.qcfg.calibration, bias_correction=mode)
        for k in ("bitplan", "ilp-measured", "greedy", "int8", "int4"):
            plans[f"{k}+{mode}"] = plans[k]
            scores[f"{k}+{mode}"] = ev.score(plan_for(template, problem, plans[k]), bc)
    rand_plans = [random_fill(problem, resource, limit, rng) for _ in range(n_random)]
    rand = [ev.score(plan_for(template, problem, c)) for c in rand_plans]
    if rand_plans:  # the best of the random plans as a user would pick it: on calibration data
        cal = [ev.calib_loss(plan_for(template, problem, c)) for c in rand_plans]
        pick = min(range(len(cal)), key=cal.__getitem__)
        plans["random-picked"], scores["random-picked"] = rand_plans[pick], rand[pick]
    n = len(ev.x_ev)
    # accuracy or embedding cosine (higher is better), or perplexity exp(mean NLL) (lower)
    # an encoder's float64 cosines stay float64: float32 cannot resolve them near 1
    cast = torch.Tensor.double if ev.encoder else torch.Tensor.float
    value = (lambda p: math.exp(float(p.mean()))) if ev.lm else (lambda p: float(cast(p).mean()))
    continuous = ev.kind != "classifier"  # paired differences as means, not digit counts
    rand_val = sorted(value(p) for p, _ in rand)
    rand_kl = sorted(float(k.mean()) for _, k in rand)
    base_p, base_kl = scores["bitplan"]
    rows = {}
    for k, (p, kl) in scores.items():
        d = cast(p) - cast(base_p)
        dkl = kl - base_kl
        rows[k] = {"value": value(p),
                   "vs_bitplan": float(d.mean()) if continuous else int(d.sum()),
                   "se": (float(d.std()) / math.sqrt(n) if continuous
                          else float(d.std()) * math.sqrt(n)),
                   "kl": float(kl.mean()), "kl_vs_bitplan": float(dkl.mean()),
                   "kl_se": float(dkl.std()) / math.sqrt(n),
                   "use": totals(problem, plans[k])[resource] / limit,
                   "plan": plan_bits(problem, plans[k])}
    best, median = (rand_val[0], rand_val[len(rand_val) // 2]) if ev.lm else (
        rand_val[-1], statistics.median(rand_val))
    rows["random-median"] = {"value": median, "kl": statistics.median(rand_kl)}
    rows["random-best"] = {"value": best, "kl": rand_kl[0]}
    rows["fp32"] = {"value": value(ev.fp32_primary), "kl": 0.0}
    return rows


def row_line(kind: str, method: str, r: dict) -> str:
    """One printed row. An encoder's cosines are within 1e-4 of 1: it prints 1 - cosine and
    the difference of 1 - cosine to bitplan's (lower is better, like KL and MSE; the negative
    of the cosine difference, ``vs_bitplan`` in ``--json``), and the squared errors, in
    3 significant digits where the others print 4 and 5 decimals."""
    if kind == "encoder":
        line = f"    {method:18s} {1 - r['value']:9.3e}"
        if "vs_bitplan" not in r:
            return line + f" {'':20s} {r['kl']:10.3e}"
        vs = f"{0.0 - r['vs_bitplan']:+.2e} (se {r['se']:.2e})"  # not -0.00
        return line + (f" {vs:>20s} {r['kl']:10.3e} {r['kl_vs_bitplan']:+.2e} "
                       f"(se {r['kl_se']:.2e})  {r['use']:.2f}")
    line = f"    {method:18s} {r['value']:7.4f}"
    if "vs_bitplan" not in r:
        return line + f" {'':18s} {r['kl']:10.5f}"
    vs = (f"{r['vs_bitplan']:+.4f} (se {r['se']:.4f})" if kind == "lm"
          else f"{r['vs_bitplan']:+4d} (se {r['se']:4.1f})")
    return line + (f" {vs:>18s} {r['kl']:10.5f} {r['kl_vs_bitplan']:+.5f} "
                   f"(se {r['kl_se']:.5f})  {r['use']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet18,llama")
    ap.add_argument("--random", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--weight-clip", choices=["max", "mse", "hessian"], default=None,
                    help="quantize.weight_clip for every method (Omega and checkpoint alike): "
                    "max|W|, the MSE-optimal or the Hessian-weighted clipping (default: the "
                    "job's, quantize.weight_clip)")
    ap.add_argument("--clip-rows", default="",
                    help="comma list of weight clips: rows bitplan+<clip> (its own pipeline "
                    "and plan), bitplan-plan+<clip>, int8+<clip>, int4+<clip>")
    ap.add_argument("--omega", default="diagonal",
                    help="the pipeline's hessian.omega (trace, diagonal, measured; default "
                    "the job's default, diagonal) for the bitplan row, ':bc' / ':raw' "
                    "appended sets hessian.bias_corrected true / false (none: the "
                    "default); a comma list adds a row bitplan-<omega> for each later one, "
                    "paired against the first")
    ap.add_argument("--bias-correction", choices=["none", "weight", "layer"], default=None,
                    help="QuantizeConfig.bias_correction for every method (default: the "
                    "library's)")
    ap.add_argument("--calibration", choices=["minmax", "percentile", "mse"], default="minmax",
                    help="QuantizeConfig.calibration (activation ranges) for every method")
    ap.add_argument("--all-plans", action="store_true",
                    help="print every plan that fits (models with at most 64 plans)")
    ap.add_argument("--resources", default="size_bytes,bops",
                    help="which budgets: size_bytes (0.25 / 0.5 / 0.75), bops (0.5)")
    ap.add_argument("--bc-rows", default="",
                    help="comma list of bias corrections: rows <method>+<mode> for each")
    args = ap.parse_args()
    qcfg = QuantizeConfig(calibration=args.calibration,
                          **({} if args.bias_correction is None
                             else {"bias_correction": args.bias_correction}),
                          weight_clip=args.weight_clip or Quantize().weight_clip)
    clip_rows = tuple(m for m in args.clip_rows.split(",") if m)
    if any(m not in ("max", "mse", "hessian") for m in clip_rows):
        ap.error(f"--clip-rows: each of max, mse, hessian; got {args.clip_rows!r}")
    bc_rows = tuple(m for m in args.bc_rows.split(",") if m)
    if any(m not in ("none", "weight", "layer") for m in bc_rows):
        ap.error(f"--bc-rows: each of none, weight, layer; got {args.bc_rows!r}")
    omegas = args.omega.split(",")
    if not omegas or any(o.partition(":")[0] not in ("trace", "diagonal", "measured")
                         or o.partition(":")[2] not in ("", "bc", "raw") for o in omegas):
        ap.error(f"--omega: each of trace, diagonal, measured, optionally with :bc or :raw; "
                 f"got {args.omega!r}")
    torch.set_num_threads(args.threads)
    print(f"weight scales: {qcfg.weight_clip}; bitplan's Omega: {args.omega}; "
          f"bias correction: {qcfg.bias_correction}; activation ranges: {qcfg.calibration}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for resource, abits, fractions in (("size_bytes", [8], [0.25, 0.5, 0.75]),
                                               ("bops", [4, 8], [0.5])):
                if resource not in args.resources.split(","):
                    continue
                problem, template, ev, secs = prepare(name, Path(tmp), abits, omegas[0], qcfg)
                extra = {o: prepare(name, Path(tmp), abits, o, qcfg)[0] for o in omegas[1:]}
                clips = {m: prepare(name, Path(tmp), abits, omegas[0], qcfg, m)[:3]
                         for m in clip_rows}
                t0 = time.perf_counter()
                increase = measured_increase(ev, template, problem)
                m_secs = time.perf_counter() - t0
                n = len(ev.x_ev)
                what = (f"{n} held-out sequences" if ev.kind != "classifier"
                        else f"{n} held-out digits (one = {100 / n:.2f} pt)")
                print(f"\n{name}: {len(problem.layers)} layers, activations {abits}; pipeline "
                      f"{secs:.1f} s, measured loss increases {m_secs:.1f} s; {what}")
                head = {"lm": "ppl", "encoder": "1 - cos"}.get(ev.kind, "acc")
                dist = "MSE to FP32" if ev.encoder else "KL to FP32"
                for label, limit in budgets(problem, resource, fractions):
                    rows = run_budget(problem, template, ev, increase, resource, limit,
                                      args.random, args.seed, extra,
                                      bc_rows, clips)
                    results[f"{name} {label}"] = rows
                    print(f"  {label}:")
                    wide = ev.encoder  # row_line's wider columns
                    print(f"    {'method':18s} {head:>{9 if wide else 7}s} "
                          f"{'vs bitplan':>{20 if wide else 18}s} "
                          f"{dist:>10s} {dist[:-8] + ' vs bitplan':>22s}  budget use")
                    for k, r in rows.items():
                        print(row_line(ev.kind, k, r))
                    if args.all_plans:
                        for k in ("bitplan", "greedy"):
                            print(f"    {k} plan: {rows[k]['plan']}")
                        all_plans(problem, template, ev, resource, limit, bc_rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
