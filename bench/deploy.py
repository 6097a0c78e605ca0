"""Whole models in ONNX Runtime: the exported plan's measured latency against the plan's
predicted latency (the sum of `bitplan profile`'s per-layer latencies for the plan's options)
and against the float ONNX model, all measured in the same run.

    python bench/deploy.py [--models cnn,resnet18,llama] [--batch 1] [--threads 1]
                           [--repeat 30] [--ilp] [--groups G] [--quick] [--chain]

Models: the digits CNN (8x8, trained 5 epochs), ResNet-18 at 224x224 (random weights, BN
statistics on 16 random images; latency does not depend on the weights) and the tiny
Llama-style decoder of tests/hf_zoo.py (32 tokens, untrained: latency does not depend on the
weights). Latency tables per model, all timed here: ``context`` (the profile's default: each
layer inside the whole model, ``quantize.onnx.incontext``), ``isolated`` (each layer alone),
and ``context-dq`` (context, for the export without the INT8 cast of 4-bit weights). Plans,
built directly: ``w8a8`` (every layer INT8) and ``size0.75`` (4-bit weights on the largest
layers until the stored weights fit 0.75 x INT8, activations 8 bits; the first and
last layer stay at 8 bits as the default pins do), and ``size0.75-dq``: the same checkpoint
exported with ``int8_kernels=False`` (4-bit weights as DequantizeLinear + float conv; its
``pred ctx`` column is the context-dq table). With ``--ilp`` (ResNet-18 only) the job
pipeline plans with ``hardware: onnxruntime-cpu`` (its own measured table, a quick Hessian on
16 random images labelled by the float model): ``size_ratio 0.75`` with ``latency_ratio
1.15`` and ``size_ratio 0.75`` alone; when the first is infeasible, the solver alone finds per
size ratio (0.75 .. 0.95) the smallest feasible latency ratio on a 1.15 x 2^(k/8) grid, and
the jobs run at the size ratio where the size-only plan is predicted slowest against it. The
jobs' ``model.onnx`` files are timed with the rest. With ``--groups G`` the jobs also offer
per-group weights (``weight_group_sizes: [null, G]``: one scale per G inputs, lower Omega,
a few more bytes, and in ONNX Runtime a blocked DequantizeLinear + float conv) and every
table times the ``w<w>g<G>a8`` options too. ``--quick``: only the float, all-INT8 and ILP
plans, and only the context table (a locked run of minutes).

Each plan is quantized on 16 calibration samples, exported, checked in ONNX Runtime against the
fake-quant module. Then --rounds times: the tables are profiled, and all models of one model
are timed whole, interleaved run by run (--repeat runs each after 5 warm-up runs). Printed per
plan: measured ms (median and 10th..90th percentile of all rounds' runs), predicted ms (median
over rounds) and predicted / measured per round (median [min..max]) for the context and
isolated tables, and measured / float. The machine may be shared: read ratios, not absolute
times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize import QuantizeConfig, apply  # noqa: E402
from quantize.data import CalibrationSet  # noqa: E402
from quantize.graph import find_layers  # noqa: E402
from quantize.onnx import export_onnx, session, verify  # noqa: E402
from quantize.onnx.incontext import uniform_plan  # noqa: E402
from quantize.onnx.profile import ProfileConfig, cpu_model, profile  # noqa: E402
from sensitivity import zoo  # noqa: E402
from solver.options import size_bytes  # noqa: E402

ILP_HESSIAN = {"max_iter": 4, "tol": 0.5, "seed": 0}  # a quick Hessian: the bench is latency


def make_plan(program: torch.export.ExportedProgram, w_bits: dict[str, int]) -> dict:
    """A plan (current format) with the given weight bits per layer and 8-bit activations."""
    plan = uniform_plan(find_layers(program.module()), 8, 8)
    for row in plan["layers"]:
        n, w = row["params"], w_bits[row["name"]]
        out = next(x.weight_shape[0] for x in find_layers(program.module())
                   if x.name == row["name"])
        row.update(w_bits=w, size_bytes=float(size_bytes(n, w, out)))
    plan["totals"]["size_bytes"] = sum(r["size_bytes"] for r in plan["layers"])
    return plan


def size_forced(program: torch.export.ExportedProgram, ratio: float) -> dict[str, int]:
    """4-bit weights on the largest layers (not the first / last) until the stored weights fit
    ``ratio`` x the INT8 model's."""
    layers = find_layers(program.module())
    bits = {layer.name: 8 for layer in layers}

    def total() -> float:
        return sum(size_bytes(math.prod(x.weight_shape), bits[x.name], x.weight_shape[0])
                   for x in layers)

    budget = ratio * total()
    for layer in sorted(layers[1:-1], key=lambda x: -math.prod(x.weight_shape)):
        if total() <= budget:
            break
        bits[layer.name] = 4
    return bits


