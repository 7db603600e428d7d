"""A job's earlier runs, as the plan's forecast needs them: output tokens billed per answer.

The forecast knows a row's input before any call (its prompt) but not its answer. Pricing every
answer at its full ``max_tokens`` is a safe ceiling and a poor forecast: answers are usually far
shorter, and the demo's forecast was 82% over its bill. What a model answers for a job is best
told by what it answered for the same job before, so the forecast reads the job's most recent
finished runs under the same output folder.

What is read, and why no file of its own. A finished run's rollups (``rollups/``) already hold,
per model, the output tokens it billed (reasoning tokens and every unusable answer that was
retried included: they are billed as output), the rows it answered and the rows it passed up
the escalation ladder. Reading them keeps one home for those sums; a history file would be a
second copy that a crash between the two writes could leave disagreeing with the rollups.

What is estimated: mean billed output tokens per answer, per model. Over the runs read,
``output_tokens / answers`` where ``answers`` counts every row the model billed for: the rows
it answered (rejected ones aside; a failed row is in the plan too, and billed what it billed)
plus the rows it passed up. The plan multiplies it by tonight's rows for the model, never
above those rows' ``max_tokens`` in all (not row by row: the mean already holds the answers cut
at a small ``max_tokens``). Why this and not the alternatives:

- the mean, not the median: the bill is a sum, and the mean times the rows is the sum; answer
  lengths are skewed to the long side, so a median under-forecasts every night;
- per answer, not output/input ratio: an answer's length is set mostly by the task (a label,
  a JSON object, a paragraph), not by the prompt's. A ratio makes the forecast swing with
  prompt length (a night of long documents would forecast long answers, up to the cap), and
  multiplies the 4-characters-per-token input estimate's error into the output. Tasks whose
  answer grows with the prompt (rewriting, translation) are the exception; the forecast
  states its basis so that a reader can tell;
- cached input tokens, the batch tier's discount and the cache's prices are input-side and
  tier-side: the plan prices them as before, and the history only supplies output counts.

Which runs: the last :data:`HISTORY_RUNS` finished runs of the job (its name, under its output
folder), newest by finish time, pooled (tokens summed over runs, divided by answers summed): one
night is a noisy sample for a model that answered a few hundred rows, three nights are not, and
a job's answers drift slowly (a changed task is a new basis after three nights). A model none of
them billed for has no history, and the plan falls back to ``max_tokens``, saying so. Unfinished
runs (dry runs, killed runs) are not history and are passed over quietly; a run folder whose
manifest or rollups cannot be read is passed over with a warning, and the next older run taken
in its place: a damaged folder never stops the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds

from batchroute import schemas
from batchroute.errors import ConfigError
from batchroute.stages.manifest import NAME as MANIFEST
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import RunFolder

log = logging.getLogger("batchroute")
HISTORY_RUNS = 3
_COLUMNS = ["model", "rows", "rejected", "escalated", "output_tokens"]


@dataclass(frozen=True)
class ModelHistory:
    """What one model billed over the runs read."""

    output_tokens: int
    answers: int  # rows it billed for: answered (rejected aside) and passed up
    runs: int  # how many of the runs it billed for

    @property
    def per_answer(self) -> float:
        return self.output_tokens / self.answers


@dataclass(frozen=True)
class History:
    """The runs read (run ids, newest first), each model's sums over them, and the run
    folders passed over because they could not be read (folder, why)."""

    runs: tuple[str, ...] = ()
    models: Mapping[str, ModelHistory] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()


def read(folder: RunFolder, job: str, *, limit: int = HISTORY_RUNS) -> History:
    """The history of ``job`` for the run in ``folder``: its last ``limit`` finished runs
    among the folders beside it, that run itself excluded. Never raises for what it finds in
    those folders."""
    candidates: list[tuple[str, RunFolder]] = []
    skipped: list[tuple[str, str]] = []
    for other in folder.siblings():
        if not other.has(MANIFEST):
            continue  # not a run folder (an input copy, notes, a run that had just started)
        try:
            manifest = Manifest.read(other)
            if manifest is None or manifest.job != job or not manifest.finished:
                continue
            when = str(manifest.finished_at or manifest.started_at)
        except (ConfigError, OSError, TypeError, AttributeError) as exc:
            # Unreadable, or JSON that is not a manifest's (a list, a key of the wrong type).
            skipped.append(_skip(other, f"its {MANIFEST} cannot be read ({exc})"))
            continue
        candidates.append((when, other))
    tables: list[pa.Table] = []
    runs: list[str] = []
    for _, other in sorted(candidates, key=lambda c: (c[0], c[1].run_id), reverse=True):
        if len(runs) == limit:
            break
        table = _rollups(other)
        if isinstance(table, str):
            skipped.append(_skip(other, table))
            continue
        runs.append(other.run_id)
        tables.append(table)
    return History(tuple(runs), _sums(tables), tuple(skipped))


def _rollups(folder: RunFolder) -> pa.Table | str:
    """The run's rollups (the columns the history needs), or why they cannot be read."""
    try:
        if not folder.shards(folder.sub("rollups")):
            return "finished, but it holds no rollups"
        # By name, against today's schema: rollups written before a column existed read it
        # as nulls (counted as 0).
        dataset = ds.dataset(folder.sub("rollups"), filesystem=folder.fs, format="parquet",
                             schema=schemas.ROLLUPS)
        return dataset.to_table(columns=_COLUMNS)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return f"its rollups cannot be read ({type(exc).__name__}: {exc})"


def _sums(tables: list[pa.Table]) -> dict[str, ModelHistory]:
    if not tables:
        return {}
    frame = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(frame, pl.DataFrame)
    answers = (pl.col("rows").fill_null(0) - pl.col("rejected").fill_null(0)
               + pl.col("escalated").fill_null(0))
    sums = (frame.filter(pl.col("model").is_not_null())
            .with_columns(answers=answers, output_tokens=pl.col("output_tokens").fill_null(0))
            .filter(pl.col("answers") > 0)
            .group_by("model").agg(output_tokens=pl.col("output_tokens").sum(),
                                   answers=pl.col("answers").sum(), runs=pl.len()))
    return {m: ModelHistory(int(o), int(a), int(r))
            for m, o, a, r in sums.select("model", "output_tokens", "answers",
                                          "runs").iter_rows()}


def _skip(folder: RunFolder, why: str) -> tuple[str, str]:
    log.warning("forecast: earlier run folder %s is not used as history: %s", folder.uri, why)
    return folder.uri, why
