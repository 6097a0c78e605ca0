"""``bitplan quantize``: apply a plan to a model and write the integer checkpoint + report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import add_device_argument

# quantize.config's CALIBRATION_METHODS and BIAS_CORRECTIONS (spelled out: the CLI imports no
# torch until a command runs; tests/service/test_quantize_command.py keeps them equal)
CALIBRATIONS = ("minmax", "percentile", "mse")
BIAS_CORRECTIONS = ("none", "weight", "layer")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="apply a precision plan: integer checkpoint + evaluation report",
        description="Quantize MODEL.pt2 as plan.json says, calibrating activation ranges on "
        "part of the calibration file and evaluating on the rest. Writes the .safetensors "
        "checkpoint (format bitplan-qckpt/1) and report.json beside it.",
    )
    p.add_argument("model", help="torch.export program (.pt2)")
    p.add_argument("--plan", required=True, help="plan.json (version 1) from `bitplan solve`")
    p.add_argument("--calib", required=True, help="calibration .safetensors (inputs[, labels])")
    p.add_argument("--out", required=True, help="checkpoint path, e.g. model.safetensors")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="share of calibration samples kept for evaluation (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration split")
    p.add_argument("--calibration", choices=CALIBRATIONS, default="minmax",
                   help="activation range estimator: observed min/max, percentiles, or the "
                   "clipped range with the least squared error at the tensor's bits "
                   "(default minmax)")
    p.add_argument("--percentile", type=float, default=99.99,
                   help="upper percentile for --calibration percentile (default 99.99)")
    p.add_argument("--out-bits", type=int, default=8,
                   help="bits of materialised tensors no quantized layer reads (default 8)")
    p.add_argument("--final-bits", type=int, default=16,
                   help="bits of quantized layer outputs that are model outputs (default 16)")
    p.add_argument("--bias-correction", choices=BIAS_CORRECTIONS, default=None,
                   help="store each quantized layer's bias minus the mean output shift of its "
                   "weight error ('weight'), of its weight error and input rounding ('layer'), "
                   "or not ('none'); default: the library's (QuantizeConfig, 'weight')")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per forward pass when the batch dimension is dynamic")
    add_device_argument(p)
    p.set_defaults(func=run)


def _read_plan(path: Path) -> dict:
    from solver.errors import BadPlanError
    from solver.plan import load_plan

    if not path.is_file():
        raise BadPlanError(f"plan file {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadPlanError(f"{path} is not valid JSON ({exc})") from exc
    return load_plan(obj)


def run(args: argparse.Namespace) -> int:
    import quantize
    from sensitivity.intake import IntakeConfig, intake
    from solver.errors import BadConstraintsError

    from ..progress import TerminalProgress
    from ..settings import resolve_device

    if not 0.0 < args.holdout_fraction < 1.0:
        raise BadConstraintsError("--holdout-fraction must be in (0, 1)")
    extra = {} if args.bias_correction is None else {"bias_correction": args.bias_correction}
    cfg = quantize.QuantizeConfig(
        calibration=args.calibration, percentile=args.percentile, out_bits=args.out_bits,
        final_bits=args.final_bits, batch_size=args.batch_size, **extra,
    )
    plan = _read_plan(Path(args.plan))
    data = intake(args.model, args.calib,
                  IntakeConfig(holdout_fraction=args.holdout_fraction, seed=args.seed))
    progress = TerminalProgress()
    try:
        result = quantize.apply(
            data.program, plan, data.train, data.holdout, cfg, batch_size=data.batch_size,
            device=resolve_device(args.device), progress=progress,
        )
    finally:
        progress.close()
    out = result.save(args.out)
    m, totals = result.report["metrics"], result.report["totals"]
    print(f"wrote {out} ({out.stat().st_size} bytes) and {out.parent / 'report.json'}")
    print(f"  layers quantized: {totals['quantized_layers']} (float: {totals['float_layers']}), "
          f"weights+scales {totals['weight_bytes'] + totals['scale_bytes']} bytes, "
          f"{totals['compression']:.2f}x smaller than fp32")
    if m["fp32_accuracy"] is not None:
        print(f"  accuracy on {m['samples']} held-out samples: fp32 {m['fp32_accuracy']:.4f}, "
              f"quantized {m['quant_accuracy']:.4f}")
    sqnr = "exact" if m["sqnr_db"] is None else f"{m['sqnr_db']:.2f} dB"
    print(f"  top-1 agreement {m['top1_agreement']:.4f}, mean KL {m['kl_mean']:.3g}, "
          f"SQNR {sqnr}")
    return 0
