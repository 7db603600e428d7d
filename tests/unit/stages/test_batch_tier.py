"""The batch tier against the mock provider's batch endpoints, without Ray: crashes at every
step (writing files, just after a create, while polling, while reading results) and a resume
lose no row and send no custom id twice; per-line errors, expiry, a full queue and the
deadline follow their rules; every row costs its tokens at the batch price."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pyarrow as pa
import pytest

from batchroute import config, schemas
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.stages import rollup
from batchroute.stages.dispatch.batch_tier import BatchTier
from batchroute.stages.dispatch.dispatcher import ModelDispatcher
from batchroute.stages.sink import RunFolder
from tests.helpers import CHEAP, MID, STRONG, job_doc

KEY = "sk-batch-tier-test-7777"
N = 60


class Crash(Exception):
    """Stands for kill -9: nothing after it runs."""


def _job(url: str, **model: Any) -> config.JobConfig:
    doc = job_doc(url + "/v1")
    doc["models"][MID]["base_url"] = url
    for name in (CHEAP, MID):
        doc["models"][name].update(tier="batch", batch_discount=0.5, batch_max_lines=20,
                                   **model)
    return config.parse(doc)


def _folder(tmp: Path, model: str) -> RunFolder:
    folder = RunFolder(str(tmp), "run-1")
    cols: dict[str, Any] = {name: [None] * N for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(N)], row=list(range(N)),
                prompt=[f"Summarise case {i}." for i in range(N)], model=[model] * N,
                est_input_tokens=[9] * N, est_output_tokens=[32] * N,
                route_cost_micro_usd=[0] * N)
    table = pa.table(cols, schema=schemas.ROUTED).drop_columns(["model"])
    folder.write_table(folder.routed_dir(model), "part-0.parquet", table)
    return folder


async def _go(job: config.JobConfig, model: str, folder: RunFolder, committed: list[pa.Table],
              *, crash: tuple[str, int] | None = None, deadline: Any = None,
              now: Any = None) -> BatchTier:
    ok = [t.filter(pl.col("status") == "ok") for t in (pl.from_arrow(x) for x in committed)]
    answered = pa.array([r for t in ok for r in t["request_id"].to_list()], pa.string())
    d = ModelDispatcher(job.models[model], job.dispatch, run_id=folder.run_id, api_key=KEY)
    async with httpx.AsyncClient() as client:
        tier = BatchTier(d, folder, client=client, answered=answered, deadline=deadline,
                         sleep=lambda s: asyncio.sleep(0.01),
                         **({"now": now} if now else {}))
        if crash is not None:
            _arm(tier, *crash)

        async def emit(table: pa.Table) -> None:
            committed.append(table)

        try:
            await tier.run(emit)
        finally:
            await d.aclose()
    return tier


def _arm(tier: BatchTier, point: str, after: int) -> None:
    """Make ``tier`` crash at the ``after``-th time it reaches ``point``."""
    calls = {"n": 0}

    def hit() -> None:
        calls["n"] += 1
        if calls["n"] == after:
            raise Crash(point)

    wire, ledger = tier.wire, tier.ledger
    if point == "writing":
        write = ledger.write_rows
        ledger.write_rows = lambda n, rows: (hit(), write(n, rows))[1]  # type: ignore[method-assign]
    elif point == "uploading":
        upload = wire.upload

        async def crash_upload(f: Any) -> Any:
            hit()
            return await upload(f)
        wire.upload = crash_upload  # type: ignore[method-assign]
    elif point == "created":
        create = wire.create

        async def crash_create(*args: Any) -> Any:
            state = await create(*args)
            hit()  # after the provider made it, before the ledger records it
            return state
        wire.create = crash_create  # type: ignore[method-assign]
    elif point == "polling":
        retrieve = wire.retrieve

        async def crash_retrieve(batch_id: str) -> Any:
            hit()
            return await retrieve(batch_id)
        wire.retrieve = crash_retrieve  # type: ignore[method-assign]
    elif point == "downloading":
        results = wire.results

        async def crash_results(state: Any, output: Any) -> Any:
            async for line in results(state, output):
                hit()
                yield line
        wire.results = crash_results  # type: ignore[method-assign,assignment]
    else:
        raise AssertionError(point)


def _check(job: config.JobConfig, model: str, committed: list[pa.Table],
           served: dict[str, Any]) -> pl.DataFrame:
    rows = pl.concat([pl.from_arrow(t) for t in committed], how="vertical_relaxed")
    # Exactly one final row per input row (a failed row is final too).
    assert sorted(rows["request_id"].to_list()) == sorted(f"r{i}" for i in range(N))
    assert served["batch_duplicate_custom_ids"] == 0
    m = job.models[model]
    batch = rows.filter(pl.col("tier") == "batch")
    assert batch["cost_micro_usd"].to_list() == [
        m.cost_micro_usd(i, o, tier="batch") for i, o in
        batch.select("input_tokens", "output_tokens").iter_rows()]
    table = rollup.rollup(rows, run_id="run-1", models=job.models, reference_model=STRONG)
    assert pa.compute.sum(table.column("cost_micro_usd")).as_py() == rows["cost_micro_usd"].sum()
    return rows


POINTS = ["writing", "uploading", "created", "polling", "downloading"]


@pytest.mark.parametrize("model", [CHEAP, MID], ids=["openai", "anthropic"])
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("seed", range(5))
def test_a_crash_anywhere_then_a_resume_loses_no_row_and_pays_none_twice(
        tmp_path: Path, model: str, point: str, seed: int) -> None:
    rng = random.Random(f"{seed}-{point}-{model}")
    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=0.0, batch_expire_share=0.1,
                             batch_line_error_rate=0.05, seed=seed)
    with MockProvider(cfg) as provider:
        job = _job(provider.url)
        folder = _folder(tmp_path, model)
        committed: list[pa.Table] = []
        after = rng.randint(1, {"writing": 5, "uploading": 5, "created": 5,
                                "polling": 6, "downloading": 60}[point])
        with pytest.raises(Crash):
            asyncio.run(_go(job, model, folder, committed, crash=(point, after)))
        # The resume: the committed rows' failed ones are sent again, as resume does.
        committed = [t.filter(pa.compute.equal(t.column("status"), "ok")) for t in committed]
        tier = asyncio.run(_go(job, model, folder, committed))
        served = provider.stats()
    rows = _check(job, model, committed, served)
    assert (rows["status"] == "ok").sum() > N * 0.9
    if point == "created":  # the batch made before the crash was found, not sent again
        assert tier.stats.recovered_batches == 1


@pytest.mark.parametrize("model", [CHEAP, MID], ids=["openai", "anthropic"])
def test_a_create_whose_reply_was_lost_is_found_and_not_sent_again(tmp_path: Path,
                                                                   model: str) -> None:
    from batchroute.errors import TransientDispatchError

    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=0.0)
    with MockProvider(cfg) as provider:
        job = _job(provider.url)
        committed: list[pa.Table] = []
        lost = {"n": 0}

        def arm(tier: BatchTier) -> None:
            create = tier.wire.create

            async def flaky(*args: Any) -> Any:
                state = await create(*args)  # the provider made it ...
                if lost["n"] < 2:
                    lost["n"] += 1  # ... and the reply never arrived
                    raise TransientDispatchError("creating batch: connection dropped")
                return state
            tier.wire.create = flaky  # type: ignore[method-assign]

        import batchroute.stages.dispatch.batch_tier as bt

        real_run = bt.BatchTier.run

        async def run(self: BatchTier, emit: Any) -> None:
            arm(self)
            await real_run(self, emit)

        bt.BatchTier.run = run  # type: ignore[method-assign]
        try:
            tier = asyncio.run(_go(job, model, _folder(tmp_path, model), committed))
        finally:
            bt.BatchTier.run = real_run  # type: ignore[method-assign]
        served = provider.stats()
    _check(job, model, committed, served)
    assert tier.stats.recovered_batches == 2


def test_an_anthropic_batch_of_someone_else_found_after_a_crash_is_not_taken_for_ours(
        tmp_path: Path) -> None:
    """Anthropic batches carry no metadata: after a crash between create and its record, a
    batch of the same size that another client made in that moment is a candidate. Its
    results' custom ids tell it apart; ours is then found, and nothing is sent twice."""
    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=0.0)
    with MockProvider(cfg) as provider:
        job = _job(provider.url)
        folder = _folder(tmp_path, MID)
        committed: list[pa.Table] = []

        def foreign(lines: int) -> None:
            requests = [{"custom_id": f"other-{i}", "params": {
                "model": "claude-x", "max_tokens": 8,
                "messages": [{"role": "user", "content": f"someone else's {i}"}]}}
                for i in range(lines)]
            httpx.post(provider.url + "/v1/messages/batches", json={"requests": requests},
                       headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}
                       ).raise_for_status()

        import batchroute.stages.dispatch.batch_tier as bt

        real_run = bt.BatchTier.run
        state = {"armed": True}

        async def run(self: BatchTier, emit: Any) -> None:
            create = self.wire.create

            async def create_then_crash(f: Any, file_id: Any, metadata: Any) -> Any:
                if not state["armed"]:
                    return await create(f, file_id, metadata)
                state["armed"] = False
                foreign(f.lines)  # made after our "creating" record, before ours
                await create(f, file_id, metadata)
                raise Crash("created")
            self.wire.create = create_then_crash  # type: ignore[method-assign]
            await real_run(self, emit)

        bt.BatchTier.run = run  # type: ignore[method-assign]
        try:
            with pytest.raises(Crash):
                asyncio.run(_go(job, MID, folder, committed))
        finally:
            bt.BatchTier.run = real_run  # type: ignore[method-assign]
        tier = asyncio.run(_go(job, MID, folder, committed))
        served = provider.stats()
    _check(job, MID, committed, served)
    assert tier.stats.recovered_batches == 2  # the other client's, then ours


