"""Fixtures shared by every tier."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from batchroute import config
from tests.helpers import job_doc, tiny_router


@pytest.fixture
def make_job() -> Callable[..., config.JobConfig]:
    def make(**kw: Any) -> config.JobConfig:
        return config.parse(job_doc(**kw))
    return make


@pytest.fixture
def tiny_router_bytes() -> bytes:
    return tiny_router()
