"""``bitplan export``: an integer checkpoint + its program -> an ONNX model, checked in ONNX
Runtime against the fake-quant module when calibration samples are given."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a quantized checkpoint to ONNX (opset 21, QDQ)",
        description="Write CHECKPOINT (a bitplan .safetensors) applied to --program as an ONNX "
        "model: INT8 / INT4 weight initializers -> DequantizeLinear, activations "
        "QuantizeLinear / DequantizeLinear at the plan's bits, DRQ layers from standard "
        "operators. The model is checked with onnx.checker (full check); with --calib it also "
        "runs in ONNX Runtime on those samples against the fake-quant module and is written "
        "only if it agrees. Needs the [onnx] extra.",
    )
    p.add_argument("checkpoint", type=Path, help="bitplan checkpoint (.safetensors)")
    p.add_argument("--program", type=Path, required=True,
                   help="the torch.export program (.pt2) the checkpoint was made for")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write, e.g. model.onnx")
    p.add_argument("--calib", type=Path,
                   help="calibration .safetensors: verify in ONNX Runtime on its samples")
    p.add_argument("--samples", type=int, default=256,
                   help="samples of --calib to verify on (default 256)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from quantize.checkpoint import read_checkpoint
    from quantize.onnx import check, export_onnx, save_onnx, verify
    from sensitivity.inputs import bind_inputs
    from sensitivity.intake import load_calibration, load_program

    program = load_program(args.program)
    ckpt = read_checkpoint(args.checkpoint)
    model = export_onnx(program, ckpt)
    check(model)
    result = None
    if args.calib is not None:
        data, fixed = bind_inputs(program, program.module(), load_calibration(args.calib))
        holdout = data.subset(torch.arange(min(args.samples, len(data))))
        result = verify(program, ckpt, model, holdout, fixed_batch=fixed)
    path = save_onnx(model, args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes, opset {model.opset_import[0].version})")
    if result is not None:
        print(json.dumps({k: result[k] for k in ("samples", "top1_agreement", "p99_steps8",
                                                 "max_steps", "p99_steps")}), file=sys.stdout)
    return 0
