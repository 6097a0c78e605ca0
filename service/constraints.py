"""The constraints of a request (``POST /plan``'s ``constraints`` field, ``bitplan plan``'s flags).

Exactly the schema of DESIGN.md "Constraints", version 1. Every field but ``limits`` has a
default; unknown fields, non-positive or non-finite numbers, bit widths outside 2..8 and
contradictory limits are refused with a message naming the field. Units: MB = 1e6 bytes,
``bops_g`` = 1e9 bit operations per sample, latency in milliseconds; ``*_ratio`` limits are
relative to the same model with every candidate layer at INT8 weights and activations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from solver.errors import BadConstraintsError
from solver.hardware import profiles
from solver.options import ALLOWED_BITS
from solver.problem import Limits as SolverLimits

# hardware names the job measures itself (per-layer latency in that runtime) instead of a
# roofline profile: ONNX Runtime on the worker's CPU (batch 1, one thread)
MEASURED_HARDWARE = ("onnxruntime-cpu",)

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Bits = Annotated[int, Field(ge=min(ALLOWED_BITS), le=max(ALLOWED_BITS))]
GroupSize = Annotated[int, Field(ge=1, le=1 << 20, strict=True)]
# Activation bits the sensitivity engine measures Omega for (sensitivity.engine.ACTIVATION_BITS;
# a test keeps the two equal) and plan rows carry; DRQ adds its 8/4 mixes on top.
ACTIVATION_CHOICES = (4, 8)


def _check_bits(v: int | None) -> int | None:
    if v is not None and v not in ALLOWED_BITS:
        raise ValueError(f"{v} bits is not supported; allowed bits: {list(ALLOWED_BITS)}")
    return v

RESOURCES = ("size", "bops", "latency")
# solver resource, absolute field, ratio field, solver units per absolute unit
_LIMIT_FIELDS = (
    ("size_bytes", "size_mb", "size_ratio", 1e6),
    ("bops", "bops_g", "bops_ratio", 1e9),
    ("latency_ms", "latency_ms", "latency_ratio", 1.0),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Upper bounds on the quantized model. Give at least one; per resource either the absolute
    limit or the ratio, not both."""

    size_mb: Positive | None = Field(None, description="packed weights + scales, MB = 1e6 bytes")
    bops_g: Positive | None = Field(None, description="1e9 bit operations per sample")
    latency_ms: Positive | None = Field(None, description="needs hardware or latency_table")
    size_ratio: Positive | None = Field(None, description="fraction of the all-INT8 size")
    bops_ratio: Positive | None = Field(None, description="fraction of the all-INT8 BOPS")
    latency_ratio: Positive | None = Field(None, description="fraction of the all-INT8 latency")

    @model_validator(mode="after")
    def _one_per_resource(self) -> Limits:
        given = 0
        for _, absolute, ratio, _ in _LIMIT_FIELDS:
            a, r = getattr(self, absolute), getattr(self, ratio)
            if a is not None and r is not None:
                raise ValueError(f"give {absolute} or {ratio}, not both")
            given += (a is not None) + (r is not None)
        if given == 0:
            raise ValueError(
                "give at least one limit: size_mb, bops_g, latency_ms or a *_ratio of the "
                "all-INT8 model"
            )
        return self

    @property
    def wants_latency(self) -> bool:
        return self.latency_ms is not None or self.latency_ratio is not None

    def to_solver(self, reference: Mapping[str, float | None]) -> SolverLimits:
        """The solver's limits (bytes, bit operations, ms): absolute limits in their units,
        ratios times ``reference``, the all-INT8 totals (``solver.options.reference_totals``).
        The one place the request's limit names are read. Raises BadConstraintsError when a
        ratio's reference is unknown (a latency ratio without a latency for every layer)."""
        out: dict[str, float | None] = {}
        for resource, absolute, ratio, unit in _LIMIT_FIELDS:
            a, r = getattr(self, absolute), getattr(self, ratio)
            out[resource] = None
            if a is not None:
                out[resource] = a * unit
            elif r is not None:
                base = reference.get(resource)
                if base is None:
                    raise BadConstraintsError(
                        f"limits.{ratio} needs the all-INT8 {resource} of every layer: set a "
                        "hardware profile or a latency_table with w8a8 for every layer"
                    )
                out[resource] = r * base
        return SolverLimits(**out)


