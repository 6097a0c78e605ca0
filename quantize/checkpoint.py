"""The integer checkpoint: a ``.safetensors`` file (format ``bitplan-qckpt/3``).

Metadata (all strings): ``format`` = ``bitplan-qckpt/3``, ``version`` = ``3``, ``plan`` (the
plan JSON), ``quant`` (JSON: the quantize config, each layer's weight shape and input / output
grids, and the materialisation points of ``quantize.points`` with their grids) and ``sha256``
(a digest of the other metadata and every tensor's name, dtype, shape and bytes, so a tampered
file is refused).

Tensors, per quantized layer ``<name>`` with ``out`` output channels (and, for a plan row with
``group_size`` g, ``G = fan_in / g`` groups per channel: version 2):

=======================  =====================  ==============================================
``weight_q``             int8, weight shape     codes for 5..8-bit weights
                         uint8 [ceil(n / 2)]    <= 4 bits: two's-complement nibbles, two per
                                                byte, low nibble first (flattened weight)
``weight_scale``         float32 [out]          per-output-channel scale S_w (of the folded W)
                         float32 [out, G]       grouped: S_w[o, g] of inputs g*gs..(g+1)*gs-1
                                                (flattened fan-in, the weight's memory order)
``bias``                 float32 [out]          BN-folded bias (0 where the layer has none),
                                                minus the bias correction's shift if any
``bias_q``               int32 [out]            round(bias / (S_w * S_in)); grouped: on the
                                                grid max_g S_w[o, g] * S_in
``input_scale``          float32 []             S_in (input grid; bits/signedness in ``quant``)
``output_scale``         float32 []             S_out (grid the requantised output lands on)
``requant_b``            int32 [out]            dyadic multiplier: b / 2^c ~= S_w S_in / S_out
                         int32 [out, G]         grouped: b[o, g] / 2^c[o] ~= S_w[o, g] S_in / S_out
``requant_c``            int32 [out]            shift, 0..31 (grouped: one per output channel)
``drq_threshold``        int32 []               DRQ rows only: INT8 region-mean threshold
``drq_region``           int32 [2]              DRQ rows only: (x, y) region size
``drq_low_scale``        float32 [out]          DRQ rows only (version 3): per-channel scale of
                                                the low-bit weights, which are the dequantized
                                                weight rounded at min(w_bits, low_bits) on it
                                                (the job's clip ratio x its max|W| / qmax)
=======================  =====================  ==============================================

Reading never unpickles (safetensors only) and checks the tag, version, digest, and every
tensor's name, dtype and shape against the embedded plan, and a DRQ layer's stored input grid
against the plan row's ``drq.scale`` / ``drq.signed``; anything else is a BadCheckpointError.
Version 1 and 2 files (``bitplan-qckpt/1``: per-channel scales only; ``/2``: no
``drq_low_scale``, the low-bit weights took max|W| scales) still load (their DRQ rows get the
max|W| low scales they were computed with); files are written as version 3.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from solver.errors import BadCheckpointError, BadPlanError
from solver.options import group_fits

from .points import Grid, Point
from .primitives import (
    expand_scales,
    pack_nibbles,
    qmax_signed,
    quantize_weight,
    unpack_nibbles,
    weight_scales,
)
from .rows import PlanRow, parse_rows

FORMAT = "bitplan-qckpt/3"
VERSION = "3"
# format tag -> its version string
READABLE = {"bitplan-qckpt/1": "1", "bitplan-qckpt/2": "2", FORMAT: VERSION}

_SUFFIXES = (
    "weight_q", "weight_scale", "bias", "bias_q", "input_scale", "output_scale",
    "requant_b", "requant_c",
)
_DRQ_SUFFIXES = ("drq_threshold", "drq_region")


def packed(w_bits: int) -> bool:
    """Whether weights of this width are stored as nibbles (<= 4 bits) rather than int8."""
    return w_bits <= 4


def storage_bits(w_bits: int) -> int:
    """Bits one weight occupies in the file: 4 (nibbles) for <= 4 bits, else 8 (int8)."""
    return 4 if packed(w_bits) else 8


def encode_weight(codes: torch.Tensor, w_bits: int) -> torch.Tensor:
    """Stored form of signed weight codes: int8 (same shape) for 5..8 bits, packed nibbles
    (uint8, ``ceil(numel / 2)``, low nibble first) for <= 4 bits."""
    q = qmax_signed(w_bits)
    if codes.numel() and (int(codes.min()) < -q or int(codes.max()) > q):
        raise ValueError(f"weight codes exceed the {w_bits}-bit range [-{q}, {q}]")
    return pack_nibbles(codes) if packed(w_bits) else codes.to(torch.int8)


def decode_weight(stored: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`encode_weight`: int32 codes of ``shape``."""
    if stored.dtype == torch.uint8:
        stored = unpack_nibbles(stored, math.prod(shape))
    return stored.to(torch.int32).reshape(shape)


Spec = tuple[torch.dtype, tuple[int, ...]]


