"""Progress: time-left estimates and periodic lines when the output is not a terminal."""

from __future__ import annotations

import io

import pytest

from service import progress as P


@pytest.fixture()
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    return now


def test_eta_from_the_rate_after_a_few_updates(clock):
    eta = P.Eta(min_updates=3)
    assert eta("sensitivity", 0.0) is None
    for i, f in enumerate((0.1, 0.2)):
        clock[0] += 10
        assert eta("sensitivity", f) is None, i
    clock[0] += 10
    # 30 s for 30 %: 70 s left
    assert eta("sensitivity", 0.3) == pytest.approx(70.0)
    assert eta("solve", 0.5) is None  # a new stage starts over


def test_eta_leaves_out_the_set_up_before_the_first_advance(clock):
    """20 s of set-up at fraction 0, then 10 s per 10 %: at 30 %, 70 s are left (counting the
    set-up as work would say 117 s)."""
    eta = P.Eta(min_updates=3)
    eta("sensitivity", 0.0)
    clock[0] += 20
    eta("sensitivity", 0.0)  # still setting up
    for f in (0.1, 0.2):
        clock[0] += 10
        assert eta("sensitivity", f) is None
    clock[0] += 10
    assert eta("sensitivity", 0.3) == pytest.approx(70.0)
    clock[0] += 5
    assert eta("sensitivity", 0.3) == pytest.approx(25 * 0.7 / 0.2)  # no advance: rate falls


def test_non_terminal_prints_a_line_every_ten_seconds(clock):
    out = io.StringIO()
    bar = P.TerminalProgress(out, every_s=10.0)
    bar("sensitivity", 0.0)
    for _ in range(6):
        clock[0] += 4
        bar("sensitivity", bar.eta._last + 0.1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "sensitivity..."
    # 24 s of updates: lines at 12 s and 24 s, the second with a time-left estimate
    assert len(lines) == 3 and lines[1].startswith("sensitivity  30.0%")
    assert lines[2].endswith("left") and "60.0%" in lines[2]
