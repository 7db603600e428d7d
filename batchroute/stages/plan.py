"""Plan stage: routed rows partitioned by target model, and the dry-run forecast.

This is the checkpoint between the cheap stage and the expensive one. Rows rejected by the
source or route stage are final here and go straight to the results as ``rejected`` rows;
everything else is written to ``routed/model=NAME/`` for dispatch. The forecast prices the plan
at each model's catalog prices and limits before a cent is spent.

Input tokens are estimated from the prompts (:mod:`batchroute.tokens`). Output tokens are
each model's billed tokens per answer in the job's last finished runs
(:mod:`batchroute.stages.history`) times its rows, never more than those rows' ``max_tokens``
in all; a model with no such history is forecast at the full ``max_tokens``, and the forecast
says which basis each model's figure has. Wall time keeps the full ``max_tokens``: the
limiters (ours and the provider's) admit a call at prompt plus ``max_tokens``, whatever it
answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from batchroute.config import DISCOUNTED_TIERS, JobConfig, ModelConfig
from batchroute.stages import history, results
from batchroute.stages.sink import ResultSink, RunFolder


class PlanWriter:
    """Splits routed batches by model and commits them in shards of about ``flush_rows`` rows
    or ``flush_bytes`` bytes, whichever comes first: long documents make rows large, and the
    buffers must stay small however the input is shaped."""

    def __init__(self, folder: RunFolder, sink: ResultSink, *, flush_rows: int = 65_536,
                 flush_bytes: int = 32 * 2**20, outputs: Sequence[pa.Field] = ()) -> None:
        self.folder = folder
        self.sink = sink
        self.outputs = outputs  # the task's output columns (batchroute.task.result_fields)
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
            self.sink.write(results.rejected(bad, self.folder.run_id, self.outputs))
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
        self.folder.write_table(self.folder.routed_dir(model), self.folder.shard_name(seq), table)


# Declared, not inferred: a model named "7" must come back as the string "7".
PARTITIONING = ds.partitioning(pa.schema([("model", pa.string())]), flavor="hive")


def routed_dataset(folder: RunFolder) -> ds.Dataset | None:
    """The plan as one dataset with the ``model`` partition column restored; None when no
    row was routed."""
    path = folder.sub("routed")
    if folder.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return ds.dataset(path, filesystem=folder.fs, format="parquet", partitioning=PARTITIONING)


def forecast(folder: RunFolder, job: JobConfig, rejected: int,
             past: history.History | None = None) -> dict[str, Any]:
    """Rows, tokens, cost and wall time per model, from the plan alone (no model calls), with
    output tokens from ``past`` (default: the job's earlier runs beside ``folder``).

    Wall time is the larger of rows / RPM and tokens / TPM: the model's limits, not its
    latency, bound a batch job once concurrency covers latency.
    """
    past = history.read(folder, job.name) if past is None else past
    per_answer = output_per_answer(job, past)
    columns = ["model", "est_input_tokens", "est_output_tokens"]
    routed = routed_dataset(folder)
    if routed is None:
        empty = pl.from_arrow(pa.table({c: pa.array([], pa.string() if c == "model" else
                                                    pa.int64()) for c in columns}))
        assert isinstance(empty, pl.DataFrame)
        frame = empty.lazy()
    else:
        frame = pl.scan_pyarrow_dataset(routed).select(columns)
    # A model's answers at its mean per answer, never above the rows' max_tokens (the routed
    # est_output_tokens) in all; a model without history at max_tokens (min skips the null).
    # Not capped row by row: the mean already holds the rows whose answers were cut at a small
    # max_tokens, so a night of the same mix would be counted short twice.
    expected = (pl.col("rows") * pl.col("model").replace_strict(
        per_answer, default=None, return_dtype=pl.Float64)).round(0).cast(pl.Int64)
    # Streamed: the plan is never loaded whole, however many rows it has.
    sums = frame.group_by("model").agg(
        rows=pl.len(), est_input_tokens=pl.col("est_input_tokens").sum(),
        output_budget_tokens=pl.col("est_output_tokens").sum()).with_columns(
        est_output_tokens=pl.min_horizontal("output_budget_tokens", expected)).sort(
        "model").collect(engine="streaming")
    ref = job.models[job.reference_model]
    models: dict[str, dict[str, Any]] = {}
    now = datetime.now(UTC)
    deadline = job.dispatch.deadline_at(now)
    window = (deadline - now).total_seconds() if deadline is not None else None
    for row in sums.iter_rows(named=True):
        m = job.models[row["model"]]
        tokens = row["est_input_tokens"] + row["output_budget_tokens"]
        cached, written = cache_forecast(job, m, row["rows"])
        both = (row["est_input_tokens"], row["est_output_tokens"])
        # The reference model's own rows would be cached as well; other models' would not.
        as_ref = (*both, cached, written) if m.name == ref.name else both
        models[row["model"]] = {
            "rows": row["rows"],
            "est_input_tokens": row["est_input_tokens"],
            "est_output_tokens": row["est_output_tokens"],
            "est_cached_input_tokens": cached,
            "est_cache_write_input_tokens": written,
            "tier": m.tier,
            # At the tier's price; the counterfactual at the reference's standard price.
            "est_cost_usd": round(m.cost_usd(*both, cached, written, tier=m.tier), 6),
            "est_standard_cost_usd": round(m.cost_usd(*both, cached, written), 6),
            "est_reference_cost_usd": round(ref.cost_usd(*as_ref), 6),
            **_wall(m, row["rows"], tokens, window),
            "output_budget_tokens": row["output_budget_tokens"],
            **_output_basis(past, row["model"]),
        }
    total_cost = sum(v["est_cost_usd"] for v in models.values())
    total_ref = sum(v["est_reference_cost_usd"] for v in models.values())
    total_in = sum(v["est_input_tokens"] for v in models.values())
    bases = {v["output_basis"] for v in models.values()}
    return {
        "run_id": folder.run_id,
        "reference_model": job.reference_model,
        "models": models,
        "rejected": rejected,
        "routed": int(sums["rows"].sum()),
        "est_cost_usd": round(total_cost, 6),
        "est_reference_cost_usd": round(total_ref, 6),
        "est_savings_usd": round(total_ref - total_cost, 6),
        "est_cached_share": round(sum(v["est_cached_input_tokens"] for v in models.values())
                                  / total_in, 4) if total_in else 0.0,
        "cache_prefix_tokens": job.task.prefix_tokens(),
        "cache_notes": _cache_notes(job, list(models)),
        # Models are dispatched concurrently, so the slowest one bounds the job.
        "est_wall_s": max((v["est_wall_s"] for v in models.values()), default=0.0),
        "note": "input estimated at 4 characters per token; output at each model's billed "
                "tokens per answer in the job's last finished runs (output_basis \"history\"),"
                " else the full max_tokens budget (\"max_tokens\"); batch and flex models at "
                "their tier's price",
        # "history", "max_tokens", or "mixed" (some models each way).
        "output_basis": bases.pop() if len(bases) == 1 else (
            "mixed" if bases else "history" if past.runs else "max_tokens"),
        "output_history": {"runs": list(past.runs),
                           "skipped": [{"run": r, "why": w} for r, w in past.skipped]},
    }


def output_per_answer(job: JobConfig, past: history.History) -> dict[str, float]:
    """Output tokens per answer of each of the job's models in its earlier runs (``past``):
    what the forecast prices output at; a model missing here is priced at max_tokens."""
    return {m: h.per_answer for m, h in past.models.items() if m in job.models}


def row_cost_usd(m: ModelConfig, est_in: np.ndarray, est_out: np.ndarray,
                 per_answer: Mapping[str, float]) -> np.ndarray:
    """The forecast's estimate, row by row, in dollars on model ``m`` (what the spend cap
    solves over): input tokens from the prompt (``est_in``), output at the model's tokens
    per answer (:func:`output_per_answer`) else the row's max_tokens (``est_out``), at the
    model's tier, as :meth:`ModelConfig.cost_usd` prices them. No prompt cache: that
    depends on the rows a model gets in all, which :func:`forecast` adds afterwards."""
    out = (np.full(len(est_out), per_answer[m.name], np.float64) if m.name in per_answer
           else est_out.astype(np.float64))
    discount = m.batch_discount if m.tier in DISCOUNTED_TIERS else 0.0
    usd: np.ndarray = ((est_in.astype(np.float64) * m.input_usd_per_mtok
                        + out * m.output_usd_per_mtok) * (1.0 - discount) / 1e6)
    return usd


def _output_basis(past: history.History, model: str) -> dict[str, Any]:
    """Where a model's output estimate comes from, as keys of its forecast."""
    h = past.models.get(model)
    if h is None:
        why = ("no earlier finished run of this job" if not past.runs else
               f"not used in the last {_runs(len(past.runs))}")
        return {"output_basis": "max_tokens", "output_tokens_per_answer": None,
                "output_history_runs": 0, "output_basis_note": f"at max_tokens: {why}"}
    among = (f"the last {_runs(h.runs)}" if h.runs == len(past.runs)
             else f"{h.runs} of the last {_runs(len(past.runs))}")
    return {"output_basis": "history", "output_tokens_per_answer": round(h.per_answer, 1),
            "output_history_runs": h.runs,
            "output_basis_note": f"{h.per_answer:,.0f} tokens/answer from {among}"}


