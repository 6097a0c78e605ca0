"""refuse_pickles: torch.export.load cannot run a full unpickle of an archive's bytes; other
threads and the code after the block are unaffected."""

from __future__ import annotations

import io
import os
import pickle
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from sensitivity.nopickle import PickleRefused, refuse_pickles
from sensitivity.program import load_program
from solver.errors import BadModelError


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def _with_sample_inputs(model: Path, payload: bytes, out: Path) -> Path:
    src = zipfile.ZipFile(model)
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            z.writestr(name, payload if name.endswith("sample_inputs/model.pt") else src.read(name))
    return out


def test_a_pickle_in_the_archive_is_refused_not_run(mlp_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save((_Marker(marker),), buf)  # torch would retry it with weights_only=False
    evil = _with_sample_inputs(mlp_pt2, buf.getvalue(), tmp_path / "evil.pt2")
    with pytest.raises(BadModelError, match="refused to unpickle"):
        load_program(evil)
    assert not marker.exists()
    assert isinstance(load_program(mlp_pt2), torch.export.ExportedProgram)  # plain ones load


def test_only_the_guarded_thread_is_refused_and_everything_is_restored() -> None:
    data = pickle.dumps({"a": 1})
    originals = (pickle.loads, pickle.load, pickle.Unpickler, torch.load,
                 torch._C._pickle_load_obj)
    other: list[object] = []
    with refuse_pickles():
        with pytest.raises(PickleRefused):
            pickle.loads(data)
        with pytest.raises(PickleRefused):
            pickle.Unpickler(io.BytesIO(data))
        with pytest.raises(PickleRefused):
            torch.load(io.BytesIO(data), weights_only=False)
        buf = io.BytesIO()
        torch.save(torch.arange(3), buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf), torch.arange(3))  # the allow-list unpickler runs
        t = threading.Thread(target=lambda: other.append(pickle.loads(data)))
        t.start()
        t.join()
    assert other == [{"a": 1}]
    assert (pickle.loads, pickle.load, pickle.Unpickler, torch.load,
            torch._C._pickle_load_obj) == originals
    assert pickle.loads(data) == {"a": 1}
