"""``bitplan sensitivity`` end to end through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from service.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_KEYS = {"name", "kind", "params", "macs", "weight_trace", "weight_trace_stderr",
              "activation_trace", "activation_trace_stderr", "omega_w", "omega_a"}


def test_cli_writes_sens_json(cnn_pt2, tiny_calib, tmp_path, capsys):
    out = tmp_path / "sub" / "sens.json"
    rc = main(["sensitivity", str(cnn_pt2), "--calib", str(tiny_calib), "--max-iter", "16",
               "--tol", "0.1", "--seed", "3", "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["version"] == 4
    assert isinstance(d["iterations"], int) and 0 < d["iterations"] <= 16
    assert isinstance(d["seconds"], float) and d["model"]["name"] == "cnn.pt2"
    assert [row["name"] for row in d["layers"]] == ["conv1", "conv2", "fc"]
    for row in d["layers"]:
        assert LAYER_KEYS <= set(row)
        assert set(row["omega_w"]) == {"2", "3", "4", "5", "6", "8"}
        assert set(row["omega_a"]) == {"4", "8"}
        assert isinstance(row["params"], int) and isinstance(row["macs"], int)
    assert d["config"]["seed"] == 3
    printed = capsys.readouterr().out
    assert "conv2" in printed and "layers" in printed


def test_cli_bad_model_is_a_message_not_a_traceback(tmp_path, tiny_calib, capsys):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a model")
    rc = main(["sensitivity", str(bad), "--calib", str(tiny_calib), "--out",
               str(tmp_path / "s.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad_model" in err and "torch.export.save" in err and "Traceback" not in err
    assert not (tmp_path / "s.json").exists()


def test_cli_bad_settings(cnn_pt2, tiny_calib, tmp_path, capsys):
    rc = main(["sensitivity", str(cnn_pt2), "--calib", str(tiny_calib), "--tol", "2",
               "--out", str(tmp_path / "s.json")])
    assert rc == 2
    assert "tol" in capsys.readouterr().err
