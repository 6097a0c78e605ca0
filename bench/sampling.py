"""Time to the tolerance of the two Hessian sampling modes (``hessian.sampling``): ``all``
(every probe pass sees every train sample, chunk by chunk) vs ``chunk`` (each pass draws a
random chunk), on the digits ResNet-like model (8x8) and on the zoo's ResNet-18 (224x224).

    .venv/bin/python bench/sampling.py [--models digits,resnet18] [--samples 256]
        [--passes 3,12] [--draw 16] [--tol 0.05]

Each mode runs its ``--passes`` probe passes (all, chunk; ``min_iter`` / ``max_iter`` set so
that exactly that many run; 8 vectors a pass) and is timed. The time the stopping rule needs
is then predicted from the measured variance, for each block: T_tol = T * (se / mean)^2 /
tol^2 (samples needed = variance / (tol * mean)^2, at the measured time per sample), floored
at the default ``min_iter`` (10 samples: vectors for ``all``, passes for ``chunk``); the
job's is the largest over blocks (weights and input activations). A mode wins where its
predicted T_tol is lower. ResNet-18 uses random images labelled with its own top-1 (as
bench/scale.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402

from sensitivity import HessianConfig, measure, zoo  # noqa: E402
from sensitivity.intake import intake  # noqa: E402

MIN_ITER = 10  # the pipeline's default min_iter


def _inputs(name: str, samples: int, tmp: Path) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(1)
    if name == "digits":
        x, y = zoo.digits_data()
        model = zoo.train(zoo.DigitsResNet(), x[:1400], y[:1400], epochs=3, seed=0)
        x, y = x[1400:1400 + samples], y[1400:1400 + samples]
    else:
        model = zoo.reference_model(name, samples=16)
        x = torch.randn(samples, 3, 224, 224, generator=gen)
        with torch.no_grad():
            y = torch.cat([model(x[i:i + 32]).argmax(1) for i in range(0, samples, 32)])
    return (zoo.save_model(model.eval(), x[:2], tmp / "m.pt2"),
            zoo.save_calibration(tmp / "c.safetensors", x, y))


def run(name: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, calib = _inputs(name, args.samples, Path(tmp))
        it = intake(model, calib)
        n = len(it.train)
        passes = dict(zip(("all", "chunk"), map(int, args.passes.split(",")), strict=True))
        print(f"\n== {name}: {n} train samples, passes of 8 vectors, tol {args.tol}")
        for mode in ("all", "chunk"):
            k = 8
            iters = passes[mode] * k
            cfg = HessianConfig(max_iter=iters, min_iter=iters, tol=args.tol, seed=0,
                                vectors_per_pass=k, sampling=mode,
                                batch_size=args.chunk if mode == "all" else args.draw)
            t0 = time.perf_counter()
            res = measure(it, cfg)
            secs = time.perf_counter() - t0
            worst, t_tol = 0.0, 0.0
            for r in res.layers:
                for mean, se, m in [(r.weight_trace, r.weight_trace_stderr, r.weight_iterations),
                                    (r.activation_trace, r.activation_trace_stderr,
                                     r.activation_iterations)]:
                    if mean is None or mean <= 0:
                        continue
                    rel = se / mean
                    worst = max(worst, rel)
                    t_tol = max(t_tol, secs * rel**2 / args.tol**2, secs * MIN_ITER / m)
            seen = n if mode == "all" else min(args.draw, n)
            print(f"{mode:>5}: {secs:7.1f} s for {res.model['passes']} passes of {seen} "
                  f"samples; worst relative se {worst:.3f}; predicted time to tol "
                  f"{t_tol:7.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits,resnet18")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--passes", default="3,12", help="probe passes of all, chunk")
    ap.add_argument("--draw", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=32, help="chunk of an 'all' pass")
    ap.add_argument("--tol", type=float, default=0.05)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for name in args.models.split(","):
        run(name, args)
    print(f"\nload average now: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
