"""ONNX export of an integer checkpoint, and its check in ONNX Runtime.

Entry points: :func:`export_onnx` (program + checkpoint -> ``onnx.ModelProto``),
:func:`save_onnx`, :func:`verify` (checker + ONNX Runtime vs the fake-quant module).
Needs the ``[onnx]`` extra; without it, importing this package raises MissingDependencyError.
"""

from solver.errors import MissingDependencyError

try:
    import onnx as _onnx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        "ONNX export needs the onnx package; install bitplan's [onnx] extra "
        "(pip install -e \".[onnx]\")", detail={"extra": "onnx"},
    ) from exc

from .export import FORMAT, export_onnx, save_onnx, weight_bytes  # noqa: E402
from .verify import VerifyConfig, check, onnxruntime, session, verify  # noqa: E402

__all__ = ["FORMAT", "VerifyConfig", "check", "export_onnx", "onnxruntime", "save_onnx", "session",
           "verify", "weight_bytes"]
