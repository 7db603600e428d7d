"""``batchroute bench route`` on a tiny input: every figure is present and they agree.

Speed is reported by the bench, not asserted here. The bench runs as the CLI in its own
process, because it starts a local Ray sized for its largest pool (actors + 1 CPUs), which the
test session's shared Ray is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from batchroute.devtools.bench import route as bench_route

pytestmark = pytest.mark.integration
N = 3000


def test_the_generated_prompts_are_deterministic_and_about_the_size_asked() -> None:
    a, b = bench_route.prompts(500, 940, seed=3), bench_route.prompts(500, 940, seed=3)
    assert a.equals(b)
    assert a.column("request_id").unique().to_pylist() == a.column("request_id").to_pylist()
    lengths = [len(p) for p in a.column("prompt").to_pylist()]
    assert 0.85 * 940 < sum(lengths) / len(lengths) < 1.15 * 940
    assert len(set(a.column("prompt").to_pylist())) == 500


def test_bench_route_reports_consistent_figures() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "batchroute", "bench", "route", "--n", str(N),
         "--actors", "2,1", "--chars", "600", "--batch-size", "512", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)

    assert r["n"] == N and r["batch_size"] == 512
    assert 0.85 * 600 < r["chars_mean"] < 1.15 * 600
    single = r["prompts_per_s_per_core"]
    assert single > 0
    assert r["cluster_cpus"] == 2  # one per actor of the largest pool
    stages = r["stages"]
    assert [s["actors"] for s in stages] == [1, 2]  # measured in ascending order
    for s in stages:
        assert s["rows"] == N and s["cores"] == s["actors"]
        assert s["rows_per_s"] == pytest.approx(N / s["wall_s"], rel=0.01)
        assert s["ray_efficiency"] == pytest.approx(
            s["rows_per_s"] / (s["actors"] * single), abs=0.002)
    one, two = stages
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["rows_per_s"] / (2 * one["rows_per_s"]),
                                              abs=0.002)
    assert r["ray_efficiency"] == two["ray_efficiency"]  # the headline is the largest pool
    assert len(r["load_avg_before"]) == 3 and len(r["load_avg_after"]) == 3


def test_bench_route_refuses_bad_actor_lists() -> None:
    from batchroute import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "route", "--actors", "0,2"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="n >= 1"):
        bench_route.prompts(0)
