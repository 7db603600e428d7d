"""Plan stage: routed rows partitioned by target model, and the dry-run forecast.

This is the checkpoint between the cheap stage and the expensive one. Rows rejected by the
source or route stage are final here and go straight to the results as ``rejected`` rows;
everything else is written to ``routed/model=NAME/`` for dispatch. The forecast prices the plan
at each model's catalog prices and limits before a cent is spent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from batchroute import schemas
from batchroute.config import JobConfig
from batchroute.sink import ResultSink, RunFolder


class PlanWriter:
    """Splits routed batches by model and commits them in shards of about ``flush_rows`` rows
    or ``flush_bytes`` bytes, whichever comes first: long documents make rows large, and the
    buffers must stay small however the input is shaped."""

    def __init__(self, folder: RunFolder, sink: ResultSink, *, flush_rows: int = 65_536,
                 flush_bytes: int = 32 * 2**20) -> None:
        self.folder = folder
        self.sink = sink
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self.rows: dict[str, int] = {}
        self.rejected = 0
        self._buffers: dict[str, list[pa.Table]] = {}
        self._seq: dict[str, int] = {}

    def add(self, routed: pa.Table) -> None:
        rejected = pc.is_valid(routed.column("reject_reason"))
        if pc.any(rejected).as_py():
            bad = routed.filter(rejected)
            self.sink.write(rejected_results(bad, self.folder.run_id))
            self.rejected += bad.num_rows
            routed = routed.filter(pc.invert(rejected))
        if routed.num_rows == 0:
            return
        for model in pc.unique(routed.column("model")).to_pylist():
            part = routed.filter(pc.equal(routed.column("model"), model))
            self.rows[model] = self.rows.get(model, 0) + part.num_rows
            buf = self._buffers.setdefault(model, [])
            buf.append(part)
            if (sum(t.num_rows for t in buf) >= self.flush_rows
                    or sum(t.nbytes for t in buf) >= self.flush_bytes):
                self._flush(model)

    def close(self) -> dict[str, int]:
        """Flush every buffer; return routed rows per model."""
        for model in list(self._buffers):
            self._flush(model)
        return dict(self.rows)

    def _flush(self, model: str) -> None:
        buf = self._buffers.pop(model, [])
        if not buf:
            return
        seq = self._seq.get(model, 0)
        self._seq[model] = seq + 1
        table = pa.concat_tables(buf).drop_columns(["model"])
        self.folder.write_table(self.folder.routed_dir(model), f"part-{seq:06d}.parquet", table)


def rejected_results(routed: pa.Table, run_id: str) -> pa.Table:
    """Final ``results`` rows for rows that will not be sent."""
    return _unsent(routed, run_id, "rejected", routed.column("model"), None, None)


def failed_results(routed: pa.Table, run_id: str, model: str, exc: BaseException) -> pa.Table:
    """``failed`` rows for a batch whose dispatch call itself failed (e.g. the actor died)."""
    return _unsent(routed, run_id, "failed", pa.array([model] * routed.num_rows, pa.string()),
                   "internal", f"dispatch call failed: {type(exc).__name__}")


def _unsent(routed: pa.Table, run_id: str, status: str, model: pa.Array | pa.ChunkedArray,
            error_type: str | None, error_message: str | None) -> pa.Table:
    n = routed.num_rows
    now = datetime.now(UTC)
    zeros = pa.array(np.zeros(n, np.int64))
    table = pa.table({
        "request_id": routed.column("request_id"),
        "run_id": pa.array([run_id] * n, pa.string()),
        "model": model,
        "status": pa.array([status] * n, pa.string()),
        "response": pa.nulls(n, pa.string()),
        "finish_reason": pa.nulls(n, pa.string()),
        "input_tokens": zeros,
        "cached_input_tokens": zeros,
        "output_tokens": zeros,
        "cost_micro_usd": zeros,
        "cost_usd": pa.array(np.zeros(n, np.float64)),
        "latency_ms": pa.nulls(n, pa.float64()),
        "attempts": pa.array(np.zeros(n, np.int32)),
        "escalated_from": pa.nulls(n, pa.string()),
        "escalations": pa.nulls(n, pa.list_(schemas.ESCALATION)),
        "error_type": pa.array([error_type] * n, pa.string()),
        "error_message": pa.array([error_message] * n, pa.string()),
        "reject_reason": routed.column("reject_reason"),
        "route_reason": routed.column("route_reason"),
        "router_scores": routed.column("router_scores"),
        "threshold": routed.column("threshold"),
        "router_version": routed.column("router_version"),
        **route_evidence(routed),
        "tags": routed.column("tags"),
        "started_at": pa.nulls(n, schemas.TIMESTAMP),
        "finished_at": pa.array([now] * n, schemas.TIMESTAMP),
    }, schema=schemas.RESULTS)
    return with_route_cost(table)


def route_evidence(routed: pa.Table) -> dict[str, pa.ChunkedArray | pa.Array]:
    """The route stage's evidence columns, carried from ``routed`` into ``results``."""
    n = routed.num_rows
    return {f.name: (routed.column(f.name) if f.name in routed.column_names
                     else pa.array(np.zeros(n, np.int64)) if not f.nullable
                     else pa.nulls(n, f.type)) for f in schemas.ROUTE_EVIDENCE}


