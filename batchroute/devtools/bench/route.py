"""``batchroute bench route``: how fast the shipped router scores, alone and in the Ray stage.

The figures, on N generated prompts of about ``chars`` characters:

- ``prompts_per_s_per_core``: the bundled router (:class:`batchroute.routers.classifier.Router`:
  numpy for a words router, else one single-threaded onnxruntime session; ``engine`` says
  which) scoring whole batches in this process. Only the ``score`` calls are timed: no
  reading, no policy.
- ``baseline_prompts_per_s_per_core`` and ``baseline_ratio``: the plainest Python pipeline
  for the same job, timed on the same batches in the same process, alternately with the
  router (batch by batch, the order swapped every batch, at least :data:`ALTERNATIONS`
  alternations): scikit-learn's ``HashingVectorizer`` (unigrams of the router's own token
  pattern, lowercase, 2^18 features, no alternating sign, l2 norm) then one fitted
  ``LogisticRegression.predict_proba`` per router model, from the Arrow batch (``to_pylist``
  is timed too) to probabilities [N, M]. Its logistic regressions are fitted on
  :data:`FIT_ROWS` other generated prompts labelled by the router's own scores (above or below
  each model's median), so their coefficients are real. Both run on one thread
  (threadpoolctl). ``baseline_ratio`` is the router's rate over the baseline's, from this run.
- for each actor count k, the Ray route stage exactly as a job runs it
  (:func:`batchroute.job.runner.route_shards`: a pool of k routing actors reads the ``requests``
  shards, scores them and applies the policy), timed from the first read to the last routed
  row reaching the driver. ``efficiency`` is rate(k) / (k x rate(1)), the share of
  linear scaling; ``ray_efficiency`` is rate(k) / (k x the single-core rate), what the stage
  keeps of k cores' worth of bare scoring.

The prompts are written once, as the source stage writes them, and every measurement runs in
one Ray session. A small warm-up pass starts Ray's worker processes before the first timed
pass, so no actor count pays that alone; starting each pool's actors and loading the router is
part of the stage and is timed.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from batchroute import config
from batchroute.job import cluster, runner
from batchroute.routers import classifier as rt
from batchroute.stages import source
from batchroute.stages.route import Candidate, RouteSpec
from batchroute.stages.sink import RunFolder

DEFAULT_CHARS = 940
DEFAULT_BATCH = 4096
ALTERNATIONS = 3  # router/baseline alternations at least (small inputs are scored again)
FIT_ROWS = 2000  # prompts the baseline's logistic regressions are fitted on
POOL = 4096  # distinct bodies; every prompt still differs by its request number
WORDS = (
    "the", "of", "and", "to", "in", "is", "for", "that", "on", "with", "as", "by", "this",
    "report", "customer", "revenue", "quarter", "team", "service", "latency", "request",
    "invoice", "account", "billing", "growth", "region", "pipeline", "model", "question",
    "answer", "summary", "incident", "deploy", "cluster", "data", "query", "error", "timeout",
    "retry", "budget", "cost", "forecast", "market", "product", "release", "feature", "user",
    "support", "ticket", "escalation", "contract", "renewal", "which", "following", "best",
    "describes", "explain", "compare", "analysis", "policy", "energy", "protein", "theorem",
    "function", "variable", "equation", "history", "court", "law", "economy", "inflation",
    "2024", "2025", "17", "42", "3.5", "99th", "percent", "million",
)


def prompts(n: int, chars: int = DEFAULT_CHARS, *, seed: int = 0) -> pa.Table:
    """``n`` prompts (``request_id``, ``prompt``) of about ``chars`` characters, the same table
    for the same arguments. Raises ValueError for n < 1 or chars < 40."""
    if n < 1 or chars < 40:
        raise ValueError(f"need n >= 1 and chars >= 40, got n={n}, chars={chars}")
    rnd = random.Random(seed)
    bodies = []
    for _ in range(min(n, POOL)):
        words: list[str] = []
        length = 0
        target = rnd.randint(int(chars * 0.9), int(chars * 1.1)) - 16  # room for the prefix
        while length < target:
            words.append(rnd.choice(WORDS))
            length += len(words[-1]) + 1
        bodies.append(" ".join(words).capitalize() + "?")
    index = np.random.default_rng(seed).integers(0, len(bodies), size=n)
    ids = pc.cast(pa.array(np.arange(n)), pa.string())
    text = pc.binary_join_element_wise("Request ", ids, ": ",
                                       pa.array(bodies).take(pa.array(index)), "")
    return pa.table({"request_id": pc.binary_join_element_wise("bench-", ids, ""),
                     "prompt": text})


def route(n: int, actors: Sequence[int] = (1, 2), *, chars: int = DEFAULT_CHARS,
          batch_size: int = DEFAULT_BATCH, router_path: str = config.BUNDLED_ROUTER,
          workdir: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Measure single-core scoring and the Ray route stage for each count in ``actors``.

    Raises ValueError for an empty or non-positive actor list, and RouterError for a bad
    router file. The workdir (a temporary one by default) is removed unless given.
    """
    counts = sorted(set(actors))
    if not counts or min(counts) < 1 or batch_size < 1:
        raise ValueError("need at least one actor count, every count >= 1, batch_size >= 1")
    router_bytes = rt.read_bytes(router_path)
    info = rt.inspect(router_bytes, path=router_path)
    # Rules are left out: this measures the classifier and the policy, which every row pays.
    spec = RouteSpec(tuple(Candidate(m, float(i + 1), 10**9, 10**12)
                           for i, m in enumerate(info.models)), (), {}, 512)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="batchroute-bench-route-"))
    load_before = os.getloadavg()
    try:
        shards = _write_requests(prompts(n, chars), tmp)
        single = score_alternately(router_bytes, lambda: _batches(shards, batch_size),
                                   chars=chars)
        # A local Ray gets one logical CPU per routing actor, as the job's own sizing (one
        # actor per CPU, up to router.actors) would give it.
        cluster.start_ray(ray_address, num_cpus=max(counts))
        cpus = cluster.cpus()
        if cpus < max(counts):
            raise ValueError(f"the Ray cluster has {cpus} CPUs; {max(counts)} routing actors "
                             f"need {max(counts)}")
        stages = _ray_stages(shards, router_bytes, spec, counts, batch_size, router_path, n)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = next((s["rows_per_s"] for s in stages if s["actors"] == 1), None)
    for s in stages:
        k = s["actors"]
        s["cores"] = k
        s["efficiency"] = round(s["rows_per_s"] / (k * base), 3) if base else None
        s["ray_efficiency"] = round(s["rows_per_s"] / (k * single["rate"]), 3)
    return {
        "n": n, "chars_mean": single["chars_mean"], "batch_size": batch_size,
        "router_version": info.version,
        "engine": single["engine"],
        "prompts_per_s_per_core": round(single["rate"], 1),
        "single_core_s": round(single["seconds"], 2),
        "baseline_prompts_per_s_per_core": round(single["baseline_rate"], 1),
        "baseline_ratio": single["baseline_ratio"],
        "baseline": single["baseline"],
        "stages": stages,
        # The headline: the largest pool measured, against that many cores of bare scoring.
        "ray_efficiency": stages[-1]["ray_efficiency"],
        "cluster_cpus": cpus,
        "machine_cores": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _write_requests(table: pa.Table, tmp: Path) -> list[str]:
    """Write ``table`` as the source stage does (canonical ``requests`` shards); return them."""
    pq.write_table(table, tmp / "prompts.parquet")
    folder = RunFolder(str(tmp), "run")
    data = source.open_input(str(tmp / "prompts.parquet"))
    return [folder.write_table(folder.sub("source"), folder.shard_name(i), batch)
            for i, batch in enumerate(source.read_requests(data, runner.SOURCE_SHARD_ROWS))]


def _batches(shards: list[str], batch_size: int) -> Iterable[pa.Array | pa.ChunkedArray]:
    """The text column of the shards, ``batch_size`` rows at a time, as the stage reads it."""
    scanner = ds.dataset(shards, format="parquet").to_batches(
        columns=["prompt", "messages"], batch_size=batch_size)
    for batch in scanner:
        yield source.request_text(pa.Table.from_batches([batch]))


class Baseline:
    """scikit-learn's plainest pipeline for the router's job: hashed unigram counts of the same
    tokens, then one logistic regression per model. ``score`` maps an Arrow batch of texts to
    probabilities [N, M] like :meth:`Router.score`."""

    def __init__(self, texts: pa.Array | pa.ChunkedArray, scores: np.ndarray) -> None:
        """Fit one regression per column of ``scores`` (the router's scores of ``texts``):
        label 1 above that column's median rank, else 0."""
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vectorizer = HashingVectorizer(
            ngram_range=(1, 1), n_features=2**18, alternate_sign=False, lowercase=True,
            token_pattern=rt.TOKEN_PATTERN)
        x = self.vectorizer.transform(texts.to_pylist())
        ranks = np.argsort(np.argsort(scores, axis=0, kind="stable"), axis=0)
        labels = (ranks >= len(scores) // 2).astype(int)
        # liblinear: a few times faster to fit on 2^18 sparse columns than lbfgs; scoring
        # (predict_proba) is the same sparse product either way.
        self.models = [LogisticRegression(solver="liblinear").fit(x, labels[:, j])
                       for j in range(scores.shape[1])]

    def score(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        x = self.vectorizer.transform(texts.to_pylist())
        return np.stack([m.predict_proba(x)[:, 1] for m in self.models], axis=1)


def score_alternately(router_bytes: bytes,
                      batches: Callable[[], Iterable[pa.Array | pa.ChunkedArray]], *,
                      chars: int = DEFAULT_CHARS, alternations: int = ALTERNATIONS,
                      fit_rows: int = FIT_ROWS) -> dict[str, Any]:
    """Time the router and the :class:`Baseline` on the same batches, one batch each in turn
    (the first to run swaps every batch), on one thread each. ``batches`` is called again for
    another pass until there were at least ``alternations`` batches. Returns the router's
    ``rate`` (rows/s over its timed ``seconds``), ``baseline_rate``, their ``baseline_ratio``,
    ``chars_mean``, ``engine`` and the ``baseline`` details (per-pass rates)."""
    from threadpoolctl import threadpool_limits

    router = rt.Router(router_bytes)
    fit = prompts(fit_rows, chars, seed=1)["prompt"]
    with threadpool_limits(limits=1):
        baseline = Baseline(fit, router.score(fit))
        spent = {"router": 0.0, "baseline": 0.0}
        passes: list[dict[str, float]] = []
        rows = chars_total = done = 0
        while done < alternations:
            pass_rows, pass_spent = 0, {"router": 0.0, "baseline": 0.0}
            for text in batches():
                order = [("router", router.score), ("baseline", baseline.score)]
                for name, score in order if done % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    score(text)
                    pass_spent[name] += time.perf_counter() - t0
                done += 1
                pass_rows += len(text)
                chars_total += int(pc.sum(pc.utf8_length(text)).as_py() or 0)
            if pass_rows == 0:
                raise ValueError("no prompts to score")
            rows += pass_rows
            for name in spent:
                spent[name] += pass_spent[name]
            passes.append({f"{k}_rate": round(pass_rows / v, 1) for k, v in pass_spent.items()})
    rate, baseline_rate = rows / spent["router"], rows / spent["baseline"]
    return {"rate": rate, "seconds": spent["router"], "chars_mean": round(chars_total / rows, 1),
            "engine": "numpy" if router.words is not None else "onnxruntime",
            "baseline_rate": baseline_rate, "baseline_ratio": round(rate / baseline_rate, 2),
            "baseline": {
                "pipeline": "HashingVectorizer(unigrams, token_pattern=[a-z0-9]+, lowercase, "
                            "2^18, alternate_sign=False, norm=l2) + LogisticRegression."
                            "predict_proba per model, one thread",
                "seconds": round(spent["baseline"], 3), "alternations": done,
                "fit_rows": fit_rows, "passes": passes}}


def _ray_stages(shards: list[str], router_bytes: bytes, spec: RouteSpec, counts: list[int],
                batch_size: int, router_path: str, n: int) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()

    def run(paths: list[str], k: int) -> int:
        return sum(t.num_rows for t in cluster.route_shards(
            paths, fs, router_bytes, spec, actors=k, batch_rows=batch_size,
            router_path=router_path))

    run(shards[:1], max(counts))  # warm-up: start the worker processes
    stages = []
    for k in counts:
        t0 = time.perf_counter()
        rows = run(shards, k)
        wall = time.perf_counter() - t0
        if rows != n:
            raise RuntimeError(f"route stage with {k} actors returned {rows} rows, not {n}")
        stages.append({"actors": k, "rows": rows, "wall_s": round(wall, 2),
                       "rows_per_s": round(rows / wall, 1)})
    return stages


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['n']:,} prompts of ~{result['chars_mean']:.0f} chars, batches of "
             f"{result['batch_size']}; router {result['router_version']}",
             f"scoring alone, one core: {result['prompts_per_s_per_core']:,.0f} prompts/s "
             f"({result['engine']}); scikit-learn baseline "
             f"{result['baseline_prompts_per_s_per_core']:,.0f} prompts/s, ratio "
             f"{result['baseline_ratio']:.2f}",
             "",
             f"{'actors':>6}{'wall s':>9}{'rows/s':>11}{'efficiency':>12}{'ray_eff':>9}"]
    for s in result["stages"]:
        eff = "-" if s["efficiency"] is None else f"{s['efficiency']:.3f}"
        lines.append(f"{s['actors']:>6}{s['wall_s']:>9.2f}{s['rows_per_s']:>11,.0f}{eff:>12}"
                     f"{s['ray_efficiency']:>9.3f}")
    lines.append(f"\nRay CPUs {result['cluster_cpus']:.0f}, machine cores "
                 f"{result['machine_cores']}, load average before "
                 f"{result['load_avg_before'][0]} after {result['load_avg_after'][0]}")
    return "\n".join(lines)
