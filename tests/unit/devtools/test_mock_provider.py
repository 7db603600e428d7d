"""The mock provider's configuration, token count, command line and structured answers.

No server is started: requests go straight to the handler, as a stand-in request object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from datetime import date, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from multidict import CIMultiDict, CIMultiDictProxy

from batchroute.devtools.mock_provider import (
    MockProviderConfig,
    _MockServer,
    count_tokens,
    register_cli,
)
from batchroute.errors import ConfigError


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2),
                                              ("x" * 401, 101)])
def test_count_tokens_is_a_quarter_of_the_characters_rounded_up(text: str, tokens: int) -> None:
    assert count_tokens(text) == tokens


def test_model_limits_are_validated_and_keep_the_config_hashable() -> None:
    config = MockProviderConfig(model_limits={"m": (600, 100_000)})
    assert config.model_limits == {"m": (600, 100_000)}
    assert config.limits_for("m") == (600, 100_000)
    assert config.limits_for("other") == (None, None)
    assert hash(config) == hash(MockProviderConfig(model_limits={"m": (600, 100_000)}))
    with pytest.raises(TypeError):
        config.model_limits["m"] = (1, 1)  # type: ignore[index]
    with pytest.raises(ConfigError, match="model_limits"):
        MockProviderConfig(model_limits={"m": (-1, None)})
    with pytest.raises(ConfigError, match="model_limits"):
        MockProviderConfig(model_limits={"m": 600})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="window_s"):
        MockProviderConfig(window_s=0)
    with pytest.raises(ConfigError, match="window_s"):
        MockProviderConfig(window_s=61)


def test_fault_rates_must_be_probabilities_that_sum_to_at_most_one() -> None:
    with pytest.raises(ConfigError, match="fail_rate"):
        MockProviderConfig(fail_rate=1.5)
    with pytest.raises(ConfigError, match="sum"):
        MockProviderConfig(fail_rate=0.6, drop_rate=0.6)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "localhost", "::"])
def test_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        MockProviderConfig(host=host)


def test_cli_flags_parse_and_bad_values_are_refused() -> None:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["mock-provider"])
    assert (args.port, args.rpm, args.tpm, args.latency_ms, args.hang_s, args.seed) == (
        8765, None, None, 0.0, 30.0, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--fail-rate", "2"])
    assert (args.model_limits, args.window_s) == ([], 60.0)
    args = parser.parse_args(["mock-provider", "--model-limit", "gpt-4-1106-preview=2400",
                              "--model-limit", "ft:gpt-4o:org::x=600:100000",
                              "--window-s", "1"])
    assert args.model_limits == [("gpt-4-1106-preview", 2400, None),
                                 ("ft:gpt-4o:org::x", 600, 100_000)]
    assert args.window_s == 1.0
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--window-s", "0"])
    assert args.route_garbage_rate == 0.0
    args = parser.parse_args(["mock-provider", "--route-garbage-rate", "0.2"])
    assert args.route_garbage_rate == 0.2
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--route-garbage-rate", "1.5"])
    with pytest.raises(ConfigError, match="route_garbage_rate"):
        MockProviderConfig(route_garbage_rate=-0.1)


def test_start_up_line_keeps_its_default_format() -> None:
    from batchroute.devtools.mock_provider import _describe

    assert _describe(MockProviderConfig(rpm=100, latency_ms=1), 80) == (
        "mock provider listening on http://127.0.0.1:80 (rpm=100, tpm=unlimited, latency=1ms)")


# -- structured answers (labels, JSON extraction) ----------------------------------------------

HEADERS = {"openai": {"Authorization": "Bearer sk-test"},
           "anthropic": {"x-api-key": "sk-test", "anthropic-version": "2023-06-01"}}
LABELS = ["billing", "technical", "account", "other"]
LABEL_SCHEMA: dict[str, Any] = {
    "type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
    "required": ["label"], "additionalProperties": False}
INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "minLength": 3, "maxLength": 40},
        "invoice_number": {"type": "string"},
        "issued": {"type": "string", "format": "date"},
        "total": {"type": "number", "minimum": 0, "maximum": 10000},
        "lines": {"type": "integer", "minimum": 1, "maximum": 50},
        "paid": {"type": "boolean"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "po_number": {"type": ["string", "null"]},
        "billing_address": {
            "type": "object",
            "properties": {"city": {"type": "string"},
                           "postcode": {"type": "string", "minLength": 5, "maxLength": 5}},
            "required": ["city", "postcode"], "additionalProperties": False},
        "contact": {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
        "notes": {"type": "string"},
    },
    "required": ["vendor", "invoice_number", "issued", "total", "lines", "paid", "currency",
                 "tags", "po_number", "billing_address"],
    "additionalProperties": False,
}
PROMPTS = [f"Ticket {i}: my card was charged twice for order {i * 7}." for i in range(80)]


def server(**options: Any) -> _MockServer:
    return _MockServer(MockProviderConfig(**options), time.monotonic)


class FakeRequest:
    """What the handler reads of an aiohttp request: the body, the headers, the transport
    (None: only the drop fault, not used here, would close it)."""

    def __init__(self, wire: str, body: dict[str, Any]) -> None:
        self.headers = CIMultiDictProxy(CIMultiDict(HEADERS[wire]))
        self.transport = None
        self._body = json.dumps(body).encode()

    async def read(self) -> bytes:
        return self._body


async def _post(srv: _MockServer, wire: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await srv._handle(FakeRequest(wire, body), wire)  # type: ignore[arg-type]
    return response.status, json.loads(response.body)  # type: ignore[attr-defined]


def post_all(srv: _MockServer, wire: str, bodies: list[dict[str, Any]]) -> list[Any]:
    """Each body's 200 reply from the handler, in order (one event loop, no socket)."""
    async def run() -> list[tuple[int, Any]]:
        return [await _post(srv, wire, body) for body in bodies]

    replies = asyncio.run(run())
    assert [status for status, _ in replies] == [200] * len(bodies), replies[:3]
    return [reply for _, reply in replies]


