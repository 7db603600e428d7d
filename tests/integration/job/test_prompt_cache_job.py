"""The tickets job (jobs/classify-tickets.toml) on its Anthropic model, against the mock
provider's cache: the shared guidelines are written once, read from the second request on,
and every row costs what the cache prices say, to the micro-dollar. With cache_prefix off,
nothing is cached."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.devtools.sample_tables import generate_tickets
from batchroute.job import runner
from batchroute.stages import plan
from tests.helpers import REPO, quiet_progress

pytestmark = pytest.mark.integration
CLAUDE = "claude-3-5-sonnet"
N = 80


def _job(tmp: Path, url: str, **task: Any) -> config.JobConfig:
    doc = tomllib.loads((REPO / "jobs" / "classify-tickets.toml").read_text())
    doc.pop("quality", None)  # its shadow calls are not what this test counts
    doc["job"].update(input=str(tmp / "tickets.parquet"), output=str(tmp / "runs"),
                      reference_model=CLAUDE)
    doc["task"].update(task)
    # Every ticket to the Anthropic model.
    doc["router"] = {"stages": ["rules"], "fallback": CLAUDE,
                     "rules": [{"name": "all", "min_chars": 1, "model": CLAUDE}]}
    doc["dispatch"]["escalate_on"] = []
    for model in doc["models"].values():
        # Limits high enough that calls overlap: only the warm-up keeps the first one alone.
        model.update(base_url=url if model["provider"] == "anthropic" else url + "/v1",
                     api_key_env="BATCHROUTE_TEST_KEY", rpm=1_000_000, tpm=1_000_000_000)
    return config.parse(doc)


def _run(tmp: Path, api_key: str, run_id: str, **task: Any) -> tuple[pl.DataFrame, Any,
                                                                        config.JobConfig]:
    with MockProvider(MockProviderConfig(api_key=api_key, latency_ms=20.0)) as provider:
        job = _job(tmp, provider.url, **task)
        out = runner.run(job, run_id=run_id, progress=quiet_progress())
    assert out.exit_code == 0
    return pl.read_parquet(out.folder.sub("results")), out, job


def test_the_tickets_job_on_anthropic_reads_its_guidelines_from_the_cache(
        tmp_path: Path, api_key: str, ray_session: None) -> None:
    pq.write_table(generate_tickets(N, seed=5), tmp_path / "tickets.parquet")
    results, out, job = _run(tmp_path, api_key, "cached")
    ok = results.filter(pl.col("status") == "ok")
    assert len(results) == N and len(ok) == N
    assert set(ok["model"]) == {CLAUDE}
    first = ok.sort("started_at").row(0, named=True)
    # One write (the first call, sent alone), then every other request reads the prefix.
    writes = ok.filter(pl.col("cache_write_input_tokens") > 0)
    assert len(writes) == 1 and writes["request_id"][0] == first["request_id"]
    prefix = writes["cache_write_input_tokens"][0]
    assert prefix >= 1024
    rest = ok.filter(pl.col("request_id") != first["request_id"])
    assert (rest["cached_input_tokens"] == prefix).all()
    assert (rest["cache_write_input_tokens"] == 0).all()
    # Each row costs its uncached, cached, written and output tokens at their prices.
    m = job.models[CLAUDE]
    assert (m.cached_price, m.cache_write_price) == (0.30, 3.75)
    expected = [m.cost_micro_usd(i, o, c, w) for i, o, c, w in ok.select(
        "input_tokens", "output_tokens", "cached_input_tokens",
        "cache_write_input_tokens").iter_rows()]
    assert ok["cost_micro_usd"].to_list() == expected
    rollups = pl.read_parquet(out.folder.sub("rollups")).filter(pl.col("model") == CLAUDE)
    assert rollups["cached_input_tokens"][0] == ok["cached_input_tokens"].sum()
    assert rollups["cache_write_input_tokens"][0] == prefix
    assert rollups["cost_micro_usd"][0] == sum(expected)
    # The plan forecast the same shape: one write, the rest read.
    forecast = plan.forecast(out.folder, job, 0)
    assert forecast["models"][CLAUDE]["est_cache_write_input_tokens"] == job.task.prefix_tokens()
    assert forecast["est_cached_share"] > 0.5

    uncached, _, _ = _run(tmp_path, api_key, "uncached", cache_prefix=False)
    assert uncached["cached_input_tokens"].sum() == 0
    assert uncached["cache_write_input_tokens"].sum() == 0
    # Same answers and prompt tokens; the cache only changes the price.
    both = ok.join(uncached, on="request_id", suffix="_u")
    assert (both["label"] == both["label_u"]).all()
    assert (both["input_tokens"] == both["input_tokens_u"]).all()
    assert uncached["cost_micro_usd"].sum() > 2 * ok["cost_micro_usd"].sum()
