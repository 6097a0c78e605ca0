"""The pipeline shared by the worker and ``bitplan plan``: model + calibration + constraints in,
plan / checkpoint / report (and the sensitivity table) out.

Stages (the names given to ``progress``): ``intake`` -> ``sensitivity`` -> ``regions`` (DRQ,
only when the constraints allow activations below 8 bits and DRQ is enabled) -> ``solve``
(options, ILP, plan) -> ``quantize`` -> ``evaluate`` -> ``export`` (``model.onnx``, checked in
ONNX Runtime). ``should_cancel`` is polled at every
progress point; when it turns true the pipeline raises ``CancelledError`` from inside the stage
that reported.

An infeasible problem is a result of the solver, not a crash: ``plan.json`` is still written
(status ``infeasible`` with the diagnosis) and ``InfeasibleError`` carries the diagnosis as
``detail``, so the job fails with code ``infeasible`` and the user sees what is reachable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sensitivity.memory import trim
from solver.errors import CancelledError, InfeasibleError

from .cache import StageCache, evaluation_key, file_digest, regions_key, sensitivity_key
from .constraints import Constraints, parse_constraints
from .errors import storage_error
from .loaded import LoadedModels
from .loaded import load_key as loaded_key
from .progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

STAGES = ("intake", "sensitivity", "regions", "solve", "quantize", "evaluate", "export")
PLAN_FILE, CHECKPOINT_FILE, REPORT_FILE = "plan.json", "model.safetensors", "report.json"
ONNX_FILE = "model.onnx"
LATENCY_FILE = "latency.json"  # hardware onnxruntime-cpu: the measured per-layer latencies
PARETO_EVAL_SAMPLES = 32  # held-out samples a Pareto point is evaluated on (bounds evaluate's
# share of a large job; docs/benchmarks.md)
PARETO_FILE, PLOTS_DIR = "pareto.json", "plots"
SENSITIVITY_FILE, REGIONS_FILE, PROBLEM_FILE, SOLUTION_FILE = (
    "sensitivity.json",
    "regions.json",
    "problem.json",
    "solution.json",
)


def never_cancel() -> bool:
    return False


@dataclass
class PipelineResult:
    """What a pipeline run wrote (paths under ``out_dir``) and the plan / report it produced."""

    out_dir: Path
    plan: dict[str, Any]
    report: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # cached stages, and "loaded model"

    @property
    def plan_path(self) -> Path:
        return self.out_dir / PLAN_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    @property
    def report_path(self) -> Path:
        return self.out_dir / REPORT_FILE

    @property
    def sensitivity_path(self) -> Path:
        return self.out_dir / SENSITIVITY_FILE

    def summary(self) -> dict[str, Any]:
        """The short version kept on the job record (totals vs limits, bits, accuracy)."""
        bits: dict[str, int] = {}
        for row in self.plan.get("layers", []):
            group = f"g{row['group_size']}" if row.get("group_size") else ""
            key = f"w{row['w_bits']}{group}a{row['a_bits']:g}" + ("+drq" if row.get("drq") else "")
            bits[key] = bits.get(key, 0) + 1
        return {
            "status": self.plan.get("status"),
            "totals": self.plan.get("totals"),
            "limits": self.plan.get("limits"),
            "binding": self.plan.get("binding"),
            "layers": bits,
            "metrics": self.report.get("metrics"),
            "checkpoint_bytes": self.checkpoint_path.stat().st_size
            if self.checkpoint_path.is_file()
            else None,
            "seconds": self.seconds,
            "reused": self.reused,
        }


class _Guard:
    """Wraps the progress callback: raises CancelledError when asked to, reports only the six
    stage names (a package's own sub-stage, e.g. quantize's ``calibrate``, counts as the stage
    it runs in), keeps each stage's fraction non-decreasing and records stage times."""

    def __init__(self, progress: ProgressFn, should_cancel: Callable[[], bool]) -> None:
        self.progress = progress
        self.should_cancel = should_cancel
        self.seconds: dict[str, float] = {}
        self._stage: str | None = None
        self._fraction = 0.0
        self._t0 = time.perf_counter()

    def check(self) -> None:
        if self.should_cancel():
            raise CancelledError("the job was cancelled")

    def __call__(self, stage: str, fraction: float) -> None:
        self.check()
        if stage not in STAGES:
            stage = self._stage or STAGES[0]
        fraction = min(max(float(fraction), 0.0), 1.0)
        if stage != self._stage:
            # what the finished stage freed leaves the heap: the next starts from the job's
            # live data, not from the last stage's high-water mark
            trim()
            now = time.perf_counter()
            if self._stage is not None:
                self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._t0
            self._stage, self._t0, self._fraction = stage, now, fraction
        else:
            self._fraction = max(self._fraction, fraction)
        self.progress(stage, self._fraction)

    def finish(self) -> None:
        if self._stage is not None:
            now = time.perf_counter()
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._t0
            self._stage = None