def test_expired_and_errored_lines_come_back_in_later_batches_and_errors_fail(
        tmp_path: Path) -> None:
    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=0.0, batch_expire_share=0.3,
                             batch_line_error_rate=0.3)
    with MockProvider(cfg) as provider:
        job = _job(provider.url)
        committed: list[pa.Table] = []
        tier = asyncio.run(_go(job, CHEAP, _folder(tmp_path, CHEAP), committed))
        served = provider.stats()
    rows = _check(job, CHEAP, committed, served)
    assert tier.stats.resubmitted > 0 and tier.stats.errored > 0
    failed = rows.filter(pl.col("status") == "failed")
    # A line that errored on every attempt (max_attempts 3) is failed with the provider's
    # error; the others were answered in a later batch.
    assert set(failed["error_type"]) <= {"transient"} and (failed["attempts"] == 3).all()
    assert (failed["error_message"].str.contains("batch line")).all()
    assert served["batch_lines_received"] > N


def test_a_full_queue_waits_and_is_not_a_failure(tmp_path: Path) -> None:
    # Three files of 20 rows (about 740 tokens each to the provider); it queues 1,000.
    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=0.05, batch_queue_tokens=1_000)
    with MockProvider(cfg) as provider:
        job = _job(provider.url)  # batch_queue_tokens unknown to the job: refusals happen
        committed: list[pa.Table] = []
        tier = asyncio.run(_go(job, CHEAP, _folder(tmp_path, CHEAP), committed))
        served = provider.stats()
    rows = _check(job, CHEAP, committed, served)
    assert set(rows["status"]) == {"ok"}
    assert tier.stats.refused_for_queue > 0
    assert served["batches_by_status"].get("failed", 0) == tier.stats.refused_for_queue