def post(srv: _MockServer, wire: str, body: dict[str, Any]) -> Any:
    return post_all(srv, wire, [body])[0]


def status_of(srv: _MockServer, wire: str, body: dict[str, Any]) -> tuple[int, Any]:
    return asyncio.run(_post(srv, wire, body))


def openai_body(prompt: str, *, model: str = "small", max_tokens: int | None = None,
                **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def json_schema_body(prompt: str, schema: dict[str, Any], name: str = "output",
                     **extra: Any) -> dict[str, Any]:
    return openai_body(prompt, response_format={
        "type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}},
        **extra)


def tool_body(prompt: str, schema: dict[str, Any], name: str = "output", *,
              model: str = "claude", max_tokens: int = 1000) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
            "tools": [{"name": name, "description": "Record the answer.",
                       "input_schema": schema}],
            "tool_choice": {"type": "tool", "name": name}}


def content_of(reply: dict[str, Any]) -> str:
    text: str = reply["choices"][0]["message"]["content"]
    return text


def tool_input_of(reply: dict[str, Any], name: str = "output") -> Any:
    [block] = reply["content"]
    assert (block["type"], block["name"], reply["stop_reason"]) == ("tool_use", name, "tool_use")
    return block["input"]


def validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def test_labels_answer_on_both_wires_is_a_valid_label_spread_over_prompts() -> None:
    srv, check = server(), validator(LABEL_SCHEMA)
    o = post_all(srv, "openai", [json_schema_body(p, LABEL_SCHEMA, "label") for p in PROMPTS])
    a = post_all(srv, "anthropic", [tool_body(p, LABEL_SCHEMA, "label") for p in PROMPTS])
    assert {r["choices"][0]["finish_reason"] for r in o} == {"stop"}
    o_labels = [json.loads(content_of(r)) for r in o]
    a_labels = [tool_input_of(r, "label") for r in a]
    for answer in o_labels + a_labels:
        check.validate(answer)
    assert {x["label"] for x in o_labels} == {x["label"] for x in a_labels} == set(LABELS)
    # deterministic: the same requests again (even on another server) get the same answers
    assert [json.loads(content_of(r)) for r in post_all(server(seed=5), "openai", [
        json_schema_body(p, LABEL_SCHEMA, "label") for p in PROMPTS])] == o_labels
    # and another model answers some of them differently
    other = post_all(srv, "openai", [json_schema_body(p, LABEL_SCHEMA, "label", model="big")
                                     for p in PROMPTS])
    assert [json.loads(content_of(r)) for r in other] != o_labels


def test_invoice_answer_validates_on_both_wires_and_both_vllm_forms() -> None:
    srv, check = server(), validator(INVOICE_SCHEMA)
    prompts = PROMPTS[:40]
    answers = {
        "openai": [json.loads(content_of(r)) for r in post_all(srv, "openai", [
            json_schema_body(p, INVOICE_SCHEMA) for p in prompts])],
        "anthropic": [tool_input_of(r) for r in post_all(srv, "anthropic", [
            tool_body(p, INVOICE_SCHEMA) for p in prompts])],
        "structured_outputs": [json.loads(content_of(r)) for r in post_all(srv, "openai", [
            openai_body(p, structured_outputs={"json": INVOICE_SCHEMA}) for p in prompts])],
        "guided_json": [json.loads(content_of(r)) for r in post_all(srv, "openai", [
            openai_body(p, guided_json=INVOICE_SCHEMA) for p in prompts])],
    }
    for wire, instances in answers.items():
        for instance in instances:
            assert not list(check.iter_errors(instance)), (wire, instance)
        # the generator explores the schema: optional and nullable values both ways
        assert any("notes" in x for x in instances) and any("notes" not in x for x in instances)
        assert {x["po_number"] is None for x in instances} == {True, False}
        assert len({x["currency"] for x in instances}) > 1
    again = [json.loads(content_of(r)) for r in post_all(srv, "openai", [
        json_schema_body(p, INVOICE_SCHEMA) for p in prompts])]
    assert again == answers["openai"]


def test_vllm_choice_is_answered_with_the_bare_label() -> None:
    srv = server()
    for key, value in (("structured_outputs", {"choice": LABELS}), ("guided_choice", LABELS)):
        replies = post_all(srv, "openai", [openai_body(p, **{key: value}) for p in PROMPTS])
        texts = [content_of(r) for r in replies]
        assert set(texts) == set(LABELS)
        assert {r["choices"][0]["finish_reason"] for r in replies} == {"stop"}
        assert texts == [content_of(r) for r in post_all(srv, "openai", [
            openai_body(p, **{key: value}) for p in PROMPTS])]


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": 30, "maxLength": 32},
    {"type": "string", "maxLength": 3},
    {"type": "string", "format": "date-time"},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": "integer", "minimum": -5, "maximum": -3},
    {"type": "integer", "exclusiveMaximum": -100},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.02},
    {"type": "array", "items": {"enum": [1, 2, 3, 4]}, "minItems": 4, "uniqueItems": True},
    {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 6},
    {"const": {"kind": "fixed"}},
    {"enum": ["a", 2, None]},
    {"oneOf": [{"type": "string", "format": "email"}, {"type": "integer"}]},
    {"type": "object", "properties": {"item": {"$ref": "#/$defs/item"}},
     "required": ["item"],
     "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string"},
                                                          "qty": {"type": "integer",
                                                                  "minimum": 1}},
                        "required": ["sku", "qty"], "additionalProperties": False}}},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]},
               {"properties": {"b": {"type": "null"}}, "required": ["b"]}]},
    {"type": "object", "properties": {"child": {"$ref": "#"}}},  # recursive, optional
    # recursive and required: the depth limit ends it with an empty list
    {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"},
                                               "maxItems": 1}}, "required": ["kids"]},
])
def test_generated_instances_honour_the_schema_keywords(schema: dict[str, Any]) -> None:
    check = validator(schema)
    replies = post_all(server(), "openai", [openai_body(p, guided_json=schema)
                                            for p in PROMPTS[:30]])
    for reply in replies:
        instance = json.loads(content_of(reply))
        assert not list(check.iter_errors(instance)), instance


