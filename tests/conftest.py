"""Fixtures shared by every tier.

The Ray and provider fixtures are session-scoped: one local Ray session and one mock provider
for the whole run. The API key is put in the environment before Ray starts, so Ray's workers
inherit it, the way a user's shell hands its keys to a local run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from batchroute.mock_provider import MockProvider, MockProviderConfig

TEST_KEY = f"sk-test-{secrets.token_hex(12)}"


@pytest.fixture(scope="session")
def api_key() -> str:
    os.environ["BATCHROUTE_TEST_KEY"] = TEST_KEY
    return TEST_KEY


@pytest.fixture(scope="session")
def ray_session(api_key: str) -> Iterator[None]:
    import ray

    from batchroute import pipeline

    pipeline.start_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def provider(api_key: str) -> Iterator[MockProvider]:
    cfg = MockProviderConfig(rpm=30_000, tpm=50_000_000, latency_ms=5.0, fail_rate=0.02,
                             api_key=api_key, seed=1)
    with MockProvider(cfg) as p:
        yield p
