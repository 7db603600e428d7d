"""The similarity router's memory: a bank of past prompts with known outcomes, and k-NN over it.

A bank is one Parquet file, one row per distinct prompt:

    key         sha256 of the prompt text (the same prompt is stored once)
    request_id  where the prompt came from (a labels file's or a run's request_id)
    embedding   fixed_size_list<float32>[dim], L2-normalised by the embedder named in the
                file's metadata
    outcomes    list<struct<model, score>>: per model, how well it did (1 = good, 0 = bad)
    source      the labels URI or run id the outcomes came from

``batchroute memory add`` (:mod:`batchroute.training.bank`) grows it from labelled Parquet (score >= cut is a success) or from a
run folder: a model that a row escalated away from did badly on it, and the model that
answered did well unless its answer was cut short or refused (or the row failed).

Prediction is exact: embeddings of a batch times the bank (one matrix product per chunk of
the bank), top k by cosine similarity, then per model a similarity-weighted mean of the
neighbours' outcomes, shrunk towards the bank's own success rate for that model by one
pseudo-neighbour. Neighbours less similar than ``min_similarity`` do not vote; a row with no
voter is not decided here.

Search is exact (a matrix product per chunk of the bank) below ``ANN_MIN_ROWS`` entries: it
costs O(bank) per prompt, fine for a few hundred thousand entries (200,000 x 384 floats is
300 MiB and ~0.1 GFLOP a prompt). From there on, or with ``index = "hnsw"``, an HNSW graph
from faiss (faiss-cpu, Meta's similarity-search library) answers instead: inner product on
the normalised embeddings, M = 32, efSearch = 512. The graph is built once per bank file and
kept beside it as ``BANK.parquet.hnsw`` (rebuilt when the bank changes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import schemas
from batchroute.config import SimilarityConfig
from batchroute.errors import ConfigError, SchemaError


class TextEmbedder(Protocol):
    """What the bank needs of a sentence embedder (:class:`batchroute.routers.embed.Embedder`,
    or a test's stand-in): L2-normalised vectors of ``dim`` floats, and a name the bank records
    so that a bank is never searched with another embedder's vectors."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray: ...

log = logging.getLogger("batchroute")

ANN_MIN_ROWS = 200_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 512
BANK_CHUNK_ROWS = 65_536
PRIOR_WEIGHT = 1.0
OUTCOME = schemas.ROUTER_SCORE  # struct<model, score>
META_EMBEDDER = b"batchroute.embedder"


def bank_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("outcomes", pa.list_(OUTCOME), nullable=False),
        pa.field("source", pa.string()),
    ])


def text_keys(texts: pa.Array | pa.ChunkedArray) -> list[str]:
    """sha256 of each prompt's text (null as empty): a bank holds a prompt once. Unlike the
    llm router's cache keys, nothing but the text goes in."""
    import hashlib

    return [hashlib.sha256((t or "").encode()).hexdigest()
            for t in texts.to_pylist()]


def default_embedder() -> TextEmbedder:
    from batchroute.routers.embed import Embedder

    return Embedder.load()


@dataclass
class Bank:
    keys: np.ndarray          # object [B]
    embeddings: np.ndarray    # float32 [B, dim]
    models: tuple[str, ...]
    outcomes: np.ndarray      # float32 [B, m], NaN where a model has no outcome
    embedder: str

    @classmethod
    def read(cls, path: str) -> Bank:
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise ConfigError(f"memory bank {path}: not found (build it with `batchroute "
                              "memory add --bank PATH --labels URI | --results RUN`)") from None
        except (OSError, pa.ArrowInvalid) as exc:
            raise SchemaError(f"memory bank {path}: not a readable Parquet file: {exc}") from None
        missing = [c for c in ("key", "embedding", "outcomes") if c not in table.column_names]
        if missing:
            raise SchemaError(f"memory bank {path}: column {missing[0]!r} is missing; not a "
                              "batchroute memory bank")
        meta = table.schema.metadata or {}
        embedder = meta.get(META_EMBEDDER, b"").decode()
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size if pa.types.is_fixed_size_list(emb.type) else 0
        vectors = (emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
                   if len(emb) else np.zeros((0, dim), np.float32))
        flat = _frame(pa.table({
            "row": pc.list_parent_indices(table.column("outcomes")),
            "o": pc.list_flatten(table.column("outcomes"))})).unnest("o")
        models = tuple(sorted(flat["model"].unique().to_list()))
        outcomes = np.full((table.num_rows, len(models)), np.nan, np.float32)
        if len(flat):
            col = flat["model"].replace_strict(models, list(range(len(models)))).to_numpy()
            outcomes[flat["row"].to_numpy(), col] = flat["score"].to_numpy()
        return cls(np.asarray(table.column("key").to_pylist(), dtype=object), vectors, models,
                   outcomes, embedder)

    def __len__(self) -> int:
        return len(self.keys)


