"""The mock provider over real loopback HTTP: wire formats, determinism, limits, auth, faults.

Each test starts its own server on port 0. Rate-limit refill is tested with a fake clock, so no
test waits for a bucket to refill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import batchroute
from batchroute.devtools.mock_provider import (
    FAULTS,
    MAX_ANSWER_TOKENS,
    MIN_ANSWER_TOKENS,
    MockProvider,
    MockProviderConfig,
    count_tokens,
    register_cli,
)

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789abcdef"
OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"Authorization": f"Bearer {KEY}"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def serve(clock: FakeClock | None = None, **options: Any) -> Iterator[httpx.Client]:
    """A fresh provider on port 0 and a client bound to it (proxies ignored: loopback only)."""
    config = MockProviderConfig(**options)
    provider = MockProvider(config) if clock is None else MockProvider(config, clock=clock)
    with provider, httpx.Client(base_url=provider.url, trust_env=False, timeout=10) as client:
        client.provider = provider  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with serve() as client:
        yield client


def provider_of(client: httpx.Client) -> MockProvider:
    provider: MockProvider = client.provider  # type: ignore[attr-defined]
    return provider


def openai(client: httpx.Client, content: str = "Say something.", *, model: str = "small",
           max_tokens: int | None = None, headers: dict[str, str] | None = None,
           **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                            **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return client.post(OPENAI, json=body, headers=headers or OPENAI_HEADERS)


def anthropic(client: httpx.Client, content: str = "Say something.", *, model: str = "claude",
              max_tokens: int = 1000, headers: dict[str, str] | None = None,
              **extra: Any) -> httpx.Response:
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}], **extra}
    return client.post(ANTHROPIC, json=body, headers=headers or ANTHROPIC_HEADERS)


# -- answers ----------------------------------------------------------------------------------




def test_same_request_gets_the_same_answer_and_usage_even_from_another_server() -> None:
    bodies = []
    for _ in range(2):
        with serve() as client:
            first = openai(client, "Summarise the quarterly report.", max_tokens=300).json()
            again = openai(client, "Summarise the quarterly report.", max_tokens=300).json()
            bodies += [first, again]
    answers = {(b["choices"][0]["message"]["content"], json.dumps(b["usage"])) for b in bodies}
    assert len(answers) == 1
    with serve() as client:
        other = openai(client, "Another prompt entirely.").json()
    assert other["choices"][0]["message"]["content"] != bodies[0]["choices"][0]["message"][
        "content"]


def test_openai_reply_has_the_chat_completion_shape(client: httpx.Client) -> None:
    response = openai(client, "hello", model="gpt-small",
                      messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hello"}])
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-small"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    text = choice["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_tokens("Be brief.") + count_tokens("hello")
    assert usage["completion_tokens"] == count_tokens(text)
    assert MIN_ANSWER_TOKENS <= usage["completion_tokens"] <= MAX_ANSWER_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_anthropic_reply_has_the_messages_shape_and_counts_the_system_prompt(
    client: httpx.Client,
) -> None:
    response = anthropic(client, "hello there", system="You are terse.")
    assert response.status_code == 200
    body = response.json()
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude"
    assert body["stop_reason"] == "end_turn"
    (block,) = body["content"]
    assert block["type"] == "text"
    assert body["usage"] == {
        "input_tokens": count_tokens("You are terse.") + count_tokens("hello there"),
        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
        "output_tokens": count_tokens(block["text"]),
    }


def test_content_given_as_text_parts_counts_like_a_string(client: httpx.Client) -> None:
    as_string = anthropic(client, "abcdefgh").json()
    as_parts = client.post(ANTHROPIC, headers=ANTHROPIC_HEADERS, json={
        "model": "claude", "max_tokens": 1000,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}],
    }).json()
    assert as_parts["usage"]["input_tokens"] == as_string["usage"]["input_tokens"] == 2


def test_mmlu_prompt_gets_a_letter_that_depends_on_model_and_prompt(client: httpx.Client) -> None:
    letters = set()
    for i in range(12):
        prompt = f"Question {i}?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
        text = openai(client, prompt).json()["choices"][0]["message"]["content"]
        assert text[0] in "ABCD"
        assert text[1] == "."
        assert openai(client, prompt).json()["choices"][0]["message"]["content"] == text
        letters.add(text[0])
    assert len(letters) > 1


@pytest.mark.parametrize("max_tokens", [1, 5, MIN_ANSWER_TOKENS - 1])
def test_openai_answer_longer_than_max_tokens_is_cut_with_finish_reason_length(
    client: httpx.Client, max_tokens: int,
) -> None:
    full = openai(client, "Write at length.").json()["choices"][0]["message"]["content"]
    body = openai(client, "Write at length.", max_tokens=max_tokens).json()
    text = body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == max_tokens == count_tokens(text)
    assert full.startswith(text)


def test_anthropic_answer_longer_than_max_tokens_stops_with_max_tokens(
    client: httpx.Client,
) -> None:
    body = anthropic(client, "Write at length.", max_tokens=3).json()
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["output_tokens"] == 3
    assert anthropic(client, "Write at length.", max_tokens=MAX_ANSWER_TOKENS).json()[
        "stop_reason"] == "end_turn"


@pytest.mark.parametrize(("path", "body", "headers"), [
    (OPENAI, b"not json", OPENAI_HEADERS),
    (OPENAI, b'{"messages": [{"role": "user", "content": "x"}]}', OPENAI_HEADERS),
    (OPENAI, b'{"model": "m", "messages": []}', OPENAI_HEADERS),
    (OPENAI, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
     OPENAI_HEADERS),
    (ANTHROPIC, b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
     ANTHROPIC_HEADERS),
    (ANTHROPIC, b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}',
     {"x-api-key": KEY}),
    (OPENAI, b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
     {**OPENAI_HEADERS, "x-mock-fault": "explode"}),
])
def test_invalid_requests_get_400_in_the_wire_format(
    client: httpx.Client, path: str, body: bytes, headers: dict[str, str],
) -> None:
    response = client.post(path, content=body, headers={**headers,
                                                        "content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_health_names_the_mock_so_eval_can_tell_it_from_a_real_server(
        client: httpx.Client) -> None:
    from batchroute.training.evaluate import is_bundled_mock

    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "server": "batchroute-mock-provider"}
    assert is_bundled_mock(f"{provider_of(client).url}/v1")


def test_a_real_server_on_loopback_is_not_called_simulated() -> None:
    """A vLLM or llama.cpp server on 127.0.0.1 answers /health without naming the mock (or
    not at all): eval must not call its answers simulated."""
    import http.server
    import threading

    from batchroute.training.evaluate import is_bundled_mock

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert not is_bundled_mock(f"http://127.0.0.1:{server.server_port}/v1")
    finally:
        server.shutdown()
    with socket_closed() as port:
        assert not is_bundled_mock(f"http://127.0.0.1:{port}/v1")  # nothing listening
    assert not is_bundled_mock("https://api.openai.com/v1")  # never asked: not loopback


@contextlib.contextmanager
def socket_closed() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


# -- difficulty answers (route_decision) ------------------------------------------------------

ROUTE_SCHEMA = {"type": "object",
                "properties": {"difficulty": {"type": "string",
                                              "enum": ["easy", "medium", "hard"]}},
                "required": ["difficulty"], "additionalProperties": False}


def ask_openai(client: httpx.Client, content: str, schema: dict[str, Any] = ROUTE_SCHEMA,
               max_tokens: int = 16, model: str = "small") -> dict[str, Any]:
    reply = openai(client, content, model=model, max_tokens=max_tokens, response_format={
        "type": "json_schema",
        "json_schema": {"name": "route_decision", "strict": True, "schema": schema}})
    assert reply.status_code == 200
    body: dict[str, Any] = reply.json()
    return body


def ask_anthropic(client: httpx.Client, content: str, schema: dict[str, Any] = ROUTE_SCHEMA,
                  max_tokens: int = 16) -> dict[str, Any]:
    reply = anthropic(client, content, max_tokens=max_tokens,
                      tools=[{"name": "route_decision", "input_schema": schema}],
                      tool_choice={"type": "tool", "name": "route_decision"})
    assert reply.status_code == 200
    body: dict[str, Any] = reply.json()
    return body


ROUTE_PROMPTS = [f"Question {i}: " + "explain the trade-off of cost and quality " * (i % 9 * 3)
                 + "12+34=" * (i % 4 * 3) for i in range(60)]


def test_difficulty_answer_has_each_wire_shape_and_the_same_label(client: httpx.Client) -> None:
    prompt = "What is the capital of France?"
    o = ask_openai(client, prompt)
    choice = o["choices"][0]
    assert choice["finish_reason"] == "stop"
    decision = json.loads(choice["message"]["content"])
    assert set(decision) == {"difficulty"} and decision["difficulty"] in {"easy", "medium", "hard"}
    a = ask_anthropic(client, prompt)
    assert a["stop_reason"] == "tool_use"
    [block] = a["content"]
    assert (block["type"], block["name"]) == ("tool_use", "route_decision")
    assert block["id"].startswith("toolu_")
    assert block["input"] == decision
    # Usage as for any call: the schema is billed as prompt, the JSON as completion.
    schema_tokens = count_tokens(json.dumps(ROUTE_SCHEMA, separators=(",", ":")))
    assert o["usage"]["prompt_tokens"] == count_tokens(prompt) + schema_tokens
    assert o["usage"]["completion_tokens"] == count_tokens(choice["message"]["content"]) > 0
    assert a["usage"]["input_tokens"] == count_tokens(prompt) + schema_tokens


def test_difficulty_is_a_deterministic_function_of_the_user_prompt() -> None:
    def labels(client: httpx.Client, model: str) -> list[str]:
        return [json.loads(ask_openai(client, p, model=model)["choices"][0]["message"][
            "content"])["difficulty"] for p in ROUTE_PROMPTS]

    with serve() as first, serve(seed=9) as second:
        a, b = labels(first, "small"), labels(second, "other-model")
        c = [ask_anthropic(first, p)["content"][0]["input"]["difficulty"] for p in ROUTE_PROMPTS]
    assert a == b == c
    assert set(a) == {"easy", "medium", "hard"}  # the simulated judgement spreads out
    with serve() as client:
        # length and maths push up, short plain prose stays down
        assert json.loads(ask_openai(client, "Hi there.")["choices"][0]["message"][
            "content"]) == {"difficulty": "easy"}
        heavy = "Integrate 3x^2+5x-7 from 0 to 12 and solve 4y/9=17. " * 30
        assert json.loads(ask_openai(client, heavy)["choices"][0]["message"][
            "content"]) == {"difficulty": "hard"}


def test_difficulty_labels_come_from_the_schema_enum(client: httpx.Client) -> None:
    schema = json.loads(json.dumps(ROUTE_SCHEMA))
    schema["properties"]["difficulty"]["enum"] = ["simple", "complex"]
    got = {json.loads(ask_openai(client, p, schema)["choices"][0]["message"]["content"])[
        "difficulty"] for p in ROUTE_PROMPTS}
    assert got == {"simple", "complex"}


def test_plain_mmlu_prompt_still_gets_a_letter_without_the_schema(client: httpx.Client) -> None:
    text = openai(client, "Q?\nA. x\nB. y\nAnswer:", max_tokens=50).json()[
        "choices"][0]["message"]["content"]
    assert text[0] in "ABCD"
    assert "difficulty" not in text


def test_an_undefined_forced_tool_is_a_400(client: httpx.Client) -> None:
    reply = anthropic(client, "x", tool_choice={"type": "tool", "name": "route_decision"})
    assert reply.status_code == 400 and "tools" in reply.json()["error"]["message"]


def _malformed(body: dict[str, Any]) -> bool:
    """Whether a reply (either wire) fails to carry a valid easy/medium/hard decision."""
    if "choices" in body:
        try:
            obj = json.loads(body["choices"][0]["message"]["content"])
        except ValueError:
            return True
    else:
        blocks = [b for b in body["content"] if b["type"] == "tool_use"]
        if not blocks:
            return True
        obj = blocks[0]["input"]
    return not (isinstance(obj, dict) and obj.get("difficulty") in ("easy", "medium", "hard"))


def test_route_garbage_rate_spoils_a_fixed_share_of_prompts_on_both_wires() -> None:
    prompts = [f"Prompt number {i} about data." for i in range(400)]
    with serve(route_garbage_rate=0.25) as client, serve(route_garbage_rate=0.25,
                                                         seed=3) as again:
        o = [ask_openai(client, p) for p in prompts]
        a = [ask_anthropic(client, p) for p in prompts]
        o2 = [ask_openai(again, p) for p in prompts]
        usage = [b["usage"] for b in o]
    bad_o = [_malformed(b) for b in o]
    assert bad_o == [_malformed(b) for b in a] == [_malformed(b) for b in o2]
    assert 0.18 < sum(bad_o) / len(prompts) < 0.32
    assert all(u["completion_tokens"] > 0 and u["prompt_tokens"] > 0 for u in usage)
    # all three kinds of garbage occur, and a spoiled answer is still a 200 with usage
    kinds = {("prose" if not b["choices"][0]["message"]["content"].startswith("{") else
              "cut" if not b["choices"][0]["message"]["content"].endswith("}") else "label")
             for b, bad in zip(o, bad_o, strict=True) if bad}
    assert kinds == {"prose", "cut", "label"}
    assert {a[i]["stop_reason"] for i, bad in enumerate(bad_o) if bad} == {"tool_use", "end_turn"}
    with serve(route_garbage_rate=1.0) as client:
        assert all(_malformed(ask_openai(client, p)) for p in prompts[:20])
    with serve() as client:
        assert not any(_malformed(ask_anthropic(client, p)) for p in prompts[:50])


def test_a_cap_below_the_decision_cuts_it_like_any_answer(client: httpx.Client) -> None:
    o = ask_openai(client, "hello", max_tokens=2)
    assert o["choices"][0]["finish_reason"] == "length"
    assert o["choices"][0]["message"]["content"] == '{"diffic'
    a = ask_anthropic(client, "hello", max_tokens=2)
    assert a["stop_reason"] == "max_tokens"
    assert a["content"] == [{"type": "text", "text": '{"diffic'}]


# -- latency ----------------------------------------------------------------------------------


def test_latency_varies_around_the_median() -> None:
    with serve(latency_ms=40) as client:
        elapsed = []
        for i in range(9):
            start = time.perf_counter()
            assert openai(client, f"prompt {i}").status_code == 200
            elapsed.append(time.perf_counter() - start)
        median = sorted(elapsed)[4]
        assert 0.015 < median < 0.12
        assert max(elapsed) - min(elapsed) > 0.002


# -- auth -------------------------------------------------------------------------------------


def assert_key_not_echoed(response: httpx.Response, key: str) -> None:
    assert key not in response.text
    assert all(key not in value for value in response.headers.values())


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer sk-wrong-key-987654"},
    {"Authorization": KEY},  # no "Bearer"
    {"x-api-key": KEY},  # the Anthropic header on the OpenAI path
])
def test_openai_missing_or_wrong_key_is_401_without_echoing_it(
    headers: dict[str, str], capfd: pytest.CaptureFixture[str],
) -> None:
    with serve(api_key=KEY) as client:
        response = client.post(OPENAI, headers=headers, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert_key_not_echoed(response, KEY)
        assert_key_not_echoed(response, "sk-wrong-key-987654")
        assert KEY not in json.dumps(provider_of(client).stats())
        assert openai(client).status_code == 200
    out, err = capfd.readouterr()
    assert KEY not in out + err


def test_anthropic_wrong_key_is_401_authentication_error() -> None:
    with serve(api_key=KEY) as client:
        response = anthropic(client, headers={"x-api-key": "nope",
                                              "anthropic-version": "2023-06-01"})
        assert response.status_code == 401
        assert response.json() == {"type": "error", "error": {
            "type": "authentication_error", "message": "Incorrect API key provided."}}
        assert anthropic(client).status_code == 200


def test_expired_key_is_always_401_expired() -> None:
    expired = "sk-old-key-000"
    with serve(expired_keys=frozenset({expired})) as client:  # no api_key: others pass
        response = openai(client, headers={"Authorization": f"Bearer {expired}"})
        assert response.status_code == 401
        assert "expired" in response.json()["error"]["message"]
        assert_key_not_echoed(response, expired)
        assert openai(client, headers={"Authorization": "Bearer anything"}).status_code == 200


# -- rate limits ------------------------------------------------------------------------------


def test_rpm_limit_answers_429_with_retry_after_and_rate_limit_headers() -> None:
    with serve(rpm=5) as client:
        for i in range(5):
            ok = openai(client, f"p{i}")
            assert ok.status_code == 200
            assert ok.headers["x-ratelimit-limit-requests"] == "5"
            assert ok.headers["x-ratelimit-remaining-requests"] == str(4 - i)
        limited = openai(client, "p5")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert limited.json()["error"]["type"] == "requests"
        # One request refills in 60/5 = 12 s.
        assert 11 <= int(limited.headers["retry-after"]) <= 12
        assert 11_000 <= int(limited.headers["retry-after-ms"]) <= 12_000
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in limited.headers  # tpm unlimited
        # Buckets are per (model, key).
        assert openai(client, "p5", model="other").status_code == 200
        assert openai(client, "p5", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert provider_of(client).stats()["rate_limited"] == 1


def test_buckets_refill_continuously() -> None:
    clock = FakeClock()
    with serve(clock=clock, rpm=60) as client:
        for i in range(60):
            assert openai(client, f"p{i}").status_code == 200
        limited = openai(client, "late")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert limited.headers["retry-after-ms"] == "1000"
        clock.now += 0.5
        assert openai(client, "late").headers["retry-after-ms"] == "500"
        clock.now += 0.5
        assert openai(client, "late").status_code == 200
        clock.now += 120  # refills to capacity, not beyond
        assert openai(client, "after").headers["x-ratelimit-remaining-requests"] == "59"


def test_tpm_limit_charges_prompt_plus_max_tokens() -> None:
    clock = FakeClock()
    with serve(clock=clock, tpm=600) as client:
        # "hi" is 1 token, so each request costs 1 + 99 = 100 tokens.
        for _ in range(6):
            assert openai(client, "hi", max_tokens=99).status_code == 200
        limited = openai(client, "hi", max_tokens=99)
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "tokens"
        assert limited.headers["x-ratelimit-remaining-tokens"] == "0"
        assert limited.headers["retry-after-ms"] == "10000"  # 100 tokens at 10 per second
        assert limited.headers["retry-after"] == "10"
        clock.now += 10
        assert openai(client, "hi", max_tokens=99).status_code == 200


def test_request_larger_than_the_token_bucket_is_429_without_retry_after() -> None:
    with serve(tpm=100) as client:
        response = openai(client, "hi", max_tokens=500)
        assert response.status_code == 429
        assert "Request too large" in response.json()["error"]["message"]
        assert "retry-after" not in response.headers


def test_model_limits_replace_the_global_limits_for_that_model_only() -> None:
    clock = FakeClock()
    with serve(clock=clock, rpm=5, tpm=10_000, model_limits={"big": (2, None)}) as client:
        for i in range(2):
            ok = openai(client, f"p{i}", model="big", max_tokens=99)
            assert ok.status_code == 200
            assert ok.headers["x-ratelimit-limit-requests"] == "2"
            assert "x-ratelimit-limit-tokens" not in ok.headers  # its pair says unlimited
        limited = openai(client, "p2", model="big")
        assert limited.status_code == 429
        assert "Limit 2" in limited.json()["error"]["message"]
        assert limited.headers["retry-after"] == "30"  # 60 / 2
        for i in range(5):  # other models keep the global limits
            ok = openai(client, f"p{i}", model="small", max_tokens=99)
            assert ok.status_code == 200
            assert ok.headers["x-ratelimit-limit-requests"] == "5"
            assert ok.headers["x-ratelimit-limit-tokens"] == "10000"
        assert openai(client, "p5", model="small").status_code == 429
        clock.now += 30
        assert openai(client, "p3", model="big").status_code == 200




def test_short_window_refuses_a_burst_above_a_seconds_quota_and_refills() -> None:
    clock = FakeClock()
    with serve(clock=clock, rpm=120, window_s=1) as client:  # 2 requests a second
        assert openai(client, "p0").status_code == 200
        ok = openai(client, "p1")
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "120"  # still the per-minute limit
        limited = openai(client, "p2")
        assert limited.status_code == 429
        assert limited.headers["retry-after-ms"] == "500"
        clock.now += 0.5
        assert openai(client, "p2").status_code == 200
        assert openai(client, "p3").status_code == 429
        clock.now += 10  # refills to one second's worth, not a minute's
        assert [openai(client, f"q{i}").status_code for i in range(3)] == [200, 200, 429]


def test_short_window_admits_a_request_bigger_than_the_bucket_when_full() -> None:
    clock = FakeClock()
    with serve(clock=clock, tpm=600, window_s=1) as client:  # holds 10 tokens, 10 per second
        big = openai(client, "hi", max_tokens=99)  # 100 tokens: above the bucket, within TPM
        assert big.status_code == 200
        # The bucket is now 90 tokens in debt: 5 tokens fit after (90 + 5) / 10 = 9.5 s;
        # a 100-token request fits only in a full bucket.
        limited = openai(client, "hi", max_tokens=4)
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "tokens"
        assert limited.headers["retry-after-ms"] == "9500"
        clock.now += 9.5
        assert openai(client, "hi", max_tokens=4).status_code == 200  # the bucket is at 0
        assert openai(client, "hi", max_tokens=99).headers["retry-after-ms"] == "1000"
        clock.now += 1
        assert openai(client, "hi", max_tokens=99).status_code == 200
        too_large = openai(client, "hi", max_tokens=600)  # 601 > tpm: never
        assert too_large.status_code == 429
        assert "Request too large" in too_large.json()["error"]["message"]
        assert "Limit 600" in too_large.json()["error"]["message"]
        assert "retry-after" not in too_large.headers


def test_anthropic_path_also_gets_anthropic_rate_limit_headers() -> None:
    with serve(rpm=10, tpm=10_000) as client:
        response = anthropic(client, "hi", max_tokens=99)
        assert response.status_code == 200
        headers = response.headers
        assert headers["anthropic-ratelimit-requests-limit"] == "10"
        assert headers["anthropic-ratelimit-requests-remaining"] == "9"
        assert headers["anthropic-ratelimit-tokens-limit"] == "10000"
        assert headers["anthropic-ratelimit-tokens-remaining"] == str(10_000 - 100)
        for name in ("requests", "tokens"):
            reset = datetime.fromisoformat(headers[f"anthropic-ratelimit-{name}-reset"])
            assert reset.tzinfo is not None
        assert headers["x-ratelimit-remaining-requests"] == "9"


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "status", "openai_type", "anthropic_type"), [
    ("500", 500, "server_error", "api_error"),
    ("503", 503, "server_error", "overloaded_error"),
    ("429", 429, "requests", "rate_limit_error"),
    ("401", 401, "invalid_request_error", "authentication_error"),
])
def test_forced_error_faults_in_both_wire_formats(
    fault: str, status: int, openai_type: str, anthropic_type: str,
) -> None:
    with serve(rpm=100) as client:
        response = openai(client, headers={**OPENAI_HEADERS, "x-mock-fault": fault})
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "code"}
        assert response.json()["error"]["type"] == openai_type or fault == "429"
        response = anthropic(client, headers={**ANTHROPIC_HEADERS, "x-mock-fault": fault})
        assert response.status_code == status
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == anthropic_type
        if fault == "429":
            assert response.headers["retry-after"] == "1"
            assert response.headers["x-ratelimit-limit-requests"] == "100"
        assert provider_of(client).stats()["faults"][fault] == 2


def test_forced_drop_closes_the_connection_mid_reply(client: httpx.Client) -> None:
    with pytest.raises(httpx.TransportError):
        openai(client, headers={**OPENAI_HEADERS, "x-mock-fault": "drop"})
    assert openai(client).status_code == 200  # the server itself is fine
    stats = provider_of(client).stats()
    assert stats["faults"]["drop"] == 1
    assert stats["by_status"] == {"200": 1}


def test_forced_malformed_is_200_with_a_body_that_is_not_json(client: httpx.Client) -> None:
    response = anthropic(client, headers={**ANTHROPIC_HEADERS, "x-mock-fault": "malformed"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(ValueError, match=r"."):
        json.loads(response.text)


def test_forced_timeout_hangs_past_the_client_timeout_and_stop_does_not_wait() -> None:
    with serve(hang_s=30) as client:
        start = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            client.post(OPENAI, headers={**OPENAI_HEADERS, "x-mock-fault": "timeout"},
                        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                        timeout=0.2)
        assert time.perf_counter() - start < 5
        assert provider_of(client).stats()["faults"]["timeout"] == 1
        stopping = time.perf_counter()
        provider_of(client).stop()
        assert time.perf_counter() - stopping < 5


def test_forced_timeout_answers_after_hang_s(client: httpx.Client) -> None:
    with serve(hang_s=0.05) as slow:
        start = time.perf_counter()
        response = openai(slow, headers={**OPENAI_HEADERS, "x-mock-fault": "timeout"})
        assert response.status_code == 200
        assert time.perf_counter() - start >= 0.05
        assert response.json() == {**openai(client).json(), "id": response.json()["id"],
                                   "created": response.json()["created"]}


def test_random_faults_are_reproducible_from_the_seed() -> None:
    def statuses(seed: int) -> list[int | str]:
        seen: list[int | str] = []
        with serve(seed=seed, fail_rate=0.3, rate_503=0.2, drop_rate=0.1,
                   burst_429_rate=0.1) as client:
            for i in range(40):
                try:
                    seen.append(openai(client, f"p{i}").status_code)
                except httpx.TransportError:
                    seen.append("drop")
            stats = provider_of(client).stats()
            assert sum(stats["faults"].values()) == sum(s != 200 for s in seen)
        return seen

    first = statuses(seed=7)
    assert first == statuses(seed=7)
    assert set(first) == {200, 500, 503, 429, "drop"}
    assert first != statuses(seed=8)








# -- counters ---------------------------------------------------------------------------------


def test_stats_count_requests_models_statuses_429s_faults_and_tokens() -> None:
    with serve(rpm=2) as client:
        a = openai(client, "one", model="a").json()
        b = anthropic(client, "two", model="b").json()
        openai(client, "three", model="a")
        openai(client, "four", model="a")  # over rpm for model a
        openai(client, "five", model="b", headers={**OPENAI_HEADERS, "x-mock-fault": "500"})
        client.get("/health")
        expected = {
            "requests": 5,
            "by_model": {"a": 3, "b": 2},
            "by_status": {"200": 3, "429": 1, "500": 1},
            "rate_limited": 1,
            "faults": {**dict.fromkeys(FAULTS, 0), "500": 1},
        }
        stats = provider_of(client).stats()
        assert {k: stats[k] for k in expected} == expected  # type: ignore[literal-required]
        assert stats["prompt_tokens"] == (a["usage"]["prompt_tokens"]
                                          + b["usage"]["input_tokens"] + count_tokens("three"))
        assert stats["completion_tokens"] > (a["usage"]["completion_tokens"]
                                             + b["usage"]["output_tokens"])
        assert client.get("/stats").json() == stats


# -- lifecycle and CLI ------------------------------------------------------------------------


def test_start_returns_the_bound_port_and_url() -> None:
    provider = MockProvider(MockProviderConfig())
    port = provider.start()
    try:
        assert port > 0
        assert provider.url == f"http://127.0.0.1:{port}"
        assert httpx.get(f"{provider.url}/health", trust_env=False).status_code == 200
    finally:
        provider.stop()
    provider.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False)
    assert provider.stats()["requests"] == 0




@pytest.mark.parametrize("value", ["gpt-4", "=600", "m=", "m=fast", "m=600:", "m=600:1:2",
                                   "m=-5", "m=1.5"])
def test_cli_model_limit_syntax_errors_name_the_value(
    value: str, capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--model-limit", value])
    err = capsys.readouterr().err
    assert "--model-limit" in err
    assert repr(value) in err
    assert "NAME=RPM[:TPM]" in err
    with MockProvider() as provider:
        args = parser.parse_args(["mock-provider", "--wait-ready", "--port", str(provider.port)])
        assert args.func(args) == 0




_CLI = """
import argparse, sys
from batchroute.devtools.mock_provider import register_cli
parser = argparse.ArgumentParser()
register_cli(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_cli_serves_until_sigterm_and_never_prints_the_key() -> None:
    # The child must import the same batchroute as this test, installed or not.
    root = str(Path(batchroute.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MOCK_TEST_KEY": KEY, "PYTHONPATH": pythonpath}
    process = subprocess.Popen(
        [sys.executable, "-c", _CLI, "mock-provider", "--port", "0", "--rpm", "100",
         "--latency-ms", "1", "--api-key-env", "MOCK_TEST_KEY", "--window-s", "30",
         "--model-limit", "solo=1:500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("mock provider listening on http://127.0.0.1:")
        assert line.endswith("(rpm=100, tpm=unlimited, latency=1ms, window=30s; "
                             "solo: rpm=1, tpm=500)")
        url = line.split()[4]
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
            assert openai(client).status_code == 200
            assert openai(client, model="solo", max_tokens=10).status_code == 200
            assert openai(client, model="solo", max_tokens=10).status_code == 429
            assert openai(client, headers={"Authorization": "Bearer wrong"}).status_code == 401
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert KEY not in line + out + err


def test_every_fault_the_help_documents_is_injected(capsys: pytest.CaptureFixture[str]) -> None:
    """The x-mock-fault values `mock-provider --help` documents are the ones the server acts
    on: each is counted as that fault, and none answers a normal 200."""
    import re

    from batchroute import cli

    with pytest.raises(SystemExit):
        cli.main(["mock-provider", "--help"])
    documented = re.search(r"x-mock-fault:\s*'?([\w|]+)", capsys.readouterr().out)
    assert documented is not None
    faults = documented.group(1).split("|")
    assert len(faults) >= 7
    with serve(hang_s=30) as client:
        for fault in faults:
            try:
                response = client.post(
                    OPENAI, headers={**OPENAI_HEADERS, "x-mock-fault": fault}, timeout=0.5,
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                normal = response.status_code == 200 and _is_json(response.text)
            except httpx.TransportError:  # drop, and timeout past the client's patience
                normal = False
            assert not normal, fault
        assert provider_of(client).stats()["faults"] == dict.fromkeys(faults, 1)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
