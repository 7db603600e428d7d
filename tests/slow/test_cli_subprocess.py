"""The installed CLI in its own process, joining the test session's Ray via --ray-address.

One model's provider rejects the key: its rows must end `failed` with an auth error after a
bounded number of calls, the others `ok`, and the exit code must say that rows failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from tests.helpers import demo_job_doc, to_toml

pytestmark = [pytest.mark.slow]


def test_cli_subprocess_with_a_rejected_key(tmp_path: Path, provider: MockProvider,
                                            ray_session: None, api_key: str) -> None:
    import ray

    sample.write(sample.generate(4000, seed=11), tmp_path / "in.parquet")
    with MockProvider(MockProviderConfig(api_key="sk-some-other-key", seed=2)) as wrong:
        urls = {"mixtral-8x7b-instruct": provider.url, "claude-3-5-sonnet": wrong.url,
                "gpt-4-1106-preview": provider.url}
        doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", urls, concurrency=16)
        job = tmp_path / "job.toml"
        job.write_text(to_toml(doc))
        env = {**os.environ, "BATCHROUTE_TEST_KEY": api_key}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, "-m", "batchroute", "run", str(job), "--run-id", "sub",
             "--ray-address", ray.get_runtime_context().gcs_address],
            capture_output=True, text=True, env=env, timeout=300, check=False)
        wrong_calls = wrong.stats()["requests"]

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "results by model" in proc.stdout and "TOTAL" in proc.stdout
    assert "dispatching: routed 4000/4000" in proc.stderr  # plain progress lines off a tty
    assert api_key not in proc.stdout + proc.stderr

    results = pl.read_parquet(tmp_path / "runs" / "sub" / "results")
    assert len(results) == 4000
    sonnet = results.filter(pl.col("model") == "claude-3-5-sonnet")
    assert len(sonnet) > 100
    assert set(sonnet["status"]) == {"failed"} and set(sonnet["error_type"]) == {"auth"}
    # The first 401 stops the model: only calls already in flight reach the provider.
    assert wrong_calls <= 16 + 1
    others = results.filter(pl.col("model") != "claude-3-5-sonnet")
    assert set(others["status"]) <= {"ok", "rejected"}
    leaks = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()
             and api_key.encode() in p.read_bytes()]
    assert leaks == []
