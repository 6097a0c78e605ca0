"""The fake-quant module's forward: the blocked in-place requantisation (``quantize.fakequant``)
against the whole-tensor float64 formulas it replaced, in one process, on a zoo model.

    .venv/bin/python bench/fakequant.py [--model mobilenet_v2] [--samples 16] [--repeats 3]
        [--threads T]

Builds the zoo's random-initialised model (224x224), a plan with 8-bit activations and 8 / 4
bit weights on alternate layers, quantizes it on ``--samples`` random images and times the
fake-quant forward on ``--samples`` others: the module as built (blocked), the same module with
``Requant`` / ``QuantAdd`` / ``FakeQuant`` running the former whole-tensor formulas (``old``),
and the FP32 program. Old and new are timed alternately (median of ``--repeats``) and their
outputs compared bit for bit. Also times ``build_fake_quant`` (once per plan evaluated). A
shared machine: the ratio is the figure, the seconds are as measured.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize import apply  # noqa: E402
from quantize.data import CalibrationSet  # noqa: E402
from quantize.fakequant import FakeQuant, QuantAdd, Requant, build_fake_quant  # noqa: E402
from quantize.graph import find_layers  # noqa: E402
from quantize.onnx.incontext import uniform_plan  # noqa: E402
from quantize.primitives import dyadic, fake_quantize_activation  # noqa: E402
from sensitivity import zoo  # noqa: E402
from solver.options import size_bytes  # noqa: E402


def old_requant(m: Requant, x: torch.Tensor) -> torch.Tensor:
    """Requant's former forward: codes and dyadic rounding over the whole tensor in float64."""
    def view(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[m.channel_dim % x.dim()] = -1
        return t.reshape(shape)

    codes = torch.round(x.detach().to(torch.float64) / view(m.src_scale))
    q = torch.floor(codes * view(m.b).to(torch.float64)
                    / torch.exp2(view(m.c).to(torch.float64)) + 0.5)
    out = (q.clamp(m.lo, m.hi) * m.scale).to(x.dtype)
    return x + (out - x).detach()


def old_add(m: QuantAdd, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """QuantAdd's former forward."""
    total = None
    for x, s in zip((a, b), m.in_scales, strict=True):
        q = torch.round(x.detach().to(torch.float64) / s)
        if s != m.scale:
            pb, pc = dyadic(s / m.scale)
            q = torch.floor(q * float(pb) / 2.0**pc + 0.5)
        total = q if total is None else total + q
    return (total.clamp(m.lo, m.hi) * m.scale).to(a.dtype)


def old_forward(m: torch.nn.Module):
    """The former forward of a requantising module."""
    if isinstance(m, Requant):
        return lambda x: old_requant(m, x)
    if isinstance(m, QuantAdd):
        return lambda a, b: old_add(m, a, b)
    return lambda x: fake_quantize_activation(x, m.scale, m.bits, m.signed)


def use_old(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every requantising submodule on its former forward (in place)."""
    for m in module.modules():
        if isinstance(m, (Requant, QuantAdd, FakeQuant)):
            m.forward = old_forward(m)
    return module


def plan_for(program: torch.export.ExportedProgram) -> dict:
    layers = find_layers(program.module())
    plan = uniform_plan(layers, 8, 8)
    for i, (row, layer) in enumerate(zip(plan["layers"], layers, strict=True)):
        w = 4 if i % 2 else 8
        row.update(w_bits=w, size_bytes=float(size_bytes(math.prod(layer.weight_shape), w,
                                                         layer.weight_shape[0])))
    plan["totals"]["size_bytes"] = sum(r["size_bytes"] for r in plan["layers"])
    return plan


def timed(fn, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}")
    n = args.samples
    model = zoo.reference_model(args.model, samples=8)
    x = torch.randn(2 * n, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    program = zoo.export(model, x[:2])
    res = apply(program, plan_for(program), CalibrationSet((x[:n],)), CalibrationSet((x[n:],)))
    t = time.perf_counter()
    new = build_fake_quant(program, res.checkpoint)
    build_s = time.perf_counter() - t
    old = use_old(build_fake_quant(program, res.checkpoint))
    fp32 = program.module()
    held = x[n:]
    counts = {k.__name__: sum(isinstance(m, k) for m in new.modules())
              for k in (Requant, QuantAdd, FakeQuant)}
    times: dict[str, list[float]] = {"old": [], "new": [], "fp32": []}
    with torch.no_grad():
        new(held[:2]), old(held[:2]), fp32(held[:2])  # warm-up
        for _ in range(args.repeats):
            dt, out_old = timed(old, held)
            times["old"].append(dt)
            dt, out_new = timed(new, held)
            times["new"].append(dt)
            times["fp32"].append(timed(fp32, held)[0])
            same = torch.equal(out_new.view(torch.int32), out_old.view(torch.int32))
            if not same:
                raise SystemExit("the blocked forward differs from the whole-tensor formulas")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}: {n} images, modules {counts}")
    print(f"fake-quant forward, whole-tensor float64 (old): {med['old']:.3f} s "
          f"(runs {', '.join(f'{v:.3f}' for v in times['old'])})")
    print(f"fake-quant forward, blocked in place (new):     {med['new']:.3f} s "
          f"(runs {', '.join(f'{v:.3f}' for v in times['new'])})")
    print(f"FP32 program forward:                            {med['fp32']:.3f} s")
    print(f"old / new: {med['old'] / med['new']:.2f}x; over FP32: old "
          f"{med['old'] / med['fp32']:.2f}x, new {med['new'] / med['fp32']:.2f}x; "
          "outputs bit-identical: yes")
    print(f"build_fake_quant: {build_s:.2f} s")
    print(f"load average now: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
