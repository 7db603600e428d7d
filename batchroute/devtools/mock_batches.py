"""The providers' batch APIs on the mock provider: OpenAI's Batch API and Anthropic's Message
Batches, served by the same loopback server as the sync endpoints of
:mod:`batchroute.devtools.mock_provider`, so the batch tier can be tested and benchmarked
without a provider.

Every line of a batch is answered exactly as the sync endpoint would answer the same body: it
is parsed by the same ``_parse_call`` and answered by the server's ``_reply``, so the text, the
usage and the structured, route_decision and reasoning behaviour are the sync answer's (only
the reply ``id`` and ``created`` differ, as between two sync calls). A body the sync endpoint
refuses with a 400 gets that 400, with the same message, as its line's result.

Nothing waits and nothing runs in the background: a batch's progress is computed from the
server clock (the ``clock`` of :class:`~batchroute.devtools.mock_provider.MockProvider`, which
tests replace with a fake one) each time it is read. Epoch timestamps are that clock plus a
fixed offset taken when the server is built.

Authentication is the sync endpoints': ``Authorization: Bearer KEY`` (OpenAI) or ``x-api-key``
with a required ``anthropic-version`` header (Anthropic), checked against ``api_key`` and
``expired_keys`` (401 otherwise). A batch or file belongs to the key that created it: another
key gets 404, and lists show only its own. The limiter (rpm/tpm), the fault rates,
``x-mock-fault`` and ``latency_ms`` apply to the sync endpoints only.

Lifecycle (both wires)
----------------------
A batch created at clock time ``t`` ends at ``t + batch_delay_s``. Each line is processed at
``t + 0.9 * batch_delay_s * u``, ``u`` in [0, 1) from a BLAKE2 digest of the batch's sequence
number and the line's custom_id: deterministic, spread over the delay, so a cancel halfway
keeps about half the lines, and a custom_id resubmitted in a later batch gets a fresh draw. The
same digest picks the lines that never run (``batch_expire_share``: the batch then ends
*expired* at ``t + batch_delay_s``, those lines reported expired) and the lines answered with
an injected 500 (``batch_line_error_rate``). A line whose body ``_parse_call`` refuses always
errors with its 400.

The results are written to disk at the first read that finds the batch ended; the lines it
completed then add their usage to the ``prompt_tokens``/``completion_tokens`` totals (and
``structured``/``invalid_answers``) of ``/stats``. Writing yields to the event loop every
250 lines, so a 50,000-line batch does not stall the sync endpoints for seconds.

OpenAI (Batch API)
------------------
``POST /v1/files``
    multipart ``purpose=batch`` and ``file``: the file object ``{id: "file-...", object:
    "file", bytes, created_at, filename, purpose}``. Content goes to a temporary directory on
    disk (deleted when the server stops), never into memory; over 200 MB is a 400. Purposes
    other than ``batch`` are a 400 (the mock keeps batch files only).
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``
    The object, the bytes (input, output and error files alike), and ``{id, object: "file",
    deleted: true}`` (an input file still read by an unfinished batch stays on disk until the
    batch ends).
``POST /v1/batches``
    ``{input_file_id, endpoint: "/v1/chat/completions", completion_window: "24h",
    metadata?}`` (metadata: at most 16 pairs of strings, keys up to 64 characters, values up
    to 512) → the batch object::

        {"id": "batch_...", "object": "batch", "endpoint", "errors", "input_file_id",
         "completion_window", "status", "output_file_id", "error_file_id", "created_at",
         "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
         "expired_at", "cancelling_at", "cancelled_at",
         "request_counts": {"total", "completed", "failed"}, "metadata"}

    A bad request (unknown file: 404) is refused at once; the input file is validated as the
    batch is created. The create reply says ``validating``, as OpenAI's does; any later read
    shows the outcome. A file that fails validation gives a batch ``failed`` with ``errors:
    {"object": "list", "data": [{"code", "message", "param", "line"}]}`` (the first 10
    problems, ``line`` 1-based): ``empty_file``, ``invalid_json_line``,
    ``missing_required_parameter`` (custom_id, method, url or body), ``invalid_value`` (a
    method other than POST, a body that is not an object, a custom_id that is not a
    non-empty string), ``invalid_url`` (a url other than the batch's endpoint),
    ``duplicate_custom_id``, ``mismatched_model`` (lines naming more than one model) and
    ``too_many_requests`` (over 50,000 lines). Blank lines are skipped. Its lines are not
    received. These codes are the mock's rendering of OpenAI's (only ``token_limit_exceeded``
    below is quoted from OpenAI): a client should act on the ``failed`` status and show the
    messages, not branch on the codes.

    ``batch_queue_tokens`` N caps the enqueued tokens per model and API key: a batch costs
    the sum over its lines of prompt tokens + ``max_tokens`` (or ``max_completion_tokens``;
    ``MAX_ANSWER_TOKENS`` without either), as the sync limiter estimates a call (a line the
    sync endpoint would refuse costs nothing). If the unfinished batches of
    that model and key plus this one exceed N, the batch is ``failed`` with code
    ``token_limit_exceeded`` and OpenAI's message ("Enqueued token limit reached for MODEL in
    organization org-mock. Limit: N enqueued tokens. Please try again once some in_progress
    batches have been completed."), and its lines are not received.

    Statuses: ``validating`` (the create reply only) → ``in_progress`` (``in_progress_at`` =
    ``created_at``) → ``finalizing`` (from 90% of the delay) → ``completed`` at the delay;
    with lines that expire, ``in_progress`` → ``expired`` at the delay; ``failed`` at once
    for a refused file. ``request_counts`` grow as lines are processed; once the batch ended
    ``completed + failed == total`` (expired and cancelled lines count as failed).
``GET /v1/batches/{id}``
    The object, its progress as of now.
``POST /v1/batches/{id}/cancel``
    For a batch in_progress or finalizing: the object with ``cancelling`` (and
    ``cancelling_at``); every later read says ``cancelled`` (``cancelled_at`` =
    ``cancelling_at``). Lines processed at or before the
    cancel are in the output (or error) file, the rest in the error file with code
    ``batch_cancelled``. Cancelling a cancelled batch returns it again; one that already
    ended (completed, expired, failed) is a 409.
``GET /v1/batches?limit=&after=``
    ``{object: "list", data, first_id, last_id, has_more}``, newest first, ``limit`` 1-100
    (default 20), ``after`` a batch id (the page starts after it). Clients that lost a
    batch's id page through it and match ``metadata``.

Output file lines (the file is named by ``output_file_id``, null when empty, as OpenAI)::

    {"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id",
     "body": <the sync reply JSON>}, "error": null}

Error file lines (``error_file_id``, null when empty): ``{"id", "custom_id", "response":
{"status_code": 500 | 400, "request_id", "body": {"error": {"message", "type", "param",
"code"}}}, "error": null}`` for an errored line, or ``"response": null, "error": {"code",
"message"}`` with code ``batch_expired`` ("This request could not be executed before the
completion window expired.") or ``batch_cancelled``. Lines keep the input file's order.

Anthropic (Message Batches)
---------------------------
``POST /v1/messages/batches``
    ``{requests: [{custom_id, params}]}``: 1 to 100,000 requests, a body up to 256 MB (413
    ``request_too_large`` above), each custom_id matching ``^[a-zA-Z0-9_-]{1,64}$`` and unique
    within the batch, ``params`` an object (a 400 ``invalid_request_error`` otherwise; the
    params themselves are checked line by line as they are processed, as Anthropic does);
    models may be mixed. No enqueued-token cap. The batch object::

        {"id": "msgbatch_...", "type": "message_batch",
         "processing_status": "in_progress" | "canceling" | "ended",
         "request_counts": {"processing", "succeeded", "errored", "canceled", "expired"},
         "ended_at", "created_at", "expires_at", "cancel_initiated_at", "archived_at",
         "results_url"}

    Times are RFC 3339 UTC strings; ``results_url`` (this server's results URL) is null
    until the batch ended. Expiring lines stay ``processing`` until the delay, then count as
    ``expired``.
``GET /v1/messages/batches/{id}``, ``POST /v1/messages/batches/{id}/cancel``
    The object; a cancel answers ``canceling`` and every later read ``ended``, with the
    unprocessed lines ``canceled`` (cancelling an ended batch is a 400, a canceled one
    returns it again).
``GET /v1/messages/batches/{id}/results``
    JSONL, one line per request in the request order: ``{"custom_id", "result": {"type":
    "succeeded", "message": <the sync reply>}}``, ``{"type": "errored", "error": {"type":
    "error", "error": {"type": "invalid_request_error" | "api_error", "message"}}}``,
    ``{"type": "canceled"}`` or ``{"type": "expired"}``. Before the batch ended: 400.
``GET /v1/messages/batches?limit=&after_id=&before_id=``
    ``{data, has_more, first_id, last_id}``, newest first, ``limit`` 1-1000 (default 20).

Switches
--------
=========================  ==================================================================
``batch_delay_s``          ``--batch-delay-s S``: seconds from creation to the end (default 2)
``batch_expire_share``     ``--batch-expire-share S``: share of lines never processed
``batch_line_error_rate``  ``--batch-line-error-rate R``: share of lines answered with a 500
``batch_queue_tokens``     ``--batch-queue-tokens N``: OpenAI enqueued tokens per model and key
=========================  ==================================================================

Stats
-----
``batch_lines_received`` counts the lines accepted into batches (both wires; a refused file,
a capped or refused batch adds none), ``batch_duplicate_custom_ids`` the custom_ids received
more than once over the server's life, across batches and wires (0 for a client that never
sends a row twice), ``batches_by_status`` every batch by its current status (OpenAI statuses
and Anthropic processing statuses side by side), ``batch_by_model`` and ``batch_by_key`` the
first two per model and per API key (the key named by a short BLAKE2 digest, never itself).
custom_ids are remembered as 64-bit digests, about 100 bytes each. ``requests`` and
``by_status`` count the batch endpoints' HTTP calls like the sync ones (never lines), and the
token totals grow when a batch's results are written (above), not when ``/stats`` is read.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import math
import re
import secrets
import shutil
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

from batchroute.devtools.mock_provider import (
    Wire,
    _BadRequest,
    _error,
    _json_response,
    _MockServer,
    _parse_call,
    _presented_key,
)

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_MESSAGE_BATCH_BYTES",
    "MAX_MESSAGE_REQUESTS",
    "MAX_OPENAI_LINES",
    "BatchStore",
]

MAX_FILE_BYTES: Final = 200 * 1024 * 1024
"""OpenAI's limit for one uploaded batch input file."""
MAX_OPENAI_LINES: Final = 50_000
MAX_MESSAGE_REQUESTS: Final = 100_000
MAX_MESSAGE_BATCH_BYTES: Final = 256 * 1024 * 1024
COMPLETION_WINDOW_S: Final = 24 * 3600
OPENAI_ENDPOINT: Final = "/v1/chat/completions"

