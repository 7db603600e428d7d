"""``batchroute learn``: labels for the router from what the runs found out.

A run knows, for some of its rows, how well a model answered them:

- **shadow checks** (``RUN/quality/shadows/``, the job's ``[quality]``): a row answered by a
  model below the reference model was also sent to the reference model, and the pair graded.
  Graded field by field (labels, JSON; ``graded_by = "fields"``), the kept model gets the
  row's ``score`` (its agreement with the reference answer) and the reference model 1 (source
  ``shadow``). Graded by the judge (free text), each model gets the judge's own grade of its
  answer, ``candidate_score`` and ``reference_score`` (source ``judge``). Pairs not graded
  (``status = "failed"``) give nothing.
- **escalations** (``results.escalations``): every model that a row was escalated away from
  (cut at max_tokens, refused, failed, or an invalid output) gets 0 (source ``escalation``).
- **invalid outputs** (``results.invalid_answers``): the model that answered a row, when it
  gave at least one answer that was not a valid output (not one of the labels, or not
  matching the JSON schema; the row then ended failed as ``invalid_output``, or ok after a
  retry), gets 0 (source ``invalid``).

Rows no check looked at give no label: an ok answer nobody graded says nothing about quality.

Deduplication, for one (prompt, model):

- within a run, a graded label (``shadow``, ``judge``) wins over ``invalid``: it grades the
  answer the row kept, where ``invalid`` says an earlier answer was unusable (the only pair of
  sources that can meet: escalations label the models a row left, never the one it kept);
- across runs, the newest run wins (manifest ``started_at``; runs given twice are read once);
- one question is one prompt text: the same prompt under several request_ids (the same
  question on several nights, or twice in one night) is one row per model, under the
  request_id it was first seen with (the oldest run, then the smallest request_id), so that
  train's held-out split, a hash of the request_id, keeps it on one side.

Prompts are the route stage's text (``RUN/source/``: the prompt, or the joined messages).

A folder that is not a run folder, or one of whose files cannot be read (a damaged shard, a
manifest that is not JSON), is skipped whole with the reason, naming the file, so that no
half-read run biases the labels; the other folders' labels are kept. A run without
``quality/`` (shadow checks off) still gives its escalation and invalid labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchroute import schemas
from batchroute.errors import ConfigError
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import RunFolder
from batchroute.stages.source import request_text

SOURCES = ("shadow", "judge", "escalation", "invalid")
# Lower wins within a run (see the module's docstring).
_RANK = {"shadow": 0, "judge": 0, "invalid": 1, "escalation": 1}
RESULT_COLUMNS = ["request_id", "model", "status", "invalid_answers", "escalations"]
SHADOW_COLUMNS = ["request_id", "model", "reference_model", "status", "score", "graded_by",
                  "candidate_score", "reference_score"]
_LABEL = {"request_id": pl.String, "model": pl.String, "score": pl.Float64,
          "source": pl.String}


@dataclass
class RunLabels:
    """What one run folder gave (or why it gave nothing)."""

    folder: str
    run_id: str = ""
    router_version: str = ""
    started_at: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # labels by source, before dedup
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # the reason the folder was skipped

    def as_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "run_id": self.run_id,
                "router_version": self.router_version, "started_at": self.started_at,
                "labels": self.counts, "notes": self.notes, "skipped": self.skipped}


@dataclass(frozen=True)
class Learnt:
    labels: pl.DataFrame  # schemas.LABELS, optional columns included
    runs: list[RunLabels]

    @property
    def skipped(self) -> list[RunLabels]:
        return [r for r in self.runs if r.skipped is not None]


class _Unreadable(Exception):
    """A file of the run cannot be read: the run is skipped."""


def open_run(uri: str) -> RunFolder:
    """The run folder at ``uri`` (a local path or a pyarrow filesystem URI)."""
    base, _, run_id = uri.rstrip("/").rpartition("/")
    return RunFolder(base or ".", run_id)


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _read(folder: RunFolder, directory: str, columns: list[str] | None,
          schema: pa.Schema | None = None) -> list[pa.Table]:
    """Every committed shard below ``directory``: ``columns`` of it, those a shard lacks (a
    run written before they existed) null, typed as in ``schema``."""
    parts = []
    for path in folder.shards(directory):
        try:
            names = pq.read_schema(path, filesystem=folder.fs).names
            table = pq.read_table(path, filesystem=folder.fs, columns=None if columns is None
                                  else [c for c in columns if c in names])
        except (OSError, pa.ArrowException) as exc:
            raise _Unreadable(f"{path}: cannot be read ({exc})") from None
        for c in columns or ():
            if c not in table.column_names and schema is not None:
                kind = schema.field(c).type
                table = table.append_column(pa.field(c, kind), pa.nulls(table.num_rows, kind))
        parts.append(table)
    return parts


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=_LABEL)


def run_labels(uri: str) -> tuple[RunLabels, pl.DataFrame, pl.DataFrame]:
    """The labels one run gives, keyed by request_id (request_id, model, score, source), the
    prompts of those rows (request_id, prompt), and what was read. Never raises for a bad
    folder: the returned RunLabels says why it was skipped."""
    info = RunLabels(uri)
    try:
        return _run_labels(uri, info)
    except (_Unreadable, ConfigError) as exc:
        info.skipped = str(exc)
    except OSError as exc:
        info.skipped = f"{uri}: cannot be read ({exc})"
    return info, _empty(), pl.DataFrame(schema={"request_id": pl.String, "prompt": pl.String})


def _run_labels(uri: str, info: RunLabels) -> tuple[RunLabels, pl.DataFrame, pl.DataFrame]:
    folder = open_run(uri)
    manifest = Manifest.read(folder)
    if manifest is None or not folder.has("manifest.json"):
        raise ConfigError(f"{uri}: not a batchroute run folder (no manifest.json)")
    info.run_id, info.router_version = manifest.run_id, manifest.router_version
    info.started_at = manifest.started_at
    if not manifest.finished:
        info.notes.append("the run has not finished: learnt from what it committed")
    found: list[pl.DataFrame] = []

    results = _read(folder, folder.sub("results"), RESULT_COLUMNS, schemas.RESULTS)
    if not results:
        info.notes.append("no results/")
    else:
        frame = _frame(pa.concat_tables(results, promote_options="permissive")).filter(
            pl.col("status") != "rejected")
        found.append(frame.select("request_id", pl.col("escalations").alias("e"))
                     .explode("e").filter(pl.col("e").is_not_null())
                     .select("request_id", model=pl.col("e").struct.field("model"),
                             score=pl.lit(0.0), source=pl.lit("escalation")))
        found.append(frame.filter(pl.col("invalid_answers").fill_null(0) > 0).select(
            "request_id", "model", score=pl.lit(0.0), source=pl.lit("invalid")))

    if not folder.has("quality", "shadows"):
        info.notes.append("no quality/shadows/ (shadow checks off): escalation and invalid "
                          "labels only")
    else:
        parts = _read(folder, folder.sub("quality", "shadows"), SHADOW_COLUMNS,
                      schemas.SHADOWS)
        if parts:
            sh = _frame(pa.concat_tables(parts, promote_options="permissive")).filter(
                (pl.col("status") == "ok") & pl.col("score").is_not_null())
            fields = sh.filter(pl.col("graded_by") == "fields")
            found.append(fields.select("request_id", "model", "score",
                                       source=pl.lit("shadow")))
            found.append(fields.select("request_id", model=pl.col("reference_model"),
                                       score=pl.lit(1.0), source=pl.lit("shadow")))
            judged = sh.filter(pl.col("graded_by") == "judge")
            found.append(judged.filter(pl.col("candidate_score").is_not_null()).select(
                "request_id", "model", score=pl.col("candidate_score"),
                source=pl.lit("judge")))
            found.append(judged.filter(pl.col("reference_score").is_not_null()).select(
                "request_id", model=pl.col("reference_model"),
                score=pl.col("reference_score"), source=pl.lit("judge")))

    labels = (pl.concat([f.select(**{c: pl.col(c).cast(t) for c, t in _LABEL.items()})
                         for f in found]) if found else _empty())
    labels = labels.filter(pl.col("request_id").is_not_null() & pl.col("model").is_not_null())
    info.counts = {s: int(n) for s, n in labels["source"].value_counts().iter_rows()}

    prompts = []
    if labels.height:
        wanted = labels["request_id"].unique().implode()
        for part in _read(folder, folder.sub("source"), None):
            if "prompt" not in part.column_names and "messages" not in part.column_names:
                raise _Unreadable(f"{folder.sub('source')}: a shard has neither prompt nor "
                                  "messages")
            part = part.select([c for c in ("request_id", "prompt", "messages")
                                if c in part.column_names])
            for c, t in (("prompt", pa.string()), ("messages", pa.list_(schemas.MESSAGE))):
                if c not in part.column_names:
                    part = part.append_column(c, pa.nulls(part.num_rows, t))
            text = _frame(pa.table({"request_id": part.column("request_id"),
                                    "prompt": request_text(part)}))
            prompts.append(text.filter(pl.col("request_id").is_in(wanted)))
    prompt_frame = (pl.concat(prompts).unique("request_id", keep="first") if prompts else
                    pl.DataFrame(schema={"request_id": pl.String, "prompt": pl.String}))
    lost = labels.join(prompt_frame, on="request_id", how="anti").height
    if lost:
        info.notes.append(f"{lost} labels dropped: their request_id is not in source/")
    return info, labels, prompt_frame


def learn(run_folders: Sequence[str]) -> Learnt:
    """Labels (schemas.LABELS, with source, run_id and router_version) from ``run_folders``;
    the rules are the module's. A folder that cannot be read is skipped, and says why."""
    runs: list[RunLabels] = []
    frames: list[pl.DataFrame] = []
    seen: set[str] = set()
    for order, uri in enumerate(run_folders):
        key = uri.rstrip("/")
        if key in seen:
            continue
        seen.add(key)
        info, labels, prompts = run_labels(uri)
        runs.append(info)
        if info.skipped is None and labels.height:
            frames.append(labels.join(prompts, on="request_id", how="inner").with_columns(
                run_id=pl.lit(info.run_id), router_version=pl.lit(info.router_version),
                _started=pl.lit(info.started_at), _order=pl.lit(order),
                _rank=pl.col("source").replace_strict(_RANK, return_dtype=pl.Int8)))
    columns = schemas.LABELS.names
    if not frames:
        empty = pl.DataFrame(schema=dict.fromkeys(columns, pl.String) | {"score": pl.Float64})
        return Learnt(empty.select(columns), runs)
    every = pl.concat(frames)
    # The request_id each prompt was first seen under: the oldest run, the smallest id.
    first = (every.sort(["_started", "_order", "request_id"], maintain_order=True)
             .group_by("prompt", maintain_order=True).agg(pl.col("request_id").first()))
    best = (every.sort(["_started", "_order", "_rank", "request_id"],
                       descending=[True, True, False, False], maintain_order=True)
            .unique(["prompt", "model"], keep="first", maintain_order=True))
    out = (best.drop("request_id").join(first, on="prompt", how="left")
           .select(columns).sort(["request_id", "model"]))
    return Learnt(out, runs)


def write(learnt: Learnt, out: str) -> None:
    """Write the labels to ``out`` (one Parquet file, atomically), with the runs read and
    skipped in the file's metadata (``batchroute_learn``)."""
    import json
    from pathlib import Path

    schema = schemas.LABELS.with_metadata({"batchroute_learn": json.dumps(
        [r.as_dict() for r in learnt.runs])})
    table = learnt.labels.to_arrow().cast(schema)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
