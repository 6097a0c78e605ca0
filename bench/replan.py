"""Re-plan against a fresh job: how long a POST /jobs/{id}/replan takes to finish compared with
the job it re-plans, on the digits CNN (or the ResNet-18-like model at 32x32).

    python bench/replan.py [--model cnn|resnet18] [--threads 1]

Runs the real service in-process (SQLite job store, the worker's run_job, the real pipeline
with the default Hessian settings): one POST /plan, then re-plans with other size limits, each
timed from submission to the end of its run. Goal ([5/8]): a re-plan finishes in under 10 % of
its parent's time. The re-plans reuse the uploads and the sensitivity; the first one with a new
limit still quantizes, evaluates and sweeps its Pareto front (its evaluated points come from the
cache when the front is the parent's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from sensitivity import zoo  # noqa: E402
from service.app import create_app  # noqa: E402
from service.core import BitplanService  # noqa: E402
from service.settings import Settings  # noqa: E402


def _model(name: str, work: Path) -> tuple[Path, Path]:
    side, channels, factory = {"cnn": (8, 1, zoo.DigitsCNN),
                               "resnet18": (32, 3, lambda: zoo.ResNet18Like(width=8))}[name]
    x, y = zoo.digits_data(image_size=side, seed=0)
    x = x.expand(-1, channels, -1, -1).contiguous()
    torch.manual_seed(0)
    model = zoo.train(factory(), x[:1400], y[:1400], epochs=5, seed=0)
    return (zoo.save_model(model, x[:4], work / "model.pt2"),
            zoo.save_calibration(work / "calib.safetensors", x[1400:], y[1400:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, calib = _model(args.model, work)
        svc = BitplanService.from_settings(Settings(data_dir=work / "data"))
        with TestClient(create_app(service=svc)) as client:
            def run(job_id: str, t0: float) -> float:
                svc.queue.run_job(job_id)
                job = svc.get(job_id)
                assert job.status == "succeeded", (job.status, job.error)
                return time.perf_counter() - t0

            cons = {"limits": {"size_ratio": 0.7}, "weight_bits": [2, 4, 8],
                    "pin": {"first": None, "last": None}}
            t0 = time.perf_counter()
            r = client.post("/plan", files={"model": model.open("rb"),
                                            "calibration": calib.open("rb")},
                            data={"constraints": json.dumps(cons)})
            parent = r.json()["job_id"]
            t_parent = run(parent, t0)
            seconds = svc.get(parent).summary["seconds"]
            print(f"{args.model}: parent job {t_parent:.2f} s "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in seconds.items())})")
            for ratio in (0.6, 0.65, 0.6):
                t0 = time.perf_counter()
                r = client.post(f"/jobs/{parent}/replan",
                                json={**cons, "limits": {"size_ratio": ratio}})
                child = r.json()["job_id"]
                t_child = run(child, t0)
                print(f"  re-plan size_ratio {ratio}: {t_child:.2f} s = "
                      f"{100 * t_child / t_parent:.1f} % of the parent (reuses "
                      f"{', '.join(r.json()['reuses'])}; goal < 10 %): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in
                                  svc.get(child).summary["seconds"].items()))
        svc.close()


if __name__ == "__main__":
    main()
