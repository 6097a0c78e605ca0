"""What every op translator sees: the builder, the value of each fx node, shapes and params."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from solver.errors import UnsupportedExportError

from .builder import GraphBuilder

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
          torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


@dataclass
class Context:
    """Translation state: ``env`` maps an fx node name to its ONNX value name (a tuple of
    names for multi-output ops)."""

    gm: fx.GraphModule
    builder: GraphBuilder
    env: dict[str, object] = field(default_factory=dict)
    _params: dict[str, torch.Tensor] | None = None

    def params(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            # every name of a shared tensor (a tied lm_head reads the embedding's weight)
            self._params = {**dict(self.gm.named_parameters(remove_duplicate=False)),
                            **dict(self.gm.named_buffers(remove_duplicate=False))}
        return self._params

    def value(self, arg: object, widen: bool = True) -> str:
        """The ONNX value of an fx argument (a node, or a Python scalar as a constant).

        With ``widen`` (every float op), a value that is the output of a 4-bit
        DequantizeLinear is handed over re-quantized to the 8-bit type on the same grid
        (exact): ONNX Runtime would otherwise fuse e.g. DQ(uint4) -> Add -> Q into a QLinearAdd
        it cannot run. Quantized layers read the 4-bit value directly (``widen=False``).
        """
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                return self.attr(str(arg.target))
            out = self.env[arg.name]
            if not isinstance(out, str):
                raise UnsupportedExportError(f"node {arg.name!r} has several outputs here")
            grid = self.builder.dq_grid.get(out)
            if widen and grid is not None and grid.bits <= 4:
                out = self.builder.widened(out, grid)
            return out
        if isinstance(arg, bool):
            raise UnsupportedExportError(f"a boolean argument ({arg}) where a tensor is expected")
        if isinstance(arg, (int, float)):
            return self.builder.const(float(arg))
        raise UnsupportedExportError(f"cannot express the argument {arg!r} in ONNX")

    def scalar(self, value: object, like: fx.Node) -> str:
        """A Python number as a constant of ``like``'s element type (float32 by default)."""
        val = like.meta.get("val")
        dtype = _NUMPY.get(val.dtype, np.float32) if isinstance(val, torch.Tensor) \
            else np.float32
        if isinstance(value, bool) and dtype is not np.bool_:
            raise UnsupportedExportError(f"a boolean argument ({value}) where a tensor is "
                                         "expected")
        return self.builder.const(value, dtype)

    def attr(self, target: str) -> str:
        """A float initializer of a parameter / buffer (shared per FQN)."""
        key = "attr:" + target
        if key not in self.env:
            t = self.params().get(target)
            if t is None:
                raise UnsupportedExportError(f"attribute {target!r} is not a tensor of the model")
            arr = t.detach().cpu()
            arr = arr.to(torch.float32) if arr.is_floating_point() else arr
            self.env[key] = self.builder.tensor(target, arr.numpy())
        return str(self.env[key])

    def array(self, arg: object) -> np.ndarray:
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            raise UnsupportedExportError(f"expected a parameter, got {arg!r}")
        return self.params()[str(arg.target)].detach().cpu().to(torch.float32).numpy()


def shape(node: object) -> tuple:
    """The node's shape from export metadata: ints, or None for a symbolic (dynamic) dim."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise UnsupportedExportError(f"node {getattr(node, 'name', node)!r} has no shape "
                                     "metadata (was the program made by torch.export?)")
    return tuple(int(d) if isinstance(d, int) or str(d).isdigit() else None for d in val.shape)


Translator = Callable[[Context, fx.Node], object]
