"""The signature read from a .pt2's JSON: the same inputs, dtypes, shapes and embedding tables as
the loaded program, and check_inputs agreeing with the full intake (accept, or the same typed
error) on good and bad calibration files; no unpickling; unknown layouts fall back."""

from __future__ import annotations

import inspect
import io
import json
import pickle
import zipfile
from pathlib import Path

import hf_zoo
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sensitivity.inputs import embedding_inputs
from sensitivity.intake import intake, load_calibration
from sensitivity.program import load_program
from sensitivity.signature import SignatureUnreadable, check_inputs, read_signature
from solver.errors import BadModelError, BitplanError

SEQ = 8


class _KwModel(nn.Module):
    """A positional float input and a keyword token-id input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, *, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids) * x.unsqueeze(-1)).sum(1)


class _TokenLM(nn.Module):
    """[N, T] token ids -> [N, T, 16] logits, no attention (quick to load and run)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


class _NoLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).relu()


@pytest.fixture(scope="module")
def models(tmp_path_factory, mlp_pt2, cnn_fixed_batch_pt2) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sig")
    torch.manual_seed(0)
    ids = hf_zoo.calibration_ids(4, SEQ)
    kw = torch.export.export(_KwModel().eval(), (torch.ones(2, 5),),
                             {"ids": torch.zeros(2, 5, dtype=torch.long)})
    torch.export.save(kw, str(d / "kw.pt2"))
    torch.export.save(torch.export.export(_NoLayer(), (torch.ones(2, 1, 8, 8),)),
                      str(d / "nolayer.pt2"))
    tok_ids = torch.zeros(2, 6, dtype=torch.long)
    torch.export.save(torch.export.export(_TokenLM().eval(), (tok_ids,), dynamic_shapes=(
        {0: torch.export.Dim("batch")},)), str(d / "tok.pt2"))
    return {
        "mlp": mlp_pt2,
        "cnn_fixed_batch": cnn_fixed_batch_pt2,
        "llama": hf_zoo.save(hf_zoo.CausalLM(hf_zoo.llama()).eval(), (ids[:2],),
                             d / "llama.pt2"),
        "bert": hf_zoo.save(hf_zoo.Encoder(hf_zoo.bert()).eval(),
                            (ids[:2], torch.ones_like(ids[:2])), d / "bert.pt2"),
        "kw": d / "kw.pt2",
        "nolayer": d / "nolayer.pt2",
        "tok": d / "tok.pt2",
    }


@pytest.mark.parametrize("name", ["mlp", "cnn_fixed_batch", "llama", "bert", "kw", "tok"])
def test_signature_matches_the_loaded_program(models, name) -> None:
    sig = read_signature(models[name])
    program = load_program(models[name])
    gm = program.module()
    metas = [n.meta["val"] for n in program.graph.nodes
             if n.op == "placeholder" and n.name in set(program.graph_signature.user_inputs)]
    assert [s.name for s in sig.inputs] == list(inspect.signature(gm.forward).parameters)
    for spec, val in zip(sig.inputs, metas, strict=True):
        assert spec.dtype == val.dtype
        assert spec.shape == tuple(d if isinstance(d, int) else None for d in val.shape)
    tables = embedding_inputs(gm)
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    assert {s.name: s.table for s in sig.inputs if s.table} == {
        name: tables[p] for name, p in zip([s.name for s in sig.inputs], placeholders,
                                           strict=True) if p in tables}
    (out,) = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert sig.output_shape == tuple(d if isinstance(d, int) else None
                                     for d in out.meta["val"].shape)
    assert sig.has_layer_ops


def test_the_dtype_table_agrees_with_torchs(models) -> None:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    from sensitivity.signature import _dtypes

    for code, dtype in _dtypes().items():
        assert _SERIALIZE_TO_TORCH_DTYPE[code] == dtype


def _calib(path: Path, labels: torch.Tensor | None = None, **tensors: torch.Tensor) -> Path:
    data = dict(tensors)
    if labels is not None:
        data["labels"] = labels
    save_file({k: v.contiguous() for k, v in data.items()}, str(path))
    return path


