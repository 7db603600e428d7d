"""The yardstick of ``batchroute bench dispatch --baseline``: a naive aiohttp loop.

What someone would write in an afternoon to push a table of prompts through a provider: one
``aiohttp.ClientSession`` for all models, one ``aiolimiter.AsyncLimiter`` per model at its
RPM (over one-second windows, as the mock enforces them), one semaphore per model for its
concurrency, ``json.dumps`` / ``json.loads``, no retries, no token bucket, no rate-limit
headers, no result table. A 429 or any other failure is counted and the row given up.

It lives with the benches, not in the product: it exists only so that the dispatch bench can
say how much CPU per request batchroute's client spends *relative to* this loop, measured in
the same run, on the same machine, against the same mock settings.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pyarrow as pa
from aiolimiter import AsyncLimiter

ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True)
class NaiveModel:
    """What the naive loop knows of one model."""

    name: str
    wire: str  # "openai" or "anthropic"
    url: str  # the full endpoint URL
    rpm: int
    concurrency: int


@dataclass
class NaiveStats:
    ok: int = 0
    failed: int = 0
    rate_limited: int = 0
    last_rate_limited_at: float | None = None  # loop time of the latest 429


async def run(models: list[NaiveModel], tables: list[pa.Table], key: str, *,
              max_tokens: int, timeout_s: float = 30.0
              ) -> tuple[list[NaiveStats], list[float]]:
    """Send every prompt of ``tables[i]`` to ``models[i]``; return each model's counters and
    the loop time at which its last reply came back."""
    loop = asyncio.get_running_loop()
    limit = sum(m.concurrency for m in models)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
    stats = [NaiveStats() for _ in models]
    finished = [0.0] * len(models)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                     timeout=timeout) as session:

        async def one(m: NaiveModel, limiter: AsyncLimiter, slots: asyncio.Semaphore,
                      headers: dict[str, str], prompt: str, s: NaiveStats) -> None:
            body = {"model": m.name, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": prompt}]}
            async with slots:
                await limiter.acquire()
                try:
                    async with session.post(m.url, data=json.dumps(body),
                                            headers=headers) as resp:
                        text = await resp.text()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    s.failed += 1
                    return
            if status == 429:
                s.rate_limited += 1
                s.last_rate_limited_at = loop.time()
            if status != 200:
                s.failed += 1
                return
            reply: dict[str, Any] = json.loads(text)
            usage = reply["usage"]
            if m.wire == "openai":
                _ = reply["choices"][0]["message"]["content"], usage["prompt_tokens"]
            else:
                _ = reply["content"][0]["text"], usage["input_tokens"]
            s.ok += 1

        async def model(i: int, m: NaiveModel, table: pa.Table) -> None:
            limiter = AsyncLimiter(m.rpm / 60.0, 1.0)
            slots = asyncio.Semaphore(m.concurrency)
            headers = ({"authorization": f"Bearer {key}", "content-type": "application/json"}
                       if m.wire == "openai" else
                       {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION,
                        "content-type": "application/json"})
            prompts = table.column("prompt").to_pylist()
            await asyncio.gather(*(one(m, limiter, slots, headers, p, stats[i])
                                   for p in prompts))
            finished[i] = loop.time()

        await asyncio.gather(*(model(i, m, t) for i, (m, t) in
                               enumerate(zip(models, tables, strict=True))))
    return stats, finished
