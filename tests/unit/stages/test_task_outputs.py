"""[task] outputs through the dispatcher's seams: what each wire is asked for, how answers are
parsed into ``label`` / ``output``, and invalid answers retried, escalated or failed, every
attempt billed to the model that made it. Fake transports, no network, no sleeping."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pyarrow as pa
import pytest

from batchroute import config, schemas
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from tests.helpers import CHEAP, MID, STRONG, job_doc

KEY = "sk-unit-test-secret-4242"
LABELS = ["billing", "bug", "how-to"]
INVOICE = {"type": "object", "additionalProperties": False,
           "required": ["number", "total", "items", "paid", "lines"],
           "properties": {"number": {"type": "string"}, "total": {"type": "number"},
                          "items": {"type": "array", "items": {"type": "string"}},
                          "paid": {"type": ["boolean", "null"]},
                          "lines": {"type": "integer"}}}


def _job(output: dict[str, Any], *, escalate_on: tuple[str, ...] = (),
         system: str = "Label it.", **models: Any) -> config.JobConfig:
    doc = job_doc("http://provider.test/v1")
    doc["task"] = {"system": system, "output": output}
    doc["dispatch"].update(escalate_on=list(escalate_on), max_attempts=2)
    for name, extra in models.items():
        doc["models"][{"cheap": CHEAP, "mid": MID, "strong": STRONG}[name]].update(extra)
    return config.parse(doc)


def _routed(n: int) -> pa.Table:
    cols: dict[str, Any] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(n)], row=list(range(n)),
                prompt=[f"ticket {i}" for i in range(n)], route_reason=["classifier"] * n,
                est_input_tokens=[7] * n, est_output_tokens=[16] * n,
                route_cost_micro_usd=[0] * n)
    table = pa.table(cols, schema=schemas.ROUTED)
    return table.append_column(pa.field("ticket_id", pa.int64()),
                               pa.array([100 + i for i in range(n)], pa.int64()))


def _openai(content: str, *, prompt_tokens: int = 10, completion_tokens: int = 4
            ) -> httpx.Response:
    return httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}})


def _anthropic_tool(name: str, value: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json={
        "content": [{"type": "tool_use", "id": "t1", "name": name, "input": value}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 20, "output_tokens": 6}})


def _run(job: config.JobConfig, handlers: dict[str, Any], n: int = 1, *, first: str = CHEAP
         ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]],
                    dict[str, ModelDispatcher], pa.Table]:
    """Dispatch ``n`` rows to ``first``, escalations wired up the job's ladder; the result
    rows, the request bodies each model received, and the dispatchers."""
    bodies: dict[str, list[dict[str, Any]]] = {m: [] for m in handlers}

    async def no_sleep(s: float) -> None:
        return None

    async def go() -> tuple[pa.Table, dict[str, ModelDispatcher]]:
        ds: dict[str, ModelDispatcher] = {}

        def transport(model: str) -> httpx.MockTransport:
            def handle(req: httpx.Request) -> httpx.Response:
                body = json.loads(req.content)
                bodies[model].append(body)
                return handlers[model](body, len(bodies[model]))
            return httpx.MockTransport(handle)

        async def escalate(model: str, table: pa.Table) -> pa.Table:
            return await ds[model].dispatch(table, journal=False)

        for m in handlers:
            ds[m] = ModelDispatcher(job.models[m], job.dispatch, run_id="run-1", api_key=KEY,
                                    transport=transport(m), sleep=no_sleep, task=job.task,
                                    escalate=escalate)
        try:
            return await ds[first].dispatch(_routed(n)), ds
        finally:
            for d in ds.values():
                await d.aclose()

    out, ds = asyncio.run(go())
    return out.to_pylist(), bodies, ds, out


def test_labels_over_openai_ask_strict_json_schema_and_fill_the_label_column() -> None:
    job = _job({"labels": LABELS})
    rows, bodies, _, out = _run(job, {CHEAP: lambda b, k: _openai('{"label": " Bug "}')})
    body = bodies[CHEAP][0]
    assert body["messages"] == [{"role": "system", "content": "Label it."},
                                {"role": "user", "content": "ticket 0"}]
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    # label is the canonical spelling; the raw answer stays in response; the id keeps its type
    assert (rows[0]["status"], rows[0]["label"], rows[0]["response"]) == (
        "ok", "bug", '{"label": " Bug "}')
    assert out.schema.field("label").type == pa.string()
    assert out.schema.field("ticket_id").type == pa.int64() and rows[0]["ticket_id"] == 100
    assert out.schema.names[:len(schemas.RESULTS)] == schemas.RESULTS.names


def test_labels_over_anthropic_force_a_tool_with_the_enum() -> None:
    job = _job({"labels": LABELS})
    rows, bodies, _, _ = _run(job, {MID: lambda b, k: _anthropic_tool("label",
                                                                     {"label": "how-to"})},
                              first=MID)
    body = bodies[MID][0]
    # The shared prefix (tool, system prompt) is marked for Anthropic's cache by default.
    assert body["system"] == [{"type": "text", "text": "Label it.",
                               "cache_control": {"type": "ephemeral"}}]
    assert body["tool_choice"] == {"type": "tool", "name": "label"}
    assert body["tools"][0]["input_schema"]["properties"]["label"]["enum"] == LABELS
    assert (rows[0]["status"], rows[0]["label"]) == ("ok", "how-to")


@pytest.mark.parametrize(("mode", "key", "value"), [
    ("vllm", "structured_outputs", {"choice": LABELS}),
    ("vllm-guided", "guided_choice", LABELS),
])
def test_labels_over_vllm_ask_for_the_choice_and_read_the_bare_label(
        mode: str, key: str, value: Any) -> None:
    job = _job({"labels": LABELS}, cheap={"structured_output": mode})
    rows, bodies, _, _ = _run(job, {CHEAP: lambda b, k: _openai("billing\n")})
    assert bodies[CHEAP][0][key] == value and "response_format" not in bodies[CHEAP][0]
    assert rows[0]["label"] == "billing"


def test_json_schema_answers_become_a_typed_output_struct_on_both_wires() -> None:
    job = _job({"json_schema": INVOICE})
    answer = {"number": "INV-1", "total": 12, "items": ["a", "b"], "paid": None, "lines": 2.0}
    rows, bodies, _, out = _run(job, {CHEAP: lambda b, k: _openai(json.dumps(answer))})
    assert bodies[CHEAP][0]["response_format"]["json_schema"]["schema"] == INVOICE
    t = out.schema.field("output").type
    assert [(f.name, f.type) for f in t] == [
        ("number", pa.string()), ("total", pa.float64()), ("items", pa.list_(pa.string())),
        ("paid", pa.bool_()), ("lines", pa.int64())]
    assert rows[0]["output"] == {"number": "INV-1", "total": 12.0, "items": ["a", "b"],
                                 "paid": None, "lines": 2}
    assert json.loads(rows[0]["response"]) == answer  # the raw answer is kept beside it
    rows, _, _, _ = _run(job, {MID: lambda b, k: _anthropic_tool("output", answer)}, first=MID)
    assert rows[0]["status"] == "ok" and rows[0]["output"]["number"] == "INV-1"


def test_an_invalid_answer_is_retried_at_the_same_model_and_both_answers_are_billed() -> None:
    job = _job({"labels": LABELS, "retries_on_invalid": 1})
    answers = {1: _openai("I think it is a billing issue"), 2: _openai('{"label":"billing"}')}
    rows, bodies, ds, _ = _run(job, {CHEAP: lambda b, k: answers[k]})
    r = rows[0]
    assert len(bodies[CHEAP]) == 2 and bodies[CHEAP][0] == bodies[CHEAP][1]
    assert (r["status"], r["label"], r["invalid_answers"], r["attempts"]) == (
        "ok", "billing", 1, 2)
    assert (r["input_tokens"], r["output_tokens"]) == (20, 8)
    assert r["cost_micro_usd"] == job.models[CHEAP].cost_micro_usd(20, 8)
    assert ds[CHEAP].stats.invalid == 1


def test_still_invalid_escalates_with_each_attempt_billed_to_its_model() -> None:
    job = _job({"labels": LABELS, "retries_on_invalid": 1}, escalate_on=("invalid",))
    rows, bodies, ds, _ = _run(job, {
        CHEAP: lambda b, k: _openai("no idea"),
        MID: lambda b, k: _anthropic_tool("label", {"label": "BUG"})})
    r = rows[0]
    assert len(bodies[CHEAP]) == 2 and len(bodies[MID]) == 1
    assert (r["status"], r["model"], r["label"], r["escalated_from"]) == ("ok", MID, "bug",
                                                                           CHEAP)
    (first,) = r["escalations"]
    assert (first["model"], first["reason"], first["invalid_answers"], first["attempts"]) == (
        CHEAP, "invalid", 2, 2)
    cheap_cost = job.models[CHEAP].cost_micro_usd(20, 8)
    assert first["cost_micro_usd"] == cheap_cost
    assert r["cost_micro_usd"] == cheap_cost + job.models[MID].cost_micro_usd(20, 6)
    assert ds[CHEAP].stats.escalated == 1 and ds[CHEAP].stats.invalid == 2


def test_invalid_everywhere_ends_failed_with_the_reason_and_the_raw_text() -> None:
    job = _job({"json_schema": INVOICE}, escalate_on=("invalid",))
    rows, _, _, _ = _run(job, {
        CHEAP: lambda b, k: _openai('{"number": "INV-1", "total": "twelve"'),
        MID: lambda b, k: _anthropic_tool("output", {"number": "INV-1"}),
        STRONG: lambda b, k: _openai('{"number": 7, "total": 1, "items": [], "paid": true, '
                                     '"lines": 1}')})
    r = rows[0]
    assert (r["status"], r["model"], r["error_type"]) == ("failed", STRONG, "invalid_output")
    assert "does not match the schema at number" in r["error_message"]
    assert r["response"].startswith('{"number": 7') and r["output"] is None
    assert [e["reason"] for e in r["escalations"]] == ["invalid", "invalid"]
    billed = (job.models[CHEAP].cost_micro_usd(10, 4) + job.models[MID].cost_micro_usd(20, 6)
              + job.models[STRONG].cost_micro_usd(10, 4))
    assert r["cost_micro_usd"] == billed


def test_invalid_without_escalate_on_invalid_fails_on_the_first_model() -> None:
    # "failed" in escalate_on does not escalate invalid answers: only "invalid" does.
    job = _job({"labels": LABELS}, escalate_on=("failed",))
    rows, bodies, _, _ = _run(job, {CHEAP: lambda b, k: _openai("other"),
                                    MID: lambda b, k: _anthropic_tool("label",
                                                                      {"label": "bug"})})
    r = rows[0]
    assert (r["status"], r["model"], r["error_type"], r["invalid_answers"]) == (
        "failed", CHEAP, "invalid_output", 1)
    assert "'other'" in r["error_message"] or '"other"' in r["error_message"]
    assert not bodies[MID]


def test_free_text_tasks_send_the_system_prompt_and_add_no_output_column() -> None:
    job = _job({}, system="Be brief.")
    rows, bodies, _, out = _run(job, {CHEAP: lambda b, k: _openai("anything at all")})
    assert bodies[CHEAP][0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "response_format" not in bodies[CHEAP][0]
    assert "label" not in out.schema.names and "output" not in out.schema.names
    assert rows[0]["status"] == "ok" and rows[0]["invalid_answers"] == 0


def test_an_answer_cut_at_max_tokens_is_not_retried_and_escalates_as_length() -> None:
    cut = httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": '{"number": "INV-1", "to'},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 16}})
    answer = {"number": "INV-1", "total": 1, "items": [], "paid": False, "lines": 1}
    for escalate_on, reason in ((("length", "invalid"), "length"), (("invalid",), "invalid")):
        job = _job({"json_schema": INVOICE, "retries_on_invalid": 2}, escalate_on=escalate_on)
        rows, bodies, _, _ = _run(job, {CHEAP: lambda b, k: cut,
                                        MID: lambda b, k: _anthropic_tool("output", answer)})
        assert len(bodies[CHEAP]) == 1  # the same cap would cut it again: no retry
        assert rows[0]["status"] == "ok" and rows[0]["escalations"][0]["reason"] == reason
    job = _job({"json_schema": INVOICE, "retries_on_invalid": 2})
    rows, bodies, _, _ = _run(job, {CHEAP: lambda b, k: cut})
    assert len(bodies[CHEAP]) == 1 and rows[0]["error_type"] == "invalid_output"
    assert rows[0]["error_message"].startswith("answer cut at max_tokens (16)")


def test_an_unusable_answer_stays_billed_when_the_retry_then_fails() -> None:
    job = _job({"labels": LABELS, "retries_on_invalid": 1})
    replies = {1: _openai("no idea", prompt_tokens=10, completion_tokens=4)}
    rows, bodies, _, _ = _run(job, {CHEAP: lambda b, k: replies.get(
        k, httpx.Response(503, json={"error": {"message": "overloaded"}}))})
    r = rows[0]
    assert (r["status"], r["error_type"], r["invalid_answers"]) == ("failed", "transient", 1)
    assert len(bodies[CHEAP]) == 2  # max_attempts = 2 counts the unusable answer too
    assert (r["input_tokens"], r["output_tokens"]) == (10, 4)
    assert r["cost_micro_usd"] == job.models[CHEAP].cost_micro_usd(10, 4) > 0
