"""The llm router against the mock provider over loopback HTTP: both wire formats return the
structured decision, labels are deterministic, tokens and cost are real, and spoiled answers
are counted and fall back. The first tests start their own provider and need no Ray; the last
goes through a real dispatch actor in the shared Ray session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batchroute import config
from batchroute.config import JobConfig
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.routers.llm import DecisionCache, LLMDecisions, LLMRouter, ask_in_process
from tests.helpers import CHEAP, MID, STRONG, job_doc

pytestmark = pytest.mark.integration

KEY = "sk-llm-route-integration-5555"
MAPPING = {"easy": CHEAP, "medium": MID, "hard": STRONG}
PROMPTS = [f"Case {i}: " + "weigh the evidence for and against the claim " * (i % 11 * 2)
           + "17*23+4=" * (i % 5 * 2) for i in range(80)]


@pytest.fixture
def mock() -> Iterator[MockProvider]:
    with MockProvider(MockProviderConfig(api_key=KEY, latency_ms=1.0)) as p:
        yield p


def _job(provider: MockProvider) -> JobConfig:
    return config.parse(job_doc(provider.url + "/v1"))


def _decide(job: JobConfig, model: str, texts: list[str],
            cache: DecisionCache | None = None) -> tuple[LLMDecisions, Any]:
    with ask_in_process(job.models[model], job.dispatch, KEY) as ask:
        r = LLMRouter(model=model, labels_to_models=MAPPING, default=STRONG, ask=ask,
                      cache=cache)
        d = r.decide(pa.array(texts))
        r.close()
        return d, ask.stats


@pytest.mark.parametrize("model", [CHEAP, MID])  # OpenAI wire, Anthropic wire
def test_both_wires_return_the_structured_decision_with_real_tokens_and_cost(
        mock: MockProvider, model: str) -> None:
    job = _job(mock)
    with ask_in_process(job.models[model], job.dispatch, KEY) as ask:
        seen: list[pa.Table] = []

        def spy(routed: pa.Table) -> pa.Table:
            out = ask(routed)
            seen.append(out)
            return out

        d = LLMRouter(model=model, labels_to_models=MAPPING, default=STRONG, ask=spy,
                      cache=None).decide(pa.array(PROMPTS))
    [results] = seen
    rows = results.to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    assert all(json.loads(r["response"])["difficulty"] in MAPPING for r in rows)
    assert {r["finish_reason"] for r in rows} == {"stop" if model == CHEAP else "tool_calls"}
    assert all(r["input_tokens"] > 50 and r["output_tokens"] > 0 for r in rows)
    price = job.models[model]
    assert [r["cost_micro_usd"] for r in rows] == [
        price.cost_micro_usd(r["input_tokens"], r["output_tokens"]) for r in rows]
    assert not d.fallback.any() and d.parse_failures == d.call_failures == 0
    assert (d.cost_micro_usd > 0).all() and d.asked == len(PROMPTS)
    assert set(d.label) == set(MAPPING)  # the simulated judgement uses every label
    assert [MAPPING[x] for x in d.label] == d.model.tolist()


def test_labels_are_deterministic_and_the_same_on_both_wires(mock: MockProvider) -> None:
    job = _job(mock)
    openai, _ = _decide(job, CHEAP, PROMPTS)
    anthropic, _ = _decide(job, MID, PROMPTS)
    with MockProvider(MockProviderConfig(api_key=KEY, seed=5)) as other:
        again, _ = _decide(_job(other), CHEAP, PROMPTS)
    assert openai.label.tolist() == anthropic.label.tolist() == again.label.tolist()


def test_garbage_answers_are_counted_fall_back_and_are_not_cached(tmp_path: Path) -> None:
    with MockProvider(MockProviderConfig(api_key=KEY, route_garbage_rate=0.3)) as p:
        job = _job(p)
        folder = str(tmp_path / "decisions")
        for model in (CHEAP, MID):
            d, stats = _decide(job, model, PROMPTS, DecisionCache(folder + model))
            assert 10 < d.parse_failures < 40 and d.call_failures == 0
            assert d.fallback.sum() == d.parse_failures
            assert set(d.model[d.fallback]) == {STRONG} and set(d.label[d.fallback]) == {None}
            assert all(e for e in d.error[d.fallback])
            assert (d.cost_micro_usd > 0).all()  # spoiled answers are paid for too
            assert stats.asked == len(PROMPTS) and stats.asked_failed == 0

            # the rerun (a backfill) pays only for the prompts that had no decision
            d2, stats2 = _decide(job, model, PROMPTS, DecisionCache(folder + model))
            assert d2.cache_hits == len(PROMPTS) - d.parse_failures
            assert stats2.asked == d.parse_failures == d2.parse_failures
            assert d2.cost_micro_usd[d2.cached].sum() == 0
            assert d2.label.tolist() == d.label.tolist()


def test_the_dispatch_actor_answers_routing_calls(
        provider: MockProvider, ray_session: None, tmp_path: Path) -> None:
    import ray

    from batchroute.job.cluster import _DispatchActor
    from batchroute.stages.sink import RunFolder

    job = config.parse(job_doc(provider.url + "/v1"))
    actor = ray.remote(num_cpus=0)(_DispatchActor).remote(job.models[MID], job.dispatch,
                                                          RunFolder(str(tmp_path), "r"),
                                                          job.task)

    def ask(routed: pa.Table) -> pa.Table:
        result: pa.Table = ray.get(actor.ask_route.remote(routed))
        return result

    labels = {"simple": CHEAP, "complex": STRONG}
    router = LLMRouter(model=MID, labels_to_models=labels, default=STRONG, ask=ask, cache=None)
    try:
        d = router.decide(pa.array(PROMPTS[:30]))
        stats = ray.get(actor.stats.remote())
    finally:
        ray.kill(actor)
    # The labels' schema crossed the process boundary in the table's metadata.
    assert set(d.label) - {None} == {"simple", "complex"}
    assert d.parse_failures == 0 and d.call_failures <= 1  # the session provider fails 2%
    assert stats["asked"] == 30 and stats["done"] == 0 and stats["asked_cost_usd"] > 0
