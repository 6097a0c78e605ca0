"""DRQ on the digits CNN: accuracy versus the fraction of regions at INT4, per candidate.

    .venv/bin/python bench/drq.py [--seeds 1] [--epochs 30] [--width 8] [--calib 256]
    .venv/bin/python bench/drq.py --low-weights [--seeds 3]

For each init seed a DigitsCNN is trained on digits 0..1399 (as in the tests), exported, and
calibrated by ``sensitivity.regions.calibrate`` on the first ``--calib`` training digits. Every
candidate (region size x target sensitive fraction, the same mode on every conv) is then run
through ``quantize.drq.apply_drq`` (weights at 8 bits, W4 at 4 bits in INT4 regions) on the 397
held-out digits. Printed per candidate: the threshold per layer, the calibrated sensitive
fraction (train part), the INT4-region fraction the runtime counted on the held-out digits, the
accuracy and its difference to the all-INT8 model (the same DRQ conv with threshold 0, i.e.
input INT8 and W8 everywhere). All-INT4 (an unreachable threshold) and FP32 are baselines.
Nothing is timed against a baseline here: the numbers are accuracies.

``--low-weights`` compares the two ways to get the insensitive regions' 4-bit weights from the
8-bit ones, on DigitsCNN and DigitsResNet (15 epochs, init seeds 0..N-1), every conv in DRQ
at 2x2 regions and f = 0.1 / 0.3 / 0.5: requantising per output channel to 4 bits (what
``quantize.drq`` does) against clipping the INT8 codes to [-7, 7] at the INT8 scale. Printed:
held-out accuracy and the mean squared error of the logits against FP32.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402

from quantize.data import CalibrationSet  # noqa: E402
from quantize.drq import apply_drq, drq_modules  # noqa: E402
from quantize.graph import find_layers  # noqa: E402
from sensitivity import zoo  # noqa: E402
from sensitivity.regions import RegionConfig, calibrate  # noqa: E402

N_TRAIN = 1400


def _run(program, layers, settings, x, y) -> tuple[float, float]:
    gm = apply_drq(program.module(), layers, settings)
    with torch.no_grad():
        acc = float((gm(x).argmax(dim=1) == y).float().mean())
    mods = drq_modules(gm).values()
    low = sum(m.int4_regions for m in mods) / max(sum(m.total_regions for m in mods), 1)
    return acc, low


def bench_seed(seed: int, args: argparse.Namespace, x, y) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = zoo.train(zoo.DigitsCNN(width=args.width), x[:N_TRAIN], y[:N_TRAIN],
                      epochs=args.epochs, seed=seed)
    t_train = time.perf_counter() - t0
    program = zoo.export(model, x[:4])
    layers = find_layers(program.module())
    xh, yh = x[N_TRAIN:], y[N_TRAIN:]
    train = CalibrationSet((x[: args.calib],), labels=y[: args.calib])
    holdout = CalibrationSet((xh,), labels=yh)
    cfg = RegionConfig(sensitive_fractions=(0.1, 0.2, 0.3, 0.4, 0.5))
    t0 = time.perf_counter()
    res = calibrate(program.module(), layers, train, holdout, cfg)
    t_cal = time.perf_counter() - t0
    first = {layer.name: layer.modes[0] for layer in res.layers}
    base = res.drq_settings(first)
    int8 = {n: dataclasses.replace(s, threshold=0) for n, s in base.items()}
    int4 = {n: dataclasses.replace(s, threshold=1 << 20) for n, s in base.items()}
    acc8, _ = _run(program, layers, int8, xh, yh)
    acc4, _ = _run(program, layers, int4, xh, yh)
    with torch.no_grad():
        acc32 = float((program.module()(xh).argmax(dim=1) == yh).float().mean())
    print(f"\nseed {seed}: width {args.width}, {args.epochs} epochs (train {t_train:.1f} s), "
          f"calibration on {len(train)} digits {t_cal:.2f} s, {len(yh)} held-out digits")
    print(f"  FP32 {acc32:.4f}   all-INT8 {acc8:.4f}   all-INT4 (W4A4) {acc4:.4f}")
    names = [layer.name for layer in res.layers]
    print(f"  {'region':>6} {'f':>4} {'thresholds':>12} {'f calib':>8} {'INT4 held-out':>13} "
          f"{'accuracy':>8} {'vs INT8':>8}")
    for size in cfg.region_sizes:
        for f in cfg.sensitive_fractions:
            try:
                choice = {layer.name: layer.mode(size, f) for layer in res.layers}
            except KeyError:
                continue
            acc, low = _run(program, layers, res.drq_settings(choice), xh, yh)
            thr = "/".join(str(choice[n].threshold) for n in names)
            fcal = sum(choice[n].fraction_calib for n in names) / len(names)
            mark = "  <- >=60% INT4, within 1 pt" if low >= 0.6 and acc >= acc8 - 0.01 else ""
            print(f"  {size}x{size:<4} {f:4.1f} {thr:>12} {fcal:8.3f} {low:13.3f} {acc:8.4f} "
                  f"{100 * (acc - acc8):+7.2f}{mark}")


def low_weights(args: argparse.Namespace, x, y) -> None:
    from quantize.primitives import quantize_weight

    xh, yh = x[N_TRAIN:], y[N_TRAIN:]
    print(f"{'model':>12} {'seed':>4} {'f':>4} {'requant acc':>11} {'mse':>8} "
          f"{'clip acc':>9} {'mse':>8}")
    for cls in (zoo.DigitsCNN, zoo.DigitsResNet):
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = zoo.train(cls(), x[:N_TRAIN], y[:N_TRAIN], epochs=15, seed=seed)
            program = zoo.export(model, x[:4])
            layers = find_layers(program.module())
            res = calibrate(program.module(), layers, CalibrationSet((x[: args.calib],)),
                            CalibrationSet((xh,)), RegionConfig())
            with torch.no_grad():
                ref = program.module()(xh)
            for f in (0.1, 0.3, 0.5):
                choice = {layer.name: layer.mode(2, f) for layer in res.layers}
                row = []
                for clip in (False, True):
                    gm = apply_drq(program.module(), layers, res.drq_settings(choice))
                    if clip:
                        for mod in drq_modules(gm).values():
                            codes, scale = quantize_weight(mod.weight_high, 8)
                            mod.weight_low = codes.clamp(-7, 7) * scale.reshape(-1, 1, 1, 1)
                    with torch.no_grad():
                        out = gm(xh)
                    row += [float((out.argmax(1) == yh).float().mean()),
                            float((out - ref).pow(2).mean())]
                print(f"{cls.__name__:>12} {seed:4d} {f:4.1f} {row[0]:11.4f} {row[1]:8.3f} "
                      f"{row[2]:9.4f} {row[3]:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="init seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--calib", type=int, default=256, help="training digits to calibrate on")
    parser.add_argument("--low-weights", action="store_true",
                        help="compare requantised against clipped 4-bit weights")
    args = parser.parse_args()
    x, y = zoo.digits_data(image_size=8, seed=0)
    if args.low_weights:
        low_weights(args, x, y)
        return
    for seed in range(args.seeds):
        bench_seed(seed, args, x, y)


if __name__ == "__main__":
    main()
