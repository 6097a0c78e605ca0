"""How many calibration samples a pass may hold: a memory budget and a measured per-sample cost.

The cost is measured, not modelled: one probe pass (the same ``vectors_per_pass`` vectors, the
same estimators, activations included) runs on a chunk of ``m`` and of ``2 m`` samples, and
the peak memory above the level before the pass is read each time (the 2 m pass first):

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching
  allocator's exact peak of live tensors);
- CPU on Linux: the process's peak resident set (``VmHWM`` in ``/proc/self/status``) after
  giving free heap pages back (glibc ``malloc_trim``) and resetting the peak to the current
  RSS by writing ``5`` to ``/proc/self/clear_refs``;
- elsewhere: ``resource.getrusage`` ``ru_maxrss`` growth, which only sees a new process peak
  (a lower bound: the method is reported as ``maxrss``).

Measured after one unmeasured 1-sample pass, per-sample cost = (peak(2m) - peak(m)) / m (floored at
peak(2m) / (8 m) against a noisy difference), intercept = peak(m) - m * per-sample; both
times ``safety``. A no-grad forward is charged at least ``forward_share`` of a probe pass's
per-sample cost. A chunk of c samples then needs intercept + c * per-sample + the
accumulators of a many-chunk pass (the summed weight gradients of the output probes and the
shared weight vectors of the HVPs, k x the weights each), on top of what the process holds
already. The forward-only stages (activation statistics, regions, quantize, evaluate) get
their own chunk from one no-grad forward measured the same way.
"""

from __future__ import annotations

