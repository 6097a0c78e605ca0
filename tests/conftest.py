"""Shared fixtures: real digits data, tiny trained models, their .pt2 exports and calibration
files. Session-scoped so each model trains once per test run (about a second each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sensitivity import zoo

N_TRAIN = 1400  # digits 0..1399 train the models; the rest is calibration / held-out data


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return zoo.digits_data(image_size=8, seed=0)


@pytest.fixture(scope="session")
def calib_digits(digits) -> tuple[torch.Tensor, torch.Tensor]:
    """The 397 digits no model was trained on."""
    x, y = digits
    return x[N_TRAIN:], y[N_TRAIN:]


def _trained(cls, digits, **kwargs) -> torch.nn.Module:
    x, y = digits
    # Seed the initialisation too, so the models do not depend on which test asked first.
    torch.manual_seed(0)
    return zoo.train(cls(**kwargs), x[:N_TRAIN], y[:N_TRAIN], epochs=15, seed=0)


@pytest.fixture(scope="session")
def mlp(digits) -> torch.nn.Module:
    return _trained(zoo.DigitsMLP, digits)


@pytest.fixture(scope="session")
def cnn(digits) -> torch.nn.Module:
    return _trained(zoo.DigitsCNN, digits)


@pytest.fixture(scope="session")
def resnet(digits) -> torch.nn.Module:
    return _trained(zoo.DigitsResNet, digits)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def mlp_pt2(mlp, digits, artifacts) -> Path:
    return zoo.save_model(mlp, digits[0][:4], artifacts / "mlp.pt2")


@pytest.fixture(scope="session")
def cnn_pt2(cnn, digits, artifacts) -> Path:
    return zoo.save_model(cnn, digits[0][:4], artifacts / "cnn.pt2")


@pytest.fixture(scope="session")
def resnet_pt2(resnet, digits, artifacts) -> Path:
    return zoo.save_model(resnet, digits[0][:4], artifacts / "resnet.pt2")


@pytest.fixture(scope="session")
def cnn_fixed_batch_pt2(cnn, digits, artifacts) -> Path:
    """Exported without dynamic shapes: accepts only batches of exactly 16."""
    return zoo.save_model(cnn, digits[0][:16], artifacts / "cnn_b16.pt2", dynamic_batch=False)


@pytest.fixture(scope="session")
def calib_path(calib_digits, artifacts) -> Path:
    """Labelled calibration file (397 real digits)."""
    x, y = calib_digits
    return zoo.save_calibration(artifacts / "calib.safetensors", x, y)


@pytest.fixture(scope="session")
def calib_unlabelled_path(calib_digits, artifacts) -> Path:
    x, _ = calib_digits
    return zoo.save_calibration(artifacts / "calib_nolabels.safetensors", x)
