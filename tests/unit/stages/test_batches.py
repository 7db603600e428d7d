"""The batch wires through httpx.MockTransport: in-memory OpenAI and Anthropic batch endpoints
that behave as the providers document them. No server, no sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute.errors import (
    AuthError,
    RateLimited,
    TerminalDispatchError,
    TransientDispatchError,
)
from batchroute.stages.dispatch.batches import (
    WIRES,
    AnthropicBatches,
    BatchFile,
    BatchState,
    BatchWire,
    LineOutcome,
    OpenAIBatches,
)
from batchroute.stages.dispatch.providers import (
    MAX_ERROR_CHARS,
    AnthropicMessages,
    OpenAIChat,
    OutputSchema,
    Provider,
    Request,
)
from tests.helpers import key_echoes, key_fragments

KEY = "sk-unit-test-secret-4242"
T = TypeVar("T")
Handler = Callable[[httpx.Request], httpx.Response]
T0 = 1_700_000_000  # the fake providers' clock


def _openai(base: str = "http://provider.test/v1", **kw: Any) -> OpenAIChat:
    return OpenAIChat(base, KEY, "gpt-test", **kw)


def _anthropic() -> AnthropicMessages:
    return AnthropicMessages("http://provider.test", KEY, "claude-test")


def _azure() -> OpenAIChat:
    return OpenAIChat("https://res.openai.azure.com/openai/deployments/batch-dep", KEY,
                      "gpt-4o-mini", auth="api-key", api_version="2024-10-21")


def _wire(kind: str, handler: Handler | None = None, *, provider: Provider | None = None,
          **limits: Any) -> BatchWire:
    provider = provider or (_openai() if kind == "openai" else _anthropic())
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler or _no_calls))
    return WIRES[kind](provider, client, **limits)


def _no_calls(req: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected call {req.method} {req.url}")


def _run(coro: Awaitable[T]) -> T:
    async def go() -> T:
        return await coro
    return asyncio.run(go())


def _req(i: int, text: str = "") -> Request:
    return Request(messages=[{"role": "system", "content": "be brief"},
                             {"role": "user", "content": text or f"question {i}"}],
                   max_tokens=16, temperature=0.0)


def _lines(n: int, tokens: int = 10) -> list[tuple[str, Request, int]]:
    return [(f"r{i}", _req(i), tokens) for i in range(n)]


def _requests_in(f: BatchFile) -> list[dict[str, Any]]:
    """The requests a file holds, as the provider will read them."""
    raw = f.path.read_bytes()
    if f.path.suffix == ".jsonl":
        return [json.loads(line) for line in raw.split(b"\n") if line]
    doc = json.loads(raw)
    assert list(doc) == ["requests"]
    return list(doc["requests"])


def _ids_in(f: BatchFile) -> list[str]:
    return [r["custom_id"] for r in _requests_in(f)]


def _openai_answer(text: str = "A") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}}


def _anthropic_answer(text: str = "A") -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "output_tokens": 5}}


def _jsonl(*objs: Any) -> bytes:
    return b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objs)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class FakeOpenAI:
    """OpenAI's /files and /batches in memory (or Azure's, under /openai with an api-version
    on every call). Lists are newest first, paged by ``after`` and ``limit``."""

    def __init__(self, root: str = "/v1", api_version: str = "") -> None:
        self.root = root
        self.api_version = api_version
        self.files: dict[str, bytes] = {}
        self.uploads: list[dict[str, Any]] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self.calls: list[httpx.Request] = []
        self.created: list[dict[str, Any]] = []

    def add_batch(self, **fields: Any) -> dict[str, Any]:
        bid = f"batch_{len(self.batches):03d}"
        batch = {"id": bid, "object": "batch", "endpoint": "/v1/chat/completions",
                 "errors": None, "input_file_id": "file-x", "completion_window": "24h",
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": T0 + len(self.batches), "request_counts":
                 {"total": 0, "completed": 0, "failed": 0}, "metadata": None, **fields}
        self.batches[bid] = batch
        return batch

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.calls.append(req)
        if self.api_version:
            assert req.url.params.get("api-version") == self.api_version, req.url
        path = req.url.path.removeprefix(self.root)
        parts = path.strip("/").split("/")
        if req.method == "POST" and parts == ["files"]:
            return self._upload(req)
        if req.method == "GET" and parts[0] == "files" and parts[2:] == ["content"]:
            if parts[1] not in self.files:
                return httpx.Response(404, json={"error": {"message": "No such file"}})
            return httpx.Response(200, content=self.files[parts[1]])
        if req.method == "POST" and parts == ["batches"]:
            body = json.loads(req.content)
            self.created.append(body)
            if body["input_file_id"] not in self.files:
                return httpx.Response(400, json={"error": {"message": "No such file"}})
            batch = self.add_batch(input_file_id=body["input_file_id"],
                                   endpoint=body["endpoint"], metadata=body.get("metadata"))
            return httpx.Response(200, json=batch)
        if req.method == "GET" and parts == ["batches"]:
            return self._list(req)
        if parts[0] == "batches" and parts[1] in self.batches:
            batch = self.batches[parts[1]]
            if req.method == "POST" and parts[2:] == ["cancel"]:
                batch["status"] = "cancelling"
            return httpx.Response(200, json=batch)
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def _upload(self, req: httpx.Request) -> httpx.Response:
        msg = email.message_from_bytes(
            b"Content-Type: " + req.headers["content-type"].encode() + b"\r\n\r\n" + req.content)
        fields: dict[str, Any] = {}
        for part in msg.get_payload():  # type: ignore[union-attr]
            name = part.get_param("name", header="content-disposition")
            fields[name] = {"filename": part.get_filename(),
                            "content_type": part.get_content_type(),
                            "data": part.get_payload(decode=True)}
        self.uploads.append(fields)
        fid = f"file-{len(self.files)}"
        self.files[fid] = fields["file"]["data"]
        return httpx.Response(200, json={"id": fid, "object": "file",
                                         "bytes": len(fields["file"]["data"]),
                                         "filename": fields["file"]["filename"],
                                         "purpose": fields["purpose"]["data"].decode()})

    def _list(self, req: httpx.Request) -> httpx.Response:
        newest = list(reversed(self.batches.values()))
        after = req.url.params.get("after")
        if after:
            newest = newest[[b["id"] for b in newest].index(after) + 1:]
        limit = int(req.url.params.get("limit", 20))
        assert 1 <= limit <= 100
        page = newest[:limit]
        return httpx.Response(200, json={
            "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(newest) > limit})


class FakeAnthropic:
    """Anthropic's /v1/messages/batches in memory: lists newest first, paged by ``after_id``
    and ``limit``; each batch's results at its results_url."""

    def __init__(self) -> None:
        self.batches: dict[str, dict[str, Any]] = {}
        self.bodies: list[dict[str, Any]] = []
        self.results: dict[str, bytes] = {}
        self.calls: list[httpx.Request] = []

    def add_batch(self, **fields: Any) -> dict[str, Any]:
        bid = f"msgbatch_{len(self.batches):03d}"
        batch = {"id": bid, "type": "message_batch", "processing_status": "in_progress",
                 "request_counts": {"processing": 0, "succeeded": 0, "errored": 0,
                                    "canceled": 0, "expired": 0},
                 "ended_at": None, "created_at": _iso(T0 + len(self.batches)),
                 "expires_at": _iso(T0 + 86_400), "cancel_initiated_at": None,
                 "archived_at": None, "results_url": None, **fields}
        self.batches[bid] = batch
        return batch

    def end(self, bid: str, results: bytes) -> None:
        self.batches[bid].update(processing_status="ended", results_url=
                                 f"http://provider.test/v1/messages/batches/{bid}/results")
        self.results[bid] = results

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.calls.append(req)
        assert req.headers["anthropic-version"] == "2023-06-01"
        parts = req.url.path.strip("/").split("/")
        assert parts[:3] == ["v1", "messages", "batches"], req.url
        rest = parts[3:]
        if req.method == "POST" and not rest:
            body = json.loads(req.content)
            self.bodies.append(body)
            n = len(body["requests"])
            batch = self.add_batch()
            batch["request_counts"]["processing"] = n
            return httpx.Response(200, json=batch)
        if req.method == "GET" and not rest:
            newest = list(reversed(self.batches.values()))
            after = req.url.params.get("after_id")
            if after:
                newest = newest[[b["id"] for b in newest].index(after) + 1:]
            limit = int(req.url.params.get("limit", 20))
            assert 1 <= limit <= 1000
            page = newest[:limit]
            return httpx.Response(200, json={
                "data": page, "has_more": len(newest) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None})
        if rest and rest[0] in self.batches:
            if rest[1:] == ["results"]:
                return httpx.Response(200, content=self.results[rest[0]])
            if req.method == "POST" and rest[1:] == ["cancel"]:
                self.batches[rest[0]]["processing_status"] = "canceling"
            return httpx.Response(200, json=self.batches[rest[0]])
        return httpx.Response(404, json={"type": "error", "error": {
            "type": "not_found_error", "message": "no such batch"}})


