"""The dispatcher's real transport (httpx over aiohttp) against the mock's fault switches."""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
import pytest

from batchroute import config
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from tests.helpers import CHEAP, MID, job_doc, routed_rows

pytestmark = pytest.mark.integration
KEY = "sk-fault-test-key-000"


def _routed(n: int) -> pa.Table:
    return routed_rows(n, prefix="f", text="fault question")


def _dispatch(cfg: MockProviderConfig, n: int, model: str = CHEAP,
              **dispatch: Any) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    with MockProvider(cfg) as p:
        doc = job_doc(p.url + "/v1")
        doc["dispatch"].update(dispatch)
        doc["models"][model]["timeout_s"] = 0.5
        job = config.parse(doc)

        async def go() -> tuple[pa.Table, Any]:
            d = ModelDispatcher(job.models[model], job.dispatch, run_id="f", api_key=KEY)
            try:
                return await d.dispatch(_routed(n)), d.stats
            finally:
                await d.aclose()

        table, stats = asyncio.run(go())
        return table.to_pylist(), p.stats(), stats


@pytest.mark.parametrize("model", [CHEAP, MID])  # OpenAI and Anthropic wire formats
def test_every_fault_ends_as_one_row(model: str) -> None:
    cfg = MockProviderConfig(api_key=KEY, fail_rate=0.1, rate_503=0.05, drop_rate=0.1,
                             malformed_rate=0.1, timeout_rate=0.05, burst_429_rate=0.05,
                             hang_s=2.0, seed=3)
    rows, served, stats = _dispatch(cfg, 200, model, max_attempts=8, backoff_base_s=0.01,
                                    backoff_max_s=0.05)
    assert len(rows) == 200 and len({r["request_id"] for r in rows}) == 200
    assert {r["status"] for r in rows} <= {"ok", "failed"}
    assert sum(r["status"] == "ok" for r in rows) >= 195
    # Every kind of fault was met and retried through the real transport.
    assert all(served["faults"].get(f, 0) > 0 for f in ("500", "503", "drop", "malformed",
                                                        "timeout", "429"))
    assert stats.retries >= sum(served["faults"].values()) - 5
    assert sum(r["attempts"] for r in rows) == stats.attempts


def test_exhausted_retries_and_expired_keys_are_rows_with_errors() -> None:
    rows, _, _ = _dispatch(MockProviderConfig(api_key=KEY, drop_rate=1.0), 3, max_attempts=2,
                           backoff_base_s=0.01, backoff_max_s=0.02)
    assert {(r["status"], r["error_type"], r["attempts"]) for r in rows} == {
        ("failed", "transient", 2)}
    assert {r["error_message"] for r in rows} == {"connection dropped mid-response (ReadError)"}

    rows, served, _ = _dispatch(MockProviderConfig(api_key=KEY, expired_keys=frozenset({KEY})),
                                20)
    assert {r["error_type"] for r in rows} == {"auth"}
    assert served["requests"] <= 32  # stopped after the first 401s (concurrency 32)
    assert all(KEY not in (r["error_message"] or "") for r in rows)


def test_the_providers_headers_keep_a_lower_real_limit_from_drawing_429s() -> None:
    """The catalog promises 60,000 RPM but the key gets 6,000 (a shared key, a lower tier).
    Reading the limit headers of the first replies paces the model at the real limit before
    the provider has to say 429; AIMD alone would learn it from a burst of 429s."""
    cfg = MockProviderConfig(api_key=KEY, model_limits={CHEAP: (6000, None)},
                             window_s=1.0, latency_ms=0)
    rows, served, stats = _dispatch(cfg, 150, CHEAP, backoff_base_s=0.01, backoff_max_s=0.05)
    assert {r["status"] for r in rows} == {"ok"}
    assert served["rate_limited"] <= 5, served
    assert stats.min_rate_factor == pytest.approx(0.1)


def test_nothing_listening_is_a_connection_error_row() -> None:
    import socket

    with socket.socket() as s:  # a loopback port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = config.parse({**job_doc(f"http://127.0.0.1:{port}/v1"),
                        "dispatch": {"max_attempts": 2, "backoff_base_s": 0.01}})

    async def go() -> pa.Table:
        d = ModelDispatcher(job.models[CHEAP], job.dispatch, run_id="f", api_key=KEY)
        try:
            return await d.dispatch(_routed(3))
        finally:
            await d.aclose()

    rows = asyncio.run(go()).to_pylist()
    assert {(r["status"], r["error_type"], r["attempts"]) for r in rows} == {
        ("failed", "transient", 2)}
    assert {r["error_message"] for r in rows} == {"connection error: ConnectError"}
