"""The ImageNet reference networks match torchvision's published sizes."""

from __future__ import annotations

import pytest
import torch

from sensitivity import zoo

# torchvision's parameter counts (exact) and conv + linear multiply-accumulates at 224x224
# (published as 1.82 / 4.09-4.11 / 0.30 GMACs; ours count conv and linear only).
EXPECTED = {
    "resnet18": (11_689_512, 1.814e9),
    "resnet50": (25_557_032, 4.089e9),
    "mobilenet_v2": (3_504_872, 0.3008e9),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_and_macs(name):
    params, macs = EXPECTED[name]
    model = zoo.REFERENCE[name]()
    assert sum(p.numel() for p in model.parameters()) == params
    measured = zoo.conv_linear_macs(model, torch.zeros(1, 3, 224, 224))
    assert measured == pytest.approx(macs, rel=2e-3)


def test_reference_model_is_calibrated_and_deterministic():
    a = zoo.reference_model("mobilenet_v2", samples=4, seed=0)
    b = zoo.reference_model("mobilenet_v2", samples=4, seed=0)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = a(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    # BN statistics come from data: logits stay at unit scale instead of blowing up
    assert 1e-3 < float(out.std()) < 100.0


def test_save_model_does_not_store_the_example_base(tmp_path):
    """torch.export writes a view's whole storage: ``save_model`` clones its example, so a
    ``.pt2`` saved on two rows of a big set is the size of one saved on two rows alone."""
    torch.manual_seed(0)
    model = zoo.DigitsMLP()
    big = torch.randn(20_000, 64)  # 5.1 MB of storage behind the 2-row view
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # same names: same zip entries
    small = zoo.save_model(model, big[:2].clone(), tmp_path / "a" / "m.pt2")
    view = zoo.save_model(model, big[:2], tmp_path / "b" / "m.pt2")
    assert view.stat().st_size == small.stat().st_size
    assert small.stat().st_size < 1_000_000  # the MLP's weights are ~40 KB