def test_string_formats_are_well_formed() -> None:
    # jsonschema checks date and email; date-time needs a package it does not have here.
    schema = {"type": "object", "required": ["d", "t", "e"], "properties": {
        "d": {"type": "string", "format": "date"},
        "t": {"type": "string", "format": "date-time"},
        "e": {"type": "string", "format": "email"}}}
    for reply in post_all(server(), "openai", [json_schema_body(p, schema)
                                               for p in PROMPTS[:20]]):
        instance = json.loads(content_of(reply))
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", instance["d"])
        date.fromisoformat(instance["d"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", instance["t"])
        datetime.fromisoformat(instance["t"])
        assert re.fullmatch(r"[a-z]+\.[a-z]+@example\.com", instance["e"])


def test_the_schema_or_choice_list_is_billed_as_prompt_and_the_answer_as_completion() -> None:
    srv, prompt = server(), "Classify: I cannot log in."
    schema_tokens = count_tokens(json.dumps(LABEL_SCHEMA, separators=(",", ":")))
    o = post(srv, "openai", json_schema_body(prompt, LABEL_SCHEMA, "label"))
    assert o["usage"]["prompt_tokens"] == count_tokens(prompt) + schema_tokens
    assert o["usage"]["completion_tokens"] == count_tokens(content_of(o)) > 0
    a = post(srv, "anthropic", tool_body(prompt, LABEL_SCHEMA, "label"))
    assert a["usage"]["input_tokens"] == count_tokens(prompt) + schema_tokens
    assert a["usage"]["output_tokens"] == count_tokens(
        json.dumps(tool_input_of(a, "label"), separators=(",", ":")))
    c = post(srv, "openai", openai_body(prompt, guided_choice=LABELS))
    assert c["usage"]["prompt_tokens"] == count_tokens(prompt) + count_tokens(
        json.dumps(LABELS, separators=(",", ":")))
    assert c["usage"]["completion_tokens"] == count_tokens(content_of(c))
    plain = post(srv, "openai", openai_body(prompt))
    assert plain["usage"]["prompt_tokens"] == count_tokens(prompt)


def test_max_tokens_cuts_a_structured_answer_like_any_answer() -> None:
    srv, prompt = server(), "Invoice 118 from Acme Ltd, total 1,200 EUR."
    full = content_of(post(srv, "openai", json_schema_body(prompt, INVOICE_SCHEMA)))
    cut = post(srv, "openai", json_schema_body(prompt, INVOICE_SCHEMA, max_tokens=5))
    assert cut["choices"][0]["finish_reason"] == "length"
    assert content_of(cut) == full[:20] and cut["usage"]["completion_tokens"] == 5
    a = post(srv, "anthropic", tool_body(prompt, INVOICE_SCHEMA, max_tokens=5))
    assert a["stop_reason"] == "max_tokens"
    [block] = a["content"]
    assert block["type"] == "text" and len(block["text"]) == 20
    assert json.dumps(tool_input_of(post(srv, "anthropic", tool_body(prompt, INVOICE_SCHEMA))),
                      separators=(",", ":")).startswith(block["text"])
    choice = post(srv, "openai", openai_body(prompt, guided_choice=["a" * 40], max_tokens=2))
    assert (content_of(choice), choice["choices"][0]["finish_reason"]) == ("a" * 8, "length")


@pytest.mark.parametrize(("wire", "body", "message"), [
    ("anthropic", {**tool_body("x", LABEL_SCHEMA, "label"),
                   "tool_choice": {"type": "tool", "name": "output"}}, "not in 'tools'"),
    ("anthropic", {**tool_body("x", LABEL_SCHEMA), "tools": []}, "not in 'tools'"),
    ("anthropic", tool_body("x", {"type": "array"}), "must describe an object"),
    ("openai", openai_body("x", guided_choice=[]), "non-empty list"),
    ("openai", openai_body("x", structured_outputs={"regex": "a+"}), "not supported"),
    ("openai", openai_body("x", guided_json="{not json"), "not valid JSON"),
    ("openai", openai_body("x", guided_choice=["a"], guided_json={}), "not several"),
    ("openai", openai_body("x", response_format={"type": "json_schema", "json_schema": {}}),
     "'name'"),
])
def test_bad_structured_requests_are_400(wire: str, body: dict[str, Any], message: str) -> None:
    status, reply = status_of(server(), wire, body)
    assert status == 400
    text = reply["error"]["message"]
    assert message in text, text


def test_route_decision_keeps_its_answers_and_is_not_counted_as_structured() -> None:
    srv = server()
    route = {"type": "object", "properties": {"difficulty": {
        "type": "string", "enum": ["easy", "medium", "hard"]}}, "required": ["difficulty"]}
    assert json.loads(content_of(post(srv, "openai", json_schema_body(
        "Hi there.", route, "route_decision")))) == {"difficulty": "easy"}
    assert tool_input_of(post(srv, "anthropic", tool_body(
        "Hi there.", route, "route_decision")), "route_decision") == {"difficulty": "easy"}
    post(srv, "openai", openai_body("plain"))
    assert srv.counters["structured"] == 0
    post(srv, "openai", json_schema_body("x", LABEL_SCHEMA, "label"))
    post(srv, "anthropic", tool_body("x", LABEL_SCHEMA, "label"))
    post(srv, "openai", openai_body("x", guided_choice=LABELS))
    assert srv.counters["structured"] == 3


def test_an_anthropic_tool_schema_without_a_type_still_gets_an_object_input() -> None:
    reply = post(server(), "anthropic", tool_body("Say anything.", {}))
    assert tool_input_of(reply) == {}


# -- invalid_rate -------------------------------------------------------------------------------


def verdict(reply: dict[str, Any], schema: dict[str, Any] | None = None,
            choices: list[str] | None = None) -> str:
    """``valid``, or the form of an invalid answer: ``unparsable`` (cut-off JSON, prose),
    ``enum`` (a value outside an enum or the choices), ``missing`` (a required property) or
    ``wrong type``; for choices ``schema`` is JSON instead of the bare label."""
    if choices is not None:
        text = content_of(reply)
        return "valid" if text in choices else "schema" if text.startswith("{") \
            else "unparsable" if text.endswith(".") else "enum"
    assert schema is not None
    if "choices" in reply:
        try:
            instance = json.loads(content_of(reply))
        except ValueError:
            assert content_of(reply).startswith("{")  # cut-off JSON
            return "unparsable"
    else:
        blocks = [b for b in reply["content"] if b["type"] == "tool_use"]
        if not blocks:  # prose, the tool ignored
            [block] = reply["content"]
            assert (reply["stop_reason"], block["type"]) == ("end_turn", "text")
            assert not block["text"].startswith("{")
            return "unparsable"
        instance = blocks[0]["input"]
    errors = {e.validator for e in validator(schema).iter_errors(instance)}
    assert errors <= {"enum", "required", "type", "anyOf"}, errors  # anyOf: a wrong type
    if not errors:
        return "valid"
    # a wrong type breaks an enum too: ask for type first
    return "missing" if "required" in errors else "wrong type" if errors & {
        "type", "anyOf"} else "enum"


CASES: list[tuple[str, str, Any, dict[str, Any] | None, list[str] | None]] = [
    ("openai", "label", lambda p, m: json_schema_body(p, LABEL_SCHEMA, "label", model=m),
     LABEL_SCHEMA, None),
    ("anthropic", "label", lambda p, m: tool_body(p, LABEL_SCHEMA, "label", model=m),
     LABEL_SCHEMA, None),
    ("openai", "invoice", lambda p, m: json_schema_body(p, INVOICE_SCHEMA, model=m),
     INVOICE_SCHEMA, None),
    ("anthropic", "invoice", lambda p, m: tool_body(p, INVOICE_SCHEMA, model=m),
     INVOICE_SCHEMA, None),
    ("openai", "choice", lambda p, m: openai_body(p, model=m, structured_outputs={
        "choice": LABELS}), None, LABELS),
]


@pytest.mark.parametrize(("wire", "task", "make", "schema", "choices"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_invalid_rate_spoils_a_fixed_share_of_requests_per_model(
        wire: str, task: str, make: Any, schema: dict[str, Any] | None,
        choices: list[str] | None) -> None:
    prompts = [f"Request {i}: please handle invoice {i * 13} for customer {i % 17}."
               for i in range(300)]
    srv = server(invalid_rate=0.3)
    replies = post_all(srv, wire, [make(p, "small") for p in prompts])
    forms = [verdict(r, schema, choices) for r in replies]
    bad = [f != "valid" for f in forms]
    assert 0.24 < sum(bad) / len(prompts) < 0.36
    # every answer made invalid fails (and is counted), every other one is the valid answer
    assert srv.counters["invalid_answers"] == sum(bad)
    assert srv.counters["structured"] == len(prompts)
    honest = post_all(server(), wire, [make(p, "small") for p in prompts])
    for reply, ok, valid in zip(replies, bad, honest, strict=True):
        assert (answer_of(reply) == answer_of(valid)) is not ok
    assert set(forms) == ({"valid", "unparsable", "enum", "schema"} if choices else
                          {"valid", "unparsable", "enum", "missing", "wrong type"})
    # the same prompts fail again, on another server too; another model fails other prompts
    again = post_all(server(invalid_rate=0.3, seed=4), wire, [make(p, "small") for p in prompts])
    assert [verdict(r, schema, choices) for r in again] == forms
    other = post_all(srv, wire, [make(p, "big") for p in prompts])
    other_bad = [verdict(r, schema, choices) != "valid" for r in other]
    assert other_bad != bad and any(b and not o for b, o in zip(bad, other_bad, strict=True))


def answer_of(reply: dict[str, Any]) -> Any:
    if "choices" in reply:
        return content_of(reply)
    return reply["content"][0].get("input", reply["content"][0].get("text"))


def test_invalid_rate_leaves_route_decision_and_plain_answers_alone() -> None:
    srv, honest = server(invalid_rate=1.0), server()
    route = {"type": "object", "properties": {"difficulty": {
        "type": "string", "enum": ["easy", "medium", "hard"]}}, "required": ["difficulty"]}
    bodies = [json_schema_body(p, route, "route_decision") for p in PROMPTS[:30]]
    bodies += [openai_body(p, max_tokens=50) for p in PROMPTS[:30]]
    assert [content_of(r) for r in post_all(srv, "openai", bodies)] == [
        content_of(r) for r in post_all(honest, "openai", bodies)]
    assert srv.counters["invalid_answers"] == srv.counters["structured"] == 0
    assert all(verdict(r, LABEL_SCHEMA) != "valid" for r in post_all(
        srv, "openai", [json_schema_body(p, LABEL_SCHEMA, "label") for p in PROMPTS[:30]]))


def test_invalid_rate_is_a_validated_config_field_and_a_cli_flag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute.devtools import mock_provider

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    assert parser.parse_args(["mock-provider"]).invalid_rate == 0.0
    args = parser.parse_args(["mock-provider", "--invalid-rate", "0.3"])
    assert args.invalid_rate == 0.3
    served: list[MockProviderConfig] = []
    monkeypatch.setattr(mock_provider, "serve_forever", served.append)
    assert args.func(args) == 0 and served[0].invalid_rate == 0.3
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--invalid-rate", "1.1"])
    assert MockProviderConfig(invalid_rate=1).invalid_rate == 1
    for bad in (-0.1, 1.5, "0.3"):
        with pytest.raises(ConfigError, match="invalid_rate"):
            MockProviderConfig(invalid_rate=bad)  # type: ignore[arg-type]


def test_a_model_can_have_its_own_invalid_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute.devtools import mock_provider

    srv = server(invalid_rate=1.0, model_invalid_rates=(("big", 0.0),))
    bodies = {m: [json_schema_body(p, LABEL_SCHEMA, "label", model=m) for p in PROMPTS[:40]]
              for m in ("small", "big")}
    assert all(verdict(r, LABEL_SCHEMA) != "valid"
               for r in post_all(srv, "openai", bodies["small"]))
    assert all(verdict(r, LABEL_SCHEMA) == "valid"
               for r in post_all(srv, "openai", bodies["big"]))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["mock-provider", "--invalid-rate", "0.2",
                              "--model-invalid-rate", "gpt-4=0", "--model-invalid-rate",
                              "a=b=0.5"])
    served: list[MockProviderConfig] = []
    monkeypatch.setattr(mock_provider, "serve_forever", served.append)
    assert args.func(args) == 0
    assert served[0].model_invalid_rates == (("gpt-4", 0.0), ("a=b", 0.5))
    with pytest.raises(SystemExit):
        parser.parse_args(["mock-provider", "--model-invalid-rate", "gpt-4=2"])
    with pytest.raises(ConfigError, match=r"model_invalid_rates\['x'\]"):
        MockProviderConfig(model_invalid_rates=(("x", -1.0),))


def test_an_off_label_answer_is_never_one_of_the_labels_even_unsure() -> None:
    labels = ["unsure", "none of these", "Unsure issue", "None of these issue", "unsure 2",
              "This looks like unsure to me.", '{"label":"unsure"}']
    srv = server(invalid_rate=1.0)
    texts = [content_of(r) for r in post_all(srv, "openai", [
        openai_body(p, guided_choice=labels) for p in PROMPTS])]
    assert not set(texts) & set(labels)
    schema = {"type": "object", "properties": {"label": {"enum": labels}}, "required": ["label"]}
    for reply in post_all(srv, "openai", [json_schema_body(p, schema) for p in PROMPTS]):
        assert verdict(reply, schema) != "valid"
