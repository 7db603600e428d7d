"""One model's limiter: buckets, AIMD pacing, the provider's rate-limit headers, and token
reconciliation. Every test runs on a virtual clock (tests.helpers.VirtualClockLoop): the waits
are exact and nothing sleeps."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import httpx
import pytest

from batchroute.stages.dispatch.limits import ADMIT_TICK_S, MIN_FACTOR, ModelLimits
from batchroute.stages.dispatch.providers import RateLimitState, rate_limit_state
from tests.helpers import run_on_virtual_clock


def test_openai_and_anthropic_headers_parse_to_the_most_restrictive_bucket() -> None:
    openai = httpx.Headers({"X-RateLimit-Limit-Requests": "10000",
                            "x-ratelimit-remaining-requests": "9998",
                            "x-ratelimit-limit-tokens": "2000000",
                            "x-ratelimit-remaining-tokens": "1999000",
                            "x-ratelimit-reset-requests": "6ms"})
    assert rate_limit_state(openai) == RateLimitState(10000, 9998, 2000000, 1999000)
    anthropic = httpx.Headers({"anthropic-ratelimit-requests-limit": "50",
                               "anthropic-ratelimit-requests-remaining": "12",
                               "anthropic-ratelimit-tokens-remaining": "900",
                               "anthropic-ratelimit-input-tokens-remaining": "400",
                               "anthropic-ratelimit-output-tokens-remaining": "800"})
    assert rate_limit_state(anthropic) == RateLimitState(50, 12, None, 400)
    garbage = httpx.Headers({"x-ratelimit-remaining-requests": "lots",
                             "x-ratelimit-remaining-tokens": "-3"})
    assert rate_limit_state(garbage).empty and rate_limit_state(httpx.Headers()).empty


async def _starts(limits: ModelLimits, n: int) -> list[float]:
    """The loop times at which ``n`` one-token requests in a row are admitted."""
    loop = asyncio.get_running_loop()
    starts = []
    for _ in range(n):
        await limits.acquire(1)
        starts.append(loop.time())
        limits.release()
    return starts


def _elapsed(calls: Callable[[], Awaitable[None]]) -> float:
    async def go() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await calls()
        return loop.time() - t0
    return run_on_virtual_clock(go())


def test_a_provider_bucket_with_less_room_makes_the_next_call_wait_for_its_refill() -> None:
    async def calls(remaining: int | None) -> None:
        # 600 RPM = 10 requests/s; our bucket holds a second's worth (10).
        limits = ModelLimits(rpm=600, tpm=10**9, concurrency=50, largest_request_tokens=10)
        await limits.acquire(1)
        limits.release()
        if remaining is not None:
            limits.observe(RateLimitState(remaining_requests=remaining))
        await limits.acquire(1)
        limits.release()

    assert _elapsed(lambda: calls(None)) == 0.0
    assert _elapsed(lambda: calls(9)) == 0.0  # the provider has as much room as we do
    assert _elapsed(lambda: calls(0)) == pytest.approx(0.1, abs=1e-6)  # one refill interval


def test_a_provider_limit_below_the_catalog_caps_the_pace() -> None:
    async def go() -> list[float]:
        limits = ModelLimits(rpm=6000, tpm=10**9, concurrency=8, largest_request_tokens=10)
        limits.observe(RateLimitState(limit_requests=1500, limit_tokens=10**12))
        assert limits.ceiling == pytest.approx(0.25) and limits.factor == pytest.approx(0.25)
        for _ in range(100):
            limits.speed_up()
        assert limits.factor == pytest.approx(0.25)  # successes do not climb past the provider
        limits.observe(RateLimitState(remaining_requests=1400))  # no limit header: kept
        assert limits.ceiling == pytest.approx(0.25)
        return await _starts(limits, 4)

    starts = run_on_virtual_clock(go())
    # 1,500 RPM: starts 40 ms apart instead of 10 ms
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [0.04] * 3


def test_a_provider_token_limit_below_the_catalog_slows_the_token_bucket_only() -> None:
    async def go() -> tuple[float, float]:
        # 6,000 tokens/min = 100/s; the bucket holds a second's worth.
        limits = ModelLimits(rpm=10**6, tpm=6000, concurrency=50, largest_request_tokens=10)
        limits.observe(RateLimitState(limit_tokens=3000))  # the key gets half
        assert limits.factor == 1.0  # requests are not paced: small ones still flow
        loop = asyncio.get_running_loop()
        await limits.acquire(10)
        limits.release()
        for _ in range(5):  # drain what the bucket held
            await limits.acquire(10)
            limits.release()
        t0 = loop.time()
        for _ in range(5):  # 50 tokens at 50 tokens/s
            await limits.acquire(10)
            limits.release()
        half = loop.time() - t0
        # Above the catalog: the catalog's rate holds again (and the bucket, twice as big,
        # has 50 tokens of room at once).
        limits.observe(RateLimitState(limit_tokens=10**9))
        t0 = loop.time()
        for _ in range(10):  # 50 tokens free, then 50 at 100 tokens/s
            await limits.acquire(10)
            limits.release()
        return half, loop.time() - t0

    half, full = run_on_virtual_clock(go())
    assert half == pytest.approx(1.0, abs=1e-6) and full == pytest.approx(0.5, abs=1e-6)


def test_reported_prompt_tokens_settle_the_estimate() -> None:
    async def after(estimated: int, reported: int) -> float:
        # 600 tokens/min = 10/s; the bucket holds 10 tokens.
        limits = ModelLimits(rpm=10**6, tpm=600, concurrency=50, largest_request_tokens=10)
        await limits.acquire(10)
        limits.release()
        limits.reconcile(estimated, reported)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await limits.acquire(6)
        limits.release()
        return loop.time() - t0

    assert run_on_virtual_clock(after(10, 10)) == pytest.approx(0.6, abs=1e-6)
    assert run_on_virtual_clock(after(10, 4)) == 0.0  # 6 tokens came back: no wait
    assert run_on_virtual_clock(after(10, 14)) == pytest.approx(1.0, abs=1e-6)  # 4 of debt


def test_token_bucket_admits_the_largest_request_despite_rounding() -> None:


    async def go() -> None:
        limits = ModelLimits(rpm=1000, tpm=13_961, concurrency=1, largest_request_tokens=4096)
        await limits.acquire(4096)
        limits.release()
        with pytest.raises(ValueError, match="exceeds the largest admissible"):
            await limits.acquire(4097)

    run_on_virtual_clock(go())


def test_429_paces_the_model_down_and_success_brings_it_back() -> None:


    async def go() -> list[float]:
        limits = ModelLimits(rpm=6000, tpm=10**9, concurrency=8, largest_request_tokens=10)
        for t in (0.0, 0.5, 1.0, 1.2, 2.5):  # a burst of 429s counts once per second
            limits.slow_down(t)
        assert limits.factor == pytest.approx(0.125)
        starts = await _starts(limits, 4)
        for _ in range(200):
            limits.speed_up()
        assert limits.factor == 1.0
        for t in range(100):
            limits.slow_down(float(t))
        assert limits.factor == MIN_FACTOR
        return starts

    starts = run_on_virtual_clock(go())
    # 6,000 RPM x 0.125 = 12.5 requests/s: starts 80 ms apart instead of 10 ms
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [0.08] * 3


def test_waiters_are_admitted_in_arrival_order_at_the_refill_rate() -> None:
    # 60 RPM = 1 token/s in a bucket of 1; a cancelled waiter's turn passes to the next.
    async def go() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        limits = ModelLimits(rpm=60, tpm=10**9, concurrency=10, largest_request_tokens=1)
        admitted: list[tuple[str, float]] = []

        async def one(name: str) -> None:
            await limits.acquire(1)
            admitted.append((name, loop.time()))
            limits.release()

        tasks = [asyncio.ensure_future(one(n)) for n in "abcde"]
        await asyncio.sleep(0.5)
        tasks[2].cancel()  # "c" gives up while queued
        await asyncio.gather(*tasks, return_exceptions=True)
        return admitted

    assert run_on_virtual_clock(go()) == [("a", 0.0), ("b", 1.0), ("d", 2.0), ("e", 3.0)]


def test_a_large_token_request_is_not_overtaken_by_smaller_ones() -> None:
    async def go() -> list[int]:
        # 10 tokens/s, a bucket of 10
        limits = ModelLimits(rpm=10**6, tpm=600, concurrency=10, largest_request_tokens=10)
        order: list[int] = []

        async def one(tokens: int) -> None:
            await limits.acquire(tokens)
            order.append(tokens)
            limits.release()

        await limits.acquire(10)  # empty now
        limits.release()
        await asyncio.gather(*(one(t) for t in (10, 1, 1)))
        return order

    assert run_on_virtual_clock(go()) == [10, 1, 1]


def test_a_fast_bucket_admits_its_waiters_in_ticks_at_its_full_rate() -> None:
    # 60,000 RPM = 1 request per ms. Admitting each waiter on its own timer would wake the
    # loop a thousand times a second per model; a tick admits every waiter that fits by then.
    async def go() -> list[float]:
        loop = asyncio.get_running_loop()
        limits = ModelLimits(rpm=60_000, tpm=10**9, concurrency=10**4,
                             largest_request_tokens=1)
        for _ in range(1000):  # a second's worth: the bucket is full
            await limits.acquire(1)
            limits.release()
        admitted: list[float] = []

        async def one() -> None:
            await limits.acquire(1)
            admitted.append(loop.time())
            limits.release()

        await asyncio.gather(*(one() for _ in range(100)))
        return admitted

    admitted = run_on_virtual_clock(go())
    ticks = sorted({round(t / ADMIT_TICK_S) for t in admitted})
    assert all(abs(t - round(t / ADMIT_TICK_S) * ADMIT_TICK_S) < 1e-9 for t in admitted)
    per_tick = round(ADMIT_TICK_S * 1000)  # requests refilled per tick
    assert ticks == list(range(1, 100 // per_tick + 1))  # the rate is kept: 100 in 100 ms
    assert [admitted.count(t) for t in sorted(set(admitted))] == [per_tick] * len(ticks)


def test_concurrent_calls_never_exceed_the_slots_and_queue_in_arrival_order() -> None:
    async def go() -> tuple[int, list[int]]:
        limits = ModelLimits(rpm=10**6, tpm=10**9, concurrency=3, largest_request_tokens=1)
        held, most, order = 0, 0, []

        async def call(i: int) -> None:
            nonlocal held, most
            await limits.acquire(1)
            order.append(i)
            held += 1
            most = max(most, held)
            await asyncio.sleep(0.01 * (1 + i % 4))  # replies come back out of order
            held -= 1
            limits.release()

        await asyncio.gather(*(call(i) for i in range(40)))
        return most, order

    most, order = run_on_virtual_clock(go())
    assert most == 3 and order == list(range(40))


def test_a_cancelled_wait_for_a_slot_loses_no_slot() -> None:
    """Cancelled while queued, or cancelled just as a freed slot was handed to it: either
    way the slot stays usable, and the waiters behind it get theirs."""
    async def go() -> list[str]:
        limits = ModelLimits(rpm=10**6, tpm=10**9, concurrency=1, largest_request_tokens=1)
        got: list[str] = []

        async def call(name: str) -> None:
            await limits.acquire(1)
            got.append(name)

        await call("first")  # holds the only slot
        queued = [asyncio.ensure_future(call(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0)  # all three queued
        queued[0].cancel()  # cancelled while queued, and before it runs again:
        limits.release()  # first's slot skips it and goes to b,
        queued[1].cancel()  # which is cancelled before it runs: the slot passes to c
        await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1.0)
        limits.release()  # c's
        await asyncio.wait_for(call("last"), 1.0)  # a free slot again, at once
        return got

    assert run_on_virtual_clock(go()) == ["first", "c", "last"]
