"""A local fake LLM provider: a real HTTP server on loopback for the demo and the tests.

It speaks just enough of two public wire formats that the dispatcher's real adapters cannot tell
it from the real thing, and it is deterministic so tests can assert exact answers and usage.

Endpoints
---------
``POST /v1/chat/completions`` (OpenAI chat completions)
    Auth ``Authorization: Bearer KEY``. Body ``{model, messages: [{role, content}],
    max_tokens? | max_completion_tokens?, temperature?, response_format?}``, plus vLLM's
    ``structured_outputs?`` / ``guided_choice?`` / ``guided_json?`` (see Structured answers).
    Reply::

        {"id", "object": "chat.completion", "created", "model",
         "choices": [{"index": 0, "message": {"role": "assistant", "content"},
                      "finish_reason": "stop" | "length"}],
         "usage": {"prompt_tokens", "completion_tokens", "total_tokens",
                   "prompt_tokens_details": {"cached_tokens"}}}

    Errors: ``{"error": {"message", "type", "code"}}``.
``POST /v1/messages`` (Anthropic messages)
    Auth ``x-api-key: KEY`` and a required ``anthropic-version`` header. Body ``{model,
    max_tokens, messages, system?, tools?, tool_choice?}``. Reply::

        {"id", "type": "message", "role": "assistant", "model",
         "content": [{"type": "text", "text"}], "stop_reason": "end_turn" | "max_tokens",
         "stop_sequence": null, "usage": {"input_tokens", "cache_creation_input_tokens",
                                          "cache_read_input_tokens", "output_tokens"}}

    or, answering a forced tool, ``"content": [{"type": "tool_use", "id", "name",
    "input"}]`` with ``"stop_reason": "tool_use"``.

    Errors: ``{"type": "error", "error": {"type", "message"}}``.
``GET /health`` → ``{"ok": true, "server": "batchroute-mock-provider"}``; ``GET /stats`` → the counters of :meth:`MockProvider.stats`
(see :class:`ProviderStats`; ``structured`` and ``invalid_answers`` count the structured
answers below).
``/v1/files``, ``/v1/batches`` (OpenAI Batch API) and ``/v1/messages/batches`` (Anthropic
Message Batches)
    The batch tier: each line answered exactly as the endpoints above answer the same body,
    with the same auth; progress follows the server clock (``batch_*`` switches). Documented
    in :mod:`batchroute.devtools.mock_batches`.

Message ``content`` may be a string or a list of ``{"type": "text", "text"}`` parts (both APIs
accept either); non-text parts count as empty. ``temperature`` is accepted and ignored, and
``stream: true`` is refused with a 400 because the mock only answers in one piece.

Answers and token counts
------------------------
Tokens are counted as ``count_tokens(text) = 0 if text == "" else max(1, ceil(len(text) / 4))``
(characters, not bytes). ``prompt_tokens`` is the sum of that over every message's text plus the
system prompt, counted per message, so ``["ab", "cd"]`` is 2 tokens, not 1.

The answer depends only on (model, system, messages) through a BLAKE2 digest; ``max_tokens``
only truncates it, so a shorter cap always yields a prefix of the longer answer:

* if the last user message ends with ``Answer:`` (MMLU style), the answer is one letter A-D
  picked by the digest, followed by a short sentence;
* otherwise it is pseudo-text cut from a fixed corpus, 20-400 tokens long (4 characters per
  token, so the length in tokens is exact).

When the natural answer is longer than ``max_tokens`` it is cut to exactly ``max_tokens`` tokens
and the finish reason is ``length`` (OpenAI) / ``max_tokens`` (Anthropic). Without
``max_tokens`` (OpenAI only) nothing is cut.

Difficulty answers (the llm router's call)
------------------------------------------
A request that asks for the structured output named ``route_decision`` (OpenAI:
``response_format: {"type": "json_schema", "json_schema": {"name": "route_decision",
"schema"}}``; Anthropic: a tool ``route_decision`` in ``tools`` and ``tool_choice: {"type":
"tool", "name": "route_decision"}``) is answered with ``{"difficulty": LABEL}``: as the JSON
text of the message content (OpenAI, finish reason ``stop``), or as a ``tool_use`` block whose
``input`` is that object with ``stop_reason: "tool_use"`` (Anthropic). LABEL is taken from the
schema's ``properties.difficulty.enum`` (read as easiest to hardest; default ``easy, medium,
hard``) by a simulated judgement of the last user message alone, so both wires and every
model give the same label for the same prompt::

    score = 0.35 * min(1, chars / 1200) + 0.35 * min(1, maths / 16) + 0.3 * u

where ``maths`` counts digits and the characters ``+-*/=^%<>``, and ``u`` in [0, 1) comes
from a BLAKE2 digest of the text. LABEL is ``enum[floor(score * len(enum))]``. This is a
stand-in for a model's judgement, deterministic so the plumbing can be tested: its routing
quality is simulated and says nothing about a real model's.

``route_garbage_rate`` makes that share of prompts (chosen by the same digest, so the same
prompts every time) get a malformed decision instead, in one of three forms picked by the
digest: prose instead of JSON (Anthropic: a text block and ``end_turn``, the tool ignored),
cut-off JSON (Anthropic: a tool input without ``difficulty``), or a label outside the enum.
The schema is counted as prompt tokens (both providers bill for it) and the answer as
completion tokens, as for any call; ``max_tokens`` cuts the JSON text like any answer
(Anthropic then answers the cut text in a text block).

Structured answers (labels, JSON extraction)
--------------------------------------------
A request for any other structured output gets a deterministic instance of its schema:

* OpenAI ``response_format: {"type": "json_schema", "json_schema": {"name": NAME,
  "strict"?, "schema": SCHEMA}}`` (NAME not ``route_decision``): the message content is the
  compact JSON text of the instance, finish reason ``stop``;
* Anthropic ``tools: [{"name": NAME, "input_schema": SCHEMA, ...}]`` with ``tool_choice:
  {"type": "tool", "name": NAME}``: one ``{"type": "tool_use", "id", "name": NAME, "input":
  INSTANCE}`` block, ``stop_reason: "tool_use"``. A forced tool missing from ``tools`` is a
  400, and so is an ``input_schema`` that does not describe an object (a ``type`` other than
  ``object``, or a top-level ``anyOf``/``oneOf``/``allOf``); one without ``type`` is read as
  an object;
* vLLM (OpenAI wire): top-level ``structured_outputs: {"choice": [LABELS]}`` or the older
  ``guided_choice: [LABELS]`` is answered with one label as the bare content text;
  ``structured_outputs: {"json": SCHEMA}`` or ``guided_json: SCHEMA`` (an object or its JSON
  text) with the JSON text of an instance. The other vLLM constraints (``regex``,
  ``grammar``, ``json_object``, ``structural_tag``, ``guided_regex``, ``guided_grammar``) are
  a 400, as is more than one structured output in one request.

Labels tasks are just a schema such as ``{"type": "object", "properties": {"label": {"type":
"string", "enum": [...]}}, "required": ["label"], "additionalProperties": false}``: the label
is drawn from the enum like any enum value, so it spreads over the labels across prompts.

The instance is drawn from ``random.Random`` seeded by a BLAKE2 digest of the request digest
(model, system, messages), so the same request always gets the same instance and another
model may get another. The generator understands: ``enum`` and ``const`` at any level;
``anyOf``/``oneOf`` (one branch, merged with the keywords beside it; a ``null`` branch only
15% of the time); local ``$ref`` (``#/$defs/...``, ``#``) and ``allOf`` (merged shallowly);
``type`` lists (a ``null`` in them 15% of the time, else one of the other types); objects
(every required property, each optional one 60% of the time, nothing else); arrays
(``items``, ``minItems``/``maxItems``, default 1-3 items, ``uniqueItems``); strings (formats
``date``, ``date-time`` as ``YYYY-MM-DDTHH:MM:SSZ``, ``email``; otherwise 1-4 words of the
corpus vocabulary padded or cut to ``minLength``/``maxLength``); numbers with 2 decimals and
integers within ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` (default
0-1000); booleans; null. A missing ``type`` is inferred from the keywords (properties → object,
items → array, bounds → number, else string). Past 8 levels of nesting objects keep only
their required properties and arrays ``minItems`` items, so recursive schemas end. Not
supported (the instance may violate them): ``pattern``, ``multipleOf``, ``prefixItems``,
``minProperties``, ``not``, ``if``/``then``, ``dependentRequired``, remote ``$ref``; a
``oneOf`` whose branches overlap may be matched twice.

Usage is counted as for the difficulty answers: the schema (or the choice list, as a JSON
array) is billed as prompt tokens, the answer text (the instance's compact JSON, or the
label) as completion tokens, and ``max_tokens`` cuts that text like any answer (finish
reason ``length``; Anthropic ``stop_reason: "max_tokens"`` with the cut text in a text block
instead of the ``tool_use``).

``invalid_rate`` makes that share of structured requests (route_decision excluded: it has
``route_garbage_rate``) get an invalid answer; ``model_invalid_rates`` (``--model-invalid-rate
NAME=R``) sets another share for a model. Which requests, and the form of the answer,
come from the same request digest, so the same prompts to the same model fail the same way
every time while another model may answer them validly (as escalation needs); the valid
instance itself does not depend on the rate. Three forms, each falling back to the next the
schema allows:

* off-enum: one value drawn from an ``enum``/``const`` replaced by ``unsure`` or a near miss
  such as ``Billing issue`` (never an allowed value); choice lists get such a text as the
  answer;
* schema-violating: a required property left out, or a property given a value of a type its
  schema does not allow (``"n/a"``, ``7``, ``true``, ...); choice lists get ``{"label": LABEL}``
  instead of the bare label;
* unparsable: the first half of the JSON text (Anthropic: a text block of prose with
  ``stop_reason: "end_turn"``, the tool ignored); choice lists get a sentence of prose.

Only values outside ``anyOf``/``oneOf`` branches are spoiled (another branch might accept
them). An invalid answer is still a 200 with usage, and is cut by ``max_tokens`` like any
other.

Prompt caching
--------------
Simulated as the providers describe it, per model, for ``cache_ttl_s`` (default 300 s) after
an entry's last use, and never for a prefix shorter than ``cache_min_tokens`` (default 1,024):

* Anthropic caches what comes before and includes the last block marked ``cache_control``
  (tools, then system, then messages; ``system`` and message ``content`` may be lists of text
  blocks). The first request of a prefix reports it as ``cache_creation_input_tokens``, later
  ones as ``cache_read_input_tokens``; ``input_tokens`` leaves both out. Unmarked requests
  cache nothing.
* OpenAI caches every prompt of 1,024 tokens or more unasked, in steps of 128 tokens, and
  reports the longest cached prefix in ``usage.prompt_tokens_details.cached_tokens`` (always
  present, 0 when nothing was cached).

An entry serves requests that arrive after the reply that wrote it was sent: requests already
waiting when it is written write it again, as on the real services, so a client that sends
the first call of a prefix alone pays one write. Splitting a message into blocks changes no
answer. ``/stats`` counts ``cached_prompt_tokens`` and ``cache_write_tokens``.

OpenAI flex
-----------
A request with ``service_tier: "flex"`` is answered like any other, except that
``flex_unavailable_rate`` of them (drawn from their own seeded source) get a 429 with code
``resource_unavailable``, as flex capacity is not guaranteed. ``/stats`` counts
``flex_requests`` and ``flex_unavailable``.

Latency
-------
Each answer waits ``latency_ms`` scaled by a log-normal factor (sigma 0.4, capped at 4x) drawn
from the request digest: the median is ``latency_ms``, the same request always waits the same
time, different requests spread out as real ones do. ``latency_ms=0`` never sleeps. 429s and
401s are answered at once, as gateways do.

Rate limits
-----------
Per (model, API key), two continuously refilling token buckets: requests (``rpm``) and tokens
(``tpm``). A model listed in ``model_limits`` uses its own ``(rpm, tpm)`` pair instead of the
global one (the pair replaces both: None there means unlimited, not "inherit"). Each bucket
refills at its per-minute rate and holds ``window_s`` seconds' worth of it (``rate * window_s /
60``, at least 1): with the default 60 s a client may burst a whole minute's quota at once,
with ``window_s=1`` no more than a second's worth, as real providers enforce per-minute limits
over shorter windows. A request costs 1 request and ``prompt_tokens + max_tokens`` tokens
(``MAX_ANSWER_TOKENS`` when OpenAI's ``max_tokens`` is absent), which is how providers estimate
before generating. If either bucket lacks room the reply is 429 with ``retry-after`` (whole
seconds, rounded up), ``retry-after-ms`` and nothing is consumed. A request costing more tokens
than the bucket holds but no more than ``tpm`` is admitted once the bucket is full and leaves it
in debt, so the long-run rate still holds. A request costing more than the whole ``tpm`` can
never pass: it gets a 429 whose message says so, without ``retry-after``, as OpenAI does.
``rpm``/``tpm`` of 0 or None mean unlimited, and the headers for an unlimited dimension are
omitted. The ``x-ratelimit-limit-*`` headers give the per-minute limit; ``remaining`` and
``reset`` describe the bucket.

Every reply that passed authentication carries ``x-ratelimit-{limit,remaining,reset}-{requests,
tokens}`` (reset as a Go-style duration such as ``"12s"``, ``"1.2s"`` or ``"250ms"``: the time
until that bucket is full again); Anthropic replies also carry
``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` with reset as an RFC 3339
UTC timestamp.

Authentication
--------------
With ``api_key`` set, a missing or different key gets 401. A key in ``expired_keys`` always
gets 401 with a message saying it expired. Keys never appear in replies, headers, stats or logs.

Fault injection
---------------
Each request that passes auth and the limiter draws one number from ``random.Random(seed)``
and falls into at most one band, in this order (the rates must sum to at most 1):

==================  ================================================================
``fail_rate``       HTTP 500 (``server_error`` / ``api_error``)
``rate_503``        HTTP 503 (overloaded)
``timeout_rate``    sleeps ``hang_s`` seconds, then answers normally
``drop_rate``       sends headers and half the body, then closes the connection
``malformed_rate``  HTTP 200 whose body is cut-off JSON
``burst_429_rate``  a spurious 429 with ``retry-after: 1`` although the buckets have room
==================  ================================================================

``route_garbage_rate`` and ``invalid_rate`` (above) are not among these bands: they draw
nothing, they change only the content of a well-formed 200 reply, and they apply to
difficulty answers and to the other structured answers respectively.

The draws follow arrival order, so a run with the same seed and the same request order sees
the same faults. A retried request draws again, so a fault is never sticky.

The header ``x-mock-fault: 500|503|timeout|drop|malformed|429|401`` forces that fault on one
request, bypassing the limiter and the draw (for deterministic tests); any other value is a 400.

Performance
-----------
Handlers do one JSON parse, one BLAKE2 digest and a slice of a precomputed corpus (a
structured answer adds a second digest and one walk of the schema); nothing is logged per
request (aiohttp's access log is off). That sustains well over 1,000 requests/s on
one core. aiohttp is imported lazily so that ``batchroute --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from statistics import NormalDist
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypedDict

from batchroute import tokens
from batchroute.cli.argtypes import whole_number
from batchroute.devtools import mock_quality
from batchroute.devtools.mock_quality import QualityModel
from batchroute.errors import ConfigError

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "DEFAULT_ROUTE_LABELS",
    "FAULTS",
    "MAX_ANSWER_TOKENS",
    "MIN_ANSWER_TOKENS",
    "ROUTE_DECISION",
    "MockProvider",
    "MockProviderConfig",
    "ProviderStats",
    "count_tokens",
    "register_cli",
    "serve_forever",
]

MIN_ANSWER_TOKENS: Final = 20
MAX_ANSWER_TOKENS: Final = 400
CACHE_MIN_TOKENS: Final = 1024  # the shortest prefix either provider caches (by default)
ROUTE_DECISION: Final = "route_decision"
"""Name of the structured output (OpenAI) or forced tool (Anthropic) answered with a difficulty."""
DEFAULT_ROUTE_LABELS: Final = ("easy", "medium", "hard")
FAULTS: Final = ("500", "503", "timeout", "drop", "malformed", "429", "401")
"""Values accepted by the ``x-mock-fault`` header; also the keys of ``stats()["faults"]``."""

DEFAULT_CLI_PORT: Final = 8765
_WAIT_READY_S: Final = 30.0
_LATENCY_SIGMA: Final = 0.4
_LATENCY_CAP: Final = 4.0
# A stop() must not wait for hung requests (timeout faults sleep hang_s): give in-flight
# handlers this long, then cancel them.
_SHUTDOWN_GRACE_S: Final = 0.5
_CHARS_PER_TOKEN: Final = tokens.CHARS_PER_TOKEN  # the client's estimate is exact here

# /health names the server, so a tool can tell the bundled mock (whose answers are simulated)
# from a real model server that happens to listen on loopback too.
SERVER_NAME: Final = "batchroute-mock-provider"

Wire = Literal["openai", "anthropic"]


def count_tokens(text: str) -> int:
    """The mock's token count: 0 for ``""``, else ``max(1, ceil(len(text) / 4))``."""
    if not text:
        return 0
    return max(1, tokens.from_chars(len(text)))


