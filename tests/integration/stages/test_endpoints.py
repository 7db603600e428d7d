"""The example endpoints of jobs/providers/ against the mock provider, over real HTTP on
loopback: Azure OpenAI (deployment URL, api-key header, api-version) and Gemini's
OpenAI-compatible base path reach the right URLs with the right headers."""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pytest

from batchroute import config, schemas
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from tests.helpers import REPO

pytestmark = pytest.mark.integration
KEY = "sk-endpoint-test-0123456789"


def _routed(n: int) -> pa.Table:
    cols: dict[str, Any] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(n)], row=list(range(n)),
                prompt=[f"question {i}" for i in range(n)], temperature=[0.3] * n,
                est_input_tokens=[7] * n, est_output_tokens=[256] * n,
                route_cost_micro_usd=[0] * n)
    return pa.table(cols, schema=schemas.ROUTED)


def _models(example: str, url: str) -> dict[str, config.ModelConfig]:
    """The example's models, their scheme and host pointed at the mock (paths kept)."""
    doc = tomllib.loads((REPO / "jobs" / "providers" / f"{example}.toml").read_text())
    for m in doc["models"].values():
        path = m["base_url"].split("://", 1)[1].partition("/")[2]
        m["base_url"] = f"{url}/{path}"
        m["api_key_env"] = "UNUSED"
    doc["job"].update(input="in.parquet", output="out")
    return dict(config.parse(doc).models)


def _dispatch(model: config.ModelConfig) -> list[dict[str, Any]]:
    async def go() -> pa.Table:
        d = ModelDispatcher(model, config.DispatchConfig(max_attempts=1), run_id="r",
                            api_key=KEY)
        try:
            return await d.dispatch(_routed(3))
        finally:
            await d.aclose()

    return asyncio.run(go()).to_pylist()


@pytest.mark.parametrize("example", ["azure-openai", "gemini"])
def test_example_endpoints_answer_at_their_urls_with_their_headers(example: str) -> None:
    with MockProvider(MockProviderConfig(api_key=KEY)) as mock:
        models = _models(example, mock.url)
        for model in models.values():
            rows = _dispatch(model)
            assert {r["status"] for r in rows} == {"ok"}, (model.name, rows[0])
            if model.reasoning:  # the o4-mini deployment: no max_tokens, no temperature
                assert all(r["reasoning_tokens"] > 0 for r in rows)
        served = mock.stats()
    assert served["by_status"] == {"200": 3 * len(models)}


def test_azure_without_api_version_or_with_a_bearer_key_is_refused() -> None:
    with MockProvider(MockProviderConfig(api_key=KEY)) as mock:
        azure = _models("azure-openai", mock.url)["mixtral-8x7b-instruct"]
        no_version = _dispatch(replace(azure, api_version=""))
        bearer = _dispatch(replace(azure, auth="bearer"))
        ok = _dispatch(azure)
    assert {r["error_type"] for r in no_version} == {"terminal"}
    assert "api-version" in no_version[0]["error_message"]
    assert {r["status"] for r in ok} == {"ok"}
    assert {r["status"] for r in bearer} == {"ok"}  # the mock takes either header for OpenAI