# Lines are processed within the first 90% of the delay; the rest is OpenAI's finalizing.
_PROCESSING_SHARE: Final = 0.9
_MAX_PROBLEMS: Final = 10
_METADATA_PAIRS: Final = 16
_CHUNK: Final = 1 << 20
_YIELD_EVERY: Final = 250
_CUSTOM_ID: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# A line's fate, decided when its batch is created.
_OK: Final = 0
_ERRORS: Final = 1  # batch_line_error_rate: an injected 500
_INVALID: Final = 2  # the sync endpoint would refuse the body: its 400
_EXPIRES: Final = 3  # batch_expire_share: never processed

_EXPIRED_MESSAGE: Final = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE: Final = "This request was not executed because the batch was cancelled."
_SERVER_ERROR: Final = "The server had an error while processing your request."


def _fate(seq: int, custom_id: str, parsed: bool, expire_share: float,
          error_rate: float) -> tuple[float, int]:
    """When a line is processed, as a share of the batch delay (inf: never), and its fate.

    The digest covers the batch's sequence number, so a custom_id resubmitted after it
    expired or errored gets a new draw, as a retry at a real provider would.
    """
    digest = hashlib.blake2b(f"{seq}:{custom_id}".encode(), digest_size=12).digest()
    when, expire, error = (int.from_bytes(digest[i:i + 4], "big") / 2**32 for i in (0, 4, 8))
    if expire < expire_share:
        return math.inf, _EXPIRES
    if not parsed:
        return when * _PROCESSING_SHARE, _INVALID
    return when * _PROCESSING_SHARE, _ERRORS if error < error_rate else _OK


def _id_digest(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "big")


