"""A job whose cheap model is an OpenAI reasoning model, against the mock provider, which
refuses max_tokens and a non-default temperature for it as OpenAI does: every row answered,
its thinking billed as output and counted per model."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.devtools.mock_provider import MockProvider
from batchroute.job import runner
from tests.helpers import demo_job_doc, quiet_progress

pytestmark = pytest.mark.integration
N = 120


def test_a_job_on_a_reasoning_model_gets_answers_and_bills_its_thinking(
        tmp_path: Path, provider: MockProvider, ray_session: None) -> None:
    pq.write_table(pa.table({
        "request_id": [f"q{i}" for i in range(N)],
        "prompt": [f"What is {i} plus {i}?" for i in range(N)],
        "temperature": [0.2 if i % 2 else None for i in range(N)],
        "force_model": ["mixtral-8x7b-instruct"] * N}), tmp_path / "in.parquet")
    doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", provider.url,
                       dispatch={"batch_rows": 32, "backoff_base_s": 0.01,
                                 "backoff_max_s": 0.05, "default_max_tokens": 1024})
    doc["models"]["mixtral-8x7b-instruct"].update(remote_name="o4-mini",
                                                  reasoning_effort="medium")
    job = config.parse(doc)
    out = runner.run(job, run_id="reasoning", progress=quiet_progress())
    results = pl.read_parquet(out.folder.sub("results"))
    assert out.exit_code == 0 and set(results["status"]) == {"ok"} and len(results) == N
    assert (results["reasoning_tokens"] > 0).all()
    assert (results["output_tokens"] > results["reasoning_tokens"]).all()
    m = job.models["mixtral-8x7b-instruct"]
    expected = [m.cost_micro_usd(i, o) for i, o in
                zip(results["input_tokens"], results["output_tokens"], strict=True)]
    assert results["cost_micro_usd"].to_list() == expected  # thinking billed as output
    rollups = pl.read_parquet(out.folder.sub("rollups"))
    row = rollups.filter(pl.col("model") == "mixtral-8x7b-instruct")
    assert row["reasoning_tokens"][0] == results["reasoning_tokens"].sum()
