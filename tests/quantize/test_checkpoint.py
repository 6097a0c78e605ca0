"""Checkpoint round-trip, and refusal of foreign, tampered and inconsistent files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quantize import load
from quantize.checkpoint import FORMAT, Checkpoint, digest, read_checkpoint
from solver.errors import BadCheckpointError, BadPlanError


def test_round_trip(cnn_int8, tmp_path) -> None:
    path = cnn_int8.save(tmp_path / "model.safetensors")
    assert (tmp_path / "report.json").is_file()
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(
        json.dumps(cnn_int8.report)
    )
    ckpt = read_checkpoint(path)
    assert ckpt.plan == cnn_int8.checkpoint.plan
    assert ckpt.quant == cnn_int8.checkpoint.quant
    assert set(ckpt.tensors) == set(cnn_int8.tensors)
    for name, t in cnn_int8.tensors.items():
        assert ckpt.tensors[name].dtype == t.dtype
        assert torch.equal(ckpt.tensors[name], t), name
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and json.loads(meta["plan"]) == ckpt.plan
    for layer in ("conv1", "conv2", "fc"):
        for suffix in ("weight_q", "weight_scale", "bias", "bias_q", "input_scale",
                       "output_scale", "requant_b", "requant_c"):
            assert f"{layer}.{suffix}" in ckpt.tensors


def test_loaded_module_matches_apply(cnn_int8, cnn_program, split, tmp_path) -> None:
    path = cnn_int8.save(tmp_path / "m.safetensors")
    module = load(path, cnn_program)
    x = split[1].args[0][:64]
    with torch.no_grad():
        assert torch.equal(module(x), cnn_int8.module(x))


def _write(path, tensors, meta) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _resigned(ckpt: Checkpoint, tensors, **meta_changes) -> dict[str, str]:
    meta = {**ckpt.metadata(), **meta_changes}
    meta.pop("sha256")
    meta["sha256"] = digest(tensors, meta)
    return meta


def test_refuses_foreign_files(tmp_path, cnn_int8) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(BadCheckpointError, match="format tag"):
        read_checkpoint(plain)
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, str(pickle))
    with pytest.raises(BadCheckpointError, match="not a readable"):
        read_checkpoint(pickle)
    with pytest.raises(BadCheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.safetensors")
    ckpt = cnn_int8.checkpoint
    for fmt, version in (("bitplan-qckpt/2", "1"), ("bitplan-qckpt/1", "2"),
                         ("bitplan-qckpt/3", "2"), ("bitplan-qckpt/4", "4")):
        wrong = tmp_path / "wrong.safetensors"
        _write(wrong, ckpt.tensors, _resigned(ckpt, ckpt.tensors, format=fmt, version=version))
        with pytest.raises(BadCheckpointError, match="version|format tag"):
            read_checkpoint(wrong)


def test_refuses_tampered_bytes(tmp_path, cnn_int8) -> None:
    path = cnn_int8.save(tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # flip a bit in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(BadCheckpointError, match="digest"):
        read_checkpoint(path)
    path.write_bytes(bytes(raw[:100]))  # truncated header
    with pytest.raises(BadCheckpointError):
        read_checkpoint(path)


def test_refuses_tensors_that_disagree_with_the_plan(tmp_path, cnn_int8) -> None:
    ckpt = cnn_int8.checkpoint
    cases = {
        "missing": {k: v for k, v in ckpt.tensors.items() if k != "conv2.bias_q"},
        "extra": {**ckpt.tensors, "conv2.secret": torch.zeros(2)},
        "dtype": {**ckpt.tensors, "fc.bias_q": ckpt.tensors["fc.bias_q"].to(torch.int64)},
        "shape": {**ckpt.tensors, "fc.weight_scale": ckpt.tensors["fc.weight_scale"][:3]},
        "packing": {**ckpt.tensors, "fc.weight_q": ckpt.tensors["fc.weight_q"].view(torch.uint8)},
    }
    for why, tensors in cases.items():
        path = tmp_path / f"{why}.safetensors"
        _write(path, tensors, _resigned(ckpt, tensors))
        with pytest.raises(BadCheckpointError):
            read_checkpoint(path)


def test_load_refuses_a_checkpoint_for_another_model(tmp_path, cnn_int8, mlp_program) -> None:
    path = cnn_int8.save(tmp_path / "m.safetensors")
    with pytest.raises(BadPlanError, match="another model"):
        load(path, mlp_program)
