"""``bitplan sensitivity MODEL.pt2 --calib CALIB.safetensors --out sens.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_device_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sensitivity", help="per-layer Hessian traces and Omega tables of a .pt2 model",
        description="Measure per-layer Hessian-trace sensitivity (weights and input "
        "activations) of a torch.export model on calibration data and write sens.json.",
    )
    p.add_argument("model", type=Path, help="torch.export program (.pt2)")
    p.add_argument("--calib", type=Path, required=True, help="calibration .safetensors")
    p.add_argument("--out", type=Path, required=True, help="output JSON path")
    p.add_argument("--max-iter", type=int, default=200, help="most Hutchinson samples")
    p.add_argument("--tol", type=float, default=0.05, help="target relative standard error")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vectors and split")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per forward pass (dynamic-batch models)")
    add_device_argument(p, default="cpu")
    p.add_argument("--no-activations", action="store_true",
                   help="skip the input-activation traces")
    p.set_defaults(func=run)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def run(args: argparse.Namespace) -> int:
    from sensitivity import HessianConfig, measure
    from sensitivity.intake import IntakeConfig, intake
    from service.progress import TerminalProgress
    from service.settings import resolve_device
    from solver.errors import BadConstraintsError

    try:
        cfg = HessianConfig(max_iter=args.max_iter, tol=args.tol, seed=args.seed,
                            batch_size=args.batch_size, activations=not args.no_activations)
    except ValueError as exc:
        raise BadConstraintsError(f"invalid sensitivity settings: {exc}") from None
    device = resolve_device(args.device)
    progress = TerminalProgress()
    try:
        progress("intake", 0.0)
        it = intake(args.model, args.calib, IntakeConfig(seed=args.seed))
        progress("intake", 1.0)
        result = measure(it, cfg, device, progress)
    finally:
        progress.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(result.to_json())
    print(f"{'layer':<28} {'kind':<7} {'params':>9} {'MACs':>11} {'Tr(H_w)':>10} "
          f"{'rel.se':>7} {'Tr(H_a)':>10} {'omega_w@4':>10} {'omega_a@8':>10}")
    for row in result.layers:
        rel = row.weight_trace_stderr / abs(row.weight_trace) if row.weight_trace else float("inf")
        print(f"{row.name:<28} {row.kind:<7} {row.params:>9} {row.macs:>11} "
              f"{_fmt(row.weight_trace):>10} {rel:>7.3f} {_fmt(row.activation_trace):>10} "
              f"{_fmt(row.omega_w.get(4)):>10} {_fmt(row.omega_a.get(8)):>10}")
    stuck = [r.name for r in result.layers
             if not r.weight_converged or (r.activation_trace is not None
                                           and not r.activation_converged)]
    print(f"{len(result.layers)} layers, {result.iterations} samples, {result.seconds:.1f} s"
          + (f"; not converged to tol={args.tol}: {', '.join(stuck)}" if stuck else "")
          + f" -> {args.out}")
    return 0
