"""The plan's output forecast learns from the job's earlier runs (their rollups), says its basis,
falls back to max_tokens without history, and passes over damaged run folders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from batchroute import config, schemas
from batchroute.stages import history, plan, rollup
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import ResultSink, RunFolder
from tests.helpers import CHEAP, MID, STRONG, job_doc

JOB = config.parse(job_doc())  # job "t", default_max_tokens 64
MAX = 1000  # the max_tokens of the simulated nights


def _results(models: list[str], status: list[str], input_tokens: np.ndarray,
             output_tokens: np.ndarray) -> pl.DataFrame:
    """Result rows as the rollup reads them, each billed at its model's prices."""
    n = len(models)
    price = {m: (c.input_usd_per_mtok, c.output_usd_per_mtok) for m, c in JOB.models.items()}
    micro = [round(i * price[m][0] + o * price[m][1])
             for m, i, o in zip(models, input_tokens.tolist(), output_tokens.tolist(),
                                strict=True)]
    table = pa.table({
        "request_id": [f"r{i}" for i in range(n)], "model": models, "status": status,
        "tier": ["sync"] * n, "input_tokens": input_tokens, "cached_input_tokens": [0] * n,
        "cache_write_input_tokens": [0] * n, "output_tokens": output_tokens,
        "reasoning_tokens": [0] * n, "cost_micro_usd": micro, "latency_ms": [100.0] * n,
        "attempts": [1] * n, "invalid_answers": [0] * n, "escalations": [None] * n,
        "route_cost_micro_usd": [0] * n,
    }, schema=pa.schema([schemas.RESULTS.field(c) for c in rollup.COLUMNS]))
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _finished(out: Path, run_id: str, results: pl.DataFrame, *, job: str = "t",
              at: str = "2026-11-30T04:00:00+00:00") -> pa.Table:
    """An earlier finished run of ``job`` under ``out``: its rollups and manifest."""
    folder = RunFolder(str(out), run_id)
    table = rollup.rollup(results, run_id=run_id, models=JOB.models, reference_model=STRONG)
    folder.write_table(folder.sub("rollups"), "rollups.parquet", table)
    manifest = Manifest.new(folder, job=job)
    manifest.stages["rollup"] = {"state": "done", "at": at}
    manifest.finished_at = at
    manifest.write(folder)
    return table


def _night(out: Path, run_id: str, models: list[str], est_input: np.ndarray,
           max_tokens: np.ndarray | None = None) -> RunFolder:
    """Tonight's plan under ``out``: the routed rows as the route stage writes them."""
    folder = RunFolder(str(out), run_id)
    n = len(models)
    cols: dict[str, object] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"q{i}" for i in range(n)], row=list(range(n)), model=models,
                prompt=["p"] * n, est_input_tokens=est_input,
                est_output_tokens=np.full(n, MAX) if max_tokens is None else max_tokens,
                route_cost_micro_usd=[0] * n)
    w = plan.PlanWriter(folder, ResultSink(folder))
    w.add(pa.table(cols, schema=schemas.ROUTED))
    w.close()
    return folder


def _ok(models: list[str], i: list[int], o: list[int]) -> pl.DataFrame:
    return _results(models, ["ok"] * len(models), np.array(i), np.array(o))


def test_without_history_output_is_at_max_tokens_and_says_so(tmp_path: Path) -> None:
    folder = _night(tmp_path, "tonight", [CHEAP] * 4, np.full(4, 100))
    f = plan.forecast(folder, JOB, rejected=0)
    cheap = f["models"][CHEAP]
    assert cheap["est_output_tokens"] == cheap["output_budget_tokens"] == 4 * MAX
    assert cheap["output_basis"] == "max_tokens" and f["output_basis"] == "max_tokens"
    assert cheap["est_cost_usd"] == pytest.approx((400 * 0.25 + 4000 * 1.25) / 1e6)
    text = plan.format_forecast(f)
    assert "at max_tokens: no earlier finished run of this job" in text
    assert "(output at max_tokens: no earlier run to learn from)" in text


