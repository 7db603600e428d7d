"""Progress: a live table on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import io

from batchroute.job.progress import Progress


def _feed(p: Progress) -> None:
    p.total_rows = 100
    p.routed = 100
    p.planned = {"cheap": 60, "strong": 40}
    p.models = {"cheap": {"done": 30, "ok": 29, "failed": 1, "rate_limited": 4,
                          "retries": 5, "cost_usd": 0.0123}}


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress(out, interval_s=0.0) as p:
        _feed(p)
        p.set_phase("dispatching")
    text = out.getvalue()
    assert "dispatching: routed 100/100" in text
    assert "cheap 30/60 ok=29 failed=1 429s=4 $0.0123" in text


def test_plain_lines_are_rate_limited() -> None:
    out = io.StringIO()
    p = Progress(out, interval_s=3600.0)
    p.tick(force=True)
    for _ in range(100):
        p.tick()
    assert out.getvalue().count("\n") == 1


def test_live_table_on_a_terminal() -> None:
    out = io.StringIO()
    with Progress(out, live=True) as p:
        _feed(p)
        p.set_phase("dispatching")
    text = out.getvalue()
    for needle in ("batchroute: dispatching", "cheap", "strong", "0.0123", "errors so far: 1"):
        assert needle in text
