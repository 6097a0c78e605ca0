"""Cost of pricing the bias correction in ``sensitivity.measure`` (``hessian.bias_corrected``):
measure() without it, with it (kept shares from the sweep's own probe vectors), and the
separate Gauss-Newton probe passes (``meanshift.gauss_newton_kept``, 256 x 16 samples) that an
HVP-only sweep still needs, alternating in one process on one model.

    python bench/keptcost.py [--model resnet18|cnn] [--repeats 2]

The model is bench/quality.py's (trained on digits 0..999, 200 calibration digits, holdout
0.1), the Hessian settings the pipeline's defaults (sampling auto, tol 0.05, max_iter 200).
Wall times are only comparable within one run (the ratios printed are what to report).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from sensitivity import zoo  # noqa: E402
from sensitivity.engine import WEIGHT_BITS, measure  # noqa: E402
from sensitivity.hessian import HessianConfig  # noqa: E402
from sensitivity.intake import IntakeConfig, intake  # noqa: E402
from sensitivity.meanshift import gauss_newton_kept  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "cnn"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pt2, x, y = quality.trained(args.model, work)
        calib = zoo.save_calibration(work / "calib.safetensors", x[:quality.N_CALIB],
                                     y[:quality.N_CALIB])
        it = intake(pt2, calib, IntakeConfig(holdout_fraction=0.1, seed=0))
        cfg = HessianConfig(max_iter=200, tol=0.05, seed=0, min_iter=10, sampling="auto")
        times: dict[str, list[float]] = {"none": [], "weight": [], "separate": []}
        for _ in range(args.repeats):
            for mode in ("none", "weight"):
                t0 = time.perf_counter()
                res = measure(it, cfg, bias_correction=mode)
                times[mode].append(time.perf_counter() - t0)
                print(f"measure(bias_correction={mode!r}): {times[mode][-1]:.1f} s "
                      f"(passes {res.model['passes']}, vectors {res.model['vectors']}, "
                      f"sampling {res.model['sampling']}, kept probes "
                      f"{res.model.get('kept_probes')})", flush=True)
            means = {info.name: {b: torch.zeros(info.out_channels, dtype=torch.float64)
                                 for b in WEIGHT_BITS} for info in it.layers}
            t0 = time.perf_counter()
            gauss_newton_kept(it.module, [i.graph for i in it.layers], it.train, it.loss_kind,
                              means, it.chunk_size(None), it.batch_size is not None)
            times["separate"].append(time.perf_counter() - t0)
            print(f"separate probe passes (the previous kept shares): "
                  f"{times['separate'][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    before = (med["weight"] + med["separate"]) / med["none"]
    print(f"\n{args.model}, median of {args.repeats}: without {med['none']:.1f} s, with "
          f"{med['weight']:.1f} s ({med['weight'] / med['none']:.2f}x); the separate passes "
          f"{med['separate']:.1f} s (with them: {before:.2f}x)")


if __name__ == "__main__":
    main()
