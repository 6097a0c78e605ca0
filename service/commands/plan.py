"""``bitplan plan``: the whole pipeline locally (sensitivity -> solve -> quantize -> evaluate),
the same function the service's worker runs, with a progress bar and a summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli import add_device_argument


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4,8, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.1,0.3, got {text!r}") from None


def _group_sizes(text: str) -> list[int | None]:
    """``none,128,64`` -> [None, 128, 64] (none / null / channel: one scale per output
    channel)."""
    out: list[int | None] = []
    for v in (v.strip() for v in text.split(",") if v.strip()):
        if v.lower() in ("none", "null", "channel"):
            out.append(None)
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected group sizes like none,128,64 (none: per output channel), got {text!r}"
            ) from None
    return out


def _pin(text: str) -> int | None:
    if text.lower() in ("none", "null", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bits or 'none', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="search a mixed-precision plan and quantize, locally",
        description="Run sensitivity -> regions -> solve -> quantize -> evaluate on one model "
        "and write plan.json, model.safetensors, model.onnx, report.json and sensitivity.json "
        "to --out. "
        "Limits: MB = 1e6 bytes, bops-g = 1e9 bit operations per sample; *-ratio limits are "
        "relative to the all-INT8 model.",
    )
    p.add_argument("model", type=Path, help="torch.export program (.pt2)")
    p.add_argument("--calib", type=Path, required=True, help="calibration .safetensors")
    p.add_argument("--eval", type=Path, default=None, dest="eval_path",
                   help="evaluation .safetensors (same format), used only to evaluate the plan "
                   "(default: the held-out share of the calibration set)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--constraints", type=Path, help="a constraints JSON file (flags override)")
    lim = p.add_argument_group("limits (at least one, here or in --constraints)")
    for flag, what in (
        ("--size-mb", "packed weights + scales, MB"),
        ("--bops-g", "giga bit-operations per sample"),
        ("--latency-ms", "latency (needs --hardware or --latency-table)"),
        ("--size-ratio", "size relative to all-INT8"),
        ("--bops-ratio", "BOPS relative to all-INT8"),
        ("--latency-ratio", "latency relative to all-INT8"),
    ):
        lim.add_argument(flag, type=float, help=what)
    p.add_argument("--weight-bits", type=_ints, help="candidate weight bits, e.g. 4,8")
    p.add_argument("--weight-group-sizes", type=_group_sizes,
                   help="candidate weight scale groups, e.g. none,128,64,32 (none: one scale "
                   "per output channel; g: one per g inputs, offered where g divides the fan-in)")
    p.add_argument("--activation-bits", type=_ints, help="candidate activation bits, e.g. 4,8")
    p.add_argument("--no-drq", action="store_true", help="no region-based activation precision")
    p.add_argument("--region-sizes", type=_ints, help="DRQ region sides, e.g. 2,4,8")
    p.add_argument("--sensitive-fractions", type=_floats, help="DRQ fractions, e.g. 0.1,0.3")
    p.add_argument("--pin-first", type=_pin, default=argparse.SUPPRESS,
                   help="bits of the first layer, or none (default 8)")
    p.add_argument("--pin-last", type=_pin, default=argparse.SUPPRESS,
                   help="bits of the last layer, or none (default 8)")
    p.add_argument("--hardware", help="hardware profile name (solver/profiles)")
    p.add_argument("--latency-table", type=Path, help="JSON {layer: {tag: ms}}")
    p.add_argument("--max-iter", type=int, help="Hutchinson samples at most")
    p.add_argument("--tol", type=float,
                   help="target relative standard error of each layer's trace (stderr / mean)")
    p.add_argument("--seed", type=int, help="seed of every random draw")
    p.add_argument("--sampling", choices=("auto", "chunk", "all"),
                   help="samples a Hessian probe pass sees: a random chunk, all, or auto "
                   "(default: chunk while it is projected to reach tol sooner)")
    p.add_argument("--omega", choices=("trace", "diagonal", "measured"),
                   help="how each option's Omega is estimated (default diagonal)")
    p.add_argument("--weight-clip", choices=("max", "mse", "hessian"),
                   help="weight scales: max|W|, the least squared error, or the least "
                   "Hessian-weighted error (default max)")
    p.add_argument("--loss", choices=("auto", "cross_entropy", "kl", "mse"),
                   help="the job's loss (default auto: cross-entropy with labels, else KL to "
                   "FP32 for logits, MSE otherwise; mse for an embedding model)")
    add_device_argument(p)
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="samples kept for eval")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory the passes may use, GB (default: BITPLAN_MEMORY_GB, else a "
                   "quarter of the available RAM / half the GPU memory)")
    p.add_argument("--json", action="store_true", help="print the job summary as JSON")
    p.set_defaults(func=run)


def constraints_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The constraints document the flags (and an optional --constraints file) describe."""
    from solver.errors import BadConstraintsError

    doc: dict[str, Any] = {}
    if args.constraints is not None:
        try:
            doc = json.loads(args.constraints.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadConstraintsError(f"cannot read {args.constraints}: {exc}") from None
        if not isinstance(doc, dict):
            raise BadConstraintsError(f"{args.constraints} must hold a JSON object")
    limits = dict(doc.get("limits") or {})
    for key in ("size_mb", "bops_g", "latency_ms", "size_ratio", "bops_ratio", "latency_ratio"):
        value = getattr(args, key)
        if value is not None:
            limits[key] = value
    doc["limits"] = limits
    for key in ("weight_bits", "weight_group_sizes", "activation_bits", "hardware"):
        if getattr(args, key) is not None:
            doc[key] = getattr(args, key)
    if args.latency_table is not None:
        try:
            doc["latency_table"] = json.loads(args.latency_table.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadConstraintsError(f"cannot read {args.latency_table}: {exc}") from None
        table = doc["latency_table"]
        if isinstance(table, dict) and table.get("format") == "bitplan-latency/1":
            doc["latency_table"] = table.get("latency_table")  # a `bitplan profile` file
    drq = dict(doc.get("drq") or {})
    if args.no_drq:
        drq["enabled"] = False
    if args.region_sizes is not None:
        drq["region_sizes"] = args.region_sizes
    if args.sensitive_fractions is not None:
        drq["sensitive_fractions"] = args.sensitive_fractions
    if drq:
        doc["drq"] = drq
    pin = dict(doc.get("pin") or {})
    for key in ("first", "last"):
        # SUPPRESS default: the attribute exists only when the flag was given ("none" -> None)
        if hasattr(args, f"pin_{key}"):
            pin[key] = getattr(args, f"pin_{key}")
    if pin:
        doc["pin"] = pin
    hessian = dict(doc.get("hessian") or {})
    for key in ("max_iter", "tol", "seed", "sampling", "omega"):
        if getattr(args, key) is not None:
            hessian[key] = getattr(args, key)
    if hessian:
        doc["hessian"] = hessian
    if args.weight_clip is not None:
        doc["quantize"] = {**(doc.get("quantize") or {}), "weight_clip": args.weight_clip}
    if args.loss is not None:
        doc["loss"] = args.loss
    return doc


def _human(key: str, value: float) -> str:
    if key == "latency_ms":
        return f"{value:.4g} ms"
    unit = "B" if key == "size_bytes" else "BOPs"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def format_summary(plan: dict[str, Any], report: dict[str, Any]) -> str:
    """A few lines for the terminal: status, totals vs limits, bits per layer, accuracy."""
    from sensitivity.convergence import convergence_line

    lines = [f"plan: {plan['status']} (objective {plan['objective']:.4g})"]
    for key in ("size_bytes", "bops", "latency_ms"):
        total, limit = plan["totals"].get(key), plan["limits"].get(key)
        if total is None:
            continue
        bound = f" <= {_human(key, limit)}" if limit is not None else ""
        binding = " (binding)" if key in plan.get("binding", []) else ""
        lines.append(f"  {key:<11} {_human(key, total)}{bound}{binding}")
    grouped = any(row.get("group_size") for row in plan["layers"])
    lines.append("  layer                          w  " + ("group   " if grouped else "")
                 + "a     drq")
    for row in plan["layers"]:
        drq = row.get("drq")
        drq_text = f"{drq['region'][0]}x{drq['region'][1]} f={drq['sensitive_fraction']:.2f}" \
            if drq else "-"
        group = f"{row.get('group_size') or 'channel':<8}" if grouped else ""
        lines.append(f"  {row['name']:<30} {row['w_bits']}  {group}{row['a_bits']:<5g} "
                     f"{drq_text}")
    m = report.get("metrics", {})
    ci = m.get("intervals") or {}

    def with_ci(key: str) -> str:
        c = ci.get(key)
        text = f"{m[key]:.4f}"
        return text if not c else f"{text} [{c['low']:.4f}, {c['high']:.4f}]"

    if m.get("fp32_accuracy") is not None:
        lines.append(
            f"accuracy on {m['samples']} held-out samples (95 % interval): fp32 "
            f"{with_ci('fp32_accuracy')}, quantized {with_ci('quant_accuracy')}"
        )
    if m.get("top1_agreement") is not None:
        lines.append(f"top-1 agreement with fp32: {with_ci('top1_agreement')}")
    if m.get("resolution"):
        lines.append(m["resolution"])
    stuck = convergence_line(report.get("sensitivity"))
    if stuck:
        lines.append(stuck)
    ox = report.get("onnx")
    if ox and ox.get("exported"):
        lines.append(f"model.onnx: ONNX Runtime vs fake-quant top-1 agreement "
                     f"{ox['top1_agreement']:.4f}, 99 % of outputs within "
                     f"{ox['p99_steps8']:.2f} steps of an 8-bit output grid")
    elif ox:
        lines.append(f"no model.onnx: {ox['error']['message']}")
    if m.get("fp32_perplexity") is not None:
        lines.append(f"perplexity on {m['samples']} held-out sequences: fp32 "
                     f"{m['fp32_perplexity']:.3f}, quantized {m['quant_perplexity']:.3f}")
    if m.get("cosine_mean") is not None:
        lines.append(f"mean cosine similarity to the fp32 outputs: {m['cosine_mean']:.4f}")
    lines.extend(float_params_lines(plan))
    return "\n".join(lines)


def float_params_lines(plan: dict[str, Any]) -> list[str]:
    """One line naming the parameter tensors the plan leaves in floating point, if any."""
    floats = (plan.get("model") or {}).get("float_params") or []
    if not floats:
        return []
    share = sum(float(f.get("share", 0.0)) for f in floats)
    named = ", ".join(f"{f['name']} ({f.get('op')}, {100 * float(f.get('share', 0.0)):.1f} %)"
                      for f in floats[:4])
    more = f" and {len(floats) - 4} more" if len(floats) > 4 else ""
    return [f"{100 * share:.1f} % of the parameters stay in floating point (bitplan does not "
            f"quantize them): {named}{more}"]


def run(args: argparse.Namespace) -> int:
    from solver.errors import InfeasibleError

    from ..constraints import parse_constraints
    from ..pipeline import run_pipeline
    from ..progress import TerminalProgress
    from ..settings import memory_budget, resolve_device

    constraints = parse_constraints(constraints_from_args(args))
    device = resolve_device(args.device)
    bar = TerminalProgress()
    try:
        result = run_pipeline(
            args.model,
            args.calib,
            constraints,
            args.out,
            device=device,
            progress=bar,
            holdout_fraction=args.holdout_fraction,
            eval_path=args.eval_path,
            memory_budget=memory_budget(args.memory_gb if args.memory_gb is not None
                                        else _settings_memory_gb(), device),
        )
    except InfeasibleError as exc:
        bar.close()
        print(f"bitplan: infeasible: {exc.message}", file=sys.stderr)
        print(f"bitplan: the diagnosis is in {args.out / 'plan.json'}", file=sys.stderr)
        return 3
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print(format_summary(result.plan, result.report))
        paths = (result.plan_path, result.checkpoint_path, result.report_path,
                 result.sensitivity_path)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _settings_memory_gb() -> float | None:
    """BITPLAN_MEMORY_GB when set (the other settings do not concern a local run)."""
    import os

    value = os.environ.get("BITPLAN_MEMORY_GB")
    return float(value) if value else None
