"""sensitivity.measure with a weight clip: the ratios it chooses (Hessian-weighted from the
sweep's own diagonal), the Omegas priced with them, and sensitivity.json version 4 (the ratios
round-trip; versions 3 and older are read as max|W| scales)."""

from __future__ import annotations

import json

import pytest
import torch

from quantize.clip import ClipRatios, choose_ratios
from quantize.primitives import weight_quant_error
from sensitivity import HessianConfig, measure
from sensitivity.engine import SensitivityResult, group_omegas
from sensitivity.intake import intake

FAST = HessianConfig(max_iter=6, tol=0.5, min_iter=2, activations=False)


@pytest.fixture(scope="module")
def clipped(cnn_pt2, tiny_calib):
    it = intake(cnn_pt2, tiny_calib)
    return it, measure(it, FAST), measure(it, FAST, weight_clip="hessian")


def test_hessian_ratios_and_trace_omega(clipped) -> None:
    it, plain, res = clipped
    params = dict(it.module.named_parameters())
    assert res.config["weight_clip"] == "hessian" and not res.config["diagonal"]
    assert plain.clip.mode == "max" and plain.clip.layers == {}
    for info, a, b in zip(it.layers, plain.layers, res.layers, strict=True):
        w = params[info.graph.weight].detach()
        # the same sweep (the diagonal is one more running sum; with it the probe squares are
        # summed in float64): the same traces up to float rounding (measured 2e-8 relative)
        assert b.weight_trace == pytest.approx(a.weight_trace, rel=1e-6)
        for bits in (2, 4, 8):
            ratio = res.clip.ratio(info.name, bits)
            assert torch.equal(ratio, choose_ratios(w, bits, None, res.diagonals[info.name]))
            # still the trace Omega, with the clipped quantizer's error
            assert b.omega_w[bits] == pytest.approx(
                b.weight_trace / b.params * weight_quant_error(w, bits, None, ratio), rel=1e-9)
    # a 2-bit grid clips somewhere on a trained CNN
    assert any(bool((res.clip.ratio(n.name, 2) < 1).any()) for n in it.layers)


def test_version_4_round_trip_and_older_versions(clipped) -> None:
    it, _, res = clipped
    res = group_omegas(it, res, [None, 8])
    d = json.loads(res.to_json())
    assert d["version"] == 4 and d["clip"]["mode"] == "hessian"
    back = SensitivityResult.from_json(res.to_json())
    assert back.to_json() == res.to_json()
    # the grouped ratios were added (for the layers whose fan-in 8 divides) and kept
    assert any(g == 8 for table in res.clip.layers.values() for _, g in table)
    for name, table in res.clip.layers.items():
        assert set(back.clip.layers[name]) == set(table)
        for key, ratio in table.items():
            assert torch.equal(back.clip.layers[name][key], ratio)
    old = {k: v for k, v in d.items() if k != "clip"}
    for version in (3, 2):
        assert SensitivityResult.from_dict({**old, "version": version}).clip == ClipRatios()


def test_mse_clip_needs_no_diagonal(clipped) -> None:
    it, _, _ = clipped
    res = measure(it, FAST, weight_clip="mse")
    params = dict(it.module.named_parameters())
    assert res.diagonals == {}  # no diagonal kept for it
    for info in it.layers:
        w = params[info.graph.weight].detach()
        assert torch.equal(res.clip.ratio(info.name, 4), choose_ratios(w, 4))
    with pytest.raises(ValueError, match="weight_clip must be one of"):
        measure(it, FAST, weight_clip="p99")
