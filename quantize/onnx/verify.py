"""Checking an export: ``onnx.checker`` (full check) and ONNX Runtime against fake-quant.

The fake-quant module (``quantize.load``) is the reference, checked two ways on the held-out
samples:

- **per point** (``point_check``): every tensor the integer model materialises (layer outputs,
  residual adds, pools; ``quantize.points``) and the model output are computed by ONNX Runtime
  from the fake-quant module's own values of the points before them (the exported graph cut at
  every point: each point's value is a graph input), so each part of the graph is compared on
  its own. At most ``VerifyConfig.max_point_mismatch`` of a point's values may sit on another
  code than the reference's (another 8-bit step for wider grids);
- **end to end**: ONNX Runtime's outputs must pick the fake-quant module's top-1 class for at
  least ``VerifyConfig.min_top1_agreement`` of the samples (leaving out near-ties: samples whose
  reference top two outputs are within twice the output deviation rounding may cause, where a
  flip is within rounding; a random-weight ResNet-18 on random images has most of its samples
  there). That deviation is ``max_step_p99`` 8-bit output steps, or the measured 99th
  percentile when it is larger and every point passed its own check (the deviation is then
  rounding carried through the network: a random-weight MobileNetV2 flips samples whose
  margin is 8.8 steps with every point within one code, ``tie_steps8``).
  The output deviation is reported (99th percentile in steps of an 8-bit grid over the output's
  range: the output grid itself when it has 8 bits or fewer; for the default 16-bit logits grid
  one such step is 256 of its steps) but is not a pass criterion.

The two differ only by rounding: ONNX requantises in float (round half to even) where the
checkpoint uses dyadic integer multipliers (round half up), and a full-width signed 8-bit type
holds one code (-128) below the symmetric grid; so values that float arithmetic puts on the
other side of a rounding boundary (about 1 in 10^5 of a layer's outputs) differ by one code.
A network carries those differences on, and how far depends on the network, not the export:
on ResNet-18 at 224x224 (random weights, all INT8) the 99th percentile of the logits is one
8-bit step, while a random-weight MobileNetV2 at 224x224 amplifies them to 7-11 steps (one
code changed in 1 of 10^5 outputs of its second conv alone moves its logits by 6 steps at the
99th percentile, in the fake-quant module itself) with every point within one code of the
reference. Hence the per-point bar: it holds for any network an export computes correctly,
and a wrong scale, zero point, bias, padding or op moves most of a point's values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import fx

from solver.errors import (
    BadConstraintsError,
    ExportMismatchError,
    MissingDependencyError,
    UnsupportedExportError,
)

from ..checkpoint import Checkpoint
from ..data import CalibrationSet
from ..evaluate import Runner
from ..fakequant import build_fake_quant
from ..points import Grid, Point

EXTRA = "onnx"


@dataclass(frozen=True)
class VerifyConfig:
    """Pass criteria of an export (each with its reason)."""

    version: int = 1
    # the bar: ORT picks the fake-quant module's class on >= 99 % of the samples
    min_top1_agreement: float = 0.99
    # the output deviation rounding alone may cause (8-bit output steps): samples whose top
    # two are within twice it (or twice the measured 99th percentile, when larger and every
    # point passed) are near-ties; end-to-end 99th percentile measured 0..1 on the digits
    # models and ResNet-18, 7-11 on a random MobileNetV2 (module docstring)
    max_step_p99: float = 4.0
    # share of a point's values ONNX Runtime may put on another code than the reference when
    # both read the same inputs: measured <= 2e-5 (rounding, MobileNetV2 at 224x224); a wrong
    # scale, bias or op moves most values
    max_point_mismatch: float = 0.01
    # values a point may have on another code whatever its size: one rounding flip put 1 of
    # a small head's 80 values (1.25 %) on another code (tests/service/test_pipeline.py,
    # two heads, seed 8), which the share alone failed
    point_flips: int = 1
    # samples per end-to-end pass: ONNX Runtime's and the fake-quant module's activations of
    # one chunk are held at once (the check's peak, docs/benchmarks.md); the counts are summed
    # over chunks, so the report is the one-batch report (tests/quantize/test_onnx_verify.py)
    batch_size: int = 16
    point_batch: int = 8  # samples per pass of the point check (it keeps every point's values)
    threads: int = 1  # deterministic and light on a shared machine

    def __post_init__(self) -> None:
        if self.version != 1:
            raise BadConstraintsError(f"unsupported verify config version {self.version}")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise BadConstraintsError("min_top1_agreement must be in [0, 1]")
        if not 0.0 <= self.max_point_mismatch <= 1.0:
            raise BadConstraintsError("max_point_mismatch must be in [0, 1]")
        if self.point_flips < 0:
            raise BadConstraintsError("point_flips must be >= 0")
        if (not self.max_step_p99 > 0 or self.batch_size < 1 or self.threads < 1
                or self.point_batch < 1):
            raise BadConstraintsError("max_step_p99, batch_size, point_batch and threads must "
                                      "be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def onnxruntime():  # noqa: ANN201 - the module
    """The ``onnxruntime`` module, or MissingDependencyError naming the extra to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError(
            f"ONNX Runtime is not installed; install bitplan's [{EXTRA}] extra "
            f"(pip install -e \".[{EXTRA}]\")", detail={"extra": EXTRA},
        ) from exc
    return ort


