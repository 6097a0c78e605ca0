"""QuantizeConfig validation and JSON round-trip."""

from __future__ import annotations

import pytest

from quantize import QuantizeConfig
from solver.errors import BadConstraintsError


@pytest.mark.parametrize("cfg", [
    QuantizeConfig(),
    QuantizeConfig(calibration="percentile", percentile=99.9, histogram_bins=512, out_bits=6,
                   final_bits=8, batch_size=7),
])
def test_json_round_trip(cfg: QuantizeConfig) -> None:
    assert QuantizeConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("bad", [
    {"calibration": "kl"}, {"percentile": 40.0}, {"percentile": 100.5}, {"out_bits": 1},
    {"final_bits": 17}, {"batch_size": 0}, {"version": 2}, {"histogram_bins": 3},
])
def test_invalid_values_are_refused(bad: dict) -> None:
    with pytest.raises(BadConstraintsError):
        QuantizeConfig(**bad)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(BadConstraintsError, match="unknown"):
        QuantizeConfig.from_dict({"bits": 8})
    with pytest.raises(BadConstraintsError):
        QuantizeConfig.from_json("{not json")
