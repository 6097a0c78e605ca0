"""Quantizers, integer checkpoints, fake-quant / DRQ / integer-only runtimes and evaluation.

Entry points: :func:`apply` (program + plan + calibration data -> :class:`QuantizeResult`) and
:func:`load` (checkpoint + program -> runnable fake-quant module).
"""

from .api import QuantizeResult, apply, load
from .config import QuantizeConfig

__all__ = ["QuantizeConfig", "QuantizeResult", "apply", "load"]
