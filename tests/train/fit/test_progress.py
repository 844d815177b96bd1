"""Progress bars write plain lines when stderr is not a terminal (nohup, CI logs)."""

from __future__ import annotations

import io

from rtagger.train import progress
from rtagger.train.progress import Bar


def test_plain_lines_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    bar = Bar("training", 4, fields={"loss": ".2f"}, stream=out)
    bar.advance(1, loss=0.5)
    bar.advance(3, loss=0.25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("training: 1/4 (25%)  loss 0.50  eta ")
    assert lines[1].startswith("training: 4/4 (100%)  loss 0.25  elapsed ")
    assert lines[-1].startswith("training: 4/4 (100%)")


def test_quiet_between_intervals_and_silent_when_disabled():
    out = io.StringIO()
    bar = Bar("pseudo", 100, stream=out)  # the default interval is far away
    bar.advance(10)
    assert out.getvalue() == ""
    bar.close()
    assert out.getvalue().startswith("pseudo: 10/100 (10%)")
    off = io.StringIO()
    quiet = Bar("x", 3, enabled=False, stream=off)
    quiet.advance()
    quiet.close()
    assert off.getvalue() == ""