# ONNX Runtime 1.31 on a signed 8-bit Q/DQ pair it propagates across Transpose / Slice (a
# decoder's rotary halves): the propagated QuantizeLinear carries output_dtype INT8 and the
# s8 -> u8 rewrite then gives it a UINT8 zero point, and the session fails to load. A graph
# that hits it is loaded again with that one rewrite off (the rest of the optimiser stays on).
S8_TO_U8_FAULT = "does not match y_zero_point type"
S8_TO_U8 = "QDQS8ToU8Transformer"


def session(model: onnx.ModelProto, threads: int | None = None, optimize: bool = True,
            profile_prefix: str | None = None):  # noqa: ANN201
    """An ONNX Runtime CPU session for ``model`` (``threads`` intra-op threads; with
    ``profile_prefix``, ONNX Runtime's per-node profiler on)."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    data = model.SerializeToString()
    try:
        try:
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind classes
            if S8_TO_U8_FAULT not in str(exc):
                raise
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=[S8_TO_U8])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind classes
        # A graph the checker accepts but this ONNX Runtime has no kernel for (after its
        # fusions): not a wrong export, an inexpressible one for this runtime.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedExportError(
            f"ONNX Runtime {ort.__version__} cannot run the exported graph: {first}",
            detail={"runtime": f"onnxruntime {ort.__version__}"},
        ) from None


def run(sess, args: tuple[torch.Tensor, ...]) -> np.ndarray:  # noqa: ANN001
    """The first output of ``sess`` for positional tensor inputs."""
    names = [i.name for i in sess.get_inputs()]
    feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}
    return sess.run(None, feed)[0]


def check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with the full check (shape inference); ExportMismatchError if not."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportMismatchError(f"the exported ONNX model is not valid: {exc}") from exc


def _output_grid(ckpt: Checkpoint):  # noqa: ANN202 - Grid | None
    """The model output's grid when the output is a quantized point's value."""
    grids = [g for p, g in ckpt.points() if p.final]
    return grids[0] if len(grids) == 1 else None


class Deviations:
    """Running max, mean and 99th percentile (``np.percentile``'s linear interpolation) of
    ``total`` values added chunk by chunk, keeping only the values from the percentile's rank
    up (1 % of them) instead of all: a check's output deviations do not grow the process by
    a language model's logits per sample."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.sum, self.max, self.nan = total, 0, 0.0, 0.0, False
        self.keep = total - math.floor(0.99 * (total - 1))  # ranks floor(h) .. total - 1
        self.tail = np.zeros(0)

    def add(self, values: np.ndarray) -> None:
        d = np.asarray(values, dtype=np.float64).reshape(-1)
        if self.n + d.size > self.total:
            raise ValueError(f"more than the {self.total} values announced")
        if d.size == 0:
            return
        self.n += d.size
        self.nan = self.nan or bool(np.isnan(d).any())
        self.sum += float(d.sum())
        self.max = float(np.max([self.max, d.max()]))
        t = np.concatenate([self.tail, d])
        if t.size > self.keep:
            t = np.partition(t, t.size - self.keep)[t.size - self.keep:]
        self.tail = t

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else 0.0

    def percentile99(self) -> float:
        if self.nan:
            return math.nan
        h = 0.99 * (self.n - 1)
        lo = math.floor(h)
        s = np.sort(self.tail)
        a = s[lo - (self.n - s.size)]
        b = s[min(lo + 1, self.n - 1) - (self.n - s.size)]
        t = h - lo  # numpy's lerp: from the nearer end
        return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


def top_margin(flat: np.ndarray) -> np.ndarray:
    """Per row of ``flat`` [N, K]: its largest value minus its second largest (inf for K=1)."""
    if flat.shape[1] < 2:
        return np.full(flat.shape[0], np.inf)
    top2 = np.partition(flat, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def tie_steps8(cfg: VerifyConfig, p99_steps8: float, points_passed: bool) -> float:
    """The top-two margin (8-bit output steps) below which a sample is a near-tie, its top-1
    free to flip by rounding: twice the output deviation rounding may cause. With every point
    of the export within its bar (``points_passed``), the measured 99th percentile is rounding
    carried through the network, so it counts when larger than ``cfg.max_step_p99``; otherwise
    only the configured deviation does (a wrong export must not widen its own ties)."""
    return 2 * (max(cfg.max_step_p99, p99_steps8) if points_passed else cfg.max_step_p99)


def _fake_point_nodes(gm: fx.GraphModule, points: list[Point]) -> dict[str, str]:
    """The fake-quant module's node holding each point's value, by chain end: the chain end
    itself after a grid-preserving op, else the module that rounds the producer's output
    (``_bitplan_outq_*`` after a layer; ``_bitplan_add_*`` / ``_bitplan_pool_*``, which
    replaced an add / pool; ``quantize.fakequant.build_fake_quant``)."""
    names = {n.name for n in gm.graph.nodes}
    modules = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
    prefix = {"layer": "outq", "add": "add", "pool": "pool"}
    out = {}
    for p in points:
        name = (p.end if p.end in names else None) if p.end != p.node else \
            modules.get(f"_bitplan_{prefix[p.kind]}_{p.node}")
        if name is None:
            raise ExportMismatchError(f"point {p.node!r} has no value in the fake-quant module")
        out[p.end] = name
    return out


def cut_at_points(model: onnx.ModelProto, values: dict[str, str]) -> onnx.ModelProto:
    """A copy of ``model`` in which every value of ``values`` (point -> ONNX value) is a graph
    output and its readers read a new float graph input ``<value>_ref`` instead.

    Where the value is ``DequantizeLinear(QuantizeLinear(x))``, the readers read the input
    through a copy of that pair (the point's own grid: the identity on the reference's
    on-grid values), so ONNX Runtime's graph optimiser sees the Q/DQ pattern of the exported
    graph. A bare float input in its place lets it fuse the reader differently (a MatMul fed
    a float input and a dequantized weight is quantized dynamically, at a range-derived
    scale) and the cut graph then computes what the exported one does not."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    taken = {o for n in cut.graph.node for o in n.output} | {i.name for i in cut.graph.input}

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    refs = {v: fresh(v + "_ref") for v in dict.fromkeys(values.values())}
    producer = {o: n for n in cut.graph.node for o in n.output}
    read = dict(refs)  # value -> what its readers read
    pairs: dict[int, list[onnx.NodeProto]] = {}  # index of a DequantizeLinear -> its copies
    index = {id(n): i for i, n in enumerate(cut.graph.node)}
    for v, ref in refs.items():
        dq = producer.get(v)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
            else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        q2, dq2 = onnx.NodeProto(), onnx.NodeProto()
        q2.CopyFrom(q)
        dq2.CopyFrom(dq)
        q2.name, dq2.name = fresh(f"{q.name or 'q'}_ref"), fresh(f"{dq.name or 'dq'}_ref")
        q2.input[0], q2.output[0] = ref, fresh(ref + "_q")
        dq2.input[0], dq2.output[0] = q2.output[0], fresh(ref + "_dq")
        pairs[index[id(dq)]] = [q2, dq2]
        read[v] = dq2.output[0]
    for node in cut.graph.node:
        for i, name in enumerate(node.input):
            if name in read:
                node.input[i] = read[name]
    if pairs:  # each copy right after the original pair: after its scale, before its readers
        nodes = list(cut.graph.node)
        del cut.graph.node[:]
        for i, node in enumerate(nodes):
            cut.graph.node.append(node)
            cut.graph.node.extend(pairs.get(i, []))
    for v, ref in refs.items():
        cut.graph.input.append(helper.make_tensor_value_info(ref, TensorProto.FLOAT, None))
        cut.graph.output.append(helper.make_tensor_value_info(v, TensorProto.FLOAT, None))
    return cut


def point_passes(values: int, mismatched: int, cfg: VerifyConfig) -> bool:
    """Whether a point with ``mismatched`` of its ``values`` on another code passes: at most
    ``max_point_mismatch`` of them, or at most ``point_flips`` values (a rounding flip or
    two, which the share would fail on a point of few values)."""
    return mismatched <= max(cfg.max_point_mismatch * values, cfg.point_flips)


def point_check(
    program: torch.export.ExportedProgram, ckpt: Checkpoint, model: onnx.ModelProto,
    holdout: CalibrationSet, out_unit: float, cfg: VerifyConfig | None = None,
    fixed_batch: int | None = None, fake: fx.GraphModule | None = None,
) -> dict[str, Any] | None:
    """Every materialised point and the model output, computed by ONNX Runtime from the
    fake-quant module's values of the points before them (:func:`cut_at_points`), against
    the fake-quant module's values: the share of values on another code (another 8-bit step
    for grids wider than 8 bits; ``out_unit`` for the model output) and the largest
    deviation, worst point first. None for a file without bitplan's point map. ``fake``: the
    checkpoint's fake-quant module when built already (``verify``'s), else built here."""
    from .export import POINTS_PROP

    cfg = cfg or VerifyConfig()
    props = {p.key: p.value for p in model.metadata_props}
    if POINTS_PROP not in props:
        return None
    values: dict[str, str] = json.loads(props[POINTS_PROP])
    grids: dict[str, tuple[Point, Grid]] = {p.end: (p, g) for p, g in ckpt.points()}
    if set(values) - set(grids):
        raise ExportMismatchError("the ONNX file's points are not the checkpoint's: "
                                  f"{sorted(set(values) - set(grids))[:5]}")
    fake = fake if fake is not None else build_fake_quant(program, ckpt)
    nodes = _fake_point_nodes(fake, [grids[end][0] for end in values])
    units = {end: grids[end][1].scale * 2.0 ** max(0, grids[end][1].bits - 8) for end in values}
    sess = session(cut_at_points(model, values), cfg.threads)
    n_inputs = len(model.graph.input)
    in_names = [i.name for i in sess.get_inputs()]
    refs = dict(zip(values, in_names[n_inputs:], strict=True))
    out_names = [o.name for o in sess.get_outputs()]
    keep = set(nodes.values())
    stats = {end: [0, 0, 0.0] for end in [*values, "output"]}  # values, mismatched, max steps

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            res = super().run_node(node)
            if node.name in keep:
                seen[node.name] = res.detach().to(torch.float32).cpu().numpy()
            return res

    def tally(end: str, got: np.ndarray, want: np.ndarray, unit: float) -> None:
        d = np.abs(got.astype(np.float64) - want.astype(np.float64)) / unit
        st = stats[end]
        st[0] += d.size
        st[1] += int((d > 0.5).sum())
        st[2] = max(st[2], float(d.max()) if d.size else 0.0)

    n = 0
    with torch.no_grad():
        for batch in holdout.batches(fixed_batch or cfg.point_batch,
                                     fixed=fixed_batch is not None):
            seen: dict[str, np.ndarray] = {}
            ref_out = Recorder(fake).run(*batch.args)
            if isinstance(ref_out, (tuple, list)):
                ref_out = ref_out[0]
            feed = {name: a.detach().cpu().numpy()
                    for name, a in zip(in_names[:n_inputs], batch.args, strict=True)}
            feed.update({refs[end]: seen[nodes[end]] for end in values})
            got = dict(zip(out_names, sess.run(None, feed), strict=True))
            k = batch.size
            for end, v in values.items():
                tally(end, got[v][:k], seen[nodes[end]][:k], units[end])
            tally("output", got[out_names[0]][:k],
                  ref_out.detach().to(torch.float64).cpu().numpy()[:k], out_unit)
            n += k
    shares = {end: st[1] / max(st[0], 1) for end, st in stats.items()}
    worst = max(shares, key=lambda e: (shares[e], stats[e][2]))
    over = [e for e, st in stats.items() if not point_passes(st[0], st[1], cfg)]
    return {
        "points": len(values),
        "samples": n,
        "max_mismatch": shares[worst],
        "worst_point": worst,
        "worst_mismatched": stats[worst][1],
        "points_over": len(over),
        "max_steps": max(st[2] for st in stats.values()),
        "points_with_mismatch": sum(1 for e in values if stats[e][1]),
        "output_mismatch": shares["output"],
    }


def verify(
    program: torch.export.ExportedProgram,
    ckpt: Checkpoint,
    model: onnx.ModelProto,
    holdout: CalibrationSet,
    cfg: VerifyConfig | None = None,
    fixed_batch: int | None = None,
) -> dict[str, Any]:
    """Check ``model`` and run it in ONNX Runtime against the fake-quant module on
    ``holdout``; returns the ``onnx`` section of report.json.

    Raises ExportMismatchError (``detail`` = the measured numbers) when the criteria of
    ``cfg`` fail, MissingDependencyError without ONNX Runtime.
    """
    cfg = cfg or VerifyConfig()
    check(model)
    sess = session(model, cfg.threads)
    fake = build_fake_quant(program, ckpt)
    grid = _output_grid(ckpt)
    n = 0
    agrees: list[np.ndarray] = []
    margins: list[np.ndarray] = []
    diff: Deviations | None = None  # of every output value, without keeping them all
    ref_scale = 0.0
    forward = Runner([fake])  # channels-last for an image model, as quantize.evaluate runs it
    with torch.no_grad():
        try:
            size, fixed = fixed_batch or cfg.batch_size, fixed_batch is not None
            for batch in holdout.batches(size, fixed=fixed):
                if batch.kwargs:
                    raise ExportMismatchError("programs with keyword inputs are not verified")
                ref = forward(batch)[0].detach().to(torch.float64).numpy()
                got = run(sess, batch.args).astype(np.float64)[: batch.size]
                n += batch.size
                flat = ref.reshape(batch.size, -1)
                agrees.append(flat.argmax(1) == got.reshape(batch.size, -1).argmax(1))
                margins.append(top_margin(flat))
                if diff is None:
                    diff = Deviations(len(holdout) * flat.shape[1])
                diff.add(np.abs(ref - got))
                ref_scale = max(ref_scale, float(np.abs(ref).max()) if ref.size else 0.0)
        finally:
            forward.close()  # the float layers' weights are the program's
    if diff is None:
        diff = Deviations(1)
        diff.add(np.zeros(1))
    if grid is not None:
        unit, unit8 = grid.scale, grid.scale * 2.0 ** max(0, grid.bits - 8)
    else:  # a float output: grids over its observed range
        unit, unit8 = max(ref_scale, 1e-12) / 32767.0, max(ref_scale, 1e-12) / 127.0
    d_max, d_p99, d_mean = diff.max, diff.percentile99(), diff.mean
    agree = np.concatenate(agrees) if agrees else np.zeros(0, bool)
    margin = np.concatenate(margins) if margins else np.zeros(0)
    result = {
        "format": "bitplan-onnx/1",
        "opset": int(model.opset_import[0].version),
        "samples": n,
        "top1_agreement": float(agree.mean()) if n else None,
        "output_step": unit,
        "output_grid": "model" if grid is not None else "float output: 1/32767 of its range",
        "step8": unit8,
        "max_steps8": d_max / unit8,
        "p99_steps8": d_p99 / unit8,
        "max_abs_diff": d_max,
        "max_steps": d_max / unit,
        "p99_steps": d_p99 / unit,
        "mean_steps": d_mean / unit,
        "model_bytes": model.ByteSize(),
        "criteria": cfg.to_dict(),
    }
    points = point_check(program, ckpt, model, holdout, unit8, cfg, fixed_batch, fake)
    result["points"] = points
    if points is None:  # a file without the point map: the end-to-end bar instead
        local_ok = result["p99_steps8"] <= cfg.max_step_p99
        local = (f"99th percentile {result['p99_steps8']:.2f} steps of an 8-bit output grid "
                 f"(need <= {cfg.max_step_p99})")
    else:
        local_ok = points["points_over"] == 0
        local = (f"{points['max_mismatch']:.2%} of the values of {points['worst_point']!r} "
                 f"({points['worst_mismatched']}) on another code from the same inputs (need "
                 f"<= {cfg.max_point_mismatch:.2%}, or <= {cfg.point_flips} values, at every "
                 "point)")
    tie = tie_steps8(cfg, result["p99_steps8"], points is not None and local_ok)
    decisive = margin > tie * unit8
    result.update({
        "tie_steps8": tie,
        "tied_samples": int(n - decisive.sum()),
        "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else 1.0,
    })
    ok = (n > 0 and result["top1_agreement_decisive"] >= cfg.min_top1_agreement
          and local_ok and math.isfinite(result["max_steps"]))
    result["passed"] = bool(ok)
    if not ok:
        raise ExportMismatchError(
            f"ONNX Runtime disagrees with the fake-quant module: top-1 agreement "
            f"{result['top1_agreement_decisive']:.3f} on the {n - result['tied_samples']} "
            f"samples without a near-tie (need >= {cfg.min_top1_agreement}), {local}",
            detail=result,
        )
    return result