def _runs(n: int) -> str:
    return "run" if n == 1 else f"{n} runs"


def _wall(m: ModelConfig, rows: int, tokens: int, window: float | None) -> dict[str, Any]:
    """A model's expected wall time: its limits bound a sync model once concurrency covers
    latency; a batch-tier model takes its expected turnaround, capped by the deadline."""
    if m.tier == "batch":
        wall = m.batch_turnaround_s if window is None else min(m.batch_turnaround_s,
                                                              max(0.0, window))
        return {"est_wall_s": round(wall, 1),
                "bound_by": "deadline" if wall < m.batch_turnaround_s else "batch turnaround"}
    by_rpm, by_tpm = rows / m.rpm, tokens / m.tpm
    return {"est_wall_s": round(60.0 * max(by_rpm, by_tpm), 1),
            "bound_by": "rpm" if by_rpm >= by_tpm else "tpm"}


def cache_forecast(job: JobConfig, m: ModelConfig, rows: int) -> tuple[int, int]:
    """(input tokens read from the prompt cache, written to it) forecast for ``rows`` rows
    on ``m``: every row after the first reads the shared prefix (system prompt, output
    schema, the template's literal start) if the provider caches it. Anthropic caches a
    marked prefix of at least the model's minimum, written once; OpenAI caches any prefix of
    1,024 tokens or more unasked, in steps of 128."""
    prefix = job.task.prefix_tokens()
    if rows == 0 or prefix < m.cache_min_tokens:
        return 0, 0
    if m.provider == "anthropic":
        return (prefix * (rows - 1), prefix) if job.task.marks_cache(m.provider) else (0, 0)
    step = m.cache_min_tokens + OPENAI_CACHE_STEP * ((prefix - m.cache_min_tokens)
                                                      // OPENAI_CACHE_STEP)
    return step * (rows - 1), 0


OPENAI_CACHE_STEP = 128


def _cache_notes(job: JobConfig, names: list[str]) -> list[str]:
    """Why a model that could cache the shared prefix will not."""
    prefix, notes = job.task.prefix_tokens(), []
    for name in names:
        m = job.models[name]
        if 0 < prefix < m.cache_min_tokens and (m.provider == "openai"
                                                 or job.task.marks_cache(m.provider)):
            notes.append(f"{name}: the shared prefix (system prompt, output schema, the "
                         f"template's literal start) is about {prefix} tokens, below the "
                         f"{m.cache_min_tokens} the provider caches: it is not cached")
    return notes


def format_forecast(f: Mapping[str, Any]) -> str:
    lines = [f"{'model':<26}{'rows':>8}{'est in tok':>13}{'est out tok':>13}"
             f"{'est cost $':>12}{'est wall s':>12}  {'bound':<18}output estimate"]
    for name, v in f["models"].items():
        # Forecasts written before the output basis existed priced output at max_tokens.
        basis = v.get("output_basis_note", "at max_tokens")
        lines.append(f"{name:<26}{v['rows']:>8}{v['est_input_tokens']:>13}"
                     f"{v['est_output_tokens']:>13}{v['est_cost_usd']:>12.4f}"
                     f"{v['est_wall_s']:>12.1f}  {v['bound_by']:<18}{basis}")
    cap = f.get("budget")
    if cap:
        limit = (f"budget ${cap['budget_usd']:,.2f}" if cap["kind"] == "budget_usd"
                 else f"at most {100 * cap['max_strong_share']:g}% on the strongest model")
        lines.append(f"spend cap ({limit}), solved over the whole batch: {cap['rows']:,} rows "
                     f"assigned, predicted success {100 * cap['predicted_quality']:.1f}% at "
                     f"est ${cap['est_cost_usd']:,.2f} ({100 * cap['strong_share']:.1f}% on the "
                     "strongest model)")
        if cap["curve"]:
            lines.append("  around it: " + "; ".join(
                f"${p['budget_usd']:,.2f} -> " + ("infeasible" if p["predicted_quality"] is None
                                                   else f"{100 * p['predicted_quality']:.1f}%")
                for p in cap["curve"]))
    lines.append(f"rejected before dispatch: {f['rejected']}   est total ${f['est_cost_usd']:.4f}"
                 f" ({basis_line(f)}) vs ${f['est_reference_cost_usd']:.4f} all on "
                 f"{f['reference_model']}   est wall {f['est_wall_s']:.0f}s")
    if f.get("est_cached_share"):
        lines.append(f"prompt cache: {f['est_cached_share']:.1%} of input tokens forecast "
                     f"read from the provider's cache (a shared prefix of about "
                     f"{f['cache_prefix_tokens']} tokens), priced at the cache prices")
    lines.extend(f"prompt cache: {note}" for note in f.get("cache_notes", []))
    past = f.get("output_history", {})
    if past.get("runs"):
        lines.append("output history: billed output tokens per answer in "
                     + ", ".join(past["runs"]) + ", times the rows, capped at their max_tokens")
    lines.extend(f"output history: {s['run']} not used: {s['why']}"
                 for s in past.get("skipped", []))
    return "\n".join(lines)


def basis_line(f: Mapping[str, Any]) -> str:
    """The basis of the total's output tokens, in a few words."""
    basis = f.get("output_basis", "max_tokens")
    runs = len(f.get("output_history", {}).get("runs", []))
    if basis == "max_tokens":
        if "output_history" not in f:  # written before the history was read
            return "output at max_tokens"
        return ("output at max_tokens: no earlier run to learn from" if not runs else
                f"output at max_tokens: none of these models answered in the last "
                f"{_runs(runs)}")
    if basis == "history":
        return f"output from the last {_runs(runs)}"
    fallback = [m for m, v in f["models"].items() if v.get("output_basis") == "max_tokens"]
    return f"output from the last {_runs(runs)}; at max_tokens for {', '.join(fallback)}"
