"""Growing a similarity router's memory bank (``batchroute memory add``).

The bank's format and its search are :mod:`batchroute.routers.similarity`'s; this module only
adds outcomes to it: from labelled Parquet (score >= cut is a success), or from a finished run
folder (a model that a row escalated away from did badly on it, and the model that answered did
well unless its answer was cut short, refused, or the row failed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute.errors import ConfigError
from batchroute.routers.similarity import (
    ANN_MIN_ROWS,
    DEFAULT_FEATURES,
    META_EMBEDDER,
    Bank,
    TextEmbedder,
    ann_index,
    bank_schema,
    embedder_for,
    features_of,
    text_keys,
)
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import RunFolder
from batchroute.stages.source import request_text
from batchroute.training import train


def outcomes_from_labels(labels_uri: str, *, cut: float = 0.5,
                         split: str = "all") -> pl.DataFrame:
    """(request_id, prompt, model, score) from labelled Parquet: success is score >= cut."""
    if split not in ("train", "holdout", "all"):
        raise ConfigError(f"split must be train, holdout or all, got {split!r}")
    frame = train.read_labels(labels_uri)
    if split != "all":
        ids = frame["request_id"].unique(maintain_order=True)
        held = pl.Series(train.is_holdout(ids.to_list()))
        keep = ids.filter(held if split == "holdout" else ~held)
        frame = frame.filter(pl.col("request_id").is_in(keep.implode()))
    return frame.select("request_id", "prompt", "model",
                        score=(pl.col("score") >= cut).cast(pl.Float32))


def outcomes_from_run(run_folder: str) -> pl.DataFrame:
    """(request_id, prompt, model, score) from a run: 0 for every model a row escalated away
    from, and for the answering model 1 unless its answer was cut short, refused, or failed."""
    path = Path(run_folder)
    folder = RunFolder(str(path.parent), path.name)
    if not folder.has("manifest.json") or Manifest.read(folder) is None:
        raise ConfigError(f"{run_folder}: not a batchroute run folder (no manifest.json)")
    results = pl.concat([_frame(pq.read_table(
        p, filesystem=folder.fs,
        columns=["request_id", "model", "status", "finish_reason", "escalations"]))
        for p in folder.shards(folder.sub("results"))])
    prompts = []
    for p in folder.shards(folder.sub("source")):
        t = pq.read_table(p, filesystem=folder.fs)
        prompts.append(_frame(pa.table({"request_id": t.column("request_id"),
                                        "prompt": request_text(t)})))
    if not prompts or results.is_empty():
        raise ConfigError(f"{run_folder}: the run has no results to learn from yet")
    sent = results.filter(pl.col("status") != "rejected")
    good = ((pl.col("status") == "ok")
            & ~pl.col("finish_reason").is_in(["length", "refusal"]).fill_null(False))
    final = sent.select("request_id", "model", score=good.cast(pl.Float32))
    earlier = (sent.select("request_id", e="escalations").explode("e")
               .filter(pl.col("e").is_not_null())
               .select("request_id", model=pl.col("e").struct.field("model"),
                       score=pl.lit(0.0, pl.Float32)))
    return (pl.concat([earlier, final]).join(pl.concat(prompts), on="request_id", how="inner")
            .select("request_id", "prompt", "model", "score"))


def add(bank_path: str, outcomes: pl.DataFrame, *, source: str,
        embedder: TextEmbedder | None = None, features: str = "") -> dict[str, int]:
    """Embed the new prompts and merge their outcomes into the bank at ``bank_path`` (created
    if absent). A prompt already in the bank keeps its embedding; a newer outcome for the same
    (prompt, model) replaces the older one. The embedder is ``embedder``, else the one
    ``features`` names, else the existing bank's own, else the default. Returns counts."""
    texts = pa.array(outcomes["prompt"].to_list(), pa.string())
    frame = outcomes.with_columns(key=pl.Series(text_keys(texts)))
    old = None
    was = ""
    if Path(bank_path).exists():
        old = pq.read_table(bank_path)
        was = (old.schema.metadata or {}).get(META_EMBEDDER, b"").decode()
    embedder = embedder or embedder_for(features or features_of(was) or DEFAULT_FEATURES)
    if was and was != embedder.name:
        raise ConfigError(f"memory bank {bank_path} was embedded with {was!r}, not "
                          f"{embedder.name!r}")
    known = set(old.column("key").to_pylist()) if old is not None else set()
    fresh = frame.unique("key", keep="first", maintain_order=True).filter(
        ~pl.col("key").is_in(list(known)))
    vectors = np.asarray(embedder.embed(fresh["prompt"].to_list()), np.float32)
    dim = embedder.dim
    new_rows = pa.table({
        "key": fresh["key"].to_arrow(), "request_id": fresh["request_id"].to_arrow(),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel(), pa.float32()), dim),
    })
    new_outcomes = frame.select("key", "model", pl.col("score").cast(pl.Float32),
                                source=pl.lit(source))
    if old is not None:
        old_outcomes = _frame(pa.table({
            "key": pc.take(old.column("key"), pc.list_parent_indices(old.column("outcomes"))),
            "o": pc.list_flatten(old.column("outcomes")),
            "source": pc.take(old.column("source"),
                              pc.list_parent_indices(old.column("outcomes")))})).unnest("o")
        merged_outcomes = pl.concat([old_outcomes.select("key", "model", "score", "source"),
                                     new_outcomes])
        vectors_table = pa.concat_tables([old.select(["key", "request_id", "embedding"]),
                                          new_rows.cast(old.select(["key", "request_id",
                                                                    "embedding"]).schema)])
    else:
        merged_outcomes = new_outcomes
        vectors_table = new_rows
    per_key = (merged_outcomes.unique(["key", "model"], keep="last", maintain_order=True)
               .group_by("key", maintain_order=True)
               .agg(outcomes=pl.struct("model", "score"), source=pl.col("source").last()))
    table = _frame(vectors_table).join(per_key, on="key", how="inner", maintain_order="left").to_arrow()
    schema = bank_schema(dim).with_metadata({META_EMBEDDER: embedder.name.encode()})
    table = table.select(schema.names).cast(schema)
    tmp = f"{bank_path}.tmp"
    Path(bank_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, tmp, compression="zstd")
    Path(tmp).replace(bank_path)
    if table.num_rows >= ANN_MIN_ROWS:
        # Built here once, so that routing actors read it instead of each building it.
        ann_index(Bank.read(bank_path), bank_path, "ivf")
    return {"prompts": table.num_rows, "new_prompts": fresh.height,
            "outcomes": new_outcomes.height}




def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame
