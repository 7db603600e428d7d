"""An inverted-file (IVF) k-NN index over unit vectors, searched a batch of queries at a time.

The similarity router's bank can hold a year of nightly prompts: a million entries or more. An
inverted file splits it into ``L`` lists by nearest k-means centroid (inner product); a query
is scored against the vectors of its ``nprobe`` nearest lists only, and its top ``k`` kept.

Why not faiss's own IVF search: faiss scans each (query, list) pair on its own, at about 13 ns
a vector on one core here (64 dimensions, float16), so a list is read again for every query
that probes it. Routing hands over 1,024 prompts at a time, and on a million-entry bank with
4,096 lists each list is probed by several of them. Here the whole batch is scanned list by
list (``_ivfscan.c``): each block of 16 vectors is decoded once and scored against every
query of the batch that probes its list, four queries and 32 vectors at a time, while it is
in the cache. On the bench's million-entry bank that is about 3 times faster than faiss at
the same recall (README, "Static embeddings").

Vectors are stored as int16: each component times 32767, rounded. A unit vector's components
lie in [-1, 1], so a score is off by about 1e-5 at most; float16 codes are off by about 1e-4,
and the neighbours of a prompt in a family of near-duplicates can be 3e-4 apart. The bytes
are those of float16: 128 per 64-dimension vector.

The layout (one safetensors file, read memory-mapped, so routing actors on one machine share
its pages):

    centroids  float32 [L, dim]            k-means (faiss) on a seeded sample of the vectors
    codes      int16 [blocks, dim, 16]     each list's vectors in whole blocks of 16,
                                           dimension-major inside a block
    block_off  int64 [L + 1]               list l is blocks block_off[l] .. block_off[l+1]-1
    ids        int64 [blocks * 16]         the row of each slot; -1 pads a list's last block

The nearest lists of a query are found by the same kernel, over the centroids as one list.
Each query's nearest list is scanned in a first pass and the rest in a second, so that its
heap holds good neighbours before the bulk of the scan (5% less time on the bench's bank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchroute.config import SimilarityConfig
from batchroute.errors import RouterError
from batchroute.routers import tensorfile

BLOCK = 16  # vectors a block: _ivfscan.c's BLOCK
SCALE = 32767.0
NPROBE = SimilarityConfig.nprobe  # the job's default
TRAIN_PER_LIST = 64  # k-means sample: 64 points a list (faiss asks for at least 39)
KMEANS_ITERATIONS = 10
WARM = 1  # each query's nearest lists scanned first (top_k's warm)
FORMAT = "batchroute-ivf-1"
_CHUNK = 65_536  # vectors assigned to lists per kernel call while building


def _kernel() -> Any:
    try:
        from batchroute.routers import _ivfscan
    except ImportError as exc:  # an install without its compiled part
        raise RouterError(
            "batchroute's compiled IVF search (batchroute.routers._ivfscan) is missing: "
            "reinstall batchroute with a C compiler present (pip install --force-reinstall "
            f"--no-deps batchroute, or `make venv` in a clone): {exc}") from None
    return _ivfscan


@dataclass(frozen=True, eq=False)
class Lists:
    """Vectors packed list by list into blocks, as the kernel reads them."""

    codes: np.ndarray      # int16 [blocks, dim, BLOCK]
    block_off: np.ndarray  # int64 [lists + 1]
    ids: np.ndarray        # int64 [blocks * BLOCK], -1 for padding

    @classmethod
    def pack(cls, vectors: np.ndarray, assign: np.ndarray, lists: int) -> Lists:
        """``vectors`` [n, dim] (components in [-1, 1]) in the lists ``assign`` [n] names;
        ids are row numbers, in row order within a list."""
        n, dim = vectors.shape
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=lists)
        blocks = -(-counts // BLOCK)
        block_off = np.zeros(lists + 1, np.int64)
        np.cumsum(blocks, out=block_off[1:])
        first = np.zeros(lists + 1, np.int64)
        np.cumsum(counts, out=first[1:])
        sorted_assign = assign[order]
        slot = block_off[sorted_assign] * BLOCK + (np.arange(n) - first[sorted_assign])
        total = int(block_off[-1]) * BLOCK
        ids = np.full(total, -1, np.int64)
        ids[slot] = order
        flat = np.zeros((total, dim), np.int16)
        flat[slot] = quantise(vectors[order])
        codes = np.ascontiguousarray(flat.reshape(-1, BLOCK, dim).transpose(0, 2, 1))
        return cls(codes, block_off, ids)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.block_off.nbytes + self.ids.nbytes)


def quantise(vectors: np.ndarray) -> np.ndarray:
    """int16 codes of vectors whose components lie in [-1, 1] (clipped there)."""
    codes: np.ndarray = np.clip(np.rint(np.asarray(vectors, np.float32) * SCALE), -SCALE,
                                SCALE).astype(np.int16)
    return codes


def top_k(lists: Lists, queries: np.ndarray, probes: np.ndarray, k: int, *,
          warm: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best (inner product, id) over the lists ``probes`` [n, p] names
    (-1: none), best first; (-inf, -1) where fewer than ``k`` were found. ``queries`` are
    float32 [n, dim] already divided by SCALE.

    With ``warm``, the first ``warm`` columns of ``probes`` (a query's nearest lists, when
    they come best first) are scanned before the others: a query's heap then starts the
    bulk of the scan already holding good neighbours, and far fewer of the later scores
    enter it only to be pushed out again."""
    n = len(queries)
    dist = np.full((n, k), -np.inf, np.float32)
    labels = np.full((n, k), -1, np.int64)
    parts = [probes[:, :warm], probes[:, warm:]] if 0 < warm < probes.shape[1] else [probes]
    for part in parts:
        _scan(lists, queries, part, dist, labels)
    best = np.argsort(-dist, axis=1, kind="stable")
    return np.take_along_axis(dist, best, axis=1), np.take_along_axis(labels, best, axis=1)


