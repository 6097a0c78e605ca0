"""``bitplan plan``'s flags: weight group sizes, the Hessian sampling, Omega, weight clip and
loss, and the per-layer table."""

from __future__ import annotations

import pytest

from service.cli import build_parser
from service.commands.plan import constraints_from_args, format_summary
from service.constraints import parse_constraints


def _args(*extra: str):
    return build_parser().parse_args(["plan", "m.pt2", "--calib", "c", "--out", "o",
                                      "--size-ratio", "0.5", *extra])


def test_weight_group_sizes_and_sampling_flags():
    c = parse_constraints(constraints_from_args(
        _args("--weight-group-sizes", "none,128,64,32", "--sampling", "all")))
    assert c.weight_group_sizes == [None, 32, 64, 128]  # the schema sorts them
    assert c.hessian.sampling == "all"
    default = parse_constraints(constraints_from_args(_args()))
    assert default.weight_group_sizes == [None]


def test_omega_weight_clip_and_loss_flags(tmp_path):
    c = parse_constraints(constraints_from_args(
        _args("--omega", "trace", "--weight-clip", "hessian", "--loss", "mse")))
    assert (c.hessian.omega, c.quantize.weight_clip, c.loss) == ("trace", "hessian", "mse")
    default = parse_constraints(constraints_from_args(_args()))
    assert (default.hessian.omega, default.quantize.weight_clip, default.loss) == (
        "diagonal", "max", "auto")
    # flags override a constraints file and keep its other quantize / hessian fields
    path = tmp_path / "c.json"
    path.write_text('{"limits": {"size_ratio": 0.5}, "hessian": {"tol": 0.2}, '
                    '"quantize": {"weight_clip": "mse"}, "loss": "kl"}')
    c = parse_constraints(constraints_from_args(_args("--constraints", str(path),
                                                      "--weight-clip", "max")))
    assert (c.hessian.tol, c.quantize.weight_clip, c.loss) == (0.2, "max", "kl")


@pytest.mark.parametrize("bad", ["none,abc", "none,,x"])
def test_bad_group_sizes_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        _args("--weight-group-sizes", bad)
    assert exit_.value.code == 2
    assert "none,128,64" in capsys.readouterr().err


def test_table_shows_the_group_size_where_chosen():
    layer = {"w_bits": 4, "a_bits": 8, "drq": None}
    plan = {"status": "optimal", "objective": 1.0, "totals": {}, "limits": {},
            "layers": [{**layer, "name": "fc1", "group_size": 64},
                       {**layer, "name": "fc2", "group_size": None}]}
    lines = format_summary(plan, {}).splitlines()
    assert "group" in lines[1]
    assert lines[2].split()[:3] == ["fc1", "4", "64"]
    assert lines[3].split()[:3] == ["fc2", "4", "channel"]
    per_channel = {**plan, "layers": [{**layer, "name": "fc1"}]}
    assert "group" not in format_summary(per_channel, {})
