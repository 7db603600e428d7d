"""Rollup stage: per-model totals over a run's results, and the counterfactual baseline.

Money is summed in integer micro-dollars, so totals reconcile with the result rows exactly.
The counterfactual sends every ok row to the reference model (by default the most expensive
in the catalog): the same input tokens, and output tokens from the reference model's own
output/input ratio in this run, or the job's ``reference_output_ratio`` when it answered
nothing (else the run's overall ratio). Rows the reference model did answer count at their
actual tokens.
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

COLUMNS = ["request_id", "model", "status", "input_tokens", "cached_input_tokens",
           "output_tokens", "cost_micro_usd", "latency_ms", "attempts", "escalations"]
BILLED = ["input_tokens", "cached_input_tokens", "output_tokens", "cost_micro_usd", "attempts"]


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


def output_ratio(results: pl.DataFrame | pl.LazyFrame, reference_model: str,
                 configured: float | None) -> tuple[float, str]:
    """(output tokens per input token for the counterfactual, where it came from)."""
    ok = results.lazy().filter(pl.col("status") == "ok")
    sums = ok.group_by(is_ref=pl.col("model") == reference_model).agg(
        pl.col("input_tokens").sum(), pl.col("output_tokens").sum()).collect()
    ref = sums.filter(pl.col("is_ref"))
    if len(ref) and ref["input_tokens"][0] > 0:
        return ref["output_tokens"][0] / ref["input_tokens"][0], "reference model"
    if configured is not None:
        return configured, "job.reference_output_ratio"
    total_in = int(sums["input_tokens"].sum() or 0)
    ratio = int(sums["output_tokens"].sum() or 0) / total_in if total_in else 0.0
    return ratio, "all models"


def rollup(results: pl.DataFrame | pl.LazyFrame, *, run_id: str,
           models: Mapping[str, ModelConfig], reference_model: str,
           reference_output_ratio: float | None = None) -> pa.Table:
    """One ``rollups`` row per model (model null: rows rejected before routing).

    Rows count under the model that answered them; tokens, cost and attempts under the model
    that billed them, so an escalated row's first attempt is on the cheap model's bill.
    """
    ref = models[reference_model]
    ratio, ratio_from = output_ratio(results, reference_model, reference_output_ratio)
    ok = pl.col("status") == "ok"
    lazy = results.lazy()
    cached_price = (ref.input_usd_per_mtok if ref.cached_input_usd_per_mtok is None
                    else ref.cached_input_usd_per_mtok)
    as_reference = pl.when(pl.col("model") == reference_model).then(
        # Its own answers at their actual tokens (not their escalation attempts' cost).
        (pl.col("input_tokens") - pl.col("cached_input_tokens")) * ref.input_usd_per_mtok
        + pl.col("cached_input_tokens") * cached_price
        + pl.col("output_tokens") * ref.output_usd_per_mtok).otherwise(
        # The same prompt on the reference model, cached part included, at its prices.
        pl.col("input_tokens") * ref.input_usd_per_mtok
        + pl.col("input_tokens") * ratio * ref.output_usd_per_mtok) * (1.0 - ref.batch_discount)
    failed = pl.col("status") == "failed"
    # A row's cost includes its escalation attempts, which are billed by the model they were
    # made on: keep only the answering model's own part here.
    own_cost = pl.col("cost_micro_usd") - pl.col("escalations").list.eval(
        pl.element().struct.field("cost_micro_usd")).list.sum().fill_null(0)
    answered = (
        lazy.with_columns(reference_micro=pl.when(ok).then(as_reference).otherwise(0.0),
                          cost_micro_usd=own_cost)
        .group_by("model")
        .agg(
            rows=pl.len().cast(pl.Int64),
            ok=ok.sum().cast(pl.Int64),
            failed=failed.sum().cast(pl.Int64),
            rejected=(pl.col("status") == "rejected").sum().cast(pl.Int64),
            **{c: pl.col(c).sum().cast(pl.Int64) for c in BILLED},
            failed_cost_micro_usd=pl.col("cost_micro_usd").filter(failed).sum(),
            reference_micro=pl.col("reference_micro").sum(),
            latency_p50_ms=pl.col("latency_ms").filter(ok).quantile(0.5, "linear"),
            latency_p95_ms=pl.col("latency_ms").filter(ok).quantile(0.95, "linear"),
        )
    )
    attempts = (lazy.select("status", e=pl.col("escalations"))
                .explode("e").filter(pl.col("e").is_not_null())
                .select("status", pl.col("e").struct.unnest()))
    billed = attempts.group_by("model").agg(
        escalated=pl.len().cast(pl.Int64),
        esc_failed_cost_micro_usd=pl.col("cost_micro_usd").filter(failed).sum(),
        **{f"esc_{c}": pl.col(c).sum() for c in BILLED})
    summed = [*BILLED, "failed_cost_micro_usd"]
    counts = ["rows", "ok", "failed", "rejected", "escalated", *summed,
              *[f"esc_{c}" for c in summed]]
    frame = (
        answered.join(billed, on="model", how="full", coalesce=True, nulls_equal=True)
        .with_columns(pl.col(counts).fill_null(0), pl.col("reference_micro").fill_null(0.0))
        .with_columns(
            **{c: (pl.col(c) + pl.col(f"esc_{c}")).cast(pl.Int64) for c in summed},
            reference_cost_micro_usd=pl.col("reference_micro").round(0).cast(pl.Int64))
        .with_columns(
            run_id=pl.lit(run_id),
            reference_model=pl.lit(reference_model),
            reference_output_ratio=pl.lit(ratio, pl.Float64),
            reference_ratio_from=pl.lit(ratio_from),
            cost_usd=pl.col("cost_micro_usd") / 1e6,
            reference_cost_usd=pl.col("reference_cost_micro_usd") / 1e6,
            savings_usd=(pl.col("reference_cost_micro_usd") - pl.col("cost_micro_usd")) / 1e6,
            share_of_requests=pl.col("rows") / pl.col("rows").sum().clip(lower_bound=1),
        )
        .with_columns(savings_pct=pl.when(pl.col("reference_cost_micro_usd") != 0).then(
            100.0 * pl.col("savings_usd") / pl.col("reference_cost_usd")))
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
