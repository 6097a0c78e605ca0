"""How many calibration samples a pass may hold: a memory budget and a counted per-sample cost.

The cost is counted, not guessed from the process's resident set (whose growth over a small
pass varied 17-118 MiB between runs of the same pass: the heap keeps and reuses pages): one
probe pass (the same ``vectors_per_pass`` vectors, the same estimators, activations, the
saved tensors of the backward and the HVP's double backward included) runs on a chunk of
``2 m`` and of ``m`` samples, and the peak of live tensor bytes above the level before the
pass is taken each time:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the caching
  allocator's exact peak of live tensors);
- CPU: :class:`TensorMeter`, a ``TorchDispatchMode`` that adds the bytes of every storage an
  operator allocates (outputs that are views of, or written into, an input's storage are
  not new) and subtracts them when the storage is freed (a weak reference's callback). Torch
  has no CPU allocator peak; this counts every tensor of the pass, forward and backward
  (autograd's saved tensors are such storages), so the same pass gives the same bytes on
  any machine. Not counted: scratch buffers inside one kernel and the heap's own overhead,
  which ``safety`` and ``slack_bytes`` cover.

Per-sample cost = (peak(2m) - peak(m)) / m, intercept = peak(m) - m * per-sample; both times
``safety``. A no-grad forward is charged at least ``forward_share`` of a probe pass's
per-sample cost. A chunk of c samples then needs slack + intercept + c * per-sample + the
accumulators of a many-chunk pass (the summed weight gradients of the output probes and the
shared weight vectors of the HVPs, k x the weights each), on top of what the process holds
already (its resident set, or the CUDA allocator's live bytes); on the CPU it also holds at
most ``hessian_max_bytes`` (counted), so a budget with room to spare gives the same chunk
whatever the process holds and however many samples there are. The forward-only stages
(activation statistics, regions, quantize, evaluate) get their own chunk from one no-grad
forward counted the same way.
"""

from __future__ import annotations

import ctypes
import logging
import math
import resource
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from solver.errors import ResourceLimitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryParams:
    """Tuning constants of the chunk planner."""

    probe_samples: int = 2  # m: the slope is exact for counted bytes; small keeps it quick
    safety: float = 1.25  # resident set over counted bytes per sample was 1.09 on ResNet-18
    # (chunk 4 -> 16, docs/benchmarks.md): kernel scratch and heap fragmentation
    slack_bytes: int = 256 * 2**20  # resident set above the counted intercept (thread
    # pools, kernel caches, heap pages): 150-220 MiB on ResNet-18
    forward_max: int = 64  # forward-only chunks beyond this gain nothing on CPU
    hessian_max_bytes: int = 2**30  # CPU: a probe pass's chunk holds at most this (counted
    # bytes per sample x chunk; ResNet-18: 17 samples): its probe passes ran no faster per
    # sample at 32 than at 4-16 (docs/benchmarks.md), and below the budget the chunk, and so
    # the peak, does not depend on N
    forward_share: float = 0.25  # a no-grad forward's per-sample cost >= this x a probe's:
    # the later forward stages (fake quantization, statistics) hold more than a plain forward


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
    accumulator_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TensorMeter(TorchDispatchMode):
    """``with TensorMeter() as m: ...`` then ``m.peak``: the most bytes of tensor storage
    allocated inside the block and alive at once (``m.live``: alive now).

    Every operator call is seen (forward, backward, double backward); an output storage is
    new unless an input holds it (a view, an in-place or ``out=`` write). Its bytes count
    until the storage is freed (torch keeps one Python object per live storage, so a weak
    reference's callback fires exactly then)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, Any] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        held = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}
        for t in outs:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in held or key in self._alive:
                continue
            self._alive[key] = weakref.ref(st, lambda _r, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


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


def trim() -> None:
    """Give the allocator's free heap memory back to the OS (glibc ``malloc_trim``: every free
    page, also between live blocks), so what a finished pass freed does not stay resident
    under the next one; a no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """``with PeakMeter(device) as m: ...`` then ``m.peak``: the peak of live tensor bytes
    allocated inside the block (CUDA: the allocator's peak above its level at entry; CPU:
    :class:`TensorMeter`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda" if device.type == "cuda" else "tensors"
        self.peak = 0
        self._meter: TensorMeter | None = None

    def held(self) -> int:
        """Bytes the allocator (CUDA) or the process (CPU: its resident set) holds now."""
        if self.method == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        if sys.platform.startswith("linux"):
            try:
                return proc_status()["VmRSS"]
            except (OSError, KeyError):
                pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
            1 if sys.platform == "darwin" else 1024)

    def __enter__(self) -> PeakMeter:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.held()
        else:
            self._meter = TensorMeter().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(0, int(torch.cuda.max_memory_allocated(self.device)) - self.start)
        else:
            self._meter.__exit__(*exc)
            self.peak = self._meter.peak


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
    the first m samples (a fixed-batch program always runs its ``fixed_batch``); their tensor
    bytes are counted (:class:`PeakMeter`).
    ``accumulator_bytes``: what a many-chunk pass holds beyond a one-chunk one (and whatever
    grows with the number of samples rather than the chunk, e.g. the chunked copy of the data).
    Raises ResourceLimitError when not even one sample (or the fixed batch) fits.
    """
    params = params or MemoryParams()
    meter = PeakMeter(device)
    held = meter.held()
    if fixed_batch is not None:
        sizes = [fixed_batch]
    else:
        m = max(1, min(params.probe_samples, n_samples // 2))
        sizes = [2 * m, m] if 2 * m <= n_samples else [m]

    def costs(run: Any) -> tuple[float, float]:
        peaks = []
        for size in sizes:
            with PeakMeter(device) as pm:
                run(size)
            peaks.append(pm.peak)
        if len(sizes) == 1:  # no slope: charge everything per sample (conservative)
            return peaks[0] / sizes[0] * params.safety, 0.0
        slope = max(0.0, (peaks[0] - peaks[1]) / (sizes[0] - sizes[1]))
        return slope * params.safety, max(0.0, peaks[1] - sizes[1] * slope) * params.safety

    per_sample, fixed = costs(measure_pass)
    fwd_sample, fwd_fixed = costs(measure_forward)
    fwd_sample = max(fwd_sample, params.forward_share * per_sample)
    fixed += params.slack_bytes
    fwd_fixed += params.slack_bytes
    room = budget_bytes - held - fixed
    per_chunk = fixed_batch or 1
    if room - accumulator_bytes < per_chunk * per_sample:
        what = (f"a chunk of the program's fixed batch ({fixed_batch} samples)" if fixed_batch
                else "a single calibration sample")
        raise ResourceLimitError(
            f"{what} needs about {_gib(per_chunk * per_sample + fixed + accumulator_bytes)} "
            f"for a Hessian probe pass ({_gib(per_sample)} a sample, counted) on top of the "
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
        if device.type == "cpu":
            usable = min(usable, params.hessian_max_bytes / max(per_sample, 1.0))
        chunk = max(1, min(n_samples, math.floor(usable)))
        if chunk >= n_samples:
            chunk = n_samples  # one chunk: no accumulators needed
        fwd_room = budget_bytes - held - fwd_fixed
        fwd = max(1, min(params.forward_max, math.floor(fwd_room / max(fwd_sample, 1.0))))
    plan = ChunkPlan(chunk, fwd, int(per_sample), int(fwd_sample), int(fixed), int(held),
                     int(budget_bytes), meter.method, int(accumulator_bytes))
    trim()  # what the measuring passes left in the heap would otherwise stay resident
    log.info("memory plan: %s", plan)
    return plan