def model_and_data(name: str) -> tuple[torch.export.ExportedProgram, torch.Tensor]:
    if name == "cnn":
        x, y = zoo.digits_data(8, 0)
        torch.manual_seed(0)
        model = zoo.train(zoo.DigitsCNN(), x[:1400], y[:1400], epochs=5, seed=0)
        return zoo.export(model, x[:4]), x[1400:1432]
    if name == "resnet18":
        model = zoo.reference_model("resnet18", samples=16)
        data = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(5))
        return zoo.export(model, data[:2]), data
    if name == "llama":  # tests/hf_zoo.py's tiny decoder, untrained (latency only)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import hf_zoo

        torch.manual_seed(0)
        model = hf_zoo.CausalLM(hf_zoo.llama()).eval()
        ids = hf_zoo.calibration_ids(n=32, seq=32, seed=1)
        return hf_zoo.export(model, (ids[:2],)), ids
    raise SystemExit(f"unknown model {name!r}: use cnn, resnet18, llama")


def time_whole(models: dict[str, onnx.ModelProto], x: np.ndarray, threads: int,
               repeat: int) -> dict[str, list[float]]:
    """Wall times (ms) of every model, interleaved: one run of each per round."""
    sessions = {k: session(m, threads) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(5 + repeat):
        for k, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: x}
            t0 = time.perf_counter()
            sess.run(None, feed)
            if r >= 5:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def spread(ts: list[float]) -> str:
    return (f"{np.median(ts):9.3f} [{np.percentile(ts, 10):.3f}..{np.percentile(ts, 90):.3f}]")


def row_tag(row: dict) -> str:
    """The solver's tag of a plan row (8-bit activations)."""
    g = row.get("group_size")
    return f"w{row['w_bits']}a8" if g is None else f"w{row['w_bits']}g{g}a8"


def ilp_plans(name: str, program_data: torch.Tensor, work: Path, groups: int | None = None
              ) -> dict[str, tuple[dict, onnx.ModelProto]]:
    """The job pipeline's plans (``hardware: onnxruntime-cpu``) at size 0.75 with and without
    a latency limit: {label: (plan, exported model)}."""
    from service.cache import StageCache
    from service.pipeline import run_pipeline
    from solver import Limits, Problem, SolveConfig, solve
    from solver.errors import InfeasibleError

    model = zoo.reference_model(name, samples=16)
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).argmax(1)
    pt2 = zoo.save_model(model, x[:2], work / f"{name}.pt2")
    calib = zoo.save_calibration(work / f"{name}-calib.safetensors", x, y)
    cache = StageCache(work / "cache")
    base = {"hardware": "onnxruntime-cpu", "weight_bits": [4, 8], "activation_bits": [8],
            "drq": {"enabled": False}, "hessian": ILP_HESSIAN,
            **({"weight_group_sizes": [None, groups]} if groups else {})}
    out: dict[str, tuple[dict, onnx.ModelProto]] = {}

    def job(label: str, limits: dict) -> bool:
        t0 = time.perf_counter()
        done = (work / label / "model.onnx").is_file()  # --work: a finished job is reused
        try:
            if not done:
                run_pipeline(pt2, calib, {**base, "limits": limits}, work / label,
                             cache=cache, pareto_points=0, plots=False)
        except InfeasibleError as exc:
            print(f"  ILP {label} {limits}: infeasible ({exc.message[:300]})")
            return False
        if not (work / label / "model.onnx").is_file():
            print(f"  ILP {label} {limits}: infeasible (an earlier run)")
            return False
        plan = json.loads((work / label / "plan.json").read_text())
        plan["onnx"] = json.loads((work / label / "report.json").read_text()).get("onnx")
        out[label] = (plan, onnx.load(str(work / label / "model.onnx")))
        print(f"  ILP {label} {limits}: job {time.perf_counter() - t0:.0f} s"
              f"{' (reused)' if done else ''}, "
              f"{sum(r['w_bits'] == 4 for r in plan['layers'])} layers at 4 bits "
              f"({sum(r.get('group_size') is not None for r in plan['layers'])} per group), "
              f"predicted {plan['totals']['latency_ms']:.3f} ms, limit "
              f"{plan['limits']['latency_ms'] or float('nan'):.3f} ms")
        return True

    if job("ilp-lat1.15", {"size_ratio": 0.75, "latency_ratio": 1.15}):
        job("ilp-size-only", {"size_ratio": 0.75})
        return out
    # infeasible on this runtime: per size ratio, the smallest feasible latency ratio (grid
    # 1.15 x 2^(k/8)) and the size-only plan's predicted latency, from the solver alone
    first = json.loads((work / "ilp-lat1.15" / "plan.json").read_text())
    problem = Problem.from_json((work / "ilp-lat1.15" / "problem.json").read_text())
    int8_size = first["limits"]["size_bytes"] / 0.75
    lat8 = first["limits"]["latency_ms"] / 1.15
    best = None
    for size_ratio in (0.75, 0.8, 0.85, 0.9, 0.95):
        limit = size_ratio * int8_size
        free = solve(Problem(problem.layers, Limits(size_bytes=limit), problem.ties),
                     SolveConfig())
        for k in range(0, 25):
            ratio = round(1.15 * 2 ** (k / 8), 3)
            sol = solve(Problem(problem.layers, Limits(size_bytes=limit,
                                                       latency_ms=ratio * lat8),
                                problem.ties), SolveConfig())
            if sol.choices:
                break
        gain = free.totals["latency_ms"] / sol.totals["latency_ms"]
        print(f"  solver: size {size_ratio}: smallest feasible latency ratio {ratio} "
              f"(predicted {sol.totals['latency_ms'] / lat8:.2f} x INT8); size only: "
              f"{free.totals['latency_ms'] / lat8:.2f} x INT8")
        if best is None or gain > best[0]:
            best = (gain, size_ratio, ratio)
    _, size_ratio, ratio = best
    job(f"ilp-s{size_ratio}-lat{ratio}", {"size_ratio": size_ratio, "latency_ratio": ratio})
    job(f"ilp-s{size_ratio}-size-only", {"size_ratio": size_ratio})
    return out


