"""Checks run on a submission before it is queued, so that a bad upload fails the request (4xx)
and not, minutes later, the job; and the intake the worker runs, with the same typed errors.

At submission the model is not loaded: its forward signature is read from the archive's JSON
(``sensitivity.signature``: input names, dtypes, shapes, embedding sizes, the output's shape;
nothing unpickled, milliseconds), the calibration file is loaded (``load_calibration``: header,
finiteness, labels) and checked against that signature as the intake would (names, shapes,
integer dtypes and token-id ranges, labels against the output). The full load
(``torch.export.load``, guarded against pickles) and a forward pass happen in the worker
(:func:`checked_intake`); a model that fails there fails its job with ``bad_model``. An archive
whose JSON this reader does not know is loaded in full at submission instead, as before.
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


def checked_intake(model_path: Path, calib_path: Path, cfg: Any) -> Any:
    """``sensitivity.intake.intake`` with every failure typed: BadModelError for what torch
    raises on a corrupt archive or a graph that does not run, BadCalibrationError for unusable
    calibration data (a ValueError). The worker's first stage, and the submission's fallback."""
    from sensitivity.intake import intake

    try:
        return intake(model_path, calib_path, cfg)
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


def validate_submission(
    model_path: Path,
    calib_path: Path,
    constraints: Constraints,
    holdout_fraction: float,
    max_calib_bytes: int | None = None,
) -> None:
    """Check the model + calibration pair before it is queued (see the module docstring).

    Raises BadModelError / BadCalibrationError / BadConstraintsError / TooLargeError.
    """
    from sensitivity.intake import IntakeConfig, check_loss_labels, load_calibration
    from sensitivity.signature import SignatureUnreadable, check_inputs, read_signature

    check_model_file(model_path)
    check_calibration_file(calib_path)
    cfg = IntakeConfig(
        holdout_fraction=holdout_fraction,
        seed=constraints.hessian.seed,
        max_calib_bytes=max_calib_bytes,
        loss=constraints.loss,
    )
    try:
        signature = read_signature(model_path)
    except SignatureUnreadable as exc:
        log.info("model signature not readable from its JSON (%s): loading the model", exc)
        checked_intake(model_path, calib_path, cfg)
        return
    calib = load_calibration(calib_path, max_calib_bytes)
    check_loss_labels(constraints.loss, calib.labels is not None)
    check_inputs(signature, calib)
