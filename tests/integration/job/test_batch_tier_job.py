"""A job with batch-tier models, end to end on the shared Ray session against the mock
provider's batch endpoints: routed rows go through OpenAI's Batch API and Anthropic's Message
Batches at half price, the rest sync; expired and errored lines come back in later batches; a
deadline sends only the unfinished rest through sync; no custom id is ever sent twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.job import runner
from tests.helpers import demo_job_doc, quiet_progress

pytestmark = pytest.mark.integration
N = 400
MODELS = ("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview")


def _input(path: Path) -> None:
    pq.write_table(pa.table({
        "request_id": [f"q{i}" for i in range(N)],
        "prompt": [f"Summarise ticket {i}: the export is empty since {i % 9} days." for i in
                   range(N)],
        "force_model": [MODELS[i % 3] for i in range(N)]}), path)


def _job(tmp: Path, url: str, *, tiers: dict[str, str], deadline: str = "",
         **dispatch: Any) -> config.JobConfig:
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", url, dispatch={
        "backoff_base_s": 0.01, "backoff_max_s": 0.05, "batch_rows": 64,
        "default_max_tokens": 64, "deadline": deadline, **dispatch})
    for name, tier in tiers.items():
        doc["models"][name].update(tier=tier, batch_discount=0.5, batch_max_lines=40)
    return config.parse(doc)


def _run(tmp: Path, api_key: str, job_of: Any, run_id: str,
         **mock: Any) -> tuple[pl.DataFrame, Any, Any, config.JobConfig]:
    cfg = MockProviderConfig(**{"api_key": api_key, "latency_ms": 1.0, "batch_delay_s": 0.3,
                                **mock})
    with MockProvider(cfg) as provider:
        job = job_of(provider.url)
        out = runner.run(job, run_id=run_id, progress=quiet_progress())
        served = provider.stats()
    return pl.read_parquet(out.folder.sub("results")), out, served, job


def test_batch_tier_models_are_answered_at_half_price_and_sync_ones_at_full(
        tmp_path: Path, api_key: str, ray_session: None) -> None:
    _input(tmp_path / "in.parquet")
    batched = {"mixtral-8x7b-instruct": "batch", "claude-3-5-sonnet": "batch"}
    results, out, served, job = _run(
        tmp_path, api_key, lambda url: _job(tmp_path, url, tiers=batched), "batched",
        batch_expire_share=0.1, batch_line_error_rate=0.05)
    assert out.exit_code == 0, results.filter(pl.col("status") != "ok")["error_message"][:3]
    assert sorted(results["request_id"]) == sorted(f"q{i}" for i in range(N))
    assert set(results["status"]) == {"ok"}
    by_model = {m: results.filter(pl.col("model") == m) for m in MODELS}
    assert set(by_model["mixtral-8x7b-instruct"]["tier"]) == {"batch"}
    assert set(by_model["claude-3-5-sonnet"]["tier"]) == {"batch"}
    assert set(by_model["gpt-4-1106-preview"]["tier"]) == {"sync"}
    # Every row costs its tokens at its tier's price.
    for m, rows in by_model.items():
        model = job.models[m]
        expected = [model.cost_micro_usd(i, o, c, w, tier=t) for i, o, c, w, t in rows.select(
            "input_tokens", "output_tokens", "cached_input_tokens",
            "cache_write_input_tokens", "tier").iter_rows()]
        assert rows["cost_micro_usd"].to_list() == expected
    # Expired and errored lines were sent again, each under a new custom id.
    assert served["batch_duplicate_custom_ids"] == 0
    assert served["batch_lines_received"] > 2 * N // 3
    stats = out.manifest.dispatch["mixtral-8x7b-instruct"]["batch"]
    assert stats["resubmitted"] > 0 and stats["files"] > 3
    rollups = pl.read_parquet(out.folder.sub("rollups"))
    assert rollups["cost_micro_usd"].sum() == results["cost_micro_usd"].sum()
    mixtral = rollups.filter(pl.col("model") == "mixtral-8x7b-instruct").row(0, named=True)
    assert mixtral["batch_cost_micro_usd"] == mixtral["cost_micro_usd"] > 0
    assert mixtral["tier_savings_usd"] == pytest.approx(
        (mixtral["standard_cost_micro_usd"] - mixtral["cost_micro_usd"]) / 1e6)
    # Half price, to the rounding of each row's cost (at most half a micro-dollar a row).
    assert mixtral["standard_cost_micro_usd"] == pytest.approx(
        2 * mixtral["cost_micro_usd"], abs=len(by_model["mixtral-8x7b-instruct"]))
    # The plan forecast the batch models at half price and their expected turnaround.
    forecast = out.forecast["models"]["mixtral-8x7b-instruct"]
    assert forecast["tier"] == "batch" and forecast["bound_by"] == "batch turnaround"
    assert forecast["est_cost_usd"] == pytest.approx(forecast["est_standard_cost_usd"] / 2,
                                                     abs=1e-6)


def test_at_the_deadline_only_the_unfinished_rest_goes_sync(
        tmp_path: Path, api_key: str, ray_session: None) -> None:
    from datetime import UTC, datetime, timedelta

    _input(tmp_path / "in.parquet")
    # Time to route and submit the batches (the session's Ray is up), none to finish them.
    deadline = (datetime.now(UTC) + timedelta(seconds=6)).isoformat()
    results, out, served, _ = _run(
        tmp_path, api_key,
        lambda url: _job(tmp_path, url, tiers={"mixtral-8x7b-instruct": "batch"},
                         deadline=deadline), "deadline", batch_delay_s=3600.0)
    assert out.exit_code == 0
    mixtral = results.filter(pl.col("model") == "mixtral-8x7b-instruct")
    assert len(results) == N and len(mixtral) == N // 3 + 1
    # The batches were cancelled: the few lines they had completed are kept at the batch
    # price, and only the rest was sent sync, at full price.
    sync = mixtral.filter(pl.col("tier") == "sync")
    assert set(mixtral["tier"]) <= {"batch", "sync"} and len(sync) > len(mixtral) // 2
    stats = out.manifest.dispatch["mixtral-8x7b-instruct"]["batch"]
    assert stats["deadline_passed"] and stats["sent_sync_after_deadline"] == len(sync)
    assert stats["succeeded"] == len(mixtral) - len(sync)
    assert served["batches_by_status"].get("cancelled", 0) > 0
    assert served["batch_duplicate_custom_ids"] == 0
