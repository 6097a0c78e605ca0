"""The DRQ acceptance check's measurement: per-sample losses of a quantized plan on the
calibration samples, and the paired decision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize import QuantizeConfig, apply
from quantize.data import CalibrationSet
from quantize.drqcheck import CheckConfig, compare, decide, sample_losses
from quantize.evaluate import reference_outputs

DRQ = {"region": [2, 2], "threshold": 40, "sensitive_fraction": 0.3, "mac_fraction": 0.3,
       "high_bits": 8, "low_bits": 4}


def test_decide_keeps_drq_only_beyond_the_margin() -> None:
    off = torch.linspace(0.5, 1.5, 50, dtype=torch.float64)
    noise = torch.sin(torch.arange(50, dtype=torch.float64))  # mean ~0, sd ~0.71
    se = float(noise.std()) / math.sqrt(50)
    clear = decide(off - 0.02 + 0.01 * noise, off, "cross_entropy")
    assert clear.kept == "drq" and clear.diff < 0 and "kept above 1 se" in clear.reason
    # a gain of half a standard error is noise: the plan without DRQ stays
    shift = float(noise.mean()) + 0.5 * se
    small = decide(off + noise - shift, off, "kl")
    assert small.kept == "off" and small.diff_se == pytest.approx(se, rel=1e-12)
    assert -small.diff == pytest.approx(0.5 * se, rel=1e-9)
    assert decide(off + noise - shift, off, "kl", CheckConfig(margin_se=0.25)).kept == "drq"
    assert decide(off, off, "mse").kept == "off"  # a tie goes to the plan without DRQ
    assert decide(off + 0.1, off, "mse").kept == "off"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=30), st.floats(-1, 1),
       st.floats(0, 3))
def test_decide_is_the_paired_t_rule(diffs, shift, margin) -> None:
    off = torch.ones(len(diffs), dtype=torch.float64)
    d = torch.tensor(diffs, dtype=torch.float64) + shift
    r = decide(off + d, off, "kl", CheckConfig(margin_se=margin))
    se = float(d.std()) / math.sqrt(len(diffs))
    assert r.samples == len(diffs) and r.diff_se == pytest.approx(se, abs=1e-12)
    gain = -float(d.mean())
    # strictly beyond the margin (and a real gain) keeps DRQ; away from the boundary only
    if gain > margin * se + 1e-9 and gain > 1e-12:
        assert r.kept == "drq"
    elif gain < margin * se - 1e-9 or gain <= 0:
        assert r.kept == "off"


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="margin_se"):
        CheckConfig(margin_se=-1)
    with pytest.raises(ValueError, match="same length"):
        decide(torch.zeros(3), torch.zeros(4), "kl")
    with pytest.raises(ValueError, match="loss kind"):
        sample_losses(torch.nn.Identity(), torch.nn.Identity(),
                      CalibrationSet((torch.zeros(2, 3),)), "hinge", 2)


def test_sample_losses_match_the_loss_functions(cnn_program, heldout_eval,
                                                monkeypatch) -> None:
    train, _ = heldout_eval
    ref = cnn_program.module()
    scaled = lambda x: ref(x) * 0.5  # noqa: E731 (another model: softened logits)
    x, y = train.args[0], train.labels
    with torch.no_grad():
        r, s = ref(x).double(), scaled(x).double()
    ce = sample_losses(ref, scaled, train, "cross_entropy", 64)
    assert torch.allclose(ce, F.cross_entropy(s, y, reduction="none"), atol=1e-12)
    kl = sample_losses(ref, scaled, train, "kl", 64)
    logp = F.log_softmax(r, 1)
    assert torch.allclose(kl, (logp.exp() * (logp - F.log_softmax(s, 1))).sum(1), atol=1e-12)
    assert torch.allclose(sample_losses(ref, scaled, train, "mse", 64), (s - r).pow(2).mean(1),
                          atol=1e-12)
    assert float(sample_losses(ref, ref, train, "kl", 64).abs().max()) < 1e-12
    # a fixed-batch program: the padded rows of the last chunk are not scored
    padded = sample_losses(ref, scaled, train, "cross_entropy", 100, fixed=True)
    assert padded.shape == (len(train),) and torch.allclose(padded, ce, atol=1e-12)
    # no labels: cross-entropy falls back to KL to the reference
    unlabelled = CalibrationSet((x,))
    assert torch.allclose(sample_losses(ref, scaled, unlabelled, "cross_entropy", 64), kl)
    # the FP32 outputs measured once score like the FP32 module, chunked or padded alike (run
    # as exported, as the module here: channels-last convolutions sum in another order)
    monkeypatch.setattr("quantize.evaluate.CHANNELS_LAST", False)
    outputs = reference_outputs(ref, train, 64)
    for kind, want in (("kl", kl), ("mse", sample_losses(ref, scaled, train, "mse", 64))):
        assert torch.equal(sample_losses(outputs, scaled, train, kind, 64), want)
        assert torch.allclose(sample_losses(outputs, scaled, train, kind, 100, fixed=True),
                              want, atol=1e-12)
    with pytest.raises(ValueError, match="FP32 reference"):
        sample_losses(None, scaled, train, "kl", 64)


def test_compare_scores_both_plans_on_the_calibration_samples(cnn_program, plan_for,
                                                              heldout_eval, cnn_int8) -> None:
    """The losses are those of the quantized modules quantize.apply builds, on ``train``; the
    DRQ plan (conv2 with 70 % of its regions at W4A4) against the all-W8A8 plan."""
    train, _ = heldout_eval
    grid = cnn_int8.checkpoint.input_grid("conv2")
    plans = {"drq": plan_for(cnn_program, drq={"conv2": {**DRQ, "scale": grid.scale,
                                                         "signed": grid.signed}}),
             "off": plan_for(cnn_program)}
    # a classifier is checked by KL to FP32 (label_free), or at the labels when asked
    r = compare(cnn_program, plans, train, "cross_entropy")
    ce = compare(cnn_program, plans, train, "cross_entropy", CheckConfig(label_free=False))
    assert r.loss_kind == "kl" and ce.loss_kind == "cross_entropy"
    assert r.samples == len(train) and r.seconds > 0
    x, y = train.args[0], train.labels
    with torch.no_grad():
        logp = F.log_softmax(cnn_program.module()(x).double(), 1)
    for key in ("drq", "off"):
        module = apply(cnn_program, plans[key], train, train, QuantizeConfig()).module
        bare = apply(cnn_program, plans[key], train, None, QuantizeConfig())  # not evaluated
        assert bare.report["metrics"] == {}
        with torch.no_grad():
            out = module(x).double()
            assert torch.equal(bare.module(x).double(), out)
        kl = float((logp.exp() * (logp - F.log_softmax(out, 1))).sum(1).mean())
        # rel 1e-6: the check runs the FP32 model channels-last (measured 3.1e-8 apart)
        assert getattr(r, f"loss_{key}") == pytest.approx(kl, rel=1e-6)
        assert getattr(ce, f"loss_{key}") == pytest.approx(float(F.cross_entropy(out, y)),
                                                          rel=1e-9)
    assert r.loss_drq != r.loss_off
    assert r.to_dict()["kept"] == r.kept and r.to_dict()["diff"] == r.loss_drq - r.loss_off


def test_the_check_loss_of_each_job_loss() -> None:
    assert [CheckConfig().loss(k) for k in ("cross_entropy", "kl", "mse")] == ["kl", "kl", "mse"]
    assert CheckConfig(label_free=False).loss("cross_entropy") == "cross_entropy"


def test_compare_on_a_fixed_batch_program(cnn_program, cnn_fixed_batch_pt2, plan_for,
                                          heldout_eval, cnn_int8) -> None:
    """A program exported for batches of exactly 16: the 256 digits run in padded chunks and
    the losses are those of the dynamic-batch export of the same model."""
    train, _ = heldout_eval
    fixed = torch.export.load(str(cnn_fixed_batch_pt2))
    grid = cnn_int8.checkpoint.input_grid("conv2")
    plans = {"drq": plan_for(cnn_program, drq={"conv2": {**DRQ, "scale": grid.scale,
                                                         "signed": grid.signed}}),
             "off": plan_for(cnn_program)}
    sub = train.subset(torch.arange(250))  # not a multiple of 16: the last chunk is padded
    r = compare(fixed, plans, sub, "cross_entropy", batch_size=16)
    want = compare(cnn_program, plans, sub, "cross_entropy")
    assert r.samples == 250
    # equal here (AMD EPYC); 1e-5 leaves room for another kernel order on another CPU
    assert r.loss_drq == pytest.approx(want.loss_drq, rel=1e-5)
    assert r.loss_off == pytest.approx(want.loss_off, rel=1e-5)
