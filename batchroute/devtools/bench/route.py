"""``batchroute bench route``: how fast the shipped router scores, alone and in the Ray stage.

Two figures, on N generated prompts of about ``chars`` characters:

- ``prompts_per_s_per_core``: the bundled router (:class:`batchroute.routers.classifier.Router`, one
  single-threaded onnxruntime session) scoring whole batches in this process. Only the
  ``score`` calls are timed: no reading, no policy.
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
from collections.abc import Sequence
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
        single = _score_alone(router_bytes, shards, batch_size)
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
        "prompts_per_s_per_core": round(single["rate"], 1),
        "single_core_s": round(single["seconds"], 2),
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


def _score_alone(router_bytes: bytes, shards: list[str], batch_size: int) -> dict[str, float]:
    router = rt.Router(router_bytes)
    seconds = 0.0
    rows = chars = 0
    scanner = ds.dataset(shards, format="parquet").to_batches(
        columns=["prompt", "messages"], batch_size=batch_size)
    for batch in scanner:
        text = source.request_text(pa.Table.from_batches([batch]))
        t0 = time.perf_counter()
        router.score(text)
        seconds += time.perf_counter() - t0
        rows += len(text)
        chars += int(pc.sum(pc.utf8_length(text)).as_py() or 0)
    return {"rate": rows / seconds, "seconds": seconds, "chars_mean": round(chars / rows, 1)}


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
             f"scoring alone, one core: {result['prompts_per_s_per_core']:,.0f} prompts/s",
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
