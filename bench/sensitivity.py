"""Time for per-layer Hessian traces to reach a relative standard error target on every layer:
bitplan's sweep vs a per-layer pyhessian-style loop, on a ResNet-18-like model at 32x32.

    .venv/bin/python bench/sensitivity.py [--width 8] [--samples 8] [--tol 0.05]

Random inputs and labels (timing only). The baseline runs Hutchinson separately for each layer
(v nonzero on that layer's weights only, one pyhessian ``hessian_vector_product`` over all
weights per sample, the same stopping rule and ``min_iter``), as a pyhessian ``trace()`` loop
per layer would. Both measure the same quantity, Tr of each weight block of the mean loss.
bitplan is timed twice: weights only (the baseline's target) and weights + input activations.
``--joint-hvp`` also times a plain joint HVP sweep (one HVP for all layers per sample) to show
why the output-space probes are used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# ``sensitivity`` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402
from pyhessian.utils import group_product, hessian_vector_product  # noqa: E402

from sensitivity import HessianConfig, measure, zoo  # noqa: E402
from sensitivity.hessian import (  # noqa: E402
    BlockStats,
    Prepared,
    chunk_loss,
    prepare,
    rademacher,
)
from sensitivity.intake import IntakeConfig, intake  # noqa: E402


def _graph(p: Prepared, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward + create_graph gradient of chunk i w.r.t. every weight."""
    for leaf in p.leaves.values():
        leaf.active, leaf.leaf = False, None
    with torch.enable_grad():
        loss = chunk_loss(p, i)
        inputs = list(p.weights)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    return inputs, [torch.zeros_like(x) if g is None else g
                    for g, x in zip(grads, inputs, strict=True)]


def per_layer_loop(p: Prepared, cfg: HessianConfig) -> dict[str, BlockStats]:
    """The naive baseline: pyhessian-style Hutchinson run separately for each layer's weights
    (v nonzero on that layer's block only, one full HVP per layer per sample, same stopping
    rule)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    stats = {n: BlockStats() for n in p.names}
    graphs = None
    for block, name in enumerate(p.names):
        s = stats[name]
        while s.n < cfg.max_iter:
            total = 0.0
            for c in range(len(p.chunks)):
                if graphs is None or len(p.chunks) > 1:
                    graphs = _graph(p, c)
                inputs, grads = graphs
                v = [torch.zeros_like(x) for x in inputs]
                v[block] = rademacher(inputs[block].shape, gen, inputs[block].dtype,
                                      inputs[block].device)
                hv = hessian_vector_product(grads, inputs, v)
                total += float(group_product([v[block]], [hv[block]]))
            s.samples.append(total)
            if s.n >= cfg.min_iter and s.converged(cfg.tol):
                s.converged_at = s.n
                break
    return stats


def _report(name: str, wall: float, cpu: float, rows: list[tuple[str, float, float, int]],
            tol: float) -> list[str]:
    stuck = [n for n, mean, se, _ in rows if not (mean > 0 and se <= tol * mean)]
    iters = [it for *_, it in rows]
    print(f"{name:<44} wall {wall:7.2f} s  cpu {cpu:7.2f} s  samples/block "
          f"{min(iters)}..{max(iters)}  not at tol: {len(stuck)}/{len(rows)} {stuck[:3]}")
    return stuck


class _Clock:
    """Wall and process-CPU seconds: on a shared machine the CPU time is the steadier one."""

    def __enter__(self) -> _Clock:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples (all train)")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--max-iter", type=int, default=400)
    ap.add_argument("--min-iter", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--joint-hvp", action="store_true", help="also time a joint HVP sweep")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = zoo.ResNet18Like(width=args.width)
    # n + 1 samples: intake holds at least one out, the rest is the Hessian's data
    x = torch.randn(args.samples + 1, 3, 32, 32)
    y = torch.randint(0, 10, (args.samples + 1,))
    with tempfile.TemporaryDirectory() as tmp:
        zoo.save_model(model, x[:2], Path(tmp) / "r.pt2")
        zoo.save_calibration(Path(tmp) / "c.safetensors", x, y)
        it = intake(Path(tmp) / "r.pt2", Path(tmp) / "c.safetensors",
                    IntakeConfig(holdout_fraction=1 / (args.samples + 1)))
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"ResNet18Like width={args.width} 32x32, {len(it.layers)} layers, "
          f"{sum(x.params for x in it.layers)} weights, {len(it.train)} samples, "
          f"tol={args.tol}, max_iter={args.max_iter}, threads={torch.get_num_threads()}, "
          f"device={device}")
    cfg = HessianConfig(max_iter=args.max_iter, tol=args.tol, min_iter=args.min_iter,
                        seed=args.seed)

    def bitplan(activations: bool, estimator: str = "auto",
                vectorize: bool | None = None) -> tuple[float, list[str]]:
        c = HessianConfig(**{**cfg.to_dict(), "activations": activations,
                             "estimator": estimator, "vectorize": vectorize})
        with _Clock() as clock:
            res = measure(it, c, device)
        rows = [(r.name, r.weight_trace, r.weight_trace_stderr, r.weight_iterations)
                for r in res.layers]
        if activations:
            rows += [(r.name + ":act", r.activation_trace, r.activation_trace_stderr,
                      r.activation_iterations) for r in res.layers]
        what = "weights+activations" if activations else "weights"
        label = f"bitplan {estimator} ({what})" + ("" if vectorize is None else
                                                   f" vmap={vectorize}")
        stuck = _report(label, clock.wall, clock.cpu, rows, args.tol)
        return clock, stuck

    t_w, stuck_w = bitplan(False)
    t_wa, stuck_wa = bitplan(True)
    bitplan(True, vectorize=device.type != "cuda")  # the other HVP batching mode, for the record
    if args.joint_hvp:
        bitplan(False, "hvp")

    p = prepare(it.module, [x.graph for x in it.layers], it.train, it.loss_kind,
                len(it.train), False, device)
    with _Clock() as base_clock:
        base = per_layer_loop(p, cfg)
    rows = [(n, s.mean, s.stderr, s.n) for n, s in base.items()]
    stuck_b = _report("per-layer pyhessian loop (weights)", base_clock.wall, base_clock.cpu,
                      rows, args.tol)
    for label, t in [("weights", t_w), ("bitplan doing weights+activations", t_wa)]:
        print(f"speed-up, {label}: wall {base_clock.wall / t.wall:6.1f}x   "
              f"cpu {base_clock.cpu / t.cpu:6.1f}x")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if stuck_b:
        print("note: the baseline stopped at max_iter on some layers, so its time (and the "
              "ratio) is a lower bound")
    if stuck_w or stuck_wa:
        print("note: bitplan did not reach tol on every block; see the lists above")


if __name__ == "__main__":
    main()
