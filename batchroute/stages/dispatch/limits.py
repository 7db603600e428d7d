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

Better still is not to draw the 429 at all. Every reply carries the provider's own view of the
key (:class:`RateLimitState`), and :meth:`ModelLimits.observe` applies it before the next call:

* a per-minute limit below the catalog's caps the pace at the provider's figure (requests:
  the pacer's ceiling; tokens: the token bucket's refill rate);
* a provider bucket with less room left than ours (another job on the same key, requests
  bunched up in transit) fills our bucket to match, so the next calls wait for the refill.

Tokens are estimated before a call (prompt estimate + max output tokens, which is what
providers charge against the limit at admission) and reconciled after it: the difference
between the estimated and the reported prompt tokens is returned to, or taken from, the bucket.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

from batchroute.stages.dispatch.providers import RateLimitState

MIN_WINDOW_S = 1.0
SLOW_DOWN = 0.5  # rate multiplier applied on a 429 (halve, as AIMD does)
SPEED_UP = 0.01  # share of the catalog rate regained per success
MIN_FACTOR = 0.05
# 429s arrive in bursts (every call in flight hits the same full bucket): one cut per window.
SLOW_DOWN_HOLD_S = 1.0
# A bucket's timer fires on a grid of this many seconds (loop time), and each firing admits
# every waiter that fits by then: at a thousand calls a second a timer per admission woke
# the loop once per call, and every model's bucket now shares the same wake-ups. The bucket
# still leaks continuously, so the rate is kept; a call waits at most one tick longer.
ADMIT_TICK_S = 0.005


def _shape(per_minute: float, largest: float) -> tuple[float, float]:
    """(capacity, window seconds) of a bucket: capacity = rate x window holds the largest
    single acquire, and the window is at least MIN_WINDOW_S."""
    window = max(MIN_WINDOW_S, 60.0 * largest / per_minute)
    # max(): rate x window can round to just below `largest`, and aiolimiter would then refuse
    # the largest admissible request outright.
    return max(float(largest), per_minute * window / 60.0), window


