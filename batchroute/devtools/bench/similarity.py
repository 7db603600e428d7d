"""``batchroute bench similarity``: the similarity router at batch scale.

A synthetic bank stands in for a year of nightly traffic: prompts come in families, as a
queue's do (the same question with other context, a template filled in again). Each bank entry
and each query is one of ``BASES`` real prompts (the bundled MMLU questions and the demo's
support, code and report prompts) followed by a context of about ``context_chars`` characters
cut from other prompts and a reference number; its outcomes are its family's (the MMLU labels
where the question is labelled, else a per-family draw), with one flip in ten.

Figures, each on one core (faiss and onnxruntime single-threaded, as in a routing actor):

- ``embed_prompts_per_s_per_core``: the embedder alone on the bench route's ~940-character
  prompts (:func:`batchroute.devtools.bench.route.prompts`), and beside it in the same run
  ``minilm_embed_prompts_per_s_per_core`` (on ``compare_rows`` of them) and
  ``words_router_prompts_per_s_per_core`` (the bundled words router scoring them);
- ``stage_prompts_per_s_per_core``: the route stage itself (:class:`RouteStage` with
  ``stages = ["similarity"]`` over the bank file: embed, k-NN, the policy, the output
  table) on the queries, in batches of the job's default ``[router] batch_size``
  (``stage_batch_rows``, as a routing actor hands them over); opening the bank and building
  its index are timed apart (``open_s``);
- ``recall_at_32``: the share of each query's exact top 32 (a flat inner-product search)
  that the stage's index returns, over ``recall_queries`` queries;
- ``curve``: recall and k-NN rate alone for each ``nprobe`` (IVF) around the default, in the
  stage's batches, with beside them faiss's IVF search over the same lists (float16 codes),
  alternating with batchroute's (``faiss_recall_at_32``, ``faiss_knn_queries_per_s_per_core``);
- ``bank_rows``, ``bank_bytes`` (what the stage holds: the index, with its vectors, plus
  the outcomes), ``bank_file_bytes``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import schemas
from batchroute.config import MMLU_LABELS, RouterConfig, SimilarityConfig
from batchroute.routers import similarity as sim
from batchroute.routers.ivf import IvfIndex
from batchroute.stages.route import Candidate, RouteSpec, RouteStage

K = 32
CHEAP, STRONG = "mixtral-8x7b-instruct", "gpt-4-1106-preview"
DEFAULT_ROWS = {"static": 1_000_000, "minilm": 2_000}
DEFAULT_QUERIES = {"static": 20_000, "minilm": 200}
NPROBES = (8, 16, 24, 32, 48, 64)
BATCH = 4096  # the embedding rates' batches
STAGE_BATCH = RouterConfig().batch_size  # the job's default: what a routing actor passes


def bases(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(prompts, outcomes [B, 2] for cheap and strong): the MMLU questions with their labels,
    then the demo's other prompts with a seeded outcome per prompt."""
    from batchroute.devtools import sample

    labels = pq.read_table(MMLU_LABELS, columns=["prompt", "model", "score"]).to_pylist()
    per: dict[str, dict[str, float]] = {}
    for r in labels:
        per.setdefault(r["prompt"], {})[r["model"]] = float(r["score"])
    mmlu = [p for p, o in per.items() if CHEAP in o and STRONG in o]
    demo = sample.generate(rows=30_000, seed=seed)
    kinds = demo.column("kind").to_pylist()
    others = sorted({p for p, k in zip(demo.column("prompt").to_pylist(), kinds, strict=True)
                     if p and k in ("faq", "code", "summarise") and len(p) < 4000})
    rng = np.random.default_rng(seed)
    cheap_ok = rng.random(len(others)) < 0.7
    out = np.vstack([np.array([[per[p][CHEAP], per[p][STRONG]] for p in mmlu], np.float32),
                     np.column_stack([cheap_ok, cheap_ok | (rng.random(len(others)) < 0.8)
                                      ]).astype(np.float32)])
    return mmlu + others, out


