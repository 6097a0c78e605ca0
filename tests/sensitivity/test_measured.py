"""Measured Omega (sensitivity/measured.py) against the loss increase computed independently
on the trained nn.Module, and its ordering in bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_hooks import layer_input

from quantize.primitives import fake_quantize_weight
from sensitivity.intake import IntakeConfig, intake
from sensitivity.measured import measured_omegas


@pytest.fixture(scope="module")
def cnn_intake(cnn_pt2, calib_path):
    return intake(cnn_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))


def test_weight_omega_is_twice_the_loss_increase_of_that_layer_alone(cnn, cnn_intake, one_thread):
    m = measured_omegas(cnn_intake, weight_bits=[2, 4, 8], activation_bits=[4, 8])
    x, y = cnn_intake.train.args[0], cnn_intake.train.labels
    with torch.no_grad():
        base = float(F.cross_entropy(cnn(x), y))
        assert m.fp32_loss == pytest.approx(base, rel=1e-4)
        for layer in cnn_intake.layers:
            module = cnn.get_submodule(layer.name)
            original = module.weight.detach().clone()
            for bits in (2, 4):
                module.weight.copy_(fake_quantize_weight(original, bits))
                expected = max(2 * (float(F.cross_entropy(cnn(x), y)) - base), 0.0)
                module.weight.copy_(original)
                # float32 summation order differs between the two graphs: 1e-5 absolute
                # against increases of 1e-3..1 measured here.
                assert m.omega_w[layer.name][bits] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_fewer_bits_cost_more(cnn_intake, one_thread):
    m = measured_omegas(cnn_intake, weight_bits=[2, 8], activation_bits=[4, 8])
    for name in m.omega_w:
        assert m.omega_w[name][2] > m.omega_w[name][8]
        assert m.omega_a[name][4] >= m.omega_a[name][8]
    # 2-bit weights on any of these layers cost well over the 8-bit rounding noise (measured:
    # 10x to 1000x); a loose factor of 3 keeps the test machine-independent.
    assert sum(v[2] for v in m.omega_w.values()) > 3 * sum(v[8] for v in m.omega_w.values())
    assert m.passes == 2 + len(m.omega_w) * 4


def test_handed_down_statistics_give_the_same_omegas(cnn_intake, one_thread):
    """The job's activation statistics (``quantize.observe``) handed down: the same tables, one
    forward pass fewer (the ranges are not observed again)."""
    from quantize.observe import observe

    own = measured_omegas(cnn_intake, weight_bits=[4], activation_bits=[4, 8])
    stats = observe(cnn_intake.module, [layer.graph for layer in cnn_intake.layers],
                    cnn_intake.train, 64)
    handed = measured_omegas(cnn_intake, weight_bits=[4], activation_bits=[4, 8],
                             activations=stats)
    assert (handed.omega_w, handed.omega_a, handed.fp32_loss) == (
        own.omega_w, own.omega_a, own.fp32_loss)
    assert handed.passes == own.passes - 1


def _channel_mean(module, y: torch.Tensor) -> torch.Tensor:
    return y.mean(dim=(0, 2, 3)) if isinstance(module, torch.nn.Conv2d) else y.mean(0)


def _op(module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, w, None, module.stride, module.padding)
    return F.linear(x, w)


def test_bias_corrected_omegas_measure_the_corrected_layer(cnn, cnn_intake, one_thread):
    """With the checkpoint's bias correction the weight Omega is twice the loss increase of
    the layer with quantized weights and its output minus E[op(x, Q(W) - W)] ('weight', and
    'layer' too); 'layer' also corrects the quantized-input layer by E[op(Q_a(x) - x, W)]."""
    from quantize.primitives import fake_quantize_activation

    stats = measured_omegas(cnn_intake, weight_bits=[4], activation_bits=[4]).omega_a
    weight = measured_omegas(cnn_intake, weight_bits=[2, 4], activation_bits=[4],
                             bias_correction="weight")
    layer = measured_omegas(cnn_intake, weight_bits=[2, 4], activation_bits=[4],
                            bias_correction="layer")
    assert weight.bias_correction == "weight" and weight.omega_a == stats
    assert layer.omega_w == weight.omega_w
    plain = measured_omegas(cnn_intake, weight_bits=[2, 4], activation_bits=[4])
    x, y = cnn_intake.train.args[0], cnn_intake.train.labels
    from quantize.observe import observe
    acts = observe(cnn_intake.module, [i.graph for i in cnn_intake.layers], cnn_intake.train, 64)
    with torch.no_grad():
        base = float(F.cross_entropy(cnn(x), y))
    lower = 0
    for info in cnn_intake.layers:
        module = cnn.get_submodule(info.name)
        shape = [1, -1, 1, 1] if isinstance(module, torch.nn.Conv2d) else [1, -1]
        xin = layer_input(cnn, info.name, x)
        original = module.weight.detach().clone()
        for bits in (2, 4):
            q = fake_quantize_weight(original, bits)
            mu = _channel_mean(module, _op(module, xin.double(), (q - original).double()))
            handle = module.register_forward_hook(
                lambda m, i, o, mu=mu, shape=shape: o - mu.float().reshape(shape))
            with torch.no_grad():
                module.weight.copy_(q)
                expected = max(2 * (float(F.cross_entropy(cnn(x), y)) - base), 0.0)
                module.weight.copy_(original)
            handle.remove()
            # float32 summation order differs between the two graphs (as above)
            assert weight.omega_w[info.name][bits] == pytest.approx(expected, rel=1e-3, abs=1e-5)
            lower += weight.omega_w[info.name][bits] < plain.omega_w[info.name][bits]
        scale, signed = acts.grid(info.name, 4)
        dq = fake_quantize_activation(xin, scale, 4, signed) - xin
        mu_a = _channel_mean(module, _op(module, dq.double(), original.double()))
        pre = module.register_forward_pre_hook(
            lambda m, i, s=scale, sg=signed: (fake_quantize_activation(i[0], s, 4, sg),))
        post = module.register_forward_hook(
            lambda m, i, o, mu=mu_a, shape=shape: o - mu.float().reshape(shape))
        with torch.no_grad():
            expected = max(2 * (float(F.cross_entropy(cnn(x), y)) - base), 0.0)
        pre.remove()
        post.remove()
        assert layer.omega_a[info.name][4] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    # the correction lowers most options' damage (measured: all 6 here); not a tautology: a
    # wrong-signed shift doubles the mean error instead
    assert lower >= 4
    assert weight.passes == plain.passes + 1


def test_bad_bias_correction(cnn_intake):
    with pytest.raises(ValueError, match="bias_correction"):
        measured_omegas(cnn_intake, weight_bits=[4], activation_bits=[4], bias_correction="x")


def _kl_to(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(ref) || softmax(logits)), computed here independently."""
    p = F.softmax(ref_logits.double(), dim=1)
    return float((p * (p.log() - F.log_softmax(logits.double(), dim=1))).sum(1).mean())


