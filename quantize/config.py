"""The quantize stage's configuration (a small validated dataclass with a JSON round-trip)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from solver.errors import BadConstraintsError

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
BIAS_CORRECTIONS = ("none", "weight", "layer")
WEIGHT_CLIPS = ("max", "mse", "hessian")  # quantize.clip.CLIP_MODES


@dataclass(frozen=True)
class QuantizeConfig:
    """How activation ranges are calibrated and how the model is run while doing so.

    - ``calibration``: ``"minmax"`` (the observed range), ``"percentile"`` (the range between
      the ``100 - percentile`` and ``percentile`` percentiles, from a streamed histogram) or
      ``"mse"`` (the clipped range whose grid at the tensor's bits has the least squared error
      over that histogram). Omega's activation quantizer uses min/max ranges. DRQ
      layers use the input grid stored in their plan row: their thresholds were calibrated on
      it.
    - ``percentile``: in (50, 100], e.g. 99.99.
    - ``histogram_bins``: resolution of the percentile histogram.
    - ``out_bits``: bits of tensors the integer model materialises that no quantized layer reads
      directly (residual-add outputs, pool inputs, outputs handed to float ops).
    - ``final_bits``: bits of a quantized layer's output that is a model output (the logits): a
      runtime keeps them wide, and rounding them to 8 bits would cost accuracy for nothing.
    - ``batch_size``: samples per forward pass when the program accepts any batch size (a
      program exported with a fixed batch size always runs at that size).
    - ``bias_correction``: store each quantized layer's bias minus the mean output shift that
      quantization causes on the calibration set (``quantize.biascorr``): ``"none"``;
      ``"weight"`` (the shift of its weight error); ``"layer"`` (of its weight error and its
      own input rounding together). Default ``"weight"``: lower held-out KL than ``"none"``
      for bitplan's plan at every budget of ``bench/quality.py`` (``docs/quality.md``). The
      checkpoint, fake-quant, the integer executor and the ONNX export all use the corrected
      bias.
    - ``weight_clip``: how weight scales are clipped (``quantize.clip``): ``"max"`` (max|W|
      per channel or group maps to the largest code), ``"mse"`` (the clip ratio with the least
      squared rounding error) or ``"hessian"`` (the least Hessian-weighted error; the ratios
      come from the sensitivity stage, ``apply(clip=...)``). Omega prices the same scales.
    """

    version: int = 1
    calibration: str = "minmax"
    percentile: float = 99.99
    histogram_bins: int = 2048
    out_bits: int = 8
    final_bits: int = 16
    batch_size: int = 64
    bias_correction: str = "weight"
    weight_clip: str = "max"

    def __post_init__(self) -> None:
        if self.version != 1:
            raise BadConstraintsError(f"unsupported quantize config version {self.version}; use 1")
        if self.calibration not in CALIBRATION_METHODS:
            raise BadConstraintsError(
                f"calibration must be one of {CALIBRATION_METHODS}, got {self.calibration!r}"
            )
        if not 50.0 < float(self.percentile) <= 100.0:
            raise BadConstraintsError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 16 <= int(self.histogram_bins) <= 1 << 20:
            raise BadConstraintsError(
                f"histogram_bins must be in 16..{1 << 20}, got {self.histogram_bins}"
            )
        if not 2 <= int(self.out_bits) <= 16:
            raise BadConstraintsError(f"out_bits must be in 2..16, got {self.out_bits}")
        if not 2 <= int(self.final_bits) <= 16:
            raise BadConstraintsError(f"final_bits must be in 2..16, got {self.final_bits}")
        if int(self.batch_size) < 1:
            raise BadConstraintsError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise BadConstraintsError(
                f"bias_correction must be one of {BIAS_CORRECTIONS}, got {self.bias_correction!r}"
            )

        if self.weight_clip not in WEIGHT_CLIPS:
            raise BadConstraintsError(
                f"weight_clip must be one of {WEIGHT_CLIPS}, got {self.weight_clip!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> QuantizeConfig:
        if not isinstance(obj, dict):
            raise BadConstraintsError("a quantize config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise BadConstraintsError(
                f"unknown quantize config field(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**obj)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantizeConfig:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadConstraintsError(f"quantize config is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)
