"""Checks run on a submission before it is queued, so that a bad upload fails the request (4xx)
and not, minutes later, the job.

The model must be a pt2 zip that ``torch.export.load`` accepts (never unpickled), the
calibration file a safetensors file whose tensors fit the model's inputs and are finite; both
checks are the intake's own (``sensitivity.intake``), run once here on the uploaded files.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

from solver.errors import BadCalibrationError, BadModelError, BitplanError

from .constraints import Constraints

log = logging.getLogger(__name__)


def check_model_file(path: Path) -> None:
    """Cheap header checks before torch sees the file. Raises BadModelError."""
    size = path.stat().st_size
    if size == 0:
        raise BadModelError("the model file is empty; upload the .pt2 written by torch.export.save")
    if not zipfile.is_zipfile(path):
        raise BadModelError(
            "the model file is not a .pt2 archive (a zip written by torch.export.save); "
            "pickled checkpoints (torch.save) are refused"
        )


def check_calibration_file(path: Path) -> None:
    if path.stat().st_size < 8:
        raise BadCalibrationError(
            "the calibration file is empty or truncated; upload a .safetensors file with an "
            "'inputs' tensor [N, ...] (and optional 'labels')"
        )


def validate_submission(
    model_path: Path,
    calib_path: Path,
    constraints: Constraints,
    holdout_fraction: float,
    max_calib_bytes: int | None = None,
) -> dict[str, Any]:
    """Load and check the model + calibration pair like a job would; returns the model summary.

    Raises BadModelError / BadCalibrationError / BadConstraintsError / TooLargeError.
    """
    from sensitivity.intake import IntakeConfig, intake

    check_model_file(model_path)
    check_calibration_file(calib_path)
    cfg = IntakeConfig(
        holdout_fraction=holdout_fraction,
        seed=constraints.hessian.seed,
        max_calib_bytes=max_calib_bytes,
    )
    try:
        result = intake(model_path, calib_path, cfg)
    except BitplanError:
        raise
    except ValueError as exc:
        # e.g. fewer than two calibration samples: the split needs one to hold out
        raise BadCalibrationError(f"unusable calibration data: {exc}") from None
    except Exception as exc:  # torch raises many types on a corrupt archive
        log.info("model intake failed", exc_info=True)
        raise BadModelError(
            f"could not load the model with its calibration data ({type(exc).__name__}: {exc})"
        ) from None
    return result.summary()