def conv_chain(n: int):  # noqa: ANN201 - onnx.ModelProto
    """``n`` fused-pattern 64->64 3x3 W8A8 convs (+ ReLU) at 56x56, as the export writes them."""
    from onnx import TensorProto, helper

    from quantize.onnx.builder import GraphBuilder
    from quantize.onnx.context import Context
    from quantize.onnx.layers import dequantized_weight
    from quantize.onnx.ops import conv
    from quantize.points import Grid

    b = GraphBuilder()
    ctx = Context(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), b)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 56, 56]))
    grid = Grid(0.05, 8, False)
    y = b.qdq("x", grid, "in")
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        codes = torch.randint(-127, 128, (64, 64, 3, 3), generator=gen, dtype=torch.int32)
        w = dequantized_weight(ctx, f"w{i}", codes, torch.full((64,), 1e-3), 8)
        y = b.qdq(b.op("Relu", [conv(ctx, y, w, None, (3, 3), (1, 1), (1, 1), (1, 1), 1,
                                     f"c{i}")], f"r{i}"), grid, f"o{i}")
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    b.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    return b.model()


def chain_probe(threads: int, repeat: int) -> None:
    """Wall time per conv of a chain of 1, 4, 8 identical convs (the isolated profile times
    one)."""
    x = np.random.default_rng(0).random((1, 64, 56, 56), dtype=np.float32) * 5
    times = time_whole({n: conv_chain(n) for n in (1, 4, 8)}, x, threads, repeat)
    for n, ts in times.items():
        print(f"  chain of {n}: {np.median(ts) / n:.3f} ms per conv")


def profile_tables(program: torch.export.ExportedProgram, name: str,
                   args: argparse.Namespace) -> dict[str, dict]:
    """The context, isolated and context-dq tables, timed now."""
    tables = {}
    kinds = (("context", True), ("isolated", True), ("context", False))
    for method, int8 in kinds[:1] if args.quick else kinds:
        t0 = time.perf_counter()
        doc = profile(program, ProfileConfig(weight_bits=(4, 8), activation_bits=(8,),
                                             batch=args.batch, threads=args.threads,
                                             repeat=args.repeat, method=method,
                                             int8_kernels=int8,
                                             group_sizes=(args.groups,) if args.groups else ()))
        key = method if int8 else "context-dq"
        tables[key] = doc["latency_table"]
        extra = (f", rest {doc['rest_ms']:.3f} ms, option scale {doc['scale']}, isolated "
                 f"fallbacks {doc['fallback'] or 'none'}" if method == "context" else "")
        print(f"  {name}: {key} profile {time.perf_counter() - t0:.0f} s{extra}")
    return tables


def ratios(values: list[float]) -> str:
    return f"{np.median(values):.2f} [{min(values):.2f}..{max(values):.2f}]"


