"""Rollup stage: per-model totals over a run's results, and the counterfactual baseline.

Money is summed in integer micro-dollars, so totals reconcile with the result rows exactly.
The counterfactual sends every ok row to the reference model (by default the most expensive
in the catalog): the same input tokens, and output tokens from the reference model's own
output/input ratio in this run, or the job's ``reference_output_ratio`` when it answered
nothing (else the run's overall ratio). Rows the reference model did answer count at their
actual tokens.

The results are read a few shards at a time and summed frame by frame; everything above is
linear in per-model sums, so only those and the ok rows' latencies (8 bytes a row, for exact
p50/p95) are kept. One polars query over a dataset of every shard held hundreds of MiB at 2M
rows (per-file state, and a quantile makes polars collect every input row).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import schemas
from batchroute.config import ModelConfig
from batchroute.stages.results import BILLED
from batchroute.stages.sink import RunFolder

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)

COLUMNS = ["request_id", "model", "status", "tier", "input_tokens", "cached_input_tokens",
           "cache_write_input_tokens", "output_tokens", "reasoning_tokens", "cost_micro_usd",
           "latency_ms", "attempts", "invalid_answers", "escalations", "route_cost_micro_usd"]
# Result shards are small (one dispatch batch each): frames of about this many rows keep each
# aggregation cheap without holding much.
FRAME_ROWS = 65_536
# Bills at a discounted tier: their cost, and their tokens (to price them at standard).
_DISCOUNTED = ["d_input", "d_cached", "d_cache_write", "d_output", "d_cost"]
_COUNTS = ["rows", "ok", "failed", "rejected", "escalated", *BILLED, "failed_cost_micro_usd",
           "routing_cost_micro_usd", "sync_cost_micro_usd", "batch_cost_micro_usd",
           "flex_cost_micro_usd", *_DISCOUNTED,
           "ok_input", "ok_cached", "ok_cache_write", "ok_output"]


def read_results(folder: RunFolder) -> Iterator[pl.DataFrame]:
    """The columns rollups need from every committed result shard, a few shards per frame
    (no shards: nothing)."""
    schema = pa.schema([schemas.RESULTS.field(c) for c in COLUMNS])
    tables: list[pa.Table] = []
    rows = 0
    for path in folder.shards(folder.sub("results")):
        # By name, and cast: shards written before a column existed read it as nulls.
        table = pq.read_table(path, filesystem=folder.fs)
        if "cost_micro_usd" not in table.column_names:  # written before integer money
            micro = pc.round(pc.multiply(table.column("cost_usd"), 1e6))
            table = table.append_column("cost_micro_usd", pc.cast(micro, pa.int64()))
        # Counters newer than the shard: 0.
        for counter in ("cached_input_tokens", "cache_write_input_tokens", "reasoning_tokens",
                        "invalid_answers"):
            if counter not in table.column_names:
                table = table.append_column(counter, pa.array(
                    [0] * table.num_rows, schemas.RESULTS.field(counter).type))
        if "escalations" in table.column_names:
            table = table.set_column(table.schema.get_field_index("escalations"),
                                     "escalations", _escalations(table.column("escalations")))
        table = pa.table({c: table.column(c) if c in table.column_names
                          else pa.nulls(table.num_rows, schema.field(c).type)
                          for c in COLUMNS}).cast(schema)
        tables.append(table)
        rows += table.num_rows
        if rows >= FRAME_ROWS:
            yield _frame(tables)
            tables, rows = [], 0
    if tables:
        yield _frame(tables)


def _escalations(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """``escalations`` as today's struct: a shard written before a field existed gets 0s."""
    want = schemas.RESULTS.field("escalations").type
    if col.type == want:
        return col
    arr = col.combine_chunks()
    items = arr.flatten()
    fields = [items.field(f.name).cast(f.type) if f.name in items.type.names
              else pa.array([0] * len(items), f.type) for f in schemas.ESCALATION]
    rebuilt = pa.StructArray.from_arrays(fields, fields=list(schemas.ESCALATION))
    return pa.chunked_array([pa.ListArray.from_arrays(arr.offsets, rebuilt,
                                                      mask=arr.is_null())], want)


def _frame(tables: list[pa.Table]) -> pl.DataFrame:
    frame = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(frame, pl.DataFrame)
    return frame


