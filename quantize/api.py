"""The quantize stage's entry points: ``apply`` (plan -> checkpoint + report) and ``load``."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from solver.errors import BadModelError, BadPlanError
from solver.plan import Plan, parse_plan

from .biascorr import codes_delta, correct_biases
from .calibrate import calibrate, f32
from .checkpoint import Checkpoint, encode_weight, read_checkpoint
from .clip import ClipRatios, choose_ratios
from .config import QuantizeConfig
from .data import CalibrationSet
from .evaluate import Reference, evaluate
from .fakequant import build_fake_quant
from .fold import fold_layers
from .graph import find_layers, module_name, program_module
from .observe import ActivationStats, graph_copy, observe
from .points import Grid, find_points
from .primitives import (
    dyadic_many,
    expand_scales,
    group_dyadic,
    group_multiplier_bits,
    quantize_weight,
    weight_scales,
)
from .rows import PlanRow, match_rows

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
REPORT_VERSION = 1


@dataclass
class QuantizeResult:
    """The checkpoint's tensors and metadata, the evaluation report, and the fake-quant module."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    report: dict[str, Any]
    checkpoint: Checkpoint = field(repr=False)
    module: nn.Module | None = field(default=None, repr=False)
    # the activation statistics this call used, with what it measured added (its layer input
    # sums when it observed them, its free-point ranges): ``apply(activations=)`` of the next
    # plan of the same model and data calibrates and corrects its biases without a pass
    activations: ActivationStats | None = field(default=None, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint to ``path`` and ``report.json`` in the same directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.checkpoint.save(path)
        (path.parent / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        return path


def _layer_tensors(
    row: PlanRow,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    g_in: Grid,
    g_out: Grid,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
    low_ratio: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Quantized weight, integer bias and dyadic requantisation of one (folded) layer.

    Per channel: one multiplier ``b / 2^c`` per output channel. Per group of
    ``row.group_size`` inputs: the bias on the grid of the channel's largest group scale, and
    per-group multipliers with one shift per channel (``quantize.primitives.group_dyadic``),
    bounded so the integer sum fits int64. ``quantized``: ``quantize_weight``'s (codes, scales)
    of this weight, when computed already. A DRQ row also stores its low-bit weights' scales:
    ``low_ratio`` (the clip ratios at ``min(w_bits, low_bits)``; None: 1) x the dequantized
    weight's max|W| per channel / qmax."""
    weight = weight.detach().cpu().to(torch.float32)
    out = weight.shape[0]
    bias = torch.zeros(out) if bias is None else bias.detach().cpu().to(torch.float32)
    grouped = row.group_size is not None
    codes, s_w = quantized or quantize_weight(weight, row.w_bits, group_size=row.group_size)
    s_w = s_w.to(torch.float32)
    # scale of one accumulator unit (of the bias, for groups)
    acc_scale = (s_w.amax(dim=1) if grouped else s_w).to(torch.float64) * g_in.scale
    bias_q = torch.round(bias.to(torch.float64) / acc_scale)
    if bool((bias_q.abs() > 2**31 - 1).any()):
        raise BadModelError(
            f"layer {row.name!r}: the folded bias does not fit int32 at the accumulator scale; "
            "the layer's input range is degenerate"
        )
    if grouped:
        max_bits = group_multiplier_bits(weight[0].numel(), row.w_bits, g_in.bits,
                                         int(bias_q.abs().max()))
        b, c = group_dyadic(s_w.to(torch.float64) * g_in.scale / g_out.scale, max_bits)
    else:
        b, c = dyadic_many(acc_scale / g_out.scale)
    p = row.name + "."
    t = {
        p + "weight_q": encode_weight(codes, row.w_bits),
        p + "weight_scale": s_w,
        p + "bias": bias,
        p + "bias_q": bias_q.to(torch.int32),
        p + "input_scale": torch.tensor(g_in.scale, dtype=torch.float32),
        p + "output_scale": torch.tensor(g_out.scale, dtype=torch.float32),
        p + "requant_b": b.to(torch.int32),
        p + "requant_c": c.to(torch.int32),
    }
    if row.drq is not None:
        t[p + "drq_threshold"] = torch.tensor(row.drq.threshold, dtype=torch.int32)
        t[p + "drq_region"] = torch.tensor(list(row.drq.region), dtype=torch.int32)
        deq = codes.to(torch.float32) * expand_scales(s_w, codes)
        t[p + "drq_low_scale"] = weight_scales(deq, min(row.w_bits, row.drq.low_bits), None,
                                               low_ratio)
    return t


def _report(
    ckpt: Checkpoint,
    rows: dict[str, PlanRow],
    model_layers: int,
    metrics: dict[str, Any],
    cfg: QuantizeConfig,
    calibration_samples: int,
    drq_fractions: dict[str, float],
) -> dict[str, Any]:
    layers = []
    for name, row in rows.items():
        t = {k: v for k, v in ckpt.tensors.items() if k.startswith(name + ".")}
        params = math.prod(ckpt.weight_shape(name))
        g_in = ckpt.input_grid(name)
        layers.append({
            "name": name,
            "kind": row.kind,
            "w_bits": row.w_bits,
            "group_size": row.group_size,
            "a_bits": row.a_bits,
            "input_bits": g_in.bits,
            "input_signed": g_in.signed,
            "input_scale": g_in.scale,
            "output_scale": ckpt.output_grid(name).scale,
            "params": params,
            "weight_bytes": t[name + ".weight_q"].nbytes,
            "scale_bytes": t[name + ".weight_scale"].nbytes,
            "checkpoint_bytes": sum(v.nbytes for v in t.values()),
            "nominal_weight_bytes": math.ceil(params * row.w_bits / 8),
            "plan_size_bytes": row.size_bytes,
            "fp32_bytes": 4 * params,
            "drq": None if row.drq is None else {
                "region": list(row.drq.region),
                "threshold": row.drq.threshold,
                "planned_sensitive_fraction": row.drq.sensitive_fraction,
                "holdout_int4_fraction": drq_fractions.get(name),
            },
        })

    def total(key: str) -> float:
        return sum(layer[key] for layer in layers)

    plan_sizes = [layer["plan_size_bytes"] for layer in layers]
    weight_scale = total("weight_bytes") + total("scale_bytes")
    return {
        "version": REPORT_VERSION,
        "format": "bitplan-report/1",
        "config": cfg.to_dict(),
        "calibration_samples": calibration_samples,
        "metrics": metrics,
        "layers": layers,
        "totals": {
            "quantized_layers": len(layers),
            "float_layers": model_layers - len(layers),
            "quantized_params": total("params"),
            "weight_bytes": total("weight_bytes"),
            "scale_bytes": total("scale_bytes"),
            "checkpoint_bytes": total("checkpoint_bytes"),
            "nominal_weight_bytes": total("nominal_weight_bytes"),
            "plan_size_bytes": None if None in plan_sizes else sum(plan_sizes),
            "fp32_bytes": total("fp32_bytes"),
            "compression": total("fp32_bytes") / weight_scale if weight_scale else None,
        },
    }


def _drq_modules(module: nn.Module, rows: dict[str, PlanRow]) -> dict[str, nn.Module]:
    """The DRQ runtime module of each DRQ row, by layer name."""
    names = {module_name(n, "drq"): n for n, r in rows.items() if r.drq is not None}
    return {names[m]: sub for m, sub in module.named_modules() if m in names}


def _clip_ratio(cfg: QuantizeConfig, clip: ClipRatios | None, name: str,
                weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor | None:
    """The clip ratios of one (folded) weight at ``bits``: ``clip``'s (chosen on the unfolded
    weight; a folded BatchNorm leaves them unchanged, ``quantize.clip``), for ``"mse"`` chosen
    here when ``clip`` has none; None for ``"max"``."""
    if cfg.weight_clip == "max":
        return None
    if clip is not None and clip.mode == cfg.weight_clip and clip.has(name, bits, group_size):
        return clip.ratio(name, bits, group_size)
    if cfg.weight_clip == "mse":
        return choose_ratios(weight, bits, group_size)
    raise BadPlanError(
        f"weight_clip {cfg.weight_clip!r}: no clip ratios for layer {name!r} at {bits} bits"
        + ("" if group_size is None else f", group size {group_size}")
        + "; pass the sensitivity stage's (apply(..., clip=result.clip) of a "
        "sensitivity.measure(..., weight_clip=...) result)")


def apply(
    program: torch.export.ExportedProgram,
    plan: Plan | dict[str, Any],
    train: CalibrationSet,
    holdout: CalibrationSet | None,
    cfg: QuantizeConfig | None = None,
    batch_size: int | None = None,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
    token_input: str | int | None = None,
    activations: ActivationStats | None = None,
    reference: Reference | None = None,
    clip: ClipRatios | None = None,
) -> QuantizeResult:
    """Quantize ``program`` as ``plan`` says, calibrating on ``train``; evaluate on ``holdout``
    (None: no evaluation, the report's ``metrics`` empty, for a caller that scores the module
    itself).

    ``token_input`` names a language model's token-id input (keyword name or positional index)
    for the next-token perplexities of the report (see ``quantize.evaluate``). ``activations``:
    the layer input statistics of ``train`` (``quantize.observe``; the pipeline's, measured once
    per job); without them, ``minmax`` calibration observes them here on the unfolded program,
    the same way, so the checkpoint is the same either way. With their ``sums`` the ``weight``
    bias correction needs no pass, with their ``outputs`` for this plan's layer set (from an
    earlier call's ``QuantizeResult.activations``) the calibration needs none either.
    ``reference``: the FP32 program's outputs on ``holdout`` (``quantize.evaluate``), to
    evaluate without running it again. ``clip``: the weight scales' clip ratios of the
    sensitivity stage (``SensitivityResult.clip``), used when ``cfg.weight_clip`` is not
    ``"max"`` (``"hessian"`` needs them: BadPlanError naming the layer otherwise).

    ``batch_size`` is the program's fixed export batch size (None when the batch dimension is
    dynamic; then ``cfg.batch_size`` chunks are used). Raises BadPlanError when the plan does
    not fit the model, BadCalibrationError for unusable calibration data, BadModelError for a
    model that cannot be folded or quantized.
    """
    cfg = cfg or QuantizeConfig()
    device = device or torch.device("cpu")
    gm = program_module(program)
    layers = find_layers(gm)
    plan = parse_plan(plan)  # the one validator (solver.plan.Plan.from_dict)
    rows = match_rows(list(plan.rows), layers)
    qlayers = {layer.name: layer for layer in layers if layer.name in rows}
    if progress is not None:
        progress("quantize", 0.0)
    drq_grids = {n: Grid(f32(r.drq.scale), r.drq.high_bits, r.drq.signed)
                 for n, r in rows.items() if r.drq is not None}
    if activations is None and cfg.calibration == "minmax":  # on the unfolded program
        activations = observe(gm, list(qlayers.values()), train, batch_size or cfg.batch_size,
                              batch_size is not None, device)
    sums = {} if activations is None else activations.sums
    folded = fold_layers(gm, list(qlayers.values()))
    # the folded float model, before calibration inserts its observers (only for a
    # correction pass: "layer", or a layer without input sums)
    corrected = cfg.bias_correction != "none"
    bias_pass = corrected and (cfg.bias_correction == "layer" or any(n not in sums for n in rows))
    float_gm = graph_copy(gm, device) if bias_pass else None
    points = find_points(gm, qlayers)
    in_grids, free_grids, ranges = calibrate(
        gm, qlayers, {n: r.input_bits for n, r in rows.items()}, drq_grids, points, train, cfg,
        batch_size, device, progress, activations,
    )
    if activations is not None and cfg.calibration == "minmax":
        activations = activations.with_outputs(frozenset(qlayers), ranges)
    # each weight quantized once: its codes for the checkpoint, Q(W) - W for the correction
    weights = {n: folded[n][0].detach().cpu().to(torch.float32) for n in rows}
    quantized = {n: quantize_weight(weights[n], r.w_bits, group_size=r.group_size,
                                    ratio=_clip_ratio(cfg, clip, n, weights[n], r.w_bits,
                                                      r.group_size))
                 for n, r in rows.items()}
    low_ratios = {n: _clip_ratio(cfg, clip, n, weights[n], min(r.w_bits, r.drq.low_bits), None)
                  for n, r in rows.items() if r.drq is not None}
    if corrected:
        bc_grids = ({n: in_grids[n] for n in rows if n not in drq_grids}
                    if cfg.bias_correction == "layer" else None)
        folded.update(correct_biases(
            float_gm, qlayers, folded, {n: (r.w_bits, r.group_size) for n, r in rows.items()},
            train, batch_size or cfg.batch_size, batch_size is not None, device, bc_grids,
            sums, {n: codes_delta(weights[n], *quantized[n]) for n in rows}))
    grids = {p.node: in_grids[p.consumer] if p.consumer else free_grids[p.node] for p in points}
    layer_point = {p.layer: p for p in points if p.kind == "layer"}
    tensors: dict[str, torch.Tensor] = {}
    quant_layers: dict[str, Any] = {}
    for name, row in rows.items():
        g_in, g_out = in_grids[name], grids[layer_point[name].node]
        tensors.update(_layer_tensors(row, *folded[name], g_in, g_out, quantized[name],
                                      low_ratios.get(name)))
        quant_layers[name] = {
            "kind": row.kind,
            "w_bits": row.w_bits,
            "weight_shape": list(qlayers[name].weight_shape),
            "bn": qlayers[name].bn,
            # the model stores this weight [in, out] (GPT-2 Conv1D, x @ W); codes are [out, in]
            **({"transposed": True} if qlayers[name].transposed else {}),
            "input": g_in.to_dict(),
            "output": g_out.to_dict(),
        }
    quant = {
        "version": 1,
        "config": cfg.to_dict(),
        "layers": quant_layers,
        "points": [
            {"node": p.node, "kind": p.kind, "end": p.end, "layer": p.layer,
             "consumer": p.consumer, "final": p.final, "grid": grids[p.node].to_dict()}
            for p in points
        ],
    }
    ckpt = Checkpoint(tensors, json.loads(json.dumps(plan.to_dict())), quant)
    ckpt.validate()
    if progress is not None:
        progress("quantize", 1.0)
    qmodule = build_fake_quant(program, ckpt).to(device)
    drq_modules = _drq_modules(qmodule, rows)
    for m in drq_modules.values():
        m.reset_stats()
    fixed = batch_size is not None
    if holdout is not None and reference is not None and reference.samples != len(holdout):
        reference = None  # of another held-out set
    metrics = {} if holdout is None else evaluate(
        None if reference is not None else program_module(program).to(device), qmodule, holdout,
        batch_size or cfg.batch_size, fixed=fixed, device=device, progress=progress,
        token_input=token_input, reference=reference,
    )
    drq_fractions = {} if holdout is None else \
        {k: float(m.int4_fraction) for k, m in drq_modules.items()}
    report = _report(ckpt, rows, len(layers), metrics, cfg, len(train), drq_fractions)
    log.info("quantized %d layers; metrics %s", len(rows), metrics)
    return QuantizeResult(tensors, ckpt.metadata(), report, ckpt, qmodule, activations)


def load(checkpoint_path: str | Path, program: torch.export.ExportedProgram) -> nn.Module:
    """A runnable fake-quant module for a checkpoint written by :func:`apply`.

    Raises BadCheckpointError for a foreign, tampered or mismatched file, BadPlanError when its
    plan does not fit ``program``.
    """
    return build_fake_quant(program, read_checkpoint(checkpoint_path))
