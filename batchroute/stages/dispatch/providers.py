"""Provider adapters: build a request for one row, read a response, translate failures.

Two wire formats cover the field: OpenAI chat completions (also vLLM, llama.cpp, LiteLLM proxy,
Ollama and other OpenAI-compatible servers) and Anthropic messages. Base URLs follow each SDK's
convention: OpenAI's includes ``/v1``, Anthropic's does not.

HTTP outcomes become exceptions in exactly one place, :func:`raise_for_status` (which
:func:`raise_for_response` and the batch wires share), most specific first; the dispatcher
turns them into retries or result rows.

A request may carry an :class:`OutputSchema` (structured output, used by the llm router's
difficulty call). OpenAI takes it as ``response_format`` and answers with the JSON text as the
message content; Anthropic has no such field, so it becomes one tool the model is forced to call,
and the tool call's ``input`` object, serialised to JSON, is the answer text. Requests without
one build exactly the bodies they always did.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlencode

import httpx
import orjson

from batchroute.errors import (
    AuthError,
    DispatchError,
    RateLimited,
    TerminalDispatchError,
    TransientDispatchError,
)
from batchroute.stages.dispatch.transport import Reply, ReplyHeaders

ANTHROPIC_VERSION = "2023-06-01"
MAX_ERROR_CHARS = 500
RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    input_tokens: int  # the whole prompt, cached part included
    output_tokens: int
    cached_input_tokens: int = 0  # the part of the prompt served from the provider's cache
    cache_write_input_tokens: int = 0  # the part written to it (Anthropic reports it apart)
    reasoning_tokens: int = 0  # the part of output_tokens spent thinking (where reported)


@dataclass(frozen=True)
class OutputSchema:
    """Structured output: the answer must be a JSON object matching ``schema`` (a JSON
    schema written for OpenAI's strict mode: every property required, no others allowed).
    ``name`` names it on the wire (the response format's name, or Anthropic's tool name)."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    # The answer is one of these (a labels task): vLLM's choice form asks for them directly.
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """One row's call, independent of the wire format."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float | None
    output: OutputSchema | None = None
    # The start of the first user message every row shares (a template's literal text before
    # its first column): with the system prompt and the output schema, the cacheable prefix.
    prefix: str = ""


class Provider:
    """A wire format. Subclasses know their path, auth headers and body shapes."""

    path = ""
    default_auth = "bearer"

    def __init__(self, base_url: str, api_key: str, model: str,
                 structured: str = "", *, token_param: str = "max_tokens",
                 reasoning_effort: str = "", thinking_budget_tokens: int = 0,
                 auth: str = "", api_version: str = "", cache_prefix: bool = False,
                 service_tier: str = "") -> None:
        self.url = base_url.rstrip("/") + self.path
        if api_version:  # Azure OpenAI
            self.url += "?" + urlencode({"api-version": api_version})
        self._api_key = api_key
        self.auth = auth or self.default_auth
        self.model = model
        # What the endpoint needs (see ModelConfig): how structured output is asked, the
        # name of the output cap, a reasoning effort or thinking budget.
        self.structured = structured
        self.token_param = token_param
        self.reasoning_effort = reasoning_effort
        self.thinking_budget_tokens = thinking_budget_tokens
        # Mark the shared prefix for the provider's prompt cache (Anthropic's cache_control;
        # OpenAI caches a long enough prefix without being asked).
        self.cache_prefix = cache_prefix
        self.service_tier = service_tier  # OpenAI's "flex": batch prices, synchronously

    @property
    def takes_temperature(self) -> bool:
        """Reasoning models accept only the default temperature: it is not sent to them."""
        return self.token_param == "max_tokens" and not self.thinking_budget_tokens

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def body(self, req: Request) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, payload: Any, output: OutputSchema | None = None) -> Answer:
        """The answer in a 2xx body. Raises KeyError/TypeError/... on a malformed one."""
        raise NotImplementedError


class OpenAIChat(Provider):
    path = "/chat/completions"
    default_auth = "bearer"

    def headers(self) -> dict[str, str]:
        return _auth(self.auth, self._api_key)

    def body(self, req: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": req.messages,
                                self.token_param: req.max_tokens}
        if req.temperature is not None and self.takes_temperature:
            body["temperature"] = req.temperature
        if self.reasoning_effort:
            body["reasoning_effort"] = self.reasoning_effort
        if self.service_tier:
            body["service_tier"] = self.service_tier
        out = req.output
        if out is None:
            return body
        if self.structured == "vllm":  # vLLM 0.12 and later
            body["structured_outputs"] = ({"choice": list(out.choices)} if out.choices
                                          else {"json": out.schema})
        elif self.structured == "vllm-guided":  # earlier vLLM
            if out.choices:
                body["guided_choice"] = list(out.choices)
            else:
                body["guided_json"] = out.schema
        else:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": out.name, "strict": True, "schema": out.schema}}
        return body

    def parse(self, payload: Any, output: OutputSchema | None = None) -> Answer:
        # Structured output arrives as the JSON text in the content, like any answer.
        choice = payload["choices"][0]
        usage = payload["usage"]
        details = usage.get("prompt_tokens_details") or {}
        out_details = usage.get("completion_tokens_details") or {}
        tokens = {"input_tokens": _tokens(usage["prompt_tokens"]),
                  "output_tokens": _tokens(usage["completion_tokens"]),
                  "cached_input_tokens": _tokens(details.get("cached_tokens") or 0),
                  "reasoning_tokens": _tokens(out_details.get("reasoning_tokens") or 0)}
        refusal = choice["message"].get("refusal")
        if refusal:  # OpenAI says "stop" and puts the refusal beside the content
            return Answer(text=_str(refusal), finish_reason="refusal", **tokens)
        content = choice["message"].get("content") or ""
        if isinstance(content, list):  # some compatible servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return Answer(text=_str(content),
                      finish_reason=str(choice.get("finish_reason") or "stop"), **tokens)


class AnthropicMessages(Provider):
    path = "/v1/messages"
    _STOP: ClassVar[dict[str, str]] = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
             "tool_use": "tool_calls", "refusal": "refusal"}

    default_auth = "x-api-key"

    def headers(self) -> dict[str, str]:
        return {**_auth(self.auth, self._api_key), "anthropic-version": ANTHROPIC_VERSION}

    def body(self, req: Request) -> dict[str, Any]:
        system = "\n".join(m["content"] for m in req.messages if m["role"] == "system")
        messages: list[dict[str, Any]] = [m for m in req.messages if m["role"] != "system"]
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens,
                                "messages": messages}
        if system:
            body["system"] = system
        if self.thinking_budget_tokens:
            # The budget is part of max_tokens, which must stay above it.
            body["max_tokens"] = max(req.max_tokens, self.thinking_budget_tokens + 1)
            body["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_budget_tokens}
        if req.temperature is not None and self.takes_temperature:
            body["temperature"] = req.temperature
        if req.output is not None:
            tool: dict[str, Any] = {"name": req.output.name,
                                    "input_schema": req.output.schema}
            if req.output.description:
                tool["description"] = req.output.description
            body["tools"] = [tool]
            body["tool_choice"] = {"type": "tool", "name": req.output.name}
        if self.cache_prefix:
            _mark_cache(body, req.prefix)
        return body

    def parse(self, payload: Any, output: OutputSchema | None = None) -> Answer:
        parts = payload["content"]
        call = None if output is None else next(
            (p for p in parts if p.get("type") == "tool_use" and p.get("name") == output.name),
            None)
        if call is not None:
            if not isinstance(call["input"], dict):
                raise TypeError("tool_use input is not an object")
            text = json.dumps(call["input"], ensure_ascii=False, separators=(",", ":"))
        else:  # a plain answer, or a model that ignored the forced tool: its text, if any
            text = "".join(_str(part.get("text", "")) for part in parts
                           if part.get("type") == "text")
        usage = payload["usage"]
        stop = str(payload.get("stop_reason") or "end_turn")
        # Anthropic's input_tokens leaves out the prompt read from or written to its cache.
        cached = _tokens(usage.get("cache_read_input_tokens") or 0)
        written = _tokens(usage.get("cache_creation_input_tokens") or 0)
        return Answer(text=text, finish_reason=self._STOP.get(stop, stop),
                      input_tokens=_tokens(usage["input_tokens"]) + cached + written,
                      output_tokens=_tokens(usage["output_tokens"]),
                      cached_input_tokens=cached, cache_write_input_tokens=written)


_EPHEMERAL = {"type": "ephemeral"}


def _mark_cache(body: dict[str, Any], prefix: str) -> None:
    """One cache breakpoint at the end of what every row shares. Anthropic caches in the
    order tools, system, messages, up to and including the marked block, so marking the last
    shared block caches all of it: the template's literal start (split off the first user
    message as a block of its own), else the system prompt, else the output tool."""
    messages = body["messages"]
    first = messages[0] if messages else None
    if (prefix and first is not None and first["role"] == "user"
            and isinstance(first["content"], str) and first["content"].startswith(prefix)):
        rest = first["content"][len(prefix):]
        blocks: list[dict[str, Any]] = [{"type": "text", "text": prefix,
                                         "cache_control": _EPHEMERAL}]
        if rest:
            blocks.append({"type": "text", "text": rest})
        messages[0] = {"role": "user", "content": blocks}
    elif "system" in body:
        body["system"] = [{"type": "text", "text": body["system"],
                           "cache_control": _EPHEMERAL}]
    elif "tools" in body:
        body["tools"][-1] = {**body["tools"][-1], "cache_control": _EPHEMERAL}


def _auth(scheme: str, key: str) -> dict[str, str]:
    """The header that carries the key: ``Authorization: Bearer`` (OpenAI and compatible
    servers), ``api-key`` (Azure OpenAI) or ``x-api-key`` (Anthropic)."""
    if scheme == "api-key":
        return {"api-key": key}
    if scheme == "x-api-key":
        return {"x-api-key": key}
    return {"authorization": f"Bearer {key}"}


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a token count, got {value!r}")
    return value


PROVIDERS: dict[str, type[Provider]] = {"openai": OpenAIChat, "anthropic": AnthropicMessages}


def retry_after_s(headers: httpx.Headers | ReplyHeaders) -> float | None:
    """Seconds the provider asked us to wait, from retry-after-ms or retry-after (seconds);
    None when absent or not a finite number (an HTTP date, "inf"): backoff applies then."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


