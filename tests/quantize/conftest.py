"""Fixtures for the quantize tests: plans built per PLAN_FORMAT, programs, data splits."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from quantize import QuantizeConfig, apply
from quantize.data import CalibrationSet
from quantize.graph import find_layers
from solver.options import size_bytes
from solver.plan import FORMAT as PLAN_FORMAT
from solver.plan import VERSION as PLAN_VERSION


def make_plan(
    program: torch.export.ExportedProgram,
    w_bits: Callable[[int, str], int] | int = 8,
    a_bits: Callable[[int, str], int] | int = 8,
    only: set[str] | None = None,
    drq: dict[str, dict] | None = None,
) -> dict:
    """A plan.json (current version) for ``program``: every layer (or those in ``only``) with the
    given bits. ``size_bytes`` is the solver's (packed storage plus float32 scales)."""
    rows = []
    for i, layer in enumerate(find_layers(program.module())):
        if only is not None and layer.name not in only:
            continue
        wb = w_bits(i, layer.name) if callable(w_bits) else w_bits
        ab = a_bits(i, layer.name) if callable(a_bits) else a_bits
        params = math.prod(layer.weight_shape)
        size = size_bytes(params, wb, layer.weight_shape[0])  # the solver's accounting
        spec = (drq or {}).get(layer.name)
        rows.append({
            "name": layer.name, "kind": layer.kind, "params": params, "macs": 0,
            "w_bits": wb, "a_bits": ab if spec is None else 8 * spec["sensitive_fraction"]
            + 4 * (1 - spec["sensitive_fraction"]),
            "weight_trace": None, "omega": 0.0, "size_bytes": float(size), "bops": 0.0,
            "latency_ms": None, "drq": spec,
        })
    total = sum(r["size_bytes"] for r in rows)
    params = sum(math.prod(layer.weight_shape) for layer in find_layers(program.module()))
    qparams = sum(r["params"] for r in rows)
    return {
        "version": PLAN_VERSION, "format": PLAN_FORMAT,
        "model": {"layers": len(rows), "params": params, "macs": 0,
                  "quantized_params": qparams, "other_params": params - qparams},
        "constraints": {}, "status": "optimal", "objective": 0.0,
        "totals": {"size_bytes": total, "bops": 0.0, "latency_ms": None},
        "limits": {"size_bytes": None, "bops": None, "latency_ms": None},
        "binding": [], "layers": rows, "diagnosis": None,
    }


def make_clip(program: torch.export.ExportedProgram, seed: int = 0,
              group_sizes: tuple[int | None, ...] = (None,)):
    """``ClipRatios("hessian")`` for every layer of ``program`` at every width (and group
    size that fits), chosen on the unfolded weights with a random positive diagonal (a
    stand-in for the sweep's): most channels get a ratio below 1, so the checkpoint's scales
    differ from max|W|'s."""
    from quantize.clip import ClipRatios, choose_ratios

    gen = torch.Generator().manual_seed(seed)
    params = dict(program.module().named_parameters())
    layers = {}
    for layer in find_layers(program.module()):
        w = params[layer.weight].detach()
        if layer.transposed:
            w = w.t()
        diag = torch.rand(w.shape, generator=gen) ** 4  # uneven weights: ratios vary
        fan_in = w[0].numel()
        layers[layer.name] = {(b, g): choose_ratios(w, b, g, diag)
                              for b in (2, 3, 4, 5, 6, 8) for g in group_sizes
                              if g is None or (fan_in % g == 0 and g < fan_in)}
    return ClipRatios("hessian", layers)


@pytest.fixture(scope="session")
def clip_for() -> Callable[..., object]:
    """:func:`make_clip`, as a fixture."""
    return make_clip


@pytest.fixture(scope="session")
def plan_for() -> Callable[..., dict]:
    """:func:`make_plan`, as a fixture (test modules do not import conftest)."""
    return make_plan


@pytest.fixture(scope="session")
def split(calib_digits) -> tuple[CalibrationSet, CalibrationSet]:
    """The 397 digits no model saw: 159 to calibrate, 238 to evaluate (so that one flipped
    prediction is less than half a point)."""
    x, y = calib_digits
    return CalibrationSet((x,), labels=y).split(0.6, seed=0)


@pytest.fixture(scope="session")
def cnn_program(cnn_pt2) -> torch.export.ExportedProgram:
    return torch.export.load(str(cnn_pt2))


@pytest.fixture(scope="session")
def mlp_program(mlp_pt2) -> torch.export.ExportedProgram:
    return torch.export.load(str(mlp_pt2))


@pytest.fixture(scope="session")
def resnet_program(resnet_pt2) -> torch.export.ExportedProgram:
    return torch.export.load(str(resnet_pt2))


@pytest.fixture(scope="session")
def heldout_eval(digits, calib_digits) -> tuple[CalibrationSet, CalibrationSet]:
    """Calibrate on 256 digits of the models' training part (PTQ calibration data is drawn from
    the training distribution) and evaluate on all 397 digits no model saw, so that a single
    flipped prediction moves accuracy by 0.25 points."""
    x, y = digits
    xh, yh = calib_digits
    return CalibrationSet((x[:256],), labels=y[:256]), CalibrationSet((xh,), labels=yh)


@pytest.fixture(scope="session")
def cnn_int8(cnn_program, heldout_eval):
    """The digits CNN quantized with an all-8-bit plan."""
    train, holdout = heldout_eval
    return apply(cnn_program, make_plan(cnn_program), train, holdout, QuantizeConfig())