def test_a_known_queue_cap_holds_files_back_instead(tmp_path: Path) -> None:
    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=0.05, batch_queue_tokens=1_000)
    with MockProvider(cfg) as provider:
        job = _job(provider.url, batch_queue_tokens=1_000)
        committed: list[pa.Table] = []
        tier = asyncio.run(_go(job, CHEAP, _folder(tmp_path, CHEAP), committed))
        served = provider.stats()
    _check(job, CHEAP, committed, served)
    assert tier.stats.refused_for_queue == 0 and "failed" not in served["batches_by_status"]


def test_after_the_deadline_the_rest_is_sent_sync_at_full_price(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    clock = {"t": 1_000_000.0}

    def now() -> float:
        clock["t"] += 1.0  # every look at the clock is a second later
        return clock["t"]

    deadline = datetime.fromtimestamp(1_000_000.0 + 12, UTC)
    cfg = MockProviderConfig(api_key=KEY, batch_delay_s=3600.0, latency_ms=0.0)
    with MockProvider(cfg) as provider:
        job = _job(provider.url)
        committed: list[pa.Table] = []
        tier = asyncio.run(_go(job, CHEAP, _folder(tmp_path, CHEAP), committed,
                               deadline=deadline, now=now))
        served = provider.stats()
    rows = _check(job, CHEAP, committed, served)
    assert tier.stats.deadline_passed
    assert set(rows["tier"]) == {"sync"} and set(rows["status"]) == {"ok"}
    m = job.models[CHEAP]
    assert rows["cost_micro_usd"].to_list() == [
        m.cost_micro_usd(i, o) for i, o in rows.select("input_tokens", "output_tokens")
        .iter_rows()]  # full price
    assert served["batches_by_status"].get("cancelled", 0) >= 1


# --- OpenAI flex ------------------------------------------------------------------------------


def _flex(tmp: Path, rate: float, fallback: bool) -> tuple[pl.DataFrame, dict[str, Any],
                                                            config.JobConfig]:
    cfg = MockProviderConfig(api_key=KEY, flex_unavailable_rate=rate)
    with MockProvider(cfg) as provider:
        doc = job_doc(provider.url + "/v1")
        doc["models"][CHEAP].update(tier="flex", batch_discount=0.5, flex_fallback=fallback)
        job = config.parse(doc)
        routed = pa.Table.from_batches(pq_rows(_folder(tmp, CHEAP), CHEAP))

        async def go() -> pa.Table:
            d = ModelDispatcher(job.models[CHEAP], job.dispatch, run_id="r", api_key=KEY)
            try:
                return await d.dispatch(routed)
            finally:
                await d.aclose()

        rows = pl.from_arrow(asyncio.run(go()))
        served = provider.stats()
    assert isinstance(rows, pl.DataFrame)
    return rows, served, job


def pq_rows(folder: RunFolder, model: str) -> list[pa.RecordBatch]:
    import pyarrow.parquet as pq

    return pq.read_table(folder.shards(folder.routed_dir(model))[0]).to_batches()


def test_flex_calls_are_billed_at_the_flex_price(tmp_path: Path) -> None:
    rows, served, job = _flex(tmp_path, 0.3, fallback=False)
    assert served["flex_requests"] >= N and served["flex_unavailable"] > 0
    ok = rows.filter(pl.col("status") == "ok")
    assert set(rows["tier"]) == {"flex"} and len(ok) > N * 0.9  # refusals were retried
    m = job.models[CHEAP]
    assert ok["cost_micro_usd"].to_list() == [
        m.cost_micro_usd(i, o, tier="flex") for i, o in
        ok.select("input_tokens", "output_tokens").iter_rows()]


@pytest.mark.parametrize("fallback", [True, False])
def test_a_row_flex_never_serves_goes_standard_only_when_asked(tmp_path: Path,
                                                               fallback: bool) -> None:
    rows, served, job = _flex(tmp_path, 1.0, fallback=fallback)
    if fallback:
        # Three flex attempts refused, then the standard tier at full price.
        assert set(rows["status"]) == {"ok"} and set(rows["tier"]) == {"sync"}
        assert (rows["attempts"] == 4).all()
        m = job.models[CHEAP]
        assert rows["cost_micro_usd"].to_list() == [
            m.cost_micro_usd(i, o) for i, o in rows.select("input_tokens", "output_tokens")
            .iter_rows()]
    else:
        assert set(rows["status"]) == {"failed"} and set(rows["error_type"]) == {"rate_limited"}
        assert served["requests"] == served["flex_unavailable"] == 3 * N