class _Bucket(AsyncLimiter):
    """aiolimiter's leaky bucket (its level, leak and capacity), without its waiting (the
    model's one admission queue does that, :class:`ModelLimits`), plus the adjustments
    aiolimiter has no public API for: a new refill rate (the provider's limit is lower),
    taking capacity without waiting (the provider has less room than we thought, or a call
    used more tokens than estimated) and giving it back (fewer)."""

    @classmethod
    def sized(cls, per_minute: float, largest: float) -> _Bucket:
        return cls(*_shape(per_minute, largest))

    def resize(self, per_minute: float, largest: float) -> None:
        """Refill at a new per-minute rate from now on (what is in the bucket stays)."""
        self._leak()
        self.max_rate, self.time_period = _shape(per_minute, largest)
        self._rate_per_sec = self.max_rate / self.time_period

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0: it fits now)."""
        self._leak()
        over = self._level + amount - self.max_rate
        return over / self._rate_per_sec if over > 0 else 0.0

    def headroom(self) -> float:
        self._leak()
        return self.max_rate - self._level

    def take(self, amount: float) -> None:
        """Use ``amount`` now, without waiting; the level may exceed capacity (a debt that
        later admissions wait out)."""
        self._leak()
        self._level += amount

    def give_back(self, amount: float) -> None:
        self._leak()
        self._level = max(0.0, self._level - amount)

    def match(self, provider_remaining: int) -> None:
        """Leave no more room than the provider reports having."""
        short = self.headroom() - provider_remaining
        if short > 0:
            self._level += short


class ModelLimits:
    """Admission control for one model. Use ``await acquire(tokens)`` then ``release()``.

    A call is admitted when a connection slot is free, the pacer allows another start (below
    the catalog rate after 429s), and both buckets (requests, tokens) have room for it.
    Callers wait in one first-come first-served queue; one timer at a time wakes it, for when
    its first caller fits (rounded up to the next ``ADMIT_TICK_S``), and a slot coming free
    wakes it too. Each wake-up admits every caller that fits then. One queue means one
    wait per call: a semaphore for the slots in front of the buckets' own queues woke the
    loop twice for many calls, and the pacer slept once per call.

    What changes a bucket after the timer is set (the provider's headers, a call's reported
    tokens) does not move the timer: it fires, and the queue is checked again then. Setting
    it again on every reply cost more than the admissions themselves.
    """

    def __init__(self, rpm: int, tpm: int, concurrency: int, largest_request_tokens: int):
        if largest_request_tokens > tpm:
            raise ValueError(f"a request of {largest_request_tokens} tokens can never fit a "
                             f"limit of {tpm} tokens per minute")
        self.requests = _Bucket.sized(rpm, 1)
        self.tokens = _Bucket.sized(tpm, largest_request_tokens)
        self.free = concurrency  # connection slots not in use
        self._largest = largest_request_tokens
        self._rpm = rpm
        self._tpm = tpm
        self._token_rate = tpm  # the token bucket's per-minute rate: the provider's if lower
        # Invariant: MIN_FACTOR <= factor <= ceiling <= 1; below 1 every request start is
        # spaced 60 / (rpm * factor) seconds after the previous one (next_start is loop time).
        # The ceiling is the provider's reported limit over the catalog's.
        self.factor = 1.0
        self.ceiling = 1.0
        self._next_start = 0.0
        self._hold_until = -1.0
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, tokens: int) -> None:
        """Wait until one more request of ``tokens`` fits all the limits, behind every
        earlier caller; then take its share of them.

        Raises ValueError for a request larger than the token bucket (a routing bug).
        """
        if tokens > self._largest:
            raise ValueError(f"request of {tokens} tokens exceeds the largest admissible "
                             f"({self._largest})")
        loop = asyncio.get_running_loop()
        if not self._queue and self._admit(tokens, loop.time()) == 0.0:
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append((tokens, waiter))
        if self._timer is None:
            self._wake()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # admitted as it was cancelled
                self.requests.give_back(1)
                self.tokens.give_back(tokens)
                self.release()
            raise

    def release(self) -> None:
        """A call admitted by :meth:`acquire` is over: its connection slot is free again."""
        self.free += 1
        if self._queue and self._timer is None:  # the first caller may wait for a slot only
            self._wake()

    def _admit(self, tokens: int, now: float) -> float:
        """Admit a call of ``tokens`` if everything it needs is there at loop time ``now``
        (and return 0.0); else the loop time from which it may be (inf: once a slot frees)."""
        if self.free <= 0:
            return math.inf
        if self.factor < 1.0 and now < self._next_start:
            return self._next_start
        wait = max(self.requests.wait_s(1), self.tokens.wait_s(tokens) if tokens > 0 else 0.0)
        if wait > 0.0:
            return now + wait
        self.free -= 1
        self.requests.take(1)
        if tokens > 0:
            self.tokens.take(tokens)
        if self.factor < 1.0:
            self._next_start = max(now, self._next_start) + 60.0 / (self._rpm * self.factor)
        return 0.0

    def _wake(self) -> None:
        """Admit the callers at the head of the queue that fit now; set the timer for the
        next one (none if it waits for a slot: release() wakes the queue then)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self._queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = 0.0
        while queue:
            tokens, waiter = queue[0]
            if waiter.done():  # cancelled while waiting
                queue.popleft()
                continue
            at = self._admit(tokens, now)
            if at > 0.0:
                break
            queue.popleft()
            waiter.set_result(None)
        if queue and at < math.inf:
            self._timer = loop.call_at(math.ceil(at / ADMIT_TICK_S) * ADMIT_TICK_S, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._wake()

    def slow_down(self, now: float) -> None:
        """The provider said 429 at loop time ``now``: pace this model below the rate that
        triggered it (at most one cut per SLOW_DOWN_HOLD_S)."""
        if now < self._hold_until:
            return
        self._hold_until = now + SLOW_DOWN_HOLD_S
        self.factor = max(MIN_FACTOR, self.factor * SLOW_DOWN)

    def speed_up(self) -> None:
        """A call succeeded: regain a little of the catalog rate."""
        self.factor = min(self.ceiling, self.factor + SPEED_UP)

    def observe(self, state: RateLimitState) -> None:
        """Apply the provider's view of the limits, read from a reply (any status)."""
        # A reply without limit headers keeps what the last one said.
        if state.limit_requests:
            self.ceiling = max(MIN_FACTOR, min(1.0, state.limit_requests / self._rpm))
            self.factor = min(self.factor, self.ceiling)
        if state.limit_tokens:
            tpm = min(self._tpm, max(state.limit_tokens, self._largest))
            if tpm != self._token_rate:  # the token bucket itself refills slower
                self._token_rate = tpm
                self.tokens.resize(tpm, self._largest)
        if state.remaining_requests is not None:
            self.requests.match(state.remaining_requests)
        if state.remaining_tokens is not None:
            self.tokens.match(state.remaining_tokens)

    def reconcile(self, estimated: int, reported: int) -> None:
        """A call was admitted at ``estimated`` prompt tokens and the provider reported
        ``reported``: settle the difference with the token bucket."""
        if reported > estimated:
            self.tokens.take(reported - estimated)
        elif reported < estimated:
            self.tokens.give_back(estimated - reported)
