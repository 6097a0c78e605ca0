"""Transformers through the intake and the sensitivity stage: tiny Hugging Face models built from
configs (tests/hf_zoo.py), exported with a dynamic batch, calibrated with integer token ids."""

from __future__ import annotations

import math
from pathlib import Path

import hf_zoo
import pytest
import torch
from safetensors.torch import save_file

from quantize.graph import find_layers
from sensitivity import HessianConfig, measure
from sensitivity.intake import intake
from service.pipeline import shared_input_ties
from solver.errors import BadCalibrationError

SEQ = 32


def _save_calib(path: Path, **tensors: torch.Tensor) -> Path:
    save_file({f"input.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    d = tmp_path_factory.mktemp("llama")
    lm = hf_zoo.trained_llama()
    ids = hf_zoo.calibration_ids(24, SEQ)
    model = hf_zoo.save(lm, (ids[:2],), d / "llama.pt2")
    return model, _save_calib(d / "calib.safetensors", input_ids=ids), lm


@pytest.fixture(scope="module")
def llama_intake(llama_files):
    model, calib, _ = llama_files
    return intake(model, calib)


def test_llama_intake_ids_as_they_are(llama_files, llama_intake) -> None:
    _, _, lm = llama_files
    it = llama_intake
    names = [layer.name for layer in it.layers]
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.model.layers.{i}.{p}" for i in range(2) for p in per_block] + [
        "model.lm_head"]
    assert {layer.kind for layer in it.layers} == {"linear"}
    assert it.loss_kind == "kl" and it.token_input == 0 and it.decomposed
    assert it.output_shape == (SEQ, hf_zoo.VOCAB)
    (ids,) = it.train.args
    assert ids.dtype == torch.int64  # never cast
    # the decomposed, rewritten module computes the model's logits
    with torch.no_grad():
        ref, got = lm(ids[:4]), it.module(ids[:4])
    assert torch.allclose(ref, got, atol=1e-4), float((ref - got).abs().max())
    # embeddings stay float, and the plan's model section says so
    (emb,) = [f for f in it.float_params if f["op"] == "embedding"]
    assert emb["name"] == "model.model.embed_tokens.weight" and emb["params"] == 256 * 32
    assert it.summary()["float_params"] == it.float_params
    # GQA: k/v have kv_heads * head_dim = 2 * 8 outputs; MACs per sample = T * in * out
    k = next(layer for layer in it.layers if layer.name.endswith("0.self_attn.k_proj"))
    assert k.weight_shape == (16, 32) and k.macs == SEQ * 32 * 16
    # q/k/v read the same normed input, gate/up too: tied to one activation quantizer
    ties = shared_input_ties(it.module, it.layers)
    for i in range(2):
        p = f"model.model.layers.{i}."
        assert (p + "self_attn.q_proj", p + "self_attn.k_proj") in ties
        assert (p + "self_attn.q_proj", p + "self_attn.v_proj") in ties
        assert (p + "mlp.gate_proj", p + "mlp.up_proj") in ties


def test_llama_sensitivity_runs_on_token_ids(llama_intake) -> None:
    res = measure(llama_intake, HessianConfig(max_iter=6, min_iter=4, tol=0.5), torch.device("cpu"))
    traces = {layer.name: layer.weight_trace for layer in res.layers}
    assert len(traces) == 15 and all(t > 0 and math.isfinite(t) for t in traces.values())
    # activation traces are those of the float inputs of the linear layers
    assert all(layer.activation_trace > 0 for layer in res.layers)


@pytest.mark.parametrize("case", ["too large", "negative", "float ids", "int32 ids"])
def test_bad_token_ids(case, llama_files, tmp_path) -> None:
    model, _, _ = llama_files
    ids = hf_zoo.calibration_ids(6, SEQ)
    bad, message = {
        "too large": (ids.index_fill(1, torch.tensor([3]), 300),
                      r"ids in \[\d+, 300\].*256 rows: ids must lie in \[0, 255\]"),
        "negative": (ids.index_fill(1, torch.tensor([3]), -1), r"ids in \[-1, \d+\]"),
        "float ids": (ids.float(), "float32; the model's input takes int64"),
        "int32 ids": (ids.to(torch.int32), "int32; the model's input takes int64"),
    }[case]
    with pytest.raises(BadCalibrationError, match=message) as err:
        intake(model, _save_calib(tmp_path / "c.safetensors", input_ids=bad))
    assert "input.input_ids" in str(err.value)


def test_token_labels_give_cross_entropy(tmp_path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 8, (8, 6), generator=torch.Generator().manual_seed(1))
    model = hf_zoo.save(_TokenLM().eval(), (ids[:2],), tmp_path / "tok.pt2")
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100  # not scored
    calib = tmp_path / "c.safetensors"
    save_file({"input.ids": ids, "labels": labels}, str(calib))
    it = intake(model, calib)
    assert it.loss_kind == "cross_entropy" and it.token_input is None
    save_file({"input.ids": ids, "labels": labels[:, :5].contiguous()}, str(calib))
    with pytest.raises(BadCalibrationError, match="do not fit the model's output"):
        intake(model, calib)
    save_file({"input.ids": ids, "labels": labels.index_fill(1, torch.tensor([0]), 8)},
              str(calib))
    with pytest.raises(BadCalibrationError, match="class index 8"):
        intake(model, calib)


def test_tied_lm_head_is_quantized_and_its_table_stays_float(tmp_path) -> None:
    torch.manual_seed(0)
    lm = hf_zoo.CausalLM(hf_zoo.llama(tied=True)).eval()
    ids = hf_zoo.calibration_ids(6, SEQ)
    model = hf_zoo.save(lm, (ids[:2],), tmp_path / "tied.pt2")
    it = intake(model, _save_calib(tmp_path / "c.safetensors", input_ids=ids))
    head = it.layers[-1]
    assert head.kind == "linear" and head.weight_shape == (256, 32)
    (table,) = [f for f in it.float_params if f["op"] == "embedding"]
    assert table["tied_to"] == head.name


def test_bert_encoder_with_ids_and_mask(tmp_path) -> None:
    enc = hf_zoo.trained_bert()
    ids = hf_zoo.calibration_ids(12, SEQ)
    mask = torch.ones_like(ids)
    mask[::2, SEQ // 2 :] = 0  # padded sequences
    model = hf_zoo.save(enc, (ids[:2], mask[:2]), tmp_path / "bert.pt2")
    it = intake(model, _save_calib(tmp_path / "c.safetensors", input_ids=ids,
                                   attention_mask=mask))
    assert it.output_shape == (32,) and it.token_input is None
    per_block = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
    assert [layer.name for layer in it.layers] == [
        f"model.encoder.layer.{i}.{p}" for i in range(2) for p in per_block]
    assert [a.dtype for a in it.train.args] == [torch.int64, torch.int64]  # as they are
    with torch.no_grad():
        ref = enc(ids[:4], mask[:4])
        got = it.module(ids[:4], mask[:4])
    assert torch.allclose(ref, got, atol=1e-4)
    tables = {f["name"] for f in it.float_params if f["op"] == "embedding"}
    assert "model.embeddings.word_embeddings.weight" in tables
    ties = shared_input_ties(it.module, it.layers)
    p = "model.encoder.layer.0.attention.self."
    assert (p + "query", p + "key") in ties and (p + "query", p + "value") in ties


def test_gpt2_conv1d_is_a_linear_layer(tmp_path) -> None:
    torch.manual_seed(0)
    lm = hf_zoo.CausalLM(hf_zoo.gpt2()).eval()
    ids = hf_zoo.calibration_ids(6, SEQ)
    model = hf_zoo.save(lm, (ids[:2],), tmp_path / "gpt2.pt2")
    it = intake(model, _save_calib(tmp_path / "c.safetensors", input_ids=ids))
    by_name = {layer.name: layer for layer in it.layers}
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert list(by_name) == [f"model.transformer.h.{i}.{p}" for i in range(2)
                             for p in per_block] + ["model.lm_head"]
    c_attn = by_name["model.transformer.h.0.attn.c_attn"]
    # Conv1D stores [in, out] = [32, 96]; bitplan's layer is [out, in] with output axis 0
    assert c_attn.graph.transposed and c_attn.weight_shape == (96, 32)
    assert c_attn.out_channels == 96 and c_attn.macs == SEQ * 32 * 96
    assert c_attn.graph.bias == "model.transformer.h.0.attn.c_attn.bias"
    conv1d = lm.model.transformer.h[0].attn.c_attn
    assert dict(it.module.named_parameters())[c_attn.graph.weight].equal(conv1d.weight.t())
    with torch.no_grad():
        assert torch.allclose(lm(ids), it.module(ids), atol=1e-4)
    # the tied wte/lm_head table is quantized as lm_head and stays float as the embedding
    assert any(f.get("tied_to") == "model.lm_head" for f in it.float_params)
    # idempotent: a module already rewritten is found the same way
    assert [g.name for g in find_layers(it.module)] == list(by_name)


class _TokenLM(torch.nn.Module):
    """Embedding -> tanh -> linear head: [N, T] ids -> [N, T, V] logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def test_per_token_kl_trace_matches_the_exact_hessian(tmp_path) -> None:
    """Tr of the head's weight block of mean-over-tokens KL(p_fp32 || q) at the FP32 point,
    by Hutchinson vs torch.func.hessian."""
    torch.manual_seed(0)
    m = _TokenLM().eval()
    ids = torch.randint(0, 8, (10, 5), generator=torch.Generator().manual_seed(1))
    model = hf_zoo.save(m, (ids[:2],), tmp_path / "tok.pt2")
    save_file({"inputs": ids}, str(tmp_path / "c.safetensors"))
    it = intake(model, tmp_path / "c.safetensors")
    assert it.loss_kind == "kl" and it.token_input == 0
    (x,) = it.train.args
    h = torch.tanh(m.emb(x)).detach()
    target = torch.log_softmax(m.head(h), -1).detach()

    def loss(w: torch.Tensor) -> torch.Tensor:
        logq = torch.log_softmax(h @ w.T + m.head.bias, -1)
        return (target.exp() * (target - logq)).sum(-1).mean()

    w = m.head.weight.detach()
    exact = float(torch.func.hessian(loss)(w).reshape(w.numel(), w.numel()).trace())
    res = measure(it, HessianConfig(max_iter=400, min_iter=400, tol=0.5, activations=False),
                  torch.device("cpu"))
    (head,) = [layer for layer in res.layers if layer.name == "head"]
    # 400 Rademacher probes: stderr well under 10 % here; 4 standard errors of margin
    assert abs(head.weight_trace - exact) < 4 * head.weight_trace_stderr + 1e-9, (
        head.weight_trace, exact, head.weight_trace_stderr)
    assert head.weight_trace_stderr < 0.1 * exact


class _WithTransposedConv(torch.nn.Module):
    """A transposed convolution (not quantized) holding most of the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(1, 32, 3)
        self.fc = torch.nn.Linear(32 * 10 * 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.up(x)).flatten(1))


def test_unquantizable_parameter_heavy_ops_are_listed_and_printed(tmp_path) -> None:
    from service.commands.plan import float_params_lines

    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    model = hf_zoo.save(_WithTransposedConv().eval(), (x[:2],), tmp_path / "m.pt2")
    save_file({"inputs": x}, str(tmp_path / "c.safetensors"))
    it = intake(model, tmp_path / "c.safetensors")
    assert [layer.name for layer in it.layers] == ["fc"]
    (up,) = it.float_params
    total = 32 * 9 + 32 + 3200 * 4 + 4
    assert up["name"] == "up.weight" and up["params"] == 32 * 9
    assert up["share"] == pytest.approx(32 * 9 / total, abs=1e-4)
    (line,) = float_params_lines({"model": {"float_params": it.float_params}})
    assert "stay in floating point" in line and "up.weight" in line


def test_bitplan_never_imports_transformers() -> None:
    root = Path(__file__).resolve().parents[2]
    offenders = [
        str(path.relative_to(root)) for pkg in ("service", "solver", "sensitivity", "quantize")
        for path in (root / pkg).rglob("*.py")
        if any(line.strip().startswith(("import transformers", "from transformers"))
               for line in path.read_text().splitlines())
    ]
    assert offenders == []
