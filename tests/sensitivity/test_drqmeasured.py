"""Measured DRQ Omega (sensitivity/drqmeasured.py) against the loss increase computed
independently on the trained nn.Module, and against measured.py's uniform-grid Omega at the
two ends of the threshold range."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from quantize.drq import drq_fake_quantize
from quantize.observe import observe
from sensitivity.drqmeasured import measured_drq_omegas, with_measured_omegas
from sensitivity.intake import IntakeConfig, intake
from sensitivity.measured import measured_omegas
from sensitivity.regions import RegionConfig
from sensitivity.regions import calibrate as calibrate_regions


@pytest.fixture(scope="module")
def cnn_intake(cnn_pt2, calib_path):
    return intake(cnn_pt2, calib_path, IntakeConfig(holdout_fraction=0.2, seed=0))


@pytest.fixture(scope="module")
def stats(cnn_intake):
    return observe(cnn_intake.module, [la.graph for la in cnn_intake.layers], cnn_intake.train, 64)


@pytest.fixture(scope="module")
def regions(cnn_intake, stats):
    return calibrate_regions(cnn_intake.module, [la.graph for la in cnn_intake.layers],
                             cnn_intake.train, cnn_intake.holdout,
                             RegionConfig(region_sizes=(2, 4), sensitive_fractions=(0.2, 0.5)),
                             activations=stats)


def test_drq_omega_is_twice_the_loss_increase_of_that_layer_alone(cnn, cnn_intake, regions,
                                                                   one_thread):
    got = measured_drq_omegas(cnn_intake, regions)
    x, y = cnn_intake.train.args[0], cnn_intake.train.labels
    assert set(got) == {r.name for r in regions.layers} == {"conv1", "conv2"}
    with torch.no_grad():
        base = float(F.cross_entropy(cnn(x), y))
        for r in regions.layers:
            conv = cnn.get_submodule(r.name)
            assert len(got[r.name]) == len(r.modes) == 4
            for mode in r.modes:
                hook = conv.register_forward_pre_hook(
                    lambda _m, a, r=r, mode=mode: (drq_fake_quantize(
                        a[0], r.scale, r.signed, mode.region, mode.threshold),))
                try:
                    expected = max(2 * (float(F.cross_entropy(cnn(x), y)) - base), 0.0)
                finally:
                    hook.remove()
                # float32 summation order differs between the two graphs: 1e-5 absolute
                # against increases of 1e-4..1e-1 here
                assert got[r.name][mode.tag] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    replaced = with_measured_omegas(regions, got)
    for r in replaced.layers:
        assert [m.omega for m in r.modes] == [got[r.name][m.tag] for m in r.modes]
        assert [m.threshold for m in r.modes] == [m.threshold for m in regions.layer(r.name).modes]


def test_the_threshold_range_ends_are_the_uniform_grids(cnn_intake, regions, stats, one_thread):
    """Threshold 0 marks every region sensitive: the INT8 grid everywhere, measured.py's
    omega_a[8] on the same statistics. An unreachable threshold runs every region at INT4 over
    the same range: omega_a[4] (the 4-bit grid's scale from the same min/max, up to float32
    rounding of the stored INT8 scale)."""
    uniform = measured_omegas(cnn_intake, weight_bits=[8], activation_bits=[4, 8],
                              activations=stats)
    ends = []
    for r in regions.layers:
        m = r.modes[0]
        ends.append(dataclasses.replace(r, modes=[
            dataclasses.replace(m, region=(2, 2), target_fraction=1.0, threshold=0),
            dataclasses.replace(m, region=(2, 2), target_fraction=0.0, threshold=1 << 20)]))
    got = measured_drq_omegas(cnn_intake, dataclasses.replace(regions, layers=ends))
    for name in ("conv1", "conv2"):
        assert got[name]["drq-2x2-f1"] == pytest.approx(uniform.omega_a[name][8], abs=1e-6)
        assert got[name]["drq-2x2-f0"] == pytest.approx(uniform.omega_a[name][4], rel=1e-2)
        assert got[name]["drq-2x2-f0"] > got[name]["drq-2x2-f1"]


def test_label_free_drq_omega_is_twice_the_kl_to_fp32(cnn, cnn_intake, regions, one_thread):
    """``loss="label_free"``: each mode's Omega is twice KL(FP32 softmax || softmax with only
    that conv's input through the mode), computed here on the nn.Module with a pre-hook."""
    got = measured_drq_omegas(cnn_intake, regions, loss="label_free")
    x = cnn_intake.train.args[0]
    with torch.no_grad():
        p = F.softmax(cnn(x).double(), dim=1)
        for r in regions.layers:
            conv = cnn.get_submodule(r.name)
            for mode in r.modes:
                hook = conv.register_forward_pre_hook(
                    lambda _m, a, r=r, mode=mode: (drq_fake_quantize(
                        a[0], r.scale, r.signed, mode.region, mode.threshold),))
                try:
                    logq = F.log_softmax(cnn(x).double(), dim=1)
                finally:
                    hook.remove()
                expected = 2 * float((p * (p.log() - logq)).sum(1).mean())
                # float32 logits from two graphs: 1e-6 absolute against 1e-4..1e-1 here
                assert got[r.name][mode.tag] == pytest.approx(expected, rel=1e-3, abs=1e-6)
                assert expected > 0
