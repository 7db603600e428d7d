"""Resuming a run folder: nothing paid twice, nothing lost, changed runs refused."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.errors import ConfigError
from batchroute.job import runner
from tests.helpers import demo_job_doc, quiet_progress

pytestmark = pytest.mark.integration
MODELS = ("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview")
N = 300


def _job(tmp: Path, urls: dict[str, str]) -> config.JobConfig:
    return config.parse(demo_job_doc(
        tmp / "in.parquet", tmp / "runs", urls,
        dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "batch_rows": 32}))


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    prompts = [f"Question {i}: what is {i} times {i}?" for i in range(N)]
    prompts[5] = ""  # one rejected row that must stay rejected
    force = [MODELS[i % 3] for i in range(N)]
    pq.write_table(pa.table({"request_id": [f"r{i}" for i in range(N)], "prompt": prompts,
                             "force_model": force}), tmp_path / "in.parquet")
    return tmp_path / "in.parquet"


def test_resume_retries_failed_rows_and_never_resends_ok_ones(
        tmp_path: Path, inputs: Path, provider: MockProvider, ray_session: None) -> None:
    with MockProvider(MockProviderConfig(api_key="sk-not-the-right-one")) as wrong:
        urls = dict.fromkeys(MODELS, provider.url) | {"gpt-4-1106-preview": wrong.url}
        first = runner.run(_job(tmp_path, urls), run_id="r", progress=quiet_progress())
    assert first.exit_code == 1
    before = pl.read_parquet(first.folder.sub("results"))
    failed = before.filter(pl.col("status") == "failed")
    # Every third row is forced to gpt-4; r5 is one of them but rejected (empty prompt).
    assert len(failed) == N // 3 - 1
    assert set(failed["model"]) == {"gpt-4-1106-preview"}
    sent_before = provider.stats()["requests"]

    # The key is fixed by pointing gpt-4 at the right provider: a config change, so --force.
    fixed = _job(tmp_path, dict.fromkeys(MODELS, provider.url))
    with pytest.raises(ConfigError, match="the job configuration changed"):
        runner.run(fixed, run_id="r", progress=quiet_progress())
    second = runner.run(fixed, run_id="r", force=True, progress=quiet_progress())

    after = pl.read_parquet(second.folder.sub("results"))
    assert second.exit_code == 0
    assert len(after) == N and after["request_id"].n_unique() == N
    # Only the failed rows were sent again (each call counted once, retries included);
    # ok rows kept their original answers.
    retried = after.filter(pl.col("request_id").is_in(failed["request_id"].implode()))
    assert len(retried) == len(failed) and set(retried["status"]) == {"ok"}
    assert provider.stats()["requests"] - sent_before == retried["attempts"].sum()
    kept = before.filter(pl.col("status") == "ok").select("request_id", "response")
    assert kept.join(after.select("request_id", "response"), on="request_id").filter(
        pl.col("response") != pl.col("response_right")).is_empty()
    assert after.filter(pl.col("request_id") == "r5")["status"].to_list() == ["rejected"]
    assert second.manifest.counts == {"ok": N - 1, "failed": 0, "rejected": 1}
    assert len(second.manifest.resumes) == 1
    rollups = pl.read_parquet(second.folder.sub("rollups"))
    assert rollups["rows"].sum() == N and rollups["failed"].sum() == 0


def test_a_planned_run_resumes_without_routing_again(
        tmp_path: Path, inputs: Path, provider: MockProvider, ray_session: None) -> None:
    job = _job(tmp_path, dict.fromkeys(MODELS, provider.url))
    planned = runner.run(job, run_id="p", dry_run=True, progress=quiet_progress())
    routed_files = sorted(Path(planned.folder.sub("routed")).rglob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in routed_files]
    done = runner.run(job, run_id="p", progress=quiet_progress())
    assert [p.stat().st_mtime_ns for p in routed_files] == stamps
    assert done.manifest.stages["plan"] == planned.manifest.stages["plan"]
    assert len(pl.read_parquet(done.folder.sub("results"))) == N

    # Resuming a finished run sends nothing and changes nothing.
    sent = provider.stats()["requests"]
    again = runner.run(job, run_id="p", progress=quiet_progress())
    assert provider.stats()["requests"] == sent
    assert len(pl.read_parquet(again.folder.sub("results"))) == N


def test_changed_input_is_refused_and_half_written_shards_are_ignored(
        tmp_path: Path, inputs: Path, provider: MockProvider, ray_session: None) -> None:
    job = _job(tmp_path, dict.fromkeys(MODELS, provider.url))
    out = runner.run(job, run_id="c", progress=quiet_progress())
    results = Path(out.folder.sub("results"))
    # What a kill during a shard commit leaves: a partial file in _tmp/, never in results/.
    (Path(out.folder.sub("_tmp")) / "0123-part-000999.parquet").write_bytes(b"PAR1 half")
    assert len(pl.read_parquet(results)) == N

    again = runner.run(job, run_id="c", progress=quiet_progress())
    assert again.manifest.resumes[-1]["temp_files_discarded"] == 1
    assert not list(Path(out.folder.sub("_tmp")).iterdir())

    pq.write_table(pa.table({"request_id": ["new"], "prompt": ["changed"]}), inputs)
    with pytest.raises(ConfigError, match="the input changed"):
        runner.run(job, run_id="c", progress=quiet_progress())


def test_a_task_job_resumes_with_its_label_and_id_columns_on_every_shard(
        tmp_path: Path, provider: MockProvider, ray_session: None) -> None:
    pq.write_table(pa.table({"ticket_id": pa.array(range(1000, 1000 + N), pa.int64()),
                             "subject": [f"Case {i} about my invoice" for i in range(N)],
                             "force_model": [MODELS[i % 3] for i in range(N)]}),
                   tmp_path / "in.parquet")

    def job(urls: dict[str, str]) -> config.JobConfig:
        doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", urls, dispatch={
            "backoff_base_s": 0.01, "backoff_max_s": 0.05, "batch_rows": 32})
        doc["job"]["id_column"] = "ticket_id"
        doc["task"] = {"template": "{{ subject }}", "keep_columns": ["subject"],
                       "output": {"labels": ["billing", "bug", "other"]}}
        return config.parse(doc)

    with MockProvider(MockProviderConfig(api_key="sk-not-the-right-one")) as wrong:
        urls = dict.fromkeys(MODELS, provider.url) | {"gpt-4-1106-preview": wrong.url}
        first = runner.run(job(urls), run_id="t", progress=quiet_progress())
    assert first.exit_code == 1
    second = runner.run(job(dict.fromkeys(MODELS, provider.url)), run_id="t", force=True,
                        progress=quiet_progress())
    after = pl.read_parquet(second.folder.sub("results"))  # one schema over every shard
    assert second.exit_code == 0 and len(after) == N
    assert sorted(after["ticket_id"]) == list(range(1000, 1000 + N))
    assert after.schema["ticket_id"] == pl.Int64
    assert set(after["label"]) <= {"billing", "bug", "other"}
    assert after["label"].null_count() == 0
