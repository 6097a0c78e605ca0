"""Roofline profiles: documented, compute- vs memory-bound regimes, precision classes."""

from __future__ import annotations

import pytest

from solver.errors import BadConstraintsError
from solver.hardware import get_profile, profiles


def test_shipped_profiles_are_documented() -> None:
    ps = profiles()
    assert {"nvidia-t4", "nvidia-a100", "arm-cortex-a76x4"} <= set(ps)
    for p in ps.values():
        assert "datasheet" in p.source.lower() or "derived" in p.source.lower()
    t4 = ps["nvidia-t4"]
    assert t4.macs_per_s == {4: 130e12, 8: 65e12} and t4.bandwidth_bytes_per_s == 320e9


def test_roofline_regimes() -> None:
    t4 = get_profile("nvidia-t4")
    # Compute-bound: many MACs, few bytes. INT4 runs twice as fast as INT8 on the T4.
    ms8 = t4.latency_ms(macs=1e12, params=100, w_bits=8, a_bits=8, input_numel=100)
    ms4 = t4.latency_ms(macs=1e12, params=100, w_bits=4, a_bits=4, input_numel=100)
    assert ms8 == pytest.approx(1e12 / 65e12 * 1e3) and ms4 == pytest.approx(ms8 / 2)
    # Mixed w4a8 runs at the INT8 rate (the wider operand decides).
    assert t4.latency_ms(1e12, 100, 4, 8, 100) == pytest.approx(ms8)
    # Memory-bound: bytes = packed weights + input activations at a bits.
    ms = t4.latency_ms(macs=1.0, params=10**9, w_bits=4, a_bits=8, input_numel=10**6)
    assert ms == pytest.approx((0.5e9 + 1e6) / 320e9 * 1e3)
    cpu = get_profile("arm-cortex-a76x4")  # no INT4 unit: 4-bit is no faster
    assert cpu.latency_ms(1e12, 1, 4, 4, 1) == cpu.latency_ms(1e12, 1, 8, 8, 1)


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(BadConstraintsError, match="nvidia-t4"):
        get_profile("nope")