def family_texts(base: list[str], outcomes: np.ndarray, n: int, *, context_chars: int,
                 seed: int) -> tuple[pa.Array, np.ndarray]:
    """``n`` prompts of random families (vectorised: Arrow joins over pooled pieces), and
    their outcomes (the family's, one in ten flipped)."""
    rng = np.random.default_rng(seed)
    pool = min(20_000, n)
    arr = pa.array(base)
    # Context pieces: the start of another prompt, cut to about context_chars characters.
    pick = rng.integers(0, len(base), pool)
    pieces = pc.utf8_slice_codeunits(arr.take(pa.array(pick)), 0, max(context_chars, 1))
    fam = rng.integers(0, len(base), n)
    ctx = rng.integers(0, pool, n)
    ref = pc.cast(pa.array(rng.integers(0, 10**9, n)), pa.string())
    text = pc.binary_join_element_wise(arr.take(pa.array(fam)), " Context: ",
                                       pieces.take(pa.array(ctx)), " Ref ", ref, "")
    flip = rng.random((n, 1)) < 0.1
    return text, np.where(flip, 1.0 - outcomes[fam], outcomes[fam]).astype(np.float32)


def _requests(text: pa.Array) -> pa.Table:
    """The queries as the source stage hands them to routing (schemas.REQUESTS)."""
    n = len(text)
    cols = {f.name: pa.nulls(n, f.type) for f in schemas.REQUESTS}
    cols.update(request_id=pc.binary_join_element_wise(
        "q-", pc.cast(pa.array(np.arange(n)), pa.string()), ""),
        row=pa.array(np.arange(n), schemas.REQUESTS.field("row").type), prompt=text)
    return pa.table(cols, schema=schemas.REQUESTS)


def _write_bank(path: Path, vectors: np.ndarray, outcomes: np.ndarray, name: str) -> None:
    n, dim = vectors.shape
    # Two outcomes per entry (cheap, strong), built as flat arrays: no Python per entry. The
    # names are taken from a two-entry array: pyarrow 26 converts a large NumPy string array
    # (two million names for the default bank) into a ChunkedArray, which
    # StructArray.from_arrays refuses.
    names = pa.array([CHEAP, STRONG]).take(pa.array(np.tile(np.arange(2, dtype=np.int32), n)))
    flat = pa.StructArray.from_arrays(
        [names, pa.array(outcomes.ravel(), pa.float32())],
        fields=list(sim.OUTCOME))
    outs = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), flat)
    table = pa.table({
        "key": pc.cast(pa.array(np.arange(n)), pa.string()),
        "request_id": pa.nulls(n, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()),
                                                       dim),
        "outcomes": outs, "source": pa.nulls(n, pa.string())})
    schema = sim.bank_schema(dim).with_metadata({sim.META_EMBEDDER: name.encode()})
    pq.write_table(table.cast(schema), path)


def _in_batches(embedder: sim.TextEmbedder, text: pa.Array) -> np.ndarray:
    return np.vstack([embedder.embed(text.slice(i, BATCH)) for i in range(0, len(text), BATCH)])


