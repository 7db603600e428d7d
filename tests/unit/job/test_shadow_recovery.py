"""A killed run's shadow calls: what was answered is committed from the shadow journal and not
sent again; what was in flight is counted as paid but unrecovered."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchroute import schemas
from batchroute.job import shadows
from batchroute.stages.journal import JournalWriter
from batchroute.stages.sink import RunFolder


def _rows(ids: list[str], status: str = "ok") -> pa.Table:
    when = datetime(2026, 12, 2, tzinfo=UTC)
    return pa.Table.from_pylist(
        [{"request_id": r, "run_id": "r1", "model": "strong", "status": status,
          "response": f"answer {r}", "input_tokens": 3, "output_tokens": 5,
          "cost_micro_usd": 40, "cost_usd": 4e-5, "attempts": 1, "invalid_answers": 0,
          "cached_input_tokens": 0, "cache_write_input_tokens": 0, "reasoning_tokens": 0,
          "route_cost_micro_usd": 0, "finished_at": when} for r in ids],
        schema=schemas.RESULTS)


def test_a_resume_commits_the_journalled_shadow_answers_and_counts_the_lost(
        tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "r1")
    sub = shadows.shadow_folder(folder)
    # an earlier attempt committed one shard; the killed one journalled two more answers,
    # one failed answer, and had two calls in flight (one of which was answered after all)
    folder.write_table(folder.sub("quality", "answers"), "part-0.parquet", _rows(["a"]))
    writer = JournalWriter(sub, "strong")
    writer.append(pa.concat_tables([_rows(["b", "c"]), _rows(["d"], status="failed")]))
    writer.snapshot({"c": 70, "e": 90}, 15)
    writer.close()

    waited = []
    lost = shadows._recover(folder, sub, waited.append)

    answers = pa.concat_tables(pq.read_table(p) for p in sorted(
        (tmp_path / "r1" / "quality" / "answers").glob("*.parquet")))
    assert sorted(answers.column("request_id").to_pylist()) == ["a", "b", "c"]
    assert lost == {"strong": 90 + 15}  # e never came back; c did
    assert not (Path(sub.path) / "journal").exists()
    assert waited == [sub]
    assert shadows._recover(folder, sub, waited.append) == {}  # nothing twice