def test_history_sets_output_per_answer_and_the_basis_is_printed(tmp_path: Path) -> None:
    # Last night CHEAP answered 3 rows with 100 tokens each, one more row was passed up
    # (its 40 tokens billed to CHEAP); STRONG answered 2 rows with 500 tokens each.
    night = _ok([CHEAP, CHEAP, CHEAP, STRONG, STRONG], [10] * 5, [100, 100, 100, 500, 500])
    table = _finished(tmp_path, "last-night", night)
    rows = table.to_pylist()
    for r in rows:  # one CHEAP answer passed up the ladder: billed, so it counts
        if r["model"] == CHEAP:
            r["escalated"], r["output_tokens"] = 1, r["output_tokens"] + 40
    folder = RunFolder(str(tmp_path), "last-night")
    folder.write_table(folder.sub("rollups"), "rollups.parquet",
                       pa.Table.from_pylist(rows, schema=table.schema))

    tonight = _night(tmp_path, "tonight", [CHEAP] * 10 + [STRONG] * 2, np.full(12, 50))
    f = plan.forecast(tonight, JOB, rejected=0)
    cheap, strong = f["models"][CHEAP], f["models"][STRONG]
    assert cheap["output_tokens_per_answer"] == pytest.approx(340 / 4)
    assert cheap["est_output_tokens"] == 850 and cheap["output_budget_tokens"] == 10 * MAX
    assert cheap["est_cost_usd"] == pytest.approx((500 * 0.25 + 850 * 1.25) / 1e6, abs=1e-6)
    assert strong["est_output_tokens"] == 1000
    assert f["output_basis"] == "history" and f["output_history"]["runs"] == ["last-night"]
    # Wall time keeps the budget: the limiters admit a call at prompt + max_tokens.
    assert cheap["bound_by"] == "tpm" and cheap["est_wall_s"] == pytest.approx(
        60 * (500 + 10 * MAX) / JOB.models[CHEAP].tpm, abs=0.1)
    text = plan.format_forecast(f)
    assert "85 tokens/answer from the last run" in text
    assert "500 tokens/answer from the last run" in text
    assert "(output from the last run)" in text and "last-night" in text


def test_a_model_new_in_the_job_falls_back_to_max_tokens(tmp_path: Path) -> None:
    _finished(tmp_path, "older", _ok([CHEAP, CHEAP], [10, 10], [20, 40]),
              at="2026-11-29T04:00:00+00:00")
    _finished(tmp_path, "newer", _ok([STRONG], [10], [100]))
    tonight = _night(tmp_path, "tonight", [CHEAP, MID, MID], np.full(3, 10))
    f = plan.forecast(tonight, JOB, rejected=0)
    assert f["models"][CHEAP]["est_output_tokens"] == 30
    mid = f["models"][MID]
    assert (mid["output_basis"], mid["est_output_tokens"]) == ("max_tokens", 2 * MAX)
    assert f["output_basis"] == "mixed"
    text = plan.format_forecast(f)
    assert "30 tokens/answer from 1 of the last 2 runs" in text
    assert "at max_tokens: not used in the last 2 runs" in text
    assert f"output from the last 2 runs; at max_tokens for {MID}" in text
    only_new = _night(tmp_path, "only-new", [MID], np.full(1, 10))
    f = plan.forecast(only_new, JOB, rejected=0)
    assert f["output_basis"] == "max_tokens" and f["models"][MID]["est_output_tokens"] == MAX
    assert ("output at max_tokens: none of these models answered in the last 2 runs"
            in plan.format_forecast(f))


def test_the_estimate_is_capped_at_the_rows_max_tokens(tmp_path: Path) -> None:
    _finished(tmp_path, "last-night", _ok([CHEAP], [10], [300]))
    tight = _night(tmp_path, "tight", [CHEAP] * 3, np.full(3, 10),
                   max_tokens=np.array([100, 500, 50]))
    cheap = plan.forecast(tight, JOB, rejected=0)["models"][CHEAP]
    assert cheap["output_tokens_per_answer"] == 300
    assert cheap["est_output_tokens"] == cheap["output_budget_tokens"] == 650
    # In all, not row by row: 3 x 300 fits in 500 + 500 + 50.
    loose = _night(tmp_path, "loose", [CHEAP] * 3, np.full(3, 10),
                   max_tokens=np.array([500, 500, 50]))
    assert plan.forecast(loose, JOB, rejected=0)["models"][CHEAP]["est_output_tokens"] == 900


def test_the_last_three_finished_runs_of_the_job_are_pooled(tmp_path: Path) -> None:
    for day, tokens in ((1, 1000), (2, 10), (3, 20), (4, 30)):
        _finished(tmp_path, f"t-day{day}", _ok([CHEAP], [10], [tokens]),
                  at=f"2026-11-0{day}T04:00:00+00:00")
    # Newer, but another job's, or not finished (a dry run): not history.
    _finished(tmp_path, "other-job", _ok([CHEAP], [10], [5000]), job="other",
              at="2026-11-09T04:00:00+00:00")
    dry = RunFolder(str(tmp_path), "t-dry")
    Manifest.new(dry, job="t").write(dry)
    (tmp_path / "notes").mkdir()
    past = history.read(RunFolder(str(tmp_path), "tonight"), "t")
    assert past.runs == ("t-day4", "t-day3", "t-day2")
    assert past.models[CHEAP] == history.ModelHistory(output_tokens=60, answers=3, runs=3)
    assert past.skipped == ()