def similarity(*, features: str = "static", bank_rows: int | None = None,
               queries: int | None = None, recall_queries: int = 2_000,
               context_chars: int = 300, index: str = "auto", seed: int = 0,
               compare_rows: int = 200, workdir: str | None = None) -> dict[str, Any]:
    """Build a synthetic bank of ``bank_rows`` entries with ``features`` and measure the
    similarity stage on it; with ``compare_rows``, also MiniLM's embedding rate on that many
    of the same prompts and the words router's, in this run. Raises ValueError for
    non-positive sizes."""
    import faiss

    from batchroute.devtools.bench.route import prompts

    rows = bank_rows or DEFAULT_ROWS.get(features, 2_000)
    nq = queries or DEFAULT_QUERIES.get(features, 200)
    if rows < 1 or nq < 1 or recall_queries < 1:
        raise ValueError("bank rows, queries and recall queries must be >= 1")
    load_before = os.getloadavg()
    faiss.omp_set_num_threads(1)
    embedder = sim.embedder_for(features)
    base, outcomes = bases(seed)
    bank_text, bank_out = family_texts(base, outcomes, rows, context_chars=context_chars,
                                       seed=seed + 1)
    query_text, _ = family_texts(base, outcomes, nq, context_chars=context_chars,
                                 seed=seed + 2)

    probe = prompts(min(20_000, max(nq, 1_000)), seed=seed).column("prompt").combine_chunks()
    embed_rate = _rate(embedder.embed, probe)
    beside = _beside(probe, compare_rows) if compare_rows else {}

    t0 = time.perf_counter()
    vectors = _in_batches(embedder, bank_text)
    bank_embed_s = time.perf_counter() - t0
    tmp = Path(workdir or tempfile.mkdtemp(prefix="batchroute-bench-similarity-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        bank_path = tmp / "bank.parquet"
        _write_bank(bank_path, vectors, bank_out, embedder.name)
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        del vectors
        cfg = SimilarityConfig(bank=str(bank_path), k=K, min_similarity=0.2, index=index)
        spec = RouteSpec((Candidate(CHEAP, 1.0, 10**9, 10**12),
                          Candidate(STRONG, 40.0, 10**9, 10**12)), (), {CHEAP: 0.7}, 512,
                         stages=("similarity",), similarity=cfg)
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # building is not what is measured
        stage = RouteStage(None, spec, embedder=embedder)
        open_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        requests = _requests(query_text)
        stage(requests.slice(0, 64))  # warm
        t0 = time.process_time()
        routed = sum(stage(requests.slice(i, STAGE_BATCH)).num_rows
                     for i in range(0, requests.num_rows, STAGE_BATCH))
        stage_rate = routed / (time.process_time() - t0)

        nb = stage._similarity
        q = embedder.embed(query_text.slice(0, recall_queries))
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        _, truth = exact.search(q, K)
        faiss.omp_set_num_threads(1)
        recall = _recall(np.vstack([nb.nearest(q[i:i + STAGE_BATCH])[1]
                                    for i in range(0, len(q), STAGE_BATCH)]), truth)
        curve = (_curve(nb.ann, q, truth, _faiss_ivf(nb.ann, exact))
                 if isinstance(nb.ann, IvfIndex) else [])
        held = _held_bytes(nb)
        file_bytes = bank_path.stat().st_size
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "features": features, "embedder": embedder.name, "dim": embedder.dim,
        "index": "exact" if nb.ann is None else type(nb.ann).__name__,
        "bank_rows": rows, "queries": nq, "k": K,
        "embed_prompts_per_s_per_core": round(embed_rate, 1),
        **beside,
        "embed_chars_mean": round(float(pc.mean(pc.utf8_length(probe)).as_py() or 0), 1),
        "stage_prompts_per_s_per_core": round(stage_rate, 1), "stage_batch_rows": STAGE_BATCH,
        "stage_chars_mean": round(float(pc.mean(pc.utf8_length(query_text)).as_py() or 0), 1),
        "recall_at_32": round(recall, 4),
        "nprobe": nb.ann.nprobe if isinstance(nb.ann, IvfIndex) else None,
        "curve": curve,
        "bank_bytes": held, "bank_file_bytes": file_bytes,
        "bank_embed_s": round(bank_embed_s, 1), "open_s": round(open_s, 1),
        "machine_cores": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
    }


def _rate(fn: Any, texts: pa.Array) -> float:
    """Prompts per CPU-second of ``fn`` over ``texts`` in batches (after one warm-up call)."""
    fn(texts.slice(0, 16))
    t0 = time.process_time()
    for i in range(0, len(texts), BATCH):
        fn(texts.slice(i, BATCH))
    return len(texts) / (time.process_time() - t0)


def _beside(probe: pa.Array, rows: int) -> dict[str, float]:
    """The yardsticks on the same prompts, in the same run: MiniLM (``rows`` of them) and the
    bundled words router (all)."""
    from batchroute.config import BUNDLED_ROUTER
    from batchroute.routers import classifier, embed

    minilm = embed.Embedder.load()
    router = classifier.Router(classifier.read_bytes(BUNDLED_ROUTER))
    return {"minilm_embed_prompts_per_s_per_core":
            round(_rate(minilm.embed, probe.slice(0, rows)), 1),
            "words_router_prompts_per_s_per_core": round(_rate(router.score, probe), 1)}


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(np.intersect1d(a, b)) for a, b in zip(found, truth, strict=True)]
    return float(np.sum(hits) / truth.size)


def _faiss_ivf(index: IvfIndex, exact: Any) -> Any:
    """The yardstick: faiss's IVF (float16 codes) over the same vectors and lists (the same
    centroids), searched per (query, list) as faiss does."""
    import faiss

    quantizer = faiss.IndexFlatIP(index.dim)
    quantizer.add(index.centroids)
    base = faiss.IndexIVFScalarQuantizer(quantizer, index.dim, index.nlist,
                                         faiss.ScalarQuantizer.QT_fp16,
                                         faiss.METRIC_INNER_PRODUCT)
    base.by_residual = False
    base.is_trained = True
    vectors = faiss.rev_swig_ptr(exact.get_xb(), exact.ntotal * index.dim)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # building is not what is measured
    base.add(np.asarray(vectors).reshape(exact.ntotal, index.dim))
    faiss.omp_set_num_threads(1)
    return base


