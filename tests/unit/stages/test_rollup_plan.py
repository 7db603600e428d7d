"""Rollups reconcile with the rows they sum; the plan splits by model and prices the forecast."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import config, schemas
from batchroute.config import ModelConfig
from batchroute.stages import plan, rollup
from batchroute.stages.sink import ResultSink, RunFolder
from tests.helpers import CHEAP, MID, STRONG, job_doc

JOB = config.parse(job_doc())


Row = tuple[str | None, str, int, int]
Escalation = tuple[str, int, int]  # an earlier attempt: model, input tokens, output tokens


def _micro(model: str, i: int, o: int, cached: int = 0, written: int = 0,
           models: Mapping[str, ModelConfig] = JOB.models, tier: str = "sync") -> int:
    return models[model].cost_micro_usd(i, o, cached, written, tier=tier)


def _results(rows: list[Row], escalations: list[list[Escalation]] | None = None, *,
             cached: list[int] | None = None, written: list[int] | None = None,
             routing: list[int] | None = None, tier: str = "sync",
             models: Mapping[str, ModelConfig] = JOB.models) -> pl.DataFrame:
    escalations = escalations or [[] for _ in rows]
    cached = cached or [0] * len(rows)
    written = written or [0] * len(rows)
    routing = routing or [0] * len(rows)
    own = [_micro(m, i, o, c, w, models, tier) if m and s == "ok" else 0
           for (m, s, i, o), c, w in zip(rows, cached, written, strict=True)]
    earlier = [[{"model": m, "reason": "length", "input_tokens": i, "cached_input_tokens": 0,
                 "output_tokens": o, "cost_micro_usd": _micro(m, i, o), "attempts": 1,
                 "invalid_answers": 0, "reasoning_tokens": 0}
                for m, i, o in esc] or None for esc in escalations]
    table = pa.table({
        "request_id": [f"r{i}" for i in range(len(rows))],
        "model": [r[0] for r in rows], "status": [r[1] for r in rows],
        "tier": [None if r[1] == "rejected" else tier for r in rows],
        "input_tokens": [r[2] for r in rows], "cached_input_tokens": cached,
        "cache_write_input_tokens": written, "output_tokens": [r[3] for r in rows],
        "cost_micro_usd": [c + r + sum(e["cost_micro_usd"] for e in esc or [])
                           for c, r, esc in zip(own, routing, earlier, strict=True)],
        "latency_ms": [100.0 + i for i in range(len(rows))],
        "attempts": [1] * len(rows), "invalid_answers": [0] * len(rows),
        "reasoning_tokens": [0] * len(rows),
        "escalations": earlier, "route_cost_micro_usd": routing,
    }, schema=pa.schema([schemas.RESULTS.field(c) for c in rollup.COLUMNS]))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


row = st.tuples(st.sampled_from([CHEAP, MID, STRONG, None]),
                st.sampled_from(["ok", "failed", "rejected"]),
                st.integers(0, 5000), st.integers(0, 2000))
escalation = st.lists(st.tuples(st.sampled_from([CHEAP, MID]), st.integers(0, 5000),
                                st.integers(0, 2000)), max_size=2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(row, escalation, st.integers(0, 300)), max_size=40))
def test_rollup_totals_equal_row_sums(cases: list[tuple[Row, list[Escalation], int]]) -> None:
    rows = [r for r, _, _ in cases]
    escalations = [e if r[0] and r[1] != "rejected" else [] for r, e, _ in cases]
    routing = [c for _, _, c in cases]
    res = _results(rows, escalations, routing=routing)
    t = rollup.rollup(res, run_id="r", models=JOB.models, reference_model=STRONG)
    assert t.schema == schemas.ROLLUPS
    r = pl.from_arrow(t)
    assert isinstance(r, pl.DataFrame)
    assert r["rows"].sum() == len(rows)
    for k, col in ((1, "input_tokens"), (2, "output_tokens")):
        assert r[col].sum() == res[col].sum() + sum(e[k] for esc in escalations for e in esc)
    assert r["cost_micro_usd"].sum() == res["cost_micro_usd"].sum()  # exact, in integers
    assert r["failed_cost_micro_usd"].sum() == res.filter(
        pl.col("status") == "failed")["cost_micro_usd"].sum()
    # Routing overhead is billed with the rows it routed, and is part of their cost.
    for m in r["model"].to_list():
        mine = [c for (model, *_), c in zip(rows, routing, strict=True) if model == m]
        assert r.filter(pl.col("model").eq_missing(m))["routing_cost_micro_usd"][0] == sum(mine)
    assert r["ok"].sum() + r["failed"].sum() + r["rejected"].sum() == len(rows)
    assert r["escalated"].sum() == sum(len(esc) for esc in escalations)
    if rows:
        assert r["share_of_requests"].sum() == pytest.approx(1.0)
    for m in r.iter_rows(named=True):
        mine = res.filter(pl.col("model").eq_missing(m["model"]))
        assert m["rows"] == len(mine)
        assert m["savings_usd"] == pytest.approx(m["reference_cost_usd"] - m["cost_usd"])
        # Each model's bill: its own answers' calls plus escalation attempts made on it.
        billed = sum(_micro(x, i, o) for (x, s, i, o) in rows
                     if x is not None and x == m["model"] and s == "ok")
        billed += sum(_micro(x, i, o) for esc in escalations for x, i, o in esc
                      if x == m["model"])
        billed += sum(c for (x, *_), c in zip(rows, routing, strict=True) if x == m["model"])
        assert m["cost_micro_usd"] == billed
        assert m["cost_usd"] == pytest.approx(m["cost_micro_usd"] / 1e6)


def test_counterfactual_by_hand() -> None:
    # The reference model answered 4,000 input tokens with 1,000 output: ratio 0.25.
    res = _results([(CHEAP, "ok", 1000, 100), (CHEAP, "failed", 0, 0), (MID, "ok", 2000, 10),
                    (STRONG, "ok", 4000, 1000)])
    r = {x["model"]: x for x in
         rollup.rollup(res, run_id="r", models=JOB.models, reference_model=STRONG).to_pylist()}
    # strong-model prices are $15 in / $75 out per million tokens
    assert r[CHEAP]["reference_output_ratio"] == 0.25
    assert r[CHEAP]["reference_ratio_from"] == "reference model"
    assert r[CHEAP]["reference_cost_micro_usd"] == 1000 * 15 + 250 * 75
    assert r[CHEAP]["cost_micro_usd"] == round(1000 * 0.25 + 100 * 1.25)
    assert r[MID]["reference_cost_micro_usd"] == 2000 * 15 + 500 * 75
    assert r[STRONG]["reference_cost_micro_usd"] == r[STRONG]["cost_micro_usd"] == (
        4000 * 15 + 1000 * 75)
    assert r[STRONG]["savings_usd"] == 0 and r[STRONG]["savings_pct"] == 0
    assert r[CHEAP]["savings_pct"] == pytest.approx(100 * (1 - 375 / 33750))
    assert (r[CHEAP]["ok"], r[CHEAP]["failed"]) == (1, 1)
    assert r[CHEAP]["latency_p50_ms"] == 100.0
    assert "TOTAL" in rollup.format_table(
        rollup.rollup(res, run_id="r", models=JOB.models, reference_model=STRONG))


def test_cache_reads_and_writes_are_each_billed_at_their_own_price() -> None:
    from dataclasses import replace

    strong = replace(JOB.models[STRONG], cached_input_usd_per_mtok=1.5,
                     cache_write_input_usd_per_mtok=18.75)
    models = {**JOB.models, STRONG: strong}
    # 4,000 prompt tokens: 1,000 written to the cache, then 1,000 read from it.
    micro = [strong.cost_micro_usd(4000, 100, 0, 1000), strong.cost_micro_usd(4000, 100, 1000)]
    assert micro == [3000 * 15 + 1000 * 18.75 + 100 * 75, 3000 * 15 + 1000 * 1.5 + 100 * 75]
    res = _results([(STRONG, "ok", 4000, 100)] * 2, cached=[0, 1000], written=[1000, 0],
                   models=models)
    assert res["cost_micro_usd"].to_list() == micro
    r = rollup.rollup(res, run_id="r", models=models, reference_model=STRONG).to_pylist()[0]
    assert (r["cached_input_tokens"], r["cache_write_input_tokens"]) == (1000, 1000)
    # The reference model's own rows count at what they cost: no saving claimed on them.
    assert r["reference_cost_micro_usd"] == r["cost_micro_usd"] == sum(micro)


def test_savings_split_into_routing_and_tier_and_spend_by_tier() -> None:
    from dataclasses import replace

    models = {**JOB.models, CHEAP: replace(JOB.models[CHEAP], batch_discount=0.5)}
    batch = _results([(CHEAP, "ok", 1000, 100)] * 3, tier="batch", models=models)
    sync = _results([(CHEAP, "ok", 1000, 100)], models=models)
    r = rollup.rollup(pl.concat([batch, sync]), run_id="r", models=models,
                      reference_model=STRONG, reference_output_ratio=0.25).to_pylist()[0]
    full = 1000 * 0.25 + 100 * 1.25  # one row at standard price, micro-dollars
    assert (r["batch_cost_micro_usd"], r["sync_cost_micro_usd"], r["flex_cost_micro_usd"]) == (
        3 * round(full / 2), round(full), 0)
    assert r["standard_cost_micro_usd"] == 4 * full
    assert r["reference_cost_micro_usd"] == 4 * (1000 * 15 + 250 * 75)  # at standard price
    assert r["tier_savings_usd"] == pytest.approx((4 * full - r["cost_micro_usd"]) / 1e6)
    assert r["tier_savings_usd"] == pytest.approx((3 * full - r["batch_cost_micro_usd"]) / 1e6)
    assert r["routing_savings_usd"] + r["tier_savings_usd"] == pytest.approx(r["savings_usd"])


def test_unrecovered_spend_is_reported_per_model_apart_from_the_rows_cost() -> None:
    res = _results([(CHEAP, "ok", 1000, 100), (MID, "ok", 2000, 10)])
    plain = {x["model"]: x for x in
             rollup.rollup(res, run_id="r", models=JOB.models, reference_model=STRONG).to_pylist()}
    r = {x["model"]: x for x in rollup.rollup(
        res, run_id="r", models=JOB.models, reference_model=STRONG,
        unrecovered={CHEAP: 1234}).to_pylist()}
    assert (r[CHEAP]["unrecovered_cost_micro_usd"], r[MID]["unrecovered_cost_micro_usd"]) == (
        1234, 0)
    assert r[CHEAP]["cost_micro_usd"] == plain[CHEAP]["cost_micro_usd"]  # the rows' sum still


def test_counterfactual_ratio_when_the_reference_model_answered_nothing() -> None:
    res = _results([(CHEAP, "ok", 1000, 100), (MID, "ok", 3000, 300)])
    table = rollup.rollup(res, run_id="r", models=JOB.models, reference_model=STRONG,
                          reference_output_ratio=0.5)
    r = {x["model"]: x for x in table.to_pylist()}
    assert r[CHEAP]["reference_ratio_from"] == "job.reference_output_ratio"
    assert r[CHEAP]["reference_cost_micro_usd"] == 1000 * 15 + 500 * 75
    r = {x["model"]: x for x in rollup.rollup(
        res, run_id="r", models=JOB.models, reference_model=STRONG).to_pylist()}
    assert (r[MID]["reference_ratio_from"], r[MID]["reference_output_ratio"]) == (
        "all models", 0.1)


def test_cached_prompt_tokens_are_priced_at_the_cached_price() -> None:
    doc = job_doc()
    doc["models"][CHEAP].update(cached_input_usd_per_mtok=0.125, batch_discount=0.5)
    cheap = config.parse(doc).models[CHEAP]
    # 1,000 prompt tokens of which 600 cached, 100 output; then half off at the batch tier.
    assert cheap.cost_micro_usd(1000, 100, 600, tier="batch") == round(
        (400 * 0.25 + 600 * 0.125 + 100 * 1.25) * 0.5)
    assert cheap.cost_usd(1000, 100, 600, tier="batch") == pytest.approx(150 / 1e6)
    assert cheap.cost_usd(1000, 100, 600) == pytest.approx(300 / 1e6)


def _routed(models: list[str | None], reasons: list[str | None]) -> pa.Table:
    n = len(models)
    cols: dict[str, object] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"r{i}" for i in range(n)], row=list(range(n)), model=models,
                reject_reason=reasons, prompt=["p"] * n, est_input_tokens=[1000] * n,
                est_output_tokens=[100] * n, route_cost_micro_usd=[0] * n)
    return pa.table(cols, schema=schemas.ROUTED)


def test_plan_splits_by_model_and_rejects_to_results(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "run-x")
    sink = ResultSink(folder)
    w = plan.PlanWriter(folder, sink, flush_rows=2)
    w.add(_routed([CHEAP, STRONG, None, CHEAP], [None, None, "null prompt", None]))
    w.add(_routed([CHEAP, "odd/name"], [None, "too long"]))
    assert w.close() == {CHEAP: 3, STRONG: 1}
    assert sink.counts == {"ok": 0, "failed": 0, "rejected": 2}
    dataset = plan.routed_dataset(folder)
    assert dataset is not None
    routed = dataset.to_table()
    assert sorted(routed.column("model").to_pylist()) == [CHEAP] * 3 + [STRONG]
    rejected = pq.read_table(tmp_path / "run-x" / "results").to_pylist()
    assert {r["reject_reason"] for r in rejected} == {"null prompt", "too long"}
    assert all(r["status"] == "rejected" and r["cost_usd"] == 0 for r in rejected)

    f = plan.forecast(folder, JOB, rejected=w.rejected)
    cheap = f["models"][CHEAP]
    assert cheap["rows"] == 3 and cheap["est_input_tokens"] == 3000
    assert cheap["est_cost_usd"] == pytest.approx((3000 * 0.25 + 300 * 1.25) / 1e6)
    # 3 rows / 60,000 RPM = 5.0e-5 min < 3,300 tokens / 50M TPM = 6.6e-5 min: tokens bind
    assert cheap["bound_by"] == "tpm"
    assert f["rejected"] == 2 and f["routed"] == 4
    assert "rejected before dispatch: 2" in plan.format_forecast(f)


def test_forecast_with_nothing_routed_and_numeric_model_names(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "empty")
    f = plan.forecast(folder, JOB, rejected=3)
    assert (f["routed"], f["rejected"], f["est_cost_usd"], f["models"]) == (0, 3, 0, {})

    doc = job_doc()
    doc["models"]["7"] = doc["models"].pop(CHEAP)
    job = config.parse(doc)
    folder = RunFolder(str(tmp_path), "numeric")
    w = plan.PlanWriter(folder, ResultSink(folder))
    w.add(_routed(["7", "7"], [None, None]))
    w.close()
    assert plan.forecast(folder, job, rejected=0)["models"]["7"]["rows"] == 2


class _RecordingFS(pafs.FileSystemHandler):
    """The local filesystem, recording every file opened for writing and every move."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()
        self.writes: list[str] = []
        self.moves: list[tuple[str, str]] = []

    def get_type_name(self) -> str:
        return "recording"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise NotImplementedError

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.moves.append((src, dest))
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.writes.append(dest)
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        self.writes.append(path)
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        self.writes.append(path)
        return self.fs.open_append_stream(path)