import ctypes
import logging
import math
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from solver.errors import ResourceLimitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryParams:
    """Tuning constants of the chunk planner."""

    probe_samples: int = 2  # m: at 1 vs 2 samples the RSS difference was lost in noise
    warmup: bool = True  # one unmeasured 1-sample pass first: one-off allocations (kernel
    # caches, thread pools) otherwise land in the first measured peak
    safety: float = 1.5  # RSS peaks of small passes vary by tens of percent between runs
    min_slope_share: float = 0.125  # per-sample cost >= this share of peak(2m) / 2m
    forward_max: int = 64  # forward-only chunks beyond this gain nothing on CPU
    forward_share: float = 0.25  # a no-grad forward's per-sample cost >= this x a probe's:
    # its RSS growth is often hidden by memory the allocator kept from the probe pass


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk sizes for one job and the figures they came from (bytes)."""

    hessian_chunk: int
    forward_chunk: int
    per_sample_bytes: int
    forward_per_sample_bytes: int
    fixed_bytes: int
    held_bytes: int
    budget_bytes: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def proc_status() -> dict[str, int]:
    """This process's ``VmHWM`` (peak resident set since the last ``reset_peak``) and
    ``VmRSS``, in bytes (Linux ``/proc/self/status``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Set ``VmHWM`` back to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def _trim() -> None:
    """Give the allocator's free heap memory back to the OS (glibc ``malloc_trim``), so the
    next pass's growth shows in the RSS instead of reusing pages an earlier pass left."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _clear_refs_works() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        reset_peak()
        return "VmHWM" in proc_status()
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter(device) as m: ...`` then ``m.peak``: bytes above the level at entry."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "cuda"
        elif _clear_refs_works():
            self.method = "vmhwm"
        else:
            self.method = "maxrss"
        self.peak = 0

    def held(self) -> int:
        """Bytes the process (CPU) or the allocator (CUDA) holds now."""
        if self.method == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if self.method == "vmhwm":
            return proc_status()["VmRSS"]
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> PeakMeter:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "vmhwm":
            _trim()
            reset_peak()
        self.start = self.held()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            top = int(torch.cuda.max_memory_allocated(self.device))
        elif self.method == "vmhwm":
            top = proc_status()["VmHWM"]
        else:
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = max(0, top - self.start)


def available_bytes(device: torch.device) -> int:
    """Memory the machine has for a job: the GPU's total memory, or MemAvailable (Linux) /
    physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_chunks(
    measure_pass: Any,
    measure_forward: Any,
    n_samples: int,
    fixed_batch: int | None,
    accumulator_bytes: int,
    budget_bytes: int,
    device: torch.device,
    params: MemoryParams | None = None,
) -> ChunkPlan:
    """Chunk sizes that keep a probe pass and a forward pass within ``budget_bytes``.

    ``measure_pass(m)`` / ``measure_forward(m)`` run one probe pass / one no-grad forward on
    the first m samples (a fixed-batch program always runs its ``fixed_batch``).
    ``accumulator_bytes``: what a many-chunk pass holds beyond a one-chunk one.
    Raises ResourceLimitError when not even one sample (or the fixed batch) fits.
    """
    params = params or MemoryParams()
    meter = PeakMeter(device)
    held = meter.held()
    if fixed_batch is not None:
        sizes = [fixed_batch]
    else:
        m = max(1, min(params.probe_samples, n_samples // 2))
        # the larger first: memory the allocator kept from the first run can hide part of the
        # second's growth, and hiding it from the smaller one errs towards a larger slope
        sizes = [2 * m, m] if 2 * m <= n_samples else [m]

    def costs(run: Any) -> tuple[float, float]:
        if params.warmup and fixed_batch is None:
            run(1)
        peaks = []
        for size in sizes:
            with PeakMeter(device) as pm:
                run(size)
            peaks.append(pm.peak)
        if len(sizes) == 1:  # no slope: charge everything per sample (conservative)
            return peaks[0] / sizes[0] * params.safety, 0.0
        slope = (peaks[0] - peaks[1]) / (sizes[0] - sizes[1])
        slope = max(slope, params.min_slope_share * peaks[0] / sizes[0])
        return slope * params.safety, max(0.0, peaks[1] - sizes[1] * slope) * params.safety

    per_sample, fixed = costs(measure_pass)
    fwd_sample, fwd_fixed = costs(measure_forward)
    fwd_sample = max(fwd_sample, params.forward_share * per_sample)
    room = budget_bytes - held - fixed
    per_chunk = fixed_batch or 1
    if room - accumulator_bytes < per_chunk * per_sample:
        what = (f"a chunk of the program's fixed batch ({fixed_batch} samples)" if fixed_batch
                else "a single calibration sample")
        raise ResourceLimitError(
            f"{what} needs about {_gib(per_chunk * per_sample + fixed + accumulator_bytes)} "
            f"for a Hessian probe pass ({_gib(per_sample)} a sample, measured) on top of the "
            f"{_gib(held)} the job holds, but the memory budget is {_gib(budget_bytes)}; raise "
            "BITPLAN_MEMORY_GB (or --memory-gb), use smaller inputs, or lower "
            "hessian.vectors_per_pass",
            detail={"per_sample_bytes": int(per_sample), "fixed_bytes": int(fixed),
                    "held_bytes": int(held), "budget_bytes": int(budget_bytes),
                    "method": meter.method},
        )
    if fixed_batch is not None:
        chunk = fwd = fixed_batch
    else:
        # A tiny model's measured per-sample cost can round to 0 bytes: count it as 1.
        usable = (room - accumulator_bytes) / max(per_sample, 1.0)
        chunk = max(1, min(n_samples, math.floor(usable)))
        if chunk >= n_samples:
            chunk = n_samples  # one chunk: no accumulators needed
        fwd_room = budget_bytes - held - fwd_fixed
        fwd = max(1, min(params.forward_max, math.floor(fwd_room / max(fwd_sample, 1.0))))
    plan = ChunkPlan(chunk, fwd, int(per_sample), int(fwd_sample), int(fixed), int(held),
                     int(budget_bytes), meter.method)
    _trim()  # what the measuring passes left in the heap would otherwise stay resident
    log.info("memory plan: %s", plan)
    return plan

