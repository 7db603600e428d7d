"""One model's limits: requests per minute, tokens per minute, and concurrent calls.

A provider's limits are global per model and key, so exactly one :class:`ModelLimits` exists per
model for the whole job (it lives in that model's dispatch actor); copying it into N workers
would send N times the limit.

The buckets are sized to refill over a short window instead of a whole minute: aiolimiter lets
a fresh bucket spend its whole capacity at once, and providers enforce per-minute limits over
shorter windows, so a minute-sized bucket would send a minute's quota in the first second and
collect 429s. The token bucket must still hold the largest single request (aiolimiter refuses
``acquire(amount)`` above its size), which is why the route stage rejects rows that need more
tokens than ``min(context_window, tpm)``.

The catalog's RPM is a promise the provider may not keep (a key shared with another job, a
lower tier). After a 429 the model is paced below its catalog rate (multiplicative decrease)
and creeps back up with each success (additive increase), so retries do not keep hitting a
limit that is lower than configured.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

MIN_WINDOW_S = 1.0
SLOW_DOWN = 0.5  # rate multiplier applied on a 429 (halve, as AIMD does)
SPEED_UP = 0.01  # share of the catalog rate regained per success
MIN_FACTOR = 0.05
# 429s arrive in bursts (every call in flight hits the same full bucket): one cut per window.
SLOW_DOWN_HOLD_S = 1.0


def _bucket(per_minute: float, largest: float) -> AsyncLimiter:
    # Capacity = rate x window >= largest single acquire, and the window is at least 1 s.
    window = max(MIN_WINDOW_S, 60.0 * largest / per_minute)
    # max(): rate x window can round to just below `largest`, and aiolimiter would then refuse
    # the largest admissible request outright.
    return AsyncLimiter(max(float(largest), per_minute * window / 60.0), window)


class ModelLimits:
    """Admission control for one model. Use ``await acquire(tokens)`` then ``release()``."""

    def __init__(self, rpm: int, tpm: int, concurrency: int, largest_request_tokens: int):
        if largest_request_tokens > tpm:
            raise ValueError(f"a request of {largest_request_tokens} tokens can never fit a "
                             f"limit of {tpm} tokens per minute")
        self.requests = _bucket(rpm, 1)
        self.tokens = _bucket(tpm, largest_request_tokens)
        self.slots = asyncio.Semaphore(concurrency)
        self._largest = largest_request_tokens
        self._rpm = rpm
        # Invariant: factor in [MIN_FACTOR, 1]; below 1 every request start is spaced
        # 60 / (rpm * factor) seconds after the previous one (next_start is loop time).
        self.factor = 1.0
        self._next_start = 0.0
        self._hold_until = -1.0

    async def acquire(self, tokens: int) -> None:
        """Wait until one more request of ``tokens`` fits all three limits.

        Raises ValueError for a request larger than the token bucket (a routing bug).
        """
        if tokens > self._largest:
            raise ValueError(f"request of {tokens} tokens exceeds the largest admissible "
                             f"({self._largest})")
        await self.slots.acquire()
        try:
            await self._pace()
            await self.requests.acquire()
            if tokens > 0:
                await self.tokens.acquire(tokens)
        except BaseException:
            self.slots.release()
            raise

    def release(self) -> None:
        self.slots.release()

    def slow_down(self, now: float) -> None:
        """The provider said 429 at loop time ``now``: pace this model below the rate that
        triggered it (at most one cut per SLOW_DOWN_HOLD_S)."""
        if now < self._hold_until:
            return
        self._hold_until = now + SLOW_DOWN_HOLD_S
        self.factor = max(MIN_FACTOR, self.factor * SLOW_DOWN)

    def speed_up(self) -> None:
        """A call succeeded: regain a little of the catalog rate."""
        self.factor = min(1.0, self.factor + SPEED_UP)

    async def _pace(self) -> None:
        if self.factor >= 1.0:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next_start)
        self._next_start = start + 60.0 / (self._rpm * self.factor)
        if start > now:
            await asyncio.sleep(start - now)
