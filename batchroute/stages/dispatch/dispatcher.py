"""One model's dispatcher: routed rows in, result rows out, within that model's limits.

Every request ends as exactly one result row, ``ok`` or ``failed`` with its error; nothing a
provider does (and no unforeseen exception while handling a reply) raises out of
:meth:`ModelDispatcher.dispatch` or :meth:`ModelDispatcher.ask`. Retries use exponential
backoff with full jitter, and a 429's ``Retry-After`` pauses new calls to this model only.

Seams for tests: the transport (:class:`~batchroute.stages.dispatch.transport.PostTransport`,
or any httpx transport such as ``httpx.MockTransport``), the sleep function, the clock and the
random source.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc

from batchroute import schemas
from batchroute.config import DispatchConfig, ModelConfig
from batchroute.errors import (
    Abandoned,
    AuthError,
    DispatchError,
    InternalDispatchError,
    InvalidOutput,
    RateLimited,
    TerminalDispatchError,
    TransientDispatchError,
)
from batchroute.scrub import Scrubber
from batchroute.stages import results as rows
from batchroute.stages.dispatch.limits import ModelLimits
from batchroute.stages.dispatch.providers import (
    PROVIDERS,
    Answer,
    OutputSchema,
    Request,
    dumps,
    raise_for_response,
    rate_limit_state,
)
from batchroute.stages.dispatch.transport import (
    Headers,
    HttpxTransport,
    LeanTransport,
    PostTransport,
    Reply,
)
from batchroute.task import OutputParser, TaskConfig, result_fields, values_array, wire_schema

# Python's cyclic collector runs a generation-0 pass every 700 net allocations and a full pass
# every hundred or so of those; a dispatcher with hundreds of calls in flight allocates tens of
# thousands of objects a second, and each full pass walks every live object in the process.
# Dispatch processes collect less often instead (reference counting still frees almost
# everything at once): about 30% less CPU per call in `batchroute bench dispatch`.
DISPATCH_GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc_for_dispatch() -> None:
    """For a process whose main work is dispatch (a dispatch actor, the bench): what exists
    now is kept out of future collections, and collections run less often."""
    gc.freeze()
    gc.set_threshold(*DISPATCH_GC_THRESHOLDS)


# A success's rate-limit headers are read at most this often per model: at a thousand replies
# a second, finding them in every reply's head cost about 6% of the client's CPU. What they
# say is already a round trip old when it arrives (hundreds of ms at a provider's latency),
# and the limits they carry change rarely; a reply that is not a success is always read.
READ_LIMITS_EVERY_S = 0.05

Sleep = Callable[[float], Awaitable[None]]
# Sends routed rows to another model's dispatcher and returns its results (escalation).
Escalate = Callable[[str, pa.Table], Awaitable[pa.Table]]
# Makes rows durable: (final results rows or None, calls in flight: request id -> estimated
# micro-dollars, unrecovered micro-dollars so far). See batchroute.stages.journal.
Journal = Callable[[pa.Table | None, dict[str, int], int], None]
log = logging.getLogger(__name__)
# httpx logs every request at INFO: at 1,000 requests/s that line costs more CPU than the
# call itself, and the per-model counters already say what happened.
logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass
class Stats:
    """Running counters for progress display and the run summary."""

    done: int = 0
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    rate_limited: int = 0  # 429 responses received
    last_rate_limited_at: float | None = None  # clock reading of the latest 429
    retries: int = 0
    escalated: int = 0  # rows passed up the ladder (dispatch.escalate_on)
    flex_fallbacks: int = 0  # flex rows sent at the standard tier after their attempts
    # Answers that were not one of the labels or did not match the schema ([task.output]);
    # each was retried, escalated or ended its row as failed (error_type invalid_output).
    invalid: int = 0
    cost_usd: float = 0.0
    # Calls made through ask() (the llm router's decisions) are counted here instead of in
    # done/ok/failed/cost_usd, which progress compares with the planned rows. Attempts,
    # retries and 429s above include them: they share this model's limits.
    asked: int = 0
    asked_failed: int = 0
    asked_cost_usd: float = 0.0
    paused_s: float = 0.0  # wall time this model was paused honouring Retry-After
    # Calls the provider billed whose answer could not be used (a malformed 2xx body),
    # estimated from the request at its full max_tokens: an upper bound.
    unrecovered_micro_usd: int = 0
    abandoned: int = 0  # rows not sent because the driver that fed this model is gone
    # Lowest share of the catalog RPM it was paced down to (by 429s or the provider's headers).
    min_rate_factor: float = 1.0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _CallOutcome:
    """How one row's calls to this model ended."""

    status: str
    answer: Answer | None
    attempts: int
    latency_ms: float | None
    error: DispatchError | None
    started_at: float | None  # seconds since the epoch (time.time()); None: no attempt made
    finished_at: float
    # What this model billed for the row: every answer it gave, unusable ones included.
    cost_micro_usd: int
    value: Any = None  # the parsed answer (a label, or the output object) of an ok row
    invalid: int = 0  # unusable answers this model gave for the row
    tier: str | None = "sync"  # what the calls were billed at (None: no call was made)


