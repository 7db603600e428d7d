"""The llm router's building blocks through their seam: a fake ``ask`` that answers ROUTED
tables with RESULTS tables, a cache folder in tmp_path, and an httpx handler for the
in-process dispatcher. No network, no Ray."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import config, schemas
from batchroute.errors import ConfigError
from batchroute.routers.llm import (
    DEFAULT_LABELS,
    SYSTEM_PROMPT,
    DecisionCache,
    LLMRouter,
    ask_in_process,
    decision_schema,
    parse_decisions,
    prompt_keys,
    routing_output,
)
from tests.helpers import CHEAP, MID, STRONG, job_doc, key_echoes, key_fragments

MAPPING = {"easy": CHEAP, "medium": MID, "hard": STRONG}
KEY = "sk-llm-route-secret-9876"


class FakeAsk:
    """Answers each routing row with ``answer(user_text)``; a None answer is a failed call.
    Records every table it was handed; replies in reverse order (the seam promises rows,
    not order)."""

    def __init__(self, answer: Callable[[str], str | None], cost: int = 7) -> None:
        self.answer = answer
        self.cost = cost
        self.tables: list[pa.Table] = []

    @property
    def asked(self) -> list[str]:
        return [m[1]["content"] for t in self.tables for m in t.column("messages").to_pylist()]

    def __call__(self, routed: pa.Table) -> pa.Table:
        assert routed.schema.equals(schemas.ROUTED)  # metadata aside
        self.tables.append(routed)
        n = routed.num_rows
        replies = [self.answer(m[1]["content"]) for m in routed.column("messages").to_pylist()]
        ok = [r is not None for r in replies]
        cols: dict[str, Any] = {f.name: pa.nulls(n, f.type) for f in schemas.RESULTS}
        cols.update(
            request_id=routed.column("request_id"), run_id=pa.array(["run"] * n),
            model=routed.column("model"),
            status=pa.array(["ok" if o else "failed" for o in ok]),
            response=pa.array(replies, pa.string()),
            input_tokens=pa.array([40 if o else 0 for o in ok], pa.int64()),
            cached_input_tokens=pa.array([0] * n, pa.int64()),
            output_tokens=pa.array([6 if o else 0 for o in ok], pa.int64()),
            cost_micro_usd=pa.array([self.cost if o else 0 for o in ok], pa.int64()),
            cost_usd=pa.array([self.cost / 1e6 if o else 0.0 for o in ok]),
            attempts=pa.array([1] * n, pa.int32()),
            error_type=pa.array([None if o else "transient" for o in ok], pa.string()),
            error_message=pa.array([None if o else "HTTP 500: boom" for o in ok], pa.string()),
            finished_at=pa.array([0] * n, schemas.TIMESTAMP))
        table = pa.table(cols, schema=schemas.RESULTS)
        return table.take(pa.array(np.arange(n)[::-1]))


def by_word(text: str) -> str | None:
    """easy/medium/hard when the prompt says so; 'garbage' gets prose, 'down' a failed call."""
    if "down" in text:
        return None
    if "garbage" in text:
        return "I would say it is hard."
    for label in ("hard", "medium"):
        if label in text:
            return json.dumps({"difficulty": label})
    return '```json\n{"difficulty": "easy"}\n```'


def router(ask: Callable[[pa.Table], pa.Table], cache: DecisionCache | None = None,
           **kw: Any) -> LLMRouter:
    return LLMRouter(model=CHEAP, labels_to_models=MAPPING, default=STRONG, ask=ask,
                     cache=cache, **kw)


# -- schema, keys, parsing ------------------------------------------------------------------


def test_decision_schema_is_strict_and_lists_the_labels() -> None:
    assert decision_schema() == {
        "type": "object", "properties": {"difficulty": {"type": "string",
                                                        "enum": list(DEFAULT_LABELS)}},
        "required": ["difficulty"], "additionalProperties": False}
    assert decision_schema(["low", "high"])["properties"]["difficulty"]["enum"] == ["low", "high"]
    for bad in ([], ["a", "a"], ["a", " "]):
        with pytest.raises(ConfigError, match="labels"):
            decision_schema(bad)


def test_prompt_keys_are_stable_sha256_per_text_model_and_labels() -> None:
    texts = pa.array(["What is 2+2?", None, "What is 2+2?", "Other"])
    keys = prompt_keys(texts, model="m").to_pylist()
    assert keys[1] is None and keys[0] == keys[2] != keys[3]
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys if k)
    assert prompt_keys(texts, model="m").to_pylist() == keys  # stable
    assert prompt_keys(texts, model="other").to_pylist()[0] != keys[0]
    assert prompt_keys(texts, model="m", labels=["a", "b"]).to_pylist()[0] != keys[0]
    assert prompt_keys(pa.chunked_array([texts]), model="m").to_pylist() == keys


@pytest.mark.parametrize(("answer", "label"), [
    ('{"difficulty":"hard"}', "hard"),
    ('  \n{"difficulty": "easy"}\n ', "easy"),
    ('```json\n{"difficulty": "medium"}\n```', "medium"),
    ('```\n{"difficulty": "medium"}```', "medium"),
    ("hard", None),
    ('"hard"', None),
    ('{"difficulty": "ha', None),
    ('{"difficulty": "trivial"}', None),
    ('{"difficulty": 2}', None),
    ('{"level": "hard"}', None),
    ('[{"difficulty": "hard"}]', None),
    ("", None),
    (None, None),
])
def test_parse_decisions_tolerates_fences_and_rejects_everything_else(
        answer: str | None, label: str | None) -> None:
    labels, failed, errors = parse_decisions(pa.array([answer], pa.string()), DEFAULT_LABELS)
    assert labels[0] == label
    assert failed[0] == (label is None)
    assert (errors[0] is None) == (label is not None)
    # lists work too, and the answer is never cut into a long error
    assert parse_decisions([answer], DEFAULT_LABELS)[0][0] == label


def test_parse_error_quotes_only_a_short_prefix() -> None:
    _, _, errors = parse_decisions(["x" * 10_000], DEFAULT_LABELS)
    assert errors[0].startswith("not JSON") and len(errors[0]) < 100


# -- the router -----------------------------------------------------------------------------


def test_decisions_map_labels_to_models_and_cost_what_was_asked() -> None:
    ask = FakeAsk(by_word)
    d = router(ask).decide(pa.array(["a hard one", "plain", "medium rare"]))
    assert d.label.tolist() == ["hard", "easy", "medium"]
    assert d.model.tolist() == [STRONG, CHEAP, MID]
    assert not d.fallback.any() and not d.cached.any()
    assert d.cost_micro_usd.tolist() == [7, 7, 7] and d.cost_micro_usd.dtype == np.int64
    assert (d.parse_failures, d.call_failures, d.cache_hits, d.asked) == (0, 0, 0, 3)
    assert d.error.tolist() == [None] * 3


def test_parse_failures_fall_back_to_the_default_and_are_counted() -> None:
    ask = FakeAsk(by_word)
    r = LLMRouter(model=CHEAP, labels_to_models={"easy": CHEAP, "hard": MID}, default=STRONG,
                  ask=ask, cache=None)
    d = r.decide(pa.array(["garbage in", "plain", "medium rare", "garbage in"]))
    # "medium" is not one of this router's labels: a parse failure like prose is
    assert d.label.tolist() == [None, "easy", None, None]
    assert d.model.tolist() == [STRONG, CHEAP, STRONG, STRONG]
    assert d.fallback.tolist() == [True, False, True, True]
    assert (d.parse_failures, d.call_failures) == (3, 0)
    assert d.error[0].startswith("not JSON") and "not one of the labels" in d.error[2]
    # the failed answers were paid for all the same
    assert d.cost_micro_usd.tolist() == [7, 7, 7, 0]


def test_failed_calls_fall_back_and_are_counted_apart() -> None:
    d = router(FakeAsk(by_word)).decide(pa.array(["server down", "hard", "server down"]))
    assert d.model.tolist() == [STRONG, STRONG, STRONG]
    assert d.fallback.tolist() == [True, False, True]
    assert (d.parse_failures, d.call_failures) == (0, 2)
    assert d.error[0] == "routing call transient: HTTP 500: boom"


def test_an_ask_that_raises_sends_every_asked_row_to_the_default() -> None:
    def dead(routed: pa.Table) -> pa.Table:
        raise RuntimeError(f"actor died holding {KEY}")

    d = router(dead).decide(pa.array(["a", "b", None]))
    assert d.model.tolist() == [STRONG] * 3 and d.fallback.all()
    assert d.call_failures == 2 and d.cost_micro_usd.sum() == 0
    assert d.error.tolist() == ["routing call failed: RuntimeError"] * 2 + ["no prompt text"]


def test_duplicates_in_a_batch_are_asked_once_and_paid_once() -> None:
    ask = FakeAsk(by_word)
    texts = pa.chunked_array([["hard", "easy", "hard"], ["hard", None, "easy"]])
    d = router(ask).decide(texts)
    assert sorted(ask.asked) == ["easy", "hard"]
    assert d.label.tolist() == ["hard", "easy", "hard", "hard", None, "easy"]
    assert d.cost_micro_usd.tolist() == [7, 7, 0, 0, 0, 0]
    assert d.asked == 2 and d.fallback.tolist() == [False] * 4 + [True, False]


def test_null_texts_get_the_default_without_a_call() -> None:
    ask = FakeAsk(by_word)
    d = router(ask).decide(pa.array([None, None], pa.string()))
    assert ask.tables == [] and d.model.tolist() == [STRONG, STRONG]
    assert d.fallback.all() and d.asked == 0 and d.parse_failures == d.call_failures == 0
    empty = router(ask).decide(pa.array([], pa.string()))
    assert len(empty.label) == 0 and empty.asked == 0


def test_cache_hits_cost_nothing_and_are_not_asked_again(tmp_path: Path) -> None:
    folder = str(tmp_path / "cache")
    first = FakeAsk(by_word)
    r = router(first, DecisionCache(folder))
    d1 = r.decide(pa.array(["hard", "plain", "garbage", "server down"]))
    assert d1.cost_micro_usd.sum() == 21
    # the same router finds its own decisions before they are written
    d2 = r.decide(pa.array(["hard", "plain"]))
    assert d2.cached.all() and d2.cost_micro_usd.sum() == 0 and len(first.tables) == 1
    r.close()
    assert len(list((tmp_path / "cache").glob("part-*.parquet"))) == 1

    # a later run (a new instance on the same folder) pays only for what was not decided
    again = FakeAsk(by_word)
    d3 = router(again, DecisionCache(folder)).decide(
        pa.array(["hard", "plain", "garbage", "server down", "medium"]))
    assert d3.cached.tolist() == [True, True, False, False, False]
    assert d3.label.tolist() == ["hard", "easy", None, None, "medium"]
    assert d3.cost_micro_usd.tolist() == [0, 0, 7, 0, 7]
    assert d3.cache_hits == 2 and d3.asked == 3
    # failures were not cached, so they are asked again
    assert sorted(again.asked) == ["garbage", "medium", "server down"]


def test_cache_keys_include_the_routing_model(tmp_path: Path) -> None:
    folder = str(tmp_path / "cache")
    r = router(FakeAsk(by_word), DecisionCache(folder))
    r.decide(pa.array(["hard"]))
    r.close()
    other = FakeAsk(by_word)
    LLMRouter(model=MID, labels_to_models=MAPPING, default=STRONG, ask=other,
              cache=DecisionCache(folder)).decide(pa.array(["hard"]))
    assert other.asked == ["hard"]


def test_routing_rows_are_routed_schema_with_system_and_user_messages() -> None:
    ask = FakeAsk(by_word)
    r = LLMRouter(model=CHEAP, labels_to_models={"low": CHEAP, "high": STRONG},
                  default=STRONG, ask=ask, cache=None, max_tokens=12, max_prompt_chars=5)
    r.decide(pa.array(["hard question, long", "easy"], pa.large_string()))
    [table] = ask.tables
    rows = table.to_pylist()
    assert [r["messages"] for r in rows] == [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": c}]
        for c in ("hard ", "easy")]
    assert {(r["model"], r["max_tokens"], r["est_output_tokens"]) for r in rows} == {
        (CHEAP, 12, 12)}
    assert len({r["request_id"] for r in rows}) == 2
    assert all(r["est_input_tokens"] > 50 for r in rows)  # system prompt and schema count
    output = routing_output(table)
    assert output.name == "route_decision"
    assert output.schema == decision_schema(["low", "high"])
    # a table without the metadata asks with the default labels
    assert routing_output(table.replace_schema_metadata(None)).schema == decision_schema()


def test_bad_router_configuration_is_refused() -> None:
    with pytest.raises(ConfigError):
        LLMRouter(model=CHEAP, labels_to_models={}, default=STRONG, ask=FakeAsk(by_word),
                  cache=None)
    with pytest.raises(ConfigError):
        router(FakeAsk(by_word), max_tokens=0)


# -- the cache ------------------------------------------------------------------------------


def test_cache_none_caches_nothing() -> None:
    cache = DecisionCache(None)
    keys = prompt_keys(pa.array(["a"]))
    cache.add(keys, ["easy"])
    assert cache.lookup(keys).tolist() == [None] and cache.flush() is None and len(cache) == 0


def test_cache_parts_are_committed_atomically_and_read_together(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    keys = prompt_keys(pa.array([f"p{i}" for i in range(10)]))
    a, b = DecisionCache(str(folder)), DecisionCache(str(folder))
    a.add(keys.slice(0, 6), ["easy"] * 6, model=CHEAP, cost_micro_usd=[3] * 6)
    b.add(keys.slice(4, 6), ["hard"] * 6, model=CHEAP)  # overlaps a's on p4, p5
    assert a.flush() != b.flush()
    assert a.flush() is None  # nothing left buffered
    # a crashed writer's temp file and stray files are not read
    (folder / "_tmp-part-x.parquet").write_bytes(b"PAR1 half a file")
    (folder / "notes.txt").write_text("hello")
    reader = DecisionCache(str(folder))
    got = reader.lookup(pa.array([*keys.to_pylist(), None, "0" * 64], pa.string()))
    assert got[:4].tolist() == ["easy"] * 4 and got[6:10].tolist() == ["hard"] * 4
    assert set(got[4:6]) <= {"easy", "hard"}  # decided twice: either is fine
    assert got[10:].tolist() == [None, None]
    assert len(reader) == 10
    part = pq.read_table(a_part := sorted(folder.glob("part-*.parquet"))[0])
    assert part.schema.names == ["key", "label", "model", "cost_micro_usd", "decided_at"]
    assert a_part.name.startswith("part-")


def test_cache_writes_when_its_buffer_fills(tmp_path: Path) -> None:
    cache = DecisionCache(str(tmp_path), flush_rows=3)
    cache.add(prompt_keys(pa.array(["a", "b"])), ["easy", "hard"])
    assert list(tmp_path.glob("part-*")) == []
    cache.add(prompt_keys(pa.array(["c"])), ["easy"])
    assert len(list(tmp_path.glob("part-*"))) == 1


def test_concurrent_writers_never_corrupt_the_cache(tmp_path: Path) -> None:
    folder = str(tmp_path / "shared")
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            cache = DecisionCache(folder, flush_rows=25)
            for start in range(0, 200, 50):
                texts = pa.array([f"w{w}-{i}" for i in range(start, start + 50)])
                cache.add(prompt_keys(texts), ["medium"] * 50)
            cache.flush()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reader = DecisionCache(folder)
    assert len(reader) == 6 * 200
    assert all(p.name.startswith("part-") for p in (tmp_path / "shared").iterdir())
    keys = prompt_keys(pa.array([f"w{w}-{i}" for w in range(6) for i in range(200)]))
    assert set(reader.lookup(keys).tolist()) == {"medium"}


# -- asking in process (the dispatcher behind an httpx handler) -------------------------------


def _in_process(handler: Callable[[httpx.Request], httpx.Response], model: str = CHEAP) -> Any:
    job = config.parse(job_doc("http://provider.test/v1"))
    return ask_in_process(job.models[model], job.dispatch, KEY,
                          transport=httpx.MockTransport(handler))


def test_ask_in_process_sends_structured_output_and_keeps_one_dispatcher() -> None:
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        seen.append(body)
        hard = "hard" in body["messages"][1]["content"]
        return httpx.Response(200, json={
            "choices": [{"message": {"content": json.dumps(
                {"difficulty": "hard" if hard else "easy"})}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 8}})

    with _in_process(handler) as ask:
        r = router(ask)
        d = r.decide(pa.array(["hard", "plain"]))
        d2 = r.decide(pa.array(["another"]))
        assert ask.stats.asked == 3 and ask.stats.done == 0  # one dispatcher throughout
    assert d.model.tolist() == [STRONG, CHEAP] and d2.model.tolist() == [CHEAP]
    cheap = config.parse(job_doc()).models[CHEAP]
    assert d.cost_micro_usd.tolist() == [cheap.cost_micro_usd(100, 8)] * 2
    fmt = seen[0]["response_format"]
    assert fmt["json_schema"]["name"] == "route_decision"
    assert fmt["json_schema"]["schema"] == decision_schema(list(MAPPING))
    assert seen[0]["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}


@pytest.mark.parametrize("form", ["verbatim", "upper", "middle", "json"])
def test_secrets_never_reach_decision_errors(form: str) -> None:
    def echo(req: httpx.Request) -> httpx.Response:  # a provider that echoes the bad key
        return httpx.Response(400, json={"error": {"message": key_echoes(KEY)[form]}})

    with _in_process(echo, MID) as ask:
        d = router(ask).decide(pa.array(["one", "two"]))
    assert d.call_failures == 2 and d.model.tolist() == [STRONG, STRONG]
    assert all(key_fragments(e, KEY) == [] and "***" in e for e in d.error)
    assert all(key_fragments(str(v), KEY) == [] for v in vars(d).values())
