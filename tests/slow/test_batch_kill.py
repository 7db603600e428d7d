"""kill -9 a real run whose models go through the provider's batch APIs, just after a create
and while reading results, then resume it: one result row per input row, no custom id received twice by the
provider, rollups equal to the rows, and every row costing its tokens at its tier's price.
(The same steps are crashed exactly, on both wires, five seeds each, without Ray, in
tests/unit/stages/test_batch_tier.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli, config
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from tests.helpers import demo_job_doc, to_toml

pytestmark = pytest.mark.slow
N = 300
MODELS = ("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview")


def _job(tmp: Path, url: str) -> Path:
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", url,
                       dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.05})
    for name in MODELS[:2]:  # OpenAI's Batch API and Anthropic's Message Batches
        doc["models"][name].update(tier="batch", batch_discount=0.5, batch_max_lines=40)
    path = tmp / "job.toml"
    path.write_text(to_toml(doc))
    return path


def _reached(stage: str, ledger: Path, results: Path) -> bool:
    created = list(ledger.glob("*/*.created.json"))
    if stage == "created":
        return bool(created)
    return bool(created) and len(list(results.glob("part-*"))) >= 2  # downloading


# (Kills while the ledger's files are written and while polling are crashed exactly, at each
# step and on both wires, in the unit tier.)
@pytest.mark.parametrize("stage", ["created", "downloading"])
def test_kill_the_batch_tier_anywhere_then_resume(tmp_path: Path, stage: str, api_key: str,
                                                  ray_session: None) -> None:
    import ray

    rng = random.Random(stage)
    pq.write_table(pa.table({
        "request_id": [f"b{i}" for i in range(N)],
        "prompt": [f"Summarise case {i}: the invoice total is wrong." for i in range(N)],
        "force_model": [MODELS[i % 3] for i in range(N)]}), tmp_path / "in.parquet")
    cfg = MockProviderConfig(api_key=api_key, latency_ms=5.0, batch_delay_s=0.8,
                             batch_expire_share=0.05, seed=3)
    with MockProvider(cfg) as provider:
        job = _job(tmp_path, provider.url)
        folder = tmp_path / "runs" / "k"
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchroute", "run", str(job), "--run-id", "k",
             "--ray-address", ray.get_runtime_context().gcs_address],
            env={**os.environ, "BATCHROUTE_TEST_KEY": api_key}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 120
            while not _reached(stage, folder / "batches", folder / "results"):
                assert proc.poll() is None, f"the run ended before {stage}"
                assert time.monotonic() < end, f"the run never reached {stage}"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        time.sleep(1.0)  # let Ray reap the dead driver's actors
        assert cli.main(["resume", str(folder)]) == 0
        served = provider.stats()

    assert served["batch_duplicate_custom_ids"] == 0
    results = pl.read_parquet(folder / "results")
    assert len(results) == N and results["request_id"].n_unique() == N
    assert set(results["status"]) == {"ok"}
    parsed = config.load(job)
    for model, tier in zip(MODELS, ("batch", "batch", "sync"), strict=True):
        rows = results.filter(pl.col("model") == model)
        assert set(rows["tier"]) == {tier}
        m = parsed.models[model]
        assert rows["cost_micro_usd"].to_list() == [
            m.cost_micro_usd(i, o, c, w, tier=tier) for i, o, c, w in rows.select(
                "input_tokens", "output_tokens", "cached_input_tokens",
                "cache_write_input_tokens").iter_rows()]
    rollups = pl.read_parquet(folder / "rollups")
    assert rollups["cost_micro_usd"].sum() == results["cost_micro_usd"].sum()
