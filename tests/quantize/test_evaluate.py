"""Evaluation metrics against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantize.data import CalibrationSet
from quantize.evaluate import evaluate


class _Fixed(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def test_metrics_match_direct_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(37, 5, generator=gen)
    q = f + 0.3 * torch.randn(37, 5, generator=gen)
    labels = torch.randint(0, 5, (37,), generator=gen)
    data = CalibrationSet((torch.arange(37),), labels=labels)
    got = evaluate(_Fixed(f), _Fixed(q), data, batch_size=8)
    assert got["samples"] == 37
    assert got["fp32_accuracy"] == pytest.approx(float((f.argmax(1) == labels).float().mean()))
    assert got["quant_accuracy"] == pytest.approx(float((q.argmax(1) == labels).float().mean()))
    agree = float((f.argmax(1) == q.argmax(1)).float().mean())
    assert got["top1_agreement"] == pytest.approx(agree)
    kl = torch.nn.functional.kl_div(q.log_softmax(1), f.log_softmax(1), log_target=True,
                                    reduction="batchmean")
    assert got["kl_mean"] == pytest.approx(float(kl), rel=1e-5)
    sqnr = 10 * math.log10(float(f.pow(2).sum() / (f - q).pow(2).sum()))
    assert got["sqnr_db"] == pytest.approx(sqnr, rel=1e-6)


def test_identical_outputs_and_fixed_batches_without_labels() -> None:
    f = torch.randn(10, 3)
    data = CalibrationSet((torch.arange(10),))
    got = evaluate(_Fixed(f), _Fixed(f), data, batch_size=4, fixed=True)
    assert got["samples"] == 10 and got["fp32_accuracy"] is None
    assert got["top1_agreement"] == 1.0 and got["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert got["sqnr_db"] is None and got["output_mse"] == 0.0


def test_wilson_and_t_intervals_against_published_values():
    from quantize.evaluate import mean_interval, t_quantile, wilson

    # Wilson 95 % for 8 of 10 (Newcombe 1998, table I): 0.490 .. 0.943
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(0, 0) is None
    # t(0.975) tables: df 5 -> 2.571, 9 -> 2.262, 29 -> 2.045
    for df, exact in [(5, 2.571), (9, 2.262), (29, 2.045)]:
        assert t_quantile(df) == pytest.approx(exact, rel=2e-3)
    values = [0.1, 0.4, 0.2, 0.9, 0.3]
    mean, sd = sum(values) / 5, math.sqrt(sum((v - 0.38) ** 2 for v in values) / 4)
    low, high = mean_interval(sum(values), sum(v * v for v in values), 5)
    assert (low + high) / 2 == pytest.approx(mean)
    # df = 4: t = 2.776 (the expansion is 0.3 % low there)
    assert (high - low) / 2 == pytest.approx(2.776 * sd / math.sqrt(5), rel=5e-3)


class _Logits(nn.Module):
    """[N, T] token ids -> the fixed [N, T, V] logits of those samples (looked up by the ids'
    first column, which holds the sample index)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids[:, 0]]


def _lm_case(n: int = 9, t: int = 6, v: int = 11):
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(n, t, v, generator=gen)
    q = f + 0.5 * torch.randn(n, t, v, generator=gen)
    ids = torch.randint(0, v, (n, t), generator=gen)
    ids[:, 0] = torch.arange(n)  # the lookup key (n <= v)
    return f, q, ids


def test_language_model_metrics_are_per_token_with_next_token_perplexity() -> None:
    f, q, ids = _lm_case()
    data = CalibrationSet((ids,))
    got = evaluate(_Logits(f), _Logits(q), data, batch_size=4, token_input=0)
    rows_f, rows_q = f.reshape(-1, 11), q.reshape(-1, 11)
    agree = float((rows_f.argmax(1) == rows_q.argmax(1)).float().mean())
    assert got["top1_agreement"] == pytest.approx(agree)
    kl = torch.nn.functional.kl_div(rows_q.log_softmax(1), rows_f.log_softmax(1),
                                    log_target=True, reduction="batchmean")
    assert got["kl_mean"] == pytest.approx(float(kl), rel=1e-5)  # mean over 54 tokens
    targets = ids[:, 1:].reshape(-1)
    for key, out in (("fp32_perplexity", f), ("quant_perplexity", q)):
        nll = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 11), targets)
        assert got[key] == pytest.approx(math.exp(float(nll)), rel=1e-6)
    assert got["tokens_per_sample"] == 6 and got["cosine_mean"] is None
    # keyword input: the same numbers
    kw = evaluate(_KwLogits(f), _KwLogits(q), CalibrationSet((), {"input_ids": ids}), 4,
                  token_input="input_ids")
    assert kw["fp32_perplexity"] == pytest.approx(got["fp32_perplexity"])
    # no token input: no perplexity
    assert evaluate(_Logits(f), _Logits(q), data, 4)["fp32_perplexity"] is None


