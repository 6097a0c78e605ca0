"""Intake: loading, validation (typed errors with messages), layer table, training-mode and
attention exports, fixed-batch programs."""

from __future__ import annotations

import pickle
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from sensitivity import zoo
from sensitivity.intake import IntakeConfig, intake, load_calibration, load_program
from solver.errors import BadCalibrationError, BadModelError, TooLargeError

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------ bad model files


def _not_zip(tmp: Path, good: Path) -> Path:
    p = tmp / "model.onnx.pt2"
    p.write_bytes(b"\x08\x01\x12\x04onnx not a zip")
    return p


def _truncated(tmp: Path, good: Path) -> Path:
    p = tmp / "truncated.pt2"
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _pickle(tmp: Path, good: Path) -> Path:
    p = tmp / "evil.pt2"
    # Written with pickle.dumps, never loaded with pickle: intake must refuse it unread.
    p.write_bytes(pickle.dumps({"state_dict": [1.0, 2.0]}))
    return p


def _torch_save(tmp: Path, good: Path) -> Path:
    p = tmp / "checkpoint.pt2"
    torch.save({"w": torch.zeros(2)}, p)  # a zip with a pickle inside, not a pt2 archive
    return p


def _corrupted_entry(tmp: Path, good: Path) -> Path:
    p = tmp / "corrupt.pt2"
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.infolist()[0]
    # the local header's name/extra lengths (torch pads the extra field to align data)
    off = info.header_offset
    start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + int.from_bytes(
        data[off + 28:off + 30], "little")
    for i in range(start, start + min(8, info.compress_size)):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    return p


def _missing(tmp: Path, good: Path) -> Path:
    return tmp / "nope.pt2"


@pytest.mark.parametrize("make", [_not_zip, _truncated, _pickle, _torch_save,
                                  _corrupted_entry, _missing])
def test_bad_model_files(make, mlp_pt2, tmp_path):
    path = make(tmp_path, mlp_pt2)
    with pytest.raises(BadModelError) as err:
        load_program(path)
    assert "torch.export.save" in err.value.message or "does not exist" in err.value.message
    assert err.value.code == "bad_model"


def test_model_without_quantizable_layer(tmp_path, calib_path):
    class NoLayers(nn.Module):
        def forward(self, x):
            return F.relu(x).flatten(1)[:, :10] * 2

    path = zoo.save_model(NoLayers(), torch.rand(4, 1, 8, 8), tmp_path / "none.pt2")
    with pytest.raises(BadModelError, match="no quantizable layer"):
        intake(path, calib_path)


# ------------------------------------------------------------------ bad calibration files

GOOD_X = torch.rand(6, 1, 8, 8)
GOOD_Y = torch.tensor([0, 1, 2, 3, 4, 5])


def _write(tmp: Path, tensors: dict) -> Path:
    p = tmp / "calib.safetensors"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(p))
    return p


BAD_CALIB = {
    "no inputs": ({"labels": GOOD_Y}, "no 'inputs'"),
    "nan": ({"inputs": torch.where(GOOD_X > 0.5, float("nan"), GOOD_X)}, "NaN"),
    "inf": ({"inputs": GOOD_X.clone().index_fill_(0, torch.tensor([2]), float("inf"))}, "NaN/Inf"),
    "int inputs": ({"inputs": (GOOD_X * 10).to(torch.int32)}, "int32; the model's input takes"),
    "bool inputs": ({"inputs": GOOD_X > 0.5}, "bool; the model's input takes float32"),
    "wrong sample shape": ({"inputs": torch.rand(6, 1, 7, 8)}, r"expects \['N', 1, 8, 8\]"),
    "wrong rank": ({"inputs": torch.rand(6, 64)}, "expects"),
    "labels 2d": ({"inputs": GOOD_X, "labels": GOOD_Y.reshape(6, 1)}, "do not fit the model"),
    "labels 3d": ({"inputs": GOOD_X, "labels": GOOD_Y.reshape(6, 1, 1)}, "shape \\[N\\]"),
    "labels float": ({"inputs": GOOD_X, "labels": GOOD_Y.float()}, "int64"),
    "labels count": ({"inputs": GOOD_X, "labels": GOOD_Y[:5]}, "number of samples"),
    "labels range": ({"inputs": GOOD_X, "labels": GOOD_Y + 5}, "class index 10"),
    "labels negative": ({"inputs": GOOD_X, "labels": GOOD_Y - 1}, "negative"),
    "one sample": ({"inputs": GOOD_X[:1]}, "at least 2"),
    "unknown tensor": ({"inputs": GOOD_X, "extra": GOOD_X}, "unexpected tensor"),
    "both styles": ({"inputs": GOOD_X, "input.x": GOOD_X}, "both"),
    "wrong keyword": ({"input.image": GOOD_X}, "missing \\['input.x'\\]"),
}