def bench_model(name: str, args: argparse.Namespace) -> None:
    program, data = model_and_data(name)
    x = data[: args.batch].numpy()
    print(f"\n{name}")
    train, holdout = CalibrationSet((data[:16],)), CalibrationSet((data[16:],))
    layers = [x.name for x in find_layers(program.module())]
    plans = {"w8a8": make_plan(program, dict.fromkeys(layers, 8))}
    if not args.quick:
        plans["size0.75"] = make_plan(program, size_forced(program, 0.75))
    models = {"float": export_onnx(program, None)}
    agreement = {}
    for plan_name, plan in list(plans.items()):
        res = apply(program, plan, train, holdout, QuantizeConfig(batch_size=8))
        models[plan_name] = export_onnx(program, res.checkpoint)
        agreement[plan_name] = verify(program, res.checkpoint, models[plan_name],
                                      holdout)["top1_agreement_decisive"]
        if plan_name == "size0.75":  # 4-bit weights as DQ + float conv (no INT8 kernel)
            plans["size0.75-dq"] = plan
            models["size0.75-dq"] = export_onnx(program, res.checkpoint, int8_kernels=False)
            agreement["size0.75-dq"] = verify(program, res.checkpoint, models["size0.75-dq"],
                                              holdout)["top1_agreement_decisive"]
    if args.ilp and name == "resnet18":
        with tempfile.TemporaryDirectory(prefix="bitplan-deploy-") as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            for label, (plan, model) in ilp_plans(name, data, work, args.groups).items():
                plans[label], models[label] = plan, model
    # rounds of (tables, whole models): a table and the models it predicts are timed minutes
    # apart at most, and the spread over rounds shows what the machine's load does
    rounds = [(profile_tables(program, name, args), time_whole(models, x, args.threads,
                                                               args.repeat))
              for _ in range(args.rounds)]
    pooled = {k: [t for _, times in rounds for t in times[k]] for k in models}
    fp32 = float(np.median(pooled["float"]))
    print(f"  {'plan':<16} {'measured ms [p10..p90]':>32} {'pred ctx':>9} "
          f"{'ctx/meas [range]':>17} {'pred iso':>9} {'iso/meas [range]':>17} "
          f"{'meas/float':>10} {'4-bit':>5} {'group':>5} {'top-1':>6}")
    print(f"  {'float':<16} {spread(pooled['float']):>32}")
    for plan_name, plan in plans.items():
        measured = float(np.median(pooled[plan_name]))
        bits = {r["name"]: r["w_bits"] for r in plan["layers"]}
        tags = {r["name"]: row_tag(r) for r in plan["layers"]}
        pred: dict[str, list[float]] = {"context": [], "isolated": []}
        ratio: dict[str, list[float]] = {"context": [], "isolated": []}
        for tables, times in rounds:
            meas_r = float(np.median(times[plan_name]))
            for m in pred:
                t = tables.get("context-dq" if m == "context" and plan_name.endswith("-dq")
                               else m)
                if t is None:  # --quick: no isolated table
                    pred[m].append(float("nan"))
                    ratio[m].append(float("nan"))
                    continue
                p = sum(t[n].get(tags[n], t[n][f"w{bits[n]}a8"]) for n in layers)
                pred[m].append(p)
                ratio[m].append(p / meas_r)
        agree = agreement.get(plan_name,
                              (plan.get("onnx") or {}).get("top1_agreement_decisive"))
        print(f"  {plan_name:<16} {spread(pooled[plan_name]):>32} "
              f"{np.median(pred['context']):9.3f} {ratios(ratio['context']):>17} "
              f"{np.median(pred['isolated']):9.3f} {ratios(ratio['isolated']):>17} "
              f"{measured / fp32:10.2f} {sum(b == 4 for b in bits.values()):5d} "
              f"{sum('g' in t for t in tags.values()):5d} "
              f"{agree if agree is not None else float('nan'):6.3f}")
        limit = (plan.get("limits") or {}).get("latency_ms")
        if limit:
            per_round = [float(np.median(times[plan_name])) / limit for _, times in rounds]
            print(f"  {'':<16} latency limit {limit:.3f} ms (the job's own table): "
                  f"measured / limit {ratios(per_round)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (profile the tables, time the whole models)")
    ap.add_argument("--ilp", action="store_true",
                    help="ResNet-18: also the job pipeline's plans with and without a latency "
                    "limit (minutes)")
    ap.add_argument("--groups", type=int, default=None,
                    help="with --ilp: also offer per-group weights of this group size (and "
                    "time them in every table)")
    ap.add_argument("--work", default=None,
                    help="with --ilp: keep the jobs' outputs (and cache) here and reuse "
                    "finished jobs")
    ap.add_argument("--quick", action="store_true",
                    help="only the float, all-INT8 and --ilp plans, and only the context table")
    ap.add_argument("--chain", action="store_true",
                    help="also time chains of 1/4/8 identical W8A8 convs (per conv)")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeat} interleaved rounds")
    if args.chain:
        chain_probe(args.threads, args.repeat)
    for name in args.models.split(","):
        bench_model(name, args)


if __name__ == "__main__":
    main()
