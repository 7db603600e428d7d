"""The answer journal: answers durable as they arrive, a torn tail tolerated, what a resume
recovers and what it counts as paid but unrecovered; the dispatcher's side of it (rows
journalled before their batch is done, nothing sent once the driver is gone)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from batchroute import config, schemas
from batchroute.job import runner
from batchroute.stages import journal, results
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import ResultSink, RunFolder
from tests.helpers import CHEAP, job_doc
from tests.unit.stages.test_dispatcher import _openai_ok, _routed

KEY = "sk-unit-test-secret-4242"


def _rows(ids: list[str], status: str = "ok", model: str = CHEAP) -> pa.Table:
    routed = _routed(len(ids)).set_column(0, "request_id", pa.array(ids, pa.string()))
    return results.build(routed, run_id="r", model=model, status=status,
                         response=[f"answer {i}" for i in ids], cost_micro_usd=[7] * len(ids))


def test_journalled_rows_read_back_and_a_torn_last_write_is_dropped(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "run")
    writer = journal.JournalWriter(folder, CHEAP)
    writer.append(_rows(["a", "b"]))
    writer.append(_rows(["c"]))
    path = next((tmp_path / "run" / "journal").glob("*.arrows"))
    size = path.stat().st_size
    writer.append(_rows(["d", "e"]))
    # Killed half-way through the third write: the stream ends inside a message.
    with path.open("r+b") as f:
        f.truncate(size + (path.stat().st_size - size) // 2)
    found = journal.read(folder)
    assert sorted(found.rows.column("request_id").to_pylist()) == ["a", "b", "c"]
    assert found.rows.schema == schemas.RESULTS


def test_a_row_journalled_twice_keeps_its_last_answer(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "run")
    journal.JournalWriter(folder, CHEAP).append(_rows(["a"], status="failed"))
    journal.JournalWriter(folder, CHEAP).append(_rows(["a", "b"]))
    found = journal.read(folder)
    assert sorted(found.rows.column("request_id").to_pylist()) == ["a", "b"]
    assert set(found.rows.column("status").to_pylist()) == {"ok"}


def test_resume_commits_journalled_answers_and_counts_lost_calls(tmp_path: Path) -> None:
    """What a crashed attempt journalled but never committed becomes results rows (sent
    again never); what it had in flight and never got back is unrecovered spend."""
    folder = RunFolder(str(tmp_path), "run")
    sink = ResultSink(folder)
    sink.write(_rows(["done"]))  # committed before the crash
    w = journal.JournalWriter(folder, CHEAP)
    w.append(_rows(["done", "j1", "j2"]))
    w.append(_rows(["bad"], status="failed"))  # a failed row is retried, not recovered
    w.snapshot({"j2": 40, "lost1": 50, "lost2": 60}, unrecovered_micro_usd=9)
    manifest = Manifest.new(folder)
    answered = runner._recover(folder, sink, manifest, pa.array(["done"], pa.string()))

    assert sorted(answered.to_pylist()) == ["done", "j1", "j2"]
    committed = pq.read_table(tmp_path / "run" / "results")
    ids = committed.column("request_id").to_pylist()
    assert sorted(ids) == ["done", "j1", "j2"] and len(ids) == len(set(ids))
    # j2 was answered after the snapshot; lost1 and lost2 never were.
    assert manifest.unrecovered_by_model == {CHEAP: 50 + 60 + 9}
    assert manifest.unrecovered_cost_micro_usd == 119
    assert not (tmp_path / "run" / "journal").exists()
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["unrecovered_cost_micro_usd"] == 119


class _Gate(httpx.AsyncBaseTransport):
    """Answers every request at once, except prompts containing "slow", which wait for
    ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread())
        prompt = body["messages"][0]["content"]
        self.sent.append(prompt)
        if "slow" in prompt:
            await self.release.wait()
        return _openai_ok(httpx.Request("POST", request.url, content=json.dumps(body)))


def _dispatcher(transport: httpx.AsyncBaseTransport, entries: list[Any],
                alive: Any = None) -> ModelDispatcher:
    job = config.parse(job_doc("http://provider.test/v1"))

    async def tick(s: float) -> None:  # the flush interval passes at every turn of the loop
        await asyncio.sleep(0)

    return ModelDispatcher(
        job.models[CHEAP], job.dispatch, run_id="run-1", api_key=KEY, transport=transport,
        sleep=tick, rng=random.Random(1), alive=alive,
        journal=lambda rows, in_flight, unrecovered: entries.append((rows, in_flight)))


def test_answers_are_journalled_while_their_batch_is_still_in_flight() -> None:
    routed = _routed(4).set_column(
        schemas.ROUTED.get_field_index("prompt"), "prompt",
        pa.array(["fast 0", "fast 1", "slow 2", "fast 3"]))
    gate = _Gate()
    entries: list[Any] = []

    async def go() -> pa.Table:
        d = _dispatcher(gate, entries)
        task = asyncio.ensure_future(d.dispatch(routed))
        while len(gate.sent) < 4 or not any(rows is not None for rows, _ in entries):
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        journalled = {r for rows, _ in entries if rows is not None
                      for r in rows.column("request_id").to_pylist()}
        assert journalled == {"r0", "r1", "r3"}  # before the batch is done
        assert entries[-1][1].keys() == {"r2"}  # the slow call is the one in flight
        assert not task.done()
        gate.release.set()
        out = await task
        await d.aclose()
        return out

    out = asyncio.run(go())
    assert out.num_rows == 4
    ids = [r for rows, _ in entries if rows is not None
           for r in rows.column("request_id").to_pylist()]
    assert sorted(ids) == ["r0", "r1", "r2", "r3"]  # each row once, the last at the end


def test_nothing_is_sent_once_the_driver_is_gone() -> None:
    gate = _Gate()
    gate.release.set()

    async def go() -> tuple[pa.Table, ModelDispatcher]:
        d = _dispatcher(gate, [], alive=lambda: False)
        out = await d.dispatch(_routed(3))
        await d.aclose()
        return out, d

    out, d = asyncio.run(go())
    assert gate.sent == []
    assert set(out.column("status").to_pylist()) == {"failed"}
    assert set(out.column("error_type").to_pylist()) == {"abandoned"}
    assert d.stats.abandoned == 3


def test_a_malformed_2xx_reply_is_counted_as_unrecovered_spend() -> None:
    class Garbled(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=b"{not json")

    async def go() -> ModelDispatcher:
        d = _dispatcher(Garbled(), [])
        await d.dispatch(_routed(2, max_tokens=16))
        await d.aclose()
        return d

    d = asyncio.run(go())
    per_call = d.model.cost_micro_usd(7, 16)  # the request's estimate at full max_tokens
    assert per_call > 0
    assert d.stats.unrecovered_micro_usd == 2 * d.policy.max_attempts * per_call