def test_a_reader_never_meets_a_half_written_file(tmp_path: Path) -> None:
    """Every file a run folder holds under its final name got there by one move of a file
    written completely elsewhere: a reader listing results/ (or the manifest) never opens a
    file that is still being written."""
    recorder = _RecordingFS()
    folder = RunFolder(str(tmp_path), "r", fs=pafs.PyFileSystem(recorder))
    sink = ResultSink(folder)
    for i in range(3):
        sink.write(pa.table({"request_id": [f"r{i}"], "status": ["ok"], "cost_usd": [0.0]}))
    folder.write_json("manifest.json", {"run_id": "r"})
    folder.write_text("job.toml", "[job]\n")

    final = {str(p) for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert len(final) == 5
    tmp_dir = str(tmp_path / "r" / "_tmp") + "/"
    assert recorder.writes and all(w.startswith(tmp_dir) for w in recorder.writes)
    assert {dest for _, dest in recorder.moves} == final
    assert all(src in recorder.writes for src, _ in recorder.moves)


def test_result_sink_settles_failed_rows_for_a_resume(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "r")
    rows = [("a", "ok"), ("b", "failed"), ("c", "rejected"), ("d", "failed")]
    sink = ResultSink(folder)
    for rid, status in rows:
        t = pa.table({"request_id": [rid], "status": [status], "cost_usd": [0.0]})
        sink.write(t)
    resumed = ResultSink(folder)
    assert resumed.settle_for_resume().to_pylist() == ["a"]
    left = pq.read_table(tmp_path / "r" / "results")
    assert sorted(left.column("request_id").to_pylist()) == ["a", "c"]
    resumed.write(pa.table({"request_id": ["b"], "status": ["ok"], "cost_usd": [0.0]}))
    names = sorted(p.name for p in (tmp_path / "r" / "results").iterdir())
    assert names == [folder.shard_name(i) for i in (0, 2, 4)]


def test_answered_ids_are_read_without_touching_the_shards(tmp_path: Path) -> None:
    """An interrupted run reads what is answered without settling: its failed rows stay."""
    folder = RunFolder(str(tmp_path), "r")
    sink = ResultSink(folder)
    sink.write(pa.table({"request_id": ["a", "b"], "status": ["ok", "failed"],
                         "cost_usd": [0.0, 0.0]}))
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "r" / "results").iterdir())
    assert ResultSink(folder).answered().to_pylist() == ["a"]
    left = pq.read_table(tmp_path / "r" / "results")
    assert sorted(left.column("request_id").to_pylist()) == ["a", "b"]
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "r" / "results").iterdir()) == before


def test_batch_models_are_forecast_at_the_batch_price_and_their_turnaround() -> None:
    from dataclasses import replace

    from batchroute.stages.plan import _wall

    cheap = JOB.models[CHEAP]
    batch = replace(cheap, tier="batch", batch_discount=0.5, batch_turnaround_s=5400.0)
    assert batch.cost_usd(10_000, 1_000, tier=batch.tier) == pytest.approx(
        cheap.cost_usd(10_000, 1_000) / 2)
    assert _wall(batch, 100_000, 10**9, None) == {"est_wall_s": 5400.0,
                                                  "bound_by": "batch turnaround"}
    assert _wall(batch, 100_000, 10**9, 3600.0) == {"est_wall_s": 3600.0,
                                                    "bound_by": "deadline"}
    assert _wall(cheap, 600, 10, None)["bound_by"] == "rpm"  # sync: its limits
