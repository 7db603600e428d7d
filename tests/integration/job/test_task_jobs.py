"""Jobs declared over a user's own table, end to end on the shared Ray session against the
mock provider: a labels job (integer ids, kept columns, invalid answers retried, escalated or
failed) and a JSON-schema extraction job, read back by polars, pandas and DuckDB."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.job import runner
from tests.helpers import REPO, demo_job_doc, quiet_progress

pytestmark = pytest.mark.integration
LABELS = ["billing", "bug", "how-to", "account", "other"]
N = 300


def _tickets(path: Path) -> None:
    ids = [900_000_000_000 + 7 * i for i in range(N)]  # beyond float32, exact in int64
    pq.write_table(pa.table({
        "ticket_id": pa.array(ids, pa.int64()),
        "subject": [f"Ticket {i}: {'refund' if i % 3 else 'crash'} question" for i in range(N)],
        "body": [None if i % 10 == 0 else f"Details of case {i}. " * (1 + i % 4)
                 for i in range(N)],
        "priority": pa.array([i % 4 for i in range(N)], pa.int8()),
        "customer_tier": pa.array([["free", "pro", "enterprise"][i % 3] for i in range(N)]
                                  ).dictionary_encode(),
        # some rows go to the anthropic model: both wires are asked for the labels
        "force_model": [("claude-3-5-sonnet" if i % 5 == 0 else None) for i in range(N)],
    }), path)


def _job(tmp: Path, url: str, task: dict[str, Any], max_tokens: int = 64,
         **job: Any) -> config.JobConfig:
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", url,
                       dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.05,
                                 "batch_rows": 32, "escalate_on": ["invalid"],
                                 "default_max_tokens": max_tokens})
    doc["job"].update(job)
    doc["task"] = task
    return config.parse(doc)


def test_a_labels_job_over_a_tickets_table(tmp_path: Path, api_key: str,
                                           ray_session: None) -> None:
    _tickets(tmp_path / "in.parquet")
    cfg = MockProviderConfig(api_key=api_key, seed=3, invalid_rate=0.25, latency_ms=1.0)
    with MockProvider(cfg) as provider:
        job = _job(tmp_path, provider.url, {
            "system": "Label the ticket.",
            "template": "Subject: {{ subject }}\n\n{{ body or '' }}",
            "keep_columns": ["priority", "customer_tier"],
            "output": {"labels": LABELS, "retries_on_invalid": 1}}, id_column="ticket_id")
        out = runner.run(job, run_id="tickets", progress=quiet_progress())
        served = provider.stats()
    results = pl.read_parquet(out.folder.sub("results"))
    # every ticket exactly once, under its own integer id, with its kept columns and types
    assert results.schema["ticket_id"] == pl.Int64 and results.schema["priority"] == pl.Int8
    assert results.schema["customer_tier"] == pl.String
    assert sorted(results["ticket_id"].to_list()) == [900_000_000_000 + 7 * i for i in range(N)]
    assert (results["request_id"] == results["ticket_id"].cast(pl.String)).all()
    ok = results.filter(pl.col("status") == "ok")
    assert set(ok["label"]) <= set(LABELS) and ok["label"].null_count() == 0
    assert len(set(ok["label"])) > 1
    failed = results.filter(pl.col("status") == "failed")
    assert set(failed["error_type"]) <= {"invalid_output"}
    assert failed["label"].null_count() == len(failed) and failed["response"].null_count() == 0
    # invalid answers were met, retried (same prompt, same model: invalid again) and escalated
    assert served["invalid_answers"] > 0
    escalated = results.filter(pl.col("escalated_from").is_not_null())
    assert len(escalated) > 0
    reasons = {e["reason"] for es in escalated["escalations"].to_list() for e in es}
    assert reasons == {"invalid"}
    # the forecast counted the rendered prompt, the system prompt and the labels schema
    from batchroute import tokens
    from batchroute.task import wire_schema

    routed = pl.read_parquet(out.folder.sub("routed"), hive_partitioning=False)
    schema_chars = len(json.dumps(wire_schema(job.task.output).schema,  # type: ignore[union-attr]
                                  separators=(",", ":")))
    expected = tokens.input_estimate(
        routed["prompt"].str.len_chars().cast(pl.Int64).to_numpy() + len("Label the ticket.") + schema_chars, 2)
    assert routed["est_input_tokens"].to_list() == expected.tolist()
    forecast = json.loads(Path(out.folder.sub("forecast.json")).read_text())
    assert sum(m["est_input_tokens"] for m in forecast["models"].values()) == expected.sum()
    rollups = pl.read_parquet(out.folder.sub("rollups"))
    charged_invalid = (int(results["invalid_answers"].sum())
                       + sum(e["invalid_answers"] for es in escalated["escalations"].to_list()
                             for e in es))
    assert int(rollups["invalid"].sum()) == charged_invalid == served["invalid_answers"]
    assert int(rollups["cost_micro_usd"].sum()) == int(results["cost_micro_usd"].sum())
    # the other readers see the same columns
    pdf = pd_read(out.folder.sub("results"))
    assert str(pdf["ticket_id"].dtype) == "int64" and set(pdf["label"].dropna()) <= set(LABELS)
    n_labelled = duckdb.connect().execute(
        f"select count(label) from read_parquet('{out.folder.sub('results')}/*.parquet') "
        "where status = 'ok'").fetchone()
    assert n_labelled == (len(ok),)


def pd_read(path: str) -> Any:
    import pandas as pd

    return pd.read_parquet(path)


def test_an_extraction_job_fills_a_typed_output_struct(tmp_path: Path, provider: MockProvider,
                                                       ray_session: None) -> None:
    pq.write_table(pa.table({
        "invoice_id": [f"INV-{i:04d}" for i in range(40)],
        "vendor": ["Acme"] * 40,
        "text": [f"Invoice INV-{i:04d}, total {i * 10}.50 USD" for i in range(40)],
        # half go to the anthropic model: both wires are asked for the schema
        "force_model": ["claude-3-5-sonnet" if i % 2 else None for i in range(40)]}),
        tmp_path / "in.parquet")
    job = _job(tmp_path, provider.url, {
        "template": "Vendor: {{ vendor }}\n\n{{ text }}",
        "output": {"json_schema": str(REPO / "schemas" / "invoice.schema.json")}},
        max_tokens=600, id_column="invoice_id")
    out = runner.run(job, run_id="invoices", progress=quiet_progress())
    results = pl.read_parquet(out.folder.sub("results"))
    assert sorted(results["invoice_id"]) == [f"INV-{i:04d}" for i in range(40)]
    schema = json.loads((REPO / "schemas" / "invoice.schema.json").read_text())
    struct = results.schema["output"]
    assert isinstance(struct, pl.Struct)
    assert [f.name for f in struct.fields] == list(schema["properties"])
    types = {f.name: f.dtype for f in struct.fields}
    assert types["total"] == pl.Float64 and types["line_items"] == pl.List(pl.String)
    assert types["paid"] == pl.Boolean
    ok = results.filter(pl.col("status") == "ok")
    assert len(set(ok["model"])) >= 2  # both wires answered
    assert len(ok) == 40, results.filter(pl.col("status") != "ok").select(
        "model", "error_type", "error_message", "response").to_dicts()
    assert ok["output"].struct.field("currency").is_in(
        ["USD", "EUR", "GBP"]).all()
    assert ok["output"].struct.field("invoice_number").null_count() == 0
    pdf = pd_read(out.folder.sub("results"))
    assert all(isinstance(v, dict) and "total" in v for v in pdf["output"])
    totals = duckdb.connect().execute(
        f"select count(output.total) from read_parquet('{out.folder.sub('results')}/*.parquet')"
        " where status = 'ok'").fetchone()
    assert totals == (len(ok),)
