"""The calibration reader: block-wise reads into one tensor per input equal safetensors' own
loader for every dtype, in file order or permuted; NaN counts over blocks; the intake's
train / held-out split is two views of one copy, equal to the copying split; a streamed set
(inputs read from the file chunk by chunk) equals the in-memory one bit for bit."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from quantize.data import CalibrationSet, FileRows, split_order
from sensitivity import calibration
from sensitivity.calibration import ReadParams, count_samples, load_calibration
from sensitivity.intake import IntakeConfig, intake
from solver.errors import BadCalibrationError

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]


def _tensor(n: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(n, *shape, generator=gen) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n, *shape), generator=gen).bool()
    return torch.randint(0, 100, (n, *shape), generator=gen).to(dtype)


@pytest.fixture()
def small_blocks(monkeypatch):
    """Blocks of a few rows, so every file below is read in many blocks."""
    monkeypatch.setattr(calibration, "READ_PARAMS", ReadParams(block_bytes=40))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_equal_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    n = 13
    x = _tensor(n, (3, 2), dtype, 0)
    y = torch.arange(n, dtype=torch.int32) % 5
    path = tmp_path / "c.safetensors"
    save_file({"input.a": x, "input.b": _tensor(n, (4,), torch.float32, 1), "labels": y},
              str(path))
    ref = load_file(str(path))
    got = load_calibration(path)
    assert got.kwargs["a"].dtype == dtype and torch.equal(got.kwargs["a"], ref["input.a"])
    assert torch.equal(got.kwargs["b"], ref["input.b"])
    assert torch.equal(got.labels, ref["labels"].to(torch.int64))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    perm = load_calibration(path, order=order)
    assert torch.equal(perm.kwargs["a"], ref["input.a"][order])
    assert torch.equal(perm.kwargs["b"], ref["input.b"][order])
    assert torch.equal(perm.labels, ref["labels"].to(torch.int64)[order])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), row=st.integers(1, 7), block=st.integers(1, 200),
       seed=st.integers(0, 2**16))
def test_any_block_size_and_order(tmp_path_factory, n: int, row: int, block: int,
                                  seed: int) -> None:
    path = tmp_path_factory.mktemp("c") / "c.safetensors"
    x = _tensor(n, (row,), torch.float32, seed)
    save_file({"inputs": x}, str(path))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    saved = calibration.READ_PARAMS
    calibration.READ_PARAMS = ReadParams(block_bytes=block)
    try:
        assert torch.equal(load_calibration(path).args[0], x)
        assert torch.equal(load_calibration(path, order=order).args[0], x[order])
    finally:
        calibration.READ_PARAMS = saved


@pytest.mark.usefixtures("small_blocks")
def test_nan_count_spans_blocks(tmp_path: Path) -> None:
    x = torch.zeros(10, 3)
    x[1, 0] = float("nan")
    x[7, 2] = float("inf")
    x[9, 1] = float("-inf")
    path = tmp_path / "c.safetensors"
    save_file({"inputs": x}, str(path))
    with pytest.raises(BadCalibrationError, match="3 NaN/Inf"):
        load_calibration(path, order=torch.arange(10).flip(0))


def test_order_must_be_a_permutation(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_file({"inputs": torch.zeros(4, 2)}, str(path))
    assert count_samples(path) == 4
    with pytest.raises(ValueError, match="permutation"):
        load_calibration(path, order=torch.tensor([0, 1, 1, 2]))


def test_batches_are_views_unless_padded() -> None:
    data = CalibrationSet((torch.arange(10.0).reshape(5, 2),), {"m": torch.ones(5, 1)},
                          torch.arange(5))
    base = data.args[0].untyped_storage().data_ptr()
    got = list(data.batches(2))
    assert [b.size for b in got] == [2, 2, 1]
    assert all(b.args[0].untyped_storage().data_ptr() == base for b in got)
    assert torch.equal(torch.cat([b.args[0] for b in got]), data.args[0])
    assert torch.equal(torch.cat([b.labels for b in got]), data.labels)
    padded = list(data.batches(2, fixed=True))[-1]
    assert padded.size == 1 and padded.args[0].tolist() == [[8.0, 9.0], [8.0, 9.0]]


def test_intake_split_is_two_views_equal_to_the_copying_split(cnn_pt2, calib_path) -> None:
    """The intake reads the file in split order: train and held-out samples are views of one
    tensor, equal to loading the file and splitting it with ``CalibrationSet.split``."""
    cfg = IntakeConfig(holdout_fraction=0.3, seed=5)
    it = intake(cnn_pt2, calib_path, cfg)
    train, hold = load_calibration(calib_path).split(cfg.holdout_fraction, cfg.seed)
    assert torch.equal(it.train.args[0], train.args[0])
    assert torch.equal(it.holdout.args[0], hold.args[0])
    assert torch.equal(it.train.labels, train.labels)
    assert torch.equal(it.holdout.labels, hold.labels)
    one = it.train.args[0].untyped_storage().data_ptr()
    assert it.holdout.args[0].untyped_storage().data_ptr() == one
    assert it.train.labels.untyped_storage().data_ptr() == \
        it.holdout.labels.untyped_storage().data_ptr()
    order, n_train = split_order(len(it.train) + len(it.holdout), 0.3, 5)
    assert n_train == len(train) and sorted(order.tolist()) == list(range(len(order)))


FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), row=st.integers(1, 5), chunk=st.integers(1, 12),
       dtype=st.sampled_from(FLOATS), fixed=st.booleans(), permuted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_streamed_chunks_equal_in_memory_chunks(tmp_path_factory, n: int, row: int, chunk: int,
                                                dtype: torch.dtype, fixed: bool,
                                                permuted: bool, seed: int) -> None:
    """A streamed set (inputs read from the file per chunk) gives the in-memory set's
    batches bit for bit, for any chunk size, dtype, order and padding, also after ``rows`` /
    ``subset`` / ``split`` and as ``chunks``; integer inputs and labels are read as usual."""
    path = tmp_path_factory.mktemp("c") / "c.safetensors"
    save_file({"input.a": _tensor(n, (row, 2), dtype, seed),
               "input.b": _tensor(n, (3,), torch.float32, seed + 1),
               "input.ids": _tensor(n, (2,), torch.int64, seed + 2),
               "labels": torch.arange(n) % 3}, str(path))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if permuted \
        else None
    mem = load_calibration(path, order=order)
    got = load_calibration(path, order=order, stream=True)
    assert got.streamed and not mem.streamed
    assert isinstance(got.kwargs["a"], FileRows) and isinstance(got.kwargs["ids"], torch.Tensor)
    assert got.kwargs["a"].shape == mem.kwargs["a"].shape and len(got) == n

    def same(x: CalibrationSet, y: CalibrationSet) -> None:
        bx, by = list(x.batches(chunk, fixed)), list(y.batches(chunk, fixed))
        assert [b.size for b in bx] == [b.size for b in by]
        for p, q in zip(bx, by, strict=True):
            assert p.kwargs.keys() == q.kwargs.keys()
            for k in p.kwargs:
                assert p.kwargs[k].dtype == q.kwargs[k].dtype
                assert torch.equal(p.kwargs[k], q.kwargs[k])  # bit for bit (finite data)
            assert torch.equal(p.labels, q.labels)

    same(got, mem)
    same(got.rows(1, n), mem.rows(1, n))
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 3))[: n // 2 + 1]
    same(got.subset(pick), mem.subset(pick))
    for g, m in zip(got.split(0.3, seed), mem.split(0.3, seed), strict=True):
        same(g, m)
    lazy, eager = got.chunks(chunk, fixed), mem.chunks(chunk, fixed)
    assert len(lazy) == len(eager)
    for i in [*range(len(lazy)), -1, 0, 0]:
        assert torch.equal(lazy[i].kwargs["a"], eager[i].kwargs["a"])
    assert torch.equal(got.resident().kwargs["a"], mem.kwargs["a"])
    cast = got.kwargs["a"].to(torch.float32)
    assert cast.dtype == torch.float32 and torch.equal(cast.read(), mem.kwargs["a"].float())


def test_streamed_file_is_still_checked(tmp_path: Path) -> None:
    """Streaming reads the whole file once: NaN/Inf are refused as when loading it."""
    x = torch.zeros(10, 3)
    x[7, 2] = float("inf")
    path = tmp_path / "c.safetensors"
    save_file({"inputs": x}, str(path))
    with pytest.raises(BadCalibrationError, match="1 NaN/Inf"):
        load_calibration(path, stream=True)


def test_streamed_file_changed_or_copied(tmp_path: Path) -> None:
    """A streamed set reads the file it checked: one replaced under its name is not read, one
    rewritten in place is an error, not other data; a deep copy (a kept intake's) shares the
    open file and pickling reopens it."""
    path = tmp_path / "c.safetensors"
    x = _tensor(6, (4,), torch.float32, 0)
    save_file({"inputs": x}, str(path))
    got = load_calibration(path, stream=True)
    assert torch.equal(pickle.loads(pickle.dumps(got)).resident().args[0], x)
    copied = copy.deepcopy(got)
    assert copied.args[0].source is got.args[0].source
    assert torch.equal(next(copied.batches(6)).args[0], x)
    save_file({"inputs": x + 1}, str(path))  # a new file under the name: the checked one
    assert torch.equal(next(got.batches(6)).args[0], x)  # is still read (it is open)
    again = load_calibration(path, stream=True)
    with open(path, "r+b") as f:  # the same file rewritten in place
        f.seek(-4, 2)
        f.write(b"\x00\x00\xc0\x7f")  # the last value: NaN
    with pytest.raises(BadCalibrationError, match="changed"):
        next(again.batches(2))


def test_streamed_intake_equals_in_memory_intake(cnn_pt2, calib_path) -> None:
    """``IntakeConfig(stream=True)`` (the pipeline's): the same train / held-out samples,
    none of them resident (the inputs are ``FileRows`` of the file)."""
    cfg = IntakeConfig(holdout_fraction=0.3, seed=5)
    mem = intake(cnn_pt2, calib_path, cfg)
    it = intake(cnn_pt2, calib_path, IntakeConfig(holdout_fraction=0.3, seed=5, stream=True))
    assert it.train.streamed and it.holdout.streamed
    assert all(isinstance(a, FileRows) for a in (*it.train.args, *it.holdout.args))
    for a, b in ((it.train, mem.train), (it.holdout, mem.holdout)):
        assert torch.equal(a.resident().args[0], b.args[0])
        assert torch.equal(a.labels, b.labels)
    assert it.layers == mem.layers and it.loss_kind == mem.loss_kind