def charges(frame: FrameT, keys: Sequence[str] = ()) -> FrameT:
    """One row per bill: each results row's own call, and each of its escalation attempts,
    under the model that made it; columns ``keys``, ``model``, :data:`BILLED` and
    ``passed_up`` (true for an attempt that escalated). The one place escalation billing is
    worked out: its ``cost_micro_usd`` sums to the results' exactly, because a row's cost
    already includes its attempts' and its own share is the rest."""
    moved = pl.col("escalations").list.eval(
        pl.element().struct.field("cost_micro_usd")).list.sum().fill_null(0)
    own = frame.select(*keys, "model", "tier", *[c for c in BILLED if c != "cost_micro_usd"],
                       cost_micro_usd=pl.col("cost_micro_usd") - moved,
                       passed_up=pl.lit(False))
    attempts = (frame.select(*keys, e=pl.col("escalations")).explode("e")
                .filter(pl.col("e").is_not_null())
                .select(*keys, pl.col("e").struct.field("model"),
                        pl.col("e").struct.field("tier"),
                        *[pl.col("e").struct.field(c) for c in BILLED],
                        passed_up=pl.lit(True)))
    columns = [*keys, "model", "tier", *BILLED, "passed_up"]
    return pl.concat([own.select(columns), attempts.select(columns)], how="vertical_relaxed")


def _sums(frame: pl.DataFrame) -> pl.DataFrame:
    """Per-model sums of one frame: requests under the model that answered them, bills
    (:func:`charges`) under the model that made each call."""
    ok, failed = pl.col("status") == "ok", pl.col("status") == "failed"
    requests = frame.group_by("model").agg(
        rows=pl.len(), ok=ok.sum(), failed=failed.sum(),
        rejected=(pl.col("status") == "rejected").sum(),
        routing_cost_micro_usd=pl.col("route_cost_micro_usd").fill_null(0).sum(),
        ok_input=pl.col("input_tokens").filter(ok).sum(),
        ok_cached=pl.col("cached_input_tokens").filter(ok).sum(),
        ok_cache_write=pl.col("cache_write_input_tokens").filter(ok).sum(),
        ok_output=pl.col("output_tokens").filter(ok).sum())
    tier = pl.col("tier").fill_null("sync")
    discounted = tier.is_in(["batch", "flex"])
    billed = charges(frame, ["status"]).group_by("model").agg(
        escalated=pl.col("passed_up").sum(), **{c: pl.col(c).sum() for c in BILLED},
        failed_cost_micro_usd=pl.col("cost_micro_usd").filter(
            pl.col("status") == "failed").sum(),
        **{f"{t}_cost_micro_usd": pl.col("cost_micro_usd").filter(tier == t).sum()
           for t in ("sync", "batch", "flex")},
        **{d: pl.col(c).filter(discounted).sum() for d, c in zip(_DISCOUNTED, (
            "input_tokens", "cached_input_tokens", "cache_write_input_tokens",
            "output_tokens", "cost_micro_usd"), strict=True)})
    table = requests.join(billed, on="model", how="full", coalesce=True, nulls_equal=True)
    return table.select("model", *[pl.col(c).fill_null(0).cast(pl.Int64) for c in _COUNTS])


def output_ratio(totals: pl.DataFrame, reference_model: str,
                 configured: float | None) -> tuple[float, str]:
    """(output tokens per input token for the counterfactual, where it came from), from the
    per-model sums of ok rows."""
    ref = totals.filter(pl.col("model") == reference_model)
    if len(ref) and ref["ok_input"][0] > 0:
        return ref["ok_output"][0] / ref["ok_input"][0], "reference model"
    if configured is not None:
        return configured, "job.reference_output_ratio"
    total_in = int(totals["ok_input"].sum() or 0)
    return (int(totals["ok_output"].sum() or 0) / total_in if total_in else 0.0), "all models"


