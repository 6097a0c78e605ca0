"""``sensitivity.measure`` (defined here): Hessian traces -> Omega tables -> ``SensitivityResult``.

Omega scaling (both are about twice the second-order increase of the mean calibration loss L):
- weights: ``omega_w[b] = Tr(H_w) / n * ||Q_b(W) - W||^2``, n the weight count, Q_b the
  symmetric per-output-channel quantizer. With the isotropic model H_w ~ (Tr / n) I, the loss
  increase is 1/2 dW^T H dW ~ 1/2 omega_w.
- activations: ``omega_a[a] = Tr(H_x) / numel * ||Q_a(x) - x||^2`` where x is the layer's input
  over all N train calibration samples, numel = N * per-sample size (the size of the block whose
  trace was measured), Q_a the per-tensor quantizer with the min/max scale of those samples
  (``quantize.observe.ActivationStats.grid``: the job's one range measurement, returned in
  ``SensitivityResult.activations`` for the regions and quantize stages). Tr(H_x) is the
  trace of d2L/dx2 for the mean loss L, so the same 1/2 dx^T H dx argument gives 1/2 omega_a.
With ``HessianConfig(diagonal=True)`` (``hessian.omega: diagonal``) the weight Omega drops the
isotropic model: ``omega_w[b] = sum_i H_ii * (Q_b(W)_i - W_i)^2`` with the Hutchinson diagonal
of the same probes (clamped at 0: an HVP block's noisy diagonal can sum below zero). omega_a
stays trace-based: the input-activation diagonal is per sample and element, so weighting it
would hold the whole calibration set's activations (or need the activation grids before the
Hessian passes).
BatchNorm is not folded for sensitivity: the traces are those of the weights the user trained,
and the Omega uses their quantization error; folding changes per-channel ranges, which the
quantize stage accounts for when it writes the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quantize.clip import CLIP_MODES, ClipRatios, ratios_for
from quantize.data import CalibrationSet, run_batch
from quantize.observe import ActivationStats, observe
from quantize.points import point_ends
from quantize.primitives import (
    activation_qrange,
    fake_quantize_weight,
    weight_quant_error,
)

from .hessian import HessianConfig, Prepared, ProgressFn, hutchinson, prepare
from .intake import Intake
from .meanshift import (
    ErrorMoments,
    MeanShiftParams,
    gauss_newton_kept,
    kept_from_probes,
    weight_directions,
)
from .memory import ChunkPlan, plan_chunks
from .structure import gauss_newton_exact

log = logging.getLogger(__name__)

VERSION = 4  # 4: the weight clip ratios ("clip"); 3: omega_w_kept (bias-corrected weight
# Omega); 2: the layer input statistics ("activations"); versions 1 to 3 are still read
BIAS_CORRECTIONS = ("none", "weight", "layer")  # quantize.config's, priced by measure()
WEIGHT_BITS = (2, 3, 4, 5, 6, 8)
ACTIVATION_BITS = (4, 8)


@dataclass
class LayerSensitivity:
    """One layer's traces (Tr, not divided by n), their standard errors and Omega tables."""

    name: str
    kind: str
    params: int
    macs: int
    weight_trace: float
    weight_trace_stderr: float
    activation_trace: float | None
    activation_trace_stderr: float | None
    activation_numel: int
    omega_w: dict[int, float]
    omega_a: dict[int, float]
    weight_iterations: int = 0
    activation_iterations: int = 0
    weight_converged: bool = False
    activation_converged: bool = False
    weight_estimator: str = "hvp"
    activation_estimator: str = "hvp"
    out_channels: int = 0
    bn: str | None = None
    # {group size: {bits: omega}}: weight Omega with one scale per group of inputs (added by
    # group_omegas for the constraints' weight_group_sizes; empty otherwise)
    omega_wg: dict[int, dict[int, float]] = field(default_factory=dict)
    # {bits: kept}: omega_w[bits] is the bias-corrected weight Omega, the uncorrected one times
    # this share (sensitivity/meanshift.py); empty when Omega prices the uncorrected error
    omega_w_kept: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["omega_w"] = {str(b): v for b, v in self.omega_w.items()}
        d["omega_w_kept"] = {str(b): v for b, v in self.omega_w_kept.items()}
        d["omega_a"] = {str(a): v for a, v in self.omega_a.items()}
        d["omega_wg"] = {str(g): {str(b): v for b, v in t.items()}
                         for g, t in self.omega_wg.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSensitivity:
        d = dict(d)
        d["omega_w"] = {int(b): float(v) for b, v in d["omega_w"].items()}
        d["omega_a"] = {int(a): float(v) for a, v in d["omega_a"].items()}
        d["omega_w_kept"] = {int(b): float(v) for b, v in d.get("omega_w_kept", {}).items()}
        d["omega_wg"] = {int(g): {int(b): float(v) for b, v in t.items()}
                         for g, t in d.get("omega_wg", {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class SensitivityResult:
    layers: list[LayerSensitivity]
    iterations: int
    seconds: float
    model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    # layer -> Hessian diagonal of its weight (HessianConfig.diagonal); in memory only, not in
    # the JSON (group_omegas needs it, so the pipeline fills omega_wg before caching)
    diagonals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # the layer input ranges the activation Omegas used (None: not measured); in the JSON, so a
    # cached result hands them to the later stages too
    activations: ActivationStats | None = field(default=None, repr=False, compare=False)
    # the weight scales' clip ratios every Omega used (quantize.clip; mode "max": no table),
    # per layer, width and group size; in the JSON, for the quantize stage
    clip: ClipRatios = field(default_factory=ClipRatios, repr=False, compare=False)

    def layer(self, name: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": self.version, "model": self.model,
            "layers": [layer.to_dict() for layer in self.layers],
            "iterations": self.iterations, "seconds": self.seconds, "config": self.config,
        }
        if self.activations is not None:
            d["activations"] = self.activations.to_dict()
        d["clip"] = self.clip.to_dict()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityResult:
        if d.get("version") not in (1, 2, 3, VERSION):
            raise ValueError(f"unsupported sensitivity format version {d.get('version')!r}")
        return cls(
            layers=[LayerSensitivity.from_dict(x) for x in d["layers"]],
            iterations=int(d["iterations"]), seconds=float(d["seconds"]),
            model=dict(d.get("model", {})), config=dict(d.get("config", {})),
            activations=None if d.get("activations") is None
            else ActivationStats.from_dict(d["activations"]),
            clip=ClipRatios.from_dict(d["clip"]) if "clip" in d else ClipRatios(),
        )

    @classmethod
    def from_json(cls, text: str) -> SensitivityResult:
        return cls.from_dict(json.loads(text))


def rounding_error(x: torch.Tensor, scale: float, bits: int, signed: bool) -> float:
    """``||Q_a(x) - x||^2`` for the per-tensor grid ``scale``: ``(clamp(round(x / s)) s - x)^2``
    summed, in place on one float32 copy (about half the passes over the tensor of
    ``fake_quantize_activation`` and a float64 square; torch's cascade sum keeps ~1e-7)."""
    lo, hi = activation_qrange(bits, signed)
    xf = x.detach().float()
    d = torch.round(xf / scale).clamp_(lo, hi).mul_(scale).sub_(xf)
    return float(d.square_().sum())


def activation_errors(p: Prepared, activations: ActivationStats | None,
                      bits: tuple[int, ...] = ACTIVATION_BITS,
                      also: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
                      tick: Callable[[], None] | None = None,
                      ) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
    """Per layer input: {bits: ||Q_a(x) - x||^2 summed over the calibration samples} and the
    element count, with one per-tensor scale per layer from ``activations`` (the min/max of
    those samples, ``quantize.observe``; padding rows excluded). ``also``: more observers of a
    layer's input (real rows) called in the same pass; with ``activations`` None only they
    run (the errors stay empty). ``tick()`` after each chunk."""
    also = also or {}
    if activations is None:
        bits = ()
    err = {n: dict.fromkeys(bits, 0.0) for n in p.names}
    numel = dict.fromkeys(p.names, 0)

    def run(observer_for) -> None:
        for name, leaf in p.leaves.items():
            leaf.active, leaf.observer = False, observer_for(name)
        try:
            with torch.no_grad():
                for b in p.chunks:
                    for leaf in p.leaves.values():
                        leaf.rows = b.size
                    p.module(*b.args, **b.kwargs)
                    if tick is not None:
                        tick()
        finally:
            for leaf in p.leaves.values():
                leaf.observer, leaf.rows = None, None

    scales = {n: {a: activations.grid(n, a) for a in bits} for n in p.names} if bits else {}

    def errors(name: str):
        def obs(x: torch.Tensor) -> None:
            if name in also:
                also[name](x)
            numel[name] += x.numel()
            for a in bits:
                scale, signed = scales[name][a]
                err[name][a] += rounding_error(x, scale, a, signed)
        return obs

    run(errors)
    return err, numel


def diagonal_omega(diag: torch.Tensor, weight: torch.Tensor, bits: int,
                   group_size: int | None = None, ratio: torch.Tensor | None = None) -> float:
    """``sum_i H_ii * (Q_b(W)_i - W_i)^2`` (at least 0) with the quantizer the checkpoint uses
    (``fake_quantize_weight``, per channel or per group, with the clip ``ratio``)."""
    w = weight.detach()
    err = (fake_quantize_weight(w, bits, group_size, ratio) - w).double().pow(2)
    return max(float((diag.double() * err).sum()), 0.0)


def plan_memory(intake: Intake, cfg: HessianConfig, device: torch.device,
                exact: dict[str, tuple[bool, bool]], directions: int = 0) -> ChunkPlan:
    """Chunk sizes for ``cfg.memory_budget`` from one measured probe pass (and one forward) on
    a few samples; raises ResourceLimitError when a single sample does not fit.
    ``directions``: weight-sized tensors per layer the sweep also holds (the kept shares)."""
    graphs = [layer.graph for layer in intake.layers]
    fixed = intake.batch_size is not None
    # a looped pass (the CPU's) frees each vector's gradients before the next, so its peak is
    # that of 2 vectors (docs/benchmarks.md); a vmap-batched pass holds all k at once
    batched = cfg.vectorize if cfg.vectorize is not None else device.type == "cuda"
    k = cfg.vectors_per_pass if batched else min(2, cfg.vectors_per_pass)
    probe_cfg = dataclasses.replace(cfg, max_iter=max(2, k), vectors_per_pass=k, min_iter=2,
                                    batch_size=None, memory_budget=None, sampling="all")

    def first(m: int) -> CalibrationSet:
        return intake.train.subset(torch.arange(min(m, len(intake.train))))

    def probe_pass(m: int) -> None:
        q = prepare(intake.module, graphs, first(m), intake.loss_kind, m, fixed, device)
        hutchinson(q, probe_cfg, None, "sensitivity", exact)

    def forward(m: int) -> None:
        module = intake.module if device.type == "cpu" else copy.deepcopy(intake.module).to(device)
        with torch.no_grad():
            for b in first(m).batches(m, fixed=fixed):
                run_batch(module, b.to(device))

    weights = dict(intake.module.named_parameters())
    weight_bytes = sum(weights[g.weight].numel() * weights[g.weight].element_size()
                       for g in graphs)
    # a many-chunk pass keeps k summed weight gradients (probes) and k weight vectors (HVPs)
    kinds = {exact.get(layer.name, (False, False))[0] for layer in intake.layers}
    # (the diagonal's running sums, HessianConfig.diagonal, are in the measured pass already)
    accumulators = (cfg.vectors_per_pass * len(kinds) + directions) * weight_bytes
    if device.type != "cpu":  # the sweep's chunks are copies on the device (on the CPU,
        # views of the one resident copy the held bytes already count)
        accumulators += sum(t.numel() * t.element_size() for t in
                            (*intake.train.args, *intake.train.kwargs.values()))
    return plan_chunks(probe_pass, forward, len(intake.train), intake.batch_size, accumulators,
                       int(cfg.memory_budget or 0), device)


def group_omegas(intake: Intake, result: SensitivityResult,
                 group_sizes: list[int | None]) -> SensitivityResult:
    """``result`` with ``omega_wg`` filled for every group size that fits a layer's fan-in
    (``solver.options.group_fits``): ``omega_wg[g][b] = omega_w[b] * ||Q_{b,g}(W) - W||^2 /
    ||Q_b(W) - W||^2``, i.e. ``Tr(H_w) / n * ||Q_{b,g}(W) - W||^2`` for Hessian Omegas (the same
    isotropic model with the grouped quantizer's error); measured Omegas are scaled by the same
    error ratio (the grouped quantizers are not measured separately). A layer with a Hessian
    diagonal in ``result.diagonals`` gets ``sum_i H_ii * (Q_{b,g}(W)_i - W_i)^2`` instead
    (when ``result.config["omega"]`` is ``"diagonal"``). Every quantizer has the result's
    clip ratios (``result.clip``); the grouped ones are chosen here and added to it (the
    ``"hessian"`` clip needs ``result.diagonals``: before the result is cached)."""
    from dataclasses import replace

    from solver.options import group_fits

    sizes = sorted({int(g) for g in group_sizes if g is not None})
    weights = dict(intake.module.named_parameters())
    by_name = {info.name: info for info in intake.layers}
    mode = result.clip.mode
    # the diagonal Omega (HessianConfig.diagonal; a "hessian" clip alone keeps the trace's)
    diagonal = bool(result.config.get("diagonal")) and result.config.get("omega") != "measured"
    layers = []
    added: dict[str, dict[tuple[int, int | None], torch.Tensor]] = {}
    for s in result.layers:
        weight = weights[by_name[s.name].graph.weight].detach()
        diag = result.diagonals.get(s.name)
        fan_in = weight[0].numel()
        table: dict[int, dict[int, float]] = {}
        for g in (g for g in sizes if group_fits(fan_in, g)):
            table[g] = {}
            for b, omega in s.omega_w.items():
                ratio = None
                if mode != "max" and result.clip.has(s.name, b, g):
                    ratio = result.clip.ratio(s.name, b, g)
                elif mode != "max":
                    ratio = ratios_for(mode, weight, b, g, diag)
                    added.setdefault(s.name, {})[(b, g)] = ratio
                if diag is not None and diagonal:  # (times the per-channel kept share)
                    table[g][b] = diagonal_omega(diag, weight, b, g, ratio) * \
                        s.omega_w_kept.get(b, 1.0)
                    continue
                base = weight_quant_error(weight, b, None, result.clip.ratio(s.name, b))
                grouped = weight_quant_error(weight, b, g, ratio)
                table[g][b] = omega * grouped / base if base > 0 else 0.0
        layers.append(replace(s, omega_wg=table))
    clip = result.clip.merged(ClipRatios(mode, added)) if added else result.clip
    return replace(result, layers=layers, clip=clip)


class _StageProgress:
    """The sensitivity stage's fraction: the sweep's (``sensitivity.convergence``) until it
    ends, then the passes after it (``expect(n)`` of them, one ``tick()`` each) moving it on
    from there, so the bar moves until the stage is done rather than sitting at 100 %."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress = progress
        self.fraction = 0.0
        self.base = 0.0
        self.total = 0
        self.done = 0

    def sweep(self, stage: str, fraction: float) -> None:
        if self.progress is not None and fraction < 1.0:  # the sweep's end is not the stage's
            self.fraction = max(self.fraction, fraction)
            self.progress(stage, self.fraction)

    def expect(self, n: int) -> None:
        self.base, self.total, self.done = self.fraction, int(n), 0

    def tick(self, *_: Any) -> None:
        self.done += 1
        if self.progress is not None and self.total:  # one step short of 1 until end()
            step = min(self.done, self.total) / (self.total + 1)
            self.fraction = max(self.fraction, self.base + (1.0 - self.base) * step)
            self.progress("sensitivity", self.fraction)

    def end(self) -> None:
        if self.progress is not None:
            self.progress("sensitivity", 1.0)


def measure(intake: Intake, cfg: HessianConfig | None = None, device: torch.device | str | None
            = None, progress: ProgressFn | None = None,
            activations: ActivationStats | None = None,
            bias_correction: str = "none", weight_clip: str = "max") -> SensitivityResult:
    """Per-layer Hessian traces (weights and input activations) and Omega tables.

    ``device``: where the HVPs run (default CPU). ``progress(stage, fraction)`` is called as the
    sweep proceeds. Deterministic given ``cfg.seed``. ``activations``: the layer input
    statistics of ``intake.train`` (``quantize.observe``); with ``cfg.activations`` and none
    given, they are observed here (one no-grad pass in the Hessian chunks). Either way they are
    ``result.activations``, for the later stages. ``bias_correction``: the quantizer's
    (``QuantizeConfig.bias_correction``); other than ``"none"``, each weight Omega prices the
    error left after the correction removes its mean output shift (``omega_w_kept``,
    ``sensitivity.meanshift``: the mean shifts measured in the activation-error pass, the
    Gauss-Newton probes taken from the sweep's output-probe passes, or from separate probe
    passes when the sweep has none), and the result's config records it (``model["kept_probes"]``:
    how many probes of either kind). ``weight_clip`` (``quantize.clip``): how the weight scales
    are clipped; other than ``"max"``, each layer's clip ratios per width are chosen here
    (``"hessian"``: weighted by the weight's Hessian diagonal from the same probes, which the
    sweep then also keeps, whatever ``cfg.diagonal`` says about the Omega) and every weight
    Omega (and kept share) uses them; ``result.clip`` holds them for the quantize stage. The
    ``"hessian"`` ratios exist only after the sweep, so its kept shares come from the separate
    probe passes (``meanshift.gauss_newton_kept``).
    """
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, "
                         f"got {bias_correction!r}")
    if weight_clip not in CLIP_MODES:
        raise ValueError(f"weight_clip must be one of {CLIP_MODES}, got {weight_clip!r}")
    cfg = cfg or HessianConfig()
    # the sweep's settings: the diagonal is also kept for a Hessian-weighted clip
    sweep_cfg = dataclasses.replace(cfg, diagonal=True) if weight_clip == "hessian" else cfg
    device = torch.device(device or "cpu")
    start = time.perf_counter()
    graphs = [layer.graph for layer in intake.layers]
    exact = gauss_newton_exact(intake.module, graphs, intake.loss_kind)
    if progress is not None:
        progress("sensitivity", 0.0)
    memory = None
    chunk = cfg.batch_size
    corrected = bias_correction != "none"
    if cfg.memory_budget is not None and (chunk is None or intake.batch_size is not None):
        memory = plan_memory(intake, sweep_cfg, device, exact,
                             len(WEIGHT_BITS) if corrected else 0)
        chunk = memory.hessian_chunk
    p = prepare(intake.module, graphs, intake.train, intake.loss_kind,
                intake.chunk_size(chunk), intake.batch_size is not None, device,
                shifts=corrected and weight_clip != "hessian")
    draw = None
    if cfg.sampling != "all":  # a drawing pass takes this many samples (within the budget)
        draw = intake.chunk_size(min(cfg.batch_size or cfg.draw_size, chunk or len(intake.train)))
    weights = dict(p.module.named_parameters())
    ratios: dict[str, dict[int, torch.Tensor | None]] = {}
    if weight_clip == "mse":  # (the "hessian" ratios need the sweep's diagonal: below)
        ratios = {info.name: {b: ratios_for("mse", weights[info.graph.weight], b)
                              for b in WEIGHT_BITS} for info in intake.layers}
    # the kept shares' probes: the sweep's output-probe vectors (sensitivity.meanshift), whose
    # directions are fixed before the sweep (not with a "hessian" clip: separate passes)
    directions = {info.name: weight_directions(weights[info.graph.weight], WEIGHT_BITS,
                                               ratios.get(info.name))
                  for info in intake.layers} if corrected and weight_clip != "hessian" else None
    shown = _StageProgress(progress)
    est = hutchinson(p, sweep_cfg if draw is None
                     else dataclasses.replace(sweep_cfg, batch_size=draw),
                     shown.sweep, "sensitivity", exact, directions)
    del directions
    if weight_clip == "hessian":
        ratios = {info.name: {b: ratios_for("hessian", weights[info.graph.weight], b,
                                            diag=est.weight_diag[info.name])
                              for b in WEIGHT_BITS}
                  for info in intake.layers}
    # the passes after the sweep move the fraction on, per chunk (or probe): the activation
    # statistics, the activation errors, the separate kept-share probes
    observing = cfg.activations and activations is None
    separate = corrected and (weight_clip == "hessian" or any(
        info.name not in est.shift_probes for info in intake.layers))
    shown.expect(observing * math.ceil(len(intake.train) / intake.chunk_size(chunk))
                 + (cfg.activations or corrected) * len(p.chunks)
                 + separate * MeanShiftParams().probes)
    if observing:
        for leaf in p.leaves.values():  # pass-through probes on the Hessian's model copy
            leaf.active = False
        # the free points' ranges too (quantize's minmax calibration then runs no pass),
        # located on the clean graph: the copy's probes and shift leaves would hide them
        activations = observe(p.module, graphs, intake.train, intake.chunk_size(chunk),
                              intake.batch_size is not None, device, shown.tick,
                              ends=point_ends(intake.module, graphs))
    moments: dict[str, ErrorMoments] = {}
    if bias_correction != "none":
        params = dict(p.module.named_parameters())
        # mu from the activation statistics' per-tap input sums (same train samples) where
        # they are at hand, else summed in the activation-error pass
        sums = activations.sums if activations is not None and activations.samples == len(
            intake.train) else {}
        moments = {info.name: ErrorMoments(info.graph, params[info.graph.weight], WEIGHT_BITS,
                                           sums.get(info.name), ratios.get(info.name))
                   for info in intake.layers}
    observers = {n: m for n, m in moments.items() if m.sums is None}
    a_err, a_numel = ({}, {})
    if cfg.activations or observers:
        a_err, a_numel = activation_errors(p, activations if cfg.activations else None,
                                           also=observers, tick=shown.tick)
    kept: dict[str, dict[int, float]] = {}
    if moments:  # the Gauss-Newton share of each option that the correction keeps
        means = {n: {b: mm.mean(b) for b in WEIGHT_BITS} for n, mm in moments.items()}
        kept = {n: kept_from_probes(*est.shift_probes[n], WEIGHT_BITS, means[n])
                for n in means if n in est.shift_probes and weight_clip != "hessian"}
        rest = {n: mu for n, mu in means.items() if n not in kept}
        if rest:  # an HVP-only sweep made no output probes: separate probe passes
            kept |= gauss_newton_kept(intake.module, graphs, intake.train, intake.loss_kind,
                                      rest, intake.chunk_size(chunk),
                                      intake.batch_size is not None, device, ratios=ratios,
                                      tick=shown.tick)
    shown.end()
    rows = []
    for info in intake.layers:
        w = est.weight[info.name]
        weight = dict(p.module.named_parameters())[info.graph.weight]
        n = info.params
        diag = est.weight_diag.get(info.name)
        r = ratios.get(info.name, {})
        if diag is not None and cfg.diagonal:
            omega_w = {b: diagonal_omega(diag, weight, b, None, r.get(b)) for b in WEIGHT_BITS}
        else:
            omega_w = {b: w.mean / n * weight_quant_error(weight, b, None, r.get(b))
                       for b in WEIGHT_BITS}
        if info.name in kept:
            omega_w = {b: v * kept[info.name][b] for b, v in omega_w.items()}
        a = est.activation.get(info.name)
        if a is not None:
            numel = a_numel[info.name]
            omega_a = {bits: a.mean / numel * a_err[info.name][bits] for bits in ACTIVATION_BITS}
        else:
            numel, omega_a = len(intake.train) * info.input_numel, {}
        rows.append(LayerSensitivity(
            name=info.name, kind=info.kind, params=n, macs=info.macs,
            weight_trace=w.mean, weight_trace_stderr=w.stderr, activation_trace=None if a is None
            else a.mean, activation_trace_stderr=None if a is None else a.stderr,
            activation_numel=numel, omega_w=omega_w, omega_a=omega_a,
            weight_iterations=w.n, activation_iterations=0 if a is None else a.n,
            weight_converged=w.converged(cfg.tol),
            activation_converged=False if a is None else a.converged(cfg.tol),
            weight_estimator=w.estimator, activation_estimator="" if a is None else a.estimator,
            out_channels=info.out_channels, bn=info.bn, omega_w_kept=kept.get(info.name, {}),
        ))
    seconds = time.perf_counter() - start
    model = {**intake.summary(), "device": str(device), "hvp_mode": est.method,
             "chunk": p.chunks[0].size if p.chunks else 0, "passes": est.passes,
             "sampling": est.sampling, "draw": draw if est.sampling == "chunk" else None,
             "vectors": est.iterations}
    if moments:  # how many probes the kept shares come from, and whose
        model["kept_probes"] = {"sweep": len(next(iter(est.shift_probes.values()))[0])
                                if est.shift_probes else 0,
                                "separate": MeanShiftParams().probes if rest else 0}
    if memory is not None:
        model["memory"] = memory.to_dict()
    diagonals = {name: d.detach().cpu() for name, d in est.weight_diag.items()}
    config = {**cfg.to_dict(), "bias_correction": bias_correction, "weight_clip": weight_clip}
    clip = ClipRatios(weight_clip, {n: {(b, None): t for b, t in r.items() if t is not None}
                                    for n, r in ratios.items()})
    return SensitivityResult(rows, est.iterations, seconds, model, config,
                             diagonals=diagonals, activations=activations, clip=clip)
