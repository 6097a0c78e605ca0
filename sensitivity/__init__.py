"""Model intake, Hessian-trace sensitivity and DRQ region calibration.

Entry point: ``sensitivity.measure(intake, HessianConfig(...), device, progress)`` ->
``SensitivityResult``; the intake comes from ``sensitivity.intake.intake(model, calib, cfg)``
(``sensitivity.intake`` stays the module, so ``intake`` is not re-exported here).
Names are resolved lazily so ``import sensitivity`` does not load torch or pyhessian.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "measure": "sensitivity.engine",
    "SensitivityResult": "sensitivity.engine",
    "LayerSensitivity": "sensitivity.engine",
    "HessianConfig": "sensitivity.hessian",
    "IntakeConfig": "sensitivity.intake",
    "Intake": "sensitivity.intake",
    "LayerInfo": "sensitivity.layers",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