def _scan(lists: Lists, queries: np.ndarray, probes: np.ndarray, dist: np.ndarray,
          labels: np.ndarray) -> None:
    """One pass of the kernel over the lists ``probes`` names, onto the heaps ``dist`` and
    ``labels``."""
    nlists = len(lists.block_off) - 1
    flat = probes.ravel()
    keep = np.flatnonzero(flat >= 0)
    wanted = flat[keep]
    # The queries of each list, list by list: a counting sort of the (query, list) pairs.
    order = np.argsort(wanted.astype(np.int16 if nlists <= 2**15 else np.int32), kind="stable")
    qlist = (keep[order] // max(probes.shape[1], 1)).astype(np.int32)
    qstart = np.zeros(nlists + 1, np.int64)
    np.cumsum(np.bincount(wanted, minlength=nlists), out=qstart[1:])
    _kernel().scan(lists.codes, lists.block_off, lists.ids, lists.codes.shape[1],
                   np.ascontiguousarray(queries), qstart, qlist, dist, labels)


def _pack_centroids(centroids: np.ndarray) -> Lists:
    return Lists.pack(centroids, np.zeros(len(centroids), np.int64), 1)


def nearest_lists(coarse: Lists, queries: np.ndarray, nprobe: int) -> np.ndarray:
    """int64 [n, nprobe]: each query's ``nprobe`` best entries of ``coarse`` (the centroids
    packed as one list), nearest first; -1 where none was found (a query with NaN
    components). ``queries`` as :func:`top_k` takes them."""
    every = np.zeros((len(queries), 1), np.int64)
    return top_k(coarse, queries, every, nprobe)[1]


@dataclass(frozen=True, eq=False)
class IvfIndex:
    """k-NN by inner product over unit vectors: :meth:`build`, :meth:`search`, :meth:`save`
    and :meth:`load`. ``nprobe`` lists are searched per query unless a search says
    otherwise."""

    centroids: np.ndarray  # float32 [L, dim]
    lists: Lists
    nprobe: int = NPROBE
    coarse: Lists = field(init=False, repr=False)  # the centroids as one list

    def __post_init__(self) -> None:
        object.__setattr__(self, "coarse", _pack_centroids(self.centroids))

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    @property
    def ntotal(self) -> int:
        return int(np.count_nonzero(self.lists.ids >= 0))

    @property
    def nbytes(self) -> int:
        """What a search reads: the codes, ids and offsets, and the centroids twice."""
        return self.lists.nbytes + self.coarse.nbytes + int(self.centroids.nbytes)

    def with_nprobe(self, nprobe: int) -> IvfIndex:
        return IvfIndex(self.centroids, self.lists, nprobe)

    @classmethod
    def build(cls, vectors: np.ndarray, lists: int, *, seed: int = 0,
              nprobe: int = NPROBE) -> IvfIndex:
        """Train ``lists`` centroids on a seeded sample of ``vectors`` [n, dim] (unit rows)
        and put each vector in its nearest centroid's list."""
        import faiss

        data = np.ascontiguousarray(vectors, np.float32)
        n, dim = data.shape
        lists = max(1, min(lists, n))
        sample = min(n, lists * TRAIN_PER_LIST)
        pick = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
        # Spherical k-means (unit centroids) whose assignment step is the search's own
        # (largest inner product), as faiss trains an inner-product IVF. Plain k-means lost
        # 0.02 recall at equal nprobe; unnormalised centroids drew many more vectors into
        # the largest lists, and so into every scan.
        kmeans = faiss.Clustering(dim, lists)
        kmeans.niter, kmeans.seed, kmeans.verbose = KMEANS_ITERATIONS, seed, False
        kmeans.spherical = True
        kmeans.max_points_per_centroid = TRAIN_PER_LIST
        kmeans.train(data[pick], faiss.IndexFlatIP(dim))
        centroids = faiss.vector_to_array(kmeans.centroids).reshape(lists, dim)
        coarse = _pack_centroids(centroids)
        assign = np.zeros(n, np.int64)
        for i in range(0, n, _CHUNK):
            assign[i:i + _CHUNK] = nearest_lists(coarse, data[i:i + _CHUNK] / np.float32(SCALE),
                                                 1)[:, 0]
        # A vector with NaN components has no nearest list: the first takes it.
        return cls(centroids, Lists.pack(data, np.maximum(assign, 0), lists), nprobe)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """(similarity float32 [n, k], id int64 [n, k]) of each query's ``k`` nearest vectors
        in its ``nprobe`` nearest lists, most similar first; (-inf, -1) past what those lists
        hold. Same signature as a faiss index's search."""
        q = np.ascontiguousarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}], got {list(q.shape)}")
        q = q / np.float32(SCALE)
        probes = nearest_lists(self.coarse, q, max(1, min(nprobe or self.nprobe, self.nlist)))
        return top_k(self.lists, q, probes, k, warm=WARM)

    def save(self, path: str | Path, metadata: dict[str, str]) -> None:
        tensorfile.write(path, {"centroids": self.centroids, "codes": self.lists.codes,
                                "block_off": self.lists.block_off, "ids": self.lists.ids},
                         {"format": FORMAT, **metadata})

    @classmethod
    def load(cls, path: str | Path, *, nprobe: int = NPROBE) -> tuple[IvfIndex, dict[str, str]]:
        """The index saved at ``path`` (memory-mapped) and its metadata. Raises RouterError
        for a file that is not one (the kernel checks the layout's shape on every search)."""
        meta = tensorfile.read_metadata(path)
        if meta.get("format") != FORMAT:
            raise RouterError(f"{path}: not a {FORMAT} index (format "
                              f"{meta.get('format')!r})")
        t = tensorfile.read(path)
        try:
            centroids, codes, block_off, ids = (t["centroids"], t["codes"], t["block_off"],
                                                t["ids"])
        except KeyError as exc:
            raise RouterError(f"{path}: index tensor {exc} is missing") from None
        if (centroids.ndim != 2 or codes.ndim != 3 or codes.shape[1:] != (centroids.shape[1],
                                                                          BLOCK)
                or len(block_off) != len(centroids) + 1 or len(ids) != len(codes) * BLOCK):
            raise RouterError(f"{path}: index tensors of inconsistent shapes")
        return cls(centroids, Lists(codes, block_off, ids), nprobe), meta