def _key_label(key: str) -> str:
    """How stats name an API key: a short digest, so the key itself never appears."""
    if not key:
        return "no-key"
    return "key-" + hashlib.blake2b(key.encode(), digest_size=4).hexdigest()


def _rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Reading a batch's lines (pure functions: they run on a worker thread)


@dataclass(slots=True)
class _Lines:
    """What a batch keeps of its lines; the requests themselves stay on disk.

    ``digests`` and ``models`` (per line) feed the received and duplicate counters once, then
    are dropped; ``when`` is each line's share of the delay, ``fates`` its fate.
    """

    digests: array[int] = field(default_factory=lambda: array("Q"))
    models: list[str] = field(default_factory=list)
    when: array[float] = field(default_factory=lambda: array("d"))
    fates: bytearray = field(default_factory=bytearray)
    tokens: int = 0

    def add(self, seq: int, custom_id: str, model: str, body: object, wire: Wire,
            shares: tuple[float, float]) -> None:
        try:
            call = _parse_call(wire, body)
        except (ValueError, _BadRequest):  # what the sync endpoint answers with a 400
            parsed = False
        else:
            parsed = True
            self.tokens += call.token_cost
        when, fate = _fate(seq, custom_id, parsed, *shares)
        self.digests.append(_id_digest(custom_id))
        self.models.append(model)
        self.when.append(when)
        self.fates.append(fate)


class _LineProblem(Exception):
    """One input line OpenAI would refuse at validation."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def error(self, line: int | None) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": line}


def _openai_request(raw: bytes, endpoint: str) -> tuple[str, dict[str, Any]]:
    """The custom_id and body of one input line. Raises :class:`_LineProblem`."""
    try:
        line = json.loads(raw)
    except ValueError:
        line = None
    if not isinstance(line, dict):
        raise _LineProblem("invalid_json_line", "This line is not parseable as valid JSON.")
    for name in ("custom_id", "method", "url", "body"):
        if line.get(name) is None:
            raise _LineProblem("missing_required_parameter",
                               f"Missing required parameter: '{name}'.", name)
    custom_id, body = line["custom_id"], line["body"]
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineProblem("invalid_value", "Invalid value for 'custom_id': expected a "
                           "non-empty string.", "custom_id")
    if line["method"] != "POST":
        raise _LineProblem("invalid_value", f"Invalid value for 'method': {line['method']!r}. "
                           "Only POST is supported.", "method")
    if line["url"] != endpoint:
        raise _LineProblem("invalid_url", f"The URL provided for this request ({line['url']!r})"
                           f" does not match the batch endpoint {endpoint!r}.", "url")
    if not isinstance(body, dict):
        raise _LineProblem("invalid_value", "Invalid value for 'body': expected an object.",
                           "body")
    return custom_id, body


def _scan_openai(path: Path, endpoint: str, seq: int,
                 shares: tuple[float, float]) -> tuple[list[dict[str, Any]], _Lines, str]:
    """Validate an input file as OpenAI does: its problems (empty when it is accepted), its
    lines, and the one model they name."""
    problems: list[dict[str, Any]] = []
    lines = _Lines()
    ids: set[str] = set()
    model: str | None = None
    count = 0
    with path.open("rb") as source:
        for number, raw in enumerate(source, 1):
            if not raw.strip():
                continue
            count += 1
            if count > MAX_OPENAI_LINES:
                message = (f"The batch input file has more than {MAX_OPENAI_LINES:,} requests; "
                           "split it into several batches.")
                return [_LineProblem("too_many_requests", message).error(None)], _Lines(), ""
            try:
                custom_id, body = _openai_request(raw, endpoint)
                if custom_id in ids:
                    raise _LineProblem(
                        "duplicate_custom_id", f"The custom_id {custom_id!r} is a duplicate of "
                        "another request's. The custom_id must be unique within a batch.",
                        "custom_id")
                ids.add(custom_id)
                name = body.get("model")
                if isinstance(name, str) and name:
                    if model is None:
                        model = name
                    elif name != model:
                        raise _LineProblem(
                            "mismatched_model", f"The provided model {name!r} does not match "
                            f"the model of the other requests in this batch ({model!r}). All "
                            "requests in a batch must use the same model.", "body.model")
            except _LineProblem as problem:
                problems.append(problem.error(number))
                if len(problems) == _MAX_PROBLEMS:
                    break
                continue
            if not problems:  # once the file is refused its lines need no more work
                lines.add(seq, custom_id, model or "", body, "openai", shares)
    if count == 0:
        problems.append(_LineProblem("empty_file", "The batch input file is empty.").error(None))
    return problems, lines, model or ""


def _scan_messages(raw: bytes, seq: int, shares: tuple[float, float],
                   path: Path) -> tuple[str | None, _Lines]:
    """Validate an Anthropic batch body and write its requests to ``path`` (one JSON a line):
    the 400 message when it is refused, else None and its lines."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "The request body is not valid JSON.", _Lines()
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        return "requests: a non-empty list of {custom_id, params} is required", _Lines()
    if len(requests) > MAX_MESSAGE_REQUESTS:
        return (f"requests: a batch holds at most {MAX_MESSAGE_REQUESTS:,} requests, got "
                f"{len(requests):,}"), _Lines()
    ids: set[str] = set()
    for i, item in enumerate(requests):
        if not isinstance(item, dict) or not isinstance(item.get("params"), dict):
            return f"requests.{i}: expected an object with 'custom_id' and 'params'", _Lines()
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id):
            return (f"requests.{i}.custom_id: String should match pattern "
                    f"'^[a-zA-Z0-9_-]{{1,64}}$'"), _Lines()
        if custom_id in ids:
            return (f"requests.{i}.custom_id: {custom_id!r} is used by more than one request; "
                    "custom_id must be unique within a batch"), _Lines()
        ids.add(custom_id)
    lines = _Lines()
    with path.open("wb") as out:
        for item in requests:
            params = item["params"]
            model = params.get("model")
            lines.add(seq, item["custom_id"], model if isinstance(model, str) else "", params,
                      "anthropic", shares)
            out.write(json.dumps([item["custom_id"], params], separators=(",", ":")).encode())
            out.write(b"\n")
    return None, lines


def _requests(path: Path, wire: Wire) -> Iterator[tuple[str, object]]:
    """The (custom_id, body) of each line of an accepted batch, in order, as scanned."""
    with path.open("rb") as source:
        for raw in source:
            if not raw.strip():
                continue
            if wire == "openai":
                line = json.loads(raw)
                yield line["custom_id"], line["body"]
            else:
                custom_id, params = json.loads(raw)
                yield custom_id, params


