"""ONNX export: what ONNX Runtime computes against the fake-quant module, the bytes of the
weight initializers against the plan, and refusals (unknown ops, missing runtime, mismatch).

Measured on the digits models (this machine): ONNX Runtime matches the fake-quant module on
every held-out digit's top-1, and 99 % of the output values lie within 1 step of the output
grid (the 99th percentile is 0 or 1 step). Single values can move further: where ONNX's float
arithmetic lands on the other side of a rounding tie than the checkpoint's integer one (about
1 in 10^5 values of a layer), a one-code change of a 4-bit input moves the next layer's outputs
by up to 12 of its 8-bit steps and a 16-bit logit by hundreds of its fine steps (0.07). So the
tests bound the 99th percentile (<= 1.5 steps; measured 0 or 1) and the top-1 agreement (>= 0.99;
measured 1.0 on 397 digits), not the maximum, which another CPU's summation order can move.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from quantize import QuantizeConfig, apply
from quantize.data import CalibrationSet
from quantize.drq import DRQConv2d, region_mask
from quantize.graph import find_layers
from quantize.onnx import VerifyConfig, export_onnx, save_onnx, session, verify, weight_bytes
from quantize.primitives import quantize_activation
from sensitivity import zoo
from solver.errors import ExportMismatchError, MissingDependencyError, UnsupportedExportError

P99_STEPS = 1.5  # measured 0 or 1 step (1.0005 with float noise)


def _check(program, result, holdout) -> dict:
    model = export_onnx(program, result.checkpoint)
    onnx.checker.check_model(model, full_check=True)
    report = verify(program, result.checkpoint, model, holdout)
    assert report["passed"]
    assert report["top1_agreement"] >= 0.99
    assert report["p99_steps"] <= P99_STEPS, report
    return {"model": model, "report": report}


class DownsampleNet(nn.Module):
    """A stem and one strided residual block with a 1x1 downsample conv (ResNet-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = zoo._BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.block(x).mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """Depthwise-separable convs, a max pool and a flatten into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = nn.functional.max_pool2d(torch.relu(self.pw(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def programs(digits) -> dict[str, torch.export.ExportedProgram]:
    """The downsample and depthwise nets, trained one epoch (enough for BN statistics and
    distinct channels; the check is ORT against fake-quant, not accuracy)."""
    x, y = digits
    out = {}
    for cls in (DownsampleNet, DepthwiseNet):
        torch.manual_seed(0)
        model = zoo.train(cls(), x[:1400], y[:1400], epochs=1, seed=0)
        out[cls.__name__] = zoo.export(model, x[:4])
    return out


def test_cnn_int8_runs_in_onnx_runtime_with_fused_int8_convs(cnn_program, cnn_int8,
                                                             heldout_eval, tmp_path) -> None:
    out = _check(cnn_program, cnn_int8, heldout_eval[1])
    assert out["model"].opset_import[0].version >= 21
    # ONNX Runtime fuses DQ -> Conv -> ReLU -> Q into QLinearConv (the int8 path)
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out["model"].SerializeToString(), opts,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2
    path = save_onnx(out["model"], tmp_path / "m.onnx")
    assert onnx.load(str(path)).graph.node


def test_mixed_weight_and_activation_bits(cnn_program, plan_for, heldout_eval) -> None:
    # conv1 W8A8 (pinned first), conv2 W2A4, fc W4A4: INT4 initializers and UINT4 activations
    bits = {"conv1": (8, 8), "conv2": (2, 4), "fc": (4, 4)}
    plan = plan_for(cnn_program, w_bits=lambda i, n: bits[n][0],
                    a_bits=lambda i, n: bits[n][1])
    res = apply(cnn_program, plan, *heldout_eval, QuantizeConfig())
    model = _check(cnn_program, res, heldout_eval[1])["model"]
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["conv2_w_q"] == onnx.TensorProto.INT4
    assert types["fc_w_q"] == onnx.TensorProto.INT4
    assert types["conv1_w_q"] == onnx.TensorProto.INT8
    q_types = {types[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert onnx.TensorProto.UINT4 in q_types and onnx.TensorProto.UINT8 in q_types


def test_8bit_weights_with_4bit_activations_run(resnet_program, mlp_program, plan_for,
                                                  heldout_eval) -> None:
    # ONNX Runtime fuses DQ(int8 weight) -> Conv/MatMul into QLinearConv / QLinearMatMul,
    # which take no 4-bit input: the 4-bit input is stored in the 8-bit type on its own grid
    # (same values). Exported with a UINT4 input instead, the session refused the graph.
    for program in (resnet_program, mlp_program):
        plan = plan_for(program, w_bits=8, a_bits=4)
        model = _check(program, apply(program, plan, *heldout_eval, QuantizeConfig()),
                       heldout_eval[1])["model"]
        types = {i.name: i.data_type for i in model.graph.initializer}
        inputs = {types[n.input[2]] for n in model.graph.node
                  if n.op_type == "QuantizeLinear" and "_in_q" in n.output[0]}
        assert inputs and inputs <= {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}


def test_a_graph_onnx_runtime_cannot_load_is_an_unsupported_export(cnn_program,
                                                                   cnn_int8) -> None:
    model = export_onnx(cnn_program, cnn_int8.checkpoint)
    model.graph.node[0].op_type = "NoSuchOperator"  # passes no checker, loads in no runtime
    with pytest.raises(UnsupportedExportError, match="ONNX Runtime .* cannot run"):
        session(model)


def test_resnet_and_mlp(resnet_program, mlp_program, plan_for, heldout_eval) -> None:
    for program, w in ((resnet_program, 4), (mlp_program, 8)):
        plan = plan_for(program, w_bits=lambda i, n, w=w: 8 if i == 0 else w)
        _check(program, apply(program, plan, *heldout_eval, QuantizeConfig()),
               heldout_eval[1])


def test_residual_downsample_and_depthwise(programs, plan_for, heldout_eval) -> None:
    for program in programs.values():
        plan = plan_for(program, w_bits=lambda i, n: (8, 4, 6)[i % 3],
                        a_bits=lambda i, n: (8, 4)[i % 2])
        _check(program, apply(program, plan, *heldout_eval, QuantizeConfig()),
               heldout_eval[1])


def test_partly_quantized_model_keeps_float_parts(cnn_program, plan_for, heldout_eval) -> None:
    plan = plan_for(cnn_program, only={"conv2"})  # conv1 (+ its BN) and fc stay float
    res = apply(cnn_program, plan, *heldout_eval, QuantizeConfig())
    model = _check(cnn_program, res, heldout_eval[1])["model"]
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops and "Gemm" in ops


def test_weight_initializers_hold_the_plans_bytes(programs, plan_for, heldout_eval) -> None:
    program = programs["DownsampleNet"]
    plan = plan_for(program, w_bits=lambda i, n: (8, 2, 4, 3, 6)[i % 5])
    res = apply(program, plan, *heldout_eval, QuantizeConfig())
    model = export_onnx(program, res.checkpoint)
    sizes = weight_bytes(model)
    scales = {i.name: i for i in model.graph.initializer}
    for row in plan["layers"]:
        base = row["name"] + "_w"
        scale_bytes = len(onnx.numpy_helper.to_array(scales[base + "_scale"]).tobytes())
        assert sizes[base + "_q"] + scale_bytes == row["size_bytes"], row["name"]
    assert sum(sizes.values()) == sum(
        res.checkpoint.tensors[r["name"] + ".weight_q"].nbytes for r in plan["layers"])


class Cumprod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)).cumprod(dim=1)


def test_unsupported_op_is_refused_by_name(digits, plan_for, heldout_eval, tmp_path) -> None:
    x, _ = digits
    torch.manual_seed(0)
    program = zoo.export(Cumprod().eval(), x[:4])
    res = apply(program, plan_for(program), *heldout_eval, QuantizeConfig())
    with pytest.raises(UnsupportedExportError, match="cumprod"):
        export_onnx(program, res.checkpoint)


def test_missing_onnx_runtime_names_the_extra(cnn_int8, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"\[onnx\]"):
        session(onnx.ModelProto())


def test_a_wrong_export_fails_verification(cnn_program, cnn_int8, heldout_eval) -> None:
    model = export_onnx(cnn_program, cnn_int8.checkpoint)
    for init in model.graph.initializer:  # one conv's per-channel scales 5 % off
        if init.name == "conv2_w_scale":
            arr = onnx.numpy_helper.to_array(init) * np.float32(1.05)
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    with pytest.raises(ExportMismatchError) as err:
        verify(cnn_program, cnn_int8.checkpoint, model, heldout_eval[1],
               VerifyConfig(max_step_p99=4.0))
    assert err.value.detail["passed"] is False


def test_calibration_set_batches_run_through_the_fixed_batch_path(cnn_fixed_batch_pt2,
                                                                   plan_for,
                                                                   heldout_eval) -> None:
    program = torch.export.load(str(cnn_fixed_batch_pt2))
    res = apply(program, plan_for(program), *heldout_eval, QuantizeConfig(), batch_size=16)
    model = export_onnx(program, res.checkpoint)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 16
    holdout = CalibrationSet((heldout_eval[1].args[0][:10],))
    rep = verify(program, res.checkpoint, model, holdout, fixed_batch=16)
    assert rep["samples"] == 10 and rep["p99_steps"] <= P99_STEPS


def test_drq_layer_from_standard_ops(cnn_program, cnn_int8, plan_for, heldout_eval) -> None:
    """conv2 as a DRQ conv (2x2 regions, threshold 20: about a third of the regions INT8);
    the ONNX region mask equals the fake-quant module's, region for region."""
    grid = cnn_int8.checkpoint.input_grid("conv2")
    drq = {"region": [2, 2], "threshold": 20, "sensitive_fraction": 0.3, "mac_fraction": 0.3,
           "high_bits": 8, "low_bits": 4, "scale": grid.scale, "signed": grid.signed}
    plan = plan_for(cnn_program, w_bits=lambda i, n: 6 if n == "conv2" else 8,
                    drq={"conv2": drq})
    res = apply(cnn_program, plan, *heldout_eval, QuantizeConfig())
    model = _check(cnn_program, res, heldout_eval[1])["model"]
    ops = {n.op_type for n in model.graph.node}
    assert {"AveragePool", "Greater", "Resize", "ReduceSum"} <= ops
    assert not any(n.domain for n in model.graph.node)  # standard operators only
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["conv2_w_high_q"] == onnx.TensorProto.INT8
    assert types["conv2_w_low_q"] == onnx.TensorProto.INT4
    # the region mask as ONNX Runtime computes it, against region_mask on the module's input
    (greater,) = [n.output[0] for n in model.graph.node if n.op_type == "Greater"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(greater, onnx.TensorProto.BOOL,
                                                                 None))
    x = heldout_eval[1].args[0][:128]
    got = session(probe, 1).run(None, {"x": x.numpy()})[1][:, 0]
    (drq_mod,) = [m for m in res.module.modules() if isinstance(m, DRQConv2d)]
    seen = []
    hook = drq_mod.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        res.module(x)
    hook.remove()
    codes = quantize_activation(seen[0], drq_mod.input_scale, 8, drq_mod.input_signed)
    want = region_mask(codes, (2, 2), 20).numpy()
    assert 0.05 < want.mean() < 0.95  # both precisions in use
    assert np.array_equal(got, want)


def _grouped_plan(program, plan_for, groups: dict[str, int]) -> dict:
    """``plan_for``'s plan with the layers of ``groups`` at 4 bits per group of that size
    (their size_bytes priced per group), the rest at 8 bits per channel."""
    from solver import plan as plan_module
    from solver.options import size_bytes

    plan = plan_for(program, w_bits=lambda i, n: 4 if n in groups else 8)
    plan = {**plan, "version": plan_module.VERSION, "format": plan_module.FORMAT}
    params = dict(program.module().named_parameters())
    for row in plan["layers"]:
        row["group_size"] = groups.get(row["name"])
        if row["group_size"]:
            out = params[row["name"] + ".weight"].shape[0]
            row["size_bytes"] = float(size_bytes(row["params"], row["w_bits"], out,
                                                 row["group_size"]))
    return plan


def test_per_group_weights_are_blocked_dequantize(cnn_program, mlp_program, plan_for,
                                                  heldout_eval) -> None:
    """Per-group scales (group along the flattened fan-in): DequantizeLinear with block_size;
    the initializers still hold the plan's bytes."""
    for program, groups in ((mlp_program, {"fc1": 16, "fc2": 8}),
                            (cnn_program, {"conv2": 24, "fc": 8})):
        plan = _grouped_plan(program, plan_for, groups)
        res = apply(program, plan, *heldout_eval, QuantizeConfig())
        model = _check(program, res, heldout_eval[1])["model"]
        blocked = {n.input[0]: n for n in model.graph.node
                   if n.op_type == "DequantizeLinear"
                   and any(a.name == "block_size" for a in n.attribute)}
        assert set(blocked) == {f"{n}_w_q" for n in groups}
        sizes = weight_bytes(model)
        inits = {i.name: i for i in model.graph.initializer}
        for row in plan["layers"]:
            base = row["name"] + "_w"
            scale = onnx.numpy_helper.to_array(inits[base + "_scale"])
            assert sizes[base + "_q"] + scale.nbytes == row["size_bytes"], row["name"]


def test_hessian_clipped_scales_export_like_fake_quant(cnn_program, mlp_program, cnn_int8,
                                                       plan_for, heldout_eval,
                                                       clip_for) -> None:
    """Hessian-clipped scales (ratios below 1 on most channels), per channel, per group and
    on a DRQ conv's two branches: the export reads the checkpoint's scales (the DRQ low
    branch its drq_low_scale) and ONNX Runtime agrees with the fake-quant module (the same
    check as with max|W| scales)."""
    grid = cnn_int8.checkpoint.input_grid("conv2")
    drq = {"region": [2, 2], "threshold": 20, "sensitive_fraction": 0.3, "mac_fraction": 0.3,
           "high_bits": 8, "low_bits": 4, "scale": grid.scale, "signed": grid.signed}
    cfg = QuantizeConfig(weight_clip="hessian")
    plan = plan_for(cnn_program, w_bits=lambda i, n: 4 if n == "fc" else 8, drq={"conv2": drq})
    res = apply(cnn_program, plan, *heldout_eval, cfg, clip=clip_for(cnn_program))
    model = _check(cnn_program, res, heldout_eval[1])["model"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    ckpt = res.checkpoint
    codes, low_scale = ckpt.low_weight("conv2")
    assert np.array_equal(inits["conv2_w_low_scale"], low_scale.numpy())
    assert np.array_equal(inits["conv2_w_low_q"].astype(np.int32), codes.numpy())
    assert np.array_equal(inits["fc_w_scale"], ckpt.tensors["fc.weight_scale"].numpy())
    plan = _grouped_plan(mlp_program, plan_for, {"fc1": 16, "fc2": 8})
    res = apply(mlp_program, plan, *heldout_eval, cfg,
                clip=clip_for(mlp_program, group_sizes=(None, 8, 16)))
    _check(mlp_program, res, heldout_eval[1])


class TransformerBlock(nn.Module):
    """A pre-norm transformer block over [N, T, D] (attention + MLP, residuals) and a head."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


def test_transformer_block(plan_for) -> None:
    """Linear layers on [N, T, D] (MatMul), LayerNorm, attention and GELU in float; the digits
    as 8 rows of 8 pixels, lifted to 32 features, are the tokens (untrained weights: what is
    checked is that ONNX Runtime computes what the fake-quant module computes)."""
    x, _ = zoo.digits_data(8, 0)
    lift = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    tokens = x[:, 0] @ lift  # [N, 8, 32]
    torch.manual_seed(0)
    program = zoo.export(TransformerBlock().eval(), tokens[:4])
    train, holdout = CalibrationSet((tokens[:256],)), CalibrationSet((tokens[1400:1600],))
    plan = plan_for(program, w_bits=lambda i, n: (8, 4)[i % 2], a_bits=8)
    _check(program, apply(program, plan, train, holdout, QuantizeConfig()), holdout)


def test_float_export_matches_the_program(resnet_program, heldout_eval) -> None:
    """No checkpoint: the float model (conv + BatchNorm + residual add + mean + linear)."""
    model = export_onnx(resnet_program, None)
    onnx.checker.check_model(model, full_check=True)
    x = heldout_eval[1].args[0][:64]
    got = session(model).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = resnet_program.module()(x).numpy()
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())  # float32 rounding


def test_near_ties_do_not_count_for_top1_agreement() -> None:
    from quantize.onnx.verify import top_margin

    ref = np.array([[1.0, 0.99, 0.0], [2.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    assert top_margin(ref) == pytest.approx([0.01, 1.0, 0.0])
    assert np.isinf(top_margin(np.ones((2, 1)))).all()


def test_a_flip_on_a_decisive_sample_still_fails(cnn_program, cnn_int8, heldout_eval) -> None:
    """The top-1 bar leaves out near-ties only (31 of the 397 digits have their top two logits
    within 2 x 4 8-bit steps), so an export whose classes are reversed has its flips counted."""
    model = export_onnx(cnn_program, cnn_int8.checkpoint)
    report = verify(cnn_program, cnn_int8.checkpoint, model, heldout_eval[1])
    assert report["tied_samples"] < 80 and report["top1_agreement_decisive"] == 1.0
    out = model.graph.output[0].name
    # reverse the class axis of the logits: every top-1 moves to another class
    rev = onnx.helper.make_node("Slice", [out + "_pre", "rv_s", "rv_e", "rv_a", "rv_st"], [out])
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o == out:
                node.output[i] = out + "_pre"
    model.graph.node.append(rev)
    for name, v in (("rv_s", -1), ("rv_e", -(2**62)), ("rv_a", 1), ("rv_st", -1)):
        model.graph.initializer.append(
            onnx.numpy_helper.from_array(np.array([v], np.int64), name))
    with pytest.raises(ExportMismatchError) as err:
        verify(cnn_program, cnn_int8.checkpoint, model, heldout_eval[1])
    assert err.value.detail["tied_samples"] < 80
    assert err.value.detail["top1_agreement_decisive"] < 0.5


def test_in_context_profile_attributes_every_layer(cnn_program) -> None:
    """The context method finds every layer's own nodes in the optimised graph of each uniform
    model (no isolated fallback), and its all-W8A8 entries add up to the all-W8A8 model's
    measured wall time (the rest is spread over them). Values are timings: only their
    structure is asserted."""
    from quantize.onnx.incontext import owner_of
    from quantize.onnx.profile import ProfileConfig, profile

    doc = profile(cnn_program, ProfileConfig(weight_bits=(4, 8), activation_bits=(4, 8),
                                             warmup=1, repeat=3))
    table = doc["latency_table"]
    assert doc["method"] == "context" and doc["version"] == 2
    assert doc["fallback"] == {} and doc["failed_options"] == {}
    assert set(table) == {"conv1", "conv2", "fc"}
    assert all(set(r) == {"w4a4", "w4a8", "w8a4", "w8a8"} for r in table.values())
    assert all(v >= 0 for r in table.values() for v in r.values())
    assert sum(r["w8a8"] for r in table.values()) == pytest.approx(
        doc["whole_ms"]["w8a8"], abs=1e-5)  # 6-decimal rounding of 3 entries
    layers = find_layers(cnn_program.module())
    owner = owner_of(layers)
    fx = {x.name: x.node for x in layers}
    assert owner(f"{fx['conv2']}_Conv_token_7") == "conv2"  # a fused node keeps its name
    assert owner("conv2_in_q_QuantizeLinear") == "conv2"
    assert owner("Transpose_token_3") is None and owner("ReorderInput") is None


def test_profile_config_refuses_bad_methods() -> None:
    from quantize.onnx.profile import ProfileConfig
    from solver.errors import BadConstraintsError

    with pytest.raises(BadConstraintsError, match="method"):
        ProfileConfig(method="roofline")
    with pytest.raises(BadConstraintsError, match="whole model"):
        ProfileConfig(layers=("conv1",))
    assert ProfileConfig(layers=("conv1",), method="isolated").layers == ("conv1",)


def _token_model_exports(program, ids: torch.Tensor, plan_for) -> onnx.ModelProto:
    """A token model's float export equals its program (float32 reassociation only), and its
    W8 / W4-alternating quantized export (8-bit inputs) passes the export check; returns the
    quantized ONNX model."""
    fp = session(export_onnx(program, None))
    with torch.no_grad():
        want = program.module()(ids[:3]).numpy()
    got = fp.run(None, {fp.get_inputs()[0].name: ids[:3].numpy()})[0]
    assert np.abs(got - want).max() < 1e-4
    plan = plan_for(program, w_bits=lambda i, n: 4 if i % 2 else 8)
    res = apply(program, plan, CalibrationSet((ids[:24],)), CalibrationSet((ids[24:],)),
                QuantizeConfig(batch_size=8))
    out = export_onnx(program, res.checkpoint)
    report = verify(program, res.checkpoint, out, CalibrationSet((ids[24:],)))
    assert report["passed"] and report["p99_steps8"] <= P99_STEPS
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_exports_and_matches_fake_quant(tied, plan_for) -> None:
    """The tiny Llama of tests/hf_zoo.py (causal mask from arange / cumsum / advanced
    indexing, rotary tables, RMSNorm, GQA attention; ``tied``: lm_head shares the embedding's
    weight, one float initializer read by the Gather and the MatMul): the float export equals
    the program, and W8 / W4 linears with 8-bit inputs match fake-quant in ONNX Runtime on
    every next-token argmax that is not a near-tie, at any batch size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_zoo

    model = hf_zoo.trained_llama(tied=tied, steps=30)
    ids = hf_zoo.calibration_ids(n=40, seq=16, seed=1)
    program = hf_zoo.export(model, (ids[:2],))
    out = _token_model_exports(program, ids, plan_for)
    if tied:  # lm_head stays float (a shared weight) and reads the embedding's table
        users = sorted(n.op_type for n in out.graph.node for i in n.input
                       if i == "model.lm_head.weight")
        assert users == ["Gather", "Transpose"]  # one initializer, two ops


def test_tiny_bert_exports_and_matches_fake_quant(plan_for) -> None:
    """The tiny BERT of tests/hf_zoo.py, per-token hidden states (its all-ones mask built by
    ``ones_like`` from the ids, token-type ids gathered at the position ids: ``aten.gather``,
    ONNX GatherElements): the float export equals the program, and W8 / W4 linears with
    8-bit inputs pass the export check."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_zoo

    model = hf_zoo.TokenEncoder(hf_zoo.trained_bert(steps=30).model)
    ids = hf_zoo.calibration_ids(n=40, seq=16, seed=1)
    program = hf_zoo.export(model, (ids[:2],))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.gather.default", "aten.ones_like.default"} <= ops
    _token_model_exports(program, ids, plan_for)  # float: measured 4.8e-7 from the program


def test_gpt2_with_its_tied_lm_head_quantized_exports(plan_for, tmp_path) -> None:
    """The tiny GPT-2 as a job sees it (the intake's program: LayerNorm as
    ``native_layer_norm``; the lm_head a quantized layer whose weight the token embedding also
    reads): the embedding's Gather reads the float table, as in the fake-quant module, the
    lm_head its INT4 / INT8 copy, and the export check passes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_zoo

    from sensitivity.intake import intake

    torch.manual_seed(0)
    model = hf_zoo.train_causal(hf_zoo.gpt2(), steps=30)
    ids = hf_zoo.calibration_ids(n=40, seq=16, seed=1)
    pt2 = hf_zoo.save(model, (ids[:4],), tmp_path / "g.pt2")
    program = intake(pt2, zoo.save_calibration(tmp_path / "c.safetensors", ids)).program
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.native_layer_norm.default" in ops
    plan = plan_for(program, w_bits=lambda i, n: 4 if i % 2 else 8)
    assert "model.lm_head" in [r["name"] for r in plan["layers"]]
    res = apply(program, plan, CalibrationSet((ids[:24],)), CalibrationSet((ids[24:],)),
                QuantizeConfig(batch_size=8))
    out = export_onnx(program, res.checkpoint)
    gathers = [n for n in out.graph.node if n.op_type == "Gather"
               and "model.lm_head.weight" in n.input]
    assert len(gathers) == 1  # the float table, beside the lm_head's integer initializer
    report = verify(program, res.checkpoint, out, CalibrationSet((ids[24:],)))
    assert report["passed"] and report["p99_steps8"] <= P99_STEPS


class _Bounds(nn.Module):
    """One-sided clamps (a masked mean's ``clamp_min(1.0)`` denominator) and sums over dims."""

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        w = m.unsqueeze(-1).to(x.dtype)
        mean = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return torch.cat([mean, x.clamp(min=0.5).sum(1), x.clamp(max=-0.5).sum(1),
                          torch.clamp_max(x, 0.25).sum(1, keepdim=True).squeeze(1),
                          torch.nn.functional.hardtanh(x).sum(1)], 1)


@pytest.mark.parametrize("decomposed", [False, True])
def test_one_sided_clamps_and_sums_export_as_the_program_runs(decomposed) -> None:
    """A clamp with one bound is bounded on that side only (a missing max once read as 1.0,
    which made an encoder's masked mean pooling a sum); ``sum`` over dims is ReduceSum with
    the mask cast first. In the exported form and decomposed to core ops."""
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(5, 7, 3, generator=g) * 2, (torch.rand(5, 7, generator=g) > 0.3).long()
    program = torch.export.export(_Bounds(), (x, m))
    if decomposed:
        program = program.run_decompositions()
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.sum.dim_IntList" in ops
    fp = session(export_onnx(program, None))
    want = program.module()(x, m).numpy()
    names = [i.name for i in fp.get_inputs()]
    got = fp.run(None, {names[0]: x.numpy(), names[1]: m.numpy()})[0]
    assert np.abs(got - want).max() < 1e-5  # float32 rounding: measured 9.5e-7, 10x margin


def test_in_context_profile_of_a_fixed_batch_program(cnn_fixed_batch_pt2) -> None:
    """A program exported for batches of 16 is timed at 16 (it runs at no other size)."""
    from quantize.onnx.profile import ProfileConfig, profile

    doc = profile(torch.export.load(str(cnn_fixed_batch_pt2)),
                  ProfileConfig(warmup=1, repeat=2))
    assert doc["context_batch"] == 16 and doc["fallback"] == {}
    assert doc["failed_options"] == {} and set(doc["whole_ms"]) == {"w4a8", "w8a8"}


def test_4bit_weights_run_on_the_int8_kernel(cnn_program, plan_for, heldout_eval,
                                             tmp_path) -> None:
    """conv2 at W4A8: its packed INT4 initializer (the plan's bytes) is cast to INT8 before
    DequantizeLinear, ONNX Runtime folds the Cast and fuses the layer into QLinearConv;
    ``int8_kernels=False`` leaves DQ + float Conv. Both match fake-quant."""
    ort = pytest.importorskip("onnxruntime")
    plan = plan_for(cnn_program, w_bits=lambda i, n: 4 if n == "conv2" else 8)
    res = apply(cnn_program, plan, *heldout_eval, QuantizeConfig())
    fused = {}
    for int8_kernels in (True, False):
        model = export_onnx(cnn_program, res.checkpoint, int8_kernels=int8_kernels)
        assert verify(cnn_program, res.checkpoint, model, heldout_eval[1])["passed"]
        conv2 = next(x for x in find_layers(cnn_program.module()) if x.name == "conv2")
        numel = int(np.prod(conv2.weight_shape))
        assert weight_bytes(model)["conv2_w_q"] == numel // 2  # packed nibbles either way
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"opt{int8_kernels}.onnx")
        ort.InferenceSession(model.SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
        fused[int8_kernels] = (ops.count("QLinearConv"), ops.count("Conv"))
    assert fused == {True: (2, 0), False: (1, 1)}


def test_profile_times_drq_per_region(cnn_program) -> None:
    """With drq_regions the profile times each conv layer's DRQ subgraph per weight width and
    region (``w<w>drq<k>x<k>``); linear layers get none. The job copies an entry to every DRQ
    option tag of that region."""
    from quantize.onnx.profile import ProfileConfig, drq_layer_model, profile
    from service.pipeline import _drq_latencies
    from solver import ActivationMode, LayerSpec

    doc = profile(cnn_program, ProfileConfig(weight_bits=(4, 8), drq_regions=(2,),
                                             warmup=1, repeat=2))
    table = doc["latency_table"]
    assert {"w4drq2x2", "w8drq2x2"} <= set(table["conv2"]) and "w8drq2x2" not in table["fc"]
    layer = next(x for x in find_layers(cnn_program.module()) if x.name == "conv2")
    ops = [n.op_type for n in drq_layer_model(layer, (1, 8, 8, 8), 8, 2).graph.node]
    assert ops.count("Conv") == 2 and "AveragePool" in ops and "Resize" in ops
    drq = {"region": [2, 2], "threshold": 10, "sensitive_fraction": 0.3, "mac_fraction": 0.3,
           "high_bits": 8, "low_bits": 4, "scale": 0.05, "signed": False}
    spec = LayerSpec(name="conv2", kind="conv2d", params=1, macs=1, out_channels=1,
                     input_numel=1, omega_w={4: 1.0, 8: 0.1}, omega_a={8: 0.0},
                     activation_modes=[ActivationMode("drq2x2f0.3", 5.2, 0.0, drq)])
    _drq_latencies(table, [spec])
    assert table["conv2"]["w8drq2x2f0.3"] == table["conv2"]["w8drq2x2"]
    assert table["conv2"]["w4drq2x2f0.3"] == table["conv2"]["w4drq2x2"]


@pytest.mark.parametrize("method", ["context", "isolated"])
def test_profile_times_per_group_options(cnn_program, method) -> None:
    """With group_sizes the profile times ``w<w>g<g>a<a>`` for the layers whose fan-in the
    group divides (conv2: 72, fc: 16; not conv1: 9), as the export writes them (blocked
    DequantizeLinear); in context every grouped layer's nodes are found by name. Timings:
    only the structure is asserted."""
    from quantize.onnx.profile import ProfileConfig, layer_model, profile

    doc = profile(cnn_program, ProfileConfig(weight_bits=(4, 8), group_sizes=(8,), warmup=1,
                                             repeat=2, method=method))
    table = doc["latency_table"]
    assert set(table["conv1"]) == {"w4a8", "w8a8"}
    assert set(table["conv2"]) == set(table["fc"]) == {"w4a8", "w8a8", "w4g8a8", "w8g8a8"}
    assert all(v >= 0 for r in table.values() for v in r.values())
    if method == "context":
        assert doc["fallback"] == {} and doc["failed_options"] == {}
    layer = next(x for x in find_layers(cnn_program.module()) if x.name == "conv2")
    dq = [n for n in layer_model(layer, (1, 8, 8, 8), 4, 8, group=8).graph.node
          if n.op_type == "DequantizeLinear" and any(a.name == "block_size"
                                                     for a in n.attribute)]
    assert len(dq) == 1


def test_llama_with_decomposed_attention_exports(plan_for) -> None:
    """The job's intake decomposes scaled_dot_product_attention (for Hessian-vector products):
    the graph then has aten.full / full_like / scalar_tensor / where / logical_not / any and a
    product of sizes; the float export equals the program and a W8A8 export passes the
    check (the 30M Llama of bench/transformer.py was refused at aten.full)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_zoo

    from sensitivity.program import decompose_sdpa

    model = hf_zoo.trained_llama(tied=False, steps=30)
    ids = hf_zoo.calibration_ids(n=40, seq=16, seed=1)
    program = decompose_sdpa(hf_zoo.export(model, (ids[:2],)))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.full.default", "aten.full_like.default", "aten.any.dim"} <= ops
    fp = session(export_onnx(program, None))
    with torch.no_grad():
        want = program.module()(ids[:3]).numpy()
    got = fp.run(None, {fp.get_inputs()[0].name: ids[:3].numpy()})[0]
    assert np.abs(got - want).max() < 1e-4  # float32 reassociation only
    res = apply(program, plan_for(program), CalibrationSet((ids[:24],)),
                CalibrationSet((ids[24:],)), QuantizeConfig(batch_size=8))
    report = verify(program, res.checkpoint, export_onnx(program, res.checkpoint),
                    CalibrationSet((ids[24:],)))
    assert report["passed"] and report["points"]["max_mismatch"] < 0.01