class ModelDispatcher:
    """Owns one model's limits, HTTP client and retry policy. Create it inside the event loop
    that will use it (limiters and clients belong to one loop)."""

    def __init__(self, model: ModelConfig, policy: DispatchConfig, *, run_id: str,
                 api_key: str | None,
                 transport: httpx.AsyncBaseTransport | PostTransport | None = None,
                 sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, escalate: Escalate | None = None,
                 journal: Journal | None = None, journal_every_s: float = 0.2,
                 alive: Callable[[], bool] | None = None,
                 task: TaskConfig | None = None) -> None:
        self.model = model
        self.policy = policy
        self.run_id = run_id
        # What the job asks of every row ([task]): a system prompt, a structured output.
        self._system = task.system_messages() if task is not None else []
        self._prefix = task.template_prefix if task is not None else ""
        self._output = task.output if task is not None and task.output.structured else None
        self._parser = OutputParser(self._output) if self._output is not None else None
        self._outputs = result_fields(self._output) if self._output is not None else ()
        wire = wire_schema(self._output) if self._output is not None else None
        self._schema = None if wire is None else OutputSchema(wire.name, wire.schema,
                                                               choices=wire.choices)
        self.stats = Stats()
        self._api_key = api_key or ""
        # Some providers echo part or all of a rejected key: every provider text this
        # dispatcher keeps or logs goes through it first.
        self.scrubber = Scrubber(api_key)
        self._provider = PROVIDERS[model.provider](
            model.base_url, self._api_key, model.wire_name, model.structured_output,
            token_param=model.token_param or "max_tokens",
            reasoning_effort=model.reasoning_effort,
            thinking_budget_tokens=model.thinking_budget_tokens, auth=model.auth,
            api_version=model.api_version,
            cache_prefix=task is not None and task.marks_cache(model.provider),
            service_tier="flex" if model.tier == "flex" else "")
        # A provider caches a prefix once its first request has been answered: until then,
        # every request sent writes it again (and Anthropic bills each write at 1.25x). So
        # where the shared prefix is cached, the first row goes alone and the rest follow.
        self._warm_up = task is not None and task.prefix_tokens() >= model.cache_min_tokens and (
            self._provider.cache_prefix or model.provider == "openai")
        self._warmed: asyncio.Event | None = None
        # The standard tier of a flex model, for flex_fallback.
        self._standard = copy.copy(self._provider)
        self._standard.service_tier = ""
        self._warned_temperature = False
        # The seam (transport.PostTransport): the lean HTTP/1.1 client for real runs; any
        # httpx transport (httpx.MockTransport in tests) through its adapter. No httpx
        # Request or Response is built per call on the default path: the URL and headers are
        # fixed per model, so the client renders them once.
        if transport is None:
            self._transport: PostTransport = LeanTransport(model.concurrency, model.timeout_s)
        elif isinstance(transport, httpx.AsyncBaseTransport):
            self._transport = HttpxTransport(transport, model.timeout_s)
        else:
            self._transport = transport
        self._url = self._provider.url
        self._headers: Headers = tuple({**self._provider.headers(),
                                        "content-type": "application/json"}.items())
        self._limits = ModelLimits(model.rpm, model.tpm, model.concurrency,
                                   min(model.context_window, model.tpm))
        self._sleep = sleep
        self._clock = clock
        self._up = policy.escalates_to(model.name) if escalate else None
        self._escalate = escalate
        self._rng = rng or random.Random()
        self._resume_at = 0.0
        self._next_limits_read = -math.inf  # the clock reading from which _observe reads
        # The journal (see batchroute.stages.journal) gets each row as it becomes final here,
        # every journal_every_s, with the calls in flight: answers outlive a crash.
        self._journal = journal
        self._journal_every_s = journal_every_s
        self._final: list[tuple[pa.Table, int, _CallOutcome]] = []
        self._in_flight: dict[str, int] = {}  # request id -> estimated cost, while sent
        self._dispatching = 0
        self._flusher: asyncio.Task[None] | None = None
        # Whether whoever feeds this dispatcher still wants its answers (a dispatch actor's
        # driver may die); rows are not sent once it does not.
        self._alive = alive
        # Once the provider rejects the key, calling again only burns quota and log lines.
        self._auth_failure: AuthError | None = None if api_key else AuthError(
            f"environment variable {model.api_key_env} is not set")

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _post(self, body: bytes) -> Reply:
        return await self._transport.post(self._url, self._headers, body)

    async def dispatch(self, routed: pa.Table, *, journal: bool = True) -> pa.Table:
        """Call the model for every row of a ``routed`` table; return its ``results`` rows.

        With ``journal`` (and a journal given), each row is also journalled once it is final
        here: answered without escalating, or back from the model it escalated to. Rows sent
        here by a lower model's escalation pass ``journal=False``: that model journals them,
        with its own attempt's cost added."""
        journal = journal and self._journal is not None
        if journal:
            self._dispatching += 1
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.ensure_future(self._flush_every())
        try:
            outcomes = await self._call_all(routed, self._schema, journal=journal, asked=False)
            results = self._results(routed, outcomes)
            if self._up is None:
                return results
            return await self._escalated(routed, results, outcomes, self._up, journal=journal)
        finally:
            if journal:
                self._dispatching -= 1

    async def ask(self, routed: pa.Table, output: OutputSchema) -> pa.Table:
        """Like :meth:`dispatch`, but every call asks for structured ``output`` and nothing
        escalates: for calls that serve the job rather than answer its rows (the llm
        router's decisions). Same limits, retries, transport and prices; one ``results`` row
        per ``routed`` row, whose ``response`` is the structured answer as JSON text. Counted
        in ``stats.asked*``, not in ``done``/``ok``/``failed``/``cost_usd``."""
        return self._results(routed, await self._call_all(routed, output, journal=False,
                                                          asked=True), asked=True)

    # -- what the batch tier (batch_tier.py) shares with the sync path -----------------------

    def requests(self, routed: pa.Table, chunk: int = 1024) -> Iterator[tuple[Request, int]]:
        """Each routed row's request, exactly as :meth:`dispatch` sends it, and its estimated
        tokens (prompt + max output), ``chunk`` rows' worth of Python objects at a time (a
        batch file holds 50,000 rows, and prompts can be long documents)."""
        for start in range(0, routed.num_rows, chunk):
            cols = _request_columns(routed.slice(start, chunk))
            for i in range(len(cols["prompt"])):
                yield (_request(cols, i, self._system, self._schema, self._prefix),
                       int(cols["est_input_tokens"][i]) + int(cols["est_output_tokens"][i]))

    def batch_outcome(self, answer: Answer | None, error: DispatchError | None,
                      attempts: int) -> _CallOutcome:
        """How a row sent through the provider's batch API ends: its answer read as a sync
        answer would be (parsed, checked against the task's output), billed at the batch
        tier; or its error."""
        if answer is None:
            return self._finish("failed", None, attempts, None, error, None, False,
                                tier="batch")
        if self._parser is None or answer.finish_reason == "refusal":
            return self._finish("ok", answer, attempts, None, None, None, False, tier="batch")
        value, why = self._parser.parse(answer.text)
        if why is None:
            return self._finish("ok", answer, attempts, None, None, None, False, value=value,
                                tier="batch")
        self.stats.invalid += 1
        if answer.finish_reason == "length":
            why = f"answer cut at max_tokens before it was complete: {why}"
        return self._finish("failed", answer, attempts, None, InvalidOutput(why), None, False,
                            invalid=1, tier="batch")

    async def settle(self, routed: pa.Table, outcomes: list[_CallOutcome]) -> pa.Table:
        """Result rows for outcomes reached outside :meth:`dispatch` (the batch tier), with
        the escalation ladder applied as dispatch applies it."""
        results = self._results(routed, outcomes)
        if self._up is None:
            return results
        return await self._escalated(routed, results, outcomes, self._up,
                                     journal=self._journal is not None)

    async def _call_all(self, routed: pa.Table, output: OutputSchema | None, *,
                        journal: bool, asked: bool) -> list[_CallOutcome]:
        cols = _request_columns(routed)
        cols["request_id"] = routed.column("request_id").to_pylist()

        system = [] if asked else self._system
        if (not self._provider.takes_temperature and not self._warned_temperature
                and pc.any(pc.is_valid(routed.column("temperature"))).as_py()):
            self._warned_temperature = True  # once per model, not per row
            log.warning("%s is a reasoning model, which takes only its default temperature: "
                        "the rows' temperature is not sent", self.model.name)

        prefix = "" if asked else self._prefix

        async def call(i: int) -> _CallOutcome:
            return await self._one(_request(cols, i, system, output, prefix),
                                   int(cols["est_input_tokens"][i]), cols["request_id"][i],
                                   asked)

        async def row(i: int) -> _CallOutcome:
            if self._warm_up and not asked:  # the model's first call: alone
                self._warm_up = False
                self._warmed = asyncio.Event()
                try:
                    outcome = await call(i)
                finally:
                    self._warmed.set()
            else:
                if self._warmed is not None and not asked:
                    await self._warmed.wait()
                outcome = await call(i)
            if journal and (self._up is None
                            or _escalation_reason(outcome, self.policy.escalate_on) is None):
                self._final.append((routed, i, outcome))
            return outcome

        return await asyncio.gather(*(row(i) for i in range(routed.num_rows)))

    async def _flush_every(self) -> None:
        # Checked after the sleep: once the last dispatch call has returned, its owner may
        # commit and clear the journal, and nothing may be written into it after that.
        while True:
            await self._sleep(self._journal_every_s)
            if not self._dispatching:
                return
            self.flush_journal()

    def flush_journal(self) -> None:
        """Hand the rows that became final since the last flush, and the calls in flight now,
        to the journal."""
        if self._journal is None:
            return
        final, self._final = self._final, []
        groups: dict[int, tuple[pa.Table, list[int], list[_CallOutcome]]] = {}
        for routed, i, outcome in final:
            group = groups.setdefault(id(routed), (routed, [], []))
            group[1].append(i)
            group[2].append(outcome)
        tables = [self._results(routed.take(pa.array(idx, pa.int64())), outs)
                  for routed, idx, outs in groups.values()]
        self._journal(pa.concat_tables(tables) if tables else None, dict(self._in_flight),
                      self.stats.unrecovered_micro_usd)

    async def _escalated(self, routed: pa.Table, results: pa.Table, outcomes: list[_CallOutcome],
                         up: str, *, journal: bool) -> pa.Table:
        """Send the rows that ``escalate_on`` names to model ``up``; each comes back as one
        row carrying this attempt in ``escalations`` and its cost in ``cost_micro_usd``."""
        reasons = [_escalation_reason(o, self.policy.escalate_on) for o in outcomes]
        picked = [i for i, r in enumerate(reasons) if r is not None]
        if not picked:
            return results
        take = pa.array(picked, pa.int64())
        sub = routed.take(take)  # routed rows carry no model column on the way to dispatch
        assert self._escalate is not None  # _up is only set with it
        try:
            upper = await self._escalate(up, sub)
        except Exception as exc:  # the rows keep this model's answer rather than vanish
            log.error("escalating %d rows from %s to %s failed: %s", len(picked),
                      self.model.name, up, self.scrubber.scrub(f"{type(exc).__name__}: {exc}"))
            if journal:
                self._final += [(routed, i, outcomes[i]) for i in picked]
            return results
        self.stats.escalated += len(picked)
        where = {rid: i for i, rid in zip(picked, sub.column("request_id").to_pylist(),
                                          strict=True)}
        own = [where[rid] for rid in upper.column("request_id").to_pylist()]
        fields = rows.BILLED
        mine = results.select(fields).take(pa.array(own, pa.int64())).to_pydict()
        earlier = upper.column("escalations").to_pylist()
        tiers = results.column("tier").take(pa.array(own, pa.int64())).to_pylist()
        escalations = [[{"model": self.model.name, "reason": reasons[i], "tier": tiers[k],
                         **{f: mine[f][k] for f in fields}},
                        *(earlier[k] or [])] for k, i in enumerate(own)]
        upper = rows.add_cost(upper, pa.array(mine["cost_micro_usd"], pa.int64()))
        upper = (upper
                 .set_column(upper.schema.get_field_index("escalated_from"),
                             schemas.RESULTS.field("escalated_from"),
                             pa.repeat(pa.scalar(self.model.name, pa.string()), len(own)))
                 .set_column(upper.schema.get_field_index("escalations"),
                             schemas.RESULTS.field("escalations"),
                             pa.array(escalations, pa.list_(schemas.ESCALATION))))
        if journal and self._journal is not None:
            self._journal(upper, dict(self._in_flight), self.stats.unrecovered_micro_usd)
        keep = pc.invert(pc.is_in(pa.array(range(results.num_rows), pa.int64()), value_set=take))
        return pa.concat_tables([results.filter(keep), upper])

    async def _one(self, req: Request, est_input: int, request_id: str,
                   asked: bool) -> _CallOutcome:
        started: float | None = None
        tokens = est_input + req.max_tokens
        est_micro = self.model.cost_micro_usd(est_input, req.max_tokens)
        attempt = 0
        tier = "flex" if self._provider.service_tier == "flex" else "sync"
        body = dumps(self._provider.body(req))
        tier_start = 0  # the attempt at which this tier began (flex falls back to standard)
        parser = None if asked else self._parser
        spent: Answer | None = None  # the unusable answers so far: billed all the same
        invalid = 0

        def fail(error: DispatchError) -> _CallOutcome:
            # Unusable answers before a final failure were billed: they stay on the row.
            return self._finish("failed", spent, attempt, None, error, started, asked,
                                invalid=invalid, tier=tier)

        while True:
            if self._auth_failure is not None:  # fast path: no need to queue for admission
                return fail(self._auth_failure)
            await self._limits.acquire(tokens)
            try:
                # Checked again after admission: hundreds of rows queue at the limiter, and
                # a 401 or a Retry-After may have arrived while they waited.
                if self._auth_failure is not None:
                    return fail(self._auth_failure)
                await self._wait_for_pause()
                if self._alive is not None and not self._alive():
                    self.stats.abandoned += 1
                    return fail(Abandoned(
                        "not sent: the run that asked for it is gone"))
                attempt += 1
                self.stats.attempts += 1
                started = started or time.time()
                t0 = self._clock()
                self._in_flight[request_id] = est_micro
                try:
                    resp = await self._post(body)
                finally:
                    self._in_flight.pop(request_id, None)
                self._observe(resp)
                answer = raise_for_response(resp, self._provider, req.output)
                self._limits.reconcile(est_input, answer.input_tokens)
                self._limits.speed_up()
                latency = (self._clock() - t0) * 1000.0
                if parser is None or answer.finish_reason == "refusal":
                    return self._finish("ok", _plus(answer, spent), attempt, latency, None,
                                        started, asked, invalid=invalid, tier=tier)
                value, why = parser.parse(answer.text)
                if why is None:
                    return self._finish("ok", _plus(answer, spent), attempt, latency, None,
                                        started, asked, value=value, invalid=invalid,
                                        tier=tier)
                invalid += 1
                self.stats.invalid += 1
                spent = _plus(answer, spent)
                if answer.finish_reason == "length":  # the same cap would cut it again
                    return self._finish("failed", spent, attempt, latency, InvalidOutput(
                        f"answer cut at max_tokens ({req.max_tokens}) before it was complete: "
                        f"{why}"), started, asked, invalid=invalid, tier=tier)
                if invalid > self._output_retries:
                    return self._finish("failed", spent, attempt, latency,
                                        InvalidOutput(why), started, asked, invalid=invalid,
                                        tier=tier)
                continue  # the same model again, at once: nothing to back off from
            except AuthError as exc:
                self._auth_failure = exc
                return fail(exc)
            except TerminalDispatchError as exc:
                return fail(exc)
            except (TransientDispatchError, httpx.HTTPError) as exc:
                err = _transient(exc)
                if err.status is not None and 200 <= err.status < 300:
                    # A 2xx the provider billed but whose body could not be read.
                    self.stats.unrecovered_micro_usd += est_micro
            except Exception as exc:  # a bug or an unforeseen reply must not end the job
                return fail(InternalDispatchError(
                    f"{type(exc).__name__}: {exc}"))
            finally:
                self._limits.release()  # never hold a connection slot through a backoff
            if isinstance(err, RateLimited):
                self.stats.rate_limited += 1
                self.stats.last_rate_limited_at = self._clock()
                self._limits.slow_down(asyncio.get_running_loop().time())
                self.stats.min_rate_factor = min(self.stats.min_rate_factor,
                                                 self._limits.factor)
                if err.retry_after_s is not None:
                    self._pause(err.retry_after_s)
            if attempt - tier_start >= self.policy.max_attempts:
                if tier != "flex" or not self.model.flex_fallback or spent is not None:
                    return fail(err)
                # Flex capacity ran out for this row: the standard tier, at full price.
                tier, tier_start = "sync", attempt
                self.stats.flex_fallbacks += 1
                body = dumps(self._standard.body(req))
                continue
            self.stats.retries += 1
            await self._sleep(self._backoff(attempt, err))

    def _observe(self, resp: Reply) -> None:
        """Apply the provider's view of the limits (its rate-limit headers): from every reply
        that is not a success, and from at most one success every READ_LIMITS_EVERY_S."""
        now = self._clock()
        if resp.status_code >= 300 or now >= self._next_limits_read:
            self._next_limits_read = now + READ_LIMITS_EVERY_S
            self._limits.observe(rate_limit_state(resp.headers))
        self.stats.min_rate_factor = min(self.stats.min_rate_factor, self._limits.factor)

    def _pause(self, seconds: float) -> None:
        """Hold back every request to this model (and only this model) for ``seconds``."""
        now = self._clock()
        until = now + min(seconds, self.policy.max_retry_after_s)
        if until > self._resume_at:
            self.stats.paused_s += until - max(self._resume_at, now)
            self._resume_at = until

    def _backoff(self, attempt: int, err: DispatchError) -> float:
        # Full jitter spreads a retry storm out. A provider's Retry-After is a floor, not the
        # delay itself: it tells every rejected request the same instant, and a herd arriving
        # together would be rejected together again. The floor is capped so that "retry after
        # a day" cannot hang a nightly job; the attempt budget decides what happens after.
        cap = min(self.policy.backoff_max_s, self.policy.backoff_base_s * 2 ** (attempt - 1))
        jitter = self._rng.uniform(0.0, cap)
        if err.retry_after_s is None:
            return jitter
        return max(min(err.retry_after_s, self.policy.max_retry_after_s), jitter)

    async def _wait_for_pause(self) -> None:
        while (delay := self._resume_at - self._clock()) > 0:
            await self._sleep(delay)

    @property
    def _output_retries(self) -> int:
        return self._output.retries_on_invalid if self._output is not None else 0

    def _finish(self, status: str, answer: Answer | None, attempts: int,
                latency_ms: float | None, error: DispatchError | None,
                started: float | None, asked: bool, *, value: Any = None,
                invalid: int = 0, tier: str = "sync") -> _CallOutcome:
        s = self.stats
        micro = 0 if answer is None else self.model.cost_micro_usd(
            answer.input_tokens, answer.output_tokens, answer.cached_input_tokens,
            answer.cache_write_input_tokens, tier=tier)
        cost = micro / 1e6
        if asked:
            s.asked += 1
            s.asked_cost_usd += cost
            if status != "ok":
                s.asked_failed += 1
        elif status == "ok" and answer is not None:
            s.done += 1
            s.ok += 1
            s.cost_usd += cost
        else:
            s.done += 1
            s.failed += 1
            s.cost_usd += cost  # unusable answers are billed too
        if status != "ok":
            kind = error.error_type if error else "unknown"
            s.errors[kind] = s.errors.get(kind, 0) + 1
        return _CallOutcome(status, answer, attempts, latency_ms, error, started,
                            time.time(), micro, value, invalid,
                            tier if attempts else None)

    def _results(self, routed: pa.Table, outcomes: list[_CallOutcome], *,
                 asked: bool = False) -> pa.Table:
        answers = [o.answer for o in outcomes]
        outputs: dict[str, Any] = {}
        if self._output is not None and not asked:
            outputs[self._outputs[0].name] = values_array(self._output,
                                                          [o.value for o in outcomes])
        return rows.build(
            routed, run_id=self.run_id, model=self.model.name,
            outputs=() if asked else self._outputs, **outputs,
            invalid_answers=[o.invalid for o in outcomes],
            status=[o.status for o in outcomes],
            response=[a.text if a else None for a in answers],
            finish_reason=[a.finish_reason if a else None for a in answers],
            input_tokens=[a.input_tokens if a else 0 for a in answers],
            cached_input_tokens=[a.cached_input_tokens if a else 0 for a in answers],
            cache_write_input_tokens=[a.cache_write_input_tokens if a else 0 for a in answers],
            output_tokens=[a.output_tokens if a else 0 for a in answers],
            reasoning_tokens=[a.reasoning_tokens if a else 0 for a in answers],
            cost_micro_usd=[o.cost_micro_usd for o in outcomes],
            latency_ms=[o.latency_ms for o in outcomes],
            attempts=[o.attempts for o in outcomes],
            tier=[o.tier for o in outcomes],
            error_type=[o.error.error_type if o.error else None for o in outcomes],
            error_message=[self.scrubber.scrub(str(o.error)) if o.error else None
                           for o in outcomes],
            started_at=rows.timestamps([o.started_at for o in outcomes]),
            finished_at=rows.timestamps([o.finished_at for o in outcomes]))