def shared_input_ties(module: torch.fx.GraphModule, layers: Sequence[Any]) -> list[tuple[str, str]]:
    """Pairs of layers that read the same input tensor: they must share one activation
    quantizer, hence one precision choice (e.g. a residual block's conv1 and its 1x1
    downsample; q/k/v projections). ``layers`` are intake ``LayerInfo`` rows (with
    ``.graph.node``). Reshapes are looked through: GPT-2's Conv1D layers each read their own
    ``view`` of the same tensor."""
    nodes = {n.name: n for n in module.graph.nodes}
    by_input: dict[str, list[str]] = {}
    for layer in layers:
        node = nodes.get(layer.graph.node)
        if node is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        while (src.op == "call_function" and src.args and isinstance(src.args[0], torch.fx.Node)
               and getattr(src.target, "_opname", None) in ("view", "reshape", "_unsafe_view")):
            src = src.args[0]
        by_input.setdefault(src.name, []).append(layer.name)
    ties = []
    for names in by_input.values():
        ties.extend((names[0], other) for other in names[1:])
    return ties


def model_summary(program: torch.export.ExportedProgram, layers: Sequence[Any],
                  float_params: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The plan's ``model`` block: layer count, parameters (all / in quantized layers), MACs,
    and the parameter-heavy tensors that stay in floating point (``float_params``, from the
    intake: embeddings by design, and any op bitplan cannot quantize)."""
    total = sum(int(p.numel()) for p in program.state_dict.values() if p.is_floating_point())
    quantized = sum(int(layer.params) for layer in layers)
    return {
        "layers": len(layers),
        "params": total,
        "macs": sum(int(layer.macs) for layer in layers),
        "quantized_params": quantized,
        "other_params": max(total - quantized, 0),
        "float_params": [dict(f) for f in float_params],
    }


def _layer_specs(
    intake: Any, sens: Any, regions: Any | None
) -> list[Any]:
    from solver.options import ActivationMode, LayerSpec

    by_name = {s.name: s for s in sens.layers}
    specs = []
    for layer in intake.layers:
        s = by_name[layer.name]
        modes = []
        if regions is not None:
            try:
                calibrated = regions.layer(layer.name)
            except KeyError:
                calibrated = None
            if calibrated is not None:
                modes = [
                    ActivationMode(
                        m.tag, float(m.expected_bits), float(m.omega), calibrated.drq_dict(m)
                    )
                    for m in calibrated.modes
                ]
        specs.append(
            LayerSpec(
                name=layer.name,
                kind=layer.kind,
                params=int(layer.params),
                macs=int(layer.macs),
                out_channels=int(layer.out_channels),
                input_numel=int(layer.input_numel),
                omega_w={int(b): float(v) for b, v in s.omega_w.items()},
                omega_a={int(b): float(v) for b, v in s.omega_a.items()},
                omega_wg={int(g): {int(b): float(v) for b, v in t.items()}
                          for g, t in s.omega_wg.items()},
                activation_modes=modes,
                weight_trace=float(s.weight_trace) if s.weight_trace is not None else None,
            )
        )
    return specs


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole or not at all (a temporary name beside it, then ``os.replace``), so
    no half-written artifact is ever served; a full disk is a StorageError."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(exc, path.name) or exc from None


def _save_checkpoint(result: Any, out: Path) -> None:
    """``model.safetensors`` and ``report.json``, written to ``out/.partial`` then moved in."""
    partial = out / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        result.save(partial / CHECKPOINT_FILE)  # writes report.json beside it
        for name in (REPORT_FILE, CHECKPOINT_FILE):
            os.replace(partial / name, out / name)
    except Exception as exc:
        typed = storage_error(exc, CHECKPOINT_FILE)
        if typed is None:
            raise
        raise typed from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _diagnosis_text(diagnosis: Mapping[str, Any] | None) -> str:
    if not diagnosis:
        return "no precision assignment meets the limits"
    message = diagnosis.get("message")
    if isinstance(message, str) and message:
        return message
    return "no precision assignment meets the limits: " + json.dumps(diagnosis, default=str)


def run_pipeline(
    model_path: str | Path,
    calib_path: str | Path,
    constraints: Constraints | Mapping[str, Any] | str,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    progress: ProgressFn = no_progress,
    should_cancel: Callable[[], bool] = never_cancel,
    holdout_fraction: float = 0.2,
    pareto_points: int = 20,
    pareto_evaluate: int = 5,
    cache: StageCache | None = None,
    memory_budget: int | None = None,
    eval_path: str | Path | None = None,
    plots: bool = True,
    loaded: LoadedModels | None = None,
) -> PipelineResult:
    """Run every stage and write ``plan.json``, ``model.safetensors``, ``report.json``,
    ``sensitivity.json`` (plus ``problem.json`` / ``solution.json``, and ``regions.json`` with
    DRQ) into ``out_dir``.

    Raises BadModelError / BadCalibrationError / BadConstraintsError for unusable inputs,
    InfeasibleError (detail: the solver's diagnosis) when no plan meets the limits,
    CancelledError when ``should_cancel()`` turns true. Also writes ``pareto.json`` and
    ``plots/`` (``pareto_points`` per front, ``pareto_evaluate`` of them evaluated; 0 points:
    no fronts, the bits plot only; ``plots=False``: no ``plots/``, the service draws each file
    on its first request, see ``service.plots.ensure``). With a ``cache``, the sensitivity and
    DRQ regions of the same model bytes, calibration bytes and settings are reused
    (``PipelineResult.reused``). With ``loaded``, a model the previous job loaded from the same
    files is taken from it instead of loaded again, and this job's is kept there when it
    succeeds (``service.loaded``).
    """
    from sensitivity.convergence import convergence_summary
    from sensitivity.intake import IntakeConfig
    from solver import SolveConfig, build_problem, make_plan, solve
    from solver.options import OptionsConfig, reference_totals

    from .validation import checked_intake

    if not isinstance(constraints, Constraints):
        constraints = parse_constraints(
            dict(constraints) if isinstance(constraints, Mapping) else constraints
        )
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tick = _Guard(progress, should_cancel)
    reused: list[str] = []

    # 1. intake
    tick("intake", 0.0)
    # stream: the float inputs stay in the calibration file, each stage reads its chunks
    intake_cfg = IntakeConfig(holdout_fraction=holdout_fraction, seed=constraints.hessian.seed,
                              stream=True, loss=constraints.loss)
    load_key = None if loaded is None else loaded_key(model_path, calib_path, intake_cfg)
    pristine = None if loaded is None else loaded.take(load_key)  # the last job's, same files
    if pristine is not None:
        reused.append("loaded model")
    else:
        # the upload's model is loaded here first: failures are typed
        pristine = checked_intake(model_path, calib_path, intake_cfg)
    intake = dataclasses.replace(pristine)  # this job's view (it may rebind the holdout)
    evaluation = None if eval_path is None else _load_evaluation(intake, eval_path)
    tick("intake", 1.0)

    # 2. sensitivity (reused from the cache when the same inputs and settings were measured)
    cache = cache or StageCache(None)
    sens_key = sensitivity_key(model_path, calib_path, constraints, holdout_fraction)
    sens = _cached_sensitivity(cache.get("sensitivity", sens_key))
    if sens is not None:
        reused.append("sensitivity")
    else:
        sens = _measure(intake, constraints, device, tick, memory_budget)  # + activations
        if constraints.hessian.omega == "measured":
            sens = _measured_omegas(intake, sens, constraints, device, tick)
        if _groups_need_diagonal(constraints):  # needs the in-memory diagonals
            sens = _group_omegas(intake, sens, constraints)
        cache.put("sensitivity", sens_key, sens.to_json())
    if not _groups_need_diagonal(constraints):  # else omega_wg cached with the rest
        sens = _group_omegas(intake, sens, constraints)
    _write_atomic(out / SENSITIVITY_FILE, sens.to_json())
    # the layer input ranges, measured once (with the sensitivity, cached with it) and handed
    # to regions and quantize, so every stage uses the same activation grids, with the layer
    # input sums (bias correction without a pass); a result cached without sums observes again
    activations = sens.activations
    if activations is None or any(layer.name not in activations.sums for layer in intake.layers):
        activations = _observe(intake, sens, device)
    tick("sensitivity", 1.0)

    # 3. regions (DRQ)
    regions = None
    if constraints.uses_drq:
        r_key = regions_key(model_path, calib_path, constraints, sens_key)
        regions = _cached_regions(cache.get("regions", r_key))
        if regions is not None:
            reused.append("regions")
        else:
            regions = _regions(intake, sens, constraints, device, tick,
                               chunk=_forward_chunk(sens), activations=activations)
            cache.put("regions", r_key, regions.to_json())
        _write_atomic(out / REGIONS_FILE, regions.to_json())
        tick("regions", 1.0)

    # 4-5. options, solve, plan
    tick("solve", 0.0)
    hardware, latency_table = constraints.hardware, constraints.latency_table
    latency_source = None  # where the plan's latencies come from (recorded in plan.json)
    if hardware == "onnxruntime-cpu":  # measured here (cached), instead of a roofline profile
        latency_table, latency_source = _measured_latency(model_path, intake, constraints,
                                                          cache, reused, out)
        hardware = None
    elif hardware is not None:
        from solver.hardware import get_profile

        latency_source = get_profile(hardware).latency_source()
    elif latency_table is not None:
        latency_source = {"kind": "table", "file": None}  # the constraints' own table
    opts = OptionsConfig(
        weight_bits=tuple(constraints.weight_bits),
        activation_bits=tuple(constraints.activation_bits),
        pin_first=constraints.pin.first,
        pin_last=constraints.pin.last,
        hardware=hardware,
        latency_table=latency_table,
        weight_group_sizes=tuple(constraints.weight_group_sizes),
    )
    specs = _layer_specs(intake, sens, regions)
    if latency_source is not None and latency_source["kind"] == "measured":
        _drq_latencies(latency_table, specs)
    limits = constraints.limits.to_solver(reference_totals(specs, opts))
    problem = build_problem(specs, opts, limits, shared_input_ties(intake.module, intake.layers))
    _write_atomic(out / PROBLEM_FILE, problem.to_json())
    tick("solve", 0.2)
    solution = solve(problem, SolveConfig())
    _write_atomic(out / SOLUTION_FILE, solution.to_json(indent=2))
    plan = make_plan(
        problem,
        solution,
        specs,
        constraints.to_dict(),
        model_summary(intake.program, intake.layers, intake.float_params),
        latency_source,
    )
    _write_json(out / PLAN_FILE, plan)
    if not solution.choices:
        tick.finish()
        raise InfeasibleError(_diagnosis_text(solution.diagnosis), detail=solution.diagnosis)
    # with DRQ options offered, the calibration loss decides between the best plan with DRQ
    # rows and the best without (DRQ kept only if it measures better; service/drqcheck.py)
    from .drqcheck import check_drq, offers_drq

    drq_check = None
    if offers_drq(problem):
        summary = model_summary(intake.program, intake.layers, intake.float_params)
        solution, plan, drq_check = check_drq(
            intake, problem, solution, lambda s: make_plan(
                problem, s, specs, constraints.to_dict(), summary, latency_source),
            device, _forward_chunk(sens), activations, clip=sens.clip)
        _write_atomic(out / SOLUTION_FILE, solution.to_json(indent=2))
        _write_json(out / PLAN_FILE, plan)
    tick("solve", 1.0)

    # 6-7. quantize, evaluate (on the evaluation file when one was given: it is used nowhere
    # else; sensitivity and regions are done with the calibration set by now)
    if evaluation is not None:
        intake.holdout = evaluation
    # the FP32 outputs on the held-out samples, once: the job's evaluation and (sliced) the
    # Pareto points' (None over REFERENCE_MAX_BYTES: each evaluation then runs the FP32 model)
    tick("quantize", 0.0)
    job_reference = _reference(intake, _forward_chunk(sens), device)
    result = _quantize(intake, plan, device, tick, chunk=_forward_chunk(sens),
                       activations=activations, clip=sens.clip, reference=job_reference)
    result.report["evaluation"] = {
        "source": "evaluation file" if evaluation is not None else "held-out calibration share",
        "samples": len(intake.holdout),
    }
    if drq_check is not None:
        result.report["drq_check"] = drq_check
    # which trace blocks stopped at max_iter rather than at tol
    result.report["sensitivity"] = convergence_summary(sens.layers, constraints.hessian.max_iter)
    tick.check()
    _save_checkpoint(result, out)  # model.safetensors and report.json
    # 8. the trade-off: Pareto fronts, a few of their points evaluated, plots
    split = {"holdout_fraction": holdout_fraction, "seed": constraints.hessian.seed}
    if constraints.loss != "auto":  # the metrics a point reports follow the loss kind
        split["loss"] = constraints.loss
    if eval_path is not None:
        split["evaluation"] = file_digest(eval_path)
    if sens.clip.mode != "max":  # the points' scales: the clip ratios of this sensitivity
        split["weight_clip"] = [sens.clip.mode, sens_key]
    # the front's points are evaluated on at most PARETO_EVAL_SAMPLES of the held-out samples
    # (their metrics carry the count and interval): the job's own plan on all of them
    point_keep = _holdout_keep(intake, PARETO_EVAL_SAMPLES, constraints.hessian.seed)
    point_intake = _holdout_subset(intake, point_keep)
    split["point_samples"] = len(point_intake.holdout)
    # measured once for every point: the free-point ranges (the job's plan measured them, for
    # its layer set), the layer input sums (with the sensitivity) and the FP32 outputs
    activations = result.activations or activations
    reference = _slice_reference(job_reference, point_keep)
    point_chunk = _forward_chunk(sens)

    def evaluate_plan(point_plan: dict[str, Any]) -> dict[str, Any]:
        """A front point's metrics, from the cache when the same plan was evaluated."""
        nonlocal reference
        key = evaluation_key(model_path, calib_path, point_plan, split)
        hit = cache.get("evaluations", key)
        if hit is not None:
            return json.loads(hit)
        quiet = lambda stage, fraction: tick.check()  # noqa: E731 (the point's own stages)
        if reference is None:
            reference = _reference(point_intake, point_chunk, device)
        metrics = _quantize(point_intake, point_plan, device, quiet, chunk=point_chunk,
                            activations=activations, reference=reference,
                            clip=sens.clip).report["metrics"]
        cache.put("evaluations", key, json.dumps(metrics))
        return metrics

    _tradeoff(out, problem, solution, specs, constraints, plan, result.report, tick,
              pareto_points, pareto_evaluate, evaluate_plan, plots, cache)
    tick("evaluate", 1.0)
    # 9. export: model.onnx, checked in ONNX Runtime against the fake-quant module
    _export(intake, result, out, tick)
    tick.finish()
    log.info("pipeline done in %s", tick.seconds)
    if loaded is not None:
        loaded.keep(load_key, pristine)
    return PipelineResult(out, plan, result.report, dict(tick.seconds), reused)


def _export(intake: Any, result: Any, out: Path, tick: _Guard) -> None:
    """Write ``model.onnx`` and the report's ``onnx`` section (report.json rewritten).

    A model part the exporter cannot express, or a missing ``[onnx]`` extra, is recorded in the
    report (``exported: false`` with the error) and the job still succeeds with its checkpoint;
    an export that ONNX Runtime runs differently from the fake-quant module fails the job
    (ExportMismatchError), so no wrong model.onnx is ever served."""
    from solver.errors import MissingDependencyError, UnsupportedExportError

    tick("export", 0.0)
    try:
        from quantize.onnx import export_onnx, verify

        model = export_onnx(intake.program, result.checkpoint)
        tick("export", 0.3)
        section = {"exported": True, **verify(intake.program, result.checkpoint, model,
                                               intake.holdout, fixed_batch=intake.batch_size)}
        _write_atomic(out / ONNX_FILE, model.SerializeToString())
    except (UnsupportedExportError, MissingDependencyError) as exc:
        log.warning("no ONNX export: %s", exc.message)
        section = {"exported": False, "error": exc.to_dict()}
    result.report["onnx"] = section
    _write_json(out / REPORT_FILE, result.report)
    tick("export", 1.0)


def _load_evaluation(intake: Any, path: str | Path) -> Any:
    """The evaluation file as a data set bound to the program's inputs like the calibration."""
    from sensitivity.inputs import bind_inputs
    from sensitivity.intake import load_calibration
    from solver.errors import BadCalibrationError

    try:
        data, _ = bind_inputs(intake.program, intake.module,
                              load_calibration(path, stream=True))
    except BadCalibrationError as exc:
        raise BadCalibrationError(f"evaluation file: {exc.message}", exc.detail) from None
    if (data.labels is None) != (intake.train.labels is None):
        raise BadCalibrationError(
            "the evaluation file must have 'labels' exactly when the calibration file has them")
    return data


def _measured_latency(model_path: str | Path, intake: Any, constraints: Constraints,
                      cache: StageCache, reused: list[str], out: Path
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``hardware: onnxruntime-cpu``: every layer's latency per option measured in ONNX
    Runtime (``quantize.onnx.profile``, batch 1, one thread), cached by model bytes, options,
    batch, threads, runtime version and CPU model; written to ``latency.json``. Returns the
    table and the plan's ``latency_source``."""
    from quantize.onnx import onnxruntime
    from quantize.onnx.profile import ProfileConfig, cpu_model, latency_source, profile

    from .cache import stage_key

    bits = sorted(set(constraints.activation_bits) | ({4} if constraints.uses_drq else set()))
    cfg = ProfileConfig(weight_bits=tuple(sorted(set(constraints.weight_bits))),
                        activation_bits=tuple(bits),
                        drq_regions=tuple(constraints.drq.region_sizes)
                        if constraints.uses_drq else (),
                        group_sizes=tuple(g for g in constraints.weight_group_sizes
                                          if g is not None))
    key = stage_key("latency", {"model": model_path},
                    {"config": cfg.to_dict(), "cpu": cpu_model(),
                     "runtime": onnxruntime().__version__})
    hit = cache.get("latency", key)
    if hit is not None:
        result = json.loads(hit)
        reused.append("latency")
    else:
        result = profile(intake.program, cfg)
        cache.put("latency", key, json.dumps(result))
    _write_json(out / LATENCY_FILE, result)
    return result["latency_table"], latency_source(result, LATENCY_FILE, key)


def _drq_latencies(table: dict[str, dict[str, float]], specs: list[Any]) -> None:
    """A measured table times each DRQ region size once per layer and weight width
    (``w<w>drq<x>x<y>``: the cost does not depend on the threshold); every DRQ option tag of
    that region gets the entry, so the solver does not mix the plain entries by fraction."""
    for spec in specs:
        row = table.get(spec.name)
        for mode in spec.activation_modes if isinstance(row, dict) else ():
            x, y = mode.drq["region"]
            for key in [k for k in row if k.endswith(f"drq{x}x{y}")]:
                row[key.split("drq")[0] + mode.tag] = row[key]


def _holdout_subset(intake: Any, keep: torch.Tensor | None) -> Any:
    """``intake`` with its held-out set cut to the samples ``keep`` (``_holdout_keep``; None:
    all of them)."""
    return intake if keep is None else dataclasses.replace(intake,
                                                           holdout=intake.holdout.subset(keep))


def _slice_reference(reference: Any, keep: torch.Tensor | None) -> Any:
    """The FP32 reference of the held-out samples ``keep`` (all: None), cut from the job's."""
    from quantize.evaluate import Reference

    if reference is None or keep is None:
        return reference
    return Reference(reference.outputs[keep], len(keep))


def _holdout_keep(intake: Any, n: int, seed: int) -> torch.Tensor | None:
    """``n`` held-out samples drawn at random (seeded; a file sorted by class would bias its
    first samples), ascending (None: all of them, when there are no more than ``n``)."""
    if len(intake.holdout) <= n:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(len(intake.holdout), generator=gen)[:n].sort().values


def _forward_chunk(sens: Any) -> int | None:
    """Samples per no-grad forward that fit the memory budget (None: the stage's default)."""
    return (sens.model.get("memory") or {}).get("forward_chunk")


def _observe(intake: Any, sens: Any, device: torch.device) -> Any:
    """The layer input statistics of the train split (``quantize.observe``), for a sensitivity
    result that does not carry them (measured without activation traces)."""
    from quantize.observe import observe

    return observe(intake.module, [layer.graph for layer in intake.layers], intake.train,
                   intake.chunk_size(_forward_chunk(sens) or 64), intake.batch_size is not None,
                   device)


def _quantize_config(chunk: int | None, weight_clip: str = "max") -> Any:
    from quantize import QuantizeConfig

    return QuantizeConfig(weight_clip=weight_clip) if chunk is None else QuantizeConfig(
        batch_size=chunk, weight_clip=weight_clip)


def _quantize(intake: Any, plan: dict[str, Any], device: torch.device,
              progress: ProgressFn, chunk: int | None = None, activations: Any = None,
              reference: Any = None, clip: Any = None) -> Any:
    """quantize.apply on the intake's split: checkpoint, fake-quant module and report;
    ``chunk``: samples per forward pass of a dynamic-batch program; ``activations``: the job's
    layer input statistics; ``reference``: the FP32 outputs on ``intake.holdout``; ``clip``:
    the sensitivity stage's weight clip ratios (``quantize.weight_clip`` is their mode)."""
    from quantize import apply

    return apply(
        intake.program,
        plan,
        intake.train,
        intake.holdout,
        _quantize_config(chunk, "max" if clip is None else clip.mode),
        batch_size=intake.batch_size,
        device=device,
        progress=progress,
        token_input=intake.token_input,
        activations=activations,
        reference=reference,
        clip=clip,
    )


def _reference(intake: Any, chunk: int | None, device: torch.device) -> Any:
    """The FP32 program's outputs on ``intake.holdout``, batched as ``_quantize`` evaluates
    (None when over ``REFERENCE_MAX_BYTES``: each point then runs the FP32 model itself)."""
    from quantize.evaluate import REFERENCE_MAX_BYTES, reference_outputs
    from quantize.graph import program_module

    size = intake.batch_size or _quantize_config(chunk).batch_size
    return reference_outputs(program_module(intake.program).to(device), intake.holdout, size,
                             fixed=intake.batch_size is not None, device=device,
                             max_bytes=REFERENCE_MAX_BYTES)


def _tradeoff(out: Path, problem: Any, solution: Any, specs: Any, constraints: Constraints,
              plan: dict[str, Any], report: dict[str, Any], tick: _Guard, points: int,
              evaluate: int, evaluate_plan: Callable[[dict[str, Any]], dict[str, Any]],
              draw: bool = True, cache: StageCache | None = None) -> None:
    """Write ``pareto.json`` (a front per limited resource; up to ``evaluate`` points of each
    quantized and evaluated by ``evaluate_plan``) and, with ``draw``, the plots (``plots/``);
    a front swept before for the same problem comes from ``cache``."""
    from solver import make_plan

    from . import plots, tradeoff

    swept = tradeoff.fronts(problem, points, cache=cache) if points >= 2 else {}
    measured: dict[tuple[str, int], dict[str, Any]] = {("chosen", 0): report.get("metrics") or {}}
    todo = [(r, i) for r, front in swept.items() for i in tradeoff.pick(front, evaluate)]
    for k, (r, i) in enumerate(todo):
        point_plan = make_plan(problem, tradeoff.as_solution(problem, swept[r][i], r), specs,
                               constraints.to_dict(), plan["model"])
        measured[(r, i)] = evaluate_plan(point_plan)
        tick("evaluate", (k + 1) / (len(todo) + 1))
    doc = tradeoff.document(problem, solution, swept, measured)
    _write_json(out / PARETO_FILE, doc)
    if not draw:
        return
    sens = json.loads((out / SENSITIVITY_FILE).read_text())
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    for name, data in plots.render(plan, sens, doc).items():
        _write_atomic(out / PLOTS_DIR / name, data)


def _measure(intake: Any, constraints: Constraints, device: torch.device, tick: _Guard,
             memory_budget: int | None = None) -> Any:
    from sensitivity import measure
    from sensitivity.hessian import HessianConfig

    h = constraints.hessian
    cfg = HessianConfig(
        max_iter=h.max_iter, tol=h.tol, seed=h.seed, min_iter=min(10, h.max_iter),
        batch_size=h.batch_size, memory_budget=memory_budget, diagonal=h.omega == "diagonal",
        sampling=h.sampling,
    )
    tick("sensitivity", 0.0)
    # (measured Omega measures the corrected layers itself: no kept shares needed)
    correction = "none" if h.omega == "measured" else _omega_bias_correction(constraints)
    return measure(intake, cfg, device, tick, bias_correction=correction,
                   weight_clip=constraints.quantize.weight_clip)


def _groups_need_diagonal(constraints: Constraints) -> bool:
    """Whether the grouped Omegas (and clip ratios) need the sweep's in-memory diagonals, so
    they are computed before the result is cached."""
    return (constraints.hessian.omega == "diagonal"
            or constraints.quantize.weight_clip == "hessian")


def _omega_bias_correction(constraints: Constraints) -> str:
    """The bias correction Omega prices: the quantize stage's (``QuantizeConfig()``, as
    ``_quantize`` applies it) with ``hessian.bias_corrected``, else none."""
    from quantize import QuantizeConfig

    return QuantizeConfig().bias_correction if constraints.hessian.bias_corrected else "none"


def _group_omegas(intake: Any, sens: Any, constraints: Constraints) -> Any:
    if not any(g is not None for g in constraints.weight_group_sizes):
        return sens
    from sensitivity.engine import group_omegas

    return group_omegas(intake, sens, list(constraints.weight_group_sizes))


def _cached_sensitivity(text: str | None) -> Any:
    from sensitivity.engine import SensitivityResult

    return None if text is None else SensitivityResult.from_json(text)


def _cached_regions(text: str | None) -> Any:
    from sensitivity.regions import RegionResult

    if text is None:
        return None
    try:
        return RegionResult.from_json(text)
    except (ValueError, KeyError, TypeError):  # an older format: calibrate again
        return None


def _measured_omegas(
    intake: Any, sens: Any, constraints: Constraints, device: torch.device, tick: _Guard
) -> Any:
    """Replace the Hessian Omega tables by measured loss increases (``hessian.omega:
    measured``); the traces stay in ``sensitivity.json`` beside them."""
    from sensitivity.measured import measured_omegas

    weight_bits = set(constraints.weight_bits)
    if constraints.uses_drq:
        weight_bits |= {min(b, 4) for b in weight_bits}  # DRQ's insensitive regions
    m = measured_omegas(intake, sorted(weight_bits), sorted(set(constraints.activation_bits)),
                        device=device, progress=tick, activations=sens.activations,
                        bias_correction=_omega_bias_correction(constraints),
                        loss=constraints.hessian.measured_loss, clip=sens.clip)
    layers = [
        dataclasses.replace(s, omega_w=m.omega_w[s.name],
                            omega_a=m.omega_a[s.name] if s.omega_a else {})
        for s in sens.layers
    ]
    return dataclasses.replace(sens, layers=layers,
                               config={**sens.config, "omega": "measured",
                                       "measured_passes": m.passes,
                                       "bias_correction": m.bias_correction,
                                       "measured_loss": m.loss_kind})


def _regions(
    intake: Any, sens: Any, constraints: Constraints, device: torch.device, tick: _Guard,
    chunk: int | None = None, activations: Any = None,
) -> Any:
    from sensitivity.regions import RegionConfig, calibrate

    cfg = RegionConfig(
        region_sizes=tuple(constraints.drq.region_sizes),
        sensitive_fractions=tuple(constraints.drq.sensitive_fractions),
        **({} if chunk is None else {"batch_size": chunk}),
    )
    traces = {
        s.name: (float(s.activation_trace), int(s.activation_numel))
        for s in sens.layers
        if s.activation_trace is not None
    }
    tick("regions", 0.0)
    return calibrate(
        intake.module,
        [layer.graph for layer in intake.layers],
        intake.train,
        intake.holdout,
        cfg,
        activation_traces=traces or None,
        batch_size=intake.batch_size,
        device=device,
        progress=tick,
        activations=activations,
    )
