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
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

MIN_WINDOW_S = 1.0


def _bucket(per_minute: float, largest: float) -> AsyncLimiter:
    # Capacity = rate x window >= largest single acquire, and the window is at least 1 s.
    window = max(MIN_WINDOW_S, 60.0 * largest / per_minute)
    return AsyncLimiter(per_minute * window / 60.0, window)


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

    async def acquire(self, tokens: int) -> None:
        """Wait until one more request of ``tokens`` fits all three limits.

        Raises ValueError for a request larger than the token bucket (a routing bug).
        """
        if tokens > self._largest:
            raise ValueError(f"request of {tokens} tokens exceeds the largest admissible "
                             f"({self._largest})")
        await self.slots.acquire()
        try:
            await self.requests.acquire()
            if tokens > 0:
                await self.tokens.acquire(tokens)
        except BaseException:
            self.slots.release()
            raise

    def release(self) -> None:
        self.slots.release()
