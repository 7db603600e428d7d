"""Prompt caching: the shared prefix marked for Anthropic's cache, the first call of a cached
prefix sent alone, cache reads and writes read from usage and billed at their own prices, the
mock's simulation of both providers' caches, and the plan's forecast of the cached share."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pyarrow as pa
import pytest

from batchroute import config, schemas, task
from batchroute.devtools.mock_provider import MockProviderConfig, _MockServer
from batchroute.errors import ConfigError
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from batchroute.stages.dispatch.providers import AnthropicMessages, OpenAIChat, Request
from tests.helpers import CHEAP, MID, job_doc
from tests.unit.devtools.test_mock_provider import post

EPHEMERAL = {"type": "ephemeral"}
LONG_SYSTEM = "You label support tickets by the rules below. " + "Rule: be exact. " * 300


def _job(**task_table: Any) -> config.JobConfig:
    doc = job_doc("http://provider.test/v1")
    doc["task"] = task_table
    doc["models"][MID].update(cached_input_usd_per_mtok=0.3,
                              cache_write_input_usd_per_mtok=3.75)
    return config.parse(doc)


def _request(prefix: str = "", output: bool = False) -> Request:
    from batchroute.stages.dispatch.providers import OutputSchema

    schema = OutputSchema("label", {"type": "object"}) if output else None
    return Request(messages=[{"role": "system", "content": "Label it."},
                             {"role": "user", "content": "Subject: hi\n\nbody"}],
                   max_tokens=16, temperature=None, output=schema, prefix=prefix)


# --- what is marked ---------------------------------------------------------------------------


def test_the_template_prefix_is_split_off_and_marked_after_the_system_prompt() -> None:
    body = AnthropicMessages("http://x", "k", "claude", cache_prefix=True).body(
        _request(prefix="Subject: "))
    assert body["system"] == "Label it."  # before the breakpoint: cached with it
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Subject: ", "cache_control": EPHEMERAL},
        {"type": "text", "text": "hi\n\nbody"}]}]


def test_without_a_template_prefix_the_system_prompt_is_marked_else_the_tool() -> None:
    provider = AnthropicMessages("http://x", "k", "claude", cache_prefix=True)
    body = provider.body(_request())
    assert body["system"] == [{"type": "text", "text": "Label it.", "cache_control": EPHEMERAL}]
    assert body["messages"] == [{"role": "user", "content": "Subject: hi\n\nbody"}]
    # A prefix the row does not start with is not split off (the system prompt is marked).
    assert provider.body(_request(prefix="Other: "))["system"][0]["cache_control"] == EPHEMERAL
    bare = Request(messages=[{"role": "user", "content": "x"}], max_tokens=16,
                   temperature=None, output=_request(output=True).output)
    assert provider.body(bare)["tools"][0]["cache_control"] == EPHEMERAL


def test_nothing_is_marked_when_caching_is_off_or_on_openai() -> None:
    off = AnthropicMessages("http://x", "k", "claude", cache_prefix=False).body(
        _request(prefix="Subject: "))
    assert "cache_control" not in json.dumps(off)
    openai = OpenAIChat("http://x/v1", "k", "gpt", cache_prefix=True).body(
        _request(prefix="Subject: "))
    assert "cache_control" not in json.dumps(openai)
    assert openai["messages"][0] == {"role": "system", "content": "Label it."}  # stable first


def test_caching_is_on_by_default_for_anthropic_when_a_prefix_is_shared() -> None:
    assert _job(system="Label it.").task.marks_cache("anthropic")
    assert _job(template="Subject: {{ s }}").task.marks_cache("anthropic")
    assert not _job(template="{{ s }}").task.marks_cache("anthropic")  # nothing shared
    assert not _job(system="Label it.", cache_prefix=False).task.marks_cache("anthropic")
    assert not _job(system="Label it.").task.marks_cache("openai")
    with pytest.raises(ConfigError, match=r"task\.cache_prefix: must be true or false"):
        _job(system="x", cache_prefix="yes")


def test_the_template_prefix_is_its_literal_start_whitespace_control_applied() -> None:
    assert task.parse({"template": "Subject: {{ s }}\n{{ b }}"}).template_prefix == "Subject: "
    assert task.parse({"template": "Ticket   {{- s }}"}).template_prefix == "Ticket"
    assert task.parse({"template": "{% if s %}a{% endif %}{{ s }}"}).template_prefix == ""
    assert task.parse({"template": "{{ s }} is it"}).template_prefix == ""


# --- billed at the cache prices ---------------------------------------------------------------


def _routed(n: int) -> pa.Table:
    cols: dict[str, Any] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(n)], row=list(range(n)),
                prompt=[f"Subject: ticket {i}" for i in range(n)],
                est_input_tokens=[1200] * n, est_output_tokens=[16] * n,
                route_cost_micro_usd=[0] * n)
    return pa.table(cols, schema=schemas.ROUTED)


def _dispatch(job: config.JobConfig, model: str, n: int,
              handle: Any) -> list[dict[str, Any]]:
    async def go() -> pa.Table:
        d = ModelDispatcher(job.models[model], job.dispatch, run_id="r", api_key="k",
                            transport=httpx.MockTransport(handle), task=job.task)
        try:
            return await d.dispatch(_routed(n))
        finally:
            await d.aclose()

    rows: list[dict[str, Any]] = asyncio.run(go()).to_pylist()
    return rows


def test_anthropic_cache_writes_and_reads_are_recorded_apart_and_billed_each_at_its_price(
        ) -> None:
    job = _job(system=LONG_SYSTEM, template="Subject: {{ s }}")
    seen: list[dict[str, Any]] = []

    async def handle(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        first = len(seen) == 1
        return httpx.Response(200, json={
            "content": [{"type": "text", "text": "bug"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 7, "output_tokens": 2,
                      "cache_creation_input_tokens": 1100 if first else 0,
                      "cache_read_input_tokens": 0 if first else 1100}})

    rows = _dispatch(job, MID, 3, handle)
    m = job.models[MID]
    assert [(r["input_tokens"], r["cached_input_tokens"], r["cache_write_input_tokens"])
            for r in rows] == [(1107, 0, 1100), (1107, 1100, 0), (1107, 1100, 0)]
    # 7 uncached at $3, 1,100 written at $3.75 or read at $0.30, 2 out at $15 (per million)
    assert [r["cost_micro_usd"] for r in rows] == [
        round(7 * 3 + 1100 * 3.75 + 2 * 15), round(7 * 3 + 1100 * 0.3 + 2 * 15),
        round(7 * 3 + 1100 * 0.3 + 2 * 15)]
    assert rows[1]["cost_micro_usd"] == m.cost_micro_usd(1107, 2, 1100)
    assert seen[0]["messages"][0]["content"][0] == {"type": "text", "text": "Subject: ",
                                                    "cache_control": EPHEMERAL}


def _recording(events: list[tuple[str, str]]) -> Any:
    async def handle(req: httpx.Request) -> httpx.Response:
        user = json.loads(req.content)["messages"][0]["content"]
        events.append(("start", user))
        for _ in range(20):  # let every other call that can start, start
            await asyncio.sleep(0)
        events.append(("end", user))
        return httpx.Response(200, json={
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 5, "output_tokens": 1}})

    return handle


def test_the_first_call_of_a_cached_prefix_goes_alone_then_the_rest_together() -> None:
    events: list[tuple[str, str]] = []
    rows = _dispatch(_job(system=LONG_SYSTEM), MID, 6, _recording(events))
    assert [r["status"] for r in rows] == ["ok"] * 6
    # The first call is answered before any other starts; the others then overlap.
    assert events[:2] == [("start", "Subject: ticket 0"), ("end", "Subject: ticket 0")]
    assert [kind for kind, _ in events[2:4]] == ["start", "start"]


def test_a_prefix_below_the_cache_minimum_is_not_held_back() -> None:
    events: list[tuple[str, str]] = []
    _dispatch(_job(system="Label it."), MID, 4, _recording(events))  # too short to cache
    assert [kind for kind, _ in events[:2]] == ["start", "start"]


# --- the mock's caches --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _anthropic(system: Any, user: Any, model: str = "claude") -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "system": system,
            "messages": [{"role": "user", "content": user}]}


def _marked(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text, "cache_control": EPHEMERAL}]


def test_the_mock_writes_an_anthropic_prefix_once_then_reads_it_until_it_expires() -> None:
    clock = Clock()
    srv = _MockServer(MockProviderConfig(cache_ttl_s=300), clock)
    prefix_tokens = -(-len(LONG_SYSTEM) // 4)
    usage = [post(srv, "anthropic", _anthropic(_marked(LONG_SYSTEM), f"ticket {i}"))["usage"]
             for i in range(3)]
    assert [(u["cache_creation_input_tokens"], u["cache_read_input_tokens"]) for u in usage] == [
        (prefix_tokens, 0), (0, prefix_tokens), (0, prefix_tokens)]
    assert all(u["input_tokens"] == 2 for u in usage)  # "ticket i": the uncached rest
    clock.now += 299  # each read refreshes the entry's lifetime
    assert post(srv, "anthropic", _anthropic(_marked(LONG_SYSTEM), "x"))["usage"][
        "cache_read_input_tokens"] == prefix_tokens
    clock.now += 301
    assert post(srv, "anthropic", _anthropic(_marked(LONG_SYSTEM), "x"))["usage"][
        "cache_creation_input_tokens"] == prefix_tokens
    # Another model has a cache of its own.
    other = post(srv, "anthropic", _anthropic(_marked(LONG_SYSTEM), "x", model="claude-2"))
    assert other["usage"]["cache_creation_input_tokens"] == prefix_tokens
    assert srv.counters["cache_write_tokens"] == 3 * prefix_tokens


def test_a_request_that_arrived_before_the_writing_reply_was_sent_writes_again() -> None:
    from batchroute.devtools.mock_provider import _parse_call

    clock = Clock()
    srv = _MockServer(MockProviderConfig(), clock)
    calls = [_parse_call("anthropic", _anthropic(_marked(LONG_SYSTEM), f"t{i}"))
             for i in range(3)]
    arrived = clock.now
    clock.now += 0.5  # both in flight; the first reply is sent now
    usage = [json.loads(srv._reply(c, arrived)[0])["usage"] for c in calls[:2]]
    assert [u["cache_creation_input_tokens"] > 0 for u in usage] == [True, True]
    later = json.loads(srv._reply(calls[2], clock.now)[0])["usage"]
    assert later["cache_read_input_tokens"] > 0


def test_the_mock_caches_nothing_unmarked_or_short_and_answers_the_same_either_way() -> None:
    srv = _MockServer(MockProviderConfig(), Clock())
    for _ in range(2):
        plain = post(srv, "anthropic", _anthropic(LONG_SYSTEM, "ticket 1"))
        assert (plain["usage"]["cache_creation_input_tokens"],
                plain["usage"]["cache_read_input_tokens"]) == (0, 0)
        short = post(srv, "anthropic", _anthropic(_marked("Label it."), "ticket 1"))
        assert short["usage"]["cache_creation_input_tokens"] == 0
    marked = post(srv, "anthropic", _anthropic(_marked(LONG_SYSTEM), [
        {"type": "text", "text": "tick"}, {"type": "text", "text": "et 1"}]))
    assert marked["content"] == plain["content"]  # the same text, however it is split
    assert (marked["usage"]["input_tokens"] + marked["usage"]["cache_creation_input_tokens"]
            == plain["usage"]["input_tokens"])


def test_the_mock_reports_openai_cached_tokens_for_long_prefixes_in_128_token_steps() -> None:
    srv = _MockServer(MockProviderConfig(), Clock())

    def body(user: str) -> dict[str, Any]:
        return {"model": "gpt", "max_tokens": 16,
                "messages": [{"role": "system", "content": LONG_SYSTEM},
                             {"role": "user", "content": user}]}

    first = post(srv, "openai", body("ticket 1"))["usage"]
    second = post(srv, "openai", body("ticket 2"))["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 1024 and cached % 128 == 0 and cached <= second["prompt_tokens"]
    assert second["prompt_tokens"] - cached < 128 + 8  # all but the last step is cached
    short = {"model": "gpt", "messages": [{"role": "user", "content": "short"}]}
    post(srv, "openai", short)
    assert post(srv, "openai", short)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- the plan ----------------------------------------------------------------------------------


def test_the_plan_forecasts_the_cached_share_and_prices_it() -> None:
    from batchroute.stages.plan import cache_forecast

    job = _job(system=LONG_SYSTEM, template="Subject: {{ s }}")
    prefix = job.task.prefix_tokens()
    assert prefix > 1024
    mid = job.models[MID]
    assert cache_forecast(job, mid, 100) == (99 * prefix, prefix)
    assert cache_forecast(job, mid, 0) == (0, 0)
    cached, written = cache_forecast(job, job.models[CHEAP], 100)  # OpenAI: unasked, steps
    assert written == 0 and cached % 99 == 0 and 1024 <= cached // 99 <= prefix
    assert (cached // 99 - 1024) % 128 == 0
    short = _job(system="Label it.")
    assert cache_forecast(short, short.models[MID], 100) == (0, 0)
    off = _job(system=LONG_SYSTEM, cache_prefix=False)
    assert cache_forecast(off, off.models[MID], 100) == (0, 0)
