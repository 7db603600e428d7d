"""``batchroute report``: spend, savings and routing over many runs, for finance.

It reads the run folders under one output URI (finished runs only), and groups them by the
day their calls were priced (``price_date`` in the manifest), the job, the model and the
row's tags. Money stays in integer micro-dollars from the result rows to the totals, so every
total equals the sum of ``cost_micro_usd`` (and so of ``cost_usd``) over the rows it covers.

Two kinds of amount are summed:
- *billed* amounts (tokens, cost) are charged to the model that made each call: an escalated
  row's earlier attempts are on the cheaper model's bill, as in the run's rollups;
- *request* counts (rows, ok, failed, rejected) go to the model that answered.
A row with several tags counts under each of them; a row without tags under ``(none)``.

The reference-model counterfactual comes from each run's rollups (its per-model grain), so it
is reported for groupings by day, job and model, and left empty when grouping by tag.

Outputs in ``--out``: ``report.parquet``/``.csv`` (the requested grouping), ``daily.parquet``
/``.csv`` (day x model), ``tags.parquet``/``.csv``, ``forecast.parquet``/``.csv`` (forecast
against actual cost per run and model), ``runs.csv`` (what is covered), ``charts/*.png`` and
``report.html``, one self-contained page with the same charts inlined.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from batchroute import schemas
from batchroute.errors import ConfigError
from batchroute.stages import rollup
from batchroute.stages.manifest import NAME as MANIFEST
from batchroute.stages.manifest import Manifest
from batchroute.stages.results import BILLED
from batchroute.stages.sink import RunFolder

DIMENSIONS = ("day", "job", "model", "tag", "tier")
NO_TAG = "(none)"
RESULT_COLUMNS = ["request_id", "model", "status", "tier", "input_tokens", "cached_input_tokens",
                  "cache_write_input_tokens", "output_tokens", "reasoning_tokens", "cost_micro_usd", "attempts",
                  "invalid_answers", "latency_ms",
                  "tags", "escalations"]
# The billed amounts the report sums (the rollups also count HTTP attempts).
AMOUNTS = [c for c in BILLED if c != "attempts"]
CHARTS = ("spend_by_day", "savings_by_day", "routing_mix", "failure_rate", "top_tags")


@dataclass(frozen=True)
class Run:
    run_id: str
    job: str
    day: str  # the date its calls were priced, ISO
    path: str
    rows: int
    # Batch-tier models whose deadline passed, and the rows sent sync at full price then.
    deadline_passed: str = ""
    sent_sync_after_deadline: int = 0
    # The shadow checks' estimate ([quality]): retained quality with its 95% interval.
    quality_retained: float | None = None
    quality_low: float | None = None
    quality_high: float | None = None
    quality_shadowed: int = 0
    quality_overhead_micro_usd: int = 0
    quality_flagged: bool = False


@dataclass
class Report:
    runs: list[Run]
    skipped: list[tuple[str, str]]  # (run folder, why it is not covered)
    total_micro_usd: int
    result_rows: int
    files: list[str] = field(default_factory=list)


def build(runs_uri: str, out_dir: str | Path, *, date_from: date | None = None,
          date_to: date | None = None, by: Sequence[str] = ("day", "model")) -> Report:
    """Aggregate the finished runs under ``runs_uri`` into ``out_dir``.

    Raises ConfigError for an unknown grouping, an empty date range, or no run to report on.
    """
    unknown = [d for d in by if d not in DIMENSIONS]
    if unknown or not by:
        raise ConfigError(f"--by: {unknown[0] if unknown else '(empty)'!r} is not one of "
                          f"{', '.join(DIMENSIONS)}")
    if date_from and date_to and date_from > date_to:
        raise ConfigError(f"--from {date_from} is after --to {date_to}")
    fs, base = _filesystem(runs_uri)
    runs, skipped = _discover(fs, base, date_from, date_to)
    if not runs:
        why = "; ".join(f"{p}: {w}" for p, w in skipped[:5]) or "no run folders"
        raise ConfigError(f"{runs_uri}: no finished run to report on ({why})")
    out = Path(out_dir)
    (out / "charts").mkdir(parents=True, exist_ok=True)

    # Lazy scans, aggregated with the streaming engine: a month of nightly runs is never
    # loaded whole.
    rows = pl.concat([_results(fs, r) for r in runs], how="vertical")
    charges = _charges(rows)
    rollups = pl.concat([_rollups(fs, r) for r in runs], how="vertical")
    totals = rows.select(micro=pl.col("cost_micro_usd").sum(), n=pl.len()).collect(
        engine="streaming")
    report = Report(runs, skipped, int(totals["micro"][0] or 0), int(totals["n"][0]))

    tables = {
        "report": _grouped(rows, charges, rollups, list(by)),
        "daily": _grouped(rows, charges, rollups, ["day", "model"]),
        "tags": _grouped(rows, charges, rollups, ["tag"]).sort("cost_micro_usd",
                                                              descending=True),
        # Spend by the tier each call was billed at (sync, batch, flex).
        "tiers": _grouped(rows, charges, rollups, ["tier"]),
        "forecast": _forecast(fs, runs, rollups),
        "quality": _quality(runs, rollups),
    }
    for name, table in tables.items():
        table.write_parquet(out / f"{name}.parquet")
        table.write_csv(out / f"{name}.csv")
        report.files += [str(out / f"{name}.parquet"), str(out / f"{name}.csv")]
    pl.DataFrame([vars(r) for r in runs]).write_csv(out / "runs.csv")
    report.files.append(str(out / "runs.csv"))

    pngs = _charts(tables["daily"], tables["tags"], out / "charts")
    report.files += [str(p) for p in pngs.values()]
    page = out / "report.html"
    page.write_text(_html(report, tables, pngs, runs_uri, list(by)))
    report.files.append(str(page))
    return report


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _discover(fs: pafs.FileSystem, base: str, date_from: date | None,
              date_to: date | None) -> tuple[list[Run], list[tuple[str, str]]]:
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise ConfigError(f"--runs {base}: not a folder of runs")
    runs, skipped = [], []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        folder = RunFolder.on(fs, info.path)
        if not folder.has(MANIFEST):
            continue  # not a run folder (a backfill's input copy, notes, ...)
        try:
            manifest = Manifest.read(folder)
        except ConfigError as exc:
            skipped.append((info.path, str(exc)))
            continue
        if manifest is None:
            continue
        if not manifest.finished:
            skipped.append((info.path, "not finished (no rollup yet)"))
            continue
        day = manifest.day
        if (date_from and day < date_from.isoformat()) or (date_to and day > date_to.isoformat()):
            continue
        batches = {m: s["batch"] for m, s in (manifest.dispatch or {}).items()
                   if isinstance(s, dict) and s.get("batch")}
        late = [m for m, b in batches.items() if b.get("deadline_passed")]
        q = manifest.quality or {}
        runs.append(Run(run_id=manifest.run_id, job=manifest.job, day=day, path=info.path,
                        rows=int(sum(manifest.counts.values())),
                        quality_retained=q.get("retained"), quality_low=q.get("retained_low"),
                        quality_high=q.get("retained_high"),
                        quality_shadowed=int(q.get("shadowed") or 0),
                        quality_overhead_micro_usd=round(float(q.get("cost_usd") or 0) * 1e6),
                        quality_flagged=bool(q.get("flagged")),
                        deadline_passed=",".join(sorted(late)),
                        sent_sync_after_deadline=sum(int(b.get("sent_sync_after_deadline", 0))
                                                     for b in batches.values())))
    return runs, skipped


def _results(fs: pafs.FileSystem, run: Run) -> pl.LazyFrame:
    dataset = ds.dataset(f"{run.path}/results", filesystem=fs, format="parquet",
                         schema=schemas.RESULTS)
    return pl.scan_pyarrow_dataset(dataset).select(*RESULT_COLUMNS, "cost_usd").with_columns(
        # Runs from before integer money have only cost_usd.
        cost_micro_usd=pl.coalesce("cost_micro_usd",
                                   (pl.col("cost_usd") * 1e6).round(0).cast(pl.Int64)),
        cached_input_tokens=pl.col("cached_input_tokens").fill_null(0),
        cache_write_input_tokens=pl.col("cache_write_input_tokens").fill_null(0),
        invalid_answers=pl.col("invalid_answers").fill_null(0),
        reasoning_tokens=pl.col("reasoning_tokens").fill_null(0),
        run_id=pl.lit(run.run_id), job=pl.lit(run.job), day=pl.lit(run.day)).drop("cost_usd")


def _rollups(fs: pafs.FileSystem, run: Run) -> pl.DataFrame:
    dataset = ds.dataset(f"{run.path}/rollups", filesystem=fs, format="parquet",
                         schema=schemas.ROLLUPS)
    frame = pl.from_arrow(dataset.to_table(columns=[
        "model", "cost_micro_usd", "reference_cost_micro_usd"]))
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(run_id=pl.lit(run.run_id), job=pl.lit(run.job),
                              day=pl.lit(run.day))


def _charges(rows: pl.LazyFrame) -> pl.LazyFrame:
    """One row per billed call group (see :func:`rollup.charges`)."""
    return rollup.charges(rows, ["run_id", "job", "day", "tags", "status"])


def _with_tag(frame: pl.LazyFrame) -> pl.LazyFrame:
    tags = pl.when(pl.col("tags").list.len() > 0).then(pl.col("tags")).otherwise(
        pl.lit([NO_TAG], pl.List(pl.String)))
    return frame.with_columns(tag=tags).explode("tag")


def _grouped(rows: pl.LazyFrame, charges: pl.LazyFrame, rollups: pl.DataFrame,
             by: list[str]) -> pl.DataFrame:
    if "tag" in by:
        rows, charges = _with_tag(rows), _with_tag(charges)
    ok = pl.col("status") == "ok"
    requests = rows.group_by(by).agg(
        rows=pl.len().cast(pl.Int64), ok=ok.sum().cast(pl.Int64),
        failed=(pl.col("status") == "failed").sum().cast(pl.Int64),
        rejected=(pl.col("status") == "rejected").sum().cast(pl.Int64),
        latency_p50_ms=pl.col("latency_ms").filter(ok).quantile(0.5, "linear"),
        latency_p95_ms=pl.col("latency_ms").filter(ok).quantile(0.95, "linear"))
    billed = charges.group_by(by).agg(
        *[pl.col(c).sum().cast(pl.Int64) for c in AMOUNTS],
        failed_cost_micro_usd=pl.col("cost_micro_usd").filter(
            pl.col("status") == "failed").sum().cast(pl.Int64))
    table = requests.join(billed, on=by, how="full", coalesce=True, nulls_equal=True)
    counts = ["rows", "ok", "failed", "rejected", *AMOUNTS, "failed_cost_micro_usd"]
    table = table.with_columns(pl.col(counts).fill_null(0))
    if "tag" not in by and "tier" not in by:
        reference = rollups.lazy().group_by(by).agg(
            reference_cost_micro_usd=pl.col("reference_cost_micro_usd").sum())
        table = table.join(reference, on=by, how="left", nulls_equal=True)
    else:
        table = table.with_columns(reference_cost_micro_usd=pl.lit(None, pl.Int64))
    return (table.with_columns(
        cost_usd=pl.col("cost_micro_usd") / 1e6,
        reference_cost_usd=pl.col("reference_cost_micro_usd") / 1e6,
        savings_usd=(pl.col("reference_cost_micro_usd") - pl.col("cost_micro_usd")) / 1e6,
        failure_rate=pl.when(pl.col("rows") > 0).then(pl.col("failed") / pl.col("rows")),
        # The share of the answers billed here that could not be used ([task.output]).
        invalid_rate=pl.when((pl.col("invalid_answers") + pl.col("ok")) > 0).then(
            pl.col("invalid_answers") / (pl.col("invalid_answers") + pl.col("ok"))),
        share_of_requests=pl.col("rows") / pl.col("rows").sum().clip(lower_bound=1))
        .with_columns(savings_pct=pl.when(pl.col("reference_cost_usd") > 0).then(
            100.0 * pl.col("savings_usd") / pl.col("reference_cost_usd")))
        .sort(by, nulls_last=True).collect(engine="streaming"))


def _quality(runs: list[Run], rollups: pl.DataFrame) -> pl.DataFrame:
    """Savings and retained quality side by side, per run, oldest first: what routing saved
    against the reference model and what it kept of the reference's quality (shadow checks;
    null for a run without [quality])."""
    saved = (rollups.group_by("run_id")
             .agg(cost=pl.col("cost_micro_usd").sum(),
                  reference=pl.col("reference_cost_micro_usd").sum())
             .with_columns(savings_pct=pl.when(pl.col("reference") > 0).then(
                 100.0 * (pl.col("reference") - pl.col("cost")) / pl.col("reference")))
             .select("run_id", "savings_pct"))
    frame = pl.DataFrame(
        [{"run_id": r.run_id, "day": r.day, "job": r.job,
          "retained_pct": None if r.quality_retained is None else 100 * r.quality_retained,
          "retained_low_pct": None if r.quality_low is None else 100 * r.quality_low,
          "retained_high_pct": None if r.quality_high is None else 100 * r.quality_high,
          "shadowed": r.quality_shadowed,
          "quality_overhead_micro_usd": r.quality_overhead_micro_usd,
          "flagged": r.quality_flagged} for r in runs],
        schema={"run_id": pl.String, "day": pl.String, "job": pl.String,
                "retained_pct": pl.Float64, "retained_low_pct": pl.Float64,
                "retained_high_pct": pl.Float64, "shadowed": pl.Int64,
                "quality_overhead_micro_usd": pl.Int64, "flagged": pl.Boolean})
    return (frame.join(saved, on="run_id", how="left")
            .select("day", "job", "run_id", "savings_pct", "retained_pct", "retained_low_pct",
                    "retained_high_pct", "shadowed", "quality_overhead_micro_usd", "flagged")
            .sort("day", "run_id"))


def _forecast(fs: pafs.FileSystem, runs: list[Run], rollups: pl.DataFrame) -> pl.DataFrame:
    """The plan's estimated cost per model against what the model billed, with the basis of
    its output tokens (``history`` or ``max_tokens``; a forecast written before the basis was
    recorded priced every answer at max_tokens)."""
    est = []
    for run in runs:
        try:
            with fs.open_input_stream(f"{run.path}/forecast.json") as f:
                forecast = json.loads(f.read())
        except (FileNotFoundError, OSError):
            continue
        est += [{"run_id": run.run_id, "model": m,
                 "forecast_micro_usd": round(float(v["est_cost_usd"]) * 1e6),
                 "output_basis": str(v.get("output_basis", "max_tokens"))}
                for m, v in forecast.get("models", {}).items()]
    schema = {"run_id": pl.String, "model": pl.String, "forecast_micro_usd": pl.Int64,
              "output_basis": pl.String}
    frame = pl.DataFrame(est, schema=schema)
    actual = rollups.filter(pl.col("model").is_not_null()).select(
        "run_id", "day", "job", "model", actual_micro_usd="cost_micro_usd")
    return (frame.join(actual, on=["run_id", "model"], how="full", coalesce=True)
            .with_columns(pl.col("forecast_micro_usd", "actual_micro_usd").fill_null(0))
            .with_columns(
                forecast_usd=pl.col("forecast_micro_usd") / 1e6,
                actual_usd=pl.col("actual_micro_usd") / 1e6,
                error_pct=pl.when(pl.col("actual_micro_usd") > 0).then(
                    100.0 * (pl.col("forecast_micro_usd") - pl.col("actual_micro_usd"))
                    / pl.col("actual_micro_usd")))
            .sort("run_id", "model"))


def _charts(daily: pl.DataFrame, tags: pl.DataFrame, folder: Path) -> dict[str, Path]:
    import logging

    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # day labels are categories
    import matplotlib.pyplot as plt

    days = sorted(daily["day"].unique().to_list())
    models = sorted(daily["model"].drop_nulls().unique().to_list())
    per = {(r["day"], r["model"]): r for r in daily.iter_rows(named=True)}
    paths: dict[str, Path] = {}

    def save(name: str, fig: Any) -> None:
        if not days:
            fig.axes[0].text(0.5, 0.5, "no calls in the period", ha="center",
                             transform=fig.axes[0].transAxes)
        fig.tight_layout()
        paths[name] = folder / f"{name}.png"
        fig.savefig(paths[name], dpi=100)
        plt.close(fig)

    def stacked(ax: Any, value: str) -> None:
        bottom = [0.0] * len(days)
        for m in models:
            heights = [float(per.get((d, m), {}).get(value) or 0.0) for d in days]
            ax.bar(days, heights, bottom=bottom, label=m)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        if models:
            ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=45)

    fig, ax = plt.subplots(figsize=(8, 4))
    stacked(ax, "cost_usd")
    ax.set(title="Spend per day by model", ylabel="USD")
    save("spend_by_day", fig)

    actual = [sum(float(per.get((d, m), {}).get("cost_usd") or 0.0) for m in models)
              for d in days]
    baseline = [sum(float(per.get((d, m), {}).get("reference_cost_usd") or 0.0)
                    for m in models) for d in days]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(days, baseline, marker="o", label="everything on the reference model")
    ax.plot(days, actual, marker="o", label="routed (actual)")
    ax.fill_between(days, actual, baseline, alpha=0.2, label="savings")
    ax.set(title="Spend against the reference-model baseline", ylabel="USD")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=45)
    save("savings_by_day", fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    totals = {d: sum(float(per.get((d, m), {}).get("rows") or 0) for m in (*models, None))
              or 1.0 for d in days}
    bottom = [0.0] * len(days)
    for m in models:
        share = [100.0 * float(per.get((d, m), {}).get("rows") or 0) / totals[d] for d in days]
        ax.bar(days, share, bottom=bottom, label=m)
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    ax.set(title="Routing mix: share of requests per model", ylabel="% of requests")
    if models:
        ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=45)
    save("routing_mix", fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    failed = [sum(int(per.get((d, m), {}).get("failed") or 0) for m in (*models, None))
              for d in days]
    ax.plot(days, [100.0 * f / totals[d] for f, d in zip(failed, days, strict=True)],
            marker="o")
    ax.set(title="Failure rate per day", ylabel="% of requests failed")
    ax.set_ylim(bottom=0)
    ax.tick_params(axis="x", labelrotation=45)
    save("failure_rate", fig)

    top = tags.head(10)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(top["tag"].to_list()[::-1], top["cost_usd"].to_list()[::-1])
    ax.set(title="Top tags by spend", xlabel="USD")
    save("top_tags", fig)
    return paths


def format_usd(micro: int | None) -> str:
    """Micro-dollars as dollars to the cent (half up), for people."""
    if micro is None:
        return "—"
    sign = "-" if micro < 0 else ""
    cents = (abs(micro) + 5_000) // 10_000  # to the cent, half up
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


def _table_html(frame: pl.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c.removesuffix('_micro_usd'))}</th>" for c in columns)
    body = []
    for row in frame.select(columns).iter_rows(named=True):
        cells = []
        for c in columns:
            v = row[c]
            if c.endswith("_micro_usd"):
                text = format_usd(v)
            elif c.endswith("_rate") and isinstance(v, float):
                text = f"{v:.1%}"
            elif isinstance(v, float):
                text = f"{v:,.2f}"
            else:
                text = "—" if v is None else str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _html(report: Report, tables: dict[str, pl.DataFrame], pngs: dict[str, Path],
          runs_uri: str, by: list[str]) -> str:
    main = tables["report"]
    money = ["cost_micro_usd", "failed_cost_micro_usd", "reference_cost_micro_usd"]
    # invalid: answers that were not one of the labels or did not match the schema.
    columns = [*by, "rows", "ok", "failed", "rejected", "invalid_answers", "invalid_rate",
               "input_tokens", "cached_input_tokens", "cache_write_input_tokens",
               "output_tokens", "reasoning_tokens", *money, "savings_pct"]
    charts = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(pngs[name].read_bytes()).decode()}"></figure>' for name in CHARTS)
    reference = (int(main["reference_cost_micro_usd"].fill_null(0).sum())
                 if "tag" not in by else None)
    runs_list = "".join(
        f"<li>{html.escape(r.run_id)} ({html.escape(r.job)}, {r.day}, {r.rows:,} rows)"
        + (f": the batch deadline passed for {html.escape(r.deadline_passed)}, "
           f"{r.sent_sync_after_deadline:,} rows sent sync at full price"
           if r.deadline_passed else "") + "</li>" for r in report.runs)
    skipped = "".join(f"<li>{html.escape(p)}: {html.escape(w)}</li>" for p, w in report.skipped)
    flagged = [r.run_id for r in report.runs if r.quality_flagged]
    banner = (f'<p class="flag" id="quality-flag">Quality below the job\'s min_retained in '
              f'{len(flagged)} run(s): {html.escape(", ".join(flagged))}. Their savings came '
              "at a measured loss of quality; see the table below.</p>" if flagged else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchroute spend report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f2f2f2; }}
figure {{ display: inline-block; margin: 0.5em; }}
img {{ max-width: 800px; border: 1px solid #ddd; }}
.total {{ font-size: 1.4em; }}
.flag {{ background: #fde2e1; border: 1px solid #c00; padding: 0.6em; font-weight: bold; }}
</style></head><body>
<h1>batchroute spend report</h1>
{banner}<p class="total">Total spend <b id="total">{format_usd(report.total_micro_usd)}</b> over
{report.result_rows:,} result rows of {len(report.runs)} runs
(reference-model baseline {format_usd(reference)}).</p>
<p>The total is the exact sum of <code>cost_usd</code> over every result row of the runs
listed below, kept in integer micro-dollars and rounded to the cent only here.
Source: <code>{html.escape(runs_uri)}</code>.</p>
<h2>Charts</h2>{charts}
<h2>By {html.escape(", ".join(by))}</h2>{_table_html(main, columns)}
<h2>Spend by tier</h2>
{_table_html(tables["tiers"], ["tier", "rows", "ok", "input_tokens", "output_tokens",
                               "cost_micro_usd"])}
<h2>Savings and quality retained, per run</h2>
<p>Quality retained: the shadow checks' estimate of the quality kept against sending every row
to the reference model, with its 95% interval ([quality] in the job; empty for runs without
it). The overhead (shadow and judge calls) is not in the spend above.</p>
{_table_html(tables["quality"], ["day", "job", "run_id", "savings_pct", "retained_pct",
                                 "retained_low_pct", "retained_high_pct", "shadowed",
                                 "quality_overhead_micro_usd", "flagged"])}
<h2>Forecast against actual, per run and model</h2>
{_table_html(tables["forecast"], ["run_id", "model", "forecast_micro_usd",
                                  "actual_micro_usd", "error_pct", "output_basis"])}
<h2>Runs covered</h2><ul>{runs_list}</ul>
{"<h2>Not covered</h2><ul>" + skipped + "</ul>" if skipped else ""}
</body></html>
"""