def _cases(digits) -> list[tuple[str, str, dict]]:
    x, y = digits
    x, y = x[:12], y[:12]
    ids = hf_zoo.calibration_ids(6, SEQ)
    kw_ids = torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0))
    tok = torch.randint(0, 16, (6, 6), generator=torch.Generator().manual_seed(1))
    return [
        ("mlp", "good", {"inputs": x, "labels": y}),
        ("mlp", "unlabelled", {"inputs": x}),
        ("mlp", "wrong shape", {"inputs": x[:, :, :4]}),
        ("mlp", "int input", {"inputs": (x * 10).to(torch.int64)}),
        ("mlp", "labels too large", {"inputs": x, "labels": y + 10}),
        ("mlp", "labels [N, T]", {"inputs": x, "labels": y[:, None].repeat(1, 3)}),
        ("mlp", "named input", {"input.x": x}),
        ("mlp", "wrong name", {"input.image": x}),
        ("cnn_fixed_batch", "good", {"inputs": x, "labels": y}),
        ("llama", "good", {"input.input_ids": ids}),
        ("llama", "ids too large", {"input.input_ids": ids.index_fill(1, torch.tensor([3]), 300)}),
        ("llama", "longer sequence", {"input.input_ids": torch.cat([ids, ids], 1)}),
        ("bert", "good", {"input.input_ids": ids, "input.attention_mask": torch.ones_like(ids)}),
        ("bert", "mask missing", {"input.input_ids": ids}),
        ("tok", "next-token labels", {"inputs": tok, "labels": tok.roll(-1, 1)}),
        ("tok", "labels one token short", {"inputs": tok, "labels": tok[:, :5]}),
        ("tok", "label index too large", {"inputs": tok, "labels": tok + 16}),
        ("tok", "ignored labels", {"inputs": tok, "labels": tok.index_fill(1, torch.tensor([0]),
                                                                            -100)}),
        ("kw", "good", {"input.x": torch.rand(6, 5), "input.ids": kw_ids}),
        ("kw", "ids too large", {"input.x": torch.rand(6, 5), "input.ids": kw_ids + 10}),
        ("kw", "negative ids", {"input.x": torch.rand(6, 5), "input.ids": kw_ids - 1}),
        ("kw", "float ids", {"input.x": torch.rand(6, 5), "input.ids": kw_ids.float()}),
        ("kw", "int32 ids", {"input.x": torch.rand(6, 5), "input.ids": kw_ids.int()}),
        ("kw", "3-d input", {"input.x": torch.rand(6, 5, 1), "input.ids": kw_ids}),
        ("kw", "inputs for two", {"inputs": torch.rand(6, 5)}),
        ("nolayer", "good", {"inputs": x}),
    ]


# accepted by the full intake in tests/sensitivity/test_transformers.py (the same models and
# calibration layout; seconds each, for the attention decomposition): not loaded again here
_INTAKE_ACCEPTS = {("llama", "good"), ("bert", "good")}


def test_check_inputs_agrees_with_the_intake(models, digits, tmp_path) -> None:
    """Every case: both accept, or both raise the same typed error with the same message
    (the labels-vs-output message shows the output's recorded sizes: compared by prefix)."""
    refused = set()
    for k, (model, case, tensors) in enumerate(_cases(digits)):
        path = _calib(tmp_path / f"c{k}.safetensors", **tensors)
        full = None
        if (model, case) not in _INTAKE_ACCEPTS:
            try:
                intake(models[model], path)
            except BitplanError as exc:
                full = exc
        try:
            check_inputs(read_signature(models[model]), load_calibration(path))
            fast = None
        except BitplanError as exc:
            fast = exc
        where = f"{model}: {case}: intake {full!r}, signature {fast!r}"
        if full is None:
            assert fast is None, where
            continue
        assert type(fast) is type(full), where
        assert str(fast).split(" do not fit")[0] == str(full).split(" do not fit")[0], where
        refused.add(f"{model}: {case}")
    accepted = {f"{m}: {c}" for m, c, _ in _cases(digits)} - refused
    assert accepted == {"mlp: good", "mlp: unlabelled", "mlp: named input",
                        "cnn_fixed_batch: good", "llama: good", "bert: good", "kw: good",
                        "tok: next-token labels", "tok: ignored labels"}


def test_no_layer_is_refused_like_the_intake(models) -> None:
    with pytest.raises(BadModelError, match="no quantizable layer"):
        check_inputs(read_signature(models["nolayer"]),
                     load_calibration(_calib_tmp(models["nolayer"].parent)))


def _calib_tmp(d: Path) -> Path:
    return _calib(d / "nolayer-calib.safetensors", inputs=torch.rand(4, 1, 8, 8))


def _rewrite(src: Path, out: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))
    return out


def test_nothing_is_unpickled(models, tmp_path, monkeypatch) -> None:
    """The archive's pickled payload (sample inputs) is never read: every unpickler raises."""
    calls: list[str] = []

    def refuse(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(name)
        return f

    evil = _rewrite(models["mlp"], tmp_path / "evil.pt2",
                    lambda n, b: pickle.dumps(("not", "a", "tensor")) if n.endswith(".pt") else b)
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    assert read_signature(evil).inputs[0].name == "x"
    assert calls == []


def test_unknown_layouts_are_unreadable_and_damage_is_a_bad_model(models, tmp_path) -> None:
    def mangle(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        doc = json.loads(data)
        doc["graph_module"]["graph"].pop("tensor_values")
        return json.dumps(doc).encode()

    with pytest.raises(SignatureUnreadable):
        read_signature(_rewrite(models["mlp"], tmp_path / "odd.pt2", mangle))
    future = _rewrite(models["mlp"], tmp_path / "future.pt2", lambda n, b: b.replace(
        b'"schema_version": {"major": ', b'"schema_version": {"major": 9') if n.endswith(
        "models/model.json") else b)
    with pytest.raises(SignatureUnreadable, match="schema version"):
        read_signature(future)
    for cut in (100, 3000):  # a truncated archive: refused, or left to the full load
        with pytest.raises((SignatureUnreadable, BadModelError)):
            read_signature(_write(tmp_path / "cut.pt2", models["mlp"].read_bytes()[:-cut]))
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)  # a torch.save checkpoint: a zip, not a program
    with pytest.raises(BadModelError, match="not a torch.export program"):
        read_signature(_write(tmp_path / "ckpt.pt2", buf.getvalue()))
    data = bytearray(models["mlp"].read_bytes())
    at = data.find(b"weight_0") + 200  # inside the first weight's bytes: its CRC fails
    data[at] ^= 0xFF
    with pytest.raises(BadModelError, match="corrupted"):
        read_signature(_write(tmp_path / "flip.pt2", bytes(data)))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