# --------------------------------------------------------------------------------------------
# State


@dataclass(slots=True, eq=False)
class _File:
    id: str
    owner: str = field(repr=False)  # the API key that uploaded it
    filename: str
    purpose: str
    size: int
    created: float  # server clock
    path: Path
    readers: int = 0  # unfinished batches that still read it
    deleted: bool = False


@dataclass(slots=True, eq=False)
class _Batch:
    """One batch. Times are server-clock readings; everything shown is derived from them."""

    id: str
    wire: Wire
    owner: str = field(repr=False)
    seq: int
    created: float
    delay: float
    source: Path | None  # the requests (OpenAI: the input file), None once refused
    lines: _Lines
    total: int
    # Sorted processing times of the lines that succeed / error, for counts by bisection.
    ok_times: array[float]
    bad_times: array[float]
    expiring: bool  # some lines never run: OpenAI ends it expired
    model: str = ""  # OpenAI: the one model, for the enqueued-token cap
    input_file: _File | None = None
    input_file_id: str = ""
    endpoint: str = OPENAI_ENDPOINT
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None  # OpenAI: why it failed
    cancelled: float | None = None
    written: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    output_file: _File | None = None
    error_file: _File | None = None
    results: Path | None = None  # Anthropic

    @property
    def end(self) -> float:
        return self.created + self.delay

    @property
    def finalizing_at(self) -> float:
        return self.created + _PROCESSING_SHARE * self.delay

    @property
    def stop(self) -> float:
        """When processing stopped (or will): the cancel, else the end."""
        return self.end if self.cancelled is None else self.cancelled

    def due(self, i: int) -> float:
        """When line ``i`` is processed (inf: never); the counts bisect the same values."""
        return self.created + self.lines.when[i] * self.delay

    def ended(self, now: float) -> bool:
        return self.errors is not None or self.cancelled is not None or now >= self.end

    def processed(self, now: float) -> tuple[int, int]:
        """Lines answered / errored by ``now`` (never past the stop)."""
        at = min(now, self.stop)
        return bisect.bisect_right(self.ok_times, at), bisect.bisect_right(self.bad_times, at)


# --------------------------------------------------------------------------------------------
# The store and its handlers


Handler = Callable[["web.Request", str], Awaitable["web.StreamResponse"]]