# --- request files ---


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_each_request_is_the_sync_body(kind: str, tmp_path: Path) -> None:
    wire = _wire(kind)
    lines = [("a", _req(0), 5), ("b", Request(
        [{"role": "user", "content": "pick"}], 8, None,
        OutputSchema("pick", {"type": "object", "properties": {"x": {"type": "string"}},
                              "required": ["x"], "additionalProperties": False})), 7)]
    [f] = list(wire.write_files(lines, tmp_path, "m"))
    got = _requests_in(f)
    if kind == "openai":
        assert got == [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                        "body": wire.provider.body(req)} for cid, req, _ in lines]
        assert f.path.name == "m-0000.jsonl"
    else:
        assert got == [{"custom_id": cid, "params": wire.provider.body(req)}
                       for cid, req, _ in lines]
        assert f.path.name == "m-0000.json"
    assert (f.custom_ids, f.lines, f.est_tokens) == (["a", "b"], 2, 12)
    assert f.bytes == f.path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.path.name]  # no .part left


def test_azure_lines_name_the_deployment_and_its_endpoint(tmp_path: Path) -> None:
    wire = _wire("openai", provider=_azure())
    [f] = list(wire.write_files(_lines(2), tmp_path, "m"))
    for line, (_, req, _) in zip(_requests_in(f), _lines(2), strict=True):
        assert line["url"] == "/chat/completions"
        assert line["body"] == {**wire.provider.body(req), "model": "batch-dep"}


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_files_split_at_max_lines(kind: str, tmp_path: Path) -> None:
    files = list(_wire(kind, max_lines=3).write_files(_lines(8), tmp_path, "m"))
    assert [f.custom_ids for f in files] == [["r0", "r1", "r2"], ["r3", "r4", "r5"],
                                             ["r6", "r7"]]
    assert [_ids_in(f) for f in files] == [f.custom_ids for f in files]
    assert [f.path.name for f in files] == [f"m-000{i}{files[0].path.suffix}" for i in range(3)]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_files_split_at_max_bytes_counting_the_wrapper(kind: str, tmp_path: Path) -> None:
    probe = next(_wire(kind).write_files(_lines(1), tmp_path / "probe", "p"))
    # Room for exactly two lines: a third byte short of three.
    two = next(_wire(kind).write_files(_lines(2), tmp_path / "two", "p"))
    cap = two.bytes + (two.bytes - probe.bytes) - 1
    files = list(_wire(kind, max_bytes=cap).write_files(_lines(5), tmp_path / "out", "m"))
    assert [f.lines for f in files] == [2, 2, 1]
    assert all(f.bytes == f.path.stat().st_size <= cap for f in files)
    assert [_ids_in(f) for f in files] == [f.custom_ids for f in files]