@dataclass(frozen=True)
class RateLimitState:
    """The provider's own view of this key's limits, from one reply's headers (None: not sent).

    ``limit_*`` is the per-minute limit the provider enforces; ``remaining_*`` is what is left
    in its bucket right now. The ``reset-*`` headers are not needed: a continuously refilling
    bucket's next free unit is one refill interval away, which the limit already gives, and a
    reset time would mean different things for sliding and fixed windows.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None

    @property
    def empty(self) -> bool:
        return (self.limit_requests is None and self.remaining_requests is None
                and self.limit_tokens is None and self.remaining_tokens is None)


# OpenAI (and most compatible servers and gateways) send x-ratelimit-{limit,remaining}-
# {requests,tokens}; Anthropic sends anthropic-ratelimit-{requests,tokens,input-tokens,
# output-tokens}-{limit,remaining}. Where several token buckets are reported the most
# restrictive one is kept.
_FIELDS: dict[bytes, tuple[str, str]] = {
    **{f"x-ratelimit-{kind}-{dim}".encode(): (kind, dim)
       for kind in ("limit", "remaining") for dim in ("requests", "tokens")},
    **{f"anthropic-ratelimit-{name}-{kind}".encode(): (kind, dim)
       for kind in ("limit", "remaining")
       for name, dim in (("requests", "requests"), ("tokens", "tokens"),
                         ("input-tokens", "tokens"), ("output-tokens", "tokens"))},
}


_RATE_HEADERS = re.compile(rb"\r\n((?:x|anthropic)-ratelimit-[a-z-]+):[ \t]*([^\r\n]*)")


def rate_limit_state(headers: httpx.Headers | ReplyHeaders) -> RateLimitState:
    """Parse the rate-limit headers of any reply; unparseable values count as absent.

    One pass over the raw headers: this runs on every reply, and looking up a dozen names in
    httpx's Headers costs more than the rest of reading the reply.
    """
    found: dict[tuple[str, str], int] = {}
    # Our own client's replies: one search of the head for these headers alone.
    pairs = (headers.lowered(_RATE_HEADERS) if isinstance(headers, ReplyHeaders)
             else headers.raw)
    for raw_name, raw_value in pairs:
        key = _FIELDS.get(raw_name.lower())
        if key is None:
            continue
        try:
            number = int(raw_value)
        except ValueError:
            continue
        if number >= 0 and number < found.get(key, number + 1):
            found[key] = number
    return RateLimitState(
        limit_requests=found.get(("limit", "requests")),
        remaining_requests=found.get(("remaining", "requests")),
        limit_tokens=found.get(("limit", "tokens")),
        remaining_tokens=found.get(("remaining", "tokens")))


def raise_for_response(resp: httpx.Response | Reply, provider: Provider,
                       output: OutputSchema | None = None) -> Answer:
    """The answer in a 2xx response (read as ``output`` asked, if given), or the exception
    that classifies the failure.

    Raises AuthError (401/403), RateLimited (429), TransientDispatchError (408, 409, 5xx,
    malformed bodies) and TerminalDispatchError (any other status).
    """
    status = resp.status_code
    if 200 <= status < 300:
        try:
            return provider.parse(resp.json(), output)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise TransientDispatchError(
                f"malformed response body from provider ({type(exc).__name__})",
                status=status) from None
    raise _failure(resp)


def raise_for_status(resp: httpx.Response | Reply, step: str = "") -> None:
    """Nothing for a 2xx response; otherwise the exception that classifies the failure, as
    :func:`raise_for_response` does, its message led by ``step`` (what was being done:
    "creating batch for file x.jsonl") when given. The body must have been read.

    Raises AuthError (401/403), RateLimited (429), TransientDispatchError (408, 409, 5xx) and
    TerminalDispatchError (any other status).
    """
    if not 200 <= resp.status_code < 300:
        raise _failure(resp, step)


def _failure(resp: httpx.Response | Reply, step: str = "") -> DispatchError:
    """The exception for a reply outside 2xx, most specific first."""
    status = resp.status_code
    message = f"{step}: " if step else ""
    message += f"HTTP {status}: {_error_message(resp)}"
    if status in (401, 403):
        return AuthError(message, status=status)
    if status == 429:
        return RateLimited(message, status=status, retry_after_s=retry_after_s(resp.headers))
    if status in RETRYABLE_STATUS or status >= 500:
        return TransientDispatchError(message, status=status,
                                      retry_after_s=retry_after_s(resp.headers))
    return TerminalDispatchError(message, status=status)


def _error_message(resp: httpx.Response | Reply) -> str:
    try:
        payload = resp.json()
        err = payload.get("error", payload)
        text = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        text = resp.text
    return str(text or resp.reason_phrase or "no message")[:MAX_ERROR_CHARS]


def dumps(body: dict[str, Any]) -> bytes:
    """A request body as compact UTF-8 JSON (orjson: a few times faster than json.dumps,
    and the same bytes as ``json.dumps(ensure_ascii=False, separators=(",", ":"))``)."""
    return orjson.dumps(body)