@pytest.mark.parametrize("case", list(BAD_CALIB))
def test_bad_calibration(case, mlp_pt2, tmp_path):
    tensors, message = BAD_CALIB[case]
    path = _write(tmp_path, tensors)
    with pytest.raises(BadCalibrationError, match=message) as err:
        intake(mlp_pt2, path)
    assert err.value.code == "bad_calibration"


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}",
                                     b"\xff" * 64])
def test_garbage_calibration_file(content, tmp_path):
    p = tmp_path / "c.safetensors"
    p.write_bytes(content)
    with pytest.raises(BadCalibrationError):
        load_calibration(p)


def test_truncated_calibration_file(calib_path, tmp_path):
    data = calib_path.read_bytes()
    p = tmp_path / "t.safetensors"
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(BadCalibrationError, match="truncated"):
        load_calibration(p)


def test_size_limit_checked_from_header(calib_path):
    with pytest.raises(TooLargeError):
        load_calibration(calib_path, max_bytes=1000)
    assert len(load_calibration(calib_path, max_bytes=10**8)) == 397


def test_missing_calibration_file(mlp_pt2, tmp_path):
    with pytest.raises(BadCalibrationError, match="does not exist"):
        intake(mlp_pt2, tmp_path / "none.safetensors")


# ------------------------------------------------------------------ layer table


def test_layer_table_cnn(cnn_pt2, calib_path):
    it = intake(cnn_pt2, calib_path)
    by = {layer.name: layer for layer in it.layers}
    assert list(by) == ["conv1", "conv2", "fc"]
    assert by["conv1"].bn == "bn1" and by["conv2"].bn == "bn2" and by["fc"].bn is None
    # hand counts: out elements per sample * (Cin/groups * kH * kW)
    assert by["conv1"].macs == 8 * 8 * 8 * (1 * 3 * 3)
    assert by["conv2"].macs == 16 * 8 * 8 * (8 * 3 * 3)
    assert by["fc"].macs == 10 * 16
    assert by["conv2"].params == 16 * 8 * 9
    assert by["conv2"].input_shape == (8, 8, 8)
    assert by["conv2"].output_shape == (16, 8, 8)
    assert by["fc"].input_shape == (16,)
    assert by["conv1"].out_channels == 8
    assert it.loss_kind == "cross_entropy"
    assert it.batch_size is None
    assert len(it.train) + len(it.holdout) == 397
    assert len(it.holdout) == round(397 * 0.2)
    assert by["conv1"].to_dict()["weight_shape"] == [8, 1, 3, 3]


def test_layer_table_mlp_and_grouped_conv(mlp_pt2, calib_path, tmp_path):
    it = intake(mlp_pt2, calib_path)
    assert [(x.name, x.macs, x.params) for x in it.layers] == [
        ("fc1", 64 * 32, 64 * 32), ("fc2", 32 * 10, 320)]

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
            self.c1 = nn.Conv1d(4, 6, 3)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            y = self.dw(x.repeat(1, 4, 1, 1))  # [N, 4, 4, 4]
            y = self.c1(y.flatten(2))  # [N, 6, 14]
            return self.fc(y[:, :, :8])  # linear over leading dims [N, 6, 8] -> [N, 6, 5]

    path = zoo.save_model(Grouped(), torch.rand(4, 1, 8, 8), tmp_path / "g.pt2")
    cal = zoo.save_calibration(tmp_path / "g.safetensors", torch.rand(5, 1, 8, 8))
    it = intake(path, cal)
    by = {x.name: x for x in it.layers}
    assert by["dw"].groups == 4 and by["dw"].macs == 4 * 4 * 4 * (1 * 9)
    assert by["c1"].kind == "conv1d" and by["c1"].macs == 6 * 14 * (4 * 3)
    assert by["fc"].macs == 6 * 5 * 8
    assert it.loss_kind == "mse"  # no labels, output not [N, C]


def test_fixed_batch_program(cnn_fixed_batch_pt2, calib_path):
    it = intake(cnn_fixed_batch_pt2, calib_path)
    assert it.batch_size == 16
    assert it.chunk_size(None) == 16


def test_split_is_seeded(mlp_pt2, calib_path):
    a = intake(mlp_pt2, calib_path, IntakeConfig(seed=1, holdout_fraction=0.25))
    b = intake(mlp_pt2, calib_path, IntakeConfig(seed=1, holdout_fraction=0.25))
    c = intake(mlp_pt2, calib_path, IntakeConfig(seed=2, holdout_fraction=0.25))
    assert torch.equal(a.holdout.args[0], b.holdout.args[0])
    assert not torch.equal(a.holdout.args[0], c.holdout.args[0])
    assert IntakeConfig.from_dict(IntakeConfig(0.3, 2).to_dict()) == IntakeConfig(0.3, 2)
    with pytest.raises(ValueError):
        IntakeConfig(holdout_fraction=1.0)


# ------------------------------------------------------------------ special exports


