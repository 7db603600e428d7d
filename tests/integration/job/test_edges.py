"""Edges of the whole job on the shared Ray session: provider limits below the catalog's, empty
and all-rejected inputs, hostile rows and files that are not Parquet in the input, a key
missing where the workers run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _job(tmp: Path, input_uri: Path, urls: dict[str, str], **model: Any) -> config.JobConfig:
    # Eight attempts: while the client converges on a provider limit half its catalog's, a
    # row can meet several 429s in a row; the test is about pacing, not the attempt budget.
    return config.parse(demo_job_doc(
        input_uri, tmp / "runs", urls, dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.1,
                                                 "batch_rows": 32, "max_attempts": 8},
        **model))





def test_provider_limit_below_the_catalog_gives_429s_that_are_honoured(
        tmp_path: Path, api_key: str, ray_session: None) -> None:
    n = 120
    pq.write_table(pa.table({"request_id": [f"q{i}" for i in range(n)],
                             "prompt": [f"What is {i} plus {i}?" for i in range(n)],
                             "force_model": ["mixtral-8x7b-instruct"] * n}),
                   tmp_path / "in.parquet")
    # The provider allows 1,200 RPM over 1 s windows; the catalog claims 2,400.
    tight = MockProviderConfig(rpm=1200, tpm=10_000_000, window_s=1.0, api_key=api_key)
    with MockProvider(tight) as p:
        job = _job(tmp_path, tmp_path / "in.parquet", dict.fromkeys(
            ("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"), p.url),
            rpm=2400)
        out = runner.run(job, run_id="tight", progress=quiet_progress())
        served = p.stats()
    results = pl.read_parquet(out.folder.sub("results"))
    assert out.exit_code == 0 and len(results) == n
    assert set(results["status"]) == {"ok"}
    stats = out.manifest.dispatch["mixtral-8x7b-instruct"]
    assert stats["rate_limited"] == served["rate_limited"] > 0
    # Paced down instead of hammering: fewer 429s than rows (about half here, most of them
    # from the first second's burst), and the model was slowed below its catalog rate.
    assert stats["rate_limited"] < n and stats["min_rate_factor"] < 1
    assert results["attempts"].sum() == n + stats["rate_limited"]


def test_empty_and_all_rejected_inputs_finish_cleanly(tmp_path: Path, provider: MockProvider,
                                                      ray_session: None) -> None:
    urls = dict.fromkeys(("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"),
                         provider.url)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"request_id": pa.array([], pa.string()),
                             "prompt": pa.array([], pa.string())}), empty)
    out = runner.run(_job(tmp_path, empty, urls), run_id="empty", progress=quiet_progress())
    assert out.exit_code == 0 and out.manifest.input_rows == 0
    assert out.rollups is not None and out.rollups.num_rows == 0

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"request_id": ["a", "a", "b"], "prompt": ["", "x", None]}), bad)
    out = runner.run(_job(tmp_path, bad, urls), run_id="bad", progress=quiet_progress())
    results = pl.read_parquet(out.folder.sub("results"))
    assert sorted(results["reject_reason"].to_list()) == [
        "duplicate request_id (first at input row 0)", "empty prompt", "null prompt"]
    assert out.forecast["routed"] == 0 and out.exit_code == 0


def test_files_that_are_not_parquet_are_skipped_and_listed_in_the_manifest(
        tmp_path: Path, provider: MockProvider, ray_session: None) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"request_id": ["a", "b"], "prompt": ["What is 2+2?", "Hi"]}),
                   folder / "part-0.parquet")
    (folder / "README").write_text("Exported nightly by the ticketing team.\n")
    (folder / "COMPLETED").write_text("")
    urls = dict.fromkeys(("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"),
                         provider.url)
    out = runner.run(_job(tmp_path, folder, urls), run_id="skips", progress=quiet_progress())
    assert out.manifest.input_skipped == [str(folder / "COMPLETED"), str(folder / "README")]
    assert out.folder.read_json("manifest.json")["input_skipped"] == out.manifest.input_skipped
    assert out.manifest.input_files == 1 and out.manifest.input_rows == 2


def test_hostile_rows_are_rejected_and_the_rest_run(tmp_path: Path, provider: MockProvider,
                                                   ray_session: None) -> None:
    """Invalid UTF-8, a uint64 max_tokens past int64, blank ids, DuckDB's decimals: each of
    these once stopped the whole job (exit 3) or refused its file."""
    import duckdb

    folder = tmp_path / "in"
    folder.mkdir()
    prompts = pa.array([b"What is 2+2?", b"caf\xed\xa0\x80 au lait?", b"Hi", b"Hello"],
                       pa.binary()).view(pa.string())
    pq.write_table(pa.table({"request_id": ["a", "b", "c", "  "], "prompt": prompts,
                             "max_tokens": pa.array([64, 32, 2**63, 16], pa.uint64())}),
                   folder / "part-0.parquet")
    duckdb.connect().execute(
        "COPY (SELECT * FROM (VALUES ('d', 'Name a colour.', 0.2, 64.0), "
        "('e', 'Name a fruit.', 0.7, 2.5)) AS t(request_id, prompt, temperature, max_tokens)) "
        f"TO '{folder / 'part-1.parquet'}' (FORMAT PARQUET)")
    urls = dict.fromkeys(("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"),
                         provider.url)
    out = runner.run(_job(tmp_path, folder, urls), run_id="hostile", progress=quiet_progress())
    results = pl.read_parquet(out.folder.sub("results")).sort("request_id", nulls_last=True)
    assert out.exit_code == 0 and len(results) == 6
    assert dict(zip(results["request_id"], results["status"],
                    strict=True)) == {"a": "ok", "b": "rejected", "c": "rejected",
                                      "d": "ok", "e": "rejected", "  ": "rejected"}
    assert sorted(results["reject_reason"].drop_nulls().to_list()) == [
        "empty request_id", "max_tokens must be a whole number",
        "max_tokens must be between 1 and 2147483647", "prompt is not valid UTF-8"]


def test_a_corrupt_data_page_stops_the_run_before_any_call_and_leaves_nothing(
        tmp_path: Path, provider: MockProvider, ray_session: None) -> None:
    from batchroute.stages.source import UnreadableInput
    from tests.helpers import corrupt_page

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["What is 2+2?"]}),
                   folder / "0.parquet")
    pq.write_table(pa.table({"request_id": [f"r{i}" for i in range(300)],
                             "prompt": [f"Question {i}?" * 20 for i in range(300)]}),
                   folder / "1.parquet", row_group_size=100)
    corrupt_page(folder / "1.parquet", 2, "prompt")
    urls = dict.fromkeys(("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"),
                         provider.url)
    calls = provider.stats()["requests"]
    with pytest.raises(UnreadableInput, match=rf"{folder}/1\.parquet: row group 2 cannot be"):
        runner.run(_job(tmp_path, folder, urls), run_id="corrupt", progress=quiet_progress())
    assert provider.stats()["requests"] == calls
    assert not (tmp_path / "runs" / "corrupt").exists()


def test_key_missing_in_the_workers_stops_before_any_work(
        tmp_path: Path, provider: MockProvider, ray_session: None) -> None:
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["hi"]}), tmp_path / "in.parquet")
    urls = dict.fromkeys(("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"),
                         provider.url)
    job = _job(tmp_path, tmp_path / "in.parquet", urls,
               api_key_env="BATCHROUTE_KEY_NOBODY_SET")
    with pytest.raises(ConfigError, match="BATCHROUTE_KEY_NOBODY_SET is not set"):
        runner.run(job, run_id="nokey", progress=quiet_progress())
    assert not (tmp_path / "runs" / "nokey").exists()


def test_actors_started_again_after_a_death_are_still_told_the_driver_lives(
        tmp_path: Path, provider: MockProvider, ray_session: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A node lost a moment ago can still be offered for new actors; the first set dies and a
    # second one is started. Its heartbeat must run, or every actor gives its rows up as
    # "abandoned" five seconds in (a resume after a lost node did exactly this).
    import ray

    from batchroute.job import cluster
    from batchroute.stages.sink import RunFolder

    start = cluster.DispatchActors._start
    died = []

    def dies_once(self: cluster.DispatchActors, folder: RunFolder) -> list[bool]:
        have = start(self, folder)
        if not died:
            died.append(True)
            raise ray.exceptions.ActorDiedError()
        return have

    monkeypatch.setattr(cluster.DispatchActors, "_start", dies_once)
    monkeypatch.setattr(cluster, "START_BACKOFF_S", 0.0)
    urls = dict.fromkeys(("mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"),
                         provider.url)
    job = _job(tmp_path, tmp_path / "in.parquet", urls)
    actors = cluster.DispatchActors(job, RunFolder(job.output, "restarted"))
    try:
        assert died and len(actors.actors) == len(job.models)
        actors._beat.join(timeout=3 * cluster.HEARTBEAT_S)
        assert actors._beat.is_alive(), "the heartbeat thread stopped"
        assert all(ray.get([a._alive.remote() for a in actors.actors.values()]))
    finally:
        actors.kill()
    actors._beat.join(timeout=3 * cluster.HEARTBEAT_S)
    assert not actors._beat.is_alive()