def test_label_free_omega_is_twice_the_kl_to_fp32_of_that_layer_alone(cnn, cnn_intake,
                                                                      one_thread):
    """``loss="label_free"`` on a classifier: Omega = 2 KL(FP32 softmax || quantized softmax)
    with only that layer's weights (or input) quantized, the FP32 model's own outputs as the
    target (no labels); the FP32 loss is 0."""
    from quantize.observe import observe
    from quantize.primitives import fake_quantize_activation

    stats = observe(cnn_intake.module, [layer.graph for layer in cnn_intake.layers],
                    cnn_intake.train, 64)
    m = measured_omegas(cnn_intake, weight_bits=[4], activation_bits=[4], activations=stats,
                        loss="label_free")
    assert m.loss_kind == "kl" and m.fp32_loss == 0.0
    x = cnn_intake.train.args[0]
    with torch.no_grad():
        ref = cnn(x)
        for layer in cnn_intake.layers:
            module = cnn.get_submodule(layer.name)
            original = module.weight.detach().clone()
            module.weight.copy_(fake_quantize_weight(original, 4))
            expected_w = 2 * _kl_to(ref, cnn(x))
            module.weight.copy_(original)
            scale, signed = stats.grid(layer.name, 4)
            hook = module.register_forward_pre_hook(
                lambda _m, a, s=scale, g=signed: (fake_quantize_activation(a[0], s, 4, g),))
            try:
                expected_a = 2 * _kl_to(ref, cnn(x))
            finally:
                hook.remove()
            # float32 logits from two graphs (summation order): 1e-6 absolute against KL
            # increases of 1e-4..1e-1 measured here
            assert m.omega_w[layer.name][4] == pytest.approx(expected_w, rel=1e-3, abs=1e-6)
            assert m.omega_a[layer.name][4] == pytest.approx(expected_a, rel=1e-3, abs=1e-6)
            assert expected_w > 0 and expected_a > 0


def test_label_free_omega_of_an_unquantized_layer_is_zero(cnn_intake, one_thread):
    """A layer whose weights already lie on the 4-bit grid is left unchanged by quantizing it:
    its label-free Omega is exactly 0 (KL of identical outputs, no clamp involved), while the
    other layers' are not."""
    import copy
    import dataclasses

    module = copy.deepcopy(cnn_intake.module)
    first = cnn_intake.layers[0].graph
    w = module.get_parameter(first.weight)
    with torch.no_grad():
        w.copy_(fake_quantize_weight(w.detach().clone(), 4))
    on_grid = dataclasses.replace(cnn_intake, module=module)
    m = measured_omegas(on_grid, weight_bits=[4], activation_bits=[8], loss="label_free")
    assert m.omega_w[first.name][4] == 0.0
    assert all(m.omega_w[la.graph.name][4] > 0 for la in cnn_intake.layers[1:])


def test_label_free_is_the_jobs_own_loss_for_a_distance_job():
    from sensitivity.measured import measured_loss_kind

    assert measured_loss_kind("cross_entropy", "label_free") == "kl"
    assert measured_loss_kind("cross_entropy", "job") == "cross_entropy"
    assert measured_loss_kind("mse", "label_free") == "mse"
    with pytest.raises(ValueError, match="loss"):
        measured_loss_kind("cross_entropy", "labels")


def test_streamed_train_set_measures_the_same(cnn_intake, cnn_pt2, calib_path, one_thread):
    """The pipeline's intake streams the calibration file (``IntakeConfig(stream=True)``):
    the measured Omegas, read chunk by chunk from the file, equal the in-memory intake's."""
    streamed = intake(cnn_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0,
                                                         stream=True))
    assert streamed.train.streamed
    a = measured_omegas(cnn_intake, weight_bits=[4], activation_bits=[8])
    b = measured_omegas(streamed, weight_bits=[4], activation_bits=[8])
    assert a.fp32_loss == b.fp32_loss and a.omega_w == b.omega_w and a.omega_a == b.omega_a