def test_files_split_at_max_tokens_and_a_big_line_stands_alone(tmp_path: Path) -> None:
    lines = [("a", _req(0), 4), ("b", _req(1), 4), ("c", _req(2), 4), ("d", _req(3), 30),
             ("e", _req(4), 1)]
    files = list(_wire("openai").write_files(lines, tmp_path, "m", max_tokens=10))
    assert [(f.custom_ids, f.est_tokens) for f in files] == [
        (["a", "b"], 8), (["c"], 4), (["d"], 30), (["e"], 1)]


def test_a_request_too_big_for_any_file_is_refused_and_nothing_partial_stays(
        tmp_path: Path) -> None:
    lines = [("a", _req(0), 1), ("big", _req(1, "x" * 5000), 1)]
    with pytest.raises(ValueError, match=r"'big' is \d+ bytes on its own"):
        list(_wire("openai", max_bytes=2000).write_files(lines, tmp_path, "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-0000.jsonl"]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_repeated_custom_id_in_a_file_is_refused(kind: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'r0' appears twice"):
        list(_wire(kind).write_files([*_lines(2), ("r0", _req(9), 1)], tmp_path, "m"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "r/1"])
def test_anthropic_refuses_custom_ids_it_would_reject(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="custom id"):
        list(_wire("anthropic").write_files([(bad, _req(0), 1)], tmp_path, "m"))
    # OpenAI takes any non-empty text.
    assert len(list(_wire("openai").write_files([(bad or "ok", _req(0), 1)], tmp_path, "o"))) == 1


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_the_writer_yields_each_file_complete_before_reading_on(kind: str,
                                                                tmp_path: Path) -> None:
    read = 0

    def source() -> Iterator[tuple[str, Request, int]]:
        nonlocal read
        for line in _lines(10):
            read += 1
            yield line

    files = _wire(kind, max_lines=4).write_files(source(), tmp_path, "m")
    assert read == 0  # nothing happens before the first file is asked for
    first = next(files)
    assert read == 5  # the four lines of the first file, and the one that did not fit
    assert _ids_in(first) == ["r0", "r1", "r2", "r3"]  # whole and valid on disk already
    assert not first.path.with_name(first.path.name + ".part").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]  # none begun
    second = next(files)
    assert (read, second.custom_ids) == (9, ["r4", "r5", "r6", "r7"])


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_file_cut_short_by_a_failing_source_leaves_nothing_behind(kind: str,
                                                                   tmp_path: Path) -> None:
    def source() -> Iterator[tuple[str, Request, int]]:
        yield from _lines(6)
        raise OSError("the input went away")

    files = _wire(kind, max_lines=4).write_files(source(), tmp_path, "m")
    first = next(files)
    with pytest.raises(OSError, match="went away"):
        next(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]


_LINE = st.tuples(st.text(st.characters(codec="utf-8"), max_size=300),
                  st.integers(0, 50))


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["openai", "anthropic"]), rows=st.lists(_LINE, max_size=40),
       max_lines=st.integers(1, 8), slack=st.integers(0, 900),
       max_tokens=st.none() | st.integers(1, 120))
def test_files_partition_the_input_in_order_each_full_and_within_caps(
        kind: str, rows: list[tuple[str, int]], max_lines: int, slack: int,
        max_tokens: int | None) -> None:
    lines = [(f"id{i}", _req(i, text), tokens) for i, (text, tokens) in enumerate(rows)]
    wire = _wire(kind, max_lines=max_lines)
    sizes = [len(wire._line(cid, req)) for cid, req, _ in lines]
    wire.max_bytes = max(sizes, default=0) + 40 + slack  # every line fits a file alone
    with tempfile.TemporaryDirectory() as tmp:
        files = list(wire.write_files(lines, Path(tmp), "m", max_tokens=max_tokens))
        assert [cid for f in files for cid in f.custom_ids] == [cid for cid, _, _ in lines]
        at = 0
        for f in files:
            body = _requests_in(f)
            assert [r["custom_id"] for r in body] == f.custom_ids
            assert f.bytes == f.path.stat().st_size <= wire.max_bytes
            assert 1 <= f.lines == len(f.custom_ids) <= max_lines
            assert f.est_tokens == sum(t for _, _, t in lines[at:at + f.lines])
            assert max_tokens is None or f.lines == 1 or f.est_tokens <= max_tokens
            at += f.lines
            if at < len(lines):  # split only because the next line did not fit
                nxt = sizes[at] + len(wire._sep)
                assert (f.lines == max_lines or f.bytes + nxt > wire.max_bytes
                        or (max_tokens is not None
                            and f.est_tokens + lines[at][2] > max_tokens))


