"""Rollup stage: per-model totals over a run's results, and the counterfactual baseline.

The counterfactual prices every ok row's actual tokens at the reference model's prices (by
default the most expensive model in the catalog): what the run would have cost without
routing. Totals are sums over the result rows, so they reconcile with them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from batchroute import schemas
from batchroute.config import ModelConfig
from batchroute.sink import RunFolder

COLUMNS = ["request_id", "model", "status", "input_tokens", "output_tokens", "cost_usd",
           "latency_ms", "attempts", "escalations"]
BILLED = ["input_tokens", "output_tokens", "cost_usd", "attempts"]


def read_results(folder: RunFolder) -> pl.LazyFrame:
    """A lazy scan of the columns rollups need over every committed result shard, so a
    rollup streams through the results instead of loading them (no shards: empty)."""
    path = folder.sub("results")
    if folder.fs.get_file_info(path).type == pafs.FileType.NotFound:
        empty = pl.from_arrow(schemas.RESULTS.empty_table().select(COLUMNS))
        assert isinstance(empty, pl.DataFrame)
        return empty.lazy()
    dataset = ds.dataset(path, filesystem=folder.fs, format="parquet", schema=schemas.RESULTS)
    return pl.scan_pyarrow_dataset(dataset).select(COLUMNS)


def rollup(results: pl.DataFrame | pl.LazyFrame, *, run_id: str,
           models: Mapping[str, ModelConfig], reference_model: str) -> pa.Table:
    """One ``rollups`` row per model (model null: rows rejected before routing).

    Rows count under the model that answered them; tokens, cost and attempts under the model
    that billed them, so an escalated row's first attempt is on the cheap model's bill.
    """
    ref = models[reference_model]
    ok = pl.col("status") == "ok"
    lazy = results.lazy()
    answered = (
        lazy.with_columns(
            reference_cost=pl.when(ok).then(
                (pl.col("input_tokens") * ref.input_usd_per_mtok
                 + pl.col("output_tokens") * ref.output_usd_per_mtok) / 1e6).otherwise(0.0))
        .group_by("model")
        .agg(
            rows=pl.len().cast(pl.Int64),
            ok=ok.sum().cast(pl.Int64),
            failed=(pl.col("status") == "failed").sum().cast(pl.Int64),
            rejected=(pl.col("status") == "rejected").sum().cast(pl.Int64),
            input_tokens=pl.col("input_tokens").sum().cast(pl.Int64),
            output_tokens=pl.col("output_tokens").sum().cast(pl.Int64),
            cost_usd=pl.col("cost_usd").sum().cast(pl.Float64),
            reference_cost_usd=pl.col("reference_cost").sum().cast(pl.Float64),
            latency_p50_ms=pl.col("latency_ms").filter(ok).quantile(0.5, "linear"),
            latency_p95_ms=pl.col("latency_ms").filter(ok).quantile(0.95, "linear"),
            attempts=pl.col("attempts").sum().cast(pl.Int64),
        )
    )
    # Escalation attempts: billed by the model they were made on, not the one that answered
    # (whose rows' cost_usd includes them).
    attempts = (lazy.select(answered_by=pl.col("model"), e=pl.col("escalations"))
                .explode("e").filter(pl.col("e").is_not_null())
                .select("answered_by", pl.col("e").struct.unnest()))
    moved_out = attempts.group_by("answered_by").agg(
        moved_cost=pl.col("cost_usd").sum()).rename({"answered_by": "model"})
    billed = attempts.group_by("model").agg(
        escalated=pl.len().cast(pl.Int64),
        **{f"esc_{c}": pl.col(c).sum() for c in BILLED})
    frame = (
        answered.join(moved_out, on="model", how="left", nulls_equal=True)
        .join(billed, on="model", how="full", coalesce=True, nulls_equal=True)
        .with_columns(pl.col("rows", "ok", "failed", "rejected", "escalated", "input_tokens",
                             "output_tokens", "attempts", *[f"esc_{c}" for c in BILLED])
                      .fill_null(0),
                      pl.col("cost_usd", "reference_cost_usd", "moved_cost").fill_null(0.0))
        .with_columns(
            input_tokens=(pl.col("input_tokens") + pl.col("esc_input_tokens")).cast(pl.Int64),
            output_tokens=(pl.col("output_tokens") + pl.col("esc_output_tokens")).cast(
                pl.Int64),
            cost_usd=(pl.col("cost_usd") - pl.col("moved_cost") + pl.col("esc_cost_usd")),
            attempts=(pl.col("attempts") + pl.col("esc_attempts")).cast(pl.Int64),
        )
        .with_columns(
            run_id=pl.lit(run_id),
            reference_model=pl.lit(reference_model),
            savings_usd=pl.col("reference_cost_usd") - pl.col("cost_usd"),
            share_of_requests=pl.col("rows") / pl.col("rows").sum().clip(lower_bound=1),
        )
        .sort("model", nulls_last=True)
        .select(schemas.ROLLUPS.names)
        .collect(engine="streaming")
    )
    return frame.to_arrow().cast(schemas.ROLLUPS)


def format_table(rollups: pa.Table) -> str:
    """The per-model table the CLI prints, with a total line."""
    rows = rollups.to_pylist()
    head = (f"{'model':<24}{'rows':>7}{'ok':>7}{'failed':>7}{'rejected':>9}{'in tok':>11}"
            f"{'out tok':>10}{'cost $':>10}{'vs ref $':>11}{'saved':>7}")
    lines = [head, "-" * len(head)]
    tot = dict.fromkeys(("rows", "ok", "failed", "rejected", "input_tokens", "output_tokens", "cost_usd", "reference_cost_usd"), 0.0)
    for r in rows:
        for k in tot:
            tot[k] += r[k]
        lines.append(_line(r["model"] or "(not routed)", r))
    lines.append("-" * len(head))
    lines.append(_line("TOTAL", tot))
    passed = [f"{r['model']} {r['escalated']}" for r in rows if r["escalated"]]
    if passed:
        lines.append("rows passed up the escalation ladder (billed above, where attempted): "
                     + ", ".join(passed))
    return "\n".join(lines)


def _line(name: str, r: Mapping[str, float]) -> str:
    saved = (1 - r["cost_usd"] / r["reference_cost_usd"]) if r["reference_cost_usd"] else 0.0
    return (f"{name:<24}{int(r['rows']):>7}{int(r['ok']):>7}{int(r['failed']):>7}"
            f"{int(r['rejected']):>9}{int(r['input_tokens']):>11}{int(r['output_tokens']):>10}"
            f"{r['cost_usd']:>10.4f}{r['reference_cost_usd']:>11.4f}{saved:>7.0%}")