class BatchStore:
    """The batch endpoints of one :class:`_MockServer`: its files, batches and counters.

    Invariant: like the server's, this state is touched only by the server's event loop
    (validation runs on a worker thread but only reads a file and returns its verdict).
    """

    def __init__(self, server: _MockServer) -> None:
        self._server = server
        self._clock = server._clock
        # Epoch timestamps follow the server clock, so a fake clock moves them too.
        self._epoch = time.time() - self._clock()
        self._nonce = secrets.token_hex(4)  # ids stay unique across servers
        self._seq = 0
        self._dir: Path | None = None
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}  # in creation order
        # custom_id digest -> two bits per scope (seen, counted as duplicate); scope 0 is the
        # whole server, the others a model or a key (see _scopes).
        self._seen: dict[int, int] = {}
        self._scopes: dict[tuple[str, str], int] = {}

    def mount(self, app: web.Application) -> None:
        routes: tuple[tuple[str, Handler, Wire, str], ...] = (
            ("/v1/files", self._upload, "openai", "POST"),
            ("/v1/files/{id}", self._file, "openai", "GET"),
            ("/v1/files/{id}", self._delete_file, "openai", "DELETE"),
            ("/v1/files/{id}/content", self._file_content, "openai", "GET"),
            ("/v1/batches", self._create_openai, "openai", "POST"),
            ("/v1/batches", self._list_openai, "openai", "GET"),
            ("/v1/batches/{id}", self._get_openai, "openai", "GET"),
            ("/v1/batches/{id}/cancel", self._cancel_openai, "openai", "POST"),
            ("/v1/messages/batches", self._create_messages, "anthropic", "POST"),
            ("/v1/messages/batches", self._list_messages, "anthropic", "GET"),
            ("/v1/messages/batches/{id}", self._get_messages, "anthropic", "GET"),
            ("/v1/messages/batches/{id}/results", self._results, "anthropic", "GET"),
            ("/v1/messages/batches/{id}/cancel", self._cancel_messages, "anthropic", "POST"),
        )
        for path, handler, wire, method in routes:
            app.router.add_route(method, path, self._endpoint(wire, handler))
        app.on_cleanup.append(self._cleanup)

    def count_statuses(self) -> None:
        """Refresh ``batches_by_status`` in the server's counters (statuses follow the clock)."""
        now = self._clock()
        counts: dict[str, int] = {}
        for batch in self._batches.values():
            status = (self._openai_status(batch, now) if batch.wire == "openai"
                      else self._messages_status(batch, now))
            counts[status] = counts.get(status, 0) + 1
        self._server.counters["batches_by_status"] = counts

    async def _cleanup(self, app: web.Application) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- plumbing ----------------------------------------------------------------------------

    def _endpoint(self, wire: Wire,
                  handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Count the call as the sync endpoints count theirs, and authenticate it first."""
        counters = self._server.counters

        async def serve(request: web.Request) -> web.StreamResponse:
            counters["requests"] += 1
            response = await self._authenticated(request, wire, handler)
            key = str(response.status)
            counters["by_status"][key] = counters["by_status"].get(key, 0) + 1
            return response

        return serve

    async def _authenticated(self, request: web.Request, wire: Wire,
                             handler: Handler) -> web.StreamResponse:
        if wire == "anthropic" and "anthropic-version" not in request.headers:
            return _error(wire, 400, "anthropic-version: header is required")
        key = _presented_key(wire, request.headers)
        denial = self._server._authenticate(key)
        if denial is not None:
            return _error(wire, 401, denial,
                          code="expired_api_key" if "expired" in denial else None)
        return await handler(request, key or "")

    def _path(self, name: str) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="batchroute-mock-batches-"))
        return self._dir / name

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _epoch_s(self, clock_time: float) -> int:
        return int(self._epoch + clock_time)

    def _shares(self) -> tuple[float, float]:
        config = self._server.config
        return config.batch_expire_share, config.batch_line_error_rate

    def _find(self, batch_id: str, wire: Wire, owner: str) -> _Batch | None:
        batch = self._batches.get(batch_id)
        if batch is None or batch.wire != wire or batch.owner != owner:
            return None
        return batch

    def _register(self, owner: str, filename: str, purpose: str, path: Path, size: int) -> _File:
        file_id = f"file-mock{self._nonce}{self._next_seq():08x}"
        record = _File(id=file_id, owner=owner, filename=filename, purpose=purpose, size=size,
                       created=self._clock(), path=path)
        self._files[file_id] = record
        return record

    def _new_batch(self, wire: Wire, owner: str, seq: int, created: float, lines: _Lines,
                   source: Path | None) -> _Batch:
        prefix = "batch_mock" if wire == "openai" else "msgbatch_mock"
        batch = _Batch(id=f"{prefix}{self._nonce}{seq:08x}", wire=wire, owner=owner, seq=seq,
                       created=created, delay=self._server.config.batch_delay_s,
                       source=source, lines=lines, total=len(lines.fates),
                       ok_times=array("d"), bad_times=array("d"),
                       expiring=_EXPIRES in lines.fates)
        ok = sorted(batch.due(i) for i, fate in enumerate(lines.fates) if fate == _OK)
        bad = sorted(batch.due(i) for i, fate in enumerate(lines.fates)
                     if fate in (_ERRORS, _INVALID))
        batch.ok_times, batch.bad_times = array("d", ok), array("d", bad)
        self._batches[batch.id] = batch
        return batch

    def _receive(self, batch: _Batch) -> None:
        """Count an accepted batch's lines, and the custom_ids seen before: over the server,
        per model and per key."""
        counters = self._server.counters
        lines = batch.lines
        whole = {"batch_lines_received": 0, "batch_duplicate_custom_ids": 0}
        key = self._scope("key", _key_label(batch.owner), counters["batch_by_key"])
        models: dict[str, tuple[int, dict[str, int]]] = {}
        seen = self._seen
        for digest, name in zip(lines.digests, lines.models, strict=True):
            model = models.get(name)
            if model is None:
                model = models[name] = self._scope("model", name, counters["batch_by_model"])
            mask = seen.get(digest, 0)
            for scope, bucket in ((0, whole), model, key):
                mask = _count(mask, scope, bucket)
            seen[digest] = mask
        counters["batch_lines_received"] += whole["batch_lines_received"]
        counters["batch_duplicate_custom_ids"] += whole["batch_duplicate_custom_ids"]
        lines.digests, lines.models = array("Q"), []  # counted: no longer needed

    def _scope(self, kind: str, name: str,
               buckets: dict[str, dict[str, int]]) -> tuple[int, dict[str, int]]:
        """The bit pair of a model or key in ``_seen``, and its counters in the stats."""
        scope = self._scopes.get((kind, name))
        if scope is None:
            scope = self._scopes[kind, name] = len(self._scopes) + 1
            buckets[name] = {"batch_lines_received": 0, "batch_duplicate_custom_ids": 0}
        return scope, buckets[name]

    # -- results -----------------------------------------------------------------------------

    async def _settle(self, batch: _Batch, now: float) -> None:
        """Write the results of a batch that has ended by ``now``, once (concurrent readers
        wait). Callers show the batch as of the same ``now``, so an ended batch is never
        shown without its files."""
        if batch.written or not batch.ended(now):
            return
        async with batch.lock:
            if batch.written:
                return
            if batch.source is not None:
                await self._write(batch)
            batch.written = True

    async def _write(self, batch: _Batch) -> None:
        assert batch.source is not None
        if batch.wire == "openai":
            outputs = {"out": self._path(f"{batch.id}_output.jsonl"),
                       "err": self._path(f"{batch.id}_error.jsonl")}
        else:
            outputs = {"out": self._path(f"{batch.id}_results.jsonl")}
        with contextlib.ExitStack() as stack:
            files: dict[str, BinaryIO] = {
                name: stack.enter_context(path.open("wb")) for name, path in outputs.items()}
            for i, (custom_id, body) in enumerate(_requests(batch.source, batch.wire)):
                self._write_line(batch, i, custom_id, body, files)
                if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                    await asyncio.sleep(0)  # let the sync endpoints in (this is no wait)
        if batch.wire == "openai":
            batch.output_file = self._keep(batch, outputs["out"])
            batch.error_file = self._keep(batch, outputs["err"])
            if batch.input_file is not None:
                _release(batch.input_file)
        else:
            batch.results = outputs["out"]
            batch.source.unlink(missing_ok=True)

    def _keep(self, batch: _Batch, path: Path) -> _File | None:
        size = path.stat().st_size
        if not size:  # OpenAI gives no file id for an empty output or error file
            path.unlink()
            return None
        return self._register(batch.owner, path.name, "batch_output", path, size)

    def _write_line(self, batch: _Batch, i: int, custom_id: str, body: object,
                    files: dict[str, BinaryIO]) -> None:
        head = json.dumps({"custom_id": custom_id}, separators=(",", ":"))[:-1].encode()
        fate = batch.lines.fates[i]
        payload: bytes | None = None
        failure: tuple[int, str] | None = None
        if batch.due(i) > batch.stop:
            pass  # never processed: cancelled or expired
        elif fate == _OK:
            payload = self._answer(batch.wire, body)
        elif fate == _INVALID:
            failure = (400, _refusal(batch.wire, body))
        else:
            failure = (500, _SERVER_ERROR)
        skipped = "cancelled" if batch.cancelled is not None else "expired"
        if batch.wire == "anthropic":
            files["out"].write(head + b',"result":' + _message_result(payload, failure, skipped)
                               + b"}\n")
            return
        suffix = f"{batch.seq:06x}{i:06x}"
        request_id = f"req_mock{suffix}"
        head = f'{{"id":"batch_req_mock{self._nonce}{suffix}",'.encode() + head[1:]
        if payload is not None:
            files["out"].write(head + b',"response":{"status_code":200,"request_id":"'
                               + request_id.encode() + b'","body":' + payload
                               + b'},"error":null}\n')
            return
        tail: dict[str, Any]
        if failure is not None:
            status, message = failure
            tail = {"response": {"status_code": status, "request_id": request_id, "body": {
                "error": {"message": message, "type": "invalid_request_error" if status == 400
                          else "server_error", "param": None, "code": None}}}, "error": None}
        else:
            tail = {"response": None, "error": {"code": f"batch_{skipped}", "message":
                    _EXPIRED_MESSAGE if skipped == "expired" else _CANCELLED_MESSAGE}}
        files["err"].write(head + b"," + _compact(tail)[1:] + b"\n")

    def _answer(self, wire: Wire, body: object) -> bytes:
        """The sync endpoint's reply to ``body``, counted as a sync reply's usage is."""
        counters = self._server.counters
        call = _parse_call(wire, body)
        payload, completion_tokens, invalid = self._server._reply(call)
        counters["prompt_tokens"] += call.prompt_tokens
        counters["completion_tokens"] += completion_tokens
        if invalid is not None:
            counters["structured"] += 1
            counters["invalid_answers"] += invalid
        return payload

    # -- OpenAI files ------------------------------------------------------------------------

    async def _upload(self, request: web.Request, owner: str) -> web.StreamResponse:
        from aiohttp import BodyPartReader

        if not request.content_type.startswith("multipart/"):
            return _openai_error(400, "Uploads must be multipart/form-data with 'purpose' and "
                                 "'file'.")
        purpose: str | None = None
        stored: tuple[Path, int, str] | None = None
        reader = await request.multipart()
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file" and stored is None:
                    stored = await self._store_part(part)
                    if stored[1] > MAX_FILE_BYTES:
                        return _openai_error(400, f"File is too large: {stored[1]:,} bytes; "
                                             f"the maximum for a batch input file is "
                                             f"{MAX_FILE_BYTES:,} bytes (200 MB).", param="file")
                else:
                    await part.release()
        finally:
            if stored is not None and (stored[1] > MAX_FILE_BYTES or purpose != "batch"):
                stored[0].unlink(missing_ok=True)
        if purpose is None or stored is None:
            missing = "purpose" if purpose is None else "file"
            return _openai_error(400, f"Missing required parameter: '{missing}'.", param=missing)
        if purpose != "batch":
            return _openai_error(400, f"Invalid value for 'purpose': {purpose!r}; the mock "
                                 "provider keeps only 'batch' files.", param="purpose")
        path, size, filename = stored
        return _json_response(200, self._file_object(
            self._register(owner, filename, "batch", path, size)))

    async def _store_part(self, part: Any) -> tuple[Path, int, str]:
        """Stream an uploaded file to disk, and its size. Past the limit nothing more is
        written (the caller deletes it) but the rest is read, so the client gets its 400
        rather than a reset connection."""
        path = self._path(f"upload-{self._nonce}-{self._next_seq():08x}.jsonl")
        size = 0
        with path.open("wb") as out:
            while chunk := await part.read_chunk(_CHUNK):
                size += len(chunk)
                if size <= MAX_FILE_BYTES:
                    out.write(chunk)
        return path, size, part.filename or "upload.jsonl"

    def _file_object(self, record: _File) -> dict[str, Any]:
        return {"id": record.id, "object": "file", "bytes": record.size,
                "created_at": self._epoch_s(record.created), "filename": record.filename,
                "purpose": record.purpose}

    def _owned_file(self, request: web.Request, owner: str) -> _File | web.StreamResponse:
        file_id = request.match_info["id"]
        record = self._files.get(file_id)
        if record is None or record.owner != owner:
            return _openai_error(404, f"No such File object: {file_id}", param="id")
        return record

    async def _file(self, request: web.Request, owner: str) -> web.StreamResponse:
        record = self._owned_file(request, owner)
        return record if not isinstance(record, _File) else _json_response(
            200, self._file_object(record))

    async def _file_content(self, request: web.Request, owner: str) -> web.StreamResponse:
        from aiohttp import web

        record = self._owned_file(request, owner)
        if not isinstance(record, _File):
            return record
        return web.FileResponse(record.path, headers={"Content-Type": "application/octet-stream"})

    async def _delete_file(self, request: web.Request, owner: str) -> web.StreamResponse:
        record = self._owned_file(request, owner)
        if not isinstance(record, _File):
            return record
        del self._files[record.id]
        record.deleted = True
        if not record.readers:
            record.path.unlink(missing_ok=True)
        return _json_response(200, {"id": record.id, "object": "file", "deleted": True})

    # -- OpenAI batches ----------------------------------------------------------------------

    async def _create_openai(self, request: web.Request, owner: str) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _openai_error(400, "The request body is not valid JSON.")
        refusal = _refuse_openai_create(body)
        if refusal is not None:
            return refusal
        record = self._files.get(body["input_file_id"])
        if record is None or record.owner != owner:
            return _openai_error(404, f"No such File object: {body['input_file_id']}",
                                 param="input_file_id")
        if record.purpose != "batch":
            return _openai_error(400, f"File {record.id} has purpose {record.purpose!r}; a "
                                 "batch input file must have purpose 'batch'.",
                                 param="input_file_id")
        seq, created = self._next_seq(), self._clock()
        record.readers += 1  # a DELETE during the scan must leave the file on disk
        problems, lines, model = await asyncio.to_thread(
            _scan_openai, record.path, body["endpoint"], seq, self._shares())
        if not problems:
            problems = self._over_queue_limit(owner, model, lines.tokens)
        accepted = not problems
        batch = self._new_batch("openai", owner, seq, created, lines if accepted else _Lines(),
                                record.path if accepted else None)
        batch.model, batch.input_file_id = model, record.id
        batch.endpoint, batch.metadata = body["endpoint"], body.get("metadata")
        if accepted:
            batch.input_file = record
            self._receive(batch)
        else:
            batch.errors = problems
            _release(record)
        return _json_response(200, self._openai_object(batch, self._clock(),
                                                       status="validating"))

    def _over_queue_limit(self, owner: str, model: str, tokens: int) -> list[dict[str, Any]]:
        """The ``token_limit_exceeded`` error if ``tokens`` more would pass the cap."""
        limit = self._server.config.batch_queue_tokens
        if not limit:
            return []
        now = self._clock()
        queued = sum(other.lines.tokens for other in self._batches.values()
                     if other.wire == "openai" and other.owner == owner
                     and other.model == model and not other.ended(now))
        if queued + tokens <= limit:
            return []
        message = (f"Enqueued token limit reached for {model} in organization org-mock. "
                   f"Limit: {limit} enqueued tokens. Please try again once some in_progress "
                   "batches have been completed.")
        return [{"code": "token_limit_exceeded", "message": message, "param": None,
                 "line": None}]

    async def _get_openai(self, request: web.Request, owner: str) -> web.StreamResponse:
        batch = self._find(request.match_info["id"], "openai", owner)
        if batch is None:
            return _openai_error(404, f"No batch found with id '{request.match_info['id']}'.")
        now = self._clock()
        await self._settle(batch, now)
        return _json_response(200, self._openai_object(batch, now))

    async def _cancel_openai(self, request: web.Request, owner: str) -> web.StreamResponse:
        batch = self._find(request.match_info["id"], "openai", owner)
        if batch is None:
            return _openai_error(404, f"No batch found with id '{request.match_info['id']}'.")
        now = self._clock()
        status = self._openai_status(batch, now)
        if status == "cancelled":
            await self._settle(batch, now)
            return _json_response(200, self._openai_object(batch, now))
        if batch.ended(now):
            return _openai_error(409, f"Cannot cancel a batch with status '{status}'.")
        batch.cancelled = now
        return _json_response(200, self._openai_object(batch, now, status="cancelling"))

    async def _list_openai(self, request: web.Request, owner: str) -> web.StreamResponse:
        limit = _limit(request, 100)
        if limit is None:
            return _openai_error(400, "Invalid 'limit': expected a whole number from 1 to 100.",
                                 param="limit")
        mine = [b for b in reversed(self._batches.values())
                if b.wire == "openai" and b.owner == owner]
        after = request.query.get("after")
        if after:
            index = next((i for i, b in enumerate(mine) if b.id == after), None)
            if index is None:
                return _openai_error(404, f"No batch found with id '{after}'.", param="after")
            mine = mine[index + 1:]
        page = mine[:limit]
        now = self._clock()
        for batch in page:
            await self._settle(batch, now)
        return _json_response(200, {
            "object": "list", "data": [self._openai_object(b, now) for b in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(mine) > limit})

    def _openai_status(self, batch: _Batch, now: float) -> str:
        if batch.errors is not None:
            return "failed"
        if batch.cancelled is not None:
            return "cancelled"
        if now >= batch.end:
            return "expired" if batch.expiring else "completed"
        if not batch.expiring and now >= batch.finalizing_at:
            return "finalizing"
        return "in_progress"

    def _openai_object(self, batch: _Batch, now: float, *,
                       status: str | None = None) -> dict[str, Any]:
        """The batch object as of ``now``; ``status`` overrides the one derived from the clock
        (the create reply's ``validating``, the cancel reply's ``cancelling``)."""
        status = status or self._openai_status(batch, now)
        at = self._epoch_s
        validating = status == "validating"
        done, failed = batch.processed(now)
        if status in ("completed", "expired", "cancelled"):
            failed = batch.total - done  # expired and cancelled lines are in the error file
        finalizing = (not batch.expiring and batch.errors is None and not validating
                      and min(now, batch.stop) >= batch.finalizing_at)
        ended_as = {"completed": "completed_at", "expired": "expired_at"}.get(status)
        cancelled = None if batch.cancelled is None else at(batch.cancelled)
        return {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
            "errors": None if batch.errors is None or validating else {
                "object": "list", "data": batch.errors},
            "input_file_id": batch.input_file_id, "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file.id if batch.output_file else None,
            "error_file_id": batch.error_file.id if batch.error_file else None,
            "created_at": at(batch.created),
            "in_progress_at": None if validating or batch.errors is not None else at(
                batch.created),
            "expires_at": at(batch.created + COMPLETION_WINDOW_S),
            "finalizing_at": at(batch.finalizing_at) if finalizing else None,
            "completed_at": at(batch.end) if ended_as == "completed_at" else None,
            "failed_at": at(batch.created) if status == "failed" else None,
            "expired_at": at(batch.end) if ended_as == "expired_at" else None,
            "cancelling_at": cancelled,
            "cancelled_at": cancelled if status == "cancelled" else None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0} if validating else {
                "total": batch.total, "completed": done, "failed": failed},
            "metadata": batch.metadata,
        }

    # -- Anthropic message batches -----------------------------------------------------------

    async def _create_messages(self, request: web.Request, owner: str) -> web.StreamResponse:
        raw = await _read_capped(request, MAX_MESSAGE_BATCH_BYTES)
        if raw is None:
            return _anthropic_error(413, f"Request exceeds the maximum size of "
                                    f"{MAX_MESSAGE_BATCH_BYTES:,} bytes (256 MB) for a "
                                    "message batch.")
        seq, created = self._next_seq(), self._clock()
        path = self._path(f"msgbatch-{self._nonce}-{seq:08x}.jsonl")
        refusal, lines = await asyncio.to_thread(_scan_messages, raw, seq, self._shares(), path)
        if refusal is not None:
            return _anthropic_error(400, refusal)
        batch = self._new_batch("anthropic", owner, seq, created, lines, path)
        self._receive(batch)
        now = self._clock()
        await self._settle(batch, now)  # batch_delay_s=0 ends it at once
        return _json_response(200, self._messages_object(batch, request, now))

    async def _get_messages(self, request: web.Request, owner: str) -> web.StreamResponse:
        batch = self._find(request.match_info["id"], "anthropic", owner)
        if batch is None:
            return _anthropic_error(404, f"No message batch found with id "
                                    f"'{request.match_info['id']}'.")
        now = self._clock()
        await self._settle(batch, now)
        return _json_response(200, self._messages_object(batch, request, now))

    async def _cancel_messages(self, request: web.Request, owner: str) -> web.StreamResponse:
        batch = self._find(request.match_info["id"], "anthropic", owner)
        if batch is None:
            return _anthropic_error(404, f"No message batch found with id "
                                    f"'{request.match_info['id']}'.")
        now = self._clock()
        if batch.cancelled is None and batch.ended(now):
            return _anthropic_error(400, f"Message batch {batch.id} has already ended and "
                                    "can no longer be canceled.")
        if batch.cancelled is not None:
            await self._settle(batch, now)
            return _json_response(200, self._messages_object(batch, request, now))
        batch.cancelled = now
        return _json_response(200, self._messages_object(batch, request, now,
                                                         status="canceling"))

    async def _results(self, request: web.Request, owner: str) -> web.StreamResponse:
        from aiohttp import web

        batch = self._find(request.match_info["id"], "anthropic", owner)
        if batch is None:
            return _anthropic_error(404, f"No message batch found with id "
                                    f"'{request.match_info['id']}'.")
        await self._settle(batch, self._clock())
        if batch.results is None:
            return _anthropic_error(400, f"Message batch {batch.id} is still in progress; its "
                                    "results are available once it has ended.")
        return web.FileResponse(batch.results, headers={"Content-Type": "application/x-jsonl"})

    async def _list_messages(self, request: web.Request, owner: str) -> web.StreamResponse:
        limit = _limit(request, 1000)
        if limit is None:
            return _anthropic_error(400, "limit: expected a whole number from 1 to 1000")
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if after and before:
            return _anthropic_error(400, "after_id and before_id cannot both be given")
        mine = [b for b in reversed(self._batches.values())
                if b.wire == "anthropic" and b.owner == owner]
        cursor = after or before
        index = next((i for i, b in enumerate(mine) if b.id == cursor), None) if cursor else None
        if cursor and index is None:
            return _anthropic_error(404, f"No message batch found with id '{cursor}'.")
        if index is not None and before:  # the page just newer than the cursor
            newer = mine[:index]
            page, has_more = newer[-limit:], len(newer) > limit
        else:
            rest = mine if index is None else mine[index + 1:]
            page, has_more = rest[:limit], len(rest) > limit
        now = self._clock()
        for batch in page:
            await self._settle(batch, now)
        return _json_response(200, {
            "data": [self._messages_object(b, request, now) for b in page],
            "has_more": has_more, "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None})

    def _messages_status(self, batch: _Batch, now: float) -> str:
        return "ended" if batch.ended(now) else "in_progress"

    def _messages_object(self, batch: _Batch, request: web.Request, now: float, *,
                         status: str | None = None) -> dict[str, Any]:
        status = status or self._messages_status(batch, now)
        at = self._rfc3339
        succeeded, errored = batch.processed(now)
        canceled = expired = 0
        if status == "ended":
            rest = batch.total - succeeded - errored
            canceled, expired = (rest, 0) if batch.cancelled is not None else (0, rest)
        results_url = None
        if status == "ended":  # this server's own URL, wherever the client reached it
            results_url = f"{request.url.origin()}/v1/messages/batches/{batch.id}/results"
        return {
            "id": batch.id, "type": "message_batch", "processing_status": status,
            "request_counts": {"processing": batch.total - succeeded - errored - canceled
                               - expired, "succeeded": succeeded, "errored": errored,
                               "canceled": canceled, "expired": expired},
            "ended_at": at(batch.stop) if status == "ended" else None,
            "created_at": at(batch.created),
            "expires_at": at(batch.created + COMPLETION_WINDOW_S),
            "cancel_initiated_at": at(batch.cancelled) if batch.cancelled is not None else None,
            "archived_at": None,
            "results_url": results_url,
        }

    def _rfc3339(self, clock_time: float) -> str:
        return _rfc3339(self._epoch + clock_time)


# --------------------------------------------------------------------------------------------
# Small helpers


def _count(mask: int, scope: int, bucket: dict[str, int]) -> int:
    """Count one line in ``bucket``; ``mask`` holds two bits per scope: seen, and counted as a
    duplicate (so a custom_id received three times is one duplicate)."""
    seen, counted = 1 << (2 * scope), 1 << (2 * scope + 1)
    bucket["batch_lines_received"] += 1
    if mask & seen and not mask & counted:
        bucket["batch_duplicate_custom_ids"] += 1
        return mask | counted
    return mask | seen


def _release(record: _File) -> None:
    """One reader fewer; a file deleted meanwhile leaves the disk with its last reader."""
    record.readers -= 1
    if record.deleted and not record.readers:
        record.path.unlink(missing_ok=True)


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _refusal(wire: Wire, body: object) -> str:
    """The sync endpoint's 400 message for a body it refuses."""
    try:
        _parse_call(wire, body)
    except _BadRequest as exc:
        return str(exc)
    except ValueError:
        return "request body is not JSON"  # the sync endpoint's words for it
    raise AssertionError("the line was accepted when its batch was created")


def _message_result(payload: bytes | None, failure: tuple[int, str] | None,
                    skipped: str) -> bytes:
    """The ``result`` of an Anthropic results line."""
    if payload is not None:
        return b'{"type":"succeeded","message":' + payload + b"}"
    if failure is not None:
        status, message = failure
        return _compact({"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error" if status == 400 else "api_error",
            "message": message}}})
    return b'{"type":"canceled"}' if skipped == "cancelled" else b'{"type":"expired"}'