class _TrainModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_training_mode_export_is_rewritten_to_eval(tmp_path, calib_path):
    torch.manual_seed(0)
    net = _TrainModeNet()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(8, 1, 8, 8)
    ep = torch.export.export(net.train(), (x[:4],),
                             dynamic_shapes=({0: torch.export.Dim("b", min=1)},))
    torch.export.save(ep, tmp_path / "train.pt2")
    it = intake(tmp_path / "train.pt2", calib_path)
    assert any("batch norm" in r for r in it.rewrites)
    assert any("dropout" in r for r in it.rewrites)
    assert it.layers[0].bn == "bn"
    with torch.no_grad():
        expect = net.eval()(x)
        torch.testing.assert_close(it.module(x), expect)
        torch.testing.assert_close(it.module(x), expect)  # no state changed by running it
        torch.testing.assert_close(it.program.module()(x), expect)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # x: [N, T, 8]
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out((a * mask).mean(1))


def test_attention_model_with_keyword_inputs(tmp_path):
    torch.manual_seed(0)
    model = _Attention().eval()
    x, mask = torch.rand(6, 5, 8), torch.ones(6, 5, 8)
    batch = torch.export.Dim("b")
    ep = torch.export.export(model, (x[:2], mask[:2]), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(ep, tmp_path / "attn.pt2")
    save_file({"input.x": x, "input.mask": mask, "labels": torch.arange(6) % 3},
              str(tmp_path / "c.safetensors"))
    it = intake(tmp_path / "attn.pt2", tmp_path / "c.safetensors")
    assert it.decomposed
    assert [x.name for x in it.layers] == ["qkv", "out"]
    assert it.layers[0].macs == 5 * 24 * 8 and it.layers[0].input_shape == (5, 8)
    from sensitivity import HessianConfig, measure

    res = measure(it, HessianConfig(max_iter=8, min_iter=4))  # HVPs through decomposed SDPA
    assert res.layer("qkv").weight_estimator == "hvp"  # softmax attention is not linear
    assert all(r.weight_trace == r.weight_trace for r in res.layers)  # finite, no NaN


@settings(max_examples=6, deadline=None)
@given(
    cin=st.sampled_from([1, 2, 4]), mult=st.integers(1, 3), k=st.integers(1, 4),
    stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2),
    depthwise=st.booleans(), size=st.integers(7, 12),
)
def test_conv_macs_property(tmp_path_factory, cin, mult, k, stride, pad, dil, depthwise, size):
    groups = cin if depthwise else 1
    cout = cin * mult
    if size + 2 * pad < dil * (k - 1) + 1:
        return
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    tmp = tmp_path_factory.mktemp("macs")
    path = zoo.save_model(nn.Sequential(conv), torch.rand(2, cin, size, size), tmp / "c.pt2")
    cal = zoo.save_calibration(tmp / "c.safetensors", torch.rand(3, cin, size, size))
    (layer,) = intake(path, cal).layers
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1  # the conv output-size formula
    assert layer.output_shape == (cout, out, out)
    assert layer.macs == cout * out * out * (cin // groups) * k * k
    assert layer.params == cout * (cin // groups) * k * k and layer.groups == groups


def test_concurrent_loads(cnn_pt2, mlp_pt2):
    """Loads from several threads at once all succeed (torch.export.load alone is not
    thread-safe: it keeps the graph being deserialised in a module-level global)."""
    paths = [cnn_pt2, mlp_pt2] * 4
    start = threading.Barrier(len(paths))

    def load(path):
        start.wait()
        return load_program(path)

    with ThreadPoolExecutor(len(paths)) as pool:
        programs = list(pool.map(load, paths))
    assert all(isinstance(p, torch.export.ExportedProgram) for p in programs)


@pytest.mark.parametrize("loss, labelled, kind", [
    ("auto", True, "cross_entropy"), ("auto", False, "kl"),
    ("mse", True, "mse"), ("mse", False, "mse"),  # e.g. an embedding model's [N, D] output
    ("kl", True, "kl"), ("kl", False, "kl"), ("cross_entropy", True, "cross_entropy")])
def test_the_asked_loss_is_the_jobs_loss(mlp_pt2, calib_path, calib_unlabelled_path, loss,
                                         labelled, kind):
    it = intake(mlp_pt2, calib_path if labelled else calib_unlabelled_path,
                IntakeConfig(loss=loss))
    assert it.loss_kind == kind and it.token_input is None


def test_cross_entropy_without_labels_says_what_to_add(mlp_pt2, calib_unlabelled_path):
    with pytest.raises(BadCalibrationError, match="needs labels: add a 'labels' tensor"):
        intake(mlp_pt2, calib_unlabelled_path, IntakeConfig(loss="cross_entropy"))
    with pytest.raises(ValueError, match="loss must be"):
        IntakeConfig(loss="hinge")


def test_a_3d_output_takes_kl_over_its_last_dim_when_asked(tmp_path):
    lin = nn.Linear(8, 5)
    path = zoo.save_model(lin, torch.rand(4, 6, 8), tmp_path / "l.pt2")
    cal = zoo.save_calibration(tmp_path / "l.safetensors", torch.rand(10, 6, 8))
    assert intake(path, cal).loss_kind == "mse"  # no token input indexing a vocabulary
    assert intake(path, cal, IntakeConfig(loss="kl")).loss_kind == "kl"
