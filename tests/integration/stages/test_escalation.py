"""Escalation through the real job: rows cut short on a cheap model climb the ladder, each
through the next model's own dispatch actor, and every cent of every attempt is accounted."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from batchroute import config
from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider
from batchroute.job import runner
from batchroute.stages import rollup
from tests.helpers import demo_job_doc, quiet_progress

pytestmark = [pytest.mark.integration]


def test_truncated_answers_escalate_up_the_ladder_with_every_attempt_billed(
        tmp_path: Path, provider: MockProvider, ray_session: None) -> None:
    sample.write(sample.generate(300, seed=11), tmp_path / "in.parquet")
    # 24 output tokens cut most of the mock's non-MMLU answers (20-400 tokens) short.
    job = config.parse(demo_job_doc(
        tmp_path / "in.parquet", tmp_path / "runs", provider.url,
        dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.1, "default_max_tokens": 24,
                  "escalate_on": ["length"]}))
    ladder = list(job.dispatch.escalation_ladder)
    assert ladder == ["mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"]
    out = runner.run(job, run_id="esc", progress=quiet_progress())
    results = pl.read_parquet(out.folder.sub("results"))
    assert out.exit_code == 0
    assert len(results) == 300  # the sample's planted duplicate id is one rejected row
    assert results.filter(pl.col("status") != "rejected")["request_id"].is_unique().all()

    escalated = results.filter(pl.col("escalated_from").is_not_null()).to_dicts()
    assert len(escalated) > 30
    for r in escalated:
        chain = [e["model"] for e in r["escalations"]] + [r["model"]]
        start = ladder.index(chain[0])
        assert chain == ladder[start:start + len(chain)], chain  # one step at a time, upwards
        assert r["escalated_from"] == chain[0]
        assert all(e["reason"] == "length" for e in r["escalations"])
        bills = [job.models[e["model"]].cost_micro_usd(e["input_tokens"], e["output_tokens"])
                 for e in r["escalations"]]
        assert [e["cost_micro_usd"] for e in r["escalations"]] == bills
        own = job.models[r["model"]].cost_micro_usd(r["input_tokens"], r["output_tokens"])
        assert r["cost_micro_usd"] == own + sum(bills)
    # Nothing stays truncated below the top of the ladder.
    cut = results.filter((pl.col("finish_reason") == "length")
                         & (pl.col("model") != ladder[-1]))
    assert cut.is_empty()

    rollups = pl.read_parquet(out.folder.sub("rollups"))
    assert rollups["cost_micro_usd"].sum() == results["cost_micro_usd"].sum()
    assert rollups["escalated"].sum() == sum(len(r["escalations"]) for r in escalated)
    esc_in = sum(e["input_tokens"] for r in escalated for e in r["escalations"])
    assert rollups["input_tokens"].sum() == results["input_tokens"].sum() + esc_in
    assert "passed up the escalation ladder" in rollup.format_table(out.rollups)
    stats = out.manifest.dispatch
    assert stats[ladder[0]]["escalated"] == rollups.filter(
        pl.col("model") == ladder[0])["escalated"].item()