def _curve(index: IvfIndex, q: np.ndarray, truth: np.ndarray, baseline: Any,
           passes: int = 3) -> list[dict[str, float]]:
    """Recall and k-NN rate alone at each nprobe, for batchroute's IVF and, alternating with
    it in the same run, faiss's over the same lists; both in the stage's batches, best of
    ``passes``."""
    import faiss

    def timed(search: Any) -> tuple[float, np.ndarray]:
        t0 = time.process_time()
        found = np.vstack([search(q[i:i + STAGE_BATCH]) for i in range(0, len(q), STAGE_BATCH)])
        return len(q) / (time.process_time() - t0), found

    out = []
    for nprobe in NPROBES:
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = nprobe
        ours = theirs = 0.0
        for _ in range(passes):
            rate, found = timed(lambda b, p=nprobe: index.search(b, K, nprobe=p)[1])
            ours = max(ours, rate)
            rate, base_found = timed(lambda b, p=ivf_params: baseline.search(b, K, params=p)[1])
            theirs = max(theirs, rate)
        out.append({"nprobe": nprobe, "recall_at_32": round(_recall(found, truth), 4),
                    "knn_queries_per_s_per_core": round(ours, 1),
                    "faiss_recall_at_32": round(_recall(base_found, truth), 4),
                    "faiss_knn_queries_per_s_per_core": round(theirs, 1)})
    return out


def _held_bytes(nb: sim.Neighbours) -> int:
    """What the stage keeps for its bank: the index (with its vectors), or the float32
    vectors of an exact search, plus the outcomes."""
    import faiss

    if isinstance(nb.ann, IvfIndex):
        vectors = nb.ann.nbytes
    elif nb.ann is not None:
        vectors = int(faiss.serialize_index(nb.ann).nbytes)
    else:
        vectors = int(nb.bank.embeddings.nbytes)
    return vectors + int(nb.outcomes.nbytes)


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"similarity stage, {r['features']} embeddings ({r['embedder']}, {r['dim']} dims), "
        f"index {r['index']}, bank of {r['bank_rows']:,}",
        f"embedding alone:   {r['embed_prompts_per_s_per_core']:>10,.0f} prompts/s/core "
        f"(~{r['embed_chars_mean']:.0f} chars)",
        *([f"  beside it: MiniLM {r['minilm_embed_prompts_per_s_per_core']:,.1f}, the words "
           f"router {r['words_router_prompts_per_s_per_core']:,.0f} prompts/s/core"]
          if "minilm_embed_prompts_per_s_per_core" in r else []),
        f"whole stage:       {r['stage_prompts_per_s_per_core']:>10,.0f} prompts/s/core "
        f"(~{r['stage_chars_mean']:.0f} chars, {r['queries']:,} queries in batches of "
        f"{r['stage_batch_rows']:,})",
        f"top-{r['k']} recall:     {r['recall_at_32']:>10.4f} against exact search",
        f"bank held:         {r['bank_bytes'] / 2**20:>10,.1f} MiB "
        f"(file {r['bank_file_bytes'] / 2**20:,.1f} MiB); embedding the bank "
        f"{r['bank_embed_s']} s, opening it {r['open_s']} s",
    ]
    if r["curve"]:
        lines += ["", "k-NN alone, batchroute's IVF and faiss's over the same lists "
                  "(alternating, one core):",
                  f"{'nprobe':>7}{'recall@32':>11}{'q/s/core':>10}{'faiss recall':>14}"
                  f"{'faiss q/s':>11}"]
        lines += [f"{c['nprobe']:>7}{c['recall_at_32']:>11.4f}"
                  f"{c['knn_queries_per_s_per_core']:>10,.0f}"
                  f"{c['faiss_recall_at_32']:>14.4f}"
                  f"{c['faiss_knn_queries_per_s_per_core']:>11,.0f}" for c in r["curve"]]
    lines.append(f"\nmachine cores {r['machine_cores']}, load average before "
                 f"{r['load_avg_before'][0]}")
    return "\n".join(lines)

