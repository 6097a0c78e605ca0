"""The fake-quant module of models whose residual adds feed each other directly.

MobileNetV2's inverted residual blocks end without an activation, so one block's add is the
next block's add input. Replacing the first add by its quantized module renames that node;
the second add must still find its input's grid (this failed on MobileNetV2 with a KeyError).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantize import apply
from quantize.integer import IntegerExecutor


class AddChain(nn.Module):
    """A stem conv and two residual convs whose adds follow each other with nothing between."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.c1(h)
        h = h + self.c2(h)  # the first add's output is this add's input
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def chain_program() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = AddChain().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(model, (torch.randn(4, 1, 8, 8),),
                               dynamic_shapes=({0: batch},))


def test_chained_adds_quantize_and_run_integer(chain_program, plan_for, split,
                                               tmp_path) -> None:
    plan = plan_for(chain_program)
    res = apply(chain_program, plan, *split)
    x = split[1].args[0]
    with torch.no_grad():
        fq = res.module(x)
        ref = chain_program.module()(x)
    # all-INT8 on random weights: the outputs follow the float model closely (measured
    # correlation 0.99982; 0.98 leaves room for any CPU; a wrong add grid scales a branch)
    corr = torch.corrcoef(torch.stack([fq.flatten(), ref.flatten()]))[0, 1]
    assert float(corr) > 0.98
    path = res.save(tmp_path / "m.safetensors")
    out = IntegerExecutor.from_checkpoint(path, chain_program)(x)
    fq_codes = torch.round(fq.to(torch.float64) / out.grid.scale)
    assert float((out.codes.to(torch.float64) - fq_codes).abs().max()) <= 1.0


def test_chained_adds_export_to_onnx(chain_program, plan_for, split) -> None:
    pytest.importorskip("onnxruntime")
    from quantize.onnx import export_onnx, verify

    res = apply(chain_program, plan_for(chain_program), *split)
    model = export_onnx(chain_program, res.checkpoint)
    report = verify(chain_program, res.checkpoint, model, split[1])
    assert report["passed"]
