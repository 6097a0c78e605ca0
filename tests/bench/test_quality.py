"""bench/quality.py: the encoder's measures (embedding cosine, MSE to FP32) through the real
pipeline on a small token encoder, and the oracles' plans at one budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench.quality as quality

SEQ, VOCAB, HIDDEN = 8, 64, 16


class _TokenEncoder(nn.Module):
    """ids [N, T] -> hidden states [N, T, HIDDEN]: embedding, then an MLP per token. (The
    model's output is the last linear layer's: with a residual add or a LayerNorm after it the
    job's ONNX check refuses this model, 10 % of that layer's output codes differing.)"""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.emb(ids))))


@pytest.fixture(scope="module")
def encoder_job(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    model = _TokenEncoder().eval()
    ids = torch.randint(0, VOCAB, (quality.N_CALIB + 40, SEQ))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        ep = torch.export.export(model, (ids[:4],), dynamic_shapes=({0: batch},))
    pt2 = work / "enc.pt2"
    torch.export.save(ep, str(pt2))
    mp = pytest.MonkeyPatch()
    mp.setattr(quality, "trained", lambda name, w: (pt2, ids, None))
    try:  # "bert" is the encoder kind's name; the model is the small one above
        problem, template, ev, _ = quality.prepare("bert", work, [8])
    finally:
        mp.undo()
    return model, ids, problem, template, ev


def test_encoder_cosine_and_mse_are_per_token_against_fp32(encoder_job) -> None:
    model, ids, problem, template, ev = encoder_job
    assert ev.kind == "encoder" and ev.encoder and not ev.lm
    assert ev.fp32_primary.shape == (40,)
    assert torch.allclose(ev.fp32_primary, torch.ones(40, dtype=torch.float64), atol=1e-12)
    int4 = quality.plan_for(template, problem, quality.extreme(problem, min))
    cos, mse = ev.score(int4)
    with torch.no_grad():  # float64, as the bench scores them
        ref = model(ids[quality.N_CALIB:]).double()
        got = ev.module(int4)(ids[quality.N_CALIB:]).double()
        cal_ref = model(ids[: quality.N_CALIB])
        cal_got = ev.module(int4)(ids[: quality.N_CALIB])
    assert torch.allclose(cos, F.cosine_similarity(got, ref, dim=-1).mean(1), atol=1e-12)
    assert torch.allclose(mse, (got - ref).pow(2).mean((1, 2)), rtol=1e-9, atol=1e-15)
    # the oracles' calibration loss: MSE to the FP32 outputs on the calibration samples
    assert ev.calib_loss(int4) == pytest.approx(float((cal_got - cal_ref).pow(2).mean()),
                                                rel=1e-5)
    assert float(mse.mean()) > 0 and float(cos.mean()) < 1


def test_encoder_rows_at_a_size_budget(encoder_job) -> None:
    _, _, problem, template, ev = encoder_job
    assert [la.name for la in problem.layers] == ["up", "down"]
    increase = quality.measured_increase(ev, template, problem)
    for name, vals in increase.items():  # W4 (cheaper) damages more than W8 on each layer
        opts = problem.layers[[la.name for la in problem.layers].index(name)].options
        w = {o.w_bits: v for o, v in zip(opts, vals, strict=True)}
        assert w[4] > w[8] >= 0, (name, w)
    (label, limit), = quality.budgets(problem, "size_bytes", [0.5])
    rows = quality.run_budget(problem, template, ev, increase, "size_bytes", limit,
                              n_random=2, seed=0)
    for k in ("bitplan", "greedy", "ilp-measured", "random-picked"):
        assert rows[k]["use"] <= 1 + 1e-9, k
    # uniform INT8 is the most faithful plan, INT4 the least (8 vs 4 bits on every layer:
    # ~16x the squared error, far outside any rounding of the comparison)
    assert rows["int8"]["kl"] < rows["bitplan"]["kl"] <= rows["int4"]["kl"]
    assert rows["int8"]["value"] > rows["int4"]["value"]
    assert rows["bitplan"]["vs_bitplan"] == 0 and rows["bitplan"]["se"] == 0
    assert isinstance(rows["int4"]["vs_bitplan"], float)  # a mean, not a digit count
    # the cosines are summarised in float64 (float32 steps are 6e-8 near 1, the size of the
    # bench's BERT differences)
    cos4 = ev.score(quality.plan_for(template, problem, quality.extreme(problem, min)))[0]
    cos_b = ev.score(quality.plan_for(template, problem, dict(
        quality.solve(quality.Problem(problem.layers, quality.Limits(size_bytes=limit),
                                      problem.ties), quality.SolveConfig()).choices)))[0]
    assert rows["int4"]["value"] == pytest.approx(float(cos4.mean()), rel=0, abs=1e-12)
    assert rows["int4"]["vs_bitplan"] == pytest.approx(float((cos4 - cos_b).mean()), rel=0,
                                                       abs=1e-12)
    line = quality.row_line("encoder", "int4", rows["int4"])
    assert line.split()[:2] == ["int4", f"{1 - rows['int4']['value']:.3e}"]  # 1 - cos
    # the summary rows (random-median, random-best, fp32) have no paired columns
    assert len(quality.row_line("encoder", "fp32", rows["fp32"]).split()) == 3