def _refuse_openai_create(body: object) -> web.StreamResponse | None:
    """A 400 for a create request OpenAI would refuse outright, else None."""
    if not isinstance(body, dict):
        return _openai_error(400, "The request body must be a JSON object.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(name), str):
            return _openai_error(400, f"Missing required parameter: '{name}'.", param=name)
    if body["endpoint"] != OPENAI_ENDPOINT:
        return _openai_error(400, f"Invalid value for 'endpoint': {body['endpoint']!r}; the "
                             f"mock provider serves only {OPENAI_ENDPOINT!r}.", param="endpoint")
    if body["completion_window"] != "24h":
        return _openai_error(400, f"Invalid value for 'completion_window': "
                             f"{body['completion_window']!r}. Supported values are: '24h'.",
                             param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= _METADATA_PAIRS
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in metadata.items())):
        return _openai_error(400, "Invalid 'metadata': at most 16 pairs of strings, keys up to "
                             "64 characters and values up to 512.", param="metadata")
    return None


def _limit(request: web.Request, most: int) -> int | None:
    text = request.query.get("limit", "20")
    if not text.isdigit() or not 1 <= int(text) <= most:
        return None
    return int(text)


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None if it is over ``limit`` bytes (the app's 32 MiB cap is bypassed:
    Anthropic accepts 256 MB). An oversized body is read to its end but not kept, so the
    client gets its 413 rather than a reset connection."""
    body = bytearray()
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif body:
            body = bytearray()  # over: keep reading, stop keeping
    return bytes(body) if size <= limit else None


def _openai_error(status: int, message: str, *, param: str | None = None) -> web.StreamResponse:
    return _json_response(status, {"error": {"message": message, "type": "invalid_request_error",
                                             "param": param, "code": None}})


_ANTHROPIC_ERRORS: Final = {400: "invalid_request_error", 404: "not_found_error",
                            413: "request_too_large"}


def _anthropic_error(status: int, message: str) -> web.StreamResponse:
    return _json_response(status, {"type": "error", "error": {
        "type": _ANTHROPIC_ERRORS[status], "message": message}})
