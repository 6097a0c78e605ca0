"""quantize/calibrate.py's range observer: one min/max pass that still refuses NaN and inf."""

from __future__ import annotations

import pytest
import torch

from quantize.calibrate import RangeObserver, _BatchInfo
from solver.errors import BadCalibrationError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 7, 63])
def test_a_non_finite_value_anywhere_is_refused(bad, where) -> None:
    obs = RangeObserver(_BatchInfo(), bins=16)
    x = torch.randn(4, 16)
    obs(x)
    y = torch.randn(4, 16)
    y.view(-1)[where] = bad
    with pytest.raises(BadCalibrationError, match="non-finite"):
        obs(y)


def test_range_and_count_over_batches_and_padding() -> None:
    info = _BatchInfo()
    obs = RangeObserver(info, bins=16)
    a = torch.tensor([[0.5, -2.0], [1.0, 3.0]])
    info.full, info.valid = 3, 2  # the third row is padding: its 100 is not seen
    obs(torch.cat([a, torch.tensor([[100.0, -100.0]])]))
    obs(torch.tensor([[-3.0, 0.0]]))
    assert (obs.amin, obs.amax, obs.count) == (-3.0, 3.0, 6)
    assert obs.value_range("minmax", 99.9) == (-3.0, 3.0)
