"""The batch tier: a model's routed rows sent through the provider's batch API, at its batch
price, with every submission in a ledger so that no row is lost and none is paid twice.

A model with ``tier = "batch"`` is not called row by row. Its dispatch actor runs one
:class:`BatchTier`, which:

1. **writes** the rows to send into request files of at most the provider's lines, bytes and
   queued tokens (``batch_queue_tokens``). Each file is first committed to the run folder as
   its routed rows (the *ledger*: ``RUN/batches/MODEL/NNNNN.rows.parquet``), and only then
   rendered to the provider's JSONL, request by request exactly as the sync path would send
   them (:meth:`ModelDispatcher.requests`);
2. **submits** each file: upload (OpenAI), then a ``creating`` record, the create call, and a
   ``created`` record with the batch id. A file waits while the model's unfinished batches
   hold ``batch_queue_tokens``; a batch the provider fails for a full queue is recorded
   ``refused`` and submitted again later, never counted as a failure;
3. **polls** each batch with backoff, and when it has ended **reads** its results: answers
   become result rows billed at the batch price (parsed against ``[task.output]`` and taken up
   the escalation ladder like sync answers); an errored line is retried in a later batch while
   ``max_attempts`` allows (a transient error) or becomes a ``failed`` row with the provider's
   error type and message; an expired or cancelled line goes into a later batch;
4. at the **deadline** (``[dispatch] deadline``) cancels what is still running, keeps every
   line those batches completed, and sends only the rest through the sync path at full price.

Never paid twice. The ledger is write-once files, so a crash anywhere leaves it readable. On
resume, every file in it is accounted for before anything new is written: a file with a batch
is polled and its results read again (the provider keeps them; a row already committed ``ok``
is skipped), a file with a ``creating`` record but no ``created`` one is looked for at the
provider (OpenAI: by the batch's ``metadata``, which names the run, the model and the file;
Anthropic, whose batches have no metadata: among the batches created since that record, one
with the file's number of requests that no ledger entry claims, confirmed by its results'
custom ids once it has ended), and only rows in no file at all are written anew. Custom ids
(``TAG-FILE-LINE``, TAG from the run and the model) are never reused: a row sent again goes in
a new file under a new id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute.errors import (
    Abandoned,
    AuthError,
    DispatchError,
    RateLimited,
    TerminalDispatchError,
    TransientDispatchError,
)
from batchroute.stages import source
from batchroute.stages.dispatch.batches import (
    CANCELED,
    ERRORED,
    EXPIRED,
    SUCCEEDED,
    WIRES,
    BatchState,
    BatchWire,
    LineOutcome,
)
from batchroute.stages.dispatch.dispatcher import ModelDispatcher, _CallOutcome
from batchroute.stages.sink import RunFolder

log = logging.getLogger(__name__)
LEDGER = "batches"
ATTEMPT = "batch_attempt"  # a rows file's extra column: the batch attempts so far
POLL_MIN_S = 0.5
POLL_MAX_S = 30.0
# A file is closed before its estimated bytes reach this share of the provider's cap (the
# estimate is the request's text; the JSON around it is a few hundred bytes more).
BYTES_HEADROOM = 0.9
LINE_OVERHEAD_BYTES = 400
# Look for a batch lost between create and its record among those created this long before
# the record of the attempt (providers' clocks differ from ours).
FIND_MARGIN_S = 600.0
RETRYABLE_STATUS = frozenset({408, 409, 429})
# A file refused this often for a full queue while none of the run's batches was queued can
# never fit (it alone is over the provider's limit): its rows fail, naming the setting.
MAX_LONE_REFUSALS = 5

Emit = Callable[[pa.Table], Awaitable[None]]
# What a request is built from (ModelDispatcher.requests).
REQUEST_COLUMNS = ("prompt", "messages", "temperature", "est_input_tokens", "est_output_tokens")


@dataclass
class _File:
    """One request file of the ledger and what became of it."""

    n: int
    lines: int
    est_tokens: int
    creates: int = 0  # create attempts recorded (``creating``)
    creating_at: float | None = None  # the last attempt's record, if it has no batch yet
    batch_id: str | None = None
    adopted: bool = False  # found at the provider after a crash, not yet confirmed ours
    lost_at: float = 0.0  # when the create whose outcome is unknown was recorded
    done: bool = False
    submit_after: float = 0.0
    refusals: int = 0  # refused for a full queue while none of ours was queued


@dataclass
class BatchStats:
    files: int = 0
    lines_submitted: int = 0
    succeeded: int = 0
    errored: int = 0
    resubmitted: int = 0
    refused_for_queue: int = 0
    recovered_batches: int = 0
    deadline: str | None = None
    deadline_passed: bool = False
    sent_sync_after_deadline: int = 0
    # Seconds spent writing, uploading and creating files, and reading results into rows.
    submit_s: float = 0.0
    read_s: float = 0.0

    def summary(self, live: dict[str, str]) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for status in live.values():
            by_status[status] = by_status.get(status, 0) + 1
        return {"files": self.files, "lines_submitted": self.lines_submitted,
                "succeeded": self.succeeded, "errored": self.errored,
                "resubmitted": self.resubmitted, "refused_for_queue": self.refused_for_queue,
                "recovered_batches": self.recovered_batches, "batches_by_status": by_status,
                "deadline": self.deadline, "deadline_passed": self.deadline_passed,
                "sent_sync_after_deadline": self.sent_sync_after_deadline,
                "submit_s": round(self.submit_s, 3), "read_s": round(self.read_s, 3)}


class Ledger:
    """``RUN/batches/MODEL/``: each file's rows (``NNNNN.rows.parquet``) and one small JSON
    record per step of each create attempt (``NNNNN.K.creating.json``, ``.created.json``,
    ``.refused.json``). Everything is written once, atomically, and never changed."""

    def __init__(self, folder: RunFolder, model: str) -> None:
        self.folder = folder
        self.dir = folder.sub(LEDGER, urllib.parse.quote(model, safe=""))

    def rows_path(self, n: int) -> str:
        return f"{self.dir}/{n:05d}.rows.parquet"

    def write_rows(self, n: int, rows: pa.Table) -> None:
        self.folder.write_table(self.dir, f"{n:05d}.rows.parquet", rows)

    def read_rows(self, n: int, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.rows_path(n), columns=columns, filesystem=self.folder.fs)

    def record(self, n: int, k: int, step: str, doc: dict[str, Any]) -> None:
        self.folder.write_bytes(self.dir, f"{n:05d}.{k}.{step}.json",
                                json.dumps(doc).encode())

    def load(self) -> tuple[dict[int, _File], dict[tuple[int, int, str], dict[str, Any]]]:
        """The files, and every record by (file, attempt, step)."""
        files: dict[int, _File] = {}
        records: dict[tuple[int, int, str], dict[str, Any]] = {}
        for path in self.folder.shards(self.dir):
            name = path.rpartition("/")[2]
            if name.endswith(".rows.parquet"):
                n = int(name.split(".")[0])
                meta = pq.read_metadata(path, filesystem=self.folder.fs)
                schema_meta = meta.schema.to_arrow_schema().metadata or {}
                files[n] = _File(n, meta.num_rows,
                                 int(schema_meta.get(b"est_tokens", b"0") or 0))
            elif name.endswith(".json"):
                n_, k, step, _ = name.split(".")
                with self.folder.fs.open_input_stream(path) as f:
                    records[(int(n_), int(k), step)] = json.loads(f.read())
        return files, records


class BatchTier:
    """One model's batch-tier dispatch, inside its dispatch actor (see the module doc).

    Seams: ``client`` (the HTTP transport), ``sleep`` and ``now`` (the clock, seconds since the
    epoch), ``scratch`` (a local folder for the request files while they are sent) and
    ``max_lines`` (a smaller file than the provider's, for tests and benchmarks)."""

    def __init__(self, dispatcher: ModelDispatcher, folder: RunFolder, *,
                 client: httpx.AsyncClient, answered: pa.Array | None = None,
                 deadline: datetime | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 now: Callable[[], float] = time.time, scratch: Path | None = None,
                 max_lines: int | None = None) -> None:
        self.d = dispatcher
        self.model = dispatcher.model
        self.folder = folder
        provider = dispatcher._provider
        self.wire: BatchWire = WIRES[self.model.provider](
            provider, client, max_lines=max_lines or self.model.batch_max_lines or None)
        self.ledger = Ledger(folder, self.model.name)
        self.tag = hashlib.blake2b(f"{folder.run_id}/{self.model.name}".encode(),
                                   digest_size=5).hexdigest()
        self.answered = answered if answered is not None else pa.array([], pa.string())
        self.deadline = deadline
        self._sleep = sleep
        self._now = now
        self._scratch = scratch
        self.stats = BatchStats(deadline=deadline.isoformat() if deadline else None)
        self.files: dict[int, _File] = {}
        self._live: dict[str, str] = {}  # batch id -> its last status
        self._superseded: dict[int, set[str]] = {}  # file -> its rows sent again later
        self._next = 0
        self._cancelled = False
        self._known: set[str] = set()  # every batch id the ledger holds or this run made
        self._ledger_ids: list[pa.ChunkedArray] = []  # each ledger file's request ids, at start

    # -- the run ---------------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        """Send every routed row of the model not ``answered`` yet; ``emit`` each group of
        result rows as it is ready. Returns when every row has its result."""
        own = self._scratch is None
        self._scratch = self._scratch or Path(tempfile.mkdtemp(prefix="batchroute-batches-"))
        try:
            await self._recover()
            # Long stretches of Python (a file is 50,000 requests) run in a thread, so the
            # actor's event loop still hears the driver's heartbeat meanwhile.
            await asyncio.to_thread(self._write_pending, self._unsent())
            poll = POLL_MIN_S
            while any(not f.done for f in self.files.values()):
                alive = self.d._alive
                if alive is not None and not alive():
                    # The run that asked is gone: what is submitted stays in the ledger,
                    # and its resume picks it up. Never a normal end: rows are unfinished.
                    raise Abandoned(f"{self.model.name}: the batch tier stopped: the run "
                                    "that asked is gone (resume it to finish)")
                if self._past_deadline() and not self._cancelled:
                    await self._cancel_all()
                progressed = await self._submit_ready(emit)
                progressed |= await self._poll(emit)
                poll = POLL_MIN_S if progressed else min(POLL_MAX_S, poll * 1.5)
                if any(not f.done for f in self.files.values()):
                    await self._sleep(poll)
        finally:
            if own:
                shutil.rmtree(self._scratch, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        return self.stats.summary(self._live)

    # -- recovering the ledger -------------------------------------------------------------

    async def _recover(self) -> None:
        files, records = self.ledger.load()
        self.files = files
        self._next = max(files, default=-1) + 1
        if not files:
            return
        # A row sent again lives in its latest file; earlier files leave it alone.
        ids = [self.ledger.read_rows(n, ["request_id"]).column("request_id")
               for n in sorted(files)]
        tagged = pa.table({"request_id": pa.chunked_array(ids, pa.string()),
                           "n": pa.array([n for n, col in zip(sorted(files), ids, strict=True)
                                          for _ in range(len(col))], pa.int64())})
        latest = tagged.group_by("request_id").aggregate([("n", "max"), ("n", "count")])
        moved = latest.filter(pc.greater(latest.column("n_count"), 1))
        if moved.num_rows:
            again = tagged.filter(pc.is_in(tagged.column("request_id"),
                                           value_set=moved.column("request_id")))
            last = dict(zip(moved.column("request_id").to_pylist(),
                            moved.column("n_max").to_pylist(), strict=True))
            for rid, n in zip(again.column("request_id").to_pylist(),
                              again.column("n").to_pylist(), strict=True):
                if n != last[rid]:
                    self._superseded.setdefault(n, set()).add(rid)
        self._known = {r["batch_id"] for (_, _, step), r in records.items()
                       if step == "created"}
        self._ledger_ids = ids
        for (n, f), col in zip(sorted(files.items()), ids, strict=True):
            if pc.all(pc.is_in(col, value_set=self.answered)).as_py():
                f.done = True  # every row is committed ok
                continue
            attempts = sorted({k for (m, k, _) in records if m == n})
            if not attempts:
                continue  # written, never created: submitted below
            k = attempts[-1]
            f.creates = k + 1
            if (n, k, "created") in records and (n, k, "refused") not in records:
                f.batch_id = records[(n, k, "created")]["batch_id"]
                f.adopted = bool(records[(n, k, "created")].get("adopted"))
            elif (n, k, "creating") in records and (n, k, "refused") not in records:
                await self._find(f, k, float(records[(n, k, "creating")]["at"]))
            if f.batch_id:
                self._live[f.batch_id] = "recovered"

    async def _find(self, f: _File, k: int, at: float) -> None:
        """A create whose outcome was never recorded: the batch it may have made."""
        try:
            found = await self.wire.find(self._metadata(f.n, k), at - FIND_MARGIN_S)
        except DispatchError as exc:
            log.warning("%s: looking for the batch of file %d failed (%s); it is looked for "
                        "again", self.model.name, f.n, exc)
            f.creating_at = at
            return
        mine = [b for b in found if b.id not in self._known and (
            self.model.provider == "openai" or b.total == f.lines)]
        if mine:
            batch = mine[-1]  # the oldest candidate: the first create after the record
            adopted = self.model.provider != "openai"
            self.ledger.record(f.n, k, "created", {"batch_id": batch.id, "adopted": adopted,
                                                   "found": True})
            f.batch_id, f.adopted, f.lost_at = batch.id, adopted, at
            self._known.add(batch.id)
            self.stats.recovered_batches += 1
            log.info("%s: file %d's batch %s, created before the interruption, was found at "
                     "the provider and is not sent again", self.model.name, f.n, batch.id)

    def _metadata(self, n: int, k: int) -> dict[str, str]:
        return {"batchroute_run": self.folder.run_id[:512], "batchroute_model":
                self.model.name[:512], "batchroute_file": f"{self.tag}-{n}-{k}"}

    # -- writing files ---------------------------------------------------------------------

    def _unsent(self) -> Iterator[pa.Table]:
        """The model's routed rows that are neither answered nor in any ledger file."""
        inside = self._ledger_ids  # read by _recover
        skip = pa.concat_arrays([self.answered.cast(pa.string()), *(
            c.combine_chunks() for c in inside)]) if inside else self.answered
        for path in self.folder.shards(self.folder.routed_dir(self.model.name)):
            for batch in source.iter_parquet(self.folder.fs, path, 65_536):
                table = pa.Table.from_batches([batch])
                if len(skip):
                    table = table.filter(pc.invert(pc.is_in(table.column("request_id"),
                                                            value_set=skip)))
                if table.num_rows:
                    yield table

    def _write_pending(self, tables: Iterator[pa.Table], attempt: int | None = None) -> None:
        """Commit ``tables`` (routed rows, with their batch attempts when sent before) to the
        ledger as request files within the provider's caps."""
        cap_lines = self.wire.max_lines
        cap_bytes = self.wire.max_bytes * BYTES_HEADROOM
        cap_tokens = self.model.batch_queue_tokens or None
        parts: list[pa.Table] = []
        lines = size = tokens = 0
        for table in tables:
            if ATTEMPT not in table.column_names:
                table = table.append_column(ATTEMPT, pa.array(
                    [attempt or 0] * table.num_rows, pa.int32()))
            row_bytes = pc.add(pc.fill_null(pc.binary_length(
                table.column("prompt").cast(pa.large_string())), 0), LINE_OVERHEAD_BYTES)
            row_tokens = pc.add(table.column("est_input_tokens"),
                                table.column("est_output_tokens"))
            b, t = row_bytes.to_pylist(), row_tokens.to_pylist()
            start = 0
            for i in range(table.num_rows):
                full = lines >= cap_lines or size + b[i] > cap_bytes or (
                    cap_tokens is not None and tokens + t[i] > cap_tokens)
                if full and lines:
                    parts.append(table.slice(start, i - start))
                    self._commit_file(pa.concat_tables(parts), tokens)
                    parts, lines, size, tokens, start = [], 0, 0, 0, i
                lines, size, tokens = lines + 1, size + b[i], tokens + t[i]
            parts.append(table.slice(start))
        if lines:
            self._commit_file(pa.concat_tables(parts), tokens)

    def _commit_file(self, rows: pa.Table, est_tokens: int) -> None:
        n = self._next
        self._next += 1
        meta = dict(rows.schema.metadata or {})
        meta[b"est_tokens"] = str(est_tokens).encode()
        self.ledger.write_rows(n, rows.replace_schema_metadata(meta))
        self.files[n] = _File(n, rows.num_rows, est_tokens)
        self.stats.files += 1

    # -- submitting ------------------------------------------------------------------------

    def _queued_tokens(self) -> int:
        return sum(f.est_tokens for f in self.files.values()
                   if f.batch_id is not None and not f.done)

    async def _submit_ready(self, emit: Emit) -> bool:
        progressed = False
        for f in sorted(self.files.values(), key=lambda f: f.n):
            if f.done or f.batch_id is not None:
                continue
            if f.creating_at is not None:
                # A create whose outcome is unknown: look for it before creating again (not
                # found: created again next turn).
                at, f.creating_at = f.creating_at, None
                await self._find(f, f.creates - 1, at)
                continue
            if self._past_deadline():
                await self._send_sync(f, self.ledger.read_rows(f.n), emit)
                progressed = True
                continue
            if self._now() < f.submit_after:
                continue
            cap = self.model.batch_queue_tokens
            if cap and self._queued_tokens() + f.est_tokens > cap and self._queued_tokens():
                continue  # the provider's queue is full: after earlier batches finish
            t0 = time.perf_counter()
            progressed |= await self._create(f, emit)
            self.stats.submit_s += time.perf_counter() - t0
        return progressed

    async def _create(self, f: _File, emit: Emit) -> bool:
        rows = self.ledger.read_rows(f.n, list(REQUEST_COLUMNS))
        k = f.creates
        assert self._scratch is not None
        lines = ((self._custom_id(f.n, i), req, tokens)
                 for i, (req, tokens) in enumerate(self.d.requests(rows)))
        stem = f"{self.tag}-{f.n}-{k}"
        files = await asyncio.to_thread(
            lambda: list(self.wire.write_files(lines, self._scratch or Path("."), stem)))
        try:
            if len(files) != 1:
                raise TerminalDispatchError(
                    f"file {f.n}: its requests do not fit one batch file "
                    f"({len(files)} files): the size estimate was too low")
            batch_file = files[0]
            file_id = await self.wire.upload(batch_file)
            self.ledger.record(f.n, k, "creating", {"at": self._now()})
            f.creates = k + 1
            try:
                state = await self.wire.create(batch_file, file_id, self._metadata(f.n, k))
            except (RateLimited, AuthError, TerminalDispatchError):
                raise
            except (TransientDispatchError, httpx.HTTPError) as exc:
                # The batch may exist: look for it next turn before creating again.
                log.warning("%s: creating the batch of file %d: %s; looking for it before "
                            "trying again", self.model.name, f.n, exc)
                f.creating_at = self._now()
                return False
            self.ledger.record(f.n, k, "created", {"batch_id": state.id})
            self._known.add(state.id)
            f.batch_id = state.id
            self._live[state.id] = state.status
            self.stats.lines_submitted += f.lines
            return True
        except RateLimited as exc:  # Anthropic's full queue, or its create limits
            f.submit_after = self._now() + (exc.retry_after_s or POLL_MAX_S)
            self.stats.refused_for_queue += 1
            return False
        except (AuthError, TerminalDispatchError) as exc:
            await self._fail_rows(f, self.ledger.read_rows(f.n), exc, emit)
            return True
        finally:
            for bf in files:
                with contextlib.suppress(OSError):
                    bf.path.unlink()

    def _custom_id(self, n: int, i: int) -> str:
        return f"{self.tag}-{n}-{i}"

    # -- polling and results -----------------------------------------------------------------

    async def _poll(self, emit: Emit) -> bool:
        progressed = False
        for f in sorted(self.files.values(), key=lambda f: f.n):
            if f.done or f.batch_id is None:
                continue
            try:
                state = await self.wire.retrieve(f.batch_id)
            except DispatchError as exc:
                log.warning("%s: polling batch %s: %s", self.model.name, f.batch_id, exc)
                continue
            self._live[f.batch_id] = state.status
            if not state.ended:
                continue
            if state.queue_full:  # OpenAI: the model's queue of enqueued tokens was full
                self.ledger.record(f.n, f.creates - 1, "refused", {"batch_id": state.id})
                self._live.pop(state.id, None)
                f.batch_id = None
                f.submit_after = self._now() + POLL_MIN_S
                self.stats.refused_for_queue += 1
                if not self._queued_tokens():
                    f.refusals += 1
                if f.refusals >= MAX_LONE_REFUSALS:
                    await self._fail_rows(f, self.ledger.read_rows(f.n), TerminalDispatchError(
                        f"a batch of {f.est_tokens} estimated tokens was refused for "
                        f"{self.model.name}'s enqueued-token limit {f.refusals} times with "
                        "none of this run's batches queued: set models."
                        f"{self.model.name}.batch_queue_tokens to the provider's limit "
                        f"({state.failed_reason})"), emit)
                    progressed = True
                continue
            t0 = time.perf_counter()
            await self._read(f, state, emit)
            self.stats.read_s += time.perf_counter() - t0
            progressed = True
        return progressed

    async def _read(self, f: _File, state: BatchState, emit: Emit) -> None:
        outcomes: dict[str, LineOutcome] = {}
        try:
            async with contextlib.aclosing(self.wire.results(state, self.d._schema)) as lines:
                async for line in lines:
                    outcomes[line.custom_id] = line
        except DispatchError as exc:
            log.warning("%s: reading the results of batch %s: %s; read again next turn",
                        self.model.name, state.id, exc)
            return
        prefix = f"{self.tag}-{f.n}-"
        if f.adopted:
            if outcomes and not any(c.startswith(prefix) for c in outcomes):
                # A candidate found after a crash that was someone else's batch.
                log.info("%s: batch %s is not file %d's; the file is created again",
                         self.model.name, state.id, f.n)
                self.ledger.record(f.n, f.creates - 1, "refused", {
                    "batch_id": state.id, "not_ours": True})
                self._live.pop(state.id, None)
                # Ours may be another batch made since: look again, as a new attempt whose
                # create time is the lost one's (the rejected batch is known now).
                self.ledger.record(f.n, f.creates, "creating", {"at": f.lost_at})
                f.creates += 1
                f.batch_id, f.adopted, f.creating_at = None, False, f.lost_at
                return
            f.adopted = False
        rows = self.ledger.read_rows(f.n)
        await self._settle(f, rows, outcomes, emit)
        f.done = True
        self._live[state.id] = state.status

    async def _settle(self, f: _File, rows: pa.Table, outcomes: dict[str, LineOutcome],
                      emit: Emit) -> None:
        """Result rows for a finished file's lines; its unfinished lines into a new file."""
        ids = rows.column("request_id")
        skip = pc.is_in(ids, value_set=self.answered).to_pylist()
        gone = self._superseded.get(f.n, set())
        attempts = rows.column(ATTEMPT).to_pylist()
        finished: list[int] = []
        results: list[_CallOutcome] = []
        again: list[int] = []
        retried: list[int] = []
        for i, rid in enumerate(ids.to_pylist()):
            if skip[i] or rid in gone:
                continue
            line = outcomes.get(self._custom_id(f.n, i))
            tried = attempts[i] + 1
            if line is None or line.kind in (EXPIRED, CANCELED):
                again.append(i)  # never ran: not an attempt
                continue
            if line.kind == SUCCEEDED:
                self.stats.succeeded += 1
                finished.append(i)
                results.append(self.d.batch_outcome(line.answer, None, tried))
                continue
            self.stats.errored += 1
            assert line.kind == ERRORED
            error = _line_error(line)
            if isinstance(error, TransientDispatchError) and tried < self.d.policy.max_attempts:
                retried.append(i)
                continue
            finished.append(i)
            results.append(self.d.batch_outcome(None, error, tried))
        if finished:
            routed = rows.drop_columns([ATTEMPT]).take(pa.array(finished, pa.int64()))
            await emit(await self.d.settle(routed, results))
        if again or retried:
            sub = rows.take(pa.array(again + retried, pa.int64()))
            bumped = pc.add(sub.column(ATTEMPT), pa.array(
                [0] * len(again) + [1] * len(retried), pa.int32()))
            sub = sub.set_column(sub.schema.get_field_index(ATTEMPT), ATTEMPT, bumped)
            self.stats.resubmitted += sub.num_rows
            if self._past_deadline():
                await self._send_sync(None, sub, emit)
            else:
                await asyncio.to_thread(self._write_pending, iter([sub]))

    async def _fail_rows(self, f: _File, rows: pa.Table, error: DispatchError,
                         emit: Emit) -> None:
        keep = pc.invert(pc.is_in(rows.column("request_id"), value_set=self.answered))
        rows = rows.filter(keep).drop_columns([ATTEMPT])
        if rows.num_rows:
            outcomes = [self.d.batch_outcome(None, error, 0) for _ in range(rows.num_rows)]
            await emit(await self.d.settle(rows, outcomes))
        f.done = True

    # -- the deadline ------------------------------------------------------------------------

    def _past_deadline(self) -> bool:
        return self.deadline is not None and self._now() >= self.deadline.timestamp()

    async def _cancel_all(self) -> None:
        self._cancelled = True
        self.stats.deadline_passed = True
        for f in self.files.values():
            if f.batch_id is not None and not f.done:
                try:
                    state = await self.wire.cancel(f.batch_id)
                    self._live[f.batch_id] = state.status
                except DispatchError as exc:  # it may have just ended: the poll reads it
                    log.info("%s: cancelling batch %s at the deadline: %s", self.model.name,
                             f.batch_id, exc)
        log.warning("%s: the deadline %s has passed: unfinished batches are cancelled, their "
                    "completed lines kept, and the rest sent synchronously at full price",
                    self.model.name, self.stats.deadline)

    async def _send_sync(self, f: _File | None, rows: pa.Table, emit: Emit) -> None:
        rows = rows.filter(pc.invert(pc.is_in(rows.column("request_id"),
                                              value_set=self.answered)))
        if f is not None:
            gone = self._superseded.get(f.n, set())
            if gone:
                rows = rows.filter(pc.invert(pc.is_in(rows.column("request_id"),
                                                      value_set=pa.array(sorted(gone)))))
            f.done = True
        if rows.num_rows:
            self.stats.sent_sync_after_deadline += rows.num_rows
            routed = rows.drop_columns([ATTEMPT]) if ATTEMPT in rows.column_names else rows
            await emit(await self.d.dispatch(routed))


def _line_error(line: LineOutcome) -> DispatchError:
    message = f"batch line {line.error_type or 'error'}: {line.message}"
    status = line.status_code
    transient = (status is None and line.error_type in ("server_error", "api_error",
                                                        "overloaded_error", "rate_limit_error",
                                                        "timeout"))
    if status is not None and (status in RETRYABLE_STATUS or status >= 500):
        transient = True
    if transient:
        return TransientDispatchError(message, status=status)
    return TerminalDispatchError(message, status=status)


def deadline_of(setting: str, started_at: str) -> datetime | None:
    """The run's deadline from ``[dispatch] deadline`` and the manifest's start time."""
    from batchroute.config import DispatchConfig

    started = datetime.fromisoformat(started_at) if started_at else datetime.now(UTC)
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return DispatchConfig(deadline=setting).deadline_at(started)