def with_route_cost(results: pa.Table) -> pa.Table:
    """``results`` with each row's routing cost added to its ``cost_micro_usd``: the one
    place it is added, once per row, after any escalation."""
    route = results.column("route_cost_micro_usd")
    if not pc.any(pc.not_equal(route, 0)).as_py():
        return results
    total = pc.add(results.column("cost_micro_usd"), route)
    usd = pc.divide(pc.cast(total, pa.float64()), 1e6)
    return (results.set_column(results.schema.get_field_index("cost_micro_usd"),
                               schemas.RESULTS.field("cost_micro_usd"), total)
            .set_column(results.schema.get_field_index("cost_usd"),
                        schemas.RESULTS.field("cost_usd"), usd))


# Declared, not inferred: a model named "7" must come back as the string "7".
PARTITIONING = ds.partitioning(pa.schema([("model", pa.string())]), flavor="hive")


def routed_dataset(folder: RunFolder) -> ds.Dataset | None:
    """The plan as one dataset with the ``model`` partition column restored; None when no
    row was routed."""
    path = folder.sub("routed")
    if folder.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return ds.dataset(path, filesystem=folder.fs, format="parquet", partitioning=PARTITIONING)


def forecast(folder: RunFolder, job: JobConfig, rejected: int) -> dict[str, Any]:
    """Rows, tokens, cost and wall time per model, from the plan alone (no model calls).

    Wall time is the larger of rows / RPM and tokens / TPM: the model's limits, not its
    latency, bound a batch job once concurrency covers latency.
    """
    columns = ["model", "est_input_tokens", "est_output_tokens"]
    routed = routed_dataset(folder)
    if routed is None:
        empty = pl.from_arrow(pa.table({c: pa.array([], pa.string() if c == "model" else
                                                    pa.int64()) for c in columns}))
        assert isinstance(empty, pl.DataFrame)
        frame = empty.lazy()
    else:
        frame = pl.scan_pyarrow_dataset(routed).select(columns)
    # Streamed: the plan is never loaded whole, however many rows it has.
    sums = frame.group_by("model").agg(
        rows=pl.len(), est_input_tokens=pl.col("est_input_tokens").sum(),
        est_output_tokens=pl.col("est_output_tokens").sum()).sort("model").collect(
        engine="streaming")
    ref = job.models[job.reference_model]
    models: dict[str, dict[str, Any]] = {}
    for row in sums.iter_rows(named=True):
        m = job.models[row["model"]]
        tokens = row["est_input_tokens"] + row["est_output_tokens"]
        models[row["model"]] = {
            "rows": row["rows"],
            "est_input_tokens": row["est_input_tokens"],
            "est_output_tokens": row["est_output_tokens"],
            "est_cost_usd": round(m.cost_usd(row["est_input_tokens"],
                                             row["est_output_tokens"]), 6),
            "est_reference_cost_usd": round(ref.cost_usd(row["est_input_tokens"],
                                                         row["est_output_tokens"]), 6),
            "est_wall_s": round(60.0 * max(row["rows"] / m.rpm, tokens / m.tpm), 1),
            "bound_by": "rpm" if row["rows"] / m.rpm >= tokens / m.tpm else "tpm",
        }
    total_cost = sum(v["est_cost_usd"] for v in models.values())
    total_ref = sum(v["est_reference_cost_usd"] for v in models.values())
    return {
        "run_id": folder.run_id,
        "reference_model": job.reference_model,
        "models": models,
        "rejected": rejected,
        "routed": int(sums["rows"].sum()),
        "est_cost_usd": round(total_cost, 6),
        "est_reference_cost_usd": round(total_ref, 6),
        "est_savings_usd": round(total_ref - total_cost, 6),
        # Models are dispatched concurrently, so the slowest one bounds the job.
        "est_wall_s": max((v["est_wall_s"] for v in models.values()), default=0.0),
        "note": "estimates use 4 characters per token and the full max_tokens budget",
    }


def format_forecast(f: Mapping[str, Any]) -> str:
    lines = [f"{'model':<26}{'rows':>8}{'est in tok':>13}{'est out tok':>13}"
             f"{'est cost $':>12}{'est wall s':>12}  bound"]
    for name, v in f["models"].items():
        lines.append(f"{name:<26}{v['rows']:>8}{v['est_input_tokens']:>13}"
                     f"{v['est_output_tokens']:>13}{v['est_cost_usd']:>12.4f}"
                     f"{v['est_wall_s']:>12.1f}  {v['bound_by']}")
    lines.append(f"rejected before dispatch: {f['rejected']}   est total ${f['est_cost_usd']:.4f}"
                 f" vs ${f['est_reference_cost_usd']:.4f} all on {f['reference_model']}"
                 f"   est wall {f['est_wall_s']:.0f}s")
    return "\n".join(lines)
