"""``bitplan profile``: measure every quantizable layer's latency per option in ONNX Runtime and
write a ``latency_table`` the constraints accept."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure per-layer latency per option in ONNX Runtime (a latency_table)",
        description="Time every quantizable layer of MODEL.pt2 for every (weight bits, "
        "activation bits) option with --batch samples, the median of --repeat runs after "
        "--warmup: by default inside the whole exported model (one model per option, ONNX "
        "Runtime's per-node profile, the glue between layers spread over them), or with "
        "--method isolated each layer alone as the QDQ subgraph `bitplan export` writes for "
        "it. Writes {format, version, method, runtime, cpu, config, input_shapes, "
        "latency_table, ...}; "
        "pass the file's latency_table as the constraints' latency_table "
        "(`bitplan plan --latency-table` reads the file as it is). Needs the [onnx] extra.",
    )
    p.add_argument("model", type=Path, help="torch.export program (.pt2)")
    p.add_argument("--runtime", choices=("onnxruntime",), default="onnxruntime",
                   help="the runtime to measure (ONNX Runtime CPU)")
    p.add_argument("--batch", type=int, default=1, help="samples per run (default 1)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--weight-bits", type=_ints, default=(4, 8), help="e.g. 2,4,8")
    p.add_argument("--activation-bits", type=_ints, default=(8,), help="e.g. 4,8")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--repeat", type=int, default=30, help="timed runs (default 30)")
    p.add_argument("--drq-regions", type=_ints, default=(),
                   help="also time each conv layer's DRQ subgraph at these square region "
                   "sizes, e.g. 2,4,8 (tags w<w>drq<k>x<k>)")
    p.add_argument("--group-sizes", type=_ints, default=(),
                   help="also time per-group weight options with these group sizes, e.g. 32,64 "
                   "(tags w<w>g<g>a<a>; for the layers whose fan-in the size divides)")
    p.add_argument("--method", choices=("context", "isolated"), default="context",
                   help="time layers inside the whole model (default) or each alone")
    p.add_argument("--out", type=Path, required=True, help="latency.json to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantize.onnx.profile import ProfileConfig, profile
    from sensitivity.intake import load_program

    from ..progress import TerminalProgress

    cfg = ProfileConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                        batch=args.batch, threads=args.threads, warmup=args.warmup,
                        repeat=args.repeat, method=args.method,
                        drq_regions=args.drq_regions, group_sizes=args.group_sizes)
    program = load_program(args.model)
    bar = TerminalProgress()
    try:
        result = profile(program, cfg, progress=bar)
    finally:
        bar.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = result["latency_table"]
    tags = list(dict.fromkeys(t for row in table.values() for t in row if "drq" not in t))
    # a layer without a grouped tag (the group does not fit it) runs per channel there
    total = {tag: sum(row.get(tag, row.get(re.sub(r"g\d+", "", tag), 0.0))
                      for row in table.values()) for tag in tags}
    print(f"wrote {args.out}: {len(table)} layers, batch {cfg.batch}, {cfg.threads} thread(s), "
          f"{result['runtime']} on {result['cpu']}")
    print("sum of layer latencies (ms): " + ", ".join(f"{k} {v:.4g}" for k, v in total.items()))
    return 0
