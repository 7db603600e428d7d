"""httpx's transport interface over one aiohttp connection pool, for whole-body JSON calls.

httpx is the dispatcher's HTTP API (requests, replies, and the transport seam tests fill with
``httpx.MockTransport``), but its own pool, httpcore, spends CPU that grows with the square of
the open connections, and a model at 1,000 calls/s with 300 ms latency keeps about 300 open.
aiohttp's connector does not. This adapter does only what a provider call needs: one POST,
the whole reply read at once, no redirects, no cookies, and aiohttp's failures raised as the
httpx exceptions the dispatcher already classifies.
"""

from __future__ import annotations

import asyncio

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session with at most ``connections`` open connections; ``timeout_s``
    bounds connecting and each wait for data."""

    def __init__(self, connections: int, timeout_s: float) -> None:
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                              sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:  # created on first use, inside the loop that uses it
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                cookie_jar=aiohttp.DummyCookieJar(), timeout=self._timeout)
        # The dispatcher's bodies are whole bytes: join them without httpx's async read, and
        # hand aiohttp a ready payload so it skips its per-call payload-type lookup.
        stream = request.stream
        data = (b"".join(stream) if isinstance(stream, httpx.ByteStream)
                else await request.aread())
        try:
            async with self._session.request(
                    request.method, str(request.url), headers=request.headers.multi_items(),
                    data=aiohttp.payload.BytesPayload(data) if data else None,
                    allow_redirects=False) as resp:
                body = await resp.read()
        except TimeoutError as exc:  # aiohttp's socket timeouts are TimeoutErrors too
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError) as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        except aiohttp.ClientResponseError as exc:  # not HTTP, or a broken status line
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from exc
        headers = resp.raw_headers
        if resp.headers.get("Content-Encoding"):  # aiohttp already decoded the body
            headers = tuple((k, v) for k, v in headers
                            if k.lower() not in (b"content-encoding", b"content-length"))
        # A whole body in hand: stream= and read() skip httpx re-deriving Content-Length.
        reply = httpx.Response(resp.status, headers=headers, stream=httpx.ByteStream(body),
                               request=request)
        reply.read()
        return reply

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            # Let aiohttp's connections finish closing before the loop goes away.
            await asyncio.sleep(0)
