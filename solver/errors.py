"""bitplan's typed errors, shared by every package.

They live here because ``solver`` is the one package with no torch dependency, so every other
package (and the REST layer) can import them cheaply. Each error carries a stable ``code`` that
the service maps to an HTTP status / job error in one place (``service/errors.py``), a message
that says what to fix, and an optional JSON-able ``detail``.
"""

from __future__ import annotations

from typing import Any


class BitplanError(Exception):
    """Base of all user-facing bitplan errors."""

    code: str = "error"

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class BadModelError(BitplanError):
    """The model file is not a loadable torch.export program or has nothing to quantize."""

    code = "bad_model"


class BadCalibrationError(BitplanError):
    """The calibration .safetensors file is missing tensors, mis-shaped or non-finite."""

    code = "bad_calibration"


class BadConstraintsError(BitplanError):
    """Limits, bit sets, pins or hardware settings are invalid."""

    code = "bad_constraints"


class BadProblemError(BitplanError):
    """A solver problem (JSON or dataclasses) is malformed."""

    code = "bad_problem"


class BadPlanError(BitplanError):
    """A plan does not match the model it is applied to, or is malformed."""

    code = "bad_plan"


class BadCheckpointError(BitplanError):
    """A checkpoint file is not a bitplan-qckpt or does not match the model."""

    code = "bad_checkpoint"


class InfeasibleError(BitplanError):
    """No precision assignment meets every limit; ``detail`` holds the solver's diagnosis."""

    code = "infeasible"


class CancelledError(BitplanError):
    """The job was cancelled while it ran."""

    code = "cancelled"


class NotFoundError(BitplanError):
    """A job or artifact that does not exist."""

    code = "not_found"


class TooLargeError(BitplanError):
    """An upload or tensor exceeds the configured size limit."""

    code = "too_large"


class ResourceLimitError(BitplanError):
    """The job cannot run within the memory budget (e.g. one calibration sample's Hessian
    pass needs more than ``BITPLAN_MEMORY_GB``); ``detail`` holds the measured cost and the
    budget in bytes."""

    code = "resource_limit"


class UnsupportedExportError(BitplanError):
    """The model holds an op or layer kind the ONNX exporter cannot express (named in the
    message); nothing was written."""

    code = "unsupported_export"


class ExportMismatchError(BitplanError):
    """An exported model computes something else than the fake-quant module it was made from
    (``detail`` holds the measured agreement)."""

    code = "export_mismatch"


class MissingDependencyError(BitplanError):
    """An optional dependency is not installed; the message names the extra to install."""

    code = "missing_dependency"


class StorageError(BitplanError):
    """The data directory is full (or out of quota) while writing; nothing half-written is kept."""

    code = "storage"
