"""Whole-job cost on a Llama-style decoder: ``bitplan plan`` on a ~30M-parameter model (hidden
512, 8 layers, sequences of 128 tokens, 128 calibration sequences), built from a
``transformers`` config (random weights: timing and memory only), exported with a dynamic batch
and calibrated with integer token ids.

    .venv/bin/python bench/transformer.py [--hidden 512] [--layers 8] [--seq 128]
        [--samples 128] [--max-iter 200] [--group-sizes null,128,64,32] [--memory-gb G]

Prints the whole-plan time, the wall time and peak RSS of each stage (``/proc/self/clear_refs``
reset at the stage's start, ``VmHWM`` at its end), and the sensitivity stage's time per probe
pass (stage time / passes, over all chunks). The issue's goal: <= 15 minutes and <= 6 GB on
the machine it runs on. Needs the ``hf`` extra (``transformers``); the job runs in a child
process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scale import gb, stage_table  # noqa: E402


def _model(args: argparse.Namespace):
    import torch

    # one definition of the decoder and its logits wrapper: the test zoo's (tests/hf_zoo.py);
    # tests/ leaves sys.path again at once (its quantize/ folder would shadow the package)
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    sys.path.insert(0, tests)
    try:
        import hf_zoo
    finally:
        sys.path.remove(tests)

    torch.manual_seed(0)
    model = hf_zoo.llama(hidden=args.hidden, layers=args.layers, heads=args.heads,
                         kv_heads=args.kv_heads, tied=False, intermediate=args.intermediate,
                         vocab=args.vocab, positions=max(args.seq, 128))
    return hf_zoo.CausalLM(model).eval()


def child(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    from sensitivity.memory import proc_status, reset_peak
    from service.pipeline import run_pipeline
    from service.settings import memory_budget

    stages: dict[str, dict] = {}
    current: dict = {"stage": None, "t": time.perf_counter()}

    def close() -> None:
        st = current["stage"]
        if st is not None:
            s = stages.setdefault(st, {"seconds": 0.0, "peak_rss": 0})
            s["seconds"] += time.perf_counter() - current["t"]
            s["peak_rss"] = max(s["peak_rss"], proc_status()["VmHWM"])

    def progress(stage: str, fraction: float) -> None:
        if stage != current["stage"]:
            close()
            reset_peak()
            current.update(stage=stage, t=time.perf_counter())
            print(f"[{time.perf_counter() - start:7.1f} s] stage {stage}, RSS "
                  f"{proc_status()['VmRSS'] / 1e9:.2f} GB", file=sys.stderr, flush=True)

    def guard() -> None:  # a shared machine: stop before the job takes it over
        while True:
            rss = proc_status()["VmRSS"]
            if rss > args.rss_limit_gb * 1e9:
                print(f"ABORT: RSS {rss / 1e9:.2f} GB > --rss-limit-gb {args.rss_limit_gb} in "
                      f"stage {current['stage']} after {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.5)

    start = time.perf_counter()
    threading.Thread(target=guard, daemon=True).start()

    groups = [None if g == "null" else int(g) for g in args.group_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = _model(args)
        params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (args.samples, args.seq), generator=gen)
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            program = torch.export.export(model, (ids[:2],), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(Path(tmp) / "m.pt2"))
        save_file({"input.input_ids": ids.contiguous()}, str(Path(tmp) / "c.safetensors"))
        setup = time.perf_counter() - t0
        print(f"[{time.perf_counter() - start:7.1f} s] setup done ({params / 1e6:.1f}M "
              f"parameters), RSS {proc_status()['VmRSS'] / 1e9:.2f} GB", file=sys.stderr,
              flush=True)
        del model, program
        dev = torch.device("cpu")
        budget = memory_budget(args.memory_gb, dev)
        cons = {"limits": {"size_ratio": args.size_ratio}, "weight_bits": [4, 8],
                "weight_group_sizes": groups, "hessian": {"max_iter": args.max_iter}}
        reset_peak()
        t0 = time.perf_counter()
        result = run_pipeline(Path(tmp) / "m.pt2", Path(tmp) / "c.safetensors", cons,
                              Path(tmp) / "out", device=dev, progress=progress,
                              memory_budget=budget, pareto_evaluate=args.pareto_evaluate)
        close()
        total = time.perf_counter() - t0
        sens = json.loads((Path(tmp) / "out" / "sensitivity.json").read_text())
    layers = sens["layers"]
    chosen: dict[str, int] = {}
    for row in result.plan["layers"]:
        key = f"w{row['w_bits']}" + (f"g{row['group_size']}" if row.get("group_size") else "")
        chosen[key] = chosen.get(key, 0) + 1
    return {
        "params": params, "quantized_layers": len(layers), "samples": args.samples,
        "setup_s": setup, "total_s": total, "stages": stages,
        "passes": sens["model"].get("passes"), "chunk": sens["model"].get("chunk"),
        "vectors": max(r["weight_iterations"] for r in layers),
        "blocks_at_max_iter": sum(not r["weight_converged"] for r in layers),
        "chosen": chosen, "metrics": result.report.get("metrics"),
        "peak_rss": proc_status()["VmHWM"], "budget": budget,
    }


def show(r: dict, args: argparse.Namespace) -> None:
    print(f"\n== Llama-style decoder: {r['params'] / 1e6:.1f}M parameters ({r['quantized_layers']}"
          f" Linear layers), hidden {args.hidden}, {args.layers} layers, seq {args.seq}, "
          f"{r['samples']} sequences; whole plan {r['total_s']:.0f} s (setup "
          f"{r['setup_s']:.0f} s not counted), memory budget {gb(r['budget'])}")
    stage_table(r["stages"], r["total_s"])
    sens = r["stages"].get("sensitivity", {}).get("seconds", 0.0)
    passes = r["passes"] or 0
    per = f"{sens / passes:.1f} s per probe pass" if passes else "passes not reported"
    print(f"sensitivity: {passes} probe passes (chunk {r['chunk']}), {r['vectors']} vectors a "
          f"block, {per}; blocks stopped at max_iter: {r['blocks_at_max_iter']}")
    print(f"chosen weight options: {r['chosen']}")
    print(f"peak RSS of the job process {gb(r['peak_rss'])}; goal <= 15 min and <= 6 GB: "
          f"{'met' if r['total_s'] <= 900 and r['peak_rss'] <= 6e9 else 'NOT met'}")
    print(f"metrics {r['metrics']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=256, help="byte-level ids")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--size-ratio", type=float, default=0.6)
    ap.add_argument("--group-sizes", default="null,128,64,32")
    ap.add_argument("--pareto-evaluate", type=int, default=5)
    ap.add_argument("--memory-gb", type=float, default=None)
    ap.add_argument("--rss-limit-gb", type=float, default=10.0,
                    help="abort the job when its RSS passes this (shared machines)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(a shared machine: times are as measured, not of an idle one)")
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr: stage lines, live
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"failed (exit {proc.returncode}); see the lines above")
        sys.exit(1)
    show(json.loads(lines[-1][len("RESULT "):]), args)
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
