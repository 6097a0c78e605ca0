"""Plan rows with a ``drq`` entry: checkpoint tensors, the DRQ runtime in the loaded module."""

from __future__ import annotations

import pytest
import torch

from quantize import QuantizeConfig, apply, load
from quantize.checkpoint import read_checkpoint
from quantize.integer import IntegerExecutor, UnsupportedOpError

DRQ = {"region": [2, 2], "threshold": 40, "sensitive_fraction": 0.3, "high_bits": 8,
       "low_bits": 4}


@pytest.fixture(scope="module")
def drq_result(cnn_program, plan_for, heldout_eval):
    plan = plan_for(cnn_program, drq={"conv2": DRQ})
    cfg = QuantizeConfig(calibration="percentile", percentile=99.0)
    return apply(cnn_program, plan, *heldout_eval, cfg)


def test_drq_tensors_and_report(drq_result, cnn_int8) -> None:
    t = drq_result.tensors
    assert t["conv2.drq_threshold"].dtype == torch.int32 and int(t["conv2.drq_threshold"]) == 40
    assert t["conv2.drq_region"].tolist() == [2, 2]
    assert "conv1.drq_threshold" not in t
    # the DRQ input grid is INT8 min/max, whatever the calibration method says
    assert drq_result.checkpoint.input_grid("conv2") == cnn_int8.checkpoint.input_grid("conv2")
    layer = {r["name"]: r for r in drq_result.report["layers"]}["conv2"]
    assert layer["input_bits"] == 8
    assert 0.0 < layer["drq"]["holdout_int4_fraction"] < 1.0
    assert drq_result.report["metrics"]["top1_agreement"] > 0.8


def test_loaded_module_runs_drq(drq_result, cnn_program, split, tmp_path) -> None:
    from quantize.drq import DRQConv2d

    path = drq_result.save(tmp_path / "drq.safetensors")
    module = load(path, cnn_program)
    drq = [m for m in module.modules() if isinstance(m, DRQConv2d)]
    assert len(drq) == 1 and drq[0].region == (2, 2) and drq[0].threshold == 40
    x = split[1].args[0][:32]
    with torch.no_grad():
        assert torch.equal(module(x), drq_result.module(x))
    assert 0.0 < drq[0].last_int4_fraction < 1.0
    with pytest.raises(UnsupportedOpError, match="DRQ"):
        IntegerExecutor(cnn_program, read_checkpoint(path))