class Neighbours:
    """k-NN success prediction over a bank, for the route stage's similarity step."""

    def __init__(self, bank: Bank, embedder: TextEmbedder, *, k: int, min_similarity: float,
                 models: Sequence[str], ann: Any = None) -> None:
        if bank.embedder and bank.embedder != embedder.name:
            raise ConfigError(f"memory bank was embedded with {bank.embedder!r}, but the "
                              f"router embeds with {embedder.name!r}; rebuild the bank")
        if len(bank) and bank.embeddings.shape[1] != embedder.dim:
            raise ConfigError(f"memory bank embeddings have {bank.embeddings.shape[1]} "
                              f"dimensions, the embedder gives {embedder.dim}")
        self.models = tuple(m for m in bank.models if m in set(models))
        if not self.models:
            raise ConfigError(f"memory bank has outcomes for {list(bank.models)}, none of "
                              f"which is in the job's catalog {sorted(models)}")
        cols = [bank.models.index(m) for m in self.models]
        self.bank = bank
        self.outcomes = bank.outcomes[:, cols]
        self.embedder = embedder
        self.ann = ann
        self.k = min(k, max(len(bank), 1))
        self.min_similarity = min_similarity
        with np.errstate(invalid="ignore"):
            prior = np.nanmean(self.outcomes, axis=0) if len(bank) else np.full(
                len(self.models), 0.5)
        self.prior = np.nan_to_num(prior, nan=0.5).astype(np.float32)

    @classmethod
    def open(cls, cfg: SimilarityConfig, models: Sequence[str], *,
             embedder: TextEmbedder | None = None) -> Neighbours:
        """The bank of ``cfg``, for a job whose catalog is ``models``."""
        bank = Bank.read(cfg.bank)
        use_ann = cfg.index == "hnsw" or (cfg.index == "auto" and len(bank) >= ANN_MIN_ROWS)
        return cls(bank, embedder or default_embedder(), k=cfg.k,
                   min_similarity=cfg.min_similarity, models=models,
                   ann=hnsw_index(bank, cfg.bank) if use_ann and len(bank) else None)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, bank index) of the k nearest entries per query, most similar first."""
        if self.ann is not None:
            sims, idx = self.ann.search(np.ascontiguousarray(queries, np.float32), self.k)
            missing = idx < 0  # fewer than k found: no vote
            return (np.where(missing, -np.inf, sims).astype(np.float32),
                    np.where(missing, 0, idx).astype(np.int64))
        n, k = len(queries), self.k
        best_s = np.full((n, k), -np.inf, np.float32)
        best_i = np.zeros((n, k), np.int64)
        for start in range(0, len(self.bank), BANK_CHUNK_ROWS):
            block = self.bank.embeddings[start:start + BANK_CHUNK_ROWS]
            sims = queries @ block.T
            kk = min(k, block.shape[0])
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < block.shape[0] \
                else np.broadcast_to(np.arange(block.shape[0]), (n, block.shape[0]))
            s = np.take_along_axis(sims, part, axis=1)
            both_s = np.concatenate([best_s, s], axis=1)
            both_i = np.concatenate([best_i, part + start], axis=1)
            keep = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
            best_s = np.take_along_axis(both_s, keep, axis=1)
            best_i = np.take_along_axis(both_i, keep, axis=1)
        return best_s, best_i

    def predict_embedded(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(success [n, m], nearest similarity [n], has a voter [n]) for embedded queries."""
        n = len(queries)
        if not n or not len(self.bank):
            return (np.tile(self.prior, (n, 1)), np.full(n, np.nan, np.float32),
                    np.zeros(n, bool))
        sims, idx = self.nearest(queries.astype(np.float32, copy=False))
        w = np.where(sims >= self.min_similarity, sims, 0.0).astype(np.float32)  # [n, k]
        y = self.outcomes[idx]                                                   # [n, k, m]
        has = ~np.isnan(y)
        num = np.einsum("nk,nkm->nm", w, np.where(has, y, 0.0))
        den = np.einsum("nk,nkm->nm", w, has.astype(np.float32))
        scores = (num + PRIOR_WEIGHT * self.prior) / (den + PRIOR_WEIGHT)
        found = np.asarray((w > 0).any(axis=1), bool)
        return scores.astype(np.float32), sims[:, 0], found

    def predict(self, texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
        return self.predict_embedded(self.embedder.embed(texts))


def hnsw_index(bank: Bank, bank_path: str) -> Any:
    """The bank's faiss HNSW graph: read from ``BANK.hnsw`` when it was built from this very
    bank file, else built and saved there (temp file, then rename)."""
    import hashlib
    import os

    import faiss

    stat = os.stat(bank_path)
    stamp = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{len(bank)}:{HNSW_M}".encode()
                           ).hexdigest()[:16]
    path = Path(f"{bank_path}.hnsw")
    stamp_path = Path(f"{bank_path}.hnsw.stamp")
    index: Any
    if path.exists() and stamp_path.exists() and stamp_path.read_text() == stamp:
        index = faiss.read_index(str(path))
    else:
        log.info("building the HNSW index of %s (%d entries)", bank_path, len(bank))
        index = faiss.IndexHNSWFlat(bank.embeddings.shape[1], HNSW_M,
                                    faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(np.ascontiguousarray(bank.embeddings, np.float32))
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        faiss.write_index(index, str(tmp))
        tmp.replace(path)
        stamp_path.write_text(stamp)
    index.hnsw.efSearch = HNSW_EF_SEARCH
    # A routing actor holds one CPU: search single-threaded, as onnxruntime does there.
    faiss.omp_set_num_threads(1)
    return index


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame
