"""The whole job through the CLI: one shared local Ray session, the mock provider on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli, config
from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider
from tests.helpers import demo_job_doc, to_toml

pytestmark = [pytest.mark.integration]

ROWS = 3000


def _job_file(tmp: Path, provider: MockProvider, input_uri: Path) -> Path:
    doc = demo_job_doc(input_uri, tmp / "runs", provider.url,
                       dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.1})
    path = tmp / "job.toml"
    path.write_text(to_toml(doc))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "prompts.parquet"
    sample.write(sample.generate(ROWS, seed=3, force_models=["claude-3-5-sonnet", "nope"]), path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, inputs: Path, provider: MockProvider,
                 ray_session: None) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("e2e")
    job = _job_file(tmp, provider, inputs)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["run", str(job), "--run-id", "e2e"])
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "folder": tmp / "runs" / "e2e", "job": config.load(job), "tmp": tmp}


def test_exit_code_and_printed_table(finished_run: dict[str, Any]) -> None:
    assert finished_run["code"] == 0, finished_run["stderr"][-2000:]
    out = finished_run["stdout"]
    assert "results by model" in out and "TOTAL" in out and "rate limiting:" in out
    assert str(finished_run["folder"] / "results") in out


def test_one_result_row_per_input_row(finished_run: dict[str, Any], inputs: Path) -> None:
    given = pl.read_parquet(inputs)
    results = pl.read_parquet(finished_run["folder"] / "results")
    assert len(results) == len(given) == ROWS
    per_id = lambda f: f.group_by("request_id").len().sort("request_id")  # noqa: E731
    assert per_id(results).equals(per_id(given))
    assert set(results["status"]) <= {"ok", "failed", "rejected"}


def test_real_split_across_three_models(finished_run: dict[str, Any]) -> None:
    results = pl.read_parquet(finished_run["folder"] / "results")
    ok = results.filter(pl.col("status") == "ok")
    by_model = dict(ok.group_by("model").len().iter_rows())
    assert len(by_model) == 3 and min(by_model.values()) > ROWS * 0.05, by_model
    reasons = set(ok["route_reason"])
    assert {"classifier", "fallback", "rule:code", "rule:long-document", "forced"} <= reasons


def test_every_cost_is_tokens_times_prices(finished_run: dict[str, Any]) -> None:
    job: config.JobConfig = finished_run["job"]
    results = pl.read_parquet(finished_run["folder"] / "results")
    prices = pl.DataFrame({
        "model": list(job.models),
        "pin": [m.input_usd_per_mtok for m in job.models.values()],
        "pout": [m.output_usd_per_mtok for m in job.models.values()]})
    # Prices are per million tokens, so tokens x price is the cost in micro-dollars; rows
    # record it rounded half to even.
    r = results.join(prices, on="model", how="left").with_columns(
        expected=(pl.col("input_tokens") * pl.col("pin")
                  + pl.col("output_tokens") * pl.col("pout")).round_sig_figs(12))
    ok = r.filter(pl.col("status") == "ok")
    assert len(ok) > 0 and (ok["input_tokens"] > 0).all()
    assert [round(x) for x in ok["expected"]] == ok["cost_micro_usd"].to_list()
    assert ((ok["cost_usd"] - ok["cost_micro_usd"] / 1e6).abs() < 1e-12).all()
    assert (r.filter(pl.col("status") != "ok")["cost_micro_usd"] == 0).all()


def test_rollups_equal_sums_over_results(finished_run: dict[str, Any]) -> None:
    folder = finished_run["folder"]
    results = pl.read_parquet(folder / "results")
    rollups = pl.read_parquet(folder / "rollups")
    assert rollups["rows"].sum() == len(results)
    for col in ("input_tokens", "output_tokens"):
        assert rollups[col].sum() == results[col].sum()
    assert rollups["cost_micro_usd"].sum() == results["cost_micro_usd"].sum()
    for row in rollups.iter_rows(named=True):
        mine = results.filter(pl.col("model").eq_missing(row["model"]))
        assert row["ok"] == (mine["status"] == "ok").sum()
        assert row["cost_micro_usd"] == mine["cost_micro_usd"].sum()
    assert rollups["savings_usd"].sum() > 0


def test_rejected_rows_carry_their_reasons(finished_run: dict[str, Any]) -> None:
    rejected = pl.read_parquet(finished_run["folder"] / "results").filter(
        pl.col("status") == "rejected")
    reasons = " | ".join(rejected["reject_reason"].to_list())
    for expected in ("null prompt", "empty prompt", "duplicate request_id",
                     "force_model 'nope' is not in the catalog"):
        assert expected in reasons
    assert rejected["reject_reason"].null_count() == 0


def test_manifest_and_forecast(finished_run: dict[str, Any]) -> None:
    folder = finished_run["folder"]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["run_id"] == "e2e" and m["input_rows"] == ROWS
    assert m["config_hash"] == finished_run["job"].config_hash
    assert m["router_version"].startswith("bow-lr-1-")
    assert sum(m["counts"].values()) == ROWS
    assert set(m["stages"]) == {"source", "plan", "dispatch", "rollup"}
    for key in ("routed", "results", "rollups", "forecast"):
        assert Path(m["paths"][key]).exists()
    f = json.loads((folder / "forecast.json").read_text())
    assert f["routed"] + f["rejected"] == ROWS


def test_the_next_plan_of_the_job_forecasts_from_the_finished_run(
        finished_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = finished_run["tmp"]
    assert cli.main(["plan", str(tmp / "job.toml"), "--run-id", "e2e-next"]) == 0
    assert "tokens/answer from the last run" in capsys.readouterr().out
    f = json.loads((tmp / "runs" / "e2e-next" / "forecast.json").read_text())
    assert f["output_basis"] == "history" and f["output_history"]["runs"] == ["e2e"]
    bill = pl.read_parquet(finished_run["folder"] / "rollups")["cost_micro_usd"].sum() / 1e6
    assert abs(f["est_cost_usd"] - bill) / bill <= 0.10, (f["est_cost_usd"], bill)


def test_outputs_read_back_in_polars_pandas_and_duckdb(finished_run: dict[str, Any]) -> None:
    folder = finished_run["folder"]
    for name in ("results", "rollups", "routed"):
        n_pl = len(pl.scan_parquet(folder / name / "**" / "*.parquet",
                                   hive_partitioning=True).collect())
        n_pd = len(pd.read_parquet(folder / name))
        n_db = duckdb.connect().execute(
            f"SELECT count(*) FROM read_parquet('{folder / name}/**/*.parquet', "
            "hive_partitioning = true)").fetchone()
        assert n_db is not None and n_pl == n_pd == n_db[0] > 0


def test_no_api_key_in_any_output_or_log(finished_run: dict[str, Any], api_key: str) -> None:
    assert api_key not in finished_run["stdout"] + finished_run["stderr"]
    needle = api_key.encode()
    files = [p for p in finished_run["tmp"].rglob("*") if p.is_file()]
    ray_logs = Path("/tmp/ray/session_latest/logs")
    if ray_logs.is_dir():
        files += [p for p in ray_logs.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = [str(p) for p in files if needle in p.read_bytes()]
    assert leaks == []


def test_schema_error_exits_2_names_the_column_and_writes_nothing(
        tmp_path: Path, provider: MockProvider, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"request_id": ["a"], "prompt": [42]}), bad)
    job = _job_file(tmp_path, provider, bad)
    assert cli.main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "column 'prompt'" in err
    assert not (tmp_path / "runs").exists()


def test_plan_is_a_dry_run(tmp_path: Path, inputs: Path, provider: MockProvider,
                           ray_session: None, capsys: pytest.CaptureFixture[str]) -> None:
    before = provider.stats()["requests"]
    job = _job_file(tmp_path, provider, inputs)
    assert cli.main(["plan", str(job), "--run-id", "dry"]) == 0
    assert provider.stats()["requests"] == before
    out = capsys.readouterr().out
    assert "est wall" in out and "gpt-4-1106-preview" in out
    folder = tmp_path / "runs" / "dry"
    f = json.loads((folder / "forecast.json").read_text())
    assert f["est_cost_usd"] < f["est_reference_cost_usd"]
    assert not (folder / "rollups").exists()
    # Only rejected rows are final before dispatch.
    assert set(pl.read_parquet(folder / "results")["status"]) == {"rejected"}