class DRQ(_Strict):
    """Region-based activation precision (used when activation_bits allows less than 8)."""

    enabled: bool = True
    region_sizes: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=lambda: [2, 4, 8], min_length=1, max_length=8
    )
    sensitive_fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.5], min_length=1, max_length=16
    )

    @field_validator("region_sizes", "sensitive_fractions")
    @classmethod
    def _unique_sorted(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError("values must be distinct")
        return sorted(v)


class Pin(_Strict):
    """Weight bits forced on the first / last quantizable layer (null: not pinned)."""

    first: Bits | None = 8
    last: Bits | None = 8

    @field_validator("first", "last")
    @classmethod
    def _allowed(cls, v: int | None) -> int | None:
        return _check_bits(v)


class Hessian(_Strict):
    """Hutchinson trace estimation (one sample = one Rademacher vector, one Hessian-vector
    product per layer): sampling stops once every layer's trace estimate has a relative
    standard error (standard error / mean) of at most ``tol``, checked after the first
    ``min(10, max_iter)`` samples, or at ``max_iter`` samples; a layer whose mean is not
    positive stops only at ``max_iter`` and is reported as not converged."""

    max_iter: int = Field(200, ge=2, le=100_000, description="most Hutchinson samples")
    tol: float = Field(
        0.05, gt=0, lt=1,
        description="target relative standard error of each layer's trace (stderr / mean)",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batch_size: int | None = Field(
        None, ge=1, le=65_536,
        description="samples per Hessian pass (null: as many as the memory budget allows); "
        "the estimate does not depend on it",
    )
    sampling: Literal["auto", "chunk", "all"] = Field(
        "auto",
        description="which samples a probe pass sees: 'chunk' (a fresh random chunk of "
        "batch_size samples, default 8 within the memory budget: unbiased for the same mean "
        "loss, its standard error includes the sampling of data, and a pass costs the same "
        "whatever N), 'all' (every calibration sample, chunk after chunk: a pass costs N), or "
        "'auto' (chunk while its projected samples to tol cost less than all's fewest, else "
        "all from the start again)",
    )
    omega: Literal["trace", "diagonal", "measured"] = Field(
        "diagonal",
        description="how each option's Omega is estimated: 'trace' (HAWQ-V3, Tr(H)/n * "
        "||Q(W) - W||^2 from the Hessian traces), 'diagonal' (sum_i H_ii * (Q(W)_i - W_i)^2 "
        "with the Hessian diagonal from the same probes; activations stay trace-based) or "
        "'measured' (twice the calibration loss increase with only that layer quantized; "
        "L x bit-widths extra forward passes)",
    )
    measured_loss: Literal["job", "label_free"] = Field(
        "job",
        description="omega 'measured' only: the loss whose increase is measured: 'job' (the "
        "job's own) or 'label_free' (a classifier's KL divergence to the FP32 model's softmax; "
        "other jobs their own loss)",
    )
    bias_corrected: bool = Field(
        True,
        description="price each weight option after the quantize stage's bias correction "
        "(its checkpoint stores b - E[op(x, Q(W) - W)]): the Hessian Omegas are multiplied by "
        "the Gauss-Newton share of the option's damage that the correction keeps "
        "(sensitivity/meanshift.py: from the sweep's output-space probe passes, no extra "
        "pass; 256 separate probe passes of 16 samples when every block needs HVPs), the "
        "measured Omega quantizes with the correction; false: the uncorrected weight error",
    )


class Quantize(_Strict):
    """How the quantize stage (and every Omega, which prices the same quantizer) quantizes."""

    weight_clip: Literal["max", "mse", "hessian"] = Field(
        "max",
        description="weight scales per output channel (or group): 'max' (max|W| maps to the "
        "largest code), 'mse' (the clipping of max|W|, 1.0 to 0.3 in steps of 0.025, with the "
        "least squared rounding error) or 'hessian' (the clipping with the least "
        "sum_i H_ii (Q(W)_i - W_i)^2, H_ii the Hessian diagonal from the sensitivity sweep's "
        "own probes; chosen per layer and width there and kept in sensitivity.json; lower "
        "held-out KL than 'max' at 5 of 12 bench budgets, never higher, for a 1.5-4.4x "
        "slower sensitivity stage: docs/quality.md)",
    )


class Constraints(_Strict):
    """A request's constraints (DESIGN.md "Constraints", version 1)."""

    version: Literal[1] = 1
    limits: Limits
    weight_bits: list[Bits] = Field(default_factory=lambda: [4, 8], min_length=1, max_length=7)
    weight_group_sizes: list[GroupSize | None] = Field(
        default_factory=lambda: [None], min_length=1, max_length=8,
        description="weight scale granularity: null = per output channel, g = one scale per g "
        "inputs (layers whose fan-in g does not divide are not offered g)",
    )
    activation_bits: list[Bits] = Field(
        default_factory=lambda: [8], min_length=1, max_length=len(ACTIVATION_CHOICES),
        description=f"candidate activation bits, from {list(ACTIVATION_CHOICES)} (DRQ adds its "
        "8/4 region mixes when 4 is allowed)",
        json_schema_extra={"items": {"type": "integer", "enum": list(ACTIVATION_CHOICES)}},
    )
    drq: DRQ = Field(default_factory=DRQ)
    pin: Pin = Field(default_factory=Pin)
    hardware: str | None = Field(None, min_length=1, max_length=64)
    latency_table: dict[str, dict[str, NonNegative]] | None = Field(
        None, description="{layer name: {option tag (e.g. w4a8): ms}}"
    )
    hessian: Hessian = Field(default_factory=Hessian)
    quantize: Quantize = Field(default_factory=Quantize)
    loss: Literal["auto", "cross_entropy", "kl", "mse"] = Field(
        "auto",
        description="the loss whose curvature ranks the layers (and that the measured Omega "
        "measures): 'auto' (cross-entropy with labels; without them KL to the FP32 softmax "
        "for [N, classes] outputs and token logits, MSE to the FP32 outputs otherwise), "
        "'cross_entropy' (needs labels), 'kl', or 'mse' (e.g. an embedding model, whose [N, D] "
        "output 'auto' would take for logits)",
    )

    @field_validator("weight_group_sizes")
    @classmethod
    def _group_sizes(cls, v: list[int | None]) -> list[int | None]:
        if len(set(v)) != len(v):
            raise ValueError("group sizes must be distinct")
        return ([None] if None in v else []) + sorted(g for g in v if g is not None)

    @field_validator("weight_bits", "activation_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("bit widths must be distinct")
        for b in v:
            _check_bits(b)
        return sorted(v)

    @field_validator("activation_bits")
    @classmethod
    def _activation_bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in ACTIVATION_CHOICES]
        if bad:
            raise ValueError(
                f"activation bits {bad} are not supported; choose from {list(ACTIVATION_CHOICES)}"
            )
        return v

    @field_validator("hardware")
    @classmethod
    def _profile(cls, v: str | None) -> str | None:
        if v is not None and v not in profiles() and v not in MEASURED_HARDWARE:
            known = sorted(profiles()) + sorted(MEASURED_HARDWARE)
            raise ValueError(f"unknown hardware profile {v!r}; known: {known}")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Constraints:
        if self.limits.wants_latency and self.hardware is None and self.latency_table is None:
            raise ValueError(
                "a latency limit needs a hardware profile (hardware) or a latency_table"
            )
        if self.hardware is not None and self.latency_table is not None:
            raise ValueError("give hardware or latency_table, not both")
        if self.latency_table is not None and not self.latency_table:
            raise ValueError("latency_table is empty")
        return self

    @property
    def uses_drq(self) -> bool:
        """DRQ regions are calibrated only when enabled and some activations may go below 8."""
        return self.drq.enabled and min(self.activation_bits) < 8

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _messages(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "constraints"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (see the constraints schema in the README)"
        out.append({"field": loc, "message": msg})
    return out


def parse_constraints(raw: str | bytes | dict[str, Any]) -> Constraints:
    """Validate a constraints document (JSON text or a dict). Raises BadConstraintsError with
    one ``{field, message}`` per problem in ``detail``."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadConstraintsError(f"constraints are not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadConstraintsError("constraints must be a JSON object with at least 'limits'")
    try:
        return Constraints.model_validate(raw)
    except ValidationError as exc:
        problems = _messages(exc)
        text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise BadConstraintsError(f"invalid constraints: {text}", detail=problems) from None