def test_damaged_run_folders_are_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _finished(tmp_path, "good", _ok([CHEAP], [10], [70]), at="2026-11-01T04:00:00+00:00")
    for name in ("bad-rollups", "no-rollups", "bad-manifest", "odd-manifest"):
        _finished(tmp_path, name, _ok([CHEAP], [10], [9999]), at="2026-11-05T04:00:00+00:00")
    (tmp_path / "bad-rollups" / "rollups" / "rollups.parquet").write_bytes(b"PAR1 torn")
    for p in (tmp_path / "no-rollups" / "rollups").iterdir():
        p.unlink()
    (tmp_path / "bad-manifest" / "manifest.json").write_text('{"run_id": "bad-man')
    # JSON that reads, but not as a manifest: its stages are a number.
    (tmp_path / "odd-manifest" / "manifest.json").write_text(
        '{"run_id": "odd-manifest", "job": "t", "stages": 5}')
    tonight = _night(tmp_path, "tonight", [CHEAP], np.full(1, 10))
    with caplog.at_level(logging.WARNING, logger="batchroute"):
        f = plan.forecast(tonight, JOB, rejected=0)
    assert f["models"][CHEAP]["est_output_tokens"] == 70
    assert f["output_history"]["runs"] == ["good"]
    skipped = {s["run"].rpartition("/")[2]: s["why"] for s in f["output_history"]["skipped"]}
    assert set(skipped) == {"bad-rollups", "no-rollups", "bad-manifest", "odd-manifest"}
    assert "rollups cannot be read" in skipped["bad-rollups"]
    assert "holds no rollups" in skipped["no-rollups"]
    assert "manifest.json cannot be read" in skipped["bad-manifest"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(name in warned for name in skipped) and "not used as history" in warned
    assert "output history: " + str(tmp_path / "bad-rollups") in plan.format_forecast(f)


def _simulated_night(rng: np.random.Generator, n: int) -> tuple[
        list[str], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """One night of alike traffic: (model, input tokens, max_tokens, output tokens, status)
    per row. Half the rows are short questions (max_tokens 16-64, answers of about 20 tokens,
    often cut); the rest are open ones (max_tokens 256-1,024) whose skewed (lognormal) answer
    lengths differ by model. 1% of rows fail, billed nothing; prompt lengths vary row to row."""
    models = rng.choice([CHEAP, MID, STRONG], size=n, p=[0.6, 0.25, 0.15]).tolist()
    short = rng.random(n) < 0.5
    max_tokens = np.where(short, rng.choice([16, 32, 64], n), rng.choice([256, 512, 1024], n))
    scale = np.select([short, np.array(models) == CHEAP, np.array(models) == MID],
                      [20.0, 80.0, 250.0], 400.0)
    output = np.minimum(max_tokens, np.round(scale * rng.lognormal(0.0, 0.8, n)))
    inputs = rng.integers(20, 1500, n)
    status = np.where(rng.random(n) < 0.01, "failed", "ok")
    output[status == "failed"] = 0
    return models, inputs, max_tokens, output.astype(np.int64), status.tolist()


def _billed(models: list[str], status: list[str], inputs: np.ndarray,
            output: np.ndarray) -> pl.DataFrame:
    """The night's result rows: a failed row billed nothing."""
    return _results(models, status, np.where(np.array(status) == "ok", inputs, 0), output)


def _bill(table: pa.Table) -> float:
    return int(sum(table.column("cost_micro_usd").to_pylist())) / 1e6


def test_the_second_nights_forecast_is_within_10_percent_of_its_bill(tmp_path: Path) -> None:
    rng = np.random.default_rng(18)
    n = 4000
    models, inputs, _, output, status = _simulated_night(rng, n)
    _finished(tmp_path, "t-night1", _billed(models, status, inputs, output))

    # Night 2: alike, not the same rows; its prompts are a third longer, which must not
    # lengthen the forecast answers (they are set by the task, not the prompt). The input
    # estimate is off by a few percent row by row, as a tokenizer's count is.
    models, inputs, max_tokens, output, status = _simulated_night(rng, n)
    inputs = inputs * 4 // 3
    est_input = np.maximum(1, np.round(inputs * rng.normal(1.0, 0.05, n))).astype(np.int64)
    tonight = _night(tmp_path, "t-night2", models, est_input, max_tokens)
    f = plan.forecast(tonight, JOB, rejected=0)
    bill = _bill(rollup.rollup(_billed(models, status, inputs, output), run_id="t-night2",
                               models=JOB.models, reference_model=STRONG))
    assert f["output_basis"] == "history"
    assert abs(f["est_cost_usd"] - bill) / bill <= 0.10, (f["est_cost_usd"], bill)
    # At max_tokens the same plan is far over the bill: the history is what closes the gap.
    at_budget = plan.forecast(tonight, JOB, rejected=0, past=history.History())
    assert at_budget["est_cost_usd"] > 1.3 * bill