# --- upload and create ---


class _Recording(httpx.AsyncBaseTransport):
    """Records how each request body arrives (its stream type, chunk sizes and headers, as
    sent) before handing it, read, to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[tuple[str, list[int]]] = []
        self.headers: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = type(request.stream).__name__
        chunks = [chunk async for chunk in request.stream]  # type: ignore[union-attr]
        self.bodies.append((kind, [len(c) for c in chunks]))
        self.headers.append(httpx.Headers(request.headers))
        sent = httpx.Request(request.method, request.url, headers=request.headers,
                             content=b"".join(chunks))
        return self.handler(sent)


def test_openai_upload_is_a_multipart_batch_file_streamed_from_disk(tmp_path: Path) -> None:
    fake = FakeOpenAI()
    rec = _Recording(fake)
    wire = OpenAIBatches(_openai(), httpx.AsyncClient(transport=rec))
    lines = [(f"r{i}", _req(i, "y" * 500), 1) for i in range(300)]  # ~200 kB: several chunks
    [f] = list(wire.write_files(lines, tmp_path, "m"))
    file_id = _run(wire.upload(f))
    assert file_id == "file-0"
    [call] = fake.calls
    assert (call.method, str(call.url)) == ("POST", "http://provider.test/v1/files")
    assert call.headers["authorization"] == f"Bearer {KEY}"
    [sent] = rec.headers  # a known length, not chunked
    assert sent["content-length"] == str(len(call.content))
    assert "transfer-encoding" not in sent
    [fields] = fake.uploads
    assert fields["purpose"]["data"] == b"batch"
    assert fields["file"]["filename"] == "m-0000.jsonl"
    assert fields["file"]["data"] == f.path.read_bytes()
    [(stream, chunks)] = rec.bodies
    assert stream != "ByteStream" and len(chunks) > 3 and max(chunks) <= 64 * 1024


def test_openai_create_sends_the_file_id_endpoint_window_and_metadata(tmp_path: Path) -> None:
    fake = FakeOpenAI()
    wire = _wire("openai", fake)
    [f] = list(wire.write_files(_lines(2), tmp_path, "m"))
    state = _run(wire.create(f, _run(wire.upload(f)), {"run": "r1", "file": "m-0000"}))
    assert fake.created == [{"input_file_id": "file-0", "endpoint": "/v1/chat/completions",
                             "completion_window": "24h",
                             "metadata": {"run": "r1", "file": "m-0000"}}]
    assert fake.calls[-1].headers["content-type"] == "application/json"
    assert state == BatchState(id="batch_000", status="validating", ended=False,
                               created_at=float(T0), metadata={"run": "r1", "file": "m-0000"})
    with pytest.raises(ValueError, match=r"upload m-0000\.jsonl first"):
        _run(wire.create(f, None, {}))
    with pytest.raises(ValueError, match="at most 16 pairs"):
        _run(wire.create(f, "file-0", {str(i): "v" for i in range(17)}))
    with pytest.raises(ValueError, match="values of up to 512"):
        _run(wire.create(f, "file-0", {"k": "v" * 513}))
    assert len(fake.created) == 1  # refused before anything was sent


def test_azure_batch_urls_keep_the_api_version(tmp_path: Path) -> None:
    fake = FakeOpenAI(root="/openai", api_version="2024-10-21")
    wire = _wire("openai", fake, provider=_azure())
    [f] = list(wire.write_files(_lines(1), tmp_path, "m"))
    state = _run(wire.create(f, _run(wire.upload(f)), {}))
    assert fake.created[0]["endpoint"] == "/chat/completions"
    _run(wire.retrieve(state.id))
    _run(wire.cancel(state.id))
    _run(wire.find({}, 0))
    fake.batches[state.id].update(status="cancelled", output_file_id="file-0")
    fake.files["file-0"] = b""
    _run(_collect(wire, _run(wire.retrieve(state.id))))
    assert [(c.method, c.url.path) for c in fake.calls] == [
        ("POST", "/openai/files"), ("POST", "/openai/batches"),
        ("GET", "/openai/batches/batch_000"), ("POST", "/openai/batches/batch_000/cancel"),
        ("GET", "/openai/batches"), ("GET", "/openai/batches/batch_000"),
        ("GET", "/openai/files/file-0/content")]
    assert all(c.headers["api-key"] == KEY and "authorization" not in c.headers
               for c in fake.calls)


def test_anthropic_create_streams_the_file_as_the_body(tmp_path: Path) -> None:
    fake = FakeAnthropic()
    rec = _Recording(fake)
    wire = AnthropicBatches(_anthropic(), httpx.AsyncClient(transport=rec))
    wire.chunk_bytes = 1024
    [f] = list(wire.write_files(_lines(60), tmp_path, "m"))
    assert _run(wire.upload(f)) is None and fake.calls == []  # nothing to upload
    state = _run(wire.create(f, None, {"run": "r1"}))
    [call] = fake.calls
    assert (call.method, str(call.url)) == ("POST", "http://provider.test/v1/messages/batches")
    assert call.headers["x-api-key"] == KEY
    [sent] = rec.headers
    assert sent["content-type"] == "application/json"
    assert sent["content-length"] == str(f.bytes)
    assert "transfer-encoding" not in sent
    assert call.content == f.path.read_bytes()
    assert fake.bodies == [{"requests": [{"custom_id": cid, "params": wire.provider.body(req)}
                                         for cid, req, _ in _lines(60)]}]
    [(stream, chunks)] = rec.bodies
    assert stream != "ByteStream" and len(chunks) > 3 and max(chunks) <= 1024
    assert (state.id, state.status, state.ended, state.total) == ("msgbatch_000",
                                                                 "in_progress", False, 60)
    with pytest.raises(ValueError, match="not an upload"):
        _run(wire.create(f, "file-1", {}))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_file_changed_since_written_is_not_sent(kind: str, tmp_path: Path) -> None:
    wire = _wire(kind)
    [f] = list(wire.write_files(_lines(2), tmp_path, "m"))
    with f.path.open("ab") as fh:
        fh.write(b"\n")
    with pytest.raises(ValueError, match="changed since"):
        _run(wire.create(f, None, {}) if kind == "anthropic" else wire.upload(f))


# --- batch states ---


@pytest.mark.parametrize(("status", "ended"), [
    ("validating", False), ("in_progress", False), ("finalizing", False),
    ("cancelling", False), ("completed", True), ("failed", True), ("expired", True),
    ("cancelled", True)])
def test_openai_states(status: str, ended: bool) -> None:
    fake = FakeOpenAI()
    fake.add_batch(status=status, output_file_id="file-o", error_file_id="file-e",
                   request_counts={"total": 9, "completed": 6, "failed": 2},
                   metadata={"run": "r1"})
    state = _run(_wire("openai", fake).retrieve("batch_000"))
    assert state == BatchState(id="batch_000", status=status, ended=ended, total=9,
                               completed=6, failed=2, created_at=float(T0),
                               metadata={"run": "r1"}, output_file_id="file-o",
                               error_file_id="file-e")
    assert str(fake.calls[0].url) == "http://provider.test/v1/batches/batch_000"


@pytest.mark.parametrize(("status", "ended"), [
    ("in_progress", False), ("canceling", False), ("ended", True)])
def test_anthropic_states(status: str, ended: bool) -> None:
    fake = FakeAnthropic()
    fake.add_batch(processing_status=status, created_at="2024-08-20T18:37:24.100435Z",
                   request_counts={"processing": 1, "succeeded": 5, "errored": 2,
                                   "canceled": 3, "expired": 4},
                   results_url="http://provider.test/v1/messages/batches/x/results"
                   if ended else None)
    state = _run(_wire("anthropic", fake).retrieve("msgbatch_000"))
    assert state == BatchState(
        id="msgbatch_000", status=status, ended=ended, total=15, completed=5, failed=9,
        created_at=datetime(2024, 8, 20, 18, 37, 24, 100435, UTC).timestamp(),
        results_url="http://provider.test/v1/messages/batches/x/results" if ended else None)
    assert str(fake.calls[0].url) == "http://provider.test/v1/messages/batches/msgbatch_000"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_cancel_asks_the_provider_and_returns_the_cancelling_batch(kind: str) -> None:
    fake: FakeOpenAI | FakeAnthropic = FakeOpenAI() if kind == "openai" else FakeAnthropic()
    bid = fake.add_batch(status="in_progress")["id"]
    state = _run(_wire(kind, fake).cancel(bid))
    assert (fake.calls[0].method, fake.calls[0].url.path.endswith(f"/{bid}/cancel")) == (
        "POST", True)
    assert state.status == ("cancelling" if kind == "openai" else "canceling")
    assert not state.ended


def test_a_full_queue_is_told_apart_from_a_failed_batch() -> None:
    fake = FakeOpenAI()
    fake.add_batch(status="failed", errors={"object": "list", "data": [{
        "code": "token_limit_exceeded", "line": None, "param": None,
        "message": "Enqueued token limit reached for gpt-test in organization org-1."}]})
    fake.add_batch(status="failed", errors={"object": "list", "data": [
        {"code": "invalid_json_line", "line": 3, "message": "not JSON"},
        {"code": "missing_required_parameter", "line": 7, "message": "no model"}]})
    fake.add_batch(status="in_progress", errors={"object": "list", "data": [
        {"code": "token_limit_exceeded", "message": "ignored unless failed"}]})
    wire = _wire("openai", fake)
    full, bad, running = (_run(wire.retrieve(f"batch_00{i}")) for i in range(3))
    assert (full.ended, full.queue_full) == (True, True)
    assert full.failed_reason.startswith("token_limit_exceeded: Enqueued token limit")
    assert (bad.ended, bad.queue_full) == (True, False)
    assert bad.failed_reason == ("invalid_json_line (line 3): not JSON; "
                                 "missing_required_parameter (line 7): no model")
    assert (running.queue_full, running.failed_reason) == (False, "")


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_malformed_batch_object_is_a_transient_error_naming_the_step(kind: str) -> None:
    wire = _wire(kind, lambda req: httpx.Response(200, json={"id": "b1"}))
    with pytest.raises(TransientDispatchError, match="retrieving batch b1: malformed batch"):
        _run(wire.retrieve("b1"))
    wire = _wire(kind, lambda req: httpx.Response(200, content=b"<html>"))
    with pytest.raises(TransientDispatchError, match=r"retrieving batch b1: .*not JSON"):
        _run(wire.retrieve("b1"))


# --- results ---


async def _collect(wire: BatchWire, state: BatchState,
                   output: OutputSchema | None = None) -> list[LineOutcome]:
    return [o async for o in wire.results(state, output)]


def test_openai_results_every_kind_output_file_then_error_file() -> None:
    fake = FakeOpenAI()
    fake.files["file-o"] = _jsonl(
        {"id": "batch_req_1", "custom_id": "ok", "response": {
            "status_code": 200, "request_id": "req_1", "body": _openai_answer("yes")},
         "error": None},
        {"id": "batch_req_2", "custom_id": "bad-body", "response": {
            "status_code": 200, "request_id": "req_2", "body": {"choices": []}}, "error": None})
    fake.files["file-e"] = _jsonl(
        {"id": "batch_req_3", "custom_id": "refused", "response": {
            "status_code": 400, "request_id": "req_3", "body": {"error": {
                "message": "max_tokens is too large", "type": "invalid_request_error",
                "param": "max_tokens", "code": None}}}, "error": None},
        {"id": "batch_req_4", "custom_id": "broke", "response": {
            "status_code": 500, "request_id": "req_4", "body": {"error": {
                "message": "The server had an error", "type": "server_error"}}},
         "error": None},
        {"id": "batch_req_5", "custom_id": "late", "response": None, "error": {
            "code": "batch_expired", "message": "This request could not be executed before "
                                                "the completion window expired."}},
        {"id": "batch_req_6", "custom_id": "stopped", "response": None, "error": {
            "code": "batch_cancelled", "message": "This request was cancelled."}},
        {"id": "batch_req_7", "custom_id": "odd", "response": None, "error": None})
    fake.add_batch(status="completed", output_file_id="file-o", error_file_id="file-e")
    wire = _wire("openai", fake)
    got = _run(_collect(wire, _run(wire.retrieve("batch_000"))))
    assert [(o.custom_id, o.kind, o.error_type, o.status_code) for o in got] == [
        ("ok", "succeeded", "", 200), ("bad-body", "errored", "malformed_response", 200),
        ("refused", "errored", "invalid_request_error", 400),
        ("broke", "errored", "server_error", 500), ("late", "expired", "batch_expired", None),
        ("stopped", "canceled", "batch_cancelled", None),
        ("odd", "errored", "malformed_result", None)]
    assert got[0].answer == wire.provider.parse(_openai_answer("yes"))
    assert all(o.answer is None for o in got[1:])
    assert "bad-body" in got[1].message and "IndexError" in got[1].message
    assert got[2].message == "max_tokens is too large"
    assert got[4].message.startswith("This request could not be executed")
    assert "odd" in got[6].message
    assert [c.url.path for c in fake.calls[1:]] == ["/v1/files/file-o/content",
                                                    "/v1/files/file-e/content"]


def test_openai_results_of_a_batch_with_no_files_are_empty() -> None:
    wire = _wire("openai")
    assert _run(_collect(wire, BatchState("b", "failed", True, failed_reason="x"))) == []


def test_anthropic_results_every_kind() -> None:
    fake = FakeAnthropic()
    fake.add_batch()
    schema = OutputSchema("pick", {"type": "object"})
    tool_answer = {**_anthropic_answer(), "stop_reason": "tool_use", "content": [
        {"type": "tool_use", "id": "t1", "name": "pick", "input": {"x": "b"}}]}
    fake.end("msgbatch_000", _jsonl(
        {"custom_id": "ok", "result": {"type": "succeeded", "message": tool_answer}},
        {"custom_id": "bad-body", "result": {"type": "succeeded", "message": {"content": []}}},
        {"custom_id": "refused", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "invalid_request_error",
                                       "message": "max_tokens: too large"}}}},
        {"custom_id": "broke", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "api_error", "message": "Internal error"}}}},
        {"custom_id": "stopped", "result": {"type": "canceled"}},
        {"custom_id": "late", "result": {"type": "expired"}},
        {"custom_id": "new", "result": {"type": "deferred"}},
        {"custom_id": "odd", "result": None}))
    wire = _wire("anthropic", fake)
    got = _run(_collect(wire, _run(wire.retrieve("msgbatch_000")), schema))
    assert [(o.custom_id, o.kind, o.error_type) for o in got] == [
        ("ok", "succeeded", ""), ("bad-body", "errored", "malformed_response"),
        ("refused", "errored", "invalid_request_error"), ("broke", "errored", "api_error"),
        ("stopped", "canceled", "canceled"), ("late", "expired", "expired"),
        ("new", "errored", "unknown_result"), ("odd", "errored", "malformed_result")]
    assert got[0].answer == wire.provider.parse(tool_answer, schema)
    assert got[0].answer is not None and got[0].answer.text == '{"x":"b"}'
    assert "bad-body" in got[1].message and "KeyError" in got[1].message
    assert got[2].message == "max_tokens: too large"
    assert all(o.status_code is None for o in got)
    assert [o.message != "" for o in got[4:6]] == [True, True]
    assert str(fake.calls[-1].url) == (
        "http://provider.test/v1/messages/batches/msgbatch_000/results")
    assert fake.calls[-1].headers["x-api-key"] == KEY


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_line_that_is_no_result_at_all_raises_naming_its_place(kind: str) -> None:
    good = (_jsonl({"custom_id": "ok", "response": {"status_code": 200, "body":
                                                     _openai_answer()}, "error": None})
            if kind == "openai" else
            _jsonl({"custom_id": "ok", "result": {"type": "succeeded",
                                                  "message": _anthropic_answer()}}))
    for bad in (b'{"custom_id": "cut', b'{"result": {}}', b"[1, 2]"):
        wire = _wire(kind, lambda req, bad=bad: httpx.Response(200, content=good + bad))
        state = BatchState("b1", "ended", True, output_file_id="f1",
                           results_url="http://provider.test/v1/messages/batches/b1/results")

        seen: list[str] = []

        async def read(wire: BatchWire = wire, state: BatchState = state,
                       seen: list[str] = seen) -> None:
            async for o in wire.results(state, None):
                seen.append(o.custom_id)

        with pytest.raises(TransientDispatchError,
                           match=r"b1.*: line 2 \(\d+ bytes\) is not a result line"):
            _run(read())
        assert seen == ["ok"]  # the lines before it were given


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_results_split_lines_at_newlines_only(kind: str) -> None:
    text = "one\u2028two\u2029three\x85four\x1cfive\rsix"  # str.splitlines would cut these
    line = ({"custom_id": "ok", "response": {"status_code": 200, "body": _openai_answer(text)},
             "error": None} if kind == "openai" else
            {"custom_id": "ok", "result": {"type": "succeeded",
                                           "message": _anthropic_answer(text)}})
    body = _jsonl(line, line).replace(b"\n", b"\r\n", 1) + b"\n\n"  # CRLF and blank lines too
    wire = _wire(kind, lambda req: httpx.Response(200, content=body))
    state = BatchState("b1", "ended", True, output_file_id="f1",
                       results_url="http://provider.test/v1/messages/batches/b1/results")
    got = _run(_collect(wire, state))
    assert [(o.kind, o.answer.text if o.answer else None) for o in got] == [
        ("succeeded", text), ("succeeded", text)]


class _Trickle(httpx.AsyncByteStream):
    """A response body served a few bytes at a time, counting what was read."""

    def __init__(self, body: bytes, size: int) -> None:
        self.chunks = [body[i:i + size] for i in range(0, len(body), size)]
        self.served = 0
        self.closed = False

    async def __aiter__(self) -> Any:
        for chunk in self.chunks:
            self.served += 1
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_results_are_streamed_line_by_line(kind: str) -> None:
    lines = [({"custom_id": f"r{i}", "response": {"status_code": 200,
                                                 "body": _openai_answer(f"a{i}")},
               "error": None} if kind == "openai" else
              {"custom_id": f"r{i}", "result": {"type": "succeeded",
                                                "message": _anthropic_answer(f"a{i}")}})
             for i in range(50)]
    body = _Trickle(_jsonl(*lines), 97)
    wire = _wire(kind, lambda req: httpx.Response(200, stream=body))
    state = BatchState("b1", "ended", True, output_file_id="f1",
                       results_url="http://provider.test/v1/messages/batches/b1/results")

    async def first_two() -> list[str]:
        async with contextlib.aclosing(wire.results(state, None)) as outcomes:
            seen = [o.custom_id async for o in _take(outcomes, 2)]
            assert not body.closed
        assert body.closed  # closing the results closes the response, at once
        return seen

    assert _run(first_two()) == ["r0", "r1"]
    assert body.served < len(body.chunks) / 10  # the rest was never read


async def _take(it: Any, n: int) -> Any:
    async for x in it:
        yield x
        n -= 1
        if not n:
            return


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_results_of_a_batch_still_running_are_refused(kind: str) -> None:
    state = BatchState("b1", "in_progress", False, output_file_id="f1", results_url="x")
    with pytest.raises(ValueError, match="b1 has not ended"):
        _run(_collect(_wire(kind), state))


def test_anthropic_sends_the_key_only_to_the_configured_host() -> None:
    state = BatchState("b1", "ended", True, results_url="https://elsewhere.test/b1/results")
    with pytest.raises(TerminalDispatchError, match="not on the configured host"):
        _run(_collect(_wire("anthropic"), state))  # _no_calls: nothing was sent
    state = BatchState("b1", "ended", True)
    with pytest.raises(TransientDispatchError, match="no results_url"):
        _run(_collect(_wire("anthropic"), state))


# --- find ---


def test_openai_find_pages_and_matches_metadata_exactly() -> None:
    fake = FakeOpenAI()
    mine = {"run": "r1", "file": "m-0001"}
    for i in range(250):
        fake.add_batch(metadata={"run": "r0", "file": "m-0001"})
        if i in (3, 120, 240):
            fake.add_batch(metadata=mine)
    fake.add_batch(metadata={**mine, "extra": "x"})
    fake.add_batch(metadata={"run": "r1"})
    fake.add_batch(metadata=None)
    wire = _wire("openai", fake)
    found = _run(wire.find(mine, 0))
    assert [b.id for b in found] == [b["id"] for b in reversed(fake.batches.values())
                                     if b["metadata"] == mine]
    assert len(found) == 3
    pages = [c.url.params for c in fake.calls]
    assert len(pages) == 3 and all(p["limit"] == "100" for p in pages)
    assert "after" not in pages[0]
    assert [p["after"] for p in pages[1:]] == [
        list(reversed(fake.batches))[99], list(reversed(fake.batches))[199]]
    # created_after bounds them too (the oldest of the three was created first)
    cut = fake.batches[found[1].id]["created_at"]
    assert [b.id for b in _run(wire.find(mine, cut))] == [b.id for b in found[:2]]


def test_anthropic_find_reads_newest_first_and_stops_before_created_after() -> None:
    fake = FakeAnthropic()
    for _ in range(2500):
        fake.add_batch()
    wire = _wire("anthropic", fake)
    cut = T0 + 1400  # batches 1400..2499 are candidates: the second page reaches back past it
    found = _run(wire.find({"ignored": "Anthropic has no metadata"}, cut))
    assert [b.id for b in found] == [f"msgbatch_{i:03d}" for i in range(2499, 1399, -1)]
    assert [c.url.params.get("after_id") for c in fake.calls] == [None, "msgbatch_1500"]
    assert all(c.url.params["limit"] == "1000" for c in fake.calls)


def test_a_list_whose_cursor_does_not_move_is_an_error_not_a_loop() -> None:
    page = {"data": [FakeOpenAI().add_batch()], "has_more": True, "last_id": "batch_000"}
    calls = 0

    def same_page(req: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        assert calls <= 3, "still asking for the same page"
        return httpx.Response(200, json=page)

    wire = _wire("openai", same_page)
    with pytest.raises(TransientDispatchError, match="cursor did not move"):
        _run(wire.find({}, 0))


# --- failures ---


def _steps(kind: str, tmp_path: Path) -> dict[str, Callable[[BatchWire], Awaitable[Any]]]:
    """Every call a wire makes, each with what its error message must name."""
    f = next(_wire(kind).write_files(_lines(1), tmp_path, "m"))
    ended = BatchState("b1", "ended", True, output_file_id="file-o",
                       results_url="http://provider.test/v1/messages/batches/b1/results")
    steps: dict[str, Callable[[BatchWire], Awaitable[Any]]] = {
        "creating batch for file m-0000": lambda w: w.create(
            f, "file-1" if kind == "openai" else None, {}),
        "retrieving batch b1": lambda w: w.retrieve("b1"),
        "cancelling batch b1": lambda w: w.cancel("b1"),
        "listing batches": lambda w: w.find({}, 0),
        "b1": lambda w: _collect(w, ended),
    }
    if kind == "openai":
        steps["uploading batch file m-0000.jsonl"] = lambda w: w.upload(f)
    return steps


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(("status", "error"), [
    (400, TerminalDispatchError), (404, TerminalDispatchError), (401, AuthError),
    (403, AuthError), (429, RateLimited), (408, TransientDispatchError),
    (409, TransientDispatchError), (500, TransientDispatchError),
    (529, TransientDispatchError)])
def test_http_failures_are_classified_and_name_the_step(kind: str, status: int,
                                                        error: type[Exception],
                                                        tmp_path: Path) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"retry-after": "7"},
                              json={"error": {"message": "the provider says no"}})

    for name, step in _steps(kind, tmp_path).items():
        with pytest.raises(error) as caught:
            _run(step(_wire(kind, handler)))
        assert type(caught.value) is error, name
        assert name in str(caught.value)
        assert f"HTTP {status}: the provider says no" in str(caught.value)
        assert caught.value.status == status  # type: ignore[attr-defined]
        if status == 429:
            assert caught.value.retry_after_s == 7.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
                                 httpx.RemoteProtocolError("cut")])
def test_transport_failures_are_transient_and_name_the_step(kind: str, exc: Exception,
                                                            tmp_path: Path) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise exc

    for name, step in _steps(kind, tmp_path).items():
        with pytest.raises(TransientDispatchError, match=name) as caught:
            _run(step(_wire(kind, handler)))
        assert type(exc).__name__ in str(caught.value)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("form", sorted(key_echoes(KEY)))
def test_no_form_of_an_echoed_key_reaches_an_exception(kind: str, form: str,
                                                       tmp_path: Path) -> None:
    echo = key_echoes(KEY)[form]

    def refuse(req: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": echo}})

    def drop(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(echo)

    for handler in (refuse, drop):
        for name, step in _steps(kind, tmp_path).items():
            with pytest.raises(TransientDispatchError if handler is drop else AuthError) as e:
                _run(step(_wire(kind, handler)))
            assert key_fragments(str(e.value), KEY) == [], (name, str(e.value))
            assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_no_echoed_key_reaches_a_line_outcome_or_a_failed_reason(kind: str) -> None:
    echo = key_echoes(KEY)["verbatim"] + " " + "z" * MAX_ERROR_CHARS
    line = ({"custom_id": "x", "response": {"status_code": 401, "body": {"error": {
        "message": echo, "type": "invalid_request_error"}}}, "error": None}
        if kind == "openai" else
        {"custom_id": "x", "result": {"type": "errored", "error": {
            "type": "error", "error": {"type": "authentication_error", "message": echo}}}})
    wire = _wire(kind, lambda req: httpx.Response(200, content=_jsonl(line)))
    state = BatchState("b1", "ended", True, output_file_id="f1",
                       results_url="http://provider.test/v1/messages/batches/b1/results")
    [got] = _run(_collect(wire, state))
    assert key_fragments(got.message, KEY) == [] and "***" in got.message
    assert len(got.message) == MAX_ERROR_CHARS
    if kind == "openai":
        fake = FakeOpenAI()
        fake.add_batch(status="failed", errors={"data": [{"code": "x", "message": echo}]})
        state = _run(_wire("openai", fake).retrieve("batch_000"))
        assert key_fragments(state.failed_reason, KEY) == [] and "***" in state.failed_reason
