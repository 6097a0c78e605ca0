"""Hardware profiles: documented; roofline regimes and precision classes; the drq-array's
options and cycle counts."""

from __future__ import annotations

import pytest

from solver import ActivationMode, LayerSpec, Limits, OptionsConfig, build_problem
from solver.errors import BadConstraintsError
from solver.hardware import DRQArrayProfile, get_profile, load_profile, profiles


def test_shipped_profiles_are_documented() -> None:
    ps = profiles()
    assert {"nvidia-t4", "nvidia-a100", "arm-cortex-a76x4", "drq-array"} <= set(ps)
    for p in ps.values():
        src = p.source.lower()
        assert "datasheet" in src or "derived" in src or "isca 2020" in src
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


DRQ = {"region": [2, 2], "threshold": 17, "sensitive_fraction": 0.35, "mac_fraction": 0.3,
       "high_bits": 8, "low_bits": 4, "scale": 0.02, "signed": False}
MACS = 1_000_000 * 64


def test_drq_array_profile_is_documented() -> None:
    p = get_profile("drq-array")
    assert isinstance(p, DRQArrayProfile)
    assert "DRQ: Dynamic Region-based Quantization" in p.source and "assumption" in p.source
    assert "compute-bound" in p.assumptions and "1 GHz" in p.assumptions
    assert p.pe_groups == 1024 and p.clock_hz == 1e9
    with pytest.raises(BadConstraintsError, match="kind"):
        load_profile({"kind": "tpu"})


def test_drq_array_options_and_latencies() -> None:
    """A PE group runs one 8x8 or four 4x4 multiplications per cycle; 1024 groups at 1 GHz."""
    mode = ActivationMode("drq2x2f0.3", 8 * 0.3 + 4 * 0.7, 0.01, DRQ)
    spec = LayerSpec(name="c", kind="conv2d", params=1000, macs=MACS, out_channels=10,
                     input_numel=500, omega_w={b: 1.0 / b for b in (2, 4, 8)},
                     omega_a={4: 0.1, 8: 0.01}, activation_modes=[mode])
    cfg = OptionsConfig(weight_bits=(2, 4, 8), activation_bits=(4, 8), pin_first=None,
                        pin_last=None, hardware="drq-array")
    opts = {o.tag: o for o in build_problem([spec], cfg, Limits()).layers[0].options}
    # only what the array runs: W8A8, W4A4 and DRQ at 4- and 8-bit weights
    assert sorted(opts) == ["w4a4", "w4drq2x2f0.3", "w8a8", "w8drq2x2f0.3"]
    cycle_ms = 1e3 / 1e9
    assert opts["w8a8"].latency_ms == pytest.approx(MACS / 1024 * cycle_ms)
    assert opts["w4a4"].latency_ms == pytest.approx(MACS / 4096 * cycle_ms)
    # DRQ: 30 % of the MACs 8x8 (one per group and cycle), 70 % 4x4 (four)
    drq_ms = (0.3 * MACS / 1024 + 0.7 * MACS / 4096) * cycle_ms
    assert opts["w8drq2x2f0.3"].latency_ms == pytest.approx(drq_ms)
    # 4-bit weights: the sensitive 4x8 multiplications still need an 8x8 unit
    assert opts["w4drq2x2f0.3"].latency_ms == pytest.approx(drq_ms)
    assert opts["w4a4"].latency_ms < drq_ms < opts["w8a8"].latency_ms
    # the default pins (w8a8) run; a pin it cannot run is refused with a message
    pinned = OptionsConfig(weight_bits=(4, 8), activation_bits=(4, 8), hardware="drq-array")
    assert [o.tag for o in build_problem([spec, spec.__class__(**{**spec.__dict__, "name": "d"})],
                                         pinned, Limits()).layers[0].options] == ["w8a8"]
    with pytest.raises(BadConstraintsError, match="does not run w2a2"):
        build_problem([spec], OptionsConfig(pin_first=2, pin_last=None, hardware="drq-array"),
                      Limits())
    with pytest.raises(BadConstraintsError, match="runs none"):
        build_problem([spec], OptionsConfig(weight_bits=(2,), activation_bits=(8,),
                                            pin_first=None, pin_last=None,
                                            hardware="drq-array"), Limits())
    with pytest.raises(BadConstraintsError, match="does not run w4a8"):
        get_profile("drq-array").latency_ms(MACS, 1000, 4, 8, 500)


def test_a_profile_says_its_latencies_are_modelled() -> None:
    for name, kind in (("nvidia-t4", "roofline"), ("drq-array", "drq-array")):
        src = get_profile(name).latency_source()
        assert src == {"kind": "modelled", "profile": name, "profile_kind": kind,
                       "source": get_profile(name).source}