class _KwLogits(_Logits):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids)


def test_token_labels_score_accuracy_and_perplexity_where_not_ignored() -> None:
    f, q, ids = _lm_case()
    labels = torch.randint(0, 11, ids.shape, generator=torch.Generator().manual_seed(4))
    labels[:, :2] = -100
    got = evaluate(_Logits(f), _Logits(q), CalibrationSet((ids,), labels=labels), 5,
                   token_input=0)
    keep = labels.reshape(-1) != -100
    y = labels.reshape(-1)[keep]
    rows_f, rows_q = f.reshape(-1, 11)[keep], q.reshape(-1, 11)[keep]
    assert got["fp32_accuracy"] == pytest.approx(float((rows_f.argmax(1) == y).float().mean()))
    assert got["quant_accuracy"] == pytest.approx(float((rows_q.argmax(1) == y).float().mean()))
    nll = torch.nn.functional.cross_entropy(rows_q, y)  # labels win over next-token ids
    assert got["quant_perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-6)


def test_embedding_outputs_give_mean_cosine_similarity() -> None:
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(13, 16, generator=gen)
    q = f + 0.4 * torch.randn(13, 16, generator=gen)
    got = evaluate(_Fixed(f), _Fixed(q), CalibrationSet((torch.arange(13),)), batch_size=4)
    cos = torch.nn.functional.cosine_similarity(f.double(), q.double(), dim=1).mean()
    assert got["cosine_mean"] == pytest.approx(float(cos), rel=1e-9)
    assert 0.8 < got["cosine_mean"] < 1.0  # noise 0.4 of unit-variance outputs
    assert got["fp32_perplexity"] is None and got["tokens_per_sample"] is None


class _FlatView(nn.Module):
    """A conv whose 4-D map is flattened by a view: it cannot run channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_image_models_evaluate_channels_last_with_the_same_metrics(cnn_program, cnn_int8,
                                                                  heldout_eval,
                                                                  monkeypatch) -> None:
    """An image model runs channels-last (the same metrics as run as exported, the modules
    given back in their layout); a graph that cannot (a view of the 4-D map) runs as
    exported."""
    import quantize.evaluate as ev
    from quantize.graph import program_module
    from sensitivity import zoo

    _, holdout = heldout_eval
    fp32, quant = program_module(cnn_program), cnn_int8.module
    runner = ev.Runner([quant, fp32])
    batch = next(iter(holdout.batches(64)))
    with torch.no_grad():
        runner(batch)
    assert runner.channels_last
    runner.close()
    assert all(p.is_contiguous() for m in (quant, fp32) for p in [*m.parameters(),
                                                                   *m.buffers()])
    fast = evaluate(fp32, quant, holdout, 64)
    monkeypatch.setattr(ev, "CHANNELS_LAST", False)
    slow = evaluate(fp32, quant, holdout, 64)
    monkeypatch.setattr(ev, "CHANNELS_LAST", True)
    # the convolutions sum in another order: the counts are equal (the FP32 logits' closest top
    # two are 2.0e-4 of their range apart, about 1000x the layouts' ~1e-7 difference), the
    # float measures within float rounding (measured <= 2.3e-6 relative, KL; the bound is 40x)
    for key, value in slow.items():
        if isinstance(value, float):
            assert fast[key] == pytest.approx(value, rel=1e-4), key
        elif key != "intervals":
            assert fast[key] == value, key

    x = holdout.args[0][:16]
    flat = zoo.export(_FlatView().eval(), x[:4]).module()
    runner = ev.Runner([flat])
    with torch.no_grad():
        (out,) = runner(CalibrationSet((x,)).batches(16).__next__())
        assert runner.channels_last is False
        assert torch.equal(out, flat(x))
