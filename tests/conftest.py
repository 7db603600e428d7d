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

from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig

TEST_KEY = f"sk-test-{secrets.token_hex(12)}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a test that did not run: the suite fails rather than pass with skips
    (a tier that cannot run on this machine must say so loudly)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"FAILED: {skipped} test(s) skipped; every test must run here",
                            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def api_key() -> str:
    os.environ["BATCHROUTE_TEST_KEY"] = TEST_KEY
    return TEST_KEY


@pytest.fixture(scope="session")
def ray_session(api_key: str) -> Iterator[None]:
    import ray

    from batchroute.job import cluster

    cluster.start_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def provider(api_key: str) -> Iterator[MockProvider]:
    cfg = MockProviderConfig(rpm=30_000, tpm=50_000_000, latency_ms=5.0, fail_rate=0.02,
                             api_key=api_key, seed=1)
    with MockProvider(cfg) as p:
        yield p
