"""Whole-job cost on ImageNet-size networks: ``bitplan plan`` (size limit 0.6 of INT8, weights
{4, 8}, activations 8, no pinned layers) on ResNet-18, MobileNetV2 and ResNet-50 at 224x224.

    .venv/bin/python bench/scale.py [--models resnet18,mobilenet_v2,resnet50] [--samples 256]
        [--max-iter 200] [--memory-gb G] [--device cpu] [--sampling all|chunk]
        [--omega trace|diagonal]

Each model runs in its own process (peak RSS is per process). Models are the zoo's
torchvision-faithful definitions, random-initialised with BN statistics from random images;
the calibration set is random images labelled with the FP32 model's top-1 (timing and memory
only: the accuracy figure is agreement with FP32). Per stage: wall time, peak RSS during the
stage (``/proc/self/clear_refs`` reset at the stage's start, ``VmHWM`` at its end) and the
resident set at its start (what the job holds then: the stage's peak minus it is its own
working memory), forward
calls of a whole program; for the sensitivity stage also the probe passes, chunks and
per-sample backward passes, and the ratio of its time to the time of the same number of plain
forward and backward passes (a forward of a chunk and a ``loss.backward()`` over the weights,
timed on one chunk in the same process: the floor an HVP-based method cannot beat by much).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

# first / last layers not pinned to 8 bits: MobileNetV2's 1280x1000 classifier at 8 bits alone
# is over a third of 0.6 x INT8 and the limit is then unreachable
CONSTRAINTS = {"limits": {"size_ratio": 0.6}, "weight_bits": [4, 8], "activation_bits": [8],
               "pin": {"first": None, "last": None}}


def child(name: str, samples: int, max_iter: int, memory_gb: float | None, device: str,
          sampling: str | None = None, omega: str | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import fx

    from sensitivity import zoo
    from sensitivity.memory import proc_status, reset_peak, trim
    from service.pipeline import run_pipeline
    from service.settings import memory_budget, resolve_device
    from solver.errors import BitplanError

    forwards = {"n": 0}

    def count(module, _args):  # a whole program's forward (sub-modules are not GraphModules)
        if isinstance(module, fx.GraphModule):
            forwards["n"] += 1

    torch.nn.modules.module.register_module_forward_pre_hook(count)
    stages: dict[str, dict] = {}
    current = {"stage": None, "t": time.perf_counter(), "f": forwards["n"]}

    def close() -> None:
        st = current["stage"]
        if st is not None:
            s = stages.setdefault(st, {"seconds": 0.0, "peak_rss": 0, "forwards": 0})
            s["seconds"] += time.perf_counter() - current["t"]
            s["peak_rss"] = max(s["peak_rss"], proc_status()["VmHWM"])
            s["forwards"] += forwards["n"] - current["f"]

    def progress(stage: str, fraction: float) -> None:
        if stage != current["stage"]:
            close()
            reset_peak()
            # what the job holds when the stage starts (the pipeline trimmed the heap just
            # before): its peak minus this is the stage's own working memory
            stages.setdefault(stage, {"seconds": 0.0, "peak_rss": 0, "forwards": 0,
                                      "start_rss": proc_status()["VmRSS"]})
            current.update(stage=stage, t=time.perf_counter(), f=forwards["n"])

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = zoo.reference_model(name, samples=16)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(samples, 3, 224, 224, generator=gen)
        with torch.no_grad():
            y = torch.cat([model(x[i:i + 32]).argmax(1) for i in range(0, samples, 32)])
        # the example input is cloned: torch.export saves a view's whole storage, so x[:2]
        # would put the whole calibration set into the .pt2 (and into the job's memory)
        zoo.save_model(model, x[:2].clone(), Path(tmp) / "m.pt2")
        zoo.save_calibration(Path(tmp) / "c.safetensors", x, y)
        setup = time.perf_counter() - t0
        del x, y, model  # the job's peak only: nothing of the set-up stays resident
        dev = resolve_device(device)
        budget = memory_budget(memory_gb, dev)
        cons = {**CONSTRAINTS, "hessian": {"max_iter": max_iter,
                                           **({"sampling": sampling} if sampling else {}),
                                           **({"omega": omega} if omega else {})}}
        trim()  # the set-up's freed heap pages go back
        reset_peak()
        t0 = time.perf_counter()
        error = None
        try:
            run_pipeline(Path(tmp) / "m.pt2", Path(tmp) / "c.safetensors", cons,
                         Path(tmp) / "out", device=dev, progress=progress,
                         memory_budget=budget)
        except BitplanError as exc:  # a late stage (export) failing still leaves the figures
            error = f"{exc.code}: {exc.message}"
        close()
        total = time.perf_counter() - t0
        report = Path(tmp) / "out" / "report.json"
        metrics = json.loads(report.read_text()).get("metrics") if report.is_file() else None
        sens = json.loads((Path(tmp) / "out" / "sensitivity.json").read_text())
        # plain forward + backward of one chunk, in the same process, for the ratio (with
        # hessian.sampling "chunk" a pass runs on one drawn chunk of "draw" samples)
        drawn = sens["model"].get("draw")
        chunk = drawn or sens["model"]["chunk"]
        program = torch.export.load(str(Path(tmp) / "m.pt2")).module().to(dev)
        xb = torch.randn(chunk, 3, 224, 224, generator=gen).to(dev)
        yb = torch.randint(0, 1000, (chunk,), generator=gen).to(dev)
        t0 = time.perf_counter()
        loss = F.cross_entropy(program(xb), yb)
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter() - t0
    layers = sens["layers"]
    vectors = sens["model"].get("vectors") or max(r["weight_iterations"] for r in layers)
    n_train = sens["model"]["calibration"]["train"]
    n_chunks = 1 if drawn else -(-n_train // chunk)
    passes = sens["model"]["passes"]
    kinds = len({r["weight_estimator"] for r in layers} | {r["activation_estimator"]
                                                           for r in layers} - {""})
    floor = passes * kinds * n_chunks * t_fwd + vectors * kinds * n_chunks * t_bwd
    stuck = sum(not r["weight_converged"] for r in layers) + sum(
        not r["activation_converged"] for r in layers if r["activation_estimator"])
    return {
        "model": name, "samples": samples, "train": n_train, "setup_s": setup,
        "total_s": total, "stages": stages, "chunk": chunk, "chunks": n_chunks,
        "passes": passes, "vectors": vectors,
        "sample_backwards": vectors * kinds * n_chunks * chunk, "sampling": sens["model"].get(
            "sampling", "all"),
        "t_fwd_chunk": t_fwd, "t_bwd_chunk": t_bwd, "floor_s": floor,
        "memory": sens["model"].get("memory"), "blocks_at_max_iter": stuck,
        "blocks": 2 * len(layers), "metrics": metrics, "error": error,
        # VmHWM restarts at every stage (and the floor's pass after the job is not the job's):
        # the job's peak is the largest stage peak
        "peak_rss": max(s["peak_rss"] for s in stages.values()),
        "budget": budget,
    }


def gb(n: float) -> str:
    return f"{n / 1e9:5.2f} GB"


def stage_table(stages: dict[str, dict], total_s: float) -> None:
    """Print one row per stage: wall time, share of the whole plan, peak RSS and, where the
    stages count them, forward passes."""
    counts = all("forwards" in s for s in stages.values())
    starts = all("start_rss" in s for s in stages.values())
    print(f"{'stage':<12} {'wall s':>8} {'share':>6} {'peak RSS':>9}"
          + (f" {'at start':>9}" if starts else "") + (f" {'forwards':>9}" if counts else ""))
    for st, s in stages.items():
        print(f"{st:<12} {s['seconds']:8.1f} {s['seconds'] / total_s:6.1%} "
              f"{gb(s['peak_rss'])}" + (f" {gb(s['start_rss'])}" if starts else "")
              + (f" {s['forwards']:9d}" if counts else ""))


def show(r: dict) -> None:
    print(f"\n== {r['model']}: {r['samples']} samples ({r['train']} for the Hessian), "
          f"whole plan {r['total_s']:.0f} s (setup {r['setup_s']:.0f} s not counted), "
          f"budget {gb(r['budget'])}")
    stage_table(r["stages"], r["total_s"])
    sens = r["stages"].get("sensitivity", {}).get("seconds", 0.0)
    print(f"sensitivity ({r.get('sampling', 'all')} sampling): chunk {r['chunk']} x "
          f"{r['chunks']}, {r['passes']} probe passes, "
          f"{r['vectors']} vectors a block, {r['sample_backwards']} per-sample backwards; "
          f"plain forward+backward floor {r['floor_s']:.0f} s "
          f"(one chunk: fwd {r['t_fwd_chunk']:.2f} s, bwd {r['t_bwd_chunk']:.2f} s); "
          f"ratio {sens / max(r['floor_s'], 1e-9):.2f}x")
    print(f"blocks stopped at max_iter (not at tol): {r['blocks_at_max_iter']} of {r['blocks']}")
    if r["memory"]:
        m = r["memory"]
        print(f"memory plan ({m['method']}): {m['per_sample_bytes'] / 2**20:.0f} MiB a sample "
              f"(probe pass), intercept {m['fixed_bytes'] / 2**20:.0f} MiB, Hessian chunk "
              f"{m['hessian_chunk']}, forward chunk {m['forward_chunk']}, held at the start "
              f"{gb(m['held_bytes'])}")
    m = r["metrics"] or {}
    acc = (m.get("intervals") or {}).get("top1_agreement")
    if acc:
        print(f"top-1 agreement with FP32 {acc['value']:.3f} [{acc['low']:.3f}, "
              f"{acc['high']:.3f}] on {acc['n']} held-out samples")
    print(f"peak RSS of the job (largest stage peak) {gb(r['peak_rss'])}")
    if r["error"]:
        print(f"the job failed after its stages above: {r['error']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--memory-gb", type=float, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sampling", choices=("all", "chunk"), default=None,
                    help="hessian.sampling (default: the constraints' default)")
    ap.add_argument("--omega", choices=("trace", "diagonal"), default=None,
                    help="hessian.omega (default: the constraints' default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = child(args.child, args.samples, args.max_iter, args.memory_gb, args.device,
                  args.sampling, args.omega)
        print("RESULT " + json.dumps(r))
        return
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(a shared machine: times are as measured, not of an idle one)")
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--samples", str(args.samples),
               "--max-iter", str(args.max_iter), "--device", args.device]
        if args.memory_gb is not None:
            cmd += ["--memory-gb", str(args.memory_gb)]
        if args.sampling is not None:
            cmd += ["--sampling", args.sampling]
        if args.omega is not None:
            cmd += ["--omega", args.omega]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"\n== {name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        show(json.loads(lines[-1][len("RESULT "):]))
    print(f"\nload average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