def _escalation_reason(o: _CallOutcome, escalate_on: tuple[str, ...]) -> str | None:
    """Why this outcome goes up the ladder, or None. A refused key is a job problem, not the
    row's: escalating it would quietly send the whole night to the dearest model."""
    if o.status == "ok" and o.answer is not None:
        reason = o.answer.finish_reason
        return reason if reason in ("length", "refusal") and reason in escalate_on else None
    if isinstance(o.error, InvalidOutput):  # escalated for "invalid" only, never "failed"
        cut = o.answer is not None and o.answer.finish_reason == "length"
        if cut and "length" in escalate_on:
            return "length"
        return "invalid" if "invalid" in escalate_on else None
    if o.status == "failed" and "failed" in escalate_on and not isinstance(o.error, AuthError):
        return f"failed:{o.error.error_type if o.error else 'unknown'}"
    return None


def _plus(answer: Answer, spent: Answer | None) -> Answer:
    """``answer`` with the tokens of the unusable answers before it added: a row's tokens
    and cost on a model are everything that model billed for it."""
    if spent is None:
        return answer
    return replace(answer, input_tokens=answer.input_tokens + spent.input_tokens,
                   output_tokens=answer.output_tokens + spent.output_tokens,
                   cached_input_tokens=answer.cached_input_tokens + spent.cached_input_tokens,
                   cache_write_input_tokens=(answer.cache_write_input_tokens
                                             + spent.cache_write_input_tokens),
                   reasoning_tokens=answer.reasoning_tokens + spent.reasoning_tokens)


def _transient(exc: Exception) -> DispatchError:
    """Translate httpx's exceptions, most specific first; pass ours through."""
    if isinstance(exc, DispatchError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return TransientDispatchError(f"timeout: {type(exc).__name__}")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return TransientDispatchError(f"connection dropped mid-response ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        return TransientDispatchError(f"connection error: {type(exc).__name__}")
    return TransientDispatchError(f"http error: {type(exc).__name__}")


def _request_columns(routed: pa.Table) -> dict[str, list[Any]]:
    """The routed columns a row's request is built from, as Python lists."""
    return {name: routed.column(name).to_pylist() for name in (
        "prompt", "messages", "temperature", "est_input_tokens", "est_output_tokens")}


def _request(cols: dict[str, list[Any]], i: int, system: list[dict[str, str]],
             output: OutputSchema | None, prefix: str) -> Request:
    """Row ``i``'s request: the one home of what a row sends (sync and batch tier alike)."""
    return Request(messages=system + _messages(cols["prompt"][i], cols["messages"][i]),
                   max_tokens=int(cols["est_output_tokens"][i]),
                   temperature=cols["temperature"][i], output=output, prefix=prefix)


def _messages(prompt: str | None, messages: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    if prompt is not None:
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in messages or []]
