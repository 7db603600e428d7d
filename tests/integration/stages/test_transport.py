"""The aiohttp-backed httpx transport against small servers on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from batchroute.stages.dispatch.transport import AiohttpTransport

pytestmark = pytest.mark.integration

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _call(handler: Handler, body: bytes = b"{}", timeout_s: float = 5.0
                ) -> httpx.Response:
    app = web.Application()
    app.router.add_post("/v1/chat", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    transport = AiohttpTransport(4, timeout_s)
    try:
        return await transport.handle_async_request(httpx.Request(
            "POST", f"http://127.0.0.1:{port}/v1/chat", stream=httpx.ByteStream(body),
            headers={"content-type": "application/json", "x-api-key": "k"},
            extensions={"timeout": httpx.Timeout(timeout_s).as_dict()}))
    finally:
        await transport.aclose()
        await runner.cleanup()


def test_body_and_headers_reach_the_server_and_the_reply_comes_back_whole() -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response({"got": await request.json(),
                                  "key": request.headers["x-api-key"],
                                  "length": request.headers["content-length"]},
                                 headers={"x-ratelimit-remaining-requests": "7"})

    resp = asyncio.run(_call(echo, b'{"q": 1}'))
    assert resp.status_code == 200 and resp.json() == {"got": {"q": 1}, "key": "k",
                                                       "length": "8"}
    assert resp.headers["x-ratelimit-remaining-requests"] == "7"


def test_a_compressed_reply_is_decoded_once() -> None:
    async def gz(request: web.Request) -> web.StreamResponse:
        payload = gzip.compress(json.dumps({"answer": "x" * 500}).encode())
        return web.Response(body=payload, headers={"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})

    assert asyncio.run(_call(gz)).json() == {"answer": "x" * 500}


def test_a_slow_server_is_an_httpx_timeout() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(1.0)
        return web.json_response({})

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(_call(slow, timeout_s=0.1))