def rollup(results: pl.DataFrame | pl.LazyFrame | Iterable[pl.DataFrame], *, run_id: str,
           models: Mapping[str, ModelConfig], reference_model: str,
           reference_output_ratio: float | None = None,
           unrecovered: Mapping[str, int] | None = None) -> pa.Table:
    """One ``rollups`` row per model (model null: rows rejected before routing).

    ``results`` is one frame or a stream of them (see :func:`read_results`). Rows count under
    the model that answered them; tokens, cost and attempts under the model that billed them,
    so an escalated row's first attempt is on the cheap model's bill. ``unrecovered`` is what
    each model billed for answers that never reached a row (the run manifest keeps it).
    """
    frames: Iterable[pl.DataFrame | pl.LazyFrame] = (
        [results] if isinstance(results, pl.DataFrame | pl.LazyFrame) else results)
    sums: list[pl.DataFrame] = []
    latencies: dict[str | None, list[pl.Series]] = {}
    for raw in frames:
        frame = raw.collect() if isinstance(raw, pl.LazyFrame) else raw
        sums.append(_sums(frame))
        done = frame.filter((pl.col("status") == "ok") & pl.col("latency_ms").is_not_null())
        for (model,), part in done.partition_by("model", as_dict=True).items():
            latencies.setdefault(model, []).append(part["latency_ms"].cast(pl.Float64))
    if not sums:
        return schemas.ROLLUPS.empty_table()
    totals = pl.concat(sums).group_by("model").agg(pl.all().sum()).sort("model",
                                                                         nulls_last=True)
    ratio, ratio_from = output_ratio(totals, reference_model, reference_output_ratio)
    ref = models[reference_model]
    # Linear in the sums: the reference model's own answers at their actual tokens, every
    # other model's ok rows as the same prompt with output at the ratio.
    as_reference = pl.when(pl.col("model") == reference_model).then(
        (pl.col("ok_input") - pl.col("ok_cached") - pl.col("ok_cache_write"))
        * ref.input_usd_per_mtok
        + pl.col("ok_cached") * ref.cached_price
        + pl.col("ok_cache_write") * ref.cache_write_price
        + pl.col("ok_output") * ref.output_usd_per_mtok).otherwise(
        pl.col("ok_input") * (ref.input_usd_per_mtok + ratio * ref.output_usd_per_mtok))

    def quantile(q: float) -> pl.Series:
        return pl.Series([pl.concat(latencies[m]).quantile(q, "linear") if m in latencies
                          else None for m in totals["model"]], dtype=pl.Float64)

    # The discounted bills at their model's standard price (one rounding per model); the
    # rest of the bill is at standard already.
    undone = pl.Series([
        round(models[m].cost_usd(i, o, c, w) * 1e6) if m is not None else 0
        for m, i, c, w, o in totals.select("model", "d_input", "d_cached", "d_cache_write",
                                           "d_output").iter_rows()], dtype=pl.Int64)
    frame = (
        totals.with_columns(
            # The counterfactual is the reference model at its standard (sync) price.
            reference_cost_micro_usd=as_reference.round(0).cast(pl.Int64),
            standard_cost_micro_usd=pl.col("cost_micro_usd") - pl.col("d_cost") + undone,
            latency_p50_ms=quantile(0.5), latency_p95_ms=quantile(0.95),
            unrecovered_cost_micro_usd=pl.col("model").replace_strict(
                dict(unrecovered or {}), default=0, return_dtype=pl.Int64))
        .with_columns(
            run_id=pl.lit(run_id),
            reference_model=pl.lit(reference_model),
            reference_output_ratio=pl.lit(ratio, pl.Float64),
            reference_ratio_from=pl.lit(ratio_from),
            cost_usd=pl.col("cost_micro_usd") / 1e6,
            reference_cost_usd=pl.col("reference_cost_micro_usd") / 1e6,
            savings_usd=(pl.col("reference_cost_micro_usd") - pl.col("cost_micro_usd")) / 1e6,
            routing_savings_usd=(pl.col("reference_cost_micro_usd")
                                 - pl.col("standard_cost_micro_usd")) / 1e6,
            tier_savings_usd=(pl.col("standard_cost_micro_usd")
                              - pl.col("cost_micro_usd")) / 1e6,
            share_of_requests=pl.col("rows") / pl.col("rows").sum().clip(lower_bound=1),
            invalid=pl.col("invalid_answers"),
            invalid_rate=pl.when((pl.col("invalid_answers") + pl.col("ok")) > 0).then(
                pl.col("invalid_answers") / (pl.col("invalid_answers") + pl.col("ok"))),
        )
        .with_columns(savings_pct=pl.when(pl.col("reference_cost_micro_usd") != 0).then(
            100.0 * pl.col("savings_usd") / pl.col("reference_cost_usd")))
        .select(schemas.ROLLUPS.names)
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
    invalid = [f"{r['model']} {r['invalid']} ({r['invalid_rate']:.1%})" for r in rows
               if r.get("invalid")]
    if invalid:
        lines.append("unusable answers (off-label or not matching the schema; retried, "
                     "escalated or failed, and billed): " + ", ".join(invalid))
    return "\n".join(lines)


def label_table(folder: RunFolder, column: str = "label") -> str:
    """Labels per answering model over a run's ok rows (a labels task's results)."""
    frames = []
    for path in folder.shards(folder.sub("results")):
        table = pq.read_table(path, filesystem=folder.fs, columns=["model", "status", column],
                              filters=pc.field("status") == "ok")
        frames.append(_frame([table]))
    if not frames:
        return ""
    counts = (pl.concat(frames).group_by("model", column).len()
              .sort(["model", "len"], descending=[False, True]))
    lines = ["labels of ok rows, by the model that answered:"]
    for (model,), part in counts.partition_by("model", as_dict=True,
                                               maintain_order=True).items():
        total = int(part["len"].sum())
        shares = ", ".join(f"{lab} {n:,} ({n / total:.0%})"
                           for lab, n in part.select(column, "len").iter_rows())
        lines.append(f"  {model:<24}{total:>7,}  {shares}")
    return "\n".join(lines)


def _line(name: str, r: Mapping[str, float]) -> str:
    saved = (1 - r["cost_usd"] / r["reference_cost_usd"]) if r["reference_cost_usd"] else 0.0
    return (f"{name:<24}{int(r['rows']):>7}{int(r['ok']):>7}{int(r['failed']):>7}"
            f"{int(r['rejected']):>9}{int(r['input_tokens']):>11}{int(r['output_tokens']):>10}"
            f"{r['cost_usd']:>10.4f}{r['reference_cost_usd']:>11.4f}{saved:>7.0%}")
