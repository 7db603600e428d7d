"""Provider batch tiers: a model's rows sent as one batch, answered within a day at half price.

Two wires, each built on the sync :class:`Provider` of its format, so that every request in a
batch is exactly the body the dispatcher would POST (``provider.body(req)``) and every answer
is read by the same ``provider.parse``:

* OpenAI's Batch API (and Azure OpenAI's): the requests are a JSONL file uploaded to
  ``/files`` (purpose ``batch``), a batch is created from the file's id, and the answers come
  back as an output file and an error file, both read from ``/files/{id}/content``.
* Anthropic's Message Batches: the create call's body carries every request itself
  (``{"requests": [...]}``), so the file written here *is* that body, streamed from disk when
  the batch is created; the answers are one JSONL document at the batch's ``results_url``.

The steps are separate calls because the caller (the batch runner) records each one in its
ledger before and after it: :meth:`BatchWire.write_files`, :meth:`~BatchWire.upload`,
:meth:`~BatchWire.create`, :meth:`~BatchWire.retrieve` (polled), :meth:`~BatchWire.results`;
:meth:`~BatchWire.cancel` and :meth:`~BatchWire.find` for stopping and resuming. Nothing here
sleeps or retries: when and how often to poll or try again is the caller's policy.

URLs come from ``provider.url``, the chat URL (base + path). OpenAI's base includes ``/v1``
(``https://api.openai.com/v1``): its batch endpoints are base + ``/files`` and ``/batches``, and
the batch lines name ``/v1/chat/completions``. An Azure deployment URL
(``https://{resource}.openai.azure.com/openai/deployments/{name}``) has them at the resource's
``/openai/files`` and ``/openai/batches``, its lines and batches name ``/chat/completions``,
and, since a batch line has no URL of its own to name the deployment by, its ``model`` is the
deployment's name (Azure's documented form: the deployment must be a batch deployment). An
``?api-version=`` on the chat URL stays on every batch URL. Anthropic's base has no ``/v1``:
its batches are at base + ``/v1/messages/batches``.

Failures of the batch endpoints raise what the dispatcher's calls raise
(:func:`~batchroute.stages.dispatch.providers.raise_for_status`): AuthError, RateLimited,
TransientDispatchError (408, 409, 5xx, dropped connections, timeouts, malformed replies) and
TerminalDispatchError, each message led by the step ("creating batch for file x.jsonl: HTTP
400: ...") and scrubbed of the API key. Mistakes of the caller's own (a request too large for
any batch file, a repeated custom id, a batch read before it ended) raise ValueError.

Nothing holds a whole file in memory: files are written line by line, uploaded and created
from disk in chunks, and results are read from the response stream line by line. That needs
a client whose transport streams: httpx's own does; the dispatcher's LeanTransport reads
every body whole (it is built for small JSON calls) and is not for these. Its timeouts
should allow for a provider that takes a while to answer a 200 MB upload.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, ClassVar
from urllib.parse import quote

import httpx

from batchroute.errors import DispatchError, TerminalDispatchError, TransientDispatchError
from batchroute.scrub import Scrubber
from batchroute.stages.dispatch.providers import (
    MAX_ERROR_CHARS,
    Answer,
    OutputSchema,
    Provider,
    Request,
    dumps,
    raise_for_status,
)

# LineOutcome.kind
SUCCEEDED, ERRORED, EXPIRED, CANCELED = "succeeded", "errored", "expired", "canceled"
# What reading a provider's document raises when it is not shaped as documented.
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


@dataclass(frozen=True)
class BatchFile:
    """One request file, complete on disk (fsynced, under its final name) before anything is
    sent. ``est_tokens`` is the sum of the caller's estimates for its lines (for a cap on the
    tokens a provider lets one queue)."""

    path: Path
    custom_ids: list[str]
    lines: int
    bytes: int
    est_tokens: int


@dataclass(frozen=True)
class BatchState:
    """A provider's batch object, normalised.

    ``status`` is the provider's own word: OpenAI's ``validating``, ``in_progress``,
    ``finalizing``, ``completed``, ``failed``, ``expired``, ``cancelling``, ``cancelled``;
    Anthropic's ``processing_status``, ``in_progress``, ``canceling``, ``ended``. ``ended``:
    nothing about the batch changes any more and its results can be read.

    ``queue_full``: OpenAI failed the batch because the model's queue of enqueued tokens was
    full (error ``token_limit_exceeded``): not the batch's fault; the caller waits for its
    other batches and submits the same file again. Anthropic refuses such a batch at create
    time with HTTP 429 (RateLimited) instead, so it is always False there.

    ``failed_reason``: an OpenAI ``failed`` batch's errors (file validation), joined.

    Counts: ``completed`` requests answered, ``failed`` requests not answered (OpenAI's
    ``request_counts``; Anthropic's succeeded, and errored + canceled + expired), ``total`` all
    of them (Anthropic's counts summed, those still processing included).
    """

    id: str
    status: str
    ended: bool
    queue_full: bool = False
    failed_reason: str = ""
    total: int = 0
    completed: int = 0
    failed: int = 0
    created_at: float = 0.0  # seconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)  # OpenAI only
    output_file_id: str | None = None  # OpenAI
    error_file_id: str | None = None  # OpenAI
    results_url: str | None = None  # Anthropic, once ended


@dataclass(frozen=True)
class LineOutcome:
    """How one request of a batch ended.

    ``kind``: ``succeeded`` (``answer`` set), ``errored`` (the provider's ``error_type`` and
    ``message``; also an answer that could not be read, ``malformed_response``, or a result
    line that could not, ``malformed_result``), ``expired`` (the batch's window closed before
    it ran) or ``canceled`` (the batch was cancelled before it ran). ``status_code`` is the
    HTTP status OpenAI gives each request; Anthropic gives none.
    """

    custom_id: str
    kind: str
    answer: Answer | None = None
    error_type: str = ""
    message: str = ""  # scrubbed of the key, at most MAX_ERROR_CHARS
    status_code: int | None = None


class BatchWire:
    """One provider's batch endpoints, over ``provider``'s format, headers and key, through
    ``client`` (the transport seam). ``max_lines`` and ``max_bytes`` default to the
    provider's documented limits per batch."""

    MAX_LINES: ClassVar[int]
    MAX_BYTES: ClassVar[int]
    suffix: ClassVar[str]
    page_size: ClassVar[int]
    # A file is head + lines joined by sep + tail: the bytes of each count against max_bytes.
    _head: ClassVar[bytes] = b""
    _sep: ClassVar[bytes] = b""
    _tail: ClassVar[bytes] = b""
    chunk_bytes = 1 << 20  # read from disk this much at a time when sending a file

    def __init__(self, provider: Provider, client: httpx.AsyncClient, *,
                 max_lines: int | None = None, max_bytes: int | None = None) -> None:
        self.provider = provider
        self.max_lines = max_lines or self.MAX_LINES
        self.max_bytes = max_bytes or self.MAX_BYTES
        self._client = client
        self._headers = provider.headers()
        # Providers may quote a refused key back: every text of theirs kept here goes
        # through it first.
        self._scrubber = Scrubber(provider._api_key)
        self._urls(httpx.URL(provider.url))

    def _urls(self, chat: httpx.URL) -> None:
        raise NotImplementedError

    # --- request files ---

    def write_files(self, lines: Iterable[tuple[str, Request, int]], folder: Path, stem: str,
                    *, max_tokens: int | None = None) -> Iterator[BatchFile]:
        """Write ``(custom_id, request, estimated tokens)`` lines into ``folder`` as request
        files ``{stem}-0000{suffix}``, ``{stem}-0001{suffix}``, ..., in input order, each
        holding as many lines as fit under ``max_lines``, ``max_bytes`` and (when given)
        ``max_tokens`` estimated tokens.

        Lazy: each file is yielded as soon as it is complete on disk, before anything of the
        next is written (only the line that did not fit has been read), so the caller can
        record it first. A file is written under a ``.part`` name and renamed when complete,
        so a crash never leaves part of one under a final name, and one cut short by an
        exception is removed; a file already under the final name is replaced.

        A line alone above ``max_tokens`` gets a file of its own (its ``est_tokens`` says so);
        one alone above ``max_bytes``, a repeated custom id within a file, or one the provider
        does not accept raise ValueError.
        """
        folder.mkdir(parents=True, exist_ok=True)
        current: _FileWriter | None = None
        count = 0
        try:
            for custom_id, req, tokens in lines:
                self._check_id(custom_id)
                line = self._line(custom_id, req)
                if current is not None and not current.fits(len(line), tokens):
                    done, current = current.finish(), None
                    yield done
                if current is None:
                    current = _FileWriter(folder / f"{stem}-{count:04d}{self.suffix}",
                                          self._head, self._sep, self._tail, self.max_lines,
                                          self.max_bytes, max_tokens)
                    count += 1
                    if not current.fits(len(line), tokens):
                        raise ValueError(
                            f"request {custom_id!r} is {len(line)} bytes on its own: more "
                            f"than a batch file may hold ({self.max_bytes} bytes)")
                current.add(custom_id, line, tokens)
            if current is not None:
                done, current = current.finish(), None
                yield done
        finally:
            if current is not None:
                current.discard()

    def _check_id(self, custom_id: str) -> None:
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError(f"custom id {custom_id!r} must be a non-empty string")

    def _line(self, custom_id: str, req: Request) -> bytes:
        raise NotImplementedError

    # --- the steps ---

    async def upload(self, f: BatchFile) -> str | None:
        """The provider's id for the uploaded file (OpenAI), or None where the file is sent
        as the create call's body (Anthropic: nothing is sent here)."""
        raise NotImplementedError

    async def create(self, f: BatchFile, file_id: str | None,
                     metadata: dict[str, str]) -> BatchState:
        """Create a batch of ``f``'s requests (``file_id``: what :meth:`upload` returned).

        Not idempotent: a timeout, a dropped connection, a 5xx or a malformed reply may
        leave a batch created whose id was never seen. Before trying again, the caller can
        look for it with :meth:`find` (whence ``metadata``, and the ledger's record of when
        the create started)."""
        raise NotImplementedError

    async def retrieve(self, batch_id: str) -> BatchState:
        raise NotImplementedError

    async def cancel(self, batch_id: str) -> BatchState:
        """Ask the provider to stop the batch. It answers at once with the batch cancelling
        (OpenAI ``cancelling``, Anthropic ``canceling``); requests already answered are kept
        and come back through :meth:`results` once it has ended."""
        raise NotImplementedError

    async def find(self, metadata: dict[str, str], created_after: float) -> list[BatchState]:
        """The batches that may be ours after a crash between :meth:`create` and recording
        its id: those created at or after ``created_after`` (seconds since the epoch, by the
        provider's clock: leave a margin for skew; 0 for no bound). Each wire's subclass says
        how ``metadata`` narrows them."""
        raise NotImplementedError

    def results(self, state: BatchState,
                output: OutputSchema | None) -> AsyncGenerator[LineOutcome, None]:
        """One outcome per result line of an ended batch, streamed: answers are read by
        ``provider.parse(payload, output)``. A line that is not a result at all (no custom
        id) raises TransientDispatchError naming the line: the document was cut or is not
        the provider's. The order is the provider's, not the file's.

        An async generator holding a response open: close it (``contextlib.aclosing``) if
        not read to the end."""
        raise NotImplementedError

    # --- HTTP ---

    async def _call(self, step: str, method: str, url: httpx.URL, *,
                    headers: dict[str, str] | None = None, **send: Any) -> Any:
        """One call's JSON reply, or the classified exception for its failure."""
        try:
            resp = await self._client.request(method, url,
                                              headers={**self._headers, **(headers or {})},
                                              **send)
        except httpx.HTTPError as exc:
            raise self._transport_error(step, exc) from None
        self._check(resp, step)
        try:
            return resp.json()
        except ValueError:
            raise TransientDispatchError(f"{step}: malformed response body (not JSON)",
                                         status=resp.status_code) from None

    def _check(self, resp: httpx.Response, step: str) -> None:
        try:
            raise_for_status(resp, step)
        except DispatchError as exc:
            raise type(exc)(self._scrubber.scrub(str(exc)), status=exc.status,
                            retry_after_s=exc.retry_after_s) from None

    def _transport_error(self, step: str, exc: httpx.HTTPError) -> TransientDispatchError:
        if isinstance(exc, httpx.TimeoutException):
            what = "timeout"
        elif isinstance(exc, httpx.TransportError):
            what = "connection error"
        else:
            what = "http error"
        detail = f": {exc}" if str(exc) else ""
        return TransientDispatchError(self._clip(
            f"{step}: {what}: {type(exc).__name__}{detail}"))

    def _clip(self, text: str) -> str:
        """Provider text as kept: the key scrubbed out, then cut to MAX_ERROR_CHARS."""
        return self._scrubber.scrub(text)[:MAX_ERROR_CHARS]

    def _state(self, payload: Any) -> BatchState:
        raise NotImplementedError

    def _state_of(self, step: str, payload: Any) -> BatchState:
        try:
            return self._state(payload)
        except _MALFORMED as exc:
            raise TransientDispatchError(self._clip(
                f"{step}: malformed batch object ({type(exc).__name__}: {exc})")) from None

    async def _pages(self, step: str, url: httpx.URL,
                     cursor: str) -> AsyncGenerator[list[BatchState], None]:
        """Every page of a batch list, following ``last_id`` as the ``cursor`` parameter
        while the provider says it ``has_more``."""
        after: str | None = None
        while True:
            page = url.copy_merge_params({"limit": self.page_size,
                                          **({cursor: after} if after else {})})
            payload = await self._call(step, "GET", page)
            try:
                states = [self._state(b) for b in payload["data"]]
                more = bool(payload.get("has_more"))
                last = payload.get("last_id") or (states[-1].id if states else None)
            except _MALFORMED as exc:
                raise TransientDispatchError(self._clip(
                    f"{step}: malformed batch list ({type(exc).__name__}: {exc})")) from None
            yield states
            if not more or not states:
                return
            if last == after:
                raise TransientDispatchError(f"{step}: the list's cursor did not move ({last})")
            after = str(last)

    async def _outcomes(self, step: str, url: httpx.URL,
                        output: OutputSchema | None) -> AsyncGenerator[LineOutcome, None]:
        # Closed as soon as this stops (read to the end, failed or closed): so is the response.
        async with aclosing(self._stream_lines(step, url)) as lines:
            async for number, raw in lines:
                yield self._line_outcome(step, number, raw, output)

    def _line_outcome(self, step: str, number: int, raw: bytes,
                      output: OutputSchema | None) -> LineOutcome:
        try:
            obj = json.loads(raw)
            custom_id = obj["custom_id"]
            if not isinstance(custom_id, str):
                raise TypeError("custom_id is not text")
        except _MALFORMED as exc:
            # Its content is someone's prompt or answer: only its place and size are told.
            raise TransientDispatchError(
                f"{step}: line {number} ({len(raw)} bytes) is not a result line "
                f"({type(exc).__name__})") from None
        try:
            return self._outcome(custom_id, obj, output)
        except _MALFORMED as exc:
            return LineOutcome(custom_id, ERRORED, error_type="malformed_result",
                               message=self._clip(f"the result line for {custom_id} could "
                                                  f"not be read ({type(exc).__name__}: {exc})"))

    def _outcome(self, custom_id: str, obj: Any, output: OutputSchema | None) -> LineOutcome:
        raise NotImplementedError

    def _answer(self, custom_id: str, payload: Any, output: OutputSchema | None,
                status: int | None) -> LineOutcome:
        try:
            answer = self.provider.parse(payload, output)
        except _MALFORMED as exc:
            return LineOutcome(custom_id, ERRORED, error_type="malformed_response",
                               message=self._clip(f"the answer for {custom_id} could not be "
                                                  f"read ({type(exc).__name__}: {exc})"),
                               status_code=status)
        return LineOutcome(custom_id, SUCCEEDED, answer, status_code=status)

    async def _stream_lines(self, step: str,
                            url: httpx.URL) -> AsyncGenerator[tuple[int, bytes], None]:
        """(line number, line) for every non-blank line of a JSONL document, streamed."""
        try:
            async with self._client.stream("GET", url, headers=self._headers) as resp:
                if not 200 <= resp.status_code < 300:
                    await resp.aread()
                    self._check(resp, step)
                number = 0
                async for line in _split_lines(resp.aiter_bytes()):
                    number += 1
                    if line.strip():
                        yield number, line
        except httpx.HTTPError as exc:
            raise self._transport_error(step, exc) from None

    def _checked_size(self, f: BatchFile, step: str) -> int:
        size = f.path.stat().st_size
        if size != f.bytes:
            raise ValueError(f"{step}: {f.path} holds {size} bytes, not the {f.bytes} "
                             "written: it changed since")
        return size


class OpenAIBatches(BatchWire):
    """OpenAI's Batch API, and Azure OpenAI's (see the module docstring for their URLs).

    Limits per batch: 50,000 requests and a 200 MB input file, taken as 200,000,000 bytes (the
    smaller reading of "MB"). The queue of enqueued tokens per model is the org's: a batch
    over it fails as ``queue_full``; ``write_files(max_tokens=)`` keeps files under it.
    """

    MAX_LINES = 50_000
    MAX_BYTES = 200_000_000
    suffix = ".jsonl"
    page_size = 100  # the most /batches lists at once
    _METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512
    # A batch that failed for these codes was refused for the queue, not for its content.
    _QUEUE_FULL: ClassVar[frozenset[str]] = frozenset({"token_limit_exceeded"})
    _ENDED: ClassVar[frozenset[str]] = frozenset({"completed", "failed", "expired",
                                                  "cancelled"})
    # Error codes of requests that never ran, in the error file of an ended batch.
    _NOT_RUN: ClassVar[dict[str, str]] = {"batch_expired": EXPIRED, "batch_cancelled": CANCELED}

    def _urls(self, chat: httpx.URL) -> None:
        root = chat.path.removesuffix(self.provider.path)
        azure = re.fullmatch(r"(.*/openai)/deployments/([^/]+)", root)
        self._deployment = azure.group(2) if azure else ""
        self.endpoint = "/chat/completions" if azure else "/v1/chat/completions"
        self._root = chat.copy_with(path=azure.group(1) if azure else root)

    def _at(self, path: str) -> httpx.URL:
        return self._root.copy_with(path=self._root.path + path)

    def _line(self, custom_id: str, req: Request) -> bytes:
        body = self.provider.body(req)
        if self._deployment:
            body["model"] = self._deployment
        return dumps({"custom_id": custom_id, "method": "POST", "url": self.endpoint,
                      "body": body}) + b"\n"

    async def upload(self, f: BatchFile) -> str:
        """POST /files, multipart: ``purpose=batch`` and the file, streamed from disk."""
        step = f"uploading batch file {f.path.name}"
        self._checked_size(f, step)
        with f.path.open("rb") as fh:
            payload = await self._call(step, "POST", self._at("/files"),
                                       data={"purpose": "batch"},
                                       files={"file": (f.path.name, fh, "application/jsonl")})
        file_id = payload.get("id") if isinstance(payload, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise TransientDispatchError(f"{step}: malformed file object (no id)")
        return file_id

    async def create(self, f: BatchFile, file_id: str | None,
                     metadata: dict[str, str]) -> BatchState:
        """POST /batches with the uploaded file's id, a 24 h window and ``metadata`` (at most
        16 pairs, keys of up to 64 characters, values of up to 512: find() matches it)."""
        if not file_id:
            raise ValueError(f"an OpenAI batch is created from an uploaded file: upload "
                             f"{f.path.name} first")
        self._check_metadata(metadata)
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": self.endpoint,
                                "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        step = f"creating batch for file {f.path.name}"
        return self._state_of(step, await self._call(
            step, "POST", self._at("/batches"), content=dumps(body),
            headers={"content-type": "application/json"}))

    def _check_metadata(self, metadata: dict[str, str]) -> None:
        if len(metadata) > self._METADATA_PAIRS:
            raise ValueError(f"batch metadata holds at most {self._METADATA_PAIRS} pairs, "
                             f"not {len(metadata)}")
        for key, value in metadata.items():
            if not (isinstance(key, str) and isinstance(value, str)
                    and len(key) <= self._METADATA_KEY and len(value) <= self._METADATA_VALUE):
                raise ValueError(f"batch metadata {key!r}: keys are text of up to "
                                 f"{self._METADATA_KEY} characters, values of up to "
                                 f"{self._METADATA_VALUE}")

    async def retrieve(self, batch_id: str) -> BatchState:
        step = f"retrieving batch {batch_id}"
        return self._state_of(step, await self._call(
            step, "GET", self._at(f"/batches/{quote(batch_id, safe='')}")))

    async def cancel(self, batch_id: str) -> BatchState:
        step = f"cancelling batch {batch_id}"
        return self._state_of(step, await self._call(
            step, "POST", self._at(f"/batches/{quote(batch_id, safe='')}/cancel")))

    async def find(self, metadata: dict[str, str], created_after: float) -> list[BatchState]:
        """Batches whose metadata equals ``metadata`` exactly, created at or after
        ``created_after``. OpenAI does not document the order of its list, so every page is
        read (``after=`` the last id of the one before)."""
        found: list[BatchState] = []
        async with aclosing(self._pages("listing batches", self._at("/batches"),
                                        "after")) as pages:
            async for page in pages:
                found += [b for b in page
                          if b.metadata == metadata and b.created_at >= created_after]
        return found

    async def results(self, state: BatchState,
                      output: OutputSchema | None) -> AsyncGenerator[LineOutcome, None]:
        """The output file's lines, then the error file's (requests that failed, and those an
        expired or cancelled batch never ran). A batch that failed validation has neither."""
        _check_ended(state)
        for which, file_id in (("output", state.output_file_id),
                               ("error", state.error_file_id)):
            if not file_id:
                continue
            step = f"reading the {which} file {file_id} of batch {state.id}"
            url = self._at(f"/files/{quote(file_id, safe='')}/content")
            async with aclosing(self._outcomes(step, url, output)) as outcomes:
                async for outcome in outcomes:
                    yield outcome

    def _outcome(self, custom_id: str, obj: Any, output: OutputSchema | None) -> LineOutcome:
        # {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
        # or "response": null, "error": {"code", "message"}.
        error = obj.get("error")
        if error:
            code = str(error.get("code") or "error")
            response = obj.get("response")
            return LineOutcome(custom_id, self._NOT_RUN.get(code, ERRORED), error_type=code,
                               message=self._clip(str(error.get("message") or "")),
                               status_code=_count(response["status_code"]) if response
                               else None)
        response = obj["response"]
        status = _count(response["status_code"])
        body = response["body"]
        if 200 <= status < 300:
            return self._answer(custom_id, body, output, status)
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        return LineOutcome(custom_id, ERRORED,
                           error_type=str(err.get("type") or err.get("code") or f"http_{status}"),
                           message=self._clip(str(err.get("message") or "")),
                           status_code=status)

    def _state(self, payload: Any) -> BatchState:
        status = str(payload["status"])
        errors = (payload.get("errors") or {}).get("data") or []
        counts = payload.get("request_counts") or {}
        failed = status == "failed"
        return BatchState(
            id=_text(payload["id"]), status=status, ended=status in self._ENDED,
            queue_full=failed and any(e.get("code") in self._QUEUE_FULL for e in errors),
            failed_reason=self._clip("; ".join(_validation_error(e) for e in errors))
            if failed else "",
            total=_count(counts.get("total", 0)), completed=_count(counts.get("completed", 0)),
            failed=_count(counts.get("failed", 0)), created_at=float(payload["created_at"]),
            metadata={str(k): str(v) for k, v in (payload.get("metadata") or {}).items()},
            output_file_id=payload.get("output_file_id") or None,
            error_file_id=payload.get("error_file_id") or None)


class AnthropicBatches(BatchWire):
    """Anthropic's Message Batches.

    Limits per batch: 100,000 requests and 256 MB of create body, taken as 256,000,000 bytes
    (the smaller reading of "MB"); the file is that body, its JSON wrapper counted. Custom ids
    must match ``^[a-zA-Z0-9_-]{1,64}$``.
    """

    MAX_LINES = 100_000
    MAX_BYTES = 256_000_000
    suffix = ".json"
    page_size = 1000  # the most /v1/messages/batches lists at once
    _head = b'{"requests":[\n'
    _sep = b",\n"
    _tail = b"\n]}\n"
    _CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
    # What the results say of requests that never ran: no message of the provider's.
    _NOT_RUN: ClassVar[dict[str, str]] = {
        EXPIRED: "the batch expired before this request was processed",
        CANCELED: "the batch was cancelled before this request was processed"}

    def _urls(self, chat: httpx.URL) -> None:
        self._batches = chat.copy_with(path=chat.path + "/batches")

    def _at(self, path: str) -> httpx.URL:
        return self._batches.copy_with(path=self._batches.path + path)

    def _check_id(self, custom_id: str) -> None:
        if not isinstance(custom_id, str) or not self._CUSTOM_ID.fullmatch(custom_id):
            raise ValueError(f"custom id {custom_id!r}: Anthropic takes 1 to 64 letters, "
                             "digits, '_' or '-'")

    def _line(self, custom_id: str, req: Request) -> bytes:
        return dumps({"custom_id": custom_id, "params": self.provider.body(req)})

    async def upload(self, f: BatchFile) -> None:
        """Nothing to upload: the file is the create call's body."""

    async def create(self, f: BatchFile, file_id: str | None,
                     metadata: dict[str, str]) -> BatchState:
        """POST /v1/messages/batches, the body streamed from ``f``. Anthropic batches carry no
        metadata: ``metadata`` is not sent (see :meth:`find`)."""
        if file_id is not None:
            raise ValueError("an Anthropic batch is created from its file, not an upload")
        step = f"creating batch for file {f.path.name}"
        size = self._checked_size(f, step)
        return self._state_of(step, await self._call(
            step, "POST", self._batches, content=_chunks(f.path, self.chunk_bytes),
            headers={"content-type": "application/json", "content-length": str(size)}))

    async def retrieve(self, batch_id: str) -> BatchState:
        step = f"retrieving batch {batch_id}"
        return self._state_of(step, await self._call(
            step, "GET", self._at(f"/{quote(batch_id, safe='')}")))

    async def cancel(self, batch_id: str) -> BatchState:
        step = f"cancelling batch {batch_id}"
        return self._state_of(step, await self._call(
            step, "POST", self._at(f"/{quote(batch_id, safe='')}/cancel")))

    async def find(self, metadata: dict[str, str], created_after: float) -> list[BatchState]:
        """Every batch of the workspace created at or after ``created_after``, newest first:
        Anthropic batches carry no metadata, so ``metadata`` is not used and the candidates
        include batches of anyone sharing the workspace in that time. The caller decides which
        are its own: a ``total`` equal to its file's line count narrows them; only the results
        of an ended batch (their custom ids) prove it. The list is documented newest first,
        so reading stops at the first page reaching back before ``created_after``."""
        found: list[BatchState] = []
        async with aclosing(self._pages("listing batches", self._batches,
                                        "after_id")) as pages:
            async for page in pages:
                found += [b for b in page if b.created_at >= created_after]
                if any(b.created_at < created_after for b in page):
                    break
        return found

    async def results(self, state: BatchState,
                      output: OutputSchema | None) -> AsyncGenerator[LineOutcome, None]:
        """The lines at ``results_url``. The key goes only to the configured host: a
        ``results_url`` elsewhere raises TerminalDispatchError."""
        _check_ended(state)
        step = f"reading the results of batch {state.id}"
        if not state.results_url:
            raise TransientDispatchError(f"{step}: the batch has ended but has no results_url "
                                         "yet: retrieve it again")
        url = self._batches.join(state.results_url)
        if (url.scheme, url.host, url.port) != (self._batches.scheme, self._batches.host,
                                                self._batches.port):
            raise TerminalDispatchError(
                f"{step}: results_url {url} is not on the configured host "
                f"{self._batches.host}: the API key is not sent there")
        async with aclosing(self._outcomes(step, url, output)) as outcomes:
            async for outcome in outcomes:
                yield outcome

    def _outcome(self, custom_id: str, obj: Any, output: OutputSchema | None) -> LineOutcome:
        # {"custom_id", "result": {"type": "succeeded", "message"}}, {"type": "errored",
        # "error": {"type": "error", "error": {"type", "message"}}}, {"type": "canceled"} or
        # {"type": "expired"}.
        result = obj["result"]
        kind = result["type"]
        if kind == SUCCEEDED:
            return self._answer(custom_id, result["message"], output, None)
        if kind == ERRORED:
            err = result.get("error") or {}
            if isinstance(err.get("error"), dict):  # the error response, wrapped
                err = err["error"]
            return LineOutcome(custom_id, ERRORED, error_type=str(err.get("type") or "error"),
                               message=self._clip(str(err.get("message") or "")))
        if kind in self._NOT_RUN:
            return LineOutcome(custom_id, kind, error_type=kind, message=self._NOT_RUN[kind])
        return LineOutcome(custom_id, ERRORED, error_type="unknown_result",
                           message=self._clip(f"result type {kind!r} for {custom_id} is not "
                                              "one Anthropic documents"))

    def _state(self, payload: Any) -> BatchState:
        counts = payload.get("request_counts") or {}
        n = {k: _count(counts.get(k, 0))
             for k in ("processing", "succeeded", "errored", "canceled", "expired")}
        status = str(payload["processing_status"])
        return BatchState(
            id=_text(payload["id"]), status=status, ended=status == "ended",
            total=sum(n.values()), completed=n["succeeded"],
            failed=n["errored"] + n["canceled"] + n["expired"],
            created_at=_timestamp(payload["created_at"]),
            results_url=payload.get("results_url") or None)


WIRES: dict[str, type[BatchWire]] = {"openai": OpenAIBatches, "anthropic": AnthropicBatches}


class _FileWriter:
    """One request file being written, under a ``.part`` name until it is complete."""

    def __init__(self, path: Path, head: bytes, sep: bytes, tail: bytes, max_lines: int,
                 max_bytes: int, max_tokens: int | None) -> None:
        self.path = path
        self._part = path.with_name(path.name + ".part")
        self._sep = sep
        self._tail = tail
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._max_tokens = max_tokens
        self._fh: BinaryIO = self._part.open("wb")
        self._fh.write(head)
        self._size = len(head) + len(tail)
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._tokens = 0

    def fits(self, size: int, tokens: int) -> bool:
        """Whether a line of ``size`` bytes and ``tokens`` estimated tokens may be added. The
        first line is refused only for its bytes: no file could hold it then."""
        if not self._ids:
            return self._size + size <= self._max_bytes
        return (len(self._ids) < self._max_lines
                and self._size + len(self._sep) + size <= self._max_bytes
                and (self._max_tokens is None or self._tokens + tokens <= self._max_tokens))

    def add(self, custom_id: str, line: bytes, tokens: int) -> None:
        if custom_id in self._seen:
            raise ValueError(f"custom id {custom_id!r} appears twice in {self.path.name}")
        if self._ids:
            self._fh.write(self._sep)
            self._size += len(self._sep)
        self._fh.write(line)
        self._size += len(line)
        self._ids.append(custom_id)
        self._seen.add(custom_id)
        self._tokens += tokens

    def finish(self) -> BatchFile:
        """Close the file, make it durable and give it its final name."""
        self._fh.write(self._tail)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._part, self.path)
        _fsync_dir(self.path.parent)
        return BatchFile(self.path, self._ids, len(self._ids), self._size, self._tokens)

    def discard(self) -> None:
        self._fh.close()
        self._part.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    """A file's bytes, ``size`` at a time (a local disk read: not worth a thread)."""
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk


async def _split_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of a JSONL stream, split at ``\\n`` only. httpx's ``aiter_lines`` splits where
    ``str.splitlines`` does, also at U+2028, U+0085 and other characters a JSON string may
    hold unescaped, which would cut an answer holding one in two. A ``\\n`` byte is never
    part of another UTF-8 character."""
    pending: list[bytes] = []
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:end])
            yield b"".join(pending)
            pending = []
            start = end + 1
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield b"".join(pending)


def _check_ended(state: BatchState) -> None:
    if not state.ended:
        raise ValueError(f"batch {state.id} has not ended (status {state.status}): its "
                         "results are not ready")


def _validation_error(e: Any) -> str:
    line = f" (line {e['line']})" if e.get("line") is not None else ""
    return f"{e.get('code') or 'error'}{line}: {e.get('message') or ''}"


def _timestamp(value: Any) -> float:
    """Seconds since the epoch of an RFC 3339 time (Anthropic's), UTC when it names no zone."""
    moment = datetime.fromisoformat(_text(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected text, got {value!r}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a count, got {value!r}")
    return value

