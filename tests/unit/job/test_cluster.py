"""The dispatch actor's class in this process, without Ray: what an exception that leaves it
(and so reaches the driver and its logs) may say."""

from __future__ import annotations

import asyncio
import traceback
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

from batchroute import config
from batchroute.errors import InternalDispatchError
from batchroute.job import cluster
from batchroute.stages.dispatch import dispatcher
from tests.helpers import CHEAP, job_doc, key_echoes, key_fragments
from tests.unit.stages.test_dispatcher import _routed

KEY = "sk-actor-secret-31415926"


@pytest.mark.parametrize("method", ["dispatch", "ask_route"])
def test_an_exception_leaving_a_dispatch_actor_carries_no_key(
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    monkeypatch.setattr(dispatcher, "tune_gc_for_dispatch", lambda: None)  # this process's GC
    monkeypatch.setenv("BATCHROUTE_TEST_KEY", KEY)
    echoes = key_echoes(KEY)

    async def broken(self: Any, routed: pa.Table, *args: Any, **kwargs: Any) -> pa.Table:
        raise RuntimeError(f"a bug met the reply {echoes['upper']} {echoes['middle']}")

    monkeypatch.setattr(dispatcher.ModelDispatcher, "dispatch", broken)
    monkeypatch.setattr(dispatcher.ModelDispatcher, "ask", broken)
    job = config.parse(job_doc())
    actor = cluster._DispatchActor(job.models[CHEAP], job.dispatch,
                                   SimpleNamespace(run_id="run-1"),  # type: ignore[arg-type]
                                   job.task)
    with pytest.raises(InternalDispatchError) as caught:
        asyncio.run(getattr(actor, method)(_routed(1)))
    assert str(caught.value).startswith("RuntimeError: a bug met the reply INVALID KEY ***")
    assert key_fragments("".join(traceback.format_exception(caught.value)), KEY) == []


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("ray://127.0.0.1:10001", True),
    ("[::1]:6379", True), ("10.0.0.5:6379", False), ("head.example:6379", False),
    ("ray://head.example:10001", False)])
def test_a_ray_on_this_machines_loopback_is_joined_from_loopback(address: str,
                                                                 loopback: bool) -> None:
    """A driver joining a loopback Ray (a test session's, another run's) must itself be on
    loopback, or it looks for its node at the machine's network address and hangs."""
    assert cluster._on_loopback(address) is loopback
