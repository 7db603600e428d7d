"""The mock provider's batch endpoints (OpenAI Batch API, Anthropic Message Batches) through a
real loopback server, with a fake clock: no test sleeps, time moves by hand."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchroute.devtools import mock_batches
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig, register_cli
from batchroute.errors import ConfigError

KEY = "sk-test-batches-0123456789"
OPENAI_HEADERS = {"Authorization": f"Bearer {KEY}"}
ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
ENDPOINT = "/v1/chat/completions"
LABELS = {"type": "object", "properties": {"label": {"type": "string", "enum": [
    "billing", "technical", "other"]}}, "required": ["label"], "additionalProperties": False}
ROUTE = {"type": "object", "properties": {"difficulty": {"type": "string", "enum": [
    "easy", "medium", "hard"]}}, "required": ["difficulty"]}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Mock:
    """A running provider, a client bound to it and the clock it reads."""

    def __init__(self, provider: MockProvider, client: httpx.Client, clock: FakeClock) -> None:
        self.provider, self.client, self.clock = provider, client, clock

    def stats(self) -> Any:
        return self.client.get("/stats").json()


@contextlib.contextmanager
def serve(**options: Any) -> Iterator[Mock]:
    clock = FakeClock()
    options.setdefault("batch_delay_s", 10.0)
    provider = MockProvider(MockProviderConfig(**options), clock=clock)
    with provider, httpx.Client(base_url=provider.url, trust_env=False, timeout=30) as client:
        yield Mock(provider, client, clock)


def chat(prompt: str, *, model: str = "small", max_tokens: int | None = 120,
         **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def message(prompt: str, *, model: str = "claude", max_tokens: int = 300,
            **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}], **extra}


def line(custom_id: str, body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body, **fields}


def upload(mock: Mock, lines: list[Any], headers: dict[str, str] = OPENAI_HEADERS) -> str:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    response = mock.client.post("/v1/files", headers=headers, data={"purpose": "batch"},
                                files={"file": ("input.jsonl", text.encode())})
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def create(mock: Mock, lines: list[Any], *, metadata: dict[str, str] | None = None,
           headers: dict[str, str] = OPENAI_HEADERS) -> dict[str, Any]:
    request: dict[str, Any] = {"input_file_id": upload(mock, lines, headers),
                               "endpoint": ENDPOINT, "completion_window": "24h"}
    if metadata is not None:
        request["metadata"] = metadata
    response = mock.client.post("/v1/batches", headers=headers, json=request)
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


def get(mock: Mock, batch: dict[str, Any], headers: dict[str, str] = OPENAI_HEADERS) -> Any:
    response = mock.client.get(f"/v1/batches/{batch['id']}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def download(mock: Mock, file_id: str | None) -> list[Any]:
    if file_id is None:
        return []
    response = mock.client.get(f"/v1/files/{file_id}/content", headers=OPENAI_HEADERS)
    assert response.status_code == 200, response.text
    return [json.loads(x) for x in response.text.splitlines()]


def create_messages(mock: Mock, requests: list[tuple[str, dict[str, Any]]]) -> Any:
    response = mock.client.post("/v1/messages/batches", headers=ANTHROPIC_HEADERS, json={
        "requests": [{"custom_id": cid, "params": params} for cid, params in requests]})
    assert response.status_code == 200, response.text
    return response.json()


def get_messages(mock: Mock, batch: dict[str, Any]) -> Any:
    response = mock.client.get(f"/v1/messages/batches/{batch['id']}", headers=ANTHROPIC_HEADERS)
    assert response.status_code == 200, response.text
    return response.json()


def results(mock: Mock, batch: dict[str, Any]) -> dict[str, Any]:
    url = get_messages(mock, batch)["results_url"]
    assert url == f"{mock.provider.url}/v1/messages/batches/{batch['id']}/results"
    response = mock.client.get(url, headers=ANTHROPIC_HEADERS)
    assert response.status_code == 200, response.text
    rows = [json.loads(x) for x in response.text.splitlines()]
    return {row["custom_id"]: row["result"] for row in rows}


def sync(mock: Mock, wire: str, body: dict[str, Any]) -> httpx.Response:
    if wire == "openai":
        return mock.client.post(ENDPOINT, headers=OPENAI_HEADERS, json=body)
    return mock.client.post("/v1/messages", headers=ANTHROPIC_HEADERS, json=body)


def answer(reply: Any) -> Any:
    """A reply without what differs between two identical calls (ids, creation time)."""
    if isinstance(reply, dict):
        return {k: answer(v) for k, v in reply.items() if k not in ("id", "created",
                                                                      "signature")}
    if isinstance(reply, list):
        return [answer(v) for v in reply]
    return reply


OPENAI_BODIES = {
    "plain": chat("Summarise the quarterly report for the board."),
    "uncut": chat("Write a long essay about batch routing.", max_tokens=None),
    "mmlu": chat("Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:"),
    "labels": chat("My card was charged twice.", response_format={"type": "json_schema",
                   "json_schema": {"name": "label", "strict": True, "schema": LABELS}}),
    "route": chat("Prove that 2^10 = 1024 and 3*7 = 21.", response_format={
        "type": "json_schema", "json_schema": {"name": "route_decision", "schema": ROUTE}}),
    "choice": chat("Classify: the app crashes.", guided_choice=["bug", "question"]),
    "system": chat("hello", messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hello"}]),
}


# -- OpenAI ----------------------------------------------------------------------------------


def test_openai_batch_runs_its_lifecycle_and_answers_as_the_sync_endpoint() -> None:
    with serve(invalid_rate=1.0) as mock:  # structured answers spoiled, as the sync ones
        bodies = {**OPENAI_BODIES, **{f"row-{i}": chat(f"Question {i} about the data table.")
                                      for i in range(40)}}
        created = create(mock, [line(cid, body) for cid, body in bodies.items()],
                         metadata={"job": "nightly"})
        assert created["status"] == "validating" and created["object"] == "batch"
        assert (created["endpoint"], created["completion_window"], created["metadata"]) == (
            ENDPOINT, "24h", {"job": "nightly"})
        assert created["expires_at"] == created["created_at"] + 24 * 3600
        file = mock.client.get(f"/v1/files/{created['input_file_id']}",
                               headers=OPENAI_HEADERS).json()
        assert (file["object"], file["purpose"], file["filename"]) == ("file", "batch",
                                                                       "input.jsonl")

        assert mock.provider.stats()["batches_by_status"] == {"in_progress": 1}

        mock.clock.now += 5  # halfway: lines finish spread over the delay
        running = get(mock, created)
        assert running["status"] == "in_progress"
        assert running["in_progress_at"] == created["created_at"]
        counts = running["request_counts"]
        assert counts["total"] == len(bodies) and 0 < counts["completed"] < len(bodies)
        assert running["output_file_id"] is None and running["finalizing_at"] is None

        mock.clock.now += 4.5  # past 90% of the delay: every line is done
        finalizing = get(mock, created)
        assert finalizing["status"] == "finalizing"
        assert finalizing["request_counts"]["completed"] == len(bodies)
        assert finalizing["finalizing_at"] is not None and finalizing["completed_at"] is None

        mock.clock.now += 0.5
        # the stats follow the clock, with no read of the batch in between
        assert mock.provider.stats()["batches_by_status"] == {"completed": 1}
        done = get(mock, created)
        assert done["status"] == "completed"
        assert abs(done["completed_at"] - created["created_at"] - 10) <= 1
        assert done["request_counts"] == {"total": len(bodies), "completed": len(bodies),
                                          "failed": 0}
        assert done["error_file_id"] is None  # nothing failed: no error file, as OpenAI
        output = download(mock, done["output_file_id"])
        assert [row["custom_id"] for row in output] == list(bodies)
        for row in output:
            assert row["id"].startswith("batch_req_") and row["error"] is None
            assert row["response"]["status_code"] == 200
        stats = mock.stats()
        assert stats["prompt_tokens"] == sum(r["response"]["body"]["usage"]["prompt_tokens"]
                                             for r in output)
        assert stats["completion_tokens"] == sum(
            r["response"]["body"]["usage"]["completion_tokens"] for r in output)
        assert stats["structured"] == stats["invalid_answers"] == 2  # labels and choice
        assert stats["batch_lines_received"] == len(bodies)
        assert stats["batches_by_status"] == {"completed": 1}
        # requests and by_status count HTTP calls (upload, create, file, 3 reads, download),
        # never lines
        assert stats["requests"] == 7 and stats["by_status"] == {"200": 7}

        for row in output:
            reply = sync(mock, "openai", bodies[row["custom_id"]])
            assert reply.status_code == 200
            assert answer(row["response"]["body"]) == answer(reply.json()), row["custom_id"]


def test_a_reasoning_model_batch_answers_as_the_sync_endpoint() -> None:
    with serve() as mock:
        bodies = {f"r{i}": chat(f"Plan step {i}.", model="o3-mini", max_tokens=None,
                                max_completion_tokens=900) for i in range(5)}
        batch = create(mock, [line(cid, body) for cid, body in bodies.items()])
        mock.clock.now += 10
        output = download(mock, get(mock, batch)["output_file_id"])
        assert len(output) == 5
        for row in output:
            body = row["response"]["body"]
            assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
            assert answer(body) == answer(sync(mock, "openai", bodies[row["custom_id"]]).json())


BAD_FILES: list[tuple[str, list[Any], str, int | None]] = [
    ("not json", [line("a", chat("x")), "{not json"], "invalid_json_line", 2),
    ("not an object", ["[1, 2]"], "invalid_json_line", 1),
    ("no custom_id", [{"method": "POST", "url": ENDPOINT, "body": chat("x")}],
     "missing_required_parameter", 1),
    ("no method", [{"custom_id": "a", "url": ENDPOINT, "body": chat("x")}],
     "missing_required_parameter", 1),
    ("no url", [{"custom_id": "a", "method": "POST", "body": chat("x")}],
     "missing_required_parameter", 1),
    ("no body", [{"custom_id": "a", "method": "POST", "url": ENDPOINT}],
     "missing_required_parameter", 1),
    ("GET", [line("a", chat("x"), method="GET")], "invalid_value", 1),
    ("other url", [line("a", chat("x")), line("b", chat("y"), url="/v1/embeddings")],
     "invalid_url", 2),
    ("duplicate", [line("a", chat("x")), line("b", chat("y")), line("a", chat("z"))],
     "duplicate_custom_id", 3),
    ("two models", [line("a", chat("x")), line("b", chat("y", model="big"))],
     "mismatched_model", 2),
    ("empty", [""], "empty_file", None),
]


@pytest.mark.parametrize(("case", "lines", "code", "line_number"), BAD_FILES,
                         ids=[c[0] for c in BAD_FILES])
def test_an_input_file_openai_would_refuse_fails_the_batch(
        case: str, lines: list[Any], code: str, line_number: int | None) -> None:
    with serve() as mock:
        batch = create(mock, lines)
        assert batch["status"] == "validating" and batch["errors"] is None
        failed = get(mock, batch)
        assert failed["status"] == "failed"
        assert failed["failed_at"] == failed["created_at"] and failed["in_progress_at"] is None
        assert failed["errors"]["object"] == "list"
        [error] = failed["errors"]["data"]
        assert (error["code"], error["line"]) == (code, line_number), error
        assert error["message"]
        assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        mock.clock.now += 100
        assert get(mock, batch)["output_file_id"] is None
        stats = mock.stats()
        assert stats["batch_lines_received"] == 0 and stats["batch_by_model"] == {}
        assert stats["batches_by_status"] == {"failed": 1}


def test_more_lines_than_openai_allows_fail_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mock_batches, "MAX_OPENAI_LINES", 3)
    with serve() as mock:
        ok = create(mock, [line(f"a{i}", chat("x")) for i in range(3)])
        too_many = create(mock, [line(f"b{i}", chat("x")) for i in range(4)])
        assert get(mock, ok)["status"] == "in_progress"
        failed = get(mock, too_many)
        assert failed["status"] == "failed"
        assert [e["code"] for e in failed["errors"]["data"]] == ["too_many_requests"]
        assert mock.stats()["batch_lines_received"] == 3


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"endpoint": "/v1/embeddings"}, 400, "endpoint"),
    ({"completion_window": "48h"}, 400, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    ({"metadata": {"k": 1}}, 400, "metadata"),
    ({"input_file_id": "file-nope"}, 404, "input_file_id"),
    ({"completion_window": None}, 400, "completion_window"),
])
def test_a_create_request_openai_would_refuse_is_refused_at_once(
        change: dict[str, Any], status: int, param: str) -> None:
    with serve() as mock:
        request = {"input_file_id": upload(mock, [line("a", chat("x"))]), "endpoint": ENDPOINT,
                   "completion_window": "24h", **change}
        response = mock.client.post("/v1/batches", headers=OPENAI_HEADERS, json=request)
        assert response.status_code == status
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)
        assert mock.client.get("/v1/batches", headers=OPENAI_HEADERS).json()["data"] == []


def test_uploads_are_checked_kept_on_disk_and_deleted_on_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mock_batches, "MAX_FILE_BYTES", 1000)
    with serve() as mock:
        post = mock.client.post
        too_big = post("/v1/files", headers=OPENAI_HEADERS, data={"purpose": "batch"},
                       files={"file": ("big.jsonl", b"x" * 1001)})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "file"
        assert post("/v1/files", headers=OPENAI_HEADERS, data={"purpose": "fine-tune"},
                    files={"file": ("a.jsonl", b"{}")}).status_code == 400
        assert post("/v1/files", headers=OPENAI_HEADERS,
                    files={"file": ("a.jsonl", b"{}")}).status_code == 400
        assert post("/v1/files", headers=OPENAI_HEADERS, data={"purpose": "batch"}, files={
            "notes": ("notes.txt", b"x")}).json()["error"]["param"] == "file"
        assert post("/v1/files", headers=OPENAI_HEADERS,
                    data={"purpose": "batch"}).status_code == 400  # not multipart
        assert post("/v1/files", headers=OPENAI_HEADERS, json={}).status_code == 400
        directory: Path | None = mock.provider._server.batches._dir
        assert directory is not None and list(directory.iterdir()) == []  # refused: not kept

        content = b'{"custom_id": "a"}\n' * 50  # 950 bytes: just under the limit
        response = post("/v1/files", headers=OPENAI_HEADERS, data={"purpose": "batch"},
                        files={"file": ("ok.jsonl", content)})
        assert response.status_code == 200
        file = response.json()
        assert file["bytes"] == len(content) and file["id"].startswith("file-")
        [stored] = directory.iterdir()
        assert stored.read_bytes() == content  # on disk, byte for byte
        assert mock.client.get(f"/v1/files/{file['id']}/content",
                               headers=OPENAI_HEADERS).content == content
        assert mock.client.get("/v1/files/file-nope", headers=OPENAI_HEADERS).status_code == 404
    assert not directory.exists()


def test_a_deleted_input_file_is_kept_until_its_batch_has_ended() -> None:
    with serve() as mock:
        batch = create(mock, [line(f"a{i}", chat(f"q{i}")) for i in range(5)])
        file_url = f"/v1/files/{batch['input_file_id']}"
        deleted = mock.client.delete(file_url, headers=OPENAI_HEADERS)
        assert deleted.json() == {"id": batch["input_file_id"], "object": "file",
                                  "deleted": True}
        assert mock.client.get(file_url, headers=OPENAI_HEADERS).status_code == 404
        directory = mock.provider._server.batches._dir
        assert directory is not None and len(list(directory.iterdir())) == 1
        mock.clock.now += 10
        assert len(download(mock, get(mock, batch)["output_file_id"])) == 5
        assert [p.name for p in directory.iterdir()] == [f"{batch['id']}_output.jsonl"]


def test_the_enqueued_token_cap_fails_a_batch_per_model_and_key() -> None:
    body = chat("abcd" * 10, max_tokens=60)  # 10 prompt tokens + 60 = 70 tokens a line
    with serve(batch_queue_tokens=700) as mock:
        first = create(mock, [line(f"a{i}", body) for i in range(6)])  # 420
        over = create(mock, [line(f"b{i}", body) for i in range(5)])  # 420 + 350 > 700
        assert get(mock, first)["status"] == "in_progress"
        failed = get(mock, over)
        assert failed["status"] == "failed"
        assert failed["errors"]["data"] == [{
            "code": "token_limit_exceeded", "param": None, "line": None,
            "message": "Enqueued token limit reached for small in organization org-mock. "
                       "Limit: 700 enqueued tokens. Please try again once some in_progress "
                       "batches have been completed."}]
        fits = create(mock, [line(f"c{i}", body) for i in range(4)])  # 420 + 280 = 700
        assert get(mock, fits)["status"] == "in_progress"
        # another model, and another key, have queues of their own
        other_model = create(mock, [line(f"d{i}", {**body, "model": "big"}) for i in range(9)])
        assert get(mock, other_model)["status"] == "in_progress"
        other_key = {"Authorization": "Bearer sk-other-key"}
        theirs = create(mock, [line(f"e{i}", body) for i in range(9)], headers=other_key)
        assert get(mock, theirs, other_key)["status"] == "in_progress"
        # the refused batch's lines were never received
        stats = mock.stats()
        assert stats["batch_lines_received"] == 6 + 4 + 9 + 9
        assert stats["batch_by_model"]["small"]["batch_lines_received"] == 6 + 4 + 9
        mock.clock.now += 10  # the queue drains as batches complete
        again = create(mock, [line(f"b{i}", body) for i in range(5)])
        assert get(mock, again)["status"] == "in_progress"


def test_a_single_batch_over_the_cap_fails_and_max_completion_tokens_counts() -> None:
    with serve(batch_queue_tokens=100) as mock:
        body = chat("abcd", max_tokens=None, max_completion_tokens=100)  # 1 + 100 tokens
        assert get(mock, create(mock, [line("a", body)]))["errors"]["data"][0]["code"] == (
            "token_limit_exceeded")
        assert get(mock, create(mock, [line("b", {**body, "max_completion_tokens": 99})]))[
            "status"] == "in_progress"


def test_expire_share_leaves_lines_unprocessed_and_ends_the_batch_expired() -> None:
    with serve(batch_expire_share=0.3) as mock:
        bodies = {f"row-{i}": chat(f"Question {i}.") for i in range(200)}
        batch = create(mock, [line(cid, body) for cid, body in bodies.items()])
        mock.clock.now += 9.5
        running = get(mock, batch)
        assert running["status"] == "in_progress"  # lines still pending: never finalizing
        assert running["request_counts"]["completed"] < 200
        mock.clock.now += 0.5
        expired = get(mock, batch)
        assert expired["status"] == "expired" and expired["completed_at"] is None
        assert abs(expired["expired_at"] - expired["created_at"] - 10) <= 1
        output = download(mock, expired["output_file_id"])
        errors = download(mock, expired["error_file_id"])
        assert 0.2 < len(errors) / 200 < 0.4
        assert expired["request_counts"] == {"total": 200, "completed": len(output),
                                             "failed": len(errors)}
        assert {r["custom_id"] for r in output} | {r["custom_id"] for r in errors} == set(bodies)
        for row in errors:
            assert row["response"] is None
            assert row["error"] == {"code": "batch_expired", "message": "This request could "
                                    "not be executed before the completion window expired."}
        for row in output[:5]:
            assert answer(row["response"]["body"]) == answer(
                sync(mock, "openai", bodies[row["custom_id"]]).json())
        # a resubmitted expired line gets a new draw: most of them run the second time
        retry = create(mock, [line(r["custom_id"], bodies[r["custom_id"]]) for r in errors])
        mock.clock.now += 10
        assert len(download(mock, get(mock, retry)["output_file_id"])) > len(errors) / 2


def test_line_errors_are_500s_and_a_refused_body_is_its_sync_400() -> None:
    with serve(batch_line_error_rate=0.25) as mock:
        bodies: dict[str, dict[str, Any]] = {f"row-{i}": chat(f"Q {i}") for i in range(200)}
        bodies["bad"] = {"model": "small", "messages": []}
        bodies["stream"] = chat("x", stream=True)
        batch = create(mock, [line(cid, body) for cid, body in bodies.items()])
        mock.clock.now += 10
        done = get(mock, batch)
        assert done["status"] == "completed"
        errors = {r["custom_id"]: r for r in download(mock, done["error_file_id"])}
        output = download(mock, done["output_file_id"])
        assert done["request_counts"] == {"total": 202, "completed": len(output),
                                          "failed": len(errors)}
        for cid in ("bad", "stream"):
            refused = sync(mock, "openai", bodies[cid])
            assert refused.status_code == 400
            response = errors[cid]["response"]
            assert (response["status_code"], errors[cid]["error"]) == (400, None)
            assert response["body"]["error"]["message"] == refused.json()["error"]["message"]
            assert response["body"]["error"]["type"] == "invalid_request_error"
        injected = [r for cid, r in errors.items() if cid not in ("bad", "stream")]
        assert 0.15 < len(injected) / 200 < 0.35
        for row in injected:
            assert row["response"]["status_code"] == 500 and row["error"] is None
            assert row["response"]["body"]["error"]["type"] == "server_error"
            assert row["response"]["request_id"]


def test_cancel_halfway_keeps_the_lines_done_before_it() -> None:
    with serve() as mock:
        bodies = {f"row-{i}": chat(f"Question {i}.") for i in range(100)}
        batch = create(mock, [line(cid, body) for cid, body in bodies.items()])
        mock.clock.now += 5
        completed = get(mock, batch)["request_counts"]["completed"]
        assert 30 < completed < 70
        response = mock.client.post(f"/v1/batches/{batch['id']}/cancel",
                                    headers=OPENAI_HEADERS)
        assert response.status_code == 200
        cancelling = response.json()
        assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
        assert cancelling["request_counts"]["completed"] == completed
        mock.clock.now += 100  # nothing more is processed after the cancel
        cancelled = get(mock, batch)
        assert cancelled["status"] == "cancelled"
        assert cancelled["cancelled_at"] == cancelled["cancelling_at"]
        assert cancelled["request_counts"] == {"total": 100, "completed": completed,
                                               "failed": 100 - completed}
        output = download(mock, cancelled["output_file_id"])
        errors = download(mock, cancelled["error_file_id"])
        assert len(output) == completed
        assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
        assert {r["custom_id"] for r in output} | {r["custom_id"] for r in errors} == set(bodies)
        for row in output:
            assert answer(row["response"]["body"]) == answer(
                sync(mock, "openai", bodies[row["custom_id"]]).json())
        again = mock.client.post(f"/v1/batches/{batch['id']}/cancel", headers=OPENAI_HEADERS)
        assert again.json()["status"] == "cancelled"
        finished = create(mock, [line("z", chat("z"))])
        mock.clock.now += 10
        refused = mock.client.post(f"/v1/batches/{finished['id']}/cancel",
                                   headers=OPENAI_HEADERS)
        assert refused.status_code == 409
        assert mock.stats()["batches_by_status"] == {"cancelled": 1, "completed": 1}


def test_list_pages_newest_first_and_finds_a_lost_batch_by_metadata() -> None:
    with serve() as mock:
        ids = [create(mock, [line("a", chat(f"job {i}"))], metadata={"job": f"j{i}"})["id"]
               for i in range(5)]
        create(mock, [line("a", chat("x"))], metadata={"job": "j3"},
               headers={"Authorization": "Bearer sk-someone-else"})

        def page(**query: Any) -> Any:
            return mock.client.get("/v1/batches", params=query, headers=OPENAI_HEADERS).json()

        first = page(limit=2)
        assert first["object"] == "list" and first["has_more"] is True
        assert [b["id"] for b in first["data"]] == ids[::-1][:2]
        assert (first["first_id"], first["last_id"]) == (ids[4], ids[3])
        last = page(limit=2, after=ids[1])
        assert [b["id"] for b in last["data"]] == [ids[0]] and last["has_more"] is False
        assert [b["id"] for b in page()["data"]] == ids[::-1]  # only this key's batches

        found, after = [], None
        while True:  # what a client that lost the id does
            listing = page(limit=2, **({"after": after} if after else {}))
            found += [b["id"] for b in listing["data"] if b["metadata"] == {"job": "j3"}]
            if not listing["has_more"]:
                break
            after = listing["last_id"]
        assert found == [ids[3]]
        assert mock.client.get("/v1/batches", params={"limit": 0},
                               headers=OPENAI_HEADERS).status_code == 400


# -- Anthropic -------------------------------------------------------------------------------


ANTHROPIC_BODIES = {
    "plain": message("Summarise the quarterly report."),
    "short": message("Write a long essay about routers.", max_tokens=20),
    "mmlu": message("Which is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:"),
    "labels": message("My card was charged twice.", tools=[{
        "name": "label", "input_schema": LABELS}], tool_choice={"type": "tool", "name": "label"}),
    "route": message("Prove 2^10 = 1024.", tools=[{"name": "route_decision",
                     "input_schema": ROUTE}], tool_choice={"type": "tool",
                                                           "name": "route_decision"}),
    "thinking": message("Plan the migration.", max_tokens=3000,
                        thinking={"type": "enabled", "budget_tokens": 1024}),
    "haiku": message("Say hi.", model="claude-haiku", system="Be brief."),
}


def test_message_batch_runs_its_lifecycle_and_answers_as_the_sync_endpoint() -> None:
    with serve() as mock:
        requests = [*ANTHROPIC_BODIES.items(),
                    *((f"row-{i}", message(f"Question {i}.")) for i in range(40))]
        created = create_messages(mock, requests)
        assert (created["type"], created["processing_status"]) == ("message_batch",
                                                                   "in_progress")
        assert created["id"].startswith("msgbatch_") and created["results_url"] is None
        assert created["request_counts"] == {"processing": 47, "succeeded": 0, "errored": 0,
                                             "canceled": 0, "expired": 0}
        assert created["created_at"].endswith("Z") and created["ended_at"] is None
        early = mock.client.get(f"/v1/messages/batches/{created['id']}/results",
                                headers=ANTHROPIC_HEADERS)
        assert early.status_code == 400
        mock.clock.now += 5
        running = get_messages(mock, created)
        assert running["processing_status"] == "in_progress"
        assert 0 < running["request_counts"]["succeeded"] < 47
        assert running["request_counts"]["processing"] == 47 - running["request_counts"][
            "succeeded"]
        mock.clock.now += 5
        ended = get_messages(mock, created)
        assert ended["processing_status"] == "ended" and ended["ended_at"] is not None
        assert ended["request_counts"]["succeeded"] == 47
        rows = results(mock, created)
        assert list(rows) == [cid for cid, _ in requests]
        stats = mock.stats()
        assert stats["prompt_tokens"] == sum(r["message"]["usage"]["input_tokens"]
                                             for r in rows.values())
        assert stats["completion_tokens"] == sum(r["message"]["usage"]["output_tokens"]
                                                 for r in rows.values())
        assert stats["batch_by_model"] == {
            "claude": {"batch_lines_received": 46, "batch_duplicate_custom_ids": 0},
            "claude-haiku": {"batch_lines_received": 1, "batch_duplicate_custom_ids": 0}}
        assert stats["batches_by_status"] == {"ended": 1}
        bodies = dict(requests)
        for cid, result in rows.items():
            assert result["type"] == "succeeded"
            reply = sync(mock, "anthropic", bodies[cid])
            assert reply.status_code == 200
            assert answer(result["message"]) == answer(reply.json()), cid
        assert rows["labels"]["message"]["content"][0]["type"] == "tool_use"
        assert rows["thinking"]["message"]["content"][0]["type"] == "thinking"


@pytest.mark.parametrize(("requests", "message_part"), [
    ([], "non-empty list"),
    ([{"custom_id": "a b", "params": message("x")}], "custom_id"),
    ([{"custom_id": "x" * 65, "params": message("x")}], "custom_id"),
    ([{"custom_id": "a", "params": message("x")}, {"custom_id": "a", "params": message("y")}],
     "unique"),
    ([{"custom_id": "a"}], "params"),
    ("nope", "non-empty list"),
])
def test_a_message_batch_anthropic_would_refuse_is_a_400(requests: Any,
                                                         message_part: str) -> None:
    with serve() as mock:
        response = mock.client.post("/v1/messages/batches", headers=ANTHROPIC_HEADERS,
                                    json={"requests": requests})
        assert response.status_code == 400
        error = response.json()
        assert (error["type"], error["error"]["type"]) == ("error", "invalid_request_error")
        assert message_part in error["error"]["message"]
        assert mock.stats()["batch_lines_received"] == 0


def test_message_batch_limits_on_requests_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mock_batches, "MAX_MESSAGE_REQUESTS", 2)
    monkeypatch.setattr(mock_batches, "MAX_MESSAGE_BATCH_BYTES", 2000)
    with serve() as mock:
        three = [(f"a{i}", message("x")) for i in range(3)]
        response = mock.client.post("/v1/messages/batches", headers=ANTHROPIC_HEADERS, json={
            "requests": [{"custom_id": c, "params": p} for c, p in three]})
        assert response.status_code == 400 and "at most 2" in response.json()["error"]["message"]
        big = [("a", message("x" * 3000))]
        response = mock.client.post("/v1/messages/batches", headers=ANTHROPIC_HEADERS, json={
            "requests": [{"custom_id": c, "params": p} for c, p in big]})
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "request_too_large"
        assert create_messages(mock, three[:2])["request_counts"]["processing"] == 2


def test_message_batch_expired_errored_and_canceled_results() -> None:
    with serve(batch_expire_share=0.25, batch_line_error_rate=0.25) as mock:
        requests = [(f"row-{i}", message(f"Question {i}.")) for i in range(200)]
        requests.append(("bad", {"model": "claude", "messages": [{"role": "user",
                                                                  "content": "x"}]}))
        batch = create_messages(mock, requests)
        mock.clock.now += 9.9
        counts = get_messages(mock, batch)["request_counts"]
        assert counts["expired"] == 0 and counts["processing"] > 0.15 * 200  # still pending
        mock.clock.now += 0.1
        ended = get_messages(mock, batch)
        rows = results(mock, batch)
        kinds = [r["type"] for r in rows.values()]
        assert ended["request_counts"] == {
            "processing": 0, "succeeded": kinds.count("succeeded"),
            "errored": kinds.count("errored"), "canceled": 0, "expired": kinds.count("expired")}
        assert 0.15 < kinds.count("expired") / 201 < 0.35
        assert 0.1 < kinds.count("errored") / 201 < 0.3
        for cid, row in rows.items():
            if row["type"] == "expired":
                assert row == {"type": "expired"}
            elif row["type"] == "errored" and cid != "bad":
                assert row["error"] == {"type": "error", "error": {
                    "type": "api_error", "message": row["error"]["error"]["message"]}}
        if rows["bad"]["type"] != "expired":  # the refused body errors with its sync 400
            refused = sync(mock, "anthropic", dict(requests)["bad"])
            assert refused.status_code == 400
            assert rows["bad"]["error"]["error"] == refused.json()["error"]

    with serve() as mock:
        requests = [(f"row-{i}", message(f"Question {i}.")) for i in range(100)]
        batch = create_messages(mock, requests)
        mock.clock.now += 5
        succeeded = get_messages(mock, batch)["request_counts"]["succeeded"]
        assert 30 < succeeded < 70
        response = mock.client.post(f"/v1/messages/batches/{batch['id']}/cancel",
                                    headers=ANTHROPIC_HEADERS)
        canceling = response.json()
        assert canceling["processing_status"] == "canceling"
        assert canceling["cancel_initiated_at"] is not None
        mock.clock.now += 100
        ended = get_messages(mock, batch)
        assert ended["processing_status"] == "ended"
        assert ended["ended_at"] == canceling["cancel_initiated_at"]
        assert ended["request_counts"] == {"processing": 0, "succeeded": succeeded,
                                           "errored": 0, "canceled": 100 - succeeded,
                                           "expired": 0}
        rows = results(mock, batch)
        assert [r["type"] for r in rows.values()].count("succeeded") == succeeded
        assert {r["type"] for r in rows.values()} == {"succeeded", "canceled"}
        bodies = dict(requests)
        for cid, row in rows.items():
            if row["type"] == "succeeded":
                assert answer(row["message"]) == answer(sync(mock, "anthropic",
                                                             bodies[cid]).json())
        finished = create_messages(mock, requests[:1])
        mock.clock.now += 10
        assert mock.client.post(f"/v1/messages/batches/{finished['id']}/cancel",
                                headers=ANTHROPIC_HEADERS).status_code == 400


def test_message_batch_list_pages_both_ways() -> None:
    with serve() as mock:
        ids = [create_messages(mock, [("a", message(f"job {i}"))])["id"] for i in range(5)]

        def page(**query: Any) -> Any:
            return mock.client.get("/v1/messages/batches", params=query,
                                   headers=ANTHROPIC_HEADERS).json()

        first = page(limit=2)
        assert [b["id"] for b in first["data"]] == [ids[4], ids[3]] and first["has_more"]
        assert (first["first_id"], first["last_id"]) == (ids[4], ids[3])
        older = page(limit=2, after_id=ids[3])
        assert [b["id"] for b in older["data"]] == [ids[2], ids[1]] and older["has_more"]
        newer = page(limit=2, before_id=ids[1])
        assert [b["id"] for b in newer["data"]] == [ids[3], ids[2]] and newer["has_more"]
        assert not page(limit=2, before_id=ids[2])["has_more"]
        assert [b["id"] for b in page()["data"]] == ids[::-1]


# -- both wires ------------------------------------------------------------------------------


def test_the_duplicate_counter_counts_each_resubmitted_custom_id_once() -> None:
    with serve() as mock:
        create(mock, [line(cid, chat(cid)) for cid in ("a", "b", "c")])
        assert mock.stats()["batch_duplicate_custom_ids"] == 0
        create(mock, [line("b", chat("b")), line("d", chat("d"))])  # b again, same model
        assert mock.stats()["batch_duplicate_custom_ids"] == 1
        create_messages(mock, [("c", message("c")), ("e", message("e"))])  # c on the other wire
        create(mock, [line("b", chat("b"))])  # a third time: still one duplicate custom_id
        other_key = {"Authorization": "Bearer sk-other"}
        create(mock, [line("f", chat("f"))], headers=other_key)
        create(mock, [line("f", chat("f", model="big"))], headers=other_key)
        stats = mock.stats()
        assert stats["batch_lines_received"] == 3 + 2 + 2 + 1 + 1 + 1
        assert stats["batch_duplicate_custom_ids"] == 3  # b, c, f
        assert stats["batch_by_model"] == {
            "small": {"batch_lines_received": 7, "batch_duplicate_custom_ids": 1},  # b
            "claude": {"batch_lines_received": 2, "batch_duplicate_custom_ids": 0},
            "big": {"batch_lines_received": 1, "batch_duplicate_custom_ids": 0}}
        by_key = stats["batch_by_key"]
        assert sorted(v["batch_lines_received"] for v in by_key.values()) == [2, 8]
        assert sorted(v["batch_duplicate_custom_ids"] for v in by_key.values()) == [1, 2]
        assert KEY not in json.dumps(stats) and "sk-other" not in json.dumps(stats)
        assert stats == mock.provider.stats()


def test_batch_endpoints_authenticate_as_the_sync_endpoints() -> None:
    with serve(api_key=KEY, expired_keys=frozenset({"sk-old"})) as mock:
        file_id = upload(mock, [line("a", chat("x"))])
        batch = create(mock, [line("a", chat("x"))])
        calls = [("POST", "/v1/files", "openai"), ("GET", f"/v1/files/{file_id}", "openai"),
                 ("GET", f"/v1/files/{file_id}/content", "openai"),
                 ("POST", "/v1/batches", "openai"), ("GET", "/v1/batches", "openai"),
                 ("GET", f"/v1/batches/{batch['id']}", "openai"),
                 ("POST", f"/v1/batches/{batch['id']}/cancel", "openai"),
                 ("POST", "/v1/messages/batches", "anthropic"),
                 ("GET", "/v1/messages/batches", "anthropic"),
                 ("GET", "/v1/messages/batches/msgbatch_x", "anthropic"),
                 ("GET", "/v1/messages/batches/msgbatch_x/results", "anthropic")]
        for method, path, wire in calls:
            for key in (None, "sk-wrong", "sk-old"):
                headers = ({"Authorization": f"Bearer {key}"} if wire == "openai" else
                           {"x-api-key": key, "anthropic-version": "2023-06-01"}) if key else (
                    {} if wire == "openai" else {"anthropic-version": "2023-06-01"})
                response = mock.client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, key)
                assert KEY not in response.text
                if key == "sk-old":
                    assert "expired" in response.text
            if wire == "anthropic":
                response = mock.client.request(method, path, headers={"x-api-key": KEY})
                assert response.status_code == 400 and "anthropic-version" in response.text
        assert get(mock, batch)["status"] == "in_progress"  # nothing was cancelled
        assert mock.stats()["by_status"]["401"] == len(calls) * 3


def test_one_key_cannot_see_another_keys_batches_or_files() -> None:
    with serve() as mock:
        batch = create(mock, [line("a", chat("x"))])
        theirs = {"Authorization": "Bearer sk-not-mine"}
        for path in (f"/v1/batches/{batch['id']}", f"/v1/files/{batch['input_file_id']}",
                     f"/v1/files/{batch['input_file_id']}/content"):
            assert mock.client.get(path, headers=theirs).status_code == 404
        assert mock.client.post(f"/v1/batches/{batch['id']}/cancel",
                                headers=theirs).status_code == 404
        response = mock.client.post("/v1/batches", headers=theirs, json={
            "input_file_id": batch["input_file_id"], "endpoint": ENDPOINT,
            "completion_window": "24h"})
        assert response.status_code == 404
        msg = create_messages(mock, [("a", message("x"))])
        assert mock.client.get(f"/v1/messages/batches/{msg['id']}", headers={
            "x-api-key": "sk-not-mine", "anthropic-version": "2023-06-01"}).status_code == 404
        # and a wire's ids are not the other's
        assert mock.client.get(f"/v1/batches/{msg['id']}",
                               headers=OPENAI_HEADERS).status_code == 404


def test_a_zero_delay_batch_is_done_at_the_first_read() -> None:
    with serve(batch_delay_s=0) as mock:
        batch = create(mock, [line("a", chat("x"))])
        assert get(mock, batch)["status"] == "completed"
        ended = create_messages(mock, [("a", message("x"))])
        assert ended["processing_status"] == "ended"
        assert results(mock, ended)["a"]["type"] == "succeeded"


def test_batch_switches_are_config_fields_and_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute.devtools import mock_provider

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["mock-provider"])
    assert (args.batch_delay_s, args.batch_expire_share, args.batch_line_error_rate,
            args.batch_queue_tokens) == (2.0, 0.0, 0.0, None)
    args = parser.parse_args(["mock-provider", "--batch-delay-s", "30", "--batch-expire-share",
                              "0.1", "--batch-line-error-rate", "0.05",
                              "--batch-queue-tokens", "90000"])
    served: list[MockProviderConfig] = []
    monkeypatch.setattr(mock_provider, "serve_forever", served.append)
    assert args.func(args) == 0
    config = served[0]
    assert (config.batch_delay_s, config.batch_expire_share, config.batch_line_error_rate,
            config.batch_queue_tokens) == (30.0, 0.1, 0.05, 90_000)
    for flag, value in (("--batch-delay-s", "-1"), ("--batch-expire-share", "1.5"),
                        ("--batch-line-error-rate", "2"), ("--batch-queue-tokens", "-5")):
        with pytest.raises(SystemExit):
            parser.parse_args(["mock-provider", flag, value])
    for field, bad in (("batch_delay_s", -1.0), ("batch_delay_s", float("inf")),
                       ("batch_expire_share", 1.5), ("batch_line_error_rate", -0.1),
                       ("batch_queue_tokens", -1)):
        with pytest.raises(ConfigError, match=field):
            MockProviderConfig(**{field: bad})
