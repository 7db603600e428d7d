"""The lean HTTP/1.1 client (LeanTransport) against tiny asyncio servers on loopback.

Each server writes its replies byte for byte, so the tests can send what real servers send
now and then: chunked bodies in pieces, odd header casing, a close in mid-reply, silence.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from batchroute import config
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from batchroute.stages.dispatch.providers import rate_limit_state
from batchroute.stages.dispatch.transport import LeanTransport, Reply
from tests.helpers import CHEAP, job_doc, routed_rows

pytestmark = pytest.mark.integration
HEADERS = (("content-type", "application/json"), ("authorization", "Bearer k"))


@dataclass
class Seen:
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    open_now: int = 0
    most_open: int = 0


# (what was seen, the request number from 0, the writer) -> True to keep the connection open
Respond = Callable[[Seen, int, asyncio.StreamWriter], Awaitable[bool]]


async def _serve(respond: Respond, seen: Seen, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    seen.connections += 1
    seen.open_now += 1
    seen.most_open = max(seen.most_open, seen.open_now)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                return
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
            seen.requests.append((head, body))
            if not await respond(seen, len(seen.requests) - 1, writer):
                return
    finally:
        seen.open_now -= 1
        writer.close()


async def _with_server(respond: Respond, calls: Callable[[str], Awaitable[Any]]
                       ) -> tuple[Any, Seen]:
    seen = Seen()
    server = await asyncio.start_server(lambda r, w: _serve(respond, seen, r, w),
                                        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await calls(f"http://127.0.0.1:{port}/v1/chat/completions"), seen
    finally:
        server.close()


def _reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _ok(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
    writer.write(_reply(json.dumps({"n": n, "got": seen.requests[n][1].decode()}).encode(),
                        "Content-Type: application/json"))
    await writer.drain()
    return True


def _posts(n: int, transport: LeanTransport | None = None, *, concurrent: bool = False
           ) -> Callable[[str], Awaitable[list[Reply]]]:
    async def go(url: str) -> list[Reply]:
        t = transport or LeanTransport(4, 5.0)
        try:
            if concurrent:
                return list(await asyncio.gather(*(t.post(url, HEADERS, b'{"q":%d}' % i)
                                                   for i in range(n))))
            return [await t.post(url, HEADERS, b'{"q":%d}' % i) for i in range(n)]
        finally:
            await t.aclose()
    return go


def test_calls_reuse_one_keep_alive_connection_and_send_body_and_headers() -> None:
    replies, seen = asyncio.run(_with_server(_ok, _posts(5)))
    assert seen.connections == 1
    assert [r.json() for r in replies] == [{"n": i, "got": f'{{"q":{i}}}'} for i in range(5)]
    head = seen.requests[0][0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "\r\nHost: 127.0.0.1:" in head and "\r\nauthorization: Bearer k\r\n" in head
    assert "\r\nContent-Length: 7\r\n\r\n" in head


def test_at_most_the_pool_size_of_connections_is_open() -> None:
    async def slow(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.02)
        return await _ok(seen, n, writer)

    replies, seen = asyncio.run(_with_server(slow, _posts(8, LeanTransport(2, 5.0),
                                                          concurrent=True)))
    assert sorted(r.json()["got"] for r in replies) == sorted(f'{{"q":{i}}}' for i in range(8))
    assert seen.most_open <= 2 and seen.connections == 2


def test_a_chunked_reply_arriving_in_pieces_is_joined() -> None:
    async def chunked(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        parts = [b'{"answer": ', b'"' + b"x" * 3000 + b'"', b"}"]
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in parts:
            writer.write(b"%x;ext=1\r\n" % len(part))
            await writer.drain()
            await asyncio.sleep(0.005)  # each piece in a packet of its own
            writer.write(part + b"\r\n")
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()
        return True

    replies, seen = asyncio.run(_with_server(chunked, _posts(2)))
    assert [r.json() for r in replies] == [{"answer": "x" * 3000}] * 2
    assert seen.connections == 1  # the connection is reused after a chunked reply


def test_odd_header_casing_is_read_and_a_gzip_body_decoded() -> None:
    async def odd(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(_reply(gzip.compress(b'{"a": 1}'), "X-RateLimit-Remaining-Requests: 7",
                            "x-RATELIMIT-limit-TOKENS:  900 ", "Content-Encoding: GZIP",
                            "retry-AFTER: 2"))
        await writer.drain()
        return True

    (reply,), _ = asyncio.run(_with_server(odd, _posts(1)))
    assert reply.json() == {"a": 1}
    assert reply.headers.get("Retry-After") == "2"
    assert (b"x-ratelimit-limit-tokens", b"900") in reply.headers.raw
    state = rate_limit_state(reply.headers)
    assert state.remaining_requests == 7 and state.limit_tokens == 900


def test_connection_close_and_a_body_ending_with_the_connection() -> None:
    async def closing(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        if n % 2 == 0:
            writer.write(_reply(b'{"n": %d}' % n, "Connection: close"))
        else:  # no length at all: the body is what comes before the close
            writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"n": %d}' % n)
        await writer.drain()
        return False

    replies, seen = asyncio.run(_with_server(closing, _posts(4)))
    assert [r.json() for r in replies] == [{"n": i} for i in range(4)]
    assert seen.connections == 4


def test_a_close_in_mid_reply_is_a_read_error() -> None:
    async def drop(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"half")
        await writer.drain()
        return False

    with pytest.raises(httpx.ReadError, match="mid-reply"):
        asyncio.run(_with_server(drop, _posts(1)))


def test_a_garbled_status_line_is_a_protocol_error() -> None:
    async def garbage(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        return True

    with pytest.raises(httpx.RemoteProtocolError):
        asyncio.run(_with_server(garbage, _posts(1)))


def test_a_silent_server_is_a_read_timeout() -> None:
    async def silent(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(2)
        return False

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(_with_server(silent, _posts(1, LeanTransport(1, 0.1))))


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        asyncio.run(_posts(1)(f"http://127.0.0.1:{port}/v1/chat/completions"))


def test_an_https_url_goes_over_tls_and_the_certificate_is_checked(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)

    async def go(trusted: bool) -> list[Any]:
        seen = Seen()
        server = await asyncio.start_server(lambda r, w: _serve(_ok, seen, r, w), "127.0.0.1",
                                            0, ssl=server_side)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=str(cert)) if trusted else None
        t = LeanTransport(2, 5.0, ssl_context=client)  # None: the system's CAs
        try:
            return [(await t.post(f"https://127.0.0.1:{port}/v1/x", HEADERS, b"{}")).json()
                    for _ in range(2)] + [seen.connections]
        finally:
            await t.aclose()
            server.close()

    assert asyncio.run(go(trusted=True)) == [{"n": 0, "got": "{}"}, {"n": 1, "got": "{}"}, 1]
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(go(trusted=False))


def _routed(n: int) -> pa.Table:
    return routed_rows(n)


def test_the_dispatcher_retries_a_reply_cut_in_mid_body_on_a_new_connection() -> None:
    answer = json.dumps({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 8, "completion_tokens": 2}}).encode()

    async def first_drops(seen: Seen, n: int, writer: asyncio.StreamWriter) -> bool:
        if n == 0:
            writer.write(_reply(answer)[:-10])
            await writer.drain()
            return False
        writer.write(_reply(answer, "Content-Type: application/json"))
        await writer.drain()
        return True

    async def go(url: str) -> tuple[list[dict[str, Any]], int]:
        doc = job_doc(url.removesuffix("/chat/completions"))
        doc["dispatch"].update(backoff_base_s=0.001, backoff_max_s=0.002)
        job = config.parse(doc)
        d = ModelDispatcher(job.models[CHEAP], job.dispatch, run_id="t", api_key="k")
        try:
            return (await d.dispatch(_routed(1))).to_pylist(), d.stats.retries
        finally:
            await d.aclose()

    (rows, retries), seen = asyncio.run(_with_server(first_drops, go))
    assert [(r["status"], r["response"], r["attempts"]) for r in rows] == [("ok", "fine", 2)]
    assert retries == 1 and seen.connections == 2
