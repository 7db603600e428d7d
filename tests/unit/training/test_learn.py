"""``batchroute learn`` on run folders written here (synthetic tables in the shapes a run
writes, committed through RunFolder), its label rules and deduplication, bad folders; and the
merged, partly labelled label files that train, calibrate and eval then read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli, schemas
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import RunFolder
from batchroute.training import learn, train
from tests.helpers import CHEAP, STRONG

MID = "mid-model"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _table(schema: pa.Schema, rows: list[dict[str, Any]]) -> pa.Table:
    """``rows`` as a table of ``schema``: absent nullable columns null, the others zero."""
    def default(f: pa.Field) -> Any:
        if f.nullable:
            return None
        if pa.types.is_integer(f.type):
            return 0
        if pa.types.is_floating(f.type):
            return 0.0
        if pa.types.is_timestamp(f.type):
            return NOW
        return ""
    return pa.table({f.name: pa.array([r.get(f.name, default(f)) for r in rows], f.type)
                     for f in schema}, schema=schema)


def _escalation(model: str, reason: str) -> dict[str, Any]:
    return {"model": model, "reason": reason, "input_tokens": 10, "cached_input_tokens": 0,
            "cache_write_input_tokens": 0, "output_tokens": 5, "reasoning_tokens": 0,
            "cost_micro_usd": 7, "attempts": 1, "invalid_answers": 1 if reason == "invalid"
            else 0, "tier": "sync"}


def _run(root: Path, run_id: str, *, prompts: dict[str, str], results: list[dict[str, Any]],
         shadows: list[dict[str, Any]] | None = None, started_at: str = "2026-12-01T00:00:00",
         router_version: str = "bow-lr-1-test") -> str:
    """A run folder as a run leaves it: manifest, source/, results/ and, when ``shadows`` is
    given, quality/shadows/."""
    folder = RunFolder(str(root), run_id)
    manifest = Manifest.new(folder, job="demo", router_version=router_version)
    manifest.started_at = started_at
    for stage in ("route", "plan", "dispatch", "rollup"):
        manifest.stages[stage] = {"state": "done", "at": started_at}
    manifest.write(folder)
    source = _table(schemas.REQUESTS, [{"request_id": rid, "row": i, "prompt": text}
                                       for i, (rid, text) in enumerate(prompts.items())])
    folder.write_table(folder.sub("source"), folder.shard_name(0), source)
    folder.write_table(folder.sub("results"), folder.shard_name(0),
                       _table(schemas.RESULTS, [{"run_id": run_id, **r} for r in results]))
    if shadows is not None:
        folder.write_table(folder.sub("quality", "shadows"), folder.shard_name(0),
                           _table(schemas.SHADOWS, [{"reference_model": STRONG, **s}
                                                    for s in shadows]))
    return folder.uri


def _by(labels: pl.DataFrame) -> dict[tuple[str, str], tuple[float, str]]:
    return {(r["request_id"], r["model"]): (r["score"], r["source"])
            for r in labels.iter_rows(named=True)}


def test_the_label_rules(tmp_path: Path) -> None:
    prompts = {k: f"prompt {k}" for k in "abcdefgh"}
    uri = _run(tmp_path, "night-1", prompts=prompts, results=[
        {"request_id": "a", "model": CHEAP, "status": "ok"},
        {"request_id": "b", "model": CHEAP, "status": "ok"},
        {"request_id": "c", "model": MID, "status": "ok", "escalated_from": CHEAP,
         "escalations": [_escalation(CHEAP, "length")]},
        {"request_id": "d", "model": CHEAP, "status": "ok", "invalid_answers": 1},
        {"request_id": "e", "model": CHEAP, "status": "ok", "invalid_answers": 2},
        {"request_id": "f", "model": CHEAP, "status": "ok"},
        {"request_id": "g", "model": CHEAP, "status": "ok"},
        {"request_id": "h", "model": STRONG, "status": "failed", "error_type": "invalid_output",
         "invalid_answers": 1, "escalated_from": CHEAP,
         "escalations": [_escalation(CHEAP, "invalid"), _escalation(MID, "failed:terminal")]},
        {"request_id": None, "model": None, "status": "rejected"},
    ], shadows=[
        {"request_id": "a", "model": CHEAP, "status": "ok", "score": 0.5, "graded_by": "fields"},
        {"request_id": "b", "model": CHEAP, "status": "ok", "score": 0.25, "graded_by": "judge",
         "candidate_score": 0.2, "reference_score": 0.8},
        {"request_id": "e", "model": CHEAP, "status": "ok", "score": 1.0, "graded_by": "fields"},
        {"request_id": "f", "model": CHEAP, "status": "failed", "graded_by": "judge"},
    ])
    got = learn.learn([uri])
    assert _by(got.labels) == {
        ("a", CHEAP): (0.5, "shadow"), ("a", STRONG): (1.0, "shadow"),  # fields: agreement, 1
        ("b", CHEAP): (0.2, "judge"), ("b", STRONG): (0.8, "judge"),  # judge: absolute grades
        ("c", CHEAP): (0.0, "escalation"),  # escalated away from; the answer kept says nothing
        ("d", CHEAP): (0.0, "invalid"),  # an invalid answer, then a valid one
        ("e", CHEAP): (1.0, "shadow"), ("e", STRONG): (1.0, "shadow"),  # graded beats invalid
        ("h", CHEAP): (0.0, "escalation"), ("h", MID): (0.0, "escalation"),
        ("h", STRONG): (0.0, "invalid"),
    }  # f: not graded; g: nobody looked; the rejected row: never sent
    assert got.labels.columns == schemas.LABELS.names
    assert set(got.labels["run_id"]) == {"night-1"}
    assert set(got.labels["router_version"]) == {"bow-lr-1-test"}
    assert got.labels.filter(pl.col("request_id") == "a")["prompt"].to_list() == ["prompt a"] * 2
    assert got.runs[0].counts == {"shadow": 4, "judge": 2, "escalation": 3, "invalid": 3}

    out = tmp_path / "learnt.parquet"
    learn.write(got, str(out))
    table = pq.read_table(out)
    assert table.schema.names == schemas.LABELS.names
    # What train reads: the required columns, checked as any label file.
    assert train.read_labels(str(out)).height == got.labels.height


def test_dedup_newest_run_wins_one_question_one_id(tmp_path: Path) -> None:
    old = _run(tmp_path, "night-1", started_at="2026-12-01T00:00:00", router_version="v1",
               prompts={"n1-1": "same question", "n1-2": "only old"},
               results=[{"request_id": "n1-1", "model": CHEAP, "status": "ok"},
                        {"request_id": "n1-2", "model": CHEAP, "status": "ok"}],
               shadows=[{"request_id": "n1-1", "model": CHEAP, "status": "ok", "score": 1.0,
                         "graded_by": "judge", "candidate_score": 1.0, "reference_score": 1.0},
                        {"request_id": "n1-2", "model": CHEAP, "status": "ok", "score": 1.0,
                         "graded_by": "fields"}])
    new = _run(tmp_path, "night-2", started_at="2026-12-02T00:00:00", router_version="v2",
               prompts={"n2-7": "same question", "n2-8": "same question"},
               results=[{"request_id": "n2-7", "model": CHEAP, "status": "ok"},
                        {"request_id": "n2-8", "model": CHEAP, "status": "ok",
                         "invalid_answers": 1}],
               shadows=[{"request_id": "n2-7", "model": CHEAP, "status": "ok", "score": 0.0,
                         "graded_by": "judge", "candidate_score": 0.0,
                         "reference_score": 0.9}])
    # Given newest first, and one of them twice: the order of the arguments does not matter.
    got = learn.learn([new, old, old + "/"])
    assert len(got.runs) == 2
    rows = {(r["request_id"], r["model"]): (r["score"], r["source"], r["run_id"])
            for r in got.labels.iter_rows(named=True)}
    assert rows == {
        # The same question on both nights (and twice on the second): one row per model,
        # under the id it was first seen with; the newer night's grades win.
        ("n1-1", CHEAP): (0.0, "judge", "night-2"), ("n1-1", STRONG): (0.9, "judge", "night-2"),
        ("n1-2", CHEAP): (1.0, "shadow", "night-1"), ("n1-2", STRONG): (1.0, "shadow", "night-1"),
    }


def test_bad_folders_are_skipped_and_named(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    good = _run(tmp_path, "good", prompts={"a": "pa"}, results=[
        {"request_id": "a", "model": MID, "status": "ok",
         "escalations": [_escalation(CHEAP, "refusal")]}])  # shadow checks off: no quality/
    damaged = _run(tmp_path, "damaged", prompts={"b": "pb"},
                   results=[{"request_id": "b", "model": CHEAP, "status": "ok",
                             "invalid_answers": 1}])
    shard = next((tmp_path / "damaged" / "results").glob("*.parquet"))
    shard.write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "notes.txt").write_text("hello")
    out = tmp_path / "learnt.parquet"

    code = cli.main(["learn", good, damaged, str(tmp_path / "not-a-run"),
                     str(tmp_path / "missing"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # the good run's labels are written, and the skipped folders named
    assert _by(pl.read_parquet(out)) == {("a", CHEAP): (0.0, "escalation")}
    assert "escalation and invalid labels only" in captured.out
    assert f"skipped {shard}: cannot be read" in captured.err
    assert "not-a-run exists but holds no manifest.json" in captured.err
    assert "missing: not a batchroute run folder" in captured.err
    meta = pq.read_schema(out).metadata[b"batchroute_learn"].decode()
    assert "damaged" in meta and "cannot be read" in meta

    out.unlink()
    assert cli.main(["learn", damaged, "--out", str(out)]) == 2
    assert not out.exists()
    assert "no run folder could be read" in capsys.readouterr().err


def test_messages_rows_learn_the_joined_text(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "chat")
    Manifest.new(folder, job="chat").write(folder)
    folder.write_table(folder.sub("source"), folder.shard_name(0), _table(schemas.REQUESTS, [
        {"request_id": "m", "row": 0,
         "messages": [{"role": "user", "content": "hello there"}]}]))
    folder.write_table(folder.sub("results"), folder.shard_name(0), _table(schemas.RESULTS, [
        {"request_id": "m", "run_id": "chat", "model": MID, "status": "ok",
         "escalations": [_escalation(CHEAP, "length")]}]))
    got = learn.learn([folder.uri])
    assert "hello there" in got.labels["prompt"][0]
    assert got.runs[0].notes[0].startswith("the run has not finished")


def test_a_run_written_before_some_columns_existed(tmp_path: Path) -> None:
    uri = _run(tmp_path, "old", prompts={"a": "pa"},
               results=[{"request_id": "a", "model": CHEAP, "status": "ok"}],
               shadows=[{"request_id": "a", "model": CHEAP, "status": "ok", "score": 0.5,
                         "graded_by": "fields"}])
    shard = next((tmp_path / "old" / "results").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).drop_columns(["invalid_answers", "escalations"]), shard)
    got = learn.learn([uri])
    assert got.runs[0].skipped is None
    assert _by(got.labels) == {("a", CHEAP): (0.5, "shadow"), ("a", STRONG): (1.0, "shadow")}
