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
costs O(bank) per prompt, fine for some tens of thousands of entries. From there on, or with
``index = "ivf"``, an inverted-file index answers instead (:mod:`batchroute.routers.ivf`):
inner product on the normalised embeddings, about 4·sqrt(B) lists (a power of two, 4,096 for
a million entries), vectors stored as int16 (the bytes of float16, closer than float16 to
float32), ``[router.similarity] nprobe`` lists searched per prompt, a whole batch of prompts
at a time. ``index = "hnsw"`` (faiss's HNSW graph, M = 32, efSearch = 512) is kept for
comparison: slower and larger. An index is built once per bank file and kept beside it as
``BANK.parquet.ivf`` or ``.hnsw`` (rebuilt when the bank changes); once it exists the bank's
own float32 vectors are not kept in memory.
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
from batchroute.errors import ConfigError, RouterError, SchemaError
from batchroute.routers import ivf
from batchroute.routers.ivf import IvfIndex


class TextEmbedder(Protocol):
    """What the bank needs of a sentence embedder (:class:`batchroute.routers.embed.Embedder`,
    or a test's stand-in): L2-normalised vectors of ``dim`` floats, and a name the bank records
    so that a bank is never searched with another embedder's vectors."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray: ...

log = logging.getLogger("batchroute")

ANN_MIN_ROWS = 50_000
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


# The embedder each ``features`` value names, as recorded in a bank's metadata.
EMBEDDER_NAMES = {"static": "static-minilm", "minilm": "all-MiniLM-L6-v2"}
DEFAULT_FEATURES = "minilm"  # static loses 0.021 APGR on held-out MMLU (README)


def embedder_for(features: str = DEFAULT_FEATURES) -> TextEmbedder:
    """The sentence embedder ``features`` names ("static" or "minilm"). Raises ConfigError for
    another name, RouterError when its files are missing."""
    if features == "static":
        from batchroute.routers.static import StaticEmbedder

        return StaticEmbedder.load()
    if features == "minilm":
        from batchroute.routers.embed import Embedder

        return Embedder.load()
    raise ConfigError(f"similarity features must be one of {', '.join(EMBEDDER_NAMES)}, "
                      f"got {features!r}")


def features_of(embedder_name: str) -> str:
    """The ``features`` value of a bank's recorded embedder ("" when unknown)."""
    return next((f for f, n in EMBEDDER_NAMES.items() if n == embedder_name), "")


def default_embedder() -> TextEmbedder:
    return embedder_for(DEFAULT_FEATURES)


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
        if bank.embeddings.shape[1] != embedder.dim and len(bank):
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
        if embedder is None:
            embedder = embedder_for(cfg.features or features_of(bank.embedder)
                                    or DEFAULT_FEATURES)
        kind = cfg.index if cfg.index != "auto" else (
            "ivf" if len(bank) >= ANN_MIN_ROWS else "exact")
        ann = (ann_index(bank, cfg.bank, kind, nprobe=cfg.nprobe)
               if kind != "exact" and len(bank) else None)
        if ann is not None:  # the index holds the vectors: drop the float32 copy
            bank.embeddings = np.zeros((0, bank.embeddings.shape[1]), np.float32)
        return cls(bank, embedder, k=cfg.k,
                   min_similarity=cfg.min_similarity, models=models, ann=ann)

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


def ivf_lists(rows: int) -> int:
    """The IVF index's list count for a bank of ``rows``: about 4·sqrt(rows), a power of two,
    at least 1 and with at least 39 training points per list."""
    want = 4.0 * np.sqrt(max(rows, 1))
    lists = 1 << max(0, round(float(np.log2(want))))
    while lists > 1 and lists * 39 > rows:
        lists //= 2
    return lists


def build_index(vectors: np.ndarray, kind: str, *, seed: int = 0) -> Any:
    """An index over unit ``vectors`` [B, dim] (inner product): ``ivf``
    (:class:`batchroute.routers.ivf.IvfIndex`, :func:`ivf_lists` lists) or ``hnsw`` (faiss)."""
    if kind == "ivf":
        return IvfIndex.build(vectors, ivf_lists(len(vectors)), seed=seed)
    if kind == "hnsw":
        import faiss

        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(np.ascontiguousarray(vectors, np.float32))
        return index
    raise ConfigError(f"router.similarity.index: no approximate index {kind!r}")


def tune(index: Any, *, nprobe: int = ivf.NPROBE) -> Any:
    """Search settings, on a built or read index: ``nprobe`` lists (IVF) or efSearch (HNSW,
    on one thread, since a routing actor holds one CPU as onnxruntime does there)."""
    if isinstance(index, IvfIndex):
        return index.with_nprobe(nprobe)
    import faiss

    index.hnsw.efSearch = HNSW_EF_SEARCH
    faiss.omp_set_num_threads(1)
    return index


def ann_index(bank: Bank, bank_path: str, kind: str = "ivf", *,
              nprobe: int = ivf.NPROBE) -> Any:
    """The bank's index of ``kind`` (ivf or hnsw): read from ``BANK.KIND`` when it was built
    from this very bank file, else built and saved there (a temporary file, then a rename;
    an unreadable saved index is built again)."""
    import hashlib
    import os

    import faiss

    stat = os.stat(bank_path)
    layout = ivf.FORMAT if kind == "ivf" else f"hnsw{HNSW_M}"
    stamp = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{len(bank)}:{kind}:{layout}:"
                           f"{ivf_lists(len(bank))}".encode()).hexdigest()[:16]
    path = Path(f"{bank_path}.{kind}")
    stamp_path = Path(f"{bank_path}.{kind}.stamp")
    index: Any = None
    if path.exists() and stamp_path.exists() and stamp_path.read_text() == stamp:
        try:
            index = (IvfIndex.load(path)[0] if kind == "ivf"
                     else faiss.read_index(str(path)))
        except (OSError, ValueError, RuntimeError, RouterError) as exc:
            log.warning("the saved %s index of %s is unreadable (%s): building it again",
                        kind, bank_path, exc)
        if index is not None and index.ntotal != len(bank):
            log.warning("the saved %s index of %s holds %d entries, the bank %d: building "
                        "it again", kind, bank_path, index.ntotal, len(bank))
            index = None
    if index is None:
        log.info("building the %s index of %s (%d entries)", kind, bank_path, len(bank))
        index = build_index(bank.embeddings, kind)
        if kind == "ivf":
            index.save(path, {"bank": os.path.basename(bank_path), "stamp": stamp})
        else:
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            faiss.write_index(index, str(tmp))
            tmp.replace(path)
        stamp_path.write_text(stamp)
    return tune(index, nprobe=nprobe)


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame
