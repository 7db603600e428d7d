"""The answer journal: every answer made durable within a fraction of a second of arriving.

Result shards are committed a whole dispatch batch at a time, and several batches per model
are in flight. Without more, a crash throws away every answer of the unfinished batches, and
a resume pays for them again. So each dispatch actor also appends its finished rows to a
journal of its own in the run folder, every ``FLUSH_S`` seconds, together with a snapshot of
the calls it has in flight. After a crash, ``resume`` reads the journals before sending
anything: journalled answers are committed as results and not sent again, and the calls that
were in flight at the last snapshot, and never answered, are counted as paid but unrecovered.
The calls paid twice are then at most those in flight at the crash (each model's concurrency)
plus the answers of the last flush interval.

Layout: ``RUN/journal/WRITER-ID.arrows`` (an Arrow IPC stream of ``results`` rows) and
``RUN/journal/WRITER-ID.inflight.json`` (the latest snapshot, naming its model). On a local filesystem
the stream is one file appended to and flushed to the operating system at every write, so a
killed process loses nothing it wrote (a machine that loses power may lose the last writes).
On an object store, which cannot append, each write is a stream file of its own, committed
whole. A reader stops at a torn last message, as a kill in the middle of a write leaves one.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from batchroute import schemas
from batchroute.stages.sink import RunFolder

DIR = "journal"
FLUSH_S = 0.2
STREAM = ".arrows"
SNAPSHOT = ".inflight.json"


class JournalWriter:
    """One dispatch actor's journal. Not thread-safe: one event loop writes it."""

    def __init__(self, folder: RunFolder, model: str) -> None:
        self.folder = folder
        self.model = model
        self.name = f"{folder.writer}-{uuid.uuid4().hex[:8]}"
        self._local = isinstance(folder.fs, pafs.LocalFileSystem)
        self._sink: Any = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._segments = 0
        folder.fs.create_dir(folder.sub(DIR), recursive=True)

    def append(self, results: pa.Table) -> None:
        """Make ``results`` rows durable (written and flushed before this returns)."""
        if results.num_rows == 0:
            return
        # The job's results schema (schemas.RESULTS, then its task's output and carried
        # columns): every table a dispatcher builds has it, and the stream records it.
        if self._local:
            if self._writer is None:
                self._sink = self.folder.fs.open_output_stream(
                    self.folder.sub(DIR, self.name + STREAM))
                self._writer = pa.ipc.new_stream(self._sink, results.schema)
                self._schema = results.schema
            self._writer.write_table(results if results.schema == self._schema
                                     else results.cast(self._schema))
            self._sink.flush()
        else:
            buf = pa.BufferOutputStream()
            with pa.ipc.new_stream(buf, results.schema) as w:
                w.write_table(results)
            self._segments += 1
            self.folder.write_bytes(self.folder.sub(DIR),
                                    f"{self.name}-{self._segments:06d}{STREAM}",
                                    buf.getvalue().to_pybytes())

    def snapshot(self, in_flight: dict[str, int], unrecovered_micro_usd: int) -> None:
        """Record the calls in flight now (request id -> estimated cost in micro-dollars),
        and this actor's running total of calls paid but unusable."""
        self.folder.write_json(f"{DIR}/{self.name}{SNAPSHOT}", {
            "model": self.model, "in_flight": in_flight,
            "unrecovered_micro_usd": unrecovered_micro_usd})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


@dataclass
class Recovered:
    """What the journals of earlier attempts hold."""

    rows: pa.Table  # journalled results rows, one per request id (the last written wins)
    in_flight: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (model, micro)
    unrecovered_micro_usd: dict[str, int] = field(default_factory=dict)  # model -> micro

    def settle(self, answered: pa.Array) -> tuple[pa.Table, dict[str, int]]:
        """What to do with it, given the request ids already committed as ``answered``: the
        journalled ``ok`` rows to commit (those not among them), and what was paid and never
        got back, per model (answers that could not be used, and the calls in flight at the
        last snapshot that no commit or journal answers)."""
        rows = self.rows.filter(pc.and_(pc.equal(self.rows.column("status"), "ok"),
                                        pc.invert(pc.is_in(self.rows.column("request_id"),
                                                           value_set=answered))))
        done = pa.concat_arrays([answered, rows.column("request_id").combine_chunks()])
        lost = dict(self.unrecovered_micro_usd)
        if self.in_flight:
            ids = pa.array(list(self.in_flight), pa.string())
            for rid in ids.filter(pc.invert(pc.is_in(ids, value_set=done))).to_pylist():
                model, micro = self.in_flight[rid]
                lost[model] = lost.get(model, 0) + micro
        return rows, lost


def read(folder: RunFolder) -> Recovered:
    """Every journal in the run folder (nothing when there is none)."""
    tables: list[pa.Table] = []
    found: Recovered = Recovered(schemas.RESULTS.empty_table())
    directory = folder.sub(DIR)
    for path in folder.shards(directory, suffix=STREAM):
        tables.append(_read_stream(folder.fs, path))
    for path in folder.shards(directory, suffix=SNAPSHOT):
        with contextlib.suppress(OSError, ValueError, KeyError):
            with folder.fs.open_input_stream(path) as f:
                doc = json.loads(bytes(f.read()))
            model = str(doc["model"])
            for rid, micro in doc.get("in_flight", {}).items():
                found.in_flight[rid] = (model, int(micro))
            found.unrecovered_micro_usd[model] = (found.unrecovered_micro_usd.get(model, 0)
                                                  + int(doc.get("unrecovered_micro_usd", 0)))
    tables = [t for t in tables if t.num_rows]
    if tables:
        found.rows = _latest(pa.concat_tables(tables))
    return found


def wait_quiet(folder: RunFolder, *, quiet_s: float, max_wait_s: float,
               clock: Callable[[], float] = time.time,
               sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until no journal has been written for ``quiet_s`` (at most ``max_wait_s``);
    return the seconds waited.

    The dispatch actors of a driver that was just killed live on for a while: they finish the
    calls they hold (and stop sending new ones once the driver has been silent for a few
    seconds), journalling the answers. A resume that read the journals before they went quiet
    would miss those answers and pay for them again."""
    waited = 0.0
    while waited < max_wait_s:
        infos = [i for i in folder.fs.get_file_info(pafs.FileSelector(
            folder.sub(DIR), allow_not_found=True)) if i.type == pafs.FileType.File]
        newest = max((i.mtime.timestamp() for i in infos if i.mtime is not None), default=None)
        if newest is None:
            break
        left = quiet_s - (clock() - newest)
        if left <= 0:
            break
        step = min(left, max_wait_s - waited)
        sleep(step)
        waited += step
    return waited


def clear(folder: RunFolder) -> None:
    """Delete every journal: their rows are committed."""
    folder.remove(DIR)


def _latest(rows: pa.Table) -> pa.Table:
    """One row per request id: the one that finished last (a row journalled twice, by two
    attempts at it, keeps its latest answer)."""
    if rows.num_rows < 2:
        return rows
    ordered = rows.take(pc.sort_indices(rows, sort_keys=[("request_id", "ascending"),
                                                         ("finished_at", "ascending")]))
    ids = ordered.column("request_id").combine_chunks()
    last = pa.concat_arrays([pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1)),
                             pa.array([True])])
    return ordered.filter(last)


def _read_stream(fs: pafs.FileSystem, path: str) -> pa.Table:
    batches: list[pa.RecordBatch] = []
    schema = schemas.RESULTS  # for a stream torn before its schema: no rows
    try:
        with fs.open_input_stream(path) as f, pa.ipc.open_stream(f) as reader:
            schema = reader.schema
            while True:
                batches.append(reader.read_next_batch())
    except StopIteration:
        pass
    except (OSError, pa.ArrowInvalid):
        pass  # a torn last message (the writer was killed mid-write), or an empty file
    return pa.Table.from_batches(batches, schema=schema)
