"""``batchroute bench dispatch`` on a small load: the figures are consistent with each other.

Speed is reported by the bench, not asserted here; this checks the bench measures what it says.
"""

from __future__ import annotations

import pytest

from batchroute.devtools.bench import dispatch as bench_dispatch

pytestmark = pytest.mark.integration


def test_the_dispatch_bench_reports_every_model_against_its_bound() -> None:
    r = bench_dispatch.dispatch(rate=150, models=3, latency_ms=20, n=600)
    per = r["per_model"]
    assert [m["requests"] for m in per] == [300, 200, 100]  # split 3:2:1 like the limits
    assert [m["rpm"] for m in per] == [4500, 3000, 1500]
    assert {m["wire"] for m in per} == {"openai", "anthropic"}
    assert r["requests"] == 600 and r["failed"] == 0
    # Each model's bound is its requests over its RPM (4 s); the last one is token-bound at
    # exactly its share, so its bound is the same 4 s.
    assert [m["bound_s"] for m in per] == pytest.approx([4.0, 4.0, 4.0], abs=0.01)
    # A full first-second bucket lets a run finish up to a second early, never much later
    # than the limits allow on an idle loopback.
    assert 0.6 < r["wall_over_bound"] < 1.5
    assert r["rate_limited"] == sum(m["rate_limited"] for m in per)
    assert 0 < r["client_cpu_ms_per_request"] < 20


def test_the_baseline_runs_alternate_and_the_acceptance_keys_are_top_level() -> None:
    r = bench_dispatch.dispatch(rate=150, models=2, latency_ms=20, n=300, baseline=True,
                                pairs=2)
    for key in ("client_cpu_ratio", "wall_over_bound", "baseline_wall_over_bound",
                "rate_limited_share", "last_429_s", "failed", "client_cpu_ms_per_request",
                "per_model", "requests"):
        assert key in r
    assert [run["client"] for run in r["runs"]] == ["batchroute", "naive"] * 2
    assert all(len(run["load_average_at_start"]) == 3 for run in r["runs"])
    ours = [run["client_cpu_ms_per_request"] for run in r["runs"][::2]]
    naive = [run["client_cpu_ms_per_request"] for run in r["runs"][1::2]]
    assert r["client_cpu_ratios"] == pytest.approx([o / t for o, t in zip(ours, naive, strict=True)],
                                                   abs=0.002)
    assert r["failed"] == 0 and r["requests"] == 300
    assert 0.5 < r["baseline_wall_over_bound"] < 1.5
    assert r["pinned"] is None or r["pinned"]["client_core"] != r["pinned"]["mock_core"]
