"""Reasoning models through the dispatcher's seams and the mock's rules: OpenAI's o-series
and GPT-5 take max_completion_tokens and only the default temperature, Anthropic's extended
thinking a budget below max_tokens; the thinking is read and billed as output."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pyarrow as pa
import pytest

from batchroute import config, schemas
from batchroute.devtools.mock_provider import MockProviderConfig, _MockServer
from batchroute.errors import ConfigError
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from tests.helpers import CHEAP, MID, job_doc

KEY = "sk-unit-test-secret-4242"


def _job(**models: dict[str, Any]) -> config.JobConfig:
    doc = job_doc("http://provider.test/v1")
    for name, extra in models.items():
        doc["models"][{"cheap": CHEAP, "mid": MID}[name]].update(extra)
    return config.parse(doc)


def _routed(n: int, temperature: float | None = 0.2) -> pa.Table:
    cols: dict[str, Any] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(n)], row=list(range(n)),
                prompt=[f"question {i}" for i in range(n)], temperature=[temperature] * n,
                est_input_tokens=[7] * n, est_output_tokens=[2048] * n,
                route_cost_micro_usd=[0] * n)
    return pa.table(cols, schema=schemas.ROUTED)


def _dispatch(job: config.JobConfig, model: str, reply: httpx.Response, n: int = 2
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    bodies: list[dict[str, Any]] = []

    def handle(req: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(req.content))
        return reply

    async def go() -> pa.Table:
        d = ModelDispatcher(job.models[model], job.dispatch, run_id="r", api_key=KEY,
                            transport=httpx.MockTransport(handle))
        try:
            return await d.dispatch(_routed(n))
        finally:
            await d.aclose()

    return asyncio.run(go()).to_pylist(), bodies


def test_openai_reasoning_models_get_max_completion_tokens_and_no_temperature(
        caplog: pytest.LogCaptureFixture) -> None:
    job = _job(cheap={"remote_name": "o4-mini", "reasoning_effort": "low"})
    assert job.models[CHEAP].token_param == "max_completion_tokens"
    reply = httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 300,
                  "completion_tokens_details": {"reasoning_tokens": 290}}})
    with caplog.at_level(logging.WARNING):
        rows, bodies = _dispatch(job, CHEAP, reply, n=3)
    assert bodies[0] == {"model": "o4-mini", "messages": [{"role": "user",
                                                           "content": "question 0"}],
                         "max_completion_tokens": 2048, "reasoning_effort": "low"}
    r = rows[0]
    assert (r["status"], r["output_tokens"], r["reasoning_tokens"]) == ("ok", 300, 290)
    assert r["cost_micro_usd"] == job.models[CHEAP].cost_micro_usd(10, 300)  # thinking billed
    warned = [m for m in caplog.messages if "takes only its default temperature" in m]
    assert len(warned) == 1  # one warning per model, not per row


def test_the_token_param_follows_the_family_and_an_explicit_value_wins() -> None:
    for wire, param in (("gpt-4o", "max_tokens"), ("o3", "max_completion_tokens"),
                        ("gpt-5-mini", "max_completion_tokens"), ("o1-preview",
                                                                  "max_completion_tokens")):
        assert _job(cheap={"remote_name": wire}).models[CHEAP].token_param == param
    explicit = _job(cheap={"remote_name": "gpt-4.1", "token_param": "max_completion_tokens"})
    assert explicit.models[CHEAP].token_param == "max_completion_tokens"
    plain = _job(cheap={"remote_name": "gpt-4o"})
    _, bodies = _dispatch(plain, CHEAP, httpx.Response(200, json={
        "choices": [{"message": {"content": "x"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}), n=1)
    assert bodies[0]["max_tokens"] == 2048 and bodies[0]["temperature"] == pytest.approx(0.2)


def test_anthropic_extended_thinking_sends_its_budget_below_max_tokens() -> None:
    doc = job_doc("http://provider.test/v1")
    doc["dispatch"]["default_max_tokens"] = 4096
    doc["models"][MID]["thinking_budget_tokens"] = 2048
    assert config.parse(doc).models[MID].reasoning
    reply = httpx.Response(200, json={
        "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "answer"}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 900}})
    job = config.parse(doc)
    rows, bodies = _dispatch(job, MID, reply, n=1)
    assert bodies[0]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert bodies[0]["max_tokens"] == 2049  # the row's 2,048 raised above the budget
    assert "temperature" not in bodies[0]
    assert rows[0]["response"] == "answer" and rows[0]["output_tokens"] == 900


@pytest.mark.parametrize(("model", "extra", "needle"), [
    ("mid", {"thinking_budget_tokens": 1024},
     r"thinking_budget_tokens: 1024 must be below the output budget"),
    ("mid", {"thinking_budget_tokens": 512}, r"thinking_budget_tokens"),
    ("cheap", {"thinking_budget_tokens": 2048}, r"an Anthropic setting"),
    ("mid", {"reasoning_effort": "low"}, r"reasoning_effort: an OpenAI setting"),
    ("cheap", {"reasoning_effort": "max"}, r"'max' is not one of minimal, low"),
    ("cheap", {"token_param": "max_output_tokens"}, r"token_param: 'max_output_tokens'"),
    ("mid", {"token_param": "max_completion_tokens"}, r"takes max_tokens only"),
])
def test_reasoning_keys_are_checked_at_load(model: str, extra: dict[str, Any],
                                           needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _job(**{model: extra})  # job_doc's default_max_tokens is 64


def _mock(wire: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    from tests.unit.devtools.test_mock_provider import _post

    srv = _MockServer(MockProviderConfig(), lambda: 0.0)
    status, reply = asyncio.run(_post(srv, wire, body))
    return status, reply


def test_the_mock_refuses_what_the_providers_refuse_and_reports_thinking() -> None:
    msg = [{"role": "user", "content": "hello there"}]
    status, body = _mock("openai", {"model": "o3", "messages": msg, "max_tokens": 100})
    assert status == 400 and "Use 'max_completion_tokens' instead" in body["error"]["message"]
    status, body = _mock("openai", {"model": "o3", "messages": msg, "temperature": 0.2,
                                    "max_completion_tokens": 100})
    assert status == 400 and "Only the default (1) value" in body["error"]["message"]
    status, body = _mock("openai", {"model": "o3", "messages": msg,
                                    "max_completion_tokens": 2000})
    usage = body["usage"]
    assert status == 200 and usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["completion_tokens"] > usage["completion_tokens_details"]["reasoning_tokens"]
    assert usage["completion_tokens"] <= 2000
    status, body = _mock("anthropic", {"model": "claude", "messages": msg, "max_tokens": 1024,
                                       "thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert status == 400 and "greater than `thinking.budget_tokens`" in json.dumps(body)
    status, body = _mock("anthropic", {"model": "claude", "messages": msg, "max_tokens": 4000,
                                       "thinking": {"type": "enabled", "budget_tokens": 2000}})
    assert status == 200 and body["content"][0]["type"] == "thinking"
    plain = _mock("anthropic", {"model": "claude", "messages": msg, "max_tokens": 4000})[1]
    assert body["usage"]["output_tokens"] > plain["usage"]["output_tokens"]


def test_auth_and_api_version_shape_the_request() -> None:
    from batchroute.stages.dispatch.providers import AnthropicMessages, OpenAIChat

    azure = OpenAIChat("https://r.openai.azure.com/openai/deployments/d", "k", "gpt-4o",
                       auth="api-key", api_version="2024-10-21")
    assert azure.url == ("https://r.openai.azure.com/openai/deployments/d/chat/completions"
                         "?api-version=2024-10-21")
    assert azure.headers() == {"api-key": "k"}
    assert OpenAIChat("http://x/v1", "k", "m").headers() == {"authorization": "Bearer k"}
    assert AnthropicMessages("http://x", "k", "m").headers()["x-api-key"] == "k"
    job = _job(cheap={"auth": "api-key", "api_version": "2024-10-21"})
    assert (job.models[CHEAP].auth, job.models[CHEAP].api_version) == ("api-key",
                                                                        "2024-10-21")
    assert job.models[MID].auth == "x-api-key"
    with pytest.raises(ConfigError, match=r"models\.cheap-model\.auth: must be one of bearer"):
        _job(cheap={"auth": "basic"})


def test_a_thinking_model_cannot_answer_the_llm_routers_forced_tool() -> None:
    doc = job_doc()
    doc["dispatch"]["default_max_tokens"] = 4096
    doc["models"][MID]["thinking_budget_tokens"] = 2048
    doc["router"]["stages"] = ["llm"]
    doc["router"]["llm"] = {"model": MID, "labels": {"easy": CHEAP, "hard": MID},
                            "default": MID}
    with pytest.raises(ConfigError, match=r"or the llm router needs"):
        config.parse(doc)
    doc["router"]["llm"]["model"] = CHEAP
    assert config.parse(doc).models[MID].reasoning
