"""``batchroute report`` over run folders written here (no Ray): every total reconciles with
the result rows it covers, under any grouping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchroute import config, schemas
from batchroute.errors import ConfigError
from batchroute.stages import report, rollup
from tests.helpers import CHEAP, MID, STRONG, job_doc

JOB = config.parse(job_doc())
MODELS = [CHEAP, MID, STRONG]

# (model index or None, status, input tokens, output tokens, tags, escalated from the cheap model)
Row = tuple[int | None, str, int, int, list[str], bool]
row_strategy = st.tuples(st.sampled_from([0, 1, 2, None]),
                         st.sampled_from(["ok", "ok", "failed", "rejected"]),
                         st.integers(0, 4000), st.integers(0, 800),
                         st.lists(st.sampled_from(["team:a", "team:b", "tenant:x"]),
                                  max_size=2, unique=True),
                         st.booleans())


def write_run(base: Path, run_id: str, day: str, rows: list[Row], *, job: str = "nightly",
              finished: bool = True) -> pa.Table:
    """A run folder as the pipeline leaves it: manifest, results, rollups and forecast."""
    folder = base / run_id
    (folder / "results").mkdir(parents=True)
    cols: dict[str, list[Any]] = {name: [] for name in schemas.RESULTS.names}
    for i, (m, status, tin, tout, tags, escalated) in enumerate(rows):
        model = MODELS[m] if m is not None else None
        status = "rejected" if model is None else status
        billed = model is not None and status == "ok"
        own = JOB.models[model].cost_micro_usd(tin, tout) if billed and model else 0
        esc = None
        if escalated and model in (MID, STRONG) and status != "rejected":
            esc = [{"model": CHEAP, "reason": "length", "input_tokens": tin,
                    "cached_input_tokens": 0, "cache_write_input_tokens": 0, "output_tokens": 64, "attempts": 1,
                    "invalid_answers": 0, "reasoning_tokens": 0,
                    "cost_micro_usd": JOB.models[CHEAP].cost_micro_usd(tin, 64)}]
        total = own + sum(e["cost_micro_usd"] for e in esc or [])
        values = {"request_id": f"{run_id}-{i}", "run_id": run_id, "model": model,
                  "status": status, "input_tokens": tin if billed else 0,
                  "cached_input_tokens": 0, "cache_write_input_tokens": 0, "output_tokens": tout if billed else 0,
                  "cost_micro_usd": total, "cost_usd": total / 1e6,
                  "latency_ms": 100.0 + i if billed else None, "attempts": int(billed),
                  "invalid_answers": 0, "reasoning_tokens": 0, "escalations": esc, "escalated_from": CHEAP if esc else None, "tags": tags,
                  "route_cost_micro_usd": 0,
                  "finished_at": pa.scalar(0, schemas.TIMESTAMP).as_py()}
        for name in cols:
            cols[name].append(values.get(name))
    results = pa.table(cols, schema=schemas.RESULTS)
    pq.write_table(results, folder / "results" / "part-0.parquet")
    frame = pl.from_arrow(results)
    assert isinstance(frame, pl.DataFrame)
    roll = rollup.rollup(frame, run_id=run_id, models=JOB.models, reference_model=STRONG,
                         reference_output_ratio=0.3)
    (folder / "rollups").mkdir()
    pq.write_table(roll, folder / "rollups" / "rollups.parquet")
    stages = {"plan": {}, "dispatch": {}, **({"rollup": {}} if finished else {})}
    (folder / "manifest.json").write_text(json.dumps({
        "run_id": run_id, "job": job, "price_date": day, "stages": stages,
        "counts": {"ok": 0, "failed": 0, "rejected": len(rows)}}))
    (folder / "forecast.json").write_text(json.dumps({"models": {
        m: {"est_cost_usd": 0.01} for m in MODELS}}))
    return results


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(row_strategy, max_size=25), min_size=1, max_size=3),
       st.lists(st.sampled_from(report.DIMENSIONS), min_size=1, max_size=4, unique=True))
def test_totals_reconcile_with_the_rows_under_any_grouping(
        tmp_path_factory: pytest.TempPathFactory, runs: list[list[Row]], by: list[str]) -> None:
    base = tmp_path_factory.mktemp("runs")
    written = [write_run(base, f"run-{k}", f"2026-11-0{k + 1}", rows, job=f"job{k % 2}")
               for k, rows in enumerate(runs)]
    out = report.build(str(base), tmp_path_factory.mktemp("out"), by=by)
    everything = pa.concat_tables(written)
    exact = sum(everything.column("cost_micro_usd").to_pylist())
    assert out.total_micro_usd == exact and out.result_rows == everything.num_rows
    table = pl.read_parquet(Path(out.files[0]))
    tag_weight = [max(1, len(t or [])) for t in everything.column("tags").to_pylist()]
    if "tag" in by:  # a row counts once under each of its tags
        assert table["rows"].sum() == sum(tag_weight)
        assert table["cost_micro_usd"].sum() == sum(
            c * w for c, w in zip(everything.column("cost_micro_usd").to_pylist(), tag_weight,
                                  strict=True))
    else:
        assert table["rows"].sum() == everything.num_rows
        assert table["cost_micro_usd"].sum() == exact
    daily = pl.read_parquet(Path(out.files[0]).parent / "daily.parquet")
    assert daily["cost_micro_usd"].sum() == exact
    failed = [c for c, s in zip(everything.column("cost_micro_usd").to_pylist(),
                                everything.column("status").to_pylist(), strict=True)
              if s == "failed"]
    assert daily["failed_cost_micro_usd"].sum() == sum(failed)


def test_escalation_attempts_are_billed_to_the_model_that_made_them(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "r1", "2026-11-02",
              [(2, "ok", 1000, 100, ["team:a"], True), (0, "ok", 500, 50, [], False)])
    report.build(str(tmp_path / "runs"), tmp_path / "out", by=["model"])
    by_model = {r["model"]: r for r in pl.read_csv(tmp_path / "out" / "report.csv").to_dicts()}
    cheap, strong = JOB.models[CHEAP], JOB.models[STRONG]
    assert by_model[CHEAP]["cost_micro_usd"] == (cheap.cost_micro_usd(1000, 64)
                                                 + cheap.cost_micro_usd(500, 50))
    assert by_model[STRONG]["cost_micro_usd"] == strong.cost_micro_usd(1000, 100)
    assert (by_model[CHEAP]["rows"], by_model[STRONG]["rows"]) == (1, 1)


def test_date_range_and_unfinished_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
        write_run(runs, f"r-{day}", day, [(0, "ok", 100, 10, [], False)])
    write_run(runs, "r-running", "2026-11-02", [(0, "ok", 100, 10, [], False)],
              finished=False)
    # MID's forecast is as written before the output basis was recorded: at max_tokens.
    (runs / "r-2026-11-02" / "forecast.json").write_text(json.dumps({"models": {
        CHEAP: {"est_cost_usd": 0.0001, "output_basis": "history"},
        MID: {"est_cost_usd": 0.0001}}}))
    from datetime import date

    out = report.build(str(runs), tmp_path / "out", date_from=date(2026, 11, 2),
                       date_to=date(2026, 11, 2))
    assert [r.run_id for r in out.runs] == ["r-2026-11-02"]
    assert [(Path(p).name, why) for p, why in out.skipped] == [
        ("r-running", "not finished (no rollup yet)")]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "r-2026-11-02" in page and "r-2026-11-03" not in page
    forecast = pl.read_csv(tmp_path / "out" / "forecast.csv")
    assert dict(forecast.select("model", "output_basis").iter_rows()) == {
        CHEAP: "history", MID: "max_tokens"}
    assert "<th>output_basis</th>" in page
    assert page.count('src="data:image/png;base64,') == len(report.CHARTS)
    with pytest.raises(ConfigError, match="no finished run"):
        report.build(str(runs), tmp_path / "o2", date_from=date(2027, 1, 1))
    with pytest.raises(ConfigError, match="'week' is not one of"):
        report.build(str(runs), tmp_path / "o3", by=["week"])


def test_money_is_shown_to_the_cent() -> None:
    assert report.format_usd(1_234_565_000) == "$1,234.57"
    assert report.format_usd(4_999) == "$0.00" and report.format_usd(5_000) == "$0.01"
    assert report.format_usd(-20_000) == "-$0.02" and report.format_usd(None) == "—"


def test_runs_from_before_integer_money_are_counted_from_cost_usd(tmp_path: Path) -> None:
    results = write_run(tmp_path / "runs", "old", "2026-10-01",
                        [(0, "ok", 1000, 100, [], False), (2, "ok", 500, 50, [], False)])
    shard = tmp_path / "runs" / "old" / "results" / "part-0.parquet"
    pq.write_table(results.drop_columns(["cost_micro_usd", "cached_input_tokens"]), shard)
    out = report.build(str(tmp_path / "runs"), tmp_path / "out")
    assert out.total_micro_usd == sum(results.column("cost_micro_usd").to_pylist()) > 0

    from batchroute.stages.sink import RunFolder

    frames = list(rollup.read_results(RunFolder(str(tmp_path / "runs"), "old")))
    assert frames[0]["cost_micro_usd"].to_list() == results.column("cost_micro_usd").to_pylist()
