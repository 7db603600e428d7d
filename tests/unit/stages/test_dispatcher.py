"""Dispatcher through its seams: a handler-function transport, a recording sleep, a fixed rng.

No network and no real waiting: every outcome a provider can produce ends as exactly one row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pyarrow as pa
import pytest

from batchroute import config, schemas
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from batchroute.stages.dispatch.providers import OutputSchema
from tests.helpers import CHEAP, MID, job_doc, key_echoes, key_fragments

KEY = "sk-unit-test-secret-4242"
Handler = Callable[[httpx.Request], httpx.Response]


def _routed(n: int, *, max_tokens: int = 16) -> pa.Table:
    cols: dict[str, Any] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(n)], row=list(range(n)),
                prompt=[f"question {i}" for i in range(n)], route_reason=["classifier"] * n,
                est_input_tokens=[7] * n, est_output_tokens=[max_tokens] * n,
                router_version=["v1"] * n, tags=[["team:a"]] * n, route_cost_micro_usd=[0] * n)
    return pa.table(cols, schema=schemas.ROUTED)


def _openai_ok(req: httpx.Request) -> httpx.Response:
    body = json.loads(req.content)
    return httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": "A: " + body["messages"][0]
                                 ["content"]}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5}})


class Harness:
    def __init__(self, handler: Handler, model: str = CHEAP, *, key: str | None = KEY,
                 concurrency: int = 32, **dispatch: Any) -> None:
        doc = job_doc("http://provider.test/v1")
        doc["dispatch"].update(dispatch)
        doc["models"][model]["concurrency"] = concurrency
        job = config.parse(doc)
        self.model = job.models[model]
        self.calls: list[httpx.Request] = []
        self.sleeps: list[float] = []
        self.now = 1000.0

        def record(req: httpx.Request) -> httpx.Response:
            self.calls.append(req)
            return handler(req)

        async def sleep(s: float) -> None:  # a fake clock: sleeping only moves time on
            self.sleeps.append(s)
            self.now += s

        self.make = lambda: ModelDispatcher(
            self.model, job.dispatch, run_id="run-1", api_key=key,
            transport=httpx.MockTransport(record), sleep=sleep, clock=lambda: self.now,
            rng=random.Random(7))

    def run(self, routed: pa.Table) -> tuple[pa.Table, ModelDispatcher]:
        async def go() -> tuple[pa.Table, ModelDispatcher]:
            d = self.make()
            try:
                return await d.dispatch(routed), d
            finally:
                await d.aclose()
        return asyncio.run(go())


def _rows(t: pa.Table) -> list[dict[str, Any]]:
    assert t.schema == schemas.RESULTS
    return t.to_pylist()


def test_openai_success_rows_carry_tokens_cost_and_evidence() -> None:
    h = Harness(_openai_ok)
    before = datetime.now(UTC)
    out, d = h.run(_routed(3))
    after = datetime.now(UTC)
    rows = _rows(out)
    # When each row was first sent and reached its status, to the microsecond, in UTC.
    assert all(before <= r["started_at"] <= r["finished_at"] <= after for r in rows)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert rows[1]["response"] == "A: question 1"
    assert rows[0]["input_tokens"] == 10 and rows[0]["output_tokens"] == 5
    # 8.75 micro-dollars, recorded in whole micro-dollars (half to even)
    assert (rows[0]["cost_micro_usd"], rows[0]["cost_usd"]) == (9, pytest.approx(9e-6))
    assert rows[0]["cached_input_tokens"] == 0
    assert rows[0]["attempts"] == 1 and rows[0]["tags"] == ["team:a"]
    assert rows[0]["model"] == CHEAP and rows[0]["run_id"] == "run-1"
    req = h.calls[0]
    assert req.url == "http://provider.test/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(req.content) == {"model": CHEAP, "max_tokens": 16,
                                       "messages": [{"role": "user", "content": "question 0"}]}
    assert d.stats.ok == 3 and d.stats.cost_usd == pytest.approx(sum(r["cost_usd"] for r in rows))


def test_anthropic_wire_format() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.headers["x-api-key"] == KEY and req.headers["anthropic-version"]
        body = json.loads(req.content)
        assert body["max_tokens"] == 16 and body["model"] == MID
        return httpx.Response(200, json={
            "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}],
            "stop_reason": "max_tokens", "usage": {"input_tokens": 3, "output_tokens": 16}})

    h = Harness(handler, MID)
    rows = _rows(h.run(_routed(1))[0])
    assert h.calls[0].url == "http://provider.test/v1/messages"
    assert rows[0]["response"] == "part one, two" and rows[0]["finish_reason"] == "length"
    assert rows[0]["cost_micro_usd"] == 3 * 3 + 16 * 15


def test_429_honours_retry_after_then_succeeds() -> None:
    replies = iter([httpx.Response(429, headers={"retry-after-ms": "1500"},
                                   json={"error": {"message": "slow down"}})])
    h = Harness(lambda r: next(replies, None) or _openai_ok(r))
    out, d = h.run(_routed(1))
    row = _rows(out)[0]
    assert row["status"] == "ok" and row["attempts"] == 2
    assert h.sleeps == [1.5]
    assert d.stats.rate_limited == 1 and d.stats.retries == 1


def test_retry_after_pauses_every_request_to_that_model() -> None:
    first = []

    def handler(req: httpx.Request) -> httpx.Response:
        if not first:
            first.append(h.now)
            return httpx.Response(429, headers={"retry-after": "2"})
        assert h.now >= first[0] + 2, "a request went out during the provider's pause"
        return _openai_ok(req)

    h = Harness(handler)
    rows = _rows(h.run(_routed(4))[0])
    assert {r["status"] for r in rows} == {"ok"}


@pytest.mark.parametrize("status", [500, 503, 408, 409])
def test_transient_statuses_retry_with_capped_jitter_then_fail(status: int) -> None:
    h = Harness(lambda r: httpx.Response(status, json={"error": {"message": "boom"}}),
                max_attempts=4)
    row = _rows(h.run(_routed(1))[0])[0]
    assert row["status"] == "failed" and row["attempts"] == 4
    assert row["error_type"] == "transient"
    assert row["error_message"] == f"HTTP {status}: boom"
    assert len(h.sleeps) == 3
    caps = [min(0.05, 0.01 * 2 ** i) for i in range(3)]
    assert all(0 <= s <= c for s, c in zip(h.sleeps, caps, strict=True))
    assert row["cost_usd"] == 0 and row["input_tokens"] == 0


def test_other_4xx_is_not_retried_and_keeps_provider_message() -> None:
    h = Harness(lambda r: httpx.Response(400, json={"error": {"message": "bad max_tokens"}}))
    row = _rows(h.run(_routed(1))[0])[0]
    assert (row["status"], row["attempts"], row["error_type"]) == ("failed", 1, "terminal")
    assert row["error_message"] == "HTTP 400: bad max_tokens"
    assert h.sleeps == []


def test_401_stops_calling_that_model_and_never_leaks_the_key() -> None:
    h = Harness(lambda r: httpx.Response(
        401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}}), concurrency=3)
    rows = _rows(h.run(_routed(40))[0])
    assert {r["status"] for r in rows} == {"failed"}
    assert {r["error_type"] for r in rows} == {"auth"}
    # Only calls already admitted when the first 401 arrived reach the provider.
    assert 1 <= len(h.calls) <= 3
    assert sum(r["attempts"] for r in rows) == len(h.calls)
    assert sum(r["started_at"] is None for r in rows) == 40 - len(h.calls)
    assert all(KEY not in (r["error_message"] or "") for r in rows)
    assert "***" in rows[0]["error_message"]


def test_missing_key_fails_rows_without_calling() -> None:
    h = Harness(_openai_ok, key=None)
    rows = _rows(h.run(_routed(2))[0])
    assert [r["error_type"] for r in rows] == ["auth", "auth"]
    assert "BATCHROUTE_TEST_KEY is not set" in rows[0]["error_message"]
    assert h.calls == []


@pytest.mark.parametrize(("fault", "message"), [
    (httpx.ReadTimeout("slow"), "timeout: ReadTimeout"),
    (httpx.RemoteProtocolError("eof"), "connection dropped mid-response (RemoteProtocolError)"),
    (httpx.ConnectError("refused"), "connection error: ConnectError"),
    (None, "malformed response body from provider (JSONDecodeError)"),
])
def test_transport_faults_and_malformed_bodies_are_retried(fault: Exception | None,
                                                           message: str) -> None:
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) < 3:
            if fault is None:
                return httpx.Response(200, content=b"{not json")
            raise fault
        return _openai_ok(req)

    h = Harness(handler)
    row = _rows(h.run(_routed(1))[0])[0]
    assert row["status"] == "ok" and row["attempts"] == 3

    h = Harness(lambda r: (_ for _ in ()).throw(fault) if fault else
                httpx.Response(200, content=b"{not json"), max_attempts=2)
    row = _rows(h.run(_routed(1))[0])[0]
    assert (row["status"], row["error_message"]) == ("failed", message)


def test_messages_rows_and_per_row_options() -> None:
    h = Harness(_openai_ok)
    routed = _routed(1).to_pylist()
    routed[0].update(prompt=None, temperature=0.2,
                     messages=[{"role": "system", "content": "terse"},
                               {"role": "user", "content": "hi"}])
    h.run(pa.Table.from_pylist(routed, schema=schemas.ROUTED))
    body = json.loads(h.calls[0].content)
    assert body["messages"][0] == {"role": "system", "content": "terse"}
    assert body["temperature"] == pytest.approx(0.2)


@pytest.mark.parametrize(("reply", "error_type", "message"), [
    (httpx.Response(400, json={"error": {"message": 123}}), "terminal", "HTTP 400: 123"),
    (httpx.Response(200, json={"choices": [{"message": {"content": 5}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
     "transient", "malformed response body from provider (TypeError)"),
    (httpx.Response(200, json={"choices": [{"message": {"content": "x"}}],
                               "usage": {"prompt_tokens": -1, "completion_tokens": 1}}),
     "transient", "malformed response body from provider (TypeError)"),
])
def test_odd_replies_end_as_rows(reply: httpx.Response, error_type: str, message: str) -> None:
    h = Harness(lambda r: reply, max_attempts=2)
    row = _rows(h.run(_routed(1))[0])[0]
    assert (row["status"], row["error_type"], row["error_message"]) == (
        "failed", error_type, message)


def test_content_parts_from_compatible_servers() -> None:
    h = Harness(lambda r: httpx.Response(200, json={
        "choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2}}))
    assert _rows(h.run(_routed(1))[0])[0]["response"] == "ab"


def test_an_unforeseen_exception_is_recorded_not_raised() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in a transport")

    row = _rows(Harness(handler).run(_routed(1))[0])[0]
    assert (row["status"], row["error_type"]) == ("failed", "internal")
    assert row["error_message"] == "RuntimeError: a bug in a transport"


@pytest.mark.parametrize(("header", "expected"), [("inf", None), ("86400", 120.0),
                                                  ("nan", None), ("3", 3.0)])
def test_retry_after_is_capped_and_sane(header: str, expected: float | None) -> None:
    replies = iter([httpx.Response(429, headers={"retry-after": header})])
    h = Harness(lambda r: next(replies, None) or _openai_ok(r))
    out, d = h.run(_routed(1))
    assert _rows(out)[0]["status"] == "ok"
    if expected is None:  # not a usable number: jittered backoff instead
        assert len(h.sleeps) == 1 and 0 <= h.sleeps[0] <= 0.01
        assert d.stats.paused_s == 0
    else:
        assert h.sleeps == [expected] and d.stats.paused_s == expected


def test_short_keys_are_not_scrubbed_out_of_prose() -> None:
    h = Harness(lambda r: httpx.Response(400, json={"error": {"message": "bad key"}}), key="k")
    assert _rows(h.run(_routed(1))[0])[0]["error_message"] == "HTTP 400: bad key"


def _echo(status: int, form: str) -> Handler:
    """A provider that quotes the key back, altered: as its error message, or (form "json")
    as a whole JSON body in no error shape, which is kept as it came."""
    text = key_echoes(KEY)[form]

    def handler(req: httpx.Request) -> httpx.Response:
        if form == "json":
            return httpx.Response(status, content=f"[{text}]".encode(),
                                  headers={"content-type": "application/json"})
        return httpx.Response(status, json={"error": {"message": text}})
    return handler


@pytest.mark.parametrize("form", ["verbatim", "upper", "middle", "json"])
@pytest.mark.parametrize("status", [401, 400, 503])
def test_no_form_of_an_echoed_key_reaches_a_result_row(status: int, form: str) -> None:
    h = Harness(_echo(status, form), max_attempts=2)
    row = _rows(h.run(_routed(1))[0])[0]
    assert row["status"] == "failed" and row["error_message"].startswith(f"HTTP {status}: ")
    assert key_fragments(row["error_message"], KEY) == [] and "***" in row["error_message"]


def test_journalled_rows_carry_no_echoed_key() -> None:
    job = config.parse(job_doc("http://provider.test/v1"))
    journalled: list[pa.Table] = []

    def journal(rows: pa.Table | None, in_flight: dict[str, int], unrecovered: int) -> None:
        if rows is not None:
            journalled.append(rows)

    async def go() -> None:
        d = ModelDispatcher(job.models[CHEAP], job.dispatch, run_id="run-1", api_key=KEY,
                            transport=httpx.MockTransport(_echo(401, "middle")),
                            sleep=lambda s: asyncio.sleep(0), journal=journal)
        try:
            await d.dispatch(_routed(3))
            d.flush_journal()
        finally:
            await d.aclose()

    asyncio.run(go())
    messages = pa.concat_tables(journalled).column("error_message").to_pylist()
    assert len(messages) == 3 and all("***" in m and key_fragments(m, KEY) == []
                                      for m in messages)


def _cheap_then_mid(cheap: Handler, *, escalate_on: list[str], fail_escalation: bool = False,
                    escalation_error: str = "actor died"
                    ) -> tuple[list[dict[str, Any]], list[httpx.Request], ModelDispatcher]:
    """Dispatch to CHEAP with escalation wired to a MID dispatcher that always answers."""
    doc = job_doc("http://provider.test/v1")
    doc["dispatch"].update(escalate_on=escalate_on, max_attempts=2)
    job = config.parse(doc)
    mid_calls: list[httpx.Request] = []

    def mid(req: httpx.Request) -> httpx.Response:
        mid_calls.append(req)
        return httpx.Response(200, json={
            "content": [{"type": "text", "text": "mid answer"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "output_tokens": 8}})

    async def no_sleep(s: float) -> None:
        return None

    async def go() -> tuple[pa.Table, ModelDispatcher]:
        upper = ModelDispatcher(job.models[MID], job.dispatch, run_id="run-1", api_key=KEY,
                                transport=httpx.MockTransport(mid), sleep=no_sleep)

        async def escalate(model: str, table: pa.Table) -> pa.Table:
            assert model == MID
            if fail_escalation:
                raise RuntimeError(escalation_error)
            return await upper.dispatch(table)

        low = ModelDispatcher(job.models[CHEAP], job.dispatch, run_id="run-1", api_key=KEY,
                              transport=httpx.MockTransport(cheap), sleep=no_sleep,
                              escalate=escalate)
        try:
            return await low.dispatch(_routed(5)), low
        finally:
            await low.aclose()
            await upper.aclose()

    out, low = asyncio.run(go())
    return _rows(out), mid_calls, low


def _cheap_outcomes(req: httpx.Request) -> httpx.Response:
    """question 0: cut at max_tokens; 1: refused; 2: server error; 3: bad request; 4: fine."""
    n = json.loads(req.content)["messages"][0]["content"].split()[-1]
    usage = {"prompt_tokens": 10, "completion_tokens": 16}
    if n == "0":
        return httpx.Response(200, json={"usage": usage, "choices": [
            {"message": {"content": "truncat"}, "finish_reason": "length"}]})
    if n == "1":
        return httpx.Response(200, json={"usage": usage, "choices": [
            {"message": {"content": None, "refusal": "I can't help with that."},
             "finish_reason": "stop"}]})
    if n == "2":
        return httpx.Response(500, json={"error": {"message": "boom"}})
    if n == "3":
        return httpx.Response(400, json={"error": {"message": "bad request"}})
    return _openai_ok(req)


def test_truncated_refused_and_failed_rows_escalate_once_with_both_costs() -> None:
    rows, mid_calls, low = _cheap_then_mid(
        _cheap_outcomes, escalate_on=["length", "refusal", "failed"])
    by_id = {r["request_id"]: r for r in rows}
    assert sorted(by_id) == [f"r{i}" for i in range(5)] and len(rows) == 5
    assert len(mid_calls) == 4
    cheap, mid = config.parse(job_doc()).models[CHEAP], config.parse(job_doc()).models[MID]
    expected = {"r0": ("length", 16, 1), "r1": ("refusal", 16, 1),
                "r2": ("failed:transient", 0, 2), "r3": ("failed:terminal", 0, 1)}
    for rid, (reason, out_tok, attempts) in expected.items():
        r = by_id[rid]
        assert (r["status"], r["model"], r["escalated_from"]) == ("ok", MID, CHEAP)
        assert r["response"] == "mid answer" and r["attempts"] == 1
        first_cost = cheap.cost_micro_usd(10, out_tok) if out_tok else 0
        assert r["escalations"] == [{"model": CHEAP, "reason": reason,
                                     "input_tokens": 10 if out_tok else 0,
                                     "cached_input_tokens": 0, "cache_write_input_tokens": 0,
                                     "output_tokens": out_tok,
                                     "cost_micro_usd": first_cost,
                                     "attempts": attempts, "invalid_answers": 0,
                                     "reasoning_tokens": 0, "tier": "sync"}]
        assert r["cost_micro_usd"] == first_cost + mid.cost_micro_usd(20, 8)
    fine = by_id["r4"]
    assert (fine["model"], fine["escalated_from"], fine["escalations"]) == (CHEAP, None, None)
    assert low.stats.escalated == 4


def test_escalation_only_for_the_outcomes_asked_and_never_for_a_refused_key() -> None:
    rows, mid_calls, _ = _cheap_then_mid(_cheap_outcomes, escalate_on=["length"])
    assert len(mid_calls) == 1
    assert {r["request_id"]: r["finish_reason"] for r in rows}["r1"] == "refusal"
    assert [r["request_id"] for r in rows if r["escalated_from"]] == ["r0"]

    rows, mid_calls, _ = _cheap_then_mid(
        lambda r: httpx.Response(401, json={"error": {"message": "expired"}}),
        escalate_on=["failed"])
    assert mid_calls == [] and {(r["model"], r["error_type"]) for r in rows} == {
        (CHEAP, "auth")}


def test_a_failed_escalation_keeps_the_cheap_answer() -> None:
    rows, _, low = _cheap_then_mid(_cheap_outcomes, escalate_on=["length"],
                                   fail_escalation=True)
    assert len(rows) == 5 and {r["model"] for r in rows} == {CHEAP}
    assert {r["request_id"]: r["finish_reason"] for r in rows}["r0"] == "length"
    assert low.stats.escalated == 0


def test_a_failed_escalation_is_logged_without_the_key(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    echoes = key_echoes(KEY)
    with caplog.at_level(logging.ERROR, "batchroute.stages.dispatch.dispatcher"):
        _cheap_then_mid(_cheap_outcomes, escalate_on=["length"], fail_escalation=True,
                        escalation_error=f"{echoes['upper']} / {echoes['middle']}")
    [record] = [r for r in caplog.records if "escalating" in r.getMessage()]
    assert "RuntimeError: INVALID KEY ***" in record.getMessage()
    assert key_fragments(record.getMessage(), KEY) == []


def test_cached_prompt_tokens_are_read_from_both_wire_formats() -> None:
    def openai(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 5,
                      "prompt_tokens_details": {"cached_tokens": 768}}})

    row = _rows(Harness(openai).run(_routed(1))[0])[0]
    assert (row["input_tokens"], row["cached_input_tokens"]) == (1000, 768)

    def anthropic(req: httpx.Request) -> httpx.Response:
        # Anthropic counts cache reads and writes outside input_tokens.
        return httpx.Response(200, json={
            "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 30, "cache_read_input_tokens": 900,
                      "cache_creation_input_tokens": 70, "output_tokens": 5}})

    row = _rows(Harness(anthropic, MID).run(_routed(1))[0])[0]
    assert (row["input_tokens"], row["cached_input_tokens"]) == (1000, 900)


SCHEMA = OutputSchema("route_decision", {
    "type": "object", "properties": {"difficulty": {"type": "string", "enum": ["easy", "hard"]}},
    "required": ["difficulty"], "additionalProperties": False})


def _ask(handler: Handler, model: str = CHEAP, **dispatch: Any
         ) -> tuple[list[dict[str, Any]], Harness, ModelDispatcher]:
    h = Harness(handler, model, **dispatch)

    async def go() -> tuple[pa.Table, ModelDispatcher]:
        d = h.make()
        try:
            return await d.ask(_routed(2), SCHEMA), d
        finally:
            await d.aclose()

    out, d = asyncio.run(go())
    return _rows(out), h, d


def test_ask_sends_openai_response_format_and_reads_the_json_content() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "choices": [{"message": {"content": '{"difficulty":"hard"}'},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 6}})

    rows, h, d = _ask(handler)
    body = json.loads(h.calls[0].content)
    assert body == {"model": CHEAP, "max_tokens": 16,
                    "messages": [{"role": "user", "content": "question 0"}],
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "route_decision", "strict": True, "schema": SCHEMA.schema}}}
    assert [r["response"] for r in rows] == ['{"difficulty":"hard"}'] * 2
    assert rows[0]["cost_micro_usd"] == config.parse(job_doc()).models[CHEAP].cost_micro_usd(40, 6)
    # counted apart from the answered rows that progress compares with the plan
    assert (d.stats.asked, d.stats.asked_failed, d.stats.done, d.stats.ok) == (2, 0, 0, 0)
    assert d.stats.asked_cost_usd == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert d.stats.cost_usd == 0.0


def test_ask_forces_the_anthropic_tool_and_serialises_its_input() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "route_decision",
                         "input": {"difficulty": "easy"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 50, "output_tokens": 9}})

    rows, h, _ = _ask(handler, MID)
    body = json.loads(h.calls[0].content)
    assert body["tools"] == [{"name": "route_decision", "input_schema": SCHEMA.schema}]
    assert body["tool_choice"] == {"type": "tool", "name": "route_decision"}
    assert "response_format" not in body
    assert rows[0]["response"] == '{"difficulty":"easy"}'
    assert rows[0]["finish_reason"] == "tool_calls" and rows[0]["input_tokens"] == 50


def test_ask_with_an_ignored_tool_keeps_the_text() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "content": [{"type": "text", "text": "It is hard."}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 50, "output_tokens": 4}})

    rows, _, _ = _ask(handler, MID)
    assert rows[0]["status"] == "ok" and rows[0]["response"] == "It is hard."


def test_ask_retries_like_dispatch_but_never_escalates() -> None:
    replies = iter([httpx.Response(500, json={"error": {"message": "boom"}})] * 2
                   + [httpx.Response(200, json={
                       "choices": [{"message": {"content": "x"}, "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 16}})] * 9)
    escalated: list[str] = []

    async def escalate(model: str, table: pa.Table) -> pa.Table:
        escalated.append(model)
        raise AssertionError("routing calls must not escalate")

    doc = job_doc("http://provider.test/v1")
    doc["dispatch"].update(escalate_on=["length", "failed"], max_attempts=2)
    job = config.parse(doc)

    async def go() -> pa.Table:
        async def no_sleep(s: float) -> None:
            return None
        d = ModelDispatcher(job.models[CHEAP], job.dispatch, run_id="run-1", api_key=KEY,
                            transport=httpx.MockTransport(lambda r: next(replies)),
                            sleep=no_sleep, escalate=escalate)
        try:
            return await d.ask(_routed(3), SCHEMA)
        finally:
            await d.aclose()

    rows = _rows(asyncio.run(go()))
    assert escalated == []
    assert sorted((r["status"], r["finish_reason"]) for r in rows) == [
        ("failed", None), ("ok", "length"), ("ok", "length")]


def test_plain_bodies_carry_no_structured_output_fields() -> None:
    h = Harness(_openai_ok)
    h.run(_routed(1))
    assert "response_format" not in json.loads(h.calls[0].content)
    h = Harness(lambda r: httpx.Response(200, json={
        "content": [{"type": "text", "text": "a"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1}}), MID)
    h.run(_routed(1))
    assert not {"tools", "tool_choice"} & set(json.loads(h.calls[0].content))


def test_rate_limit_headers_are_read_from_every_failure_and_one_success_per_tick() -> None:
    """At a thousand replies a second the headers of every success would cost more than
    they tell: a success's are read once per READ_LIMITS_EVERY_S of the dispatcher's clock,
    a 429's always."""
    from batchroute.stages.dispatch.dispatcher import READ_LIMITS_EVERY_S

    h = Harness(_openai_ok, max_attempts=1)  # no retry: a retry's wait would move the clock
    rpm = h.model.rpm
    seen: list[float] = []

    def reply(limit: int, status: int = 200) -> httpx.Response:
        headers = {"x-ratelimit-limit-requests": str(limit)}
        if status == 429:
            return httpx.Response(429, headers=headers, json={"error": {"message": "slow"}})
        resp = _openai_ok(httpx.Request("POST", "http://x", json={
            "messages": [{"content": "q"}]}))
        return httpx.Response(200, headers=headers, json=resp.json())

    async def go() -> None:
        d = h.make()
        try:
            async def call(limit: int, status: int = 200) -> None:
                d._transport = _Fixed(reply(limit, status))  # type: ignore[assignment]
                await d.dispatch(_routed(1))
                seen.append(d._limits.ceiling)

            await call(rpm // 2)  # the first success is read
            await call(rpm // 4)  # a second success in the same tick is not
            h.now += READ_LIMITS_EVERY_S
            await call(rpm // 4)  # a tick later it is
            await call(rpm // 10, status=429)  # a 429 is read at once
        finally:
            await d.aclose()

    asyncio.run(go())
    assert seen == [pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.25),
                    pytest.approx(0.1)]


class _Fixed:
    """A transport that gives every call the same reply."""

    def __init__(self, reply: httpx.Response) -> None:
        from batchroute.stages.dispatch.transport import Reply, ReplyHeaders

        self.reply = Reply(reply.status_code, ReplyHeaders.of(
            [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]),
            reply.content)

    async def post(self, url: str, headers: object, body: bytes) -> object:
        return self.reply

    async def aclose(self) -> None:
        pass