def expected_specs(row: PlanRow, weight_shape: tuple[int, ...], version: str = VERSION
                   ) -> dict[str, Spec]:
    """Name -> (dtype, shape) of every tensor a plan row needs (in a file of ``version``)."""
    out = weight_shape[0]
    numel = math.prod(weight_shape)
    p = row.name + "."
    scales = (out,) if row.group_size is None else (out, numel // out // row.group_size)
    specs: dict[str, Spec] = {
        p + "weight_q": (torch.uint8, ((numel + 1) // 2,))
        if packed(row.w_bits) else (torch.int8, tuple(weight_shape)),
        p + "weight_scale": (torch.float32, scales),
        p + "bias": (torch.float32, (out,)),
        p + "bias_q": (torch.int32, (out,)),
        p + "input_scale": (torch.float32, ()),
        p + "output_scale": (torch.float32, ()),
        p + "requant_b": (torch.int32, scales),
        p + "requant_c": (torch.int32, (out,)),
    }
    if row.drq is not None:
        specs[p + "drq_threshold"] = (torch.int32, ())
        specs[p + "drq_region"] = (torch.int32, (2,))
        if int(version) >= 3:
            specs[p + "drq_low_scale"] = (torch.float32, (out,))
    return specs


def digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over the metadata (except the digest) and every tensor, in name order."""
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != "sha256":
            h.update(f"{key}\0{meta[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A validated checkpoint in memory: tensors plus the parsed plan and ``quant`` section."""

    tensors: dict[str, torch.Tensor]
    plan: dict[str, Any]
    quant: dict[str, Any]

    @property
    def rows(self) -> dict[str, PlanRow]:
        return {row.name: row for row in parse_rows(self.plan)}

    def weight_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(v) for v in self.quant["layers"][name]["weight_shape"])

    def codes(self, name: str) -> torch.Tensor:
        """Integer weight codes (int32) in the weight's shape."""
        return decode_weight(self.tensors[f"{name}.weight_q"], self.weight_shape(name))

    def dequantized_weight(self, name: str) -> torch.Tensor:
        """codes * S_w in float32, the weight the fake-quant module computes with."""
        codes = self.codes(name)
        scale = self.tensors[f"{name}.weight_scale"]
        return codes.to(torch.float32) * expand_scales(scale, codes)

    def low_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A DRQ row's low-bit weights: (codes, per-channel scales ``drq_low_scale``) of the
        dequantized weight at ``min(w_bits, drq.low_bits)``, as every runtime derives them."""
        row = self.rows[name]
        assert row.drq is not None
        return quantize_weight(self.dequantized_weight(name), min(row.w_bits, row.drq.low_bits),
                               scale=self.tensors[f"{name}.drq_low_scale"])

    def input_grid(self, name: str) -> Grid:
        g = self.quant["layers"][name]["input"]
        return Grid(float(self.tensors[f"{name}.input_scale"]), int(g["bits"]), bool(g["signed"]))

    def output_grid(self, name: str) -> Grid:
        g = self.quant["layers"][name]["output"]
        return Grid(float(self.tensors[f"{name}.output_scale"]), int(g["bits"]), bool(g["signed"]))

    def points(self) -> list[tuple[Point, Grid]]:
        out = []
        for p in self.quant["points"]:
            point = Point(p["node"], p["kind"], p["end"], p.get("layer"), p.get("consumer"),
                          bool(p.get("final", False)))
            if point.kind == "layer":
                out.append((point, self.output_grid(str(point.layer))))
            else:
                out.append((point, Grid.from_dict(p["grid"])))
        return out

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "plan": json.dumps(self.plan, sort_keys=True),
            "quant": json.dumps(self.quant, sort_keys=True),
        }
        meta["sha256"] = digest(self.tensors, meta)
        return meta

    def validate(self) -> None:
        """Check tensor names, dtypes and shapes against the plan; raises BadCheckpointError."""
        validate(self.tensors, self.plan, self.quant)

    def save(self, path: str | Path) -> Path:
        """Write the ``.safetensors`` file (validated first)."""
        self.validate()
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(path), metadata=self.metadata())
        return path


def _fail(path: object, why: str) -> BadCheckpointError:
    return BadCheckpointError(f"{path} is not a valid bitplan checkpoint: {why}")


def validate(
    tensors: dict[str, torch.Tensor], plan: Any, quant: Any, where: object = "checkpoint",
    version: str = VERSION,
) -> None:
    """Everything a reader relies on, checked against the embedded plan (a file of
    ``version``)."""
    try:
        rows = parse_rows(plan)
    except BadPlanError as exc:
        raise _fail(where, f"its plan is invalid: {exc.message}") from exc
    if not isinstance(quant, dict) or quant.get("version") != 1:
        raise _fail(where, "the 'quant' metadata is missing or has an unknown version")
    layers = quant.get("layers")
    if not isinstance(layers, dict) or set(layers) != {r.name for r in rows}:
        raise _fail(where, "the 'quant' layer table does not match the plan's layers")
    expected: dict[str, Spec] = {}
    for row in rows:
        info = layers[row.name]
        try:
            shape = tuple(int(v) for v in info["weight_shape"])
            for side in ("input", "output"):
                int(info[side]["bits"]), bool(info[side]["signed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(where, f"layer {row.name!r} has an incomplete 'quant' entry") from exc
        if row.params is not None and math.prod(shape) != row.params:
            raise _fail(where, f"layer {row.name!r}: weight shape {shape} does not match the plan")
        if info["input"]["bits"] != row.input_bits:
            raise _fail(where, f"layer {row.name!r}: input bits differ from the plan")
        fan_in = math.prod(shape) // shape[0] if shape and shape[0] else 0
        if row.group_size is not None and not group_fits(fan_in, row.group_size):
            raise _fail(where, f"layer {row.name!r}: group_size {row.group_size} does not "
                        f"divide its fan-in {fan_in}")
        expected.update(expected_specs(row, shape, version))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise _fail(where, f"missing tensors {missing[:5]}")
    if extra:
        raise _fail(where, f"unexpected tensors {extra[:5]}")
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise _fail(
                where,
                f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}",
            )
    for row in rows:
        p = row.name + "."
        for s in ("weight_scale", "input_scale", "output_scale", "drq_low_scale"):
            if p + s not in expected:
                continue
            t = tensors[p + s]
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                raise _fail(where, f"{p + s} must be finite and positive")
        c = tensors[p + "requant_c"]
        if c.numel() and (int(c.min()) < 0 or int(c.max()) > 31):
            raise _fail(where, f"{p}requant_c must lie in 0..31")
        if row.drq is not None:
            region = tuple(int(v) for v in tensors[p + "drq_region"])
            if region != row.drq.region or int(tensors[p + "drq_threshold"]) != row.drq.threshold:
                raise _fail(where, f"{p}drq_* tensors disagree with the plan's drq entry")
            _check_drq_grid(where, row, float(tensors[p + "input_scale"]),
                            bool(layers[row.name]["input"]["signed"]))
    points = quant.get("points")
    if not isinstance(points, list):
        raise _fail(where, "the 'quant' metadata has no point list")
    for p in points:
        if not isinstance(p, dict) or p.get("kind") not in ("layer", "add", "pool"):
            raise _fail(where, "a materialisation point is malformed")
        if p["kind"] == "layer" and p.get("layer") not in layers:
            raise _fail(where, f"point {p.get('node')!r} names an unknown layer")
        if p["kind"] != "layer":
            try:
                grid = Grid.from_dict(p["grid"])
            except (KeyError, TypeError, ValueError) as exc:
                raise _fail(where, f"point {p.get('node')!r} has no grid") from exc
            if not (math.isfinite(grid.scale) and grid.scale > 0 and 2 <= grid.bits <= 16):
                raise _fail(where, f"point {p.get('node')!r} has an invalid grid")


def _check_drq_grid(where: object, row: PlanRow, scale: float, signed: bool) -> None:
    """A DRQ layer's stored input grid must be the one its threshold was calibrated on (the
    plan row's ``drq.scale`` / ``drq.signed``, stored as float32): the threshold counts INT8
    units of that grid, so on another grid it selects other regions."""
    assert row.drq is not None
    want = float(torch.tensor(row.drq.scale, dtype=torch.float32))
    if scale != want or signed != row.drq.signed:
        raise _fail(where, f"layer {row.name!r}: its stored input grid (input_scale {scale!r}, "
                    f"signed {signed}) is not the grid its DRQ threshold was calibrated on "
                    f"(the plan's drq.scale {row.drq.scale!r}, signed {row.drq.signed}); "
                    "quantize the model again with this plan")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and validate a checkpoint file (safetensors only, nothing is unpickled).

    Raises BadCheckpointError for a missing, foreign, tampered or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise _fail(path, f"it is not a readable .safetensors file ({exc})") from exc
    fmt = meta.get("format")
    if fmt not in READABLE:
        raise _fail(path, f"format tag is {fmt!r}, expected one of {sorted(READABLE)}")
    if meta.get("version") != READABLE[fmt]:
        raise _fail(path, f"version is {meta.get('version')!r}, expected {READABLE[fmt]} for "
                    f"{fmt}")
    if meta.get("sha256") != digest(tensors, meta):
        raise _fail(path, "its content digest does not match (the file was modified)")
    try:
        plan = json.loads(meta["plan"])
        quant = json.loads(meta["quant"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise _fail(path, "the plan / quant metadata is missing or not JSON") from exc
    validate(tensors, plan, quant, path, READABLE[fmt])
    if fmt == "bitplan-qckpt/1" and any(r.group_size is not None for r in parse_rows(plan)):
        raise _fail(path, f"{fmt} has no per-group weight scales, but its plan uses group_size")
    ckpt = Checkpoint(tensors, plan, quant)
    for row in ckpt.rows.values():  # older files: the low-bit weights' max|W| scales
        if row.drq is not None and f"{row.name}.drq_low_scale" not in tensors:
            tensors[f"{row.name}.drq_low_scale"] = weight_scales(
                ckpt.dequantized_weight(row.name), min(row.w_bits, row.drq.low_bits))
    return ckpt
