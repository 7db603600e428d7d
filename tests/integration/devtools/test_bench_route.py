"""``batchroute bench route`` on a tiny input: it generates, scores and routes every prompt.

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


def test_bench_route_routes_every_prompt_with_each_pool() -> None:
    """The bench really routes: every generated prompt through the Ray route stage once per
    pool size, on a local Ray it sized for the largest pool, and scores them alone first.
    (Its speed figures are for the closing notes, not asserted.)"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "batchroute", "bench", "route", "--n", str(N),
         "--actors", "2,1", "--chars", "600", "--batch-size", "512", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["cluster_cpus"] == 2  # the local Ray it started: one CPU per actor of the pool
    assert [(s["actors"], s["rows"]) for s in r["stages"]] == [(1, N), (2, N)]
    assert 0.85 * 600 < r["chars_mean"] < 1.15 * 600  # it scored what it generated
    assert r["prompts_per_s_per_core"] > 0 and all(s["wall_s"] > 0 for s in r["stages"])
    # The scikit-learn baseline ran beside the router in the same run (an interface key).
    assert r["baseline_ratio"] == pytest.approx(
        r["prompts_per_s_per_core"] / r["baseline_prompts_per_s_per_core"], abs=0.01)
    assert r["baseline"]["alternations"] >= 3 and r["engine"] == "numpy"


def test_bench_route_refuses_bad_actor_lists() -> None:
    from batchroute import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "route", "--actors", "0,2"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="n >= 1"):
        bench_route.prompts(0)