# --------------------------------------------------------------------------------------------
# Configuration


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_limit(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"mock provider {name} must be an integer >= 0 or None, got {value!r}")


class _ModelLimits(Mapping[str, tuple[int | None, int | None]]):
    """An immutable, hashable ``{model: (rpm, tpm)}`` so the frozen config stays hashable."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, tuple[int | None, int | None]]) -> None:
        self._data = data

    @classmethod
    def of(cls, limits: object) -> _ModelLimits:
        """Validate and copy a Mapping. Raises :class:`ConfigError` naming the bad entry."""
        if not isinstance(limits, Mapping):
            raise ConfigError("mock provider model_limits must be a mapping of model name to "
                              f"(rpm, tpm), got {type(limits).__name__}")
        data: dict[str, tuple[int | None, int | None]] = {}
        for model, pair in limits.items():
            if not isinstance(model, str) or not model:
                raise ConfigError(f"mock provider model_limits keys must be non-empty model "
                                  f"names, got {model!r}")
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ConfigError(f"mock provider model_limits[{model!r}] must be a pair "
                                  f"(rpm, tpm), got {pair!r}")
            rpm, tpm = pair
            _check_limit(f"model_limits[{model!r}] rpm", rpm)
            _check_limit(f"model_limits[{model!r}] tpm", tpm)
            data[model] = (rpm, tpm)
        return cls(data)

    def __getitem__(self, model: str) -> tuple[int | None, int | None]:
        return self._data[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _ModelLimits):
            return self._data == other._data
        return isinstance(other, Mapping) and self._data == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True, slots=True)
class MockProviderConfig:
    """Everything the mock provider does differently from run to run.

    ``host`` must be a loopback IP literal: the mock accepts any key unless told otherwise and
    must never be reachable from another machine. ``port=0`` lets the OS pick a free port.
    ``rpm``/``tpm`` of None or 0 mean unlimited. ``model_limits`` maps a model name to its own
    ``(rpm, tpm)``, used instead of ``rpm``/``tpm`` for that model (any Mapping is accepted
    and stored as an immutable, hashable one). ``window_s`` (0 < window_s <= 60) is how many
    seconds of quota a bucket holds, i.e. the largest burst. The six fault rates are
    probabilities that
    together must not exceed 1 (one draw decides at most one fault). ``seed`` fixes the fault
    draws. ``route_garbage_rate`` in [0, 1] is the share of prompts whose difficulty answer is
    malformed (chosen by prompt digest, not drawn); ``invalid_rate`` in [0, 1] the share of
    other structured requests answered invalidly (chosen by request digest). The ``batch_*``
    fields drive the batch endpoints (see :mod:`batchroute.devtools.mock_batches`):
    ``batch_delay_s`` (>= 0) is how long a batch takes, ``batch_expire_share`` and
    ``batch_line_error_rate`` in [0, 1] the shares of lines that expire or error, and
    ``batch_queue_tokens`` (None or 0: unlimited) the enqueued-token cap per model and key.
    Raises :class:`ConfigError` naming the offending field.
    """

    host: str = "127.0.0.1"
    port: int = 0
    rpm: int | None = None
    tpm: int | None = None
    model_limits: Mapping[str, tuple[int | None, int | None]] = field(
        default_factory=lambda: _ModelLimits({}))
    window_s: float = 60.0
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    rate_503: float = 0.0
    timeout_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    burst_429_rate: float = 0.0
    route_garbage_rate: float = 0.0
    invalid_rate: float = 0.0
    # Per model (its wire name), a share that replaces invalid_rate: ((name, rate), ...).
    model_invalid_rates: tuple[tuple[str, float], ...] = ()
    hang_s: float = 30.0
    # Prompt caching: how long an entry lives after its last use, and the shortest prefix
    # cached (shorter marked prefixes are silently not cached, as on Anthropic).
    cache_ttl_s: float = 300.0
    # OpenAI flex: the share of service_tier="flex" requests refused with a 429
    # resource_unavailable (flex capacity is not guaranteed).
    flex_unavailable_rate: float = 0.0
    cache_min_tokens: int = CACHE_MIN_TOKENS
    api_key: str | None = field(default=None, repr=False)
    expired_keys: frozenset[str] = field(default=frozenset(), repr=False)
    seed: int = 0
    batch_delay_s: float = 2.0
    batch_expire_share: float = 0.0
    batch_line_error_rate: float = 0.0
    batch_queue_tokens: int | None = None
    # The quality model (batchroute.devtools.mock_quality): models differ in which prompts
    # they answer correctly; ``model_skills`` ((name, skill), ...) overrides its skills.
    quality: bool = False
    model_skills: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not _is_loopback(self.host):
            raise ConfigError(
                f"mock provider host must be a loopback address such as 127.0.0.1, "
                f"got {self.host!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"mock provider port must be in 0..65535, got {self.port}")
        for name in ("rpm", "tpm", "batch_queue_tokens"):
            _check_limit(name, getattr(self, name))
        if not isinstance(self.model_limits, _ModelLimits):
            # A dict would make the frozen config unhashable and allow later mutation.
            object.__setattr__(self, "model_limits", _ModelLimits.of(self.model_limits))
        window = self.window_s
        if not (isinstance(window, int | float) and not isinstance(window, bool)
                and math.isfinite(window) and 0 < window <= 60):
            raise ConfigError(f"mock provider window_s must be > 0 and <= 60, got {window!r}")
        if not (isinstance(self.cache_min_tokens, int) and self.cache_min_tokens >= 1):
            raise ConfigError("mock provider cache_min_tokens must be a whole number >= 1")
        for name in ("latency_ms", "hang_s", "cache_ttl_s", "batch_delay_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"mock provider {name} must be a finite number >= 0")
        for name, rate in self._fault_rates():
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
                raise ConfigError(f"mock provider {name} must be in [0, 1], got {rate!r}")
        object.__setattr__(self, "model_invalid_rates", tuple(
            (str(m), r) for m, r in dict(self.model_invalid_rates).items()))
        shares = [("route_garbage_rate", self.route_garbage_rate),
                  ("flex_unavailable_rate", self.flex_unavailable_rate),
                  ("invalid_rate", self.invalid_rate),
                  ("batch_expire_share", self.batch_expire_share),
                  ("batch_line_error_rate", self.batch_line_error_rate),
                  *((f"model_invalid_rates[{m!r}]", r) for m, r in self.model_invalid_rates)]
        for name, share in shares:
            if not (isinstance(share, int | float) and 0.0 <= share <= 1.0):
                raise ConfigError(f"mock provider {name} must be in [0, 1], got {share!r}")
        total = sum(rate for _, rate in self._fault_rates())
        if total > 1.0 + 1e-9:
            raise ConfigError(f"mock provider fault rates sum to {total:g}; they must be <= 1")
        if not isinstance(self.expired_keys, frozenset):
            # A list would make the frozen config unhashable and allow later mutation.
            object.__setattr__(self, "expired_keys", frozenset(self.expired_keys))

    def limits_for(self, model: str) -> tuple[int | None, int | None]:
        """``(rpm, tpm)`` enforced for ``model``: its ``model_limits`` entry, else the global."""
        return self.model_limits.get(model, (self.rpm, self.tpm))

    def _fault_rates(self) -> tuple[tuple[str, float], ...]:
        # Order matters: it is the order of the bands on [0, 1) used by the fault draw.
        return (
            ("fail_rate", self.fail_rate),
            ("rate_503", self.rate_503),
            ("timeout_rate", self.timeout_rate),
            ("drop_rate", self.drop_rate),
            ("malformed_rate", self.malformed_rate),
            ("burst_429_rate", self.burst_429_rate),
        )


_RATE_FAULTS: Final = ("500", "503", "timeout", "drop", "malformed", "429")


# --------------------------------------------------------------------------------------------
# Rate limiting


class _TokenBucket:
    """``per_minute`` units a minute, refilling continuously at ``per_minute / 60`` per second,
    holding at most ``capacity = max(per_minute * window_s / 60, 1)`` (the largest burst).

    An amount above ``capacity`` but not above ``per_minute`` fits only when the bucket is
    full and then leaves it in debt (``level < 0``), so the long-run rate still holds.

    Invariant: ``capacity - per_minute <= level <= capacity``, and ``level`` is exact as of
    ``updated`` (a reading of the injected monotonic clock). Only the server's event loop
    touches a bucket.
    """

    __slots__ = ("capacity", "level", "per_minute", "rate", "updated")

    def __init__(self, per_minute: int, window_s: float, now: float) -> None:
        self.per_minute = per_minute
        self.capacity = max(per_minute * window_s / 60.0, 1.0)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` fits (0 if it fits now, inf if it never can)."""
        if amount > self.per_minute:
            return math.inf
        # More than a burst's worth fits only in a full bucket.
        return max(0.0, (min(amount, self.capacity) - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


@dataclass(slots=True)
class _Limits:
    requests: _TokenBucket | None
    tokens: _TokenBucket | None


@dataclass(frozen=True, slots=True)
class _Admission:
    """The limiter's verdict: ``wait_s`` is 0 when admitted, inf when the request can never fit."""

    wait_s: float
    limited_by: Literal["requests", "tokens"] | None
    limit: int | None  # the per-minute limit of ``limited_by``
    headers: dict[str, str]


def _go_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers: ``"250ms"``, ``"1.2s"``, ``"1m0s"``."""
    seconds = round(seconds, 3)
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60.0)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z"
    )


# --------------------------------------------------------------------------------------------
# Answers


_VOCABULARY: Final = (
    "the", "model", "reads", "each", "prompt", "and", "writes", "a", "plain", "answer", "that",
    "stays", "close", "to", "the", "question", "batch", "router", "cost", "quality", "token",
    "budget", "latency", "provider", "request", "response", "summary", "data", "table", "column",
    "parquet", "arrow", "schema", "value", "result", "report", "metric", "threshold", "policy",
    "cheap", "strong", "small", "large", "fast", "careful", "because", "therefore", "however",
    "while", "after", "before", "during", "under", "over", "between", "within", "every", "some",
    "many", "few", "most", "often", "rarely", "clearly", "simply", "first", "second", "third",
    "finally", "also", "then", "next", "again", "example", "case", "reason", "evidence", "claim",
    "source", "answer", "option", "choice", "question", "context", "detail", "point", "step",
    "method", "process", "system", "user", "input", "output", "record", "field", "error", "retry",
    "limit", "minute", "second", "hour", "day", "week", "night", "job", "run",
)


@functools.cache
def _corpus() -> tuple[str, tuple[int, ...]]:
    """A fixed pseudo-text and the offsets where its words start (built once, on first use).

    Answers are slices of this string, so generating one costs a slice, not a loop.
    """
    rng = random.Random(20240601)  # fixed: answers must not change between releases
    words: list[str] = []
    length = 0
    need = 16_384 + MAX_ANSWER_TOKENS * _CHARS_PER_TOKEN
    while length < need:
        sentence = rng.choices(_VOCABULARY, k=rng.randint(6, 16))
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words.extend(sentence)
        length += sum(len(w) + 1 for w in sentence)
    text = " ".join(words)
    limit = len(text) - MAX_ANSWER_TOKENS * _CHARS_PER_TOKEN
    starts = tuple(i for i in range(limit) if i == 0 or text[i - 1] == " ")
    return text, starts


def _text_of(content: object) -> str:
    """The text of a message ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@dataclass(frozen=True, slots=True)
class _Structured:
    """A structured output other than route_decision: one of ``choices`` when that is set
    (answered with the bare text), else an instance of ``schema`` (answered with its JSON
    text, or on Anthropic as the input of a ``tool_use`` named ``name``)."""

    name: str
    schema: dict[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] | None = None

    @property
    def billed(self) -> object:
        """What the provider bills as prompt tokens: the schema, or the choice list."""
        return list(self.choices) if self.choices is not None else self.schema


@dataclass(frozen=True, slots=True)
class _Call:
    """One parsed, validated request."""

    wire: Wire
    model: str
    prompt_tokens: int
    max_tokens: int | None
    digest: bytes
    mmlu: bool
    # The labels (easiest first) when the request asks for a route_decision, else None;
    # route_text is the last user message the difficulty is judged from.
    route: tuple[str, ...] | None = None
    route_text: str = ""
    # Any other structured output the request asks for (labels, JSON extraction).
    structured: _Structured | None = None
    # Output tokens a reasoning model thinks before it answers (billed as output).
    reasoning_tokens: int = 0
    # Prefixes the prompt cache may hold, shortest first: (tokens, digest). Anthropic: the
    # prefix up to its cache_control breakpoint; OpenAI: every 128-token step from 1,024.
    cache_points: tuple[tuple[int, bytes], ...] = ()

    @property
    def token_cost(self) -> int:
        """Tokens the limiter charges, estimated before generation as providers do."""
        cap = MAX_ANSWER_TOKENS if self.max_tokens is None else self.max_tokens
        return self.prompt_tokens + cap


def _answer(call: _Call, quality: QualityModel | None = None) -> tuple[str, bool]:
    """The answer text for ``call`` and whether it was cut at ``max_tokens``. With the
    ``quality`` model the letter is right or wrong as it says, and the text starts with
    its quality marker."""
    if call.mmlu and quality is not None:
        letter = quality.letter(call.route_text, call.model)
        mark = mock_quality.marker(quality.quality(call.route_text, call.model))
        full = f"{letter}. {mark} Option {letter} is the choice best supported."
    elif call.mmlu:
        letter = "ABCD"[call.digest[0] % 4]
        full = f"{letter}. Option {letter} is the choice best supported by the question."
    else:
        corpus, starts = _corpus()
        n_tokens = MIN_ANSWER_TOKENS + int.from_bytes(call.digest[1:5], "big") % (
            MAX_ANSWER_TOKENS - MIN_ANSWER_TOKENS + 1
        )
        start = starts[int.from_bytes(call.digest[5:9], "big") % len(starts)]
        full = corpus[start : start + n_tokens * _CHARS_PER_TOKEN]
        if full.endswith(" "):
            full = full[:-1] + "."  # same length, so the token count stays exact
        if quality is not None:  # the marker replaces the first characters: same length
            mark = mock_quality.marker(quality.quality(call.route_text, call.model)) + " "
            full = mark + full[len(mark):]
    if call.max_tokens is not None and count_tokens(full) > call.max_tokens:
        return full[: call.max_tokens * _CHARS_PER_TOKEN], True
    return full, False


_MATHS: Final = frozenset("0123456789+-*/=^%<>")
_GARBAGE: Final = 3


@dataclass(frozen=True, slots=True)
class _Decision:
    """A difficulty answer: ``tool_input`` is the structured object the model returned
    (None when it answered ``text`` instead, ignoring the schema); ``text`` is what an OpenAI
    client reads as the content."""

    tool_input: dict[str, str] | None
    text: str


def _decide(call: _Call, garbage_rate: float) -> _Decision:
    """The simulated difficulty judgement of ``call.route_text`` (see the module docstring)."""
    labels = call.route or DEFAULT_ROUTE_LABELS
    text = call.route_text
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    if int.from_bytes(digest[4:8], "big") / 2**32 < garbage_rate:
        kind = digest[8] % _GARBAGE
        if kind == 0:
            return _Decision(None, f"This looks {labels[-1]} to me.")
        if kind == 1:
            return (_Decision({}, "{}") if call.wire == "anthropic"
                    else _Decision(None, '{"difficulty": "'))
        return _Decision({"difficulty": "unsure"}, '{"difficulty":"unsure"}')
    maths = sum(1 for c in text if c in _MATHS)
    u = int.from_bytes(digest[:4], "big") / 2**32
    score = 0.35 * min(1.0, len(text) / 1200) + 0.35 * min(1.0, maths / 16) + 0.3 * u
    label = labels[min(len(labels) - 1, int(score * len(labels)))]
    obj = {"difficulty": label}
    return _Decision(obj, json.dumps(obj, separators=(",", ":")))


def _route_labels(schema: object) -> tuple[str, ...]:
    """The difficulty enum of a route_decision schema, or the default labels."""
    try:
        enum = schema["properties"]["difficulty"]["enum"]  # type: ignore[index]
    except (KeyError, TypeError):
        return DEFAULT_ROUTE_LABELS
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        return tuple(enum)
    return DEFAULT_ROUTE_LABELS


def _route_schema(wire: Wire, body: dict[str, Any]) -> object | None:
    """The schema of a route_decision request (``{}`` if it gave none), or None when the
    request does not ask for one. Raises :class:`_BadRequest` for a forced tool that is
    not defined, as the real API does."""
    if wire == "openai":
        fmt = body.get("response_format")
        if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"
                and isinstance(fmt.get("json_schema"), dict)
                and fmt["json_schema"].get("name") == ROUTE_DECISION):
            return None
        return fmt["json_schema"].get("schema") or {}
    choice = body.get("tool_choice")
    if not (isinstance(choice, dict) and choice.get("type") == "tool"
            and choice.get("name") == ROUTE_DECISION):
        return None
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("name") == ROUTE_DECISION:
            return tool.get("input_schema") or {}
    raise _BadRequest(f"tool_choice names '{ROUTE_DECISION}', which is not in 'tools'")


# Constraint keys of vLLM's ``structured_outputs`` object (its other keys are options).
_VLLM_CONSTRAINTS: Final = ("json", "choice", "regex", "grammar", "json_object",
                            "structural_tag")
_VLLM_GUIDED: Final = ("guided_json", "guided_choice", "guided_regex", "guided_grammar")


def _schema_of(value: object, where: str) -> dict[str, Any]:
    """A JSON Schema given as an object or as its JSON text (vLLM accepts both); None is
    ``{}``. Raises :class:`_BadRequest` for anything else."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _BadRequest(f"'{where}' is not valid JSON") from None
    if not isinstance(value, dict):
        raise _BadRequest(f"'{where}' must be a JSON Schema object")
    return value


def _choices_of(value: object, where: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        raise _BadRequest(f"'{where}' must be a non-empty list of strings")
    return tuple(value)


def _forced_tool(body: dict[str, Any]) -> _Structured | None:
    """The Anthropic tool a ``tool_choice: {"type": "tool", "name"}`` forces, or None."""
    choice = body.get("tool_choice")
    if not (isinstance(choice, dict) and choice.get("type") == "tool"
            and isinstance(choice.get("name"), str)):
        return None
    name = choice["name"]
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if isinstance(tool, dict) and tool.get("name") == name:
            schema = _schema_of(tool.get("input_schema"), f"tools[{i}].input_schema")
            if schema.get("type", "object") != "object" or not {
                    "anyOf", "oneOf", "allOf"}.isdisjoint(schema):
                raise _BadRequest(f"tools[{i}].input_schema must describe an object "
                                  "(type 'object', no anyOf/oneOf/allOf at the top level)")
            return _Structured(name, schema)
    raise _BadRequest(f"tool_choice names '{name}', which is not in 'tools'")


def _structured_output(wire: Wire, body: dict[str, Any]) -> _Structured | None:
    """The structured output (other than route_decision) a request asks for, or None.

    Anthropic: a forced tool. OpenAI: ``response_format`` json_schema, or vLLM's
    ``structured_outputs`` ``choice``/``json`` or older ``guided_choice``/``guided_json``.
    Raises :class:`_BadRequest` for a malformed one, an undefined forced tool, a constraint
    the mock cannot answer (regex, grammar, ...) or more than one constraint.
    """
    if wire == "anthropic":
        return _forced_tool(body)
    found: list[_Structured] = []
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]):
            raise _BadRequest("'response_format.json_schema' must be an object with a 'name'")
        found.append(_Structured(spec["name"], _schema_of(
            spec.get("schema"), "response_format.json_schema.schema")))
    outputs = body.get("structured_outputs")
    if outputs is not None and not isinstance(outputs, dict):
        raise _BadRequest("'structured_outputs' must be an object")
    # (where, constraint, value) for each vLLM constraint, new style then old style.
    given = [(f"structured_outputs.{key}", key, outputs.get(key))
             for key in _VLLM_CONSTRAINTS] if outputs else []
    given += [(key, key.removeprefix("guided_"), body.get(key)) for key in _VLLM_GUIDED]
    for where, constraint, value in given:
        if value is None or value is False:
            continue
        if constraint == "choice":
            found.append(_Structured("", choices=_choices_of(value, where)))
        elif constraint == "json":
            found.append(_Structured("", _schema_of(value, where)))
        else:
            raise _BadRequest(f"'{where}' is not supported by the mock provider "
                              "(only choice and json)")
    if len(found) > 1:
        raise _BadRequest("give one structured output (response_format, structured_outputs "
                          "or guided_*), not several")
    return found[0] if found else None


# The generator of schema instances (see the module docstring).
_NULL_SHARE: Final = 0.15  # of nullable values that are null
_OPTIONAL_SHARE: Final = 0.6  # of optional properties that are present
_MAX_DEPTH: Final = 8  # deeper, objects keep only required properties, arrays minItems
_HARD_DEPTH: Final = 32  # deeper (a schema that requires itself), null
_FIRST_DAY: Final = date(2000, 1, 1)
Path = tuple[str | int, ...]


def _whole(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else default


def _real(value: object) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _infer_type(schema: Mapping[str, Any]) -> str:
    if not {"properties", "required", "additionalProperties"}.isdisjoint(schema):
        return "object"
    if not {"items", "minItems", "maxItems"}.isdisjoint(schema):
        return "array"
    if not {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}.isdisjoint(schema):
        return "number"
    return "string"


class _Instance:
    """Builds one instance of a JSON Schema, every choice drawn from ``rng`` (seeded from
    the request digest, so the same request gets the same instance).

    It records where the instance could be made invalid: ``enum_sites`` (path, allowed
    values) for each value taken from an ``enum``/``const``, and ``objects`` (path,
    required, properties) for each object, both outside ``anyOf``/``oneOf`` branches (a
    wrong value there might still match another branch).
    """

    def __init__(self, root: Mapping[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.enum_sites: list[tuple[Path, tuple[Any, ...]]] = []
        self.objects: list[tuple[Path, tuple[str, ...], Mapping[str, Any]]] = []
        self._branch = 0

    def resolve(self, schema: object) -> object:
        """``schema`` with local ``$ref``s followed and ``allOf`` merged (shallowly)."""
        for _ in range(_HARD_DEPTH):
            if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str)):
                break
            target = self._pointer(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else rest
        if isinstance(schema, dict) and isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part)
                if not isinstance(part, dict):
                    continue
                for key, value in part.items():
                    if key == "properties" and isinstance(value, dict):
                        merged["properties"] = {**merged.get("properties", {}), **value}
                    elif key == "required" and isinstance(value, list):
                        merged["required"] = [*merged.get("required", []), *value]
                    else:
                        merged.setdefault(key, value)
            schema = merged
        return schema

    def _pointer(self, ref: str) -> object:
        """The target of a local reference such as ``#/$defs/Item`` ({} if there is none)."""
        if not ref.startswith("#"):
            return {}
        node: object = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def value(self, schema: object, path: Path = (), depth: int = 0) -> Any:
        schema = self.resolve(schema)
        if schema is False or depth > _HARD_DEPTH:
            return None
        if not isinstance(schema, dict):  # true (anything goes) or not a schema
            return self._words(self.rng.randint(1, 4))
        if "const" in schema:
            return self._pick(path, [schema["const"]])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self._pick(path, enum)
        branches = schema.get("anyOf", schema.get("oneOf"))
        if isinstance(branches, list) and branches:
            return self._branch_value(schema, branches, path, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            names = [t for t in kind if isinstance(t, str)]
            non_null = [t for t in names if t != "null"]
            if names and (not non_null or ("null" in names and self.rng.random() < _NULL_SHARE)):
                return None
            kind = self.rng.choice(non_null) if non_null else None
        if not isinstance(kind, str):
            kind = _infer_type(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind in ("number", "integer"):
            return self._number(schema, integer=kind == "integer")
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _pick(self, path: Path, allowed: list[Any]) -> Any:
        if not self._branch:
            self.enum_sites.append((path, tuple(allowed)))
        return copy.deepcopy(self.rng.choice(allowed))

    def _branch_value(self, schema: Mapping[str, Any], branches: list[Any], path: Path,
                      depth: int) -> Any:
        """One branch of an ``anyOf``/``oneOf`` (a null branch only now and then), merged
        with the keywords beside it."""
        resolved = [self.resolve(b) for b in branches]
        non_null = [b for b in resolved if not (isinstance(b, dict) and b.get("type") == "null")]
        if non_null and (len(non_null) == len(resolved) or self.rng.random() >= _NULL_SHARE):
            branch = self.rng.choice(non_null)
        else:
            branch = self.rng.choice([b for b in resolved if b not in non_null])
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        merged = {**rest, **branch} if isinstance(branch, dict) else branch
        self._branch += 1
        try:
            return self.value(merged, path, depth + 1)
        finally:
            self._branch -= 1

    def _object(self, schema: Mapping[str, Any], path: Path, depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        raw_required = schema.get("required")
        required = tuple(r for r in raw_required if isinstance(r, str)) if isinstance(
            raw_required, list) else ()
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required or (depth < _MAX_DEPTH and self.rng.random() < _OPTIONAL_SHARE):
                out[name] = self.value(sub, (*path, name), depth + 1)
        extra = schema.get("additionalProperties")
        for name in required:
            if name not in out:
                out[name] = self.value(extra if isinstance(extra, dict) else {}, (*path, name),
                                       depth + 1)
        if not self._branch:
            self.objects.append((path, required, props))
        return out

    def _array(self, schema: Mapping[str, Any], path: Path, depth: int) -> list[Any]:
        low = _whole(schema.get("minItems"), 0) or 0
        high = _whole(schema.get("maxItems"), None)
        if depth >= _MAX_DEPTH:
            count = low
        else:
            least = low or (0 if high == 0 else 1)
            most = max(least, 3) if high is None else max(least, min(high, max(least, 3)))
            count = self.rng.randint(least, most)
        items = schema.get("items", {})
        unique = schema.get("uniqueItems") is True
        out: list[Any] = []
        seen: set[str] = set()
        for _ in range(count * 8 + 8):
            if len(out) >= count:
                break
            marks = len(self.enum_sites), len(self.objects)
            item = self.value(items, (*path, len(out)), depth + 1)
            if unique:
                key = json.dumps(item, sort_keys=True)
                if key in seen:  # a repeat: drop it and what it recorded
                    del self.enum_sites[marks[0]:], self.objects[marks[1]:]
                    continue
                seen.add(key)
            out.append(item)
        return out

    def _number(self, schema: Mapping[str, Any], *, integer: bool) -> float | int:
        lo, hi = _real(schema.get("minimum")), _real(schema.get("maximum"))
        xlo, xhi = _real(schema.get("exclusiveMinimum")), _real(schema.get("exclusiveMaximum"))
        step = 1 if integer else 0.01
        if xlo is not None and (lo is None or xlo >= lo):
            lo = math.floor(xlo) + 1 if integer else xlo + step
        if xhi is not None and (hi is None or xhi <= hi):
            hi = math.ceil(xhi) - 1 if integer else xhi - step
        if lo is None:
            lo = 0 if hi is None or hi >= 0 else hi - 1000
        if hi is None:
            hi = lo + 1000
        if integer:
            lo_i, hi_i = math.ceil(lo), math.floor(hi)
            return self.rng.randint(lo_i, hi_i) if lo_i <= hi_i else lo_i
        if lo > hi:  # an exclusive range narrower than two steps
            both = [b for b in (xlo, xhi) if b is not None]
            return sum(both) / len(both) if both else float(lo)
        value = round(self.rng.uniform(lo, hi), 2)
        return value if lo <= value <= hi else self.rng.uniform(lo, hi)

    def _string(self, schema: Mapping[str, Any]) -> str:
        rng = self.rng
        fmt = schema.get("format")
        if fmt in ("date", "date-time"):
            day = (_FIRST_DAY + timedelta(days=rng.randrange(365 * 30))).isoformat()
            if fmt == "date":
                return day
            return f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:" \
                   f"{rng.randrange(60):02d}Z"
        if fmt == "email":
            return f"{rng.choice(_VOCABULARY)}.{rng.choice(_VOCABULARY)}@example.com"
        text = self._words(rng.randint(1, 4))
        low = _whole(schema.get("minLength"), 0) or 0
        high = _whole(schema.get("maxLength"), None)
        while len(text) < low:
            text += " " + rng.choice(_VOCABULARY)
        if high is not None and len(text) > high:
            text = text[:high]
            if len(text.rstrip()) >= low:
                text = text.rstrip()
        return text

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(_VOCABULARY) for _ in range(n))


@dataclass(frozen=True, slots=True)
class _StructuredAnswer:
    """A structured answer: ``text`` is what an OpenAI client reads as the content;
    ``tool_input`` the Anthropic tool input (None: answer ``text`` in a text block);
    ``invalid`` whether it was made invalid on purpose (``invalid_rate``)."""

    tool_input: dict[str, Any] | None
    text: str
    invalid: bool = False


# The three forms of an invalid answer, picked by digest; each falls back to the next one
# the instance allows (an enum needs an enum value to spoil, a schema violation an object).
_INVALID_KINDS: Final = ("off_enum", "schema", "unparsable")
# A wrong value for each JSON type, tried in this order against the types a schema allows.
_WRONG_VALUES: Final[tuple[tuple[str, Any], ...]] = (
    ("string", "n/a"), ("integer", 7), ("boolean", True), ("array", []), ("object", {}),
    ("null", None))


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "array" if isinstance(value, list) \
        else "object"


def _types_of(gen: _Instance, schema: object) -> frozenset[str] | None:
    """The JSON types ``schema`` allows, or None when that is not plain to see."""
    schema = gen.resolve(schema)
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return frozenset({_json_type(schema["const"])})
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return frozenset(_json_type(v) for v in enum)
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset({kind})
    if isinstance(kind, list) and kind and all(isinstance(t, str) for t in kind):
        return frozenset(kind)
    branches = schema.get("anyOf", schema.get("oneOf"))
    if isinstance(branches, list) and branches:
        types = [_types_of(gen, b) for b in branches]
        if all(t is not None for t in types):
            return frozenset().union(*(t for t in types if t is not None))
    return None


def _wrong_value(types: frozenset[str]) -> tuple[bool, Any]:
    """(True, a value of a type ``types`` does not allow), or (False, None) if it allows all."""
    for kind, value in _WRONG_VALUES:
        if kind not in types and not (kind == "integer" and "number" in types):
            return True, copy.deepcopy(value)
    return False, None


def _off_value(allowed: tuple[Any, ...], rng: random.Random) -> str:
    """A text that is not among ``allowed``: ``unsure``, or a near miss of one of them such
    as ``Billing issue`` for ``billing``."""
    strings = [v for v in allowed if isinstance(v, str)]
    near = rng.choice(strings).replace("_", " ").capitalize() if strings else "Other"
    candidates = ["unsure", f"{near} issue", "none of these"]
    start = rng.randrange(len(candidates))
    for text in candidates[start:] + candidates[:start]:
        if text not in allowed:
            return text
    n = 2
    while f"unsure {n}" in allowed:  # ends: allowed is finite
        n += 1
    return f"unsure {n}"


def _prose(value: object, name: str) -> str:
    """An answer in words, the schema ignored (no JSON to parse)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str | int | float) and not isinstance(item, bool):
                return f"Sure, the {key} is {item}."
    return f"Sure, here is the {name or 'answer'} you asked for."


def _replace(root: Any, path: Path, new: Any) -> Any:
    """``root`` with the value at ``path`` replaced by ``new`` (in place unless at the root)."""
    if not path:
        return new
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return root


def _spoiled(kind: str, value: Any, gen: _Instance, spec: _Structured, wire: Wire,
             rng: random.Random) -> _StructuredAnswer:
    """An invalid answer derived from the valid instance ``value``: ``kind`` if the instance
    allows it, else the next kind in ``_INVALID_KINDS``."""
    for form in _INVALID_KINDS[_INVALID_KINDS.index(kind):]:
        if form == "off_enum" and gen.enum_sites:
            path, allowed = rng.choice(gen.enum_sites)
            bad = _replace(value, path, _off_value(allowed, rng))
            return _StructuredAnswer(bad if isinstance(bad, dict) else None, _dumps(bad), True)
        if form == "schema":
            options: list[tuple[Path, str, bool, Any]] = []  # (object, property, drop?, value)
            for path, required, props in gen.objects:
                obj = value
                for step in path:
                    obj = obj[step]
                options += [(path, name, True, None) for name in required if name in obj]
                for name in obj:
                    types = _types_of(gen, props.get(name, {}))
                    found, wrong = _wrong_value(types) if types is not None else (False, None)
                    if found:
                        options.append((path, name, False, wrong))
            if options:
                path, name, drop, wrong = rng.choice(options)
                obj = value
                for step in path:
                    obj = obj[step]
                if drop:
                    del obj[name]
                else:
                    obj[name] = wrong
                return _StructuredAnswer(value if isinstance(value, dict) else None,
                                         _dumps(value), True)
        if form == "unparsable":
            if wire == "anthropic":  # the tool ignored: prose in a text block
                return _StructuredAnswer(None, _prose(value, spec.name), True)
            text = _dumps(value)
            cut = text[: len(text) // 2]
            if not cut or _parses(cut):  # e.g. "12.5" cut to "12": prose instead
                cut = _prose(value, spec.name)
            return _StructuredAnswer(None, cut, True)
    raise AssertionError("unparsable is always possible")  # pragma: no cover


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _off_choice(kind: str, label: str, choices: tuple[str, ...],
                rng: random.Random) -> str:
    """A text that is not one of ``choices``: an off-label word, prose, or JSON."""
    if kind == "unparsable":
        text = f"This looks like {label} to me."
    elif kind == "schema":
        text = _dumps({"label": label})
    else:
        return _off_value(choices, rng)
    return text if text not in choices else _off_value(choices, rng)


def _structured_answer(call: _Call, invalid_rate: float,
                       quality: QualityModel | None = None) -> _StructuredAnswer:
    """The answer to ``call.structured`` (see the module docstring). With the ``quality``
    model the valid answer is the prompt's true output, or a wrong one (see
    :mod:`batchroute.devtools.mock_quality`)."""
    spec = call.structured
    assert spec is not None
    # A digest of its own, so the answer is independent of the other uses of call.digest.
    # Whether the answer is invalid, and how, is decided first, so the valid instance is the
    # same whatever invalid_rate is.
    key = hashlib.blake2b(call.digest, digest_size=16, person=b"structured").digest()
    invalid = int.from_bytes(key[:4], "big") / 2**32 < invalid_rate
    kind = _INVALID_KINDS[key[4] % len(_INVALID_KINDS)]
    rng = random.Random(int.from_bytes(key[5:], "big"))
    right = quality is None or quality.correct(call.route_text, call.model)
    schema_key = _dumps(spec.billed)
    truth = (None if quality is None else
             random.Random(mock_quality.prompt_seed(call.route_text, schema_key)))
    wrong = (None if right else
             random.Random(mock_quality.wrong_seed(call.route_text, call.model, schema_key)))
    if spec.choices is not None:
        label = (truth or rng).choice(spec.choices)
        if wrong is not None and len(spec.choices) > 1:
            label = wrong.choice([c for c in spec.choices if c != label])
        if invalid:
            return _StructuredAnswer(None, _off_choice(kind, label, spec.choices, rng), True)
        return _StructuredAnswer(None, label)
    schema = spec.schema
    if call.wire == "anthropic" and "type" not in schema:
        schema = {**schema, "type": "object"}  # a tool input is always an object
    gen = _Instance(schema, truth or rng)
    value = gen.value(schema)
    if wrong is not None:
        value = _wrong_answer(value, schema, _Instance(schema, wrong))
    if invalid:
        gen.rng = rng  # the spoiling draws stay the request's own
        return _spoiled(kind, value, gen, spec, call.wire, rng)
    return _StructuredAnswer(value if isinstance(value, dict) else None, _dumps(value))


def _wrong_answer(value: Any, schema: object, gen: _Instance) -> Any:
    """``value`` with at least one top-level field changed (an enum value: another one of
    its values), drawn from ``gen``: a model's wrong answer to the prompt."""
    resolved = gen.resolve(schema)
    props = resolved.get("properties") if isinstance(resolved, dict) else None
    if not (isinstance(value, dict) and isinstance(props, dict)):
        return _other_value(value, schema, gen)
    keys = [k for k in value if k in props]
    if not keys:
        return value
    chosen = [k for k in keys if gen.rng.random() < 0.5] or [gen.rng.choice(keys)]
    return {k: _other_value(v, props[k], gen) if k in chosen else v for k, v in value.items()}


def _other_value(old: Any, schema: object, gen: _Instance) -> Any:
    resolved = gen.resolve(schema)
    allowed = resolved.get("enum") if isinstance(resolved, dict) else None
    if isinstance(allowed, list):
        others = [a for a in allowed if a != old]
        return copy.deepcopy(gen.rng.choice(others)) if others else old
    new = old
    for _ in range(8):  # a draw equal to the old value (a boolean, say) is drawn again
        new = gen.value(schema)
        if new != old:
            break
    return new


def _judged(call: _Call) -> _StructuredAnswer:
    """A judge call's answer: the two answers' quality markers read back exactly."""
    candidate, reference = mock_quality.judge_scores(call.route_text)
    value = {"candidate": candidate, "reference": reference}
    return _StructuredAnswer(value, _dumps(value))


def _latency_s(call: _Call, median_ms: float) -> float:
    if median_ms <= 0:
        return 0.0
    u = (int.from_bytes(call.digest[9:13], "big") + 0.5) / 2**32
    factor = min(_LATENCY_CAP, math.exp(_LATENCY_SIGMA * NormalDist().inv_cdf(u)))
    return median_ms * factor / 1000.0


class _BadRequest(Exception):
    """The request body is not a valid call; the message is safe to return to the client."""


def _parse_call(wire: Wire, body: object) -> _Call:
    """Validate a decoded JSON body. Raises :class:`_BadRequest` naming the bad field."""
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    if body.get("stream"):
        raise _BadRequest("'stream' is not supported by the mock provider")
    texts: list[str] = []
    last_user = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest(f"messages[{i}] must be an object with a string 'role'")
        text = _text_of(message.get("content"))
        texts.append(text)
        if message["role"] == "user":
            last_user = text
    # What the model reads: a message's text, whether sent whole or in content blocks (a
    # cache breakpoint splits it), so marking a cache changes no answer.
    read = [{"role": m["role"], "content": t} for m, t in zip(messages, texts, strict=True)]
    system = ""
    thinking = 0
    if wire == "openai":
        if is_reasoning_model(model):
            _check_reasoning_request(body)
        raw_max = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = None if raw_max is None else _positive_int(raw_max, "max_tokens")
    else:
        if "max_tokens" not in body:
            raise _BadRequest("'max_tokens' is required")
        max_tokens = _positive_int(body["max_tokens"], "max_tokens")
        system = _text_of(body.get("system"))
        thinking = _thinking_budget(body, max_tokens)
    prompt_tokens = count_tokens(system) + sum(count_tokens(t) for t in texts)
    schema = _route_schema(wire, body)
    structured = _structured_output(wire, body) if schema is None else None
    billed = schema if structured is None else structured.billed
    if billed is not None:  # providers bill the schema (or tool definition) as prompt
        prompt_tokens += count_tokens(json.dumps(billed, separators=(",", ":")))
    # Hash what defines the answer. max_tokens is left out on purpose: it only truncates,
    # so a smaller cap yields a prefix of the same answer.
    key = json.dumps([model, system, read], sort_keys=True, separators=(",", ":"))
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    billed_text = "" if billed is None else json.dumps(billed, separators=(",", ":"))
    return _Call(
        wire=wire,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        digest=digest,
        mmlu=last_user.rstrip().endswith("Answer:"),
        route=None if schema is None else _route_labels(schema),
        route_text=last_user,
        structured=structured,
        reasoning_tokens=_reasoning_tokens(digest, max_tokens, thinking) if (
            thinking or (wire == "openai" and is_reasoning_model(model))) else 0,
        cache_points=(_anthropic_cache(body, model, billed_text) if wire == "anthropic"
                      else _openai_cache(model, billed_text, read)),
    )


# Prompt caching, as the providers describe it. Anthropic caches what comes before and
# includes a block marked cache_control (in the order tools, system, messages), if it is at
# least the model's minimum; OpenAI caches any prompt of 1,024 tokens or more, unasked, and
# reports the longest cached prefix in steps of 128 tokens. Both count the cached prefix in
# tokens of the same rule as the prompt (count_tokens per part).
_CACHE_STEP_TOKENS: Final = 128


def _marked(part: object) -> bool:
    return isinstance(part, dict) and isinstance(part.get("cache_control"), dict)


def _anthropic_cache(body: dict[str, Any], model: str,
                     billed: str) -> tuple[tuple[int, bytes], ...]:
    """The one prefix a request's last cache_control breakpoint marks, or none."""
    parts: list[str] = [billed]
    point = 0 if any(_marked(t) for t in body.get("tools") or []) else -1
    system = body.get("system")
    for block in system if isinstance(system, list) else [system]:
        parts.append(_text_of([block]) if isinstance(block, dict) else _text_of(block))
        if _marked(block):
            point = len(parts) - 1
    for message in body["messages"]:
        content = message.get("content")
        for block in content if isinstance(content, list) else [content]:
            parts.append(_text_of([block]) if isinstance(block, dict) else _text_of(block))
            if _marked(block):
                point = len(parts) - 1
    if point < 0:
        return ()
    prefix = parts[: point + 1]
    digest = hashlib.blake2b(json.dumps([model, prefix]).encode(), digest_size=16).digest()
    return ((sum(count_tokens(p) for p in prefix), digest),)


def _openai_cache(model: str, billed: str,
                  read: list[dict[str, str]]) -> tuple[tuple[int, bytes], ...]:
    """Every cacheable prefix of the prompt: 1,024 tokens, then each 128 more."""
    text = billed + "".join(f"\x00{m['role']}\x00{m['content']}" for m in read)
    total = len(text) // _CHARS_PER_TOKEN
    if total < CACHE_MIN_TOKENS:
        return ()
    h = hashlib.blake2b(model.encode(), digest_size=16)
    points = []
    done = 0
    for tokens_ in range(CACHE_MIN_TOKENS, total + 1, _CACHE_STEP_TOKENS):
        end = tokens_ * _CHARS_PER_TOKEN
        h.update(text[done:end].encode())
        done = end
        points.append((tokens_, h.copy().digest()))
    return tuple(points)


# OpenAI's reasoning families (the o-series, GPT-5), by model id, as the real API treats them.
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)


def is_reasoning_model(model: str) -> bool:
    return bool(_REASONING_MODEL.match(model))


def _check_reasoning_request(body: dict[str, Any]) -> None:
    """What OpenAI refuses from a reasoning model, with its wording."""
    if "max_tokens" in body:
        raise _BadRequest("Unsupported parameter: 'max_tokens' is not supported with this "
                          "model. Use 'max_completion_tokens' instead.")
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise _BadRequest(f"Unsupported value: 'temperature' does not support {temperature} "
                          "with this model. Only the default (1) value is supported.")


def _thinking_budget(body: dict[str, Any], max_tokens: int) -> int:
    """Anthropic's extended thinking budget (0 without one), checked as the API checks it."""
    thinking = body.get("thinking")
    if thinking is None:
        return 0
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        raise _BadRequest("thinking: expected {\"type\": \"enabled\", \"budget_tokens\": N}")
    budget = _positive_int(thinking.get("budget_tokens"), "thinking.budget_tokens")
    if budget < 1024:
        raise _BadRequest("thinking.budget_tokens: Input should be greater than or equal to 1024")
    if budget >= max_tokens:
        raise _BadRequest("`max_tokens` must be greater than `thinking.budget_tokens`")
    if "temperature" in body and body["temperature"] != 1:
        raise _BadRequest("`temperature` may only be set to 1 when thinking is enabled")
    return budget


def _reasoning_tokens(digest: bytes, cap: int | None, budget: int) -> int:
    """Tokens the simulated model thinks: 64-511 by the digest, within its budget."""
    tokens = 64 + int.from_bytes(digest[13:15], "big") % 448
    if budget:
        tokens = min(tokens, budget)
    return tokens if cap is None else min(tokens, cap // 2)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(f"'{name}' must be an integer >= 1")
    return value


# --------------------------------------------------------------------------------------------
# Counters


class ProviderStats(TypedDict):
    """What :meth:`MockProvider.stats` and ``GET /stats`` report.

    ``requests`` counts calls to the two API endpoints (not /health or /stats); ``by_status``
    is keyed by the status code as a string and counts replies actually sent (a dropped or
    hung request that never completes has none); ``rate_limited`` counts 429s from the real
    limiter only; ``faults`` counts injected faults by ``x-mock-fault`` name; the token totals
    add up the ``usage`` of every well-formed successful reply; ``structured`` counts those
    replies that answer a structured output other than route_decision (labels, choice, JSON
    extraction), and ``invalid_answers`` how many of those were made invalid on purpose
    (``invalid_rate``; a valid answer cut by ``max_tokens`` does not count).

    Batches (see :mod:`batchroute.devtools.mock_batches`): ``requests`` and ``by_status``
    count the batch endpoints' HTTP calls too, never their lines; the lines a batch completes
    add their usage to the token totals (and to ``structured``/``invalid_answers``) when its
    results are written. ``batch_lines_received`` counts the lines accepted into batches
    (both wires), ``batch_duplicate_custom_ids`` the custom_ids received more than once over
    the server's life (across batches and wires), ``batches_by_status`` every batch by its
    current status, and ``batch_by_model`` / ``batch_by_key`` the first two per model and per
    API key (named by a short digest, never the key itself).
    """

    requests: int
    by_model: dict[str, int]
    by_status: dict[str, int]
    rate_limited: int
    faults: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    structured: int
    invalid_answers: int
    cached_prompt_tokens: int
    cache_write_tokens: int
    flex_requests: int
    flex_unavailable: int
    batch_lines_received: int
    batch_duplicate_custom_ids: int
    batches_by_status: dict[str, int]
    batch_by_model: dict[str, dict[str, int]]
    batch_by_key: dict[str, dict[str, int]]


def _empty_stats() -> ProviderStats:
    return ProviderStats(
        requests=0,
        by_model={},
        by_status={},
        rate_limited=0,
        faults=dict.fromkeys(FAULTS, 0),
        prompt_tokens=0,
        completion_tokens=0,
        structured=0,
        invalid_answers=0,
        cached_prompt_tokens=0,
        cache_write_tokens=0,
        flex_requests=0,
        flex_unavailable=0,
        batch_lines_received=0,
        batch_duplicate_custom_ids=0,
        batches_by_status={},
        batch_by_model={},
        batch_by_key={},
    )


def _copy_stats(stats: ProviderStats) -> ProviderStats:
    return ProviderStats(
        requests=stats["requests"],
        by_model=dict(stats["by_model"]),
        by_status=dict(stats["by_status"]),
        rate_limited=stats["rate_limited"],
        faults=dict(stats["faults"]),
        prompt_tokens=stats["prompt_tokens"],
        completion_tokens=stats["completion_tokens"],
        structured=stats["structured"],
        invalid_answers=stats["invalid_answers"],
        cached_prompt_tokens=stats["cached_prompt_tokens"],
        cache_write_tokens=stats["cache_write_tokens"],
        flex_requests=stats["flex_requests"],
        flex_unavailable=stats["flex_unavailable"],
        batch_lines_received=stats["batch_lines_received"],
        batch_duplicate_custom_ids=stats["batch_duplicate_custom_ids"],
        batches_by_status=dict(stats["batches_by_status"]),
        batch_by_model={k: dict(v) for k, v in stats["batch_by_model"].items()},
        batch_by_key={k: dict(v) for k, v in stats["batch_by_key"].items()},
    )


# --------------------------------------------------------------------------------------------
# The server


_ERROR_TYPES: Final[Mapping[Wire, Mapping[int, tuple[str, str | None]]]] = {
    # status -> (error type, OpenAI error code)
    "openai": {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        404: ("invalid_request_error", "DeploymentNotFound"),
        429: ("requests", "rate_limit_exceeded"),
        500: ("server_error", None),
        503: ("server_error", "service_unavailable"),
    },
    "anthropic": {
        400: ("invalid_request_error", None),
        401: ("authentication_error", None),
        429: ("rate_limit_error", None),
        500: ("api_error", None),
        503: ("overloaded_error", None),
    },
}


class _MockServer:
    """The request handlers and all mutable state.

    Invariant: the limiter buckets, the fault RNG and the counters are touched only by the
    event loop that runs the app, so they need no lock; other threads read a snapshot taken
    on that loop (see :meth:`MockProvider.stats`).
    """

    def __init__(self, config: MockProviderConfig, clock: Callable[[], float]) -> None:
        from batchroute.devtools.mock_batches import BatchStore  # it imports this module

        self.config = config
        self._clock = clock
        self._invalid_rates = dict(config.model_invalid_rates)
        self._quality = (QualityModel(dict(config.model_skills)) if config.quality else None)
        self._rng = random.Random(config.seed)
        self._limits: dict[tuple[str, str], _Limits] = {}
        self.counters = _empty_stats()
        self._seq = 0
        # prefix digest -> (when the reply that wrote it was sent, when it expires)
        self._cache: dict[bytes, tuple[float, float]] = {}
        self._flex_rng = random.Random(config.seed + 1)
        self._bands: list[tuple[float, str]] = []
        edge = 0.0
        for (_, rate), fault in zip(config._fault_rates(), _RATE_FAULTS, strict=True):
            if rate > 0:
                edge += rate
                self._bands.append((edge, fault))
        self.batches = BatchStore(self)

    def build_app(self) -> web.Application:
        from aiohttp import web

        # Large enough for long prompts; the default 1 MiB would 413 a big context window.
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        # Gemini's OpenAI-compatible endpoint, and Azure OpenAI's deployment URLs.
        app.router.add_post("/v1beta/openai/chat/completions", self._openai)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        self.batches.mount(app)
        return app

    # -- small endpoints ------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return _json_response(200, {"ok": True, "server": SERVER_NAME})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        self.batches.count_statuses()
        return _json_response(200, self.counters)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai")

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic")

    async def _azure(self, request: web.Request) -> web.StreamResponse:
        """Azure OpenAI: the OpenAI wire at a deployment's URL, which needs ``api-version``
        (Azure answers 404 without it) and takes its key in an ``api-key`` header."""
        if not request.query.get("api-version"):
            self.counters["requests"] += 1
            return _error("openai", 404, "Resource not found: the api-version query "
                          "parameter is required")
        return await self._handle(request, "openai")

    # -- the API endpoints -----------------------------------------------------------------

    async def _handle(self, request: web.Request, wire: Wire) -> web.StreamResponse:
        counters = self.counters
        counters["requests"] += 1
        response = await self._respond(request, wire)
        # Only the drop fault prepares (sends) its response itself; the client never got a
        # complete reply, so there is no status to count.
        if not response.prepared:
            key = str(response.status)
            counters["by_status"][key] = counters["by_status"].get(key, 0) + 1
        return response

    async def _respond(self, request: web.Request, wire: Wire) -> web.StreamResponse:
        """Answer one API call (validation, auth, limits, faults, latency, reply)."""
        counters = self.counters
        try:
            body = json.loads(await request.read())
            call = _parse_call(wire, body)
        except (ValueError, _BadRequest) as exc:
            message = str(exc) if isinstance(exc, _BadRequest) else "request body is not JSON"
            return _error(wire, 400, message)
        counters["by_model"][call.model] = counters["by_model"].get(call.model, 0) + 1

        headers = request.headers
        forced = headers.get("x-mock-fault")
        if forced is not None and forced not in FAULTS:
            return _error(wire, 400, f"x-mock-fault must be one of {', '.join(FAULTS)}")
        if wire == "anthropic" and "anthropic-version" not in headers:
            return _error(wire, 400, "anthropic-version: header is required")

        if forced == "401":
            counters["faults"]["401"] += 1
            return _error(wire, 401, "Invalid API key (forced by x-mock-fault).")
        key = _presented_key(wire, headers)
        denial = self._authenticate(key)
        if denial is not None:
            return _error(wire, 401, denial, code="expired_api_key" if "expired" in denial else None)

        if forced is not None:
            fault: str | None = forced
            admission = self._admit(call, key or "", consume=False)
        else:
            admission = self._admit(call, key or "", consume=True)
            if admission.wait_s > 0:
                counters["rate_limited"] += 1
                return self._rate_limited(call, admission)
            fault = self._draw_fault()
        rl_headers = admission.headers
        if wire == "openai" and body.get("service_tier") == "flex":
            counters["flex_requests"] += 1
            rate = self.config.flex_unavailable_rate
            if rate and self._flex_rng.random() < rate:
                counters["flex_unavailable"] += 1
                return _error(wire, 429, "Resource unavailable: flex processing is "
                              "temporarily out of capacity. Please retry later or use the "
                              "default service tier.", headers=rl_headers,
                              code="resource_unavailable")
        if fault is not None:
            counters["faults"][fault] += 1
            if fault == "429":
                rl_headers = {**rl_headers, "retry-after": "1", "retry-after-ms": "1000"}
                return _error(wire, 429, "Rate limit exceeded, please retry shortly.",
                              headers=rl_headers, code="rate_limit_exceeded")

        arrived = self._clock()
        delay = self.config.hang_s if fault == "timeout" else _latency_s(
            call, self.config.latency_ms
        )
        if delay > 0:
            await asyncio.sleep(delay)

        if fault == "500":
            return _error(wire, 500, "The server had an error while processing your request.",
                          headers=rl_headers)
        if fault == "503":
            return _error(wire, 503, "The server is overloaded, please retry.",
                          headers=rl_headers)
        payload, completion_tokens, invalid = self._reply(call, arrived)
        if fault == "malformed":
            return _raw_response(200, payload[: len(payload) // 2], rl_headers)
        if fault == "drop":
            return await _drop(request, payload, rl_headers)
        counters["prompt_tokens"] += call.prompt_tokens
        counters["completion_tokens"] += completion_tokens
        if invalid is not None:
            counters["structured"] += 1
            counters["invalid_answers"] += invalid
        return _raw_response(200, payload, rl_headers)

    def _authenticate(self, key: str | None) -> str | None:
        """None if the key is accepted, else a message that does not contain the key."""
        config = self.config
        if key is not None and key in config.expired_keys:
            return "The API key has expired."
        if config.api_key is None:
            return None
        if key is None:
            return "No API key provided."
        # Constant-time: the mock should not teach clients to leak keys through timing either.
        if not hmac.compare_digest(key.encode(), config.api_key.encode()):
            return "Incorrect API key provided."
        return None

    def _admit(self, call: _Call, key: str, *, consume: bool) -> _Admission:
        """Refill, check and (if ``consume`` and there is room) charge both buckets."""
        config = self.config
        now = self._clock()
        limits = self._limits.get((call.model, key))
        if limits is None:
            rpm, tpm = config.limits_for(call.model)
            window = config.window_s
            limits = _Limits(
                requests=_TokenBucket(rpm, window, now) if rpm else None,
                tokens=_TokenBucket(tpm, window, now) if tpm else None,
            )
            self._limits[(call.model, key)] = limits
        wait_s = 0.0
        limited_by: Literal["requests", "tokens"] | None = None
        limit: int | None = None
        for name, bucket, amount in (
            ("requests", limits.requests, 1),
            ("tokens", limits.tokens, call.token_cost),
        ):
            if bucket is None:
                continue
            bucket.refill(now)
            wait = bucket.wait_s(amount)
            if wait > wait_s:
                wait_s = wait
                limited_by = "requests" if name == "requests" else "tokens"
                limit = bucket.per_minute
        if consume and wait_s == 0:
            if limits.requests is not None:
                limits.requests.level -= 1
            if limits.tokens is not None:
                limits.tokens.level -= call.token_cost
        return _Admission(wait_s, limited_by, limit, _limit_headers(call.wire, limits))

    def _rate_limited(self, call: _Call, admission: _Admission) -> web.StreamResponse:
        dimension = admission.limited_by or "requests"
        unit = "requests" if dimension == "requests" else "tokens"
        limit = admission.limit
        headers = dict(admission.headers)
        if math.isinf(admission.wait_s):
            message = (
                f"Request too large for {call.model} on tokens per min (TPM): Limit {limit}, "
                f"Requested {call.token_cost}. Reduce the prompt or max_tokens."
            )
        else:
            headers["retry-after"] = str(max(1, math.ceil(admission.wait_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(admission.wait_s * 1000)))
            message = (
                f"Rate limit reached for {call.model} on {unit} per min: Limit {limit}. "
                f"Please try again in {_go_duration(admission.wait_s)}."
            )
        return _error(call.wire, 429, message, headers=headers, code="rate_limit_exceeded",
                      openai_type=unit)

    def _draw_fault(self) -> str | None:
        # Always draw, even with no faults configured, so the sequence depends only on the
        # order of admitted requests.
        u = self._rng.random()
        for edge, fault in self._bands:
            if u < edge:
                return fault
        return None

    def _cached(self, call: _Call, arrived: float | None) -> tuple[int, int]:
        """(prompt tokens read from the cache, written to it) for a reply sent now to a
        request that arrived at ``arrived``. An entry serves requests that arrive after the
        reply that wrote it was sent (a request already waiting writes it again), until
        ``cache_ttl_s`` after its last use. Only Anthropic reports (and bills) writes."""
        points = [p for p in call.cache_points if p[0] >= self.config.cache_min_tokens]
        if not points:
            return 0, 0
        now = self._clock()
        seen = now if arrived is None else arrived
        cache = self._cache
        hit = 0
        for n, digest in points:
            ready, until = cache.get(digest, (math.inf, -math.inf))
            if ready <= seen < until:
                hit = max(hit, n)
        if len(cache) > 100_000:  # forget what expired, now and then
            for digest in [d for d, (_, until) in cache.items() if until <= now]:
                del cache[digest]
        for _, digest in points:
            ready, _ = cache.get(digest, (now, now))
            cache[digest] = (min(ready, now), now + self.config.cache_ttl_s)
        if call.wire == "anthropic" and not hit:
            return 0, points[-1][0]
        return hit, 0

    def _reply(self, call: _Call, arrived: float | None = None
               ) -> tuple[bytes, int, bool | None]:
        """The JSON body of a successful reply, its completion tokens, and, when it answers a
        structured output other than route_decision, whether that answer was made invalid on
        purpose (None otherwise). ``arrived``: when the request came in (None: now), for the
        prompt cache."""
        tool_input: dict[str, Any] | None = None
        tool_name = ROUTE_DECISION
        invalid: bool | None = None
        reasoning = call.reasoning_tokens
        if reasoning and call.max_tokens is not None:  # thinking comes out of the same cap
            call = replace(call, max_tokens=call.max_tokens - reasoning)
        if call.route is not None or call.structured is not None:
            if call.structured is not None and self._quality is not None and (
                    call.structured.name == mock_quality.JUDGE):
                answer = _judged(call)
                text, tool_input, invalid = answer.text, answer.tool_input, answer.invalid
                tool_name = call.structured.name
            elif call.structured is not None:
                answer = _structured_answer(call, self._invalid_rates.get(
                    call.model, self.config.invalid_rate), self._quality)
                text, tool_input, invalid = answer.text, answer.tool_input, answer.invalid
                tool_name = call.structured.name
            else:
                decision = _decide(call, self.config.route_garbage_rate)
                text, tool_input = decision.text, decision.tool_input
            cap = call.max_tokens
            truncated = cap is not None and count_tokens(text) > cap
            if cap is not None and truncated:
                text, tool_input = text[: cap * _CHARS_PER_TOKEN], None
        else:
            text, truncated = _answer(call, self._quality)
        completion_tokens = count_tokens(text) + reasoning
        cached, written = self._cached(call, arrived)
        self.counters["cached_prompt_tokens"] += cached
        self.counters["cache_write_tokens"] += written
        self._seq += 1
        suffix = f"{self._seq:08x}{call.digest.hex()[:16]}"
        body: dict[str, Any]
        if call.wire == "openai":
            body = {
                "id": f"chatcmpl-mock{suffix}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if truncated else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": call.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": call.prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            }
            if reasoning:
                body["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        else:
            content: list[dict[str, Any]] = [{"type": "text", "text": text}]
            stop = "max_tokens" if truncated else "end_turn"
            if tool_input is not None:
                content = [{"type": "tool_use", "id": f"toolu_mock{suffix}",
                            "name": tool_name, "input": tool_input}]
                stop = "tool_use"
            if reasoning:  # billed in output_tokens, not reported apart
                content = [{"type": "thinking", "thinking": "(simulated)",
                            "signature": f"mock{suffix}"}, *content]
            body = {
                "id": f"msg_mock{suffix}",
                "type": "message",
                "role": "assistant",
                "model": call.model,
                "content": content,
                "stop_reason": stop,
                "stop_sequence": None,
                # Anthropic's input_tokens leaves out what was read from or written to
                # the cache.
                "usage": {"input_tokens": call.prompt_tokens - cached - written,
                          "cache_creation_input_tokens": written,
                          "cache_read_input_tokens": cached,
                          "output_tokens": completion_tokens},
            }
        return json.dumps(body, separators=(",", ":")).encode(), completion_tokens, invalid


def _presented_key(wire: Wire, headers: Mapping[str, str]) -> str | None:
    if wire == "anthropic":
        return headers.get("x-api-key") or None
    if headers.get("api-key"):  # Azure OpenAI
        return headers["api-key"]
    auth = headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _limit_headers(wire: Wire, limits: _Limits) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, bucket in (("requests", limits.requests), ("tokens", limits.tokens)):
        if bucket is None:
            continue
        limit = str(bucket.per_minute)
        remaining = str(max(0, math.floor(bucket.level)))
        reset_s = bucket.reset_s()
        headers[f"x-ratelimit-limit-{name}"] = limit
        headers[f"x-ratelimit-remaining-{name}"] = remaining
        headers[f"x-ratelimit-reset-{name}"] = _go_duration(reset_s)
        if wire == "anthropic":
            headers[f"anthropic-ratelimit-{name}-limit"] = limit
            headers[f"anthropic-ratelimit-{name}-remaining"] = remaining
            headers[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(time.time() + reset_s)
    return headers


def _json_response(status: int, body: object,
                   headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    return _raw_response(status, json.dumps(body, separators=(",", ":")).encode(), headers)


def _raw_response(status: int, body: bytes,
                  headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    from aiohttp import web

    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)


def _error(wire: Wire, status: int, message: str, *, headers: Mapping[str, str] | None = None,
           code: str | None = None, openai_type: str | None = None) -> web.StreamResponse:
    error_type, default_code = _ERROR_TYPES[wire][status]
    if wire == "openai":
        body: dict[str, Any] = {"error": {"message": message, "type": openai_type or error_type,
                                          "code": code or default_code}}
    else:
        body = {"type": "error", "error": {"type": error_type, "message": message}}
    return _json_response(status, body, headers)


async def _drop(request: web.Request, payload: bytes,
                headers: Mapping[str, str]) -> web.StreamResponse:
    """Send a 200's headers and half its body, then close the socket: no valid HTTP reply.

    The returned response is already prepared; aiohttp's final ``write_eof`` then meets the
    closed transport and quietly treats it as a client disconnect.
    """
    from aiohttp import web

    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    transport = request.transport
    if transport is not None:
        transport.close()
    return response


async def _serve(server: _MockServer, config: MockProviderConfig,
                 on_ready: Callable[[int, asyncio.Event], None]) -> None:
    """Run the app on the current loop until the event handed to ``on_ready`` is set."""
    from aiohttp import web

    runner = web.AppRunner(
        server.build_app(),
        access_log=None,  # no per-request logging: it costs more than the handler itself
        # A client that gives up on a hung request should free the handler, not leave it
        # sleeping for hang_s.
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = int(runner.addresses[0][1])
        stop = asyncio.Event()
        on_ready(port, stop)
        await stop.wait()
    finally:
        await runner.cleanup()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class MockProvider:
    """The mock server on a background thread with its own event loop, for tests and demos.

    ``start()`` returns once the socket is bound; ``stop()`` (or leaving the ``with`` block)
    closes it, cancelling requests still in flight after a short grace period. An instance
    runs once. ``clock`` is the monotonic clock the rate limiter reads; tests pass a fake one
    to move time without sleeping.
    """

    def __init__(self, config: MockProviderConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config if config is not None else MockProviderConfig()
        self._server = _MockServer(self.config, clock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._port: int | None = None

    def start(self) -> int:
        """Bind and serve in the background; return the port. Raises OSError if binding fails,
        RuntimeError if this instance was already started."""
        if self._thread is not None:
            raise RuntimeError("MockProvider.start() called twice")
        ready = threading.Event()
        failure: list[BaseException] = []

        def on_ready(port: int, stop: asyncio.Event) -> None:
            self._port, self._stop = port, stop
            ready.set()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(_serve(self._server, self.config, on_ready))
            except BaseException as exc:  # handed to start() below, not lost in the thread
                failure.append(exc)
            finally:
                loop.close()
                ready.set()

        self._thread = threading.Thread(target=run, name="batchroute-mock-provider", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        assert self._port is not None
        return self._port

    def stop(self) -> None:
        """Close the server and wait for its thread. Safe to call twice or before start()."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed on its own
            loop.call_soon_threadsafe(stop.set)
        thread.join()

    @property
    def port(self) -> int:
        """The bound port. Raises RuntimeError before start()."""
        if self._port is None:
            raise RuntimeError("MockProvider is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL such as ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return _url(self.config.host, self.port)

    def stats(self) -> ProviderStats:
        """A consistent snapshot of the counters (see :class:`ProviderStats`)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            # Counters belong to the server loop; copy them there rather than lock every
            # request.
            future = asyncio.run_coroutine_threadsafe(self._snapshot(), loop)
            with contextlib.suppress(RuntimeError, asyncio.CancelledError):
                return future.result(timeout=10)
        return _copy_stats(self._server.counters)

    async def _snapshot(self) -> ProviderStats:
        self._server.batches.count_statuses()
        return _copy_stats(self._server.counters)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _describe(config: MockProviderConfig, port: int) -> str:
    parts = [f"rpm={config.rpm or 'unlimited'}, tpm={config.tpm or 'unlimited'}, "
             f"latency={config.latency_ms:g}ms"]
    if config.window_s != 60:
        parts[0] += f", window={config.window_s:g}s"
    parts += [f"{model}: rpm={rpm or 'unlimited'}, tpm={tpm or 'unlimited'}"
              for model, (rpm, tpm) in sorted(config.model_limits.items())]
    return f"mock provider listening on {_url(config.host, port)} ({'; '.join(parts)})"


def serve_forever(config: MockProviderConfig) -> None:
    """Serve on the calling thread until SIGINT or SIGTERM, then shut down cleanly.

    Prints one ``mock provider listening on ...`` line to stdout once bound. Raises OSError
    if the port cannot be bound.
    """
    server = _MockServer(config, time.monotonic)

    def on_ready(port: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still raises
                loop.add_signal_handler(signum, stop.set)
        print(_describe(config, port), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(server, config, on_ready))


# --------------------------------------------------------------------------------------------
# Command line


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _model_limit(text: str) -> tuple[str, int, int | None]:
    """Parse ``NAME=RPM[:TPM]`` (split at the last ``=``: model names may contain ``:``)."""
    name, sep, value = text.rpartition("=")
    rpm_text, colon, tpm_text = value.partition(":")
    try:
        if not (sep and name) or not rpm_text.isdigit() or (colon and not tpm_text.isdigit()):
            raise ValueError
        return name, int(rpm_text), int(tpm_text) if colon else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=RPM[:TPM] with whole numbers, such as gpt-4o=2400 or "
            f"m=600:100000, got {text!r}"
        ) from None


def _model_rate(text: str) -> tuple[str, float]:
    """Parse ``NAME=R`` (split at the last ``=``), R a share from 0 to 1."""
    name, sep, value = text.rpartition("=")
    if not (sep and name):
        raise argparse.ArgumentTypeError(f"expected NAME=R, such as gpt-4o=0, got {text!r}")
    return name, _probability(value)


def _model_skill(text: str) -> tuple[str, float]:
    """Parse ``NAME=S`` (split at the last ``=``), S a finite number."""
    name, sep, value = text.rpartition("=")
    try:
        skill = float(value)
    except ValueError:
        skill = math.nan
    if not (sep and name and math.isfinite(skill)):
        raise argparse.ArgumentTypeError(f"expected NAME=S with S a number, such as "
                                         f"gpt-4o=2.5, got {text!r}")
    return name, skill


def _window(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 60):
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 60, got {text}")
    return value


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``mock-provider`` subcommand; its ``func`` default returns the exit code."""
    parser = subparsers.add_parser(
        "mock-provider",
        help="run a local fake OpenAI/Anthropic server for demos and tests",
        description=(
            "Serve fake OpenAI chat-completions (/v1/chat/completions) and Anthropic messages "
            "(/v1/messages) endpoints on 127.0.0.1, and their batch APIs (/v1/files with "
            "/v1/batches, /v1/messages/batches). Answers are deterministic, usage is "
            "counted at 4 characters per token, and the server can enforce rate limits and "
            "inject faults so a job's retry handling can be watched without spending money. "
            "Any header 'x-mock-fault: 500|503|timeout|drop|malformed|429|401' forces one "
            "fault on that request. GET /stats shows the counters."
        ),
    )
    add = parser.add_argument
    add("--port", type=int, default=DEFAULT_CLI_PORT, metavar="N",
        help=f"TCP port on 127.0.0.1 to listen on (default {DEFAULT_CLI_PORT}; "
             "0 lets the system pick a free one)")
    add("--rpm", type=whole_number(0), default=None, metavar="N",
        help="requests per minute allowed for each model and API key; more get HTTP 429 "
             "with Retry-After (default: unlimited)")
    add("--tpm", type=whole_number(0), default=None, metavar="N",
        help="tokens per minute allowed for each model and API key, counting prompt tokens "
             "plus max_tokens of each request (default: unlimited)")
    add("--model-limit", type=_model_limit, action="append", default=[],
        dest="model_limits", metavar="NAME=RPM[:TPM]",
        help="limits for one model instead of --rpm/--tpm; a TPM left out (or 0) means "
             "unlimited tokens for that model, not the --tpm value. Repeat for more models "
             "(the last one given for a name wins), e.g. --model-limit gpt-4o=2400 "
             "--model-limit small=600:100000")
    add("--window-s", type=_window, default=60.0, metavar="S",
        help="seconds of quota the limits let through at once: 60 (default) allows a whole "
             "minute's requests in one burst, 1 only a second's worth; the per-minute rate "
             "is unchanged")
    add("--latency-ms", type=_non_negative_float, default=0.0, metavar="MS",
        help="typical (median) time to answer, in milliseconds; each request varies around "
             "it (default 0: answer immediately)")
    add("--fail-rate", type=_probability, default=0.0, metavar="P",
        help="share of requests, from 0 to 1, that get HTTP 500 (default 0)")
    add("--rate-503", type=_probability, default=0.0, metavar="P",
        help="share of requests that get HTTP 503 'overloaded' (default 0)")
    add("--timeout-rate", type=_probability, default=0.0, metavar="P",
        help="share of requests that hang for --hang-s seconds before answering, to test "
             "client timeouts (default 0)")
    add("--drop-rate", type=_probability, default=0.0, metavar="P",
        help="share of requests whose connection is cut halfway through the reply "
             "(default 0)")
    add("--malformed-rate", type=_probability, default=0.0, metavar="P",
        help="share of requests answered 200 with broken JSON (default 0)")
    add("--burst-429-rate", type=_probability, default=0.0, metavar="P",
        help="share of requests that get a surprise 429 with Retry-After: 1 even under the "
             "limits (default 0)")
    add("--route-garbage-rate", type=_probability, default=0.0, metavar="P",
        help="share of prompts, from 0 to 1, whose route_decision (difficulty) answer is "
             "malformed: prose, cut-off JSON or an unknown label; the same prompts every "
             "time (default 0)")
    add("--invalid-rate", type=_probability, default=0.0, metavar="R",
        help="share of structured requests (labels, choice, JSON schema; not route_decision), "
             "from 0 to 1, answered invalidly: a value outside the enum, cut-off JSON or "
             "prose, or a missing required property or wrong type; chosen by model and "
             "prompt, so the same requests fail every time and another model may answer "
             "them validly (default 0)")
    add("--model-invalid-rate", type=_model_rate, action="append", dest="model_invalid_rates",
        metavar="NAME=R", help="--invalid-rate for one model (its wire name); repeat for "
        "several, e.g. gpt-4o=0 for a strong model that never answers off-label")
    add("--quality", action="store_true",
        help="models differ in quality: each answers a prompt correctly or not by the bundled "
             "labels' recorded outcome, else by sigmoid(skill - difficulty); labels and JSON "
             "answers are the prompt's true output or a wrong one, free text carries a "
             "[q=0.73] marker that a judge call (structured output 'quality_judge') reads "
             "back (batchroute.devtools.mock_quality)")
    add("--model-skill", type=_model_skill, action="append", dest="model_skills",
        metavar="NAME=S", help="with --quality, the skill of one model (its wire name; "
        "defaults: mixtral-8x7b-instruct=1.0, claude-3-5-sonnet=2.2, "
        "gpt-4-1106-preview=2.8, others by name, else 2.0); repeat for several")
    add("--hang-s", type=_non_negative_float, default=30.0, metavar="S",
        help="seconds a --timeout-rate request hangs (default 30)")
    add("--flex-unavailable-rate", type=_probability, default=0.0, metavar="R",
        help="share of OpenAI service_tier=flex requests refused with a 429 "
             "resource_unavailable, as flex capacity may be (default 0)")
    add("--cache-ttl-s", type=_non_negative_float, default=300.0, metavar="S",
        help="seconds a prompt-cache entry lives after its last use (default 300, "
             "Anthropic's 5 minutes)")
    add("--cache-min-tokens", type=whole_number(1), default=CACHE_MIN_TOKENS, metavar="N",
        help=f"shortest prefix cached, in tokens (default {CACHE_MIN_TOKENS})")
    add("--api-key-env", default=None, metavar="NAME",
        help="name of an environment variable holding the one API key to accept; other keys "
             "get HTTP 401. The key itself is never passed on the command line "
             "(default: accept any key)")
    add("--batch-delay-s", type=_non_negative_float, default=2.0, metavar="S",
        help="seconds a batch (OpenAI /v1/batches, Anthropic /v1/messages/batches) takes "
             "from creation to completed/ended; its lines finish spread over that time "
             "(default 2)")
    add("--batch-expire-share", type=_probability, default=0.0, metavar="S",
        help="share of batch lines, from 0 to 1, never processed: the batch ends expired "
             "at --batch-delay-s and those lines are reported expired (default 0)")
    add("--batch-line-error-rate", type=_probability, default=0.0, metavar="R",
        help="share of batch lines, from 0 to 1, answered with a 500 error instead of a "
             "reply (default 0; a body the sync endpoint would refuse always errors)")
    add("--batch-queue-tokens", type=whole_number(0), default=None, metavar="N",
        help="enqueued-token limit per model and API key for OpenAI batches (prompt "
             "tokens plus max_tokens of every line of the unfinished batches); a batch "
             "over it fails with token_limit_exceeded (default: unlimited)")
    add("--seed", type=int, default=0, metavar="N",
        help="seed for the random fault choices, so a run can be replayed exactly (default 0)")
    add("--wait-ready", action="store_true",
        help=f"do not serve: wait up to {_WAIT_READY_S:g} s for a mock provider already "
             "starting on --port to answer /health, then exit 0 (or 1 if it never does); "
             "for scripts that start the server in the background")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    if args.wait_ready:
        if args.port == 0:
            print("--wait-ready needs the --port the server was started with", file=sys.stderr)
            return 1
        if _wait_ready(_url("127.0.0.1", args.port), _WAIT_READY_S):
            return 0
        print(f"mock provider on port {args.port} did not answer /health within "
              f"{_WAIT_READY_S:g} s", file=sys.stderr)
        return 1
    api_key: str | None = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env) or None
        if api_key is None:
            # Naming the variable is safe; its value is what must never be printed.
            print(f"warning: {args.api_key_env} is not set; accepting any API key",
                  file=sys.stderr)
    try:
        config = MockProviderConfig(
            port=args.port, rpm=args.rpm, tpm=args.tpm,
            model_limits={name: (rpm, tpm) for name, rpm, tpm in args.model_limits},
            window_s=args.window_s, latency_ms=args.latency_ms,
            fail_rate=args.fail_rate, rate_503=args.rate_503, timeout_rate=args.timeout_rate,
            drop_rate=args.drop_rate, malformed_rate=args.malformed_rate,
            burst_429_rate=args.burst_429_rate, route_garbage_rate=args.route_garbage_rate,
            invalid_rate=args.invalid_rate, hang_s=args.hang_s, api_key=api_key,
            cache_ttl_s=args.cache_ttl_s, cache_min_tokens=args.cache_min_tokens,
            flex_unavailable_rate=args.flex_unavailable_rate,
            model_invalid_rates=tuple(args.model_invalid_rates or ()),
            seed=args.seed, batch_delay_s=args.batch_delay_s,
            batch_expire_share=args.batch_expire_share,
            batch_line_error_rate=args.batch_line_error_rate,
            batch_queue_tokens=args.batch_queue_tokens,
            quality=args.quality, model_skills=tuple(args.model_skills or ()),
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        serve_forever(config)
    except OSError as exc:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


def _wait_ready(base_url: str, timeout_s: float,
                sleep: Callable[[float], None] = time.sleep) -> bool:
    """Poll ``GET /health`` until it answers 200 or ``timeout_s`` passes."""
    # No proxies: an HTTP_PROXY in the environment must not swallow a loopback request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while True:
        with (
            contextlib.suppress(OSError, ValueError),  # URLError is an OSError
            opener.open(f"{base_url}/health", timeout=1.0) as response,
        ):
            if response.status == 200:
                return True
        if time.monotonic() >= deadline:
            return False
        sleep(0.1)
