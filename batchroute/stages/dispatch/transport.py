"""The dispatcher's HTTP: one small seam, a lean HTTP/1.1 client for real runs, and an adapter
from httpx transports for tests.

The seam is :class:`PostTransport`: ``post(url, headers, body)`` returns a :class:`Reply`
(status, headers, whole body), or raises httpx's exceptions (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``), which the
dispatcher already classifies. A provider call needs nothing more: one POST of a whole JSON
body to the same URL with the same headers, the whole reply read at once, no redirects, no
cookies, no proxies.

:class:`LeanTransport` is the default. At a thousand calls a second, a general client's
per-call machinery (aiohttp's request and response objects, its payload writer, httpx's
Request and Response around them) cost more CPU than everything else dispatch does, so this
one does only what the call needs, on asyncio's own protocol interface:

* one :class:`_Connection` (an ``asyncio.Protocol``) per keep-alive connection, at most
  ``connections`` per origin, reused last-in first-out (a warm connection first);
* the request line and headers rendered once per (URL, headers), so a call writes that block,
  its Content-Length and its body in one ``write``;
* a minimal reply parser: the status line, headers (names lowercased, values as sent),
  ``Content-Length``, ``Transfer-Encoding: chunked``, or a body ending with the connection;
  ``Connection: close`` and HTTP/1.0 replies are honoured; a gzip or deflate body (which a
  server should not send unasked) is decoded;
* TLS through asyncio's ``ssl=`` with the system's default context, for ``https`` URLs;
* ``timeout_s`` bounds connecting and each wait for data (checked a few times per timeout
  by one timer per origin, not a timer per call).

:class:`HttpxTransport` wraps any ``httpx.AsyncBaseTransport`` (the unit tests'
``httpx.MockTransport``) behind the same seam.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import zlib
from collections import deque
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import httpx
import orjson

Headers = tuple[tuple[str, str], ...]
RawHeaders = list[tuple[bytes, bytes]]
MAX_HEAD_BYTES = 64 * 1024  # a reply whose status line and headers do not fit is refused
# A call's wait for data is checked this many times per timeout: a silent server is given up
# between timeout_s and (1 + 1/SWEEPS_PER_TIMEOUT) x timeout_s after its last byte.
SWEEPS_PER_TIMEOUT = 4


class ReplyHeaders:
    """A reply's headers, kept as the head block that carried them (``CRLF name: value`` per
    header; a status line before them is ignored). :meth:`first` finds one header with a
    search of the lowercased block instead of splitting it: a provider's reply carries a few
    dozen headers, and a reply is read for a handful. ``raw`` splits them all, on demand."""

    __slots__ = ("_head", "_low", "_raw")

    def __init__(self, head: bytes) -> None:
        self._head = head
        self._low = head.lower()  # ASCII only: offsets are the same in both
        self._raw: RawHeaders | None = None

    @classmethod
    def of(cls, raw: RawHeaders) -> ReplyHeaders:
        return cls(b"".join(b"\r\n" + k + b": " + v for k, v in raw))

    def first(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), blanks stripped; else None."""
        at = self._low.find(b"\r\n" + name + b":")
        if at < 0:
            return None
        end = self._low.find(b"\r\n", at + 2)
        return self._head[at + len(name) + 3:end if end >= 0 else len(self._head)].strip()

    def get(self, key: str, default: Any = None) -> Any:
        """The first value of header ``key`` (any casing) as text, else ``default``."""
        value = self.first(key.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def lowered(self, pattern: re.Pattern[bytes]) -> list[Any]:
        """``pattern.findall`` over the lowercased head (names and values lowercased): the
        headers a reader wants, in one search."""
        return pattern.findall(self._low)

    @property
    def raw(self) -> RawHeaders:
        """Every header as a (lowercased name, value) pair, in order."""
        if self._raw is None:
            names = _NAMES.findall(self._low)
            values = [v.strip() for v in _VALUES.findall(self._head)]
            self._raw = list(zip(names, values, strict=True))
        return self._raw


class Reply:
    """One HTTP reply, read whole. Offers what the provider code reads of ``httpx.Response``
    (``status_code``, ``headers.get``/``headers.raw``, ``json()``, ``text``,
    ``reason_phrase``), so one code path reads both."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(self, status_code: int, headers: ReplyHeaders, content: bytes,
                 reason_phrase: str = "") -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.reason_phrase = reason_phrase

    def json(self, **kwargs: Any) -> Any:
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class PostTransport(Protocol):
    """The dispatcher's HTTP seam: POST ``body`` to ``url`` with ``headers``, read the reply
    whole. Raises httpx's transport exceptions."""

    async def post(self, url: str, headers: Headers, body: bytes) -> Reply: ...

    async def aclose(self) -> None: ...


class HttpxTransport:
    """Any httpx transport (``httpx.MockTransport`` in tests) behind :class:`PostTransport`."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout_s: float = 30.0) -> None:
        self._transport = transport
        self._timeout = {"timeout": httpx.Timeout(timeout_s).as_dict()}

    async def post(self, url: str, headers: Headers, body: bytes) -> Reply:
        request = httpx.Request("POST", url, headers=list(headers), content=body,
                                extensions=self._timeout)
        resp = await self._transport.handle_async_request(request)
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
        return Reply(resp.status_code, ReplyHeaders.of([(k.lower(), v)
                                                         for k, v in resp.headers.raw]),
                     content, resp.reason_phrase)

    async def aclose(self) -> None:
        await self._transport.aclose()


class LeanTransport:
    """Keep-alive HTTP/1.1 POSTs: at most ``connections`` open connections per origin;
    ``timeout_s`` bounds connecting and each wait for data. Create and use it inside one
    event loop."""

    def __init__(self, connections: int, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if connections < 1 or timeout_s <= 0:
            raise ValueError("need connections >= 1 and timeout_s > 0")
        self._connections = connections
        self._timeout = timeout_s
        self._ssl = ssl_context
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        # (url, headers) -> the origin's pool and the rendered request head up to the
        # Content-Length value.
        self._targets: dict[tuple[str, Headers], tuple[_Pool, bytes]] = {}

    async def post(self, url: str, headers: Headers, body: bytes) -> Reply:
        target = self._targets.get((url, headers))
        if target is None:
            target = self._targets[(url, headers)] = self._target(url, headers)
        pool, head = target
        conn = await pool.acquire()
        reusable = False
        try:
            reply, reusable = await conn.exchange(
                b"".join((head, str(len(body)).encode(), b"\r\n\r\n", body)), self._timeout)
        finally:
            pool.release(conn, reusable)
        return reply

    def _target(self, url: str, headers: Headers) -> tuple[_Pool, bytes]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        key = (parts.scheme, parts.hostname, port)
        pool = self._pools.get(key)
        if pool is None:
            context = None
            if tls:
                context = self._ssl = self._ssl or ssl.create_default_context()
            pool = self._pools[key] = _Pool(parts.hostname, port, context, self._connections,
                                            self._timeout)
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:  # an IPv6 literal keeps its brackets in Host
            host = parts.netloc.rpartition("@")[2]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}"]
        for name, value in headers:
            if any(c in name or c in value for c in "\r\n") or ":" in name:
                raise ValueError(f"header {name!r} has a line break or a colon in its name")
            if name.lower() not in ("host", "content-length", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        lines.append("Content-Length: ")
        return pool, "\r\n".join(lines).encode("latin-1")

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()
        await asyncio.sleep(0)  # let the transports finish closing before the loop goes away


class _Pool:
    """The open connections to one origin: idle ones kept last-in first-out, at most
    ``limit`` open, callers beyond that queued first-in first-out."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, limit: int,
                 timeout_s: float) -> None:
        self.host, self.port, self.context = host, port, context
        self.limit = limit
        self.timeout_s = timeout_s
        self.open = 0
        self.idle: list[_Connection] = []
        # Each gets an idle connection, or None: a slot is free, open a new one.
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        # Connections waiting for a reply, checked every SWEEPS_PER_TIMEOUT-th of the timeout
        # by one timer (not a timer per call: arming and cancelling one per call costs more
        # than the check).
        self.busy: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def watch(self, conn: _Connection) -> None:
        self.busy.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.timeout_s / SWEEPS_PER_TIMEOUT, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for conn in [c for c in self.busy if c.timed_out(now)]:
            self.busy.discard(conn)
        if self.busy:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.timeout_s / SWEEPS_PER_TIMEOUT, self._sweep)

    async def acquire(self) -> _Connection:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
            if self.open < self.limit:
                return await self._connect()
            waiter: asyncio.Future[_Connection | None] = (
                asyncio.get_running_loop().create_future())
            self.waiters.append(waiter)
            try:
                conn_or_slot = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # handed over as we were cancelled
                    handed = waiter.result()
                    if handed is not None:
                        self.release(handed, True)
                    else:
                        self._wake(None)  # pass the free slot on
                raise
            if conn_or_slot is not None and not conn_or_slot.closed:
                return conn_or_slot

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self.open += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.context,
                    server_hostname=self.host if self.context is not None else None)
        except BaseException as exc:
            self.open -= 1
            self._wake(None)
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} timed "
                                           f"out after {self.timeout_s:g} s") from exc
            if isinstance(exc, OSError):
                raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: "
                                         f"{exc}") from exc
            raise
        return conn

    def release(self, conn: _Connection, reusable: bool) -> None:
        if not reusable or conn.closed:
            conn.close()  # counted out of `open` by forget(), once
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """``conn`` is closed: it no longer counts, and its slot goes to a waiter."""
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake(None)

    def _wake(self, value: _Connection | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(value)
                return

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request written, its reply parsed, then the next."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[tuple[Reply, bool]] | None = None
        self._timeout_s = 0.0
        self._last_data = 0.0
        self._buf = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._buf.clear()
        self._status = 0  # 0: the head is not parsed yet
        self._reason = ""
        self._headers = ReplyHeaders(b"")
        self._keep_alive = True
        self._encoding = b""
        self._length = -1  # Content-Length; -1 unknown
        self._chunked = False
        self._to_eof = False
        self._pos = 0  # where the body (or the next chunk's size line) starts in _buf
        self._chunks: list[bytes] = []

    # -- the caller's side ------------------------------------------------------------------

    async def exchange(self, request: bytes, timeout_s: float) -> tuple[Reply, bool]:
        """Write ``request``; return its reply and whether the connection can be reused."""
        assert self._transport is not None
        assert self._waiter is None
        waiter: asyncio.Future[tuple[Reply, bool]] = self._loop.create_future()
        self._waiter = waiter
        self._timeout_s = timeout_s
        self._last_data = self._loop.time()
        self._pool.watch(self)
        try:
            self._transport.write(request)
            return await waiter
        except BaseException:
            self.close()  # cancelled or failed half-way: the stream's state is unknown
            raise
        finally:
            self._waiter = None
            self._pool.busy.discard(self)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()

    def timed_out(self, now: float) -> bool:
        """Fail the call in progress if no data came for ``timeout_s``; True if it did."""
        if now - self._last_data < self._timeout_s:
            return False
        self._fail(httpx.ReadTimeout(f"no data for {self._timeout_s:g} s"))
        return True

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports (which Ray's workers use when uvloop
        # is installed) are no subclasses of asyncio's.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():  # nothing was asked: not HTTP
            self.close()
            return
        self._last_data = self._loop.time()
        self._buf += data
        try:
            if self._parse():
                self._deliver()
        except (ValueError, IndexError, zlib.error) as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP reply: {exc}"))

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._pool.forget(self)
        if self._waiter is None or self._waiter.done():
            return
        if self._to_eof and self._status:  # the body was everything until the close
            self._chunks = [bytes(self._buf[self._pos:])]
            self._keep_alive = False
            try:
                self._deliver()
            except (ValueError, zlib.error) as err:
                self._fail(httpx.RemoteProtocolError(f"malformed HTTP reply: {err}"))
            return
        where = "before the reply" if not self._status else "mid-reply"
        self._waiter.set_exception(httpx.ReadError(
            f"connection closed {where}" + (f": {exc}" if exc else "")))

    # -- the reply ----------------------------------------------------------------------------

    def _deliver(self) -> None:
        body = b"".join(self._chunks)
        if self._encoding:
            body = _decoded(body, self._encoding.decode("latin-1"))
        reply = Reply(self._status, self._headers, body, self._reason)
        keep = self._keep_alive
        assert self._waiter is not None
        self._waiter.set_result((reply, keep))
        self._reset()

    def _parse(self) -> bool:
        """Advance over what has arrived; True once the reply is complete."""
        buf = self._buf
        while not self._status:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise ValueError("the reply's head is too long")
                return False
            self._head(bytes(buf[:end]))
            if 100 <= self._status < 200:  # an interim reply (100 Continue): skip it
                del buf[:end + 4]
                self._status = 0
                continue
            self._pos = end + 4
        if self._chunked:
            return self._parse_chunks()
        if self._to_eof:
            return False
        if len(buf) - self._pos < self._length:
            return False
        self._chunks = [bytes(buf[self._pos:self._pos + self._length])]
        return True

    def _head(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        status_line = head if line_end < 0 else head[:line_end]
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
            raise ValueError(f"bad status line {status_line[:80]!r}")
        self._status = int(code)
        self._reason = reason.decode("latin-1")
        headers = self._headers = ReplyHeaders(head)
        connection = b""
        for name, value in headers.lowered(_FRAMING):  # the first of each counts
            value = value.strip()
            if name == b"content-length" and self._length < 0:
                self._length = int(value)
                if self._length < 0:
                    raise ValueError("negative Content-Length")
            elif name == b"transfer-encoding":
                self._chunked = self._chunked or value.endswith(b"chunked")
            elif name == b"content-encoding":
                self._encoding = self._encoding or value
            elif name == b"connection":
                connection = connection or value
        self._keep_alive = (b"close" not in connection
                            and (version == b"HTTP/1.1" or b"keep-alive" in connection))
        if self._status in (204, 304):
            self._length, self._chunked = 0, False
        elif not self._chunked and self._length < 0:
            self._to_eof = True  # no length given: the body ends with the connection
            self._keep_alive = False

    def _parse_chunks(self) -> bool:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n", self._pos)
            if line_end < 0:
                return False
            size = int(bytes(buf[self._pos:line_end]).split(b";", 1)[0].strip(), 16)
            if size == 0:  # the last chunk, then optional trailers and an empty line
                if buf[line_end + 2:line_end + 4] == b"\r\n":
                    return True
                return buf.find(b"\r\n\r\n", line_end) >= 0
            start = line_end + 2
            if len(buf) < start + size + 2:
                return False
            if buf[start + size:start + size + 2] != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")
            self._chunks.append(bytes(buf[start:start + size]))
            self._pos = start + size + 2


# The headers that frame a reply's body, found in the lowercased head.
_FRAMING = re.compile(
    rb"\r\n(content-length|transfer-encoding|content-encoding|connection):[ \t]*([^\r\n]*)")
# A header line's name (matched in the lowercased head) and its value (in the head as sent);
# the status line matches neither.
_NAMES = re.compile(rb"\r\n([^:\r\n]*):")
_VALUES = re.compile(rb"\r\n[^:\r\n]*:[ \t]*([^\r\n]*)")


def _decoded(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send
    if encoding == "identity":
        return body
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")
