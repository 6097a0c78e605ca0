"""Whole models in ONNX Runtime: the exported plan's measured latency against the plan's
predicted latency (the sum of `bitplan profile`'s per-layer latencies for the plan's options)
and against the float ONNX model, all measured in the same run.

    python bench/deploy.py [--models cnn,resnet18] [--batch 1] [--threads 1] [--repeat 30]
                           [--chain]

Models: the digits CNN (8x8, trained 5 epochs) and ResNet-18 at 224x224 (random weights, BN
statistics on 16 random images; latency does not depend on the weights). Plans, built directly
(not by the ILP, which needs the Hessian pass): ``w8a8`` (every layer INT8) and ``size0.75``
(4-bit weights on the largest layers until the stored weights fit 0.75 x INT8, activations 8
bits; the first and last layer stay at 8 bits as the default pins do). Each plan is quantized
on 16 calibration samples, exported, checked in ONNX Runtime against the fake-quant module, and
timed whole (median of --repeat runs after 5 warm-up runs). Printed per model and plan:
measured ms, predicted ms (sum of layers timed in isolation), predicted / measured, and
measured / float. The machine may be shared: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize import QuantizeConfig, apply  # noqa: E402
from quantize.data import CalibrationSet  # noqa: E402
from quantize.graph import find_layers  # noqa: E402
from quantize.onnx import export_onnx, session, verify  # noqa: E402
from quantize.onnx.profile import ProfileConfig, cpu_model, profile  # noqa: E402
from sensitivity import zoo  # noqa: E402
from solver.options import size_bytes  # noqa: E402
from solver.plan import FORMAT as PLAN_FORMAT  # noqa: E402
from solver.plan import VERSION as PLAN_VERSION  # noqa: E402


def make_plan(program: torch.export.ExportedProgram, w_bits: dict[str, int]) -> dict:
    """A plan (current format) with the given weight bits per layer and 8-bit activations."""
    layers = find_layers(program.module())
    rows = []
    for layer in layers:
        n = math.prod(layer.weight_shape)
        rows.append({"name": layer.name, "kind": layer.kind, "params": n, "macs": 0,
                     "w_bits": w_bits[layer.name], "a_bits": 8, "weight_trace": None,
                     "omega": 0.0, "size_bytes": float(size_bytes(n, w_bits[layer.name],
                                                                  layer.weight_shape[0])),
                     "bops": 0.0, "latency_ms": None, "drq": None})
    params = sum(r["params"] for r in rows)
    return {"version": PLAN_VERSION, "format": PLAN_FORMAT,
            "model": {"layers": len(rows), "params": params, "macs": 0,
                      "quantized_params": params, "other_params": 0},
            "constraints": {}, "status": "optimal", "objective": 0.0,
            "totals": {"size_bytes": sum(r["size_bytes"] for r in rows), "bops": 0.0,
                       "latency_ms": None},
            "limits": {"size_bytes": None, "bops": None, "latency_ms": None},
            "binding": [], "layers": rows, "diagnosis": None}


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
    raise SystemExit(f"unknown model {name!r}: use cnn, resnet18")


def whole_model_ms(model, x: np.ndarray, threads: int, repeat: int) -> float:  # noqa: ANN001
    sess = session(model, threads)
    name = sess.get_inputs()[0].name
    for _ in range(5):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


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
    """Wall time per conv of a chain of 1, 4, 8 identical convs (the profile times one)."""
    x = np.random.default_rng(0).random((1, 64, 56, 56), dtype=np.float32) * 5
    for n in (1, 4, 8):
        ms = whole_model_ms(conv_chain(n), x, threads, repeat)
        print(f"  chain of {n}: {ms / n:.3f} ms per conv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--chain", action="store_true",
                    help="also time chains of 1/4/8 identical W8A8 convs (per conv)")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeat} runs")
    if args.chain:
        chain_probe(args.threads, args.repeat)
    for name in args.models.split(","):
        program, data = model_and_data(name)
        x = data[: args.batch].numpy()
        table = profile(program, ProfileConfig(weight_bits=(4, 8), activation_bits=(8,),
                                               batch=args.batch, threads=args.threads,
                                               repeat=args.repeat))["latency_table"]
        fp32 = whole_model_ms(export_onnx(program, None), x, args.threads, args.repeat)
        print(f"\n{name}: float ONNX {fp32:.3f} ms")
        print(f"  {'plan':<9} {'measured':>9} {'predicted':>10} {'pred/meas':>10} "
              f"{'meas/float':>11} {'top-1 agr.':>10}")
        train, holdout = CalibrationSet((data[:16],)), CalibrationSet((data[16:],))
        layers = [x.name for x in find_layers(program.module())]
        for plan_name, bits in (("w8a8", dict.fromkeys(layers, 8)),
                                ("size0.75", size_forced(program, 0.75))):
            res = apply(program, make_plan(program, bits), train, holdout, QuantizeConfig(
                batch_size=8))
            model = export_onnx(program, res.checkpoint)
            check = verify(program, res.checkpoint, model, holdout)
            measured = whole_model_ms(model, x, args.threads, args.repeat)
            predicted = sum(table[n][f"w{bits[n]}a8"] for n in layers)
            print(f"  {plan_name:<9} {measured:9.3f} {predicted:10.3f} "
                  f"{predicted / measured:10.2f} {measured / fp32:11.2f} "
                  f"{check['top1_agreement']:10.3f}")


if __name__ == "__main__":
    main()
