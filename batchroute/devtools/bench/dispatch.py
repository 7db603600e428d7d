"""``batchroute bench dispatch``: how close dispatch runs to the providers' rate limits.

The mock provider runs in a process of its own, enforcing per-model limits over one-second
windows (real providers enforce per-minute limits over short windows) and answering after a
log-normal latency around ``latency_ms``. The client is the job's own
:class:`~batchroute.stages.dispatch.dispatcher.ModelDispatcher`, one per model, fed in batches of the
job's default size and depth as the dispatch actors are, all in this process's event loop and
with the actors' garbage-collector settings; so ``client_cpu_ms_per_request`` is this
process's CPU time over the requests sent, all models on one core.

The aggregate rate is split over ``models`` models in the ratio K : K-1 : ... : 1 and the
requests in the same ratio, so every model would finish at the same moment at its limit. The
last model is token-bound: its tokens-per-minute limit is exactly its share of the tokens
(counted as providers count them, prompt tokens plus ``max_tokens``), the others have twice
what they need. The lower bound on wall time is the slowest model's
``max(requests / RPM, tokens / TPM)``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import secrets
import statistics
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from batchroute import schemas, tokens
from batchroute.config import DispatchConfig, ModelConfig
from batchroute.devtools.bench.memory import _free_port
from batchroute.devtools.mock_provider import count_tokens
from batchroute.stages.dispatch.dispatcher import ModelDispatcher, tune_gc_for_dispatch

KEY_ENV = "BATCHROUTE_BENCH_KEY"
MAX_TOKENS = 64
WORDS = ("route", "batch", "model", "token", "limit", "answer", "cost", "prompt", "quality",
         "night", "queue", "summary", "report", "provider", "latency", "budget")


def dispatch(*, rate: float = 1000.0, models: int = 3, latency_ms: float = 300.0,
             n: int = 20_000, seed: int = 0, baseline: bool = False,
             pairs: int = 5) -> dict[str, Any]:
    """Send ``n`` requests at an aggregate limit of ``rate`` requests/s; return the figures.

    With ``baseline``, run ``pairs`` pairs instead: batchroute's client, then the naive loop
    (:mod:`batchroute.devtools.bench.naive`), each against a fresh mock with the same
    settings, and report them side by side (see :func:`_compared`). Five by default: on a
    shared 2-core machine the naive loop's own CPU per request moves by a quarter from run
    to run, and the median of five pairs moves less than that of three."""
    if rate <= 0 or models < 1 or n < models or latency_ms < 0 or pairs < 1:
        raise ValueError("need rate > 0, models >= 1, n >= models, latency_ms >= 0 and "
                         "pairs >= 1")
    plans = _plans(rate, models, n, random.Random(seed))
    pinned = _cores()
    if not baseline:
        return {**_run(plans, latency_ms, pinned, naive=False, rate=rate), **_pinning(pinned)}
    ours, theirs = [], []
    for _ in range(pairs):
        ours.append(_run(plans, latency_ms, pinned, naive=False, rate=rate))
        theirs.append(_run(plans, latency_ms, pinned, naive=True, rate=rate))
    return {**_compared(ours, theirs), **_pinning(pinned)}


def _plans(rate: float, models: int, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Each model's name, wire, limits and routed rows (the split described above)."""
    weights = [models - i for i in range(models)]
    shares = [w / sum(weights) for w in weights]
    counts = [round(n * s) for s in shares]
    counts[0] += n - sum(counts)
    plans = []
    for i, (share, count) in enumerate(zip(shares, counts, strict=True)):
        table, provider_tokens = _requests(f"bench-{i}", count, rng)
        rpm = max(1, round(rate * share * 60))
        # Tokens bind the last model exactly; the others have room to spare.
        tpm = math.ceil(provider_tokens * rpm / count) * (1 if i == models - 1 else 2)
        plans.append({"name": f"bench-model-{i}", "wire": ("openai", "anthropic")[i % 2],
                      "rpm": rpm, "tpm": tpm, "table": table, "tokens": provider_tokens})
    return plans


def _cores() -> tuple[int, int] | None:
    """(client core, mock core), or None where this process may use fewer than two cores."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def _pinning(pinned: tuple[int, int] | None) -> dict[str, Any]:
    if pinned is None:
        return {"pinned": None, "pinning": "not pinned: this process may use only one core, "
                "so the client and the mock share it"}
    return {"pinned": {"client_core": pinned[0], "mock_core": pinned[1]}}


def _run(plans: list[dict[str, Any]], latency_ms: float, pinned: tuple[int, int] | None, *,
         naive: bool, rate: float) -> dict[str, Any]:
    """One run against a fresh mock: batchroute's dispatchers, or the naive loop."""
    load = os.getloadavg()
    key = f"sk-bench-{secrets.token_hex(8)}"
    env = {**os.environ, KEY_ENV: key}
    port = _free_port()
    cli = [sys.executable, "-m", "batchroute"]
    limits = [arg for p in plans for arg in ("--model-limit", f"{p['name']}={p['rpm']}:{p['tpm']}")]
    # Pinned from its first instruction (a thread inherits its creator's cores, so pinning
    # the pid later could miss threads already started).
    mock_core = None if pinned is None else {pinned[1]}
    mock = subprocess.Popen(
        [*cli, "mock-provider", "--port", str(port), "--api-key-env", KEY_ENV, "--window-s", "1",
         "--latency-ms", str(latency_ms), *limits],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=None if mock_core is None else lambda: os.sched_setaffinity(0, mock_core))
    affinity = os.sched_getaffinity(0)
    try:
        if pinned is not None:
            os.sched_setaffinity(0, {pinned[0]})
        subprocess.run([*cli, "mock-provider", "--wait-ready", "--port", str(port)], check=True)
        url = f"http://127.0.0.1:{port}"
        configs = [ModelConfig(
            name=p["name"], provider=p["wire"], api_key_env=KEY_ENV,
            base_url=url + ("/v1" if p["wire"] == "openai" else ""),
            input_usd_per_mtok=1.0, output_usd_per_mtok=2.0, rpm=p["rpm"], tpm=p["tpm"],
            # Enough connections for the latency tail at the model's rate; the limiter, not
            # the pool, must be what holds the pace.
            concurrency=math.ceil(p["rpm"] / 60 * latency_ms / 1000 * 3) + 16,
            context_window=8192, timeout_s=30.0) for p in plans]
        server = psutil.Process(mock.pid)
        server_cpu0 = sum(server.cpu_times()[:2])
        tables = [p["table"] for p in plans]
        if naive:  # as written without tuning: the interpreter's own GC settings
            measured = asyncio.run(_drive_naive(configs, tables, key))
        else:
            thresholds = gc.get_threshold()
            tune_gc_for_dispatch()  # as the dispatch actors do
            try:
                measured = asyncio.run(_drive(configs, tables, key))
            finally:  # the bench may run inside a longer process (a test session)
                gc.unfreeze()
                gc.set_threshold(*thresholds)
        # The mock shares the machine: when it runs out of CPU, replies slow down and the
        # run is bound by the server rather than by the limits or the client.
        measured["server_cpu_s"] = sum(server.cpu_times()[:2]) - server_cpu0
    finally:
        os.sched_setaffinity(0, affinity)
        mock.terminate()
        mock.wait()
    return {"client": "naive" if naive else "batchroute",
            **_figures(plans, measured, rate=rate, latency_ms=latency_ms),
            "load_average_at_start": [round(x, 2) for x in load]}


def _compared(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs of runs as one result. The top level keeps the keys of a single run, for
    batchroute's client: the median of the runs for ``wall_s``, ``wall_over_bound`` and
    ``client_cpu_ms_per_request``; the worst for the 429 counts, share and time; the sum of
    ``failed``; ``per_model`` from the run with the median wall time. ``client_cpu_ratio`` is
    the median over the pairs of (ours / naive) CPU ms per request, each pair run back to
    back."""
    ratios = [o["client_cpu_ms_per_request"] / t["client_cpu_ms_per_request"]
              for o, t in zip(ours, theirs, strict=True)]
    by_wall = sorted(ours, key=lambda r: r["wall_over_bound"])
    last = [r["last_429_s"] for r in ours if r["last_429_s"] is not None]
    return {
        **by_wall[len(by_wall) // 2],
        "wall_s": _median([r["wall_s"] for r in ours]),
        "wall_over_bound": _median([r["wall_over_bound"] for r in ours]),
        "client_cpu_ms_per_request": _median([r["client_cpu_ms_per_request"] for r in ours]),
        "client_system_cpu_ms_per_request": _median(
            [r["client_system_cpu_ms_per_request"] for r in ours]),
        "rate_limited": max(r["rate_limited"] for r in ours),
        "rate_limited_share": max(r["rate_limited_share"] for r in ours),
        "last_429_s": max(last) if last else None,
        "failed": sum(r["failed"] for r in ours),
        "client_cpu_ratio": round(_median(ratios), 3),
        "client_cpu_ratio_of": "median over the pairs of ours / naive CPU ms per request",
        "client_cpu_ratios": [round(r, 3) for r in ratios],
        "baseline_wall_over_bound": _median([r["wall_over_bound"] for r in theirs]),
        "baseline_client_cpu_ms_per_request": _median(
            [r["client_cpu_ms_per_request"] for r in theirs]),
        "baseline_client_system_cpu_ms_per_request": _median(
            [r["client_system_cpu_ms_per_request"] for r in theirs]),
        "baseline_rate_limited_share": max(r["rate_limited_share"] for r in theirs),
        "baseline_failed": sum(r["failed"] for r in theirs),
        "pairs": len(ours),
        "runs": [{k: v for k, v in r.items() if k != "per_model"}
                 for pair in zip(ours, theirs, strict=True) for r in pair],
    }


def _median(values: list[float]) -> float:
    return round(float(statistics.median(values)), 3)


def _requests(prefix: str, count: int, rng: random.Random) -> tuple[pa.Table, int]:
    """``count`` routed rows of 200-1,200 characters; also the tokens a provider charges."""
    prompts = []
    for i in range(count):
        target = rng.randint(200, 1200)
        words = [f"{prefix} request {i}:"]
        length = len(words[0])
        while length < target:
            words.append(rng.choice(WORDS))
            length += len(words[-1]) + 1
        prompts.append(" ".join(words))
    chars = [len(p) for p in prompts]
    cols: dict[str, Any] = {name: pa.nulls(count, f.type)
                            for name, f in zip(schemas.ROUTED.names, schemas.ROUTED, strict=True)}
    cols.update(
        request_id=pa.array([f"{prefix}-{i}" for i in range(count)]),
        row=pa.array(range(count), pa.int64()), prompt=pa.array(prompts),
        route_reason=pa.repeat(pa.scalar("bench"), count),
        est_input_tokens=pa.array(tokens.input_estimate(np.array(chars, np.int64)), pa.int64()),
        est_output_tokens=pa.repeat(pa.scalar(MAX_TOKENS, pa.int64()), count))
    table = pa.table(cols, schema=schemas.ROUTED)
    return table, sum(count_tokens(p) for p in prompts) + MAX_TOKENS * count


async def _drive(configs: list[ModelConfig], tables: list[pa.Table],
                 key: str) -> dict[str, Any]:
    policy = DispatchConfig()
    loop = asyncio.get_running_loop()
    dispatchers = [ModelDispatcher(c, policy, run_id="bench", api_key=key,
                                   clock=loop.time) for c in configs]
    finished: list[float] = [0.0] * len(configs)

    async def feed(i: int, d: ModelDispatcher, table: pa.Table) -> None:
        # As the driver feeds an actor: up to batches_in_flight calls of batch_rows each.
        queue = iter(table.to_batches(max_chunksize=policy.batch_rows))

        async def worker() -> None:
            for batch in queue:
                result = await d.dispatch(pa.Table.from_batches([batch]))
                assert result.num_rows == batch.num_rows

        await asyncio.gather(*(worker() for _ in range(policy.batches_in_flight)))
        finished[i] = loop.time()

    cpu0, t0 = os.times(), loop.time()
    try:
        await asyncio.gather(*(feed(i, d, t) for i, (d, t) in
                               enumerate(zip(dispatchers, tables, strict=True))))
        cpu, wall = _cpu_since(cpu0), loop.time() - t0
    finally:
        for d in dispatchers:
            await d.aclose()
    return {"wall_s": wall, "cpu_s": sum(cpu), "system_cpu_s": cpu[1], "finished_s": [f - t0 for f in finished],
            "stats": [asdict(d.stats) for d in dispatchers],
            "last_429_s": [None if d.stats.last_rate_limited_at is None
                           else d.stats.last_rate_limited_at - t0 for d in dispatchers]}


async def _drive_naive(configs: list[ModelConfig], tables: list[pa.Table],
                       key: str) -> dict[str, Any]:
    from batchroute.devtools.bench import naive

    models = [naive.NaiveModel(c.name, c.provider, _endpoint(c), c.rpm, c.concurrency)
              for c in configs]
    loop = asyncio.get_running_loop()
    cpu0, t0 = os.times(), loop.time()
    stats, finished = await naive.run(models, tables, key, max_tokens=MAX_TOKENS)
    cpu, wall = _cpu_since(cpu0), loop.time() - t0
    return {"wall_s": wall, "cpu_s": sum(cpu), "system_cpu_s": cpu[1], "finished_s": [f - t0 for f in finished],
            "stats": [{"attempts": s.ok + s.failed, "rate_limited": s.rate_limited,
                       "failed": s.failed, "min_rate_factor": 1.0} for s in stats],
            "last_429_s": [None if s.last_rate_limited_at is None
                           else s.last_rate_limited_at - t0 for s in stats]}


def _cpu_since(t0: os.times_result) -> tuple[float, float]:
    """(user, system) CPU seconds of this process since ``t0``."""
    t1 = os.times()
    return t1.user - t0.user, t1.system - t0.system


def _endpoint(c: ModelConfig) -> str:
    return c.base_url.rstrip("/") + ("/chat/completions" if c.provider == "openai"
                                     else "/v1/messages")


def _figures(plans: list[dict[str, Any]], measured: dict[str, Any], *, rate: float,
             latency_ms: float) -> dict[str, Any]:
    per_model = []
    for p, stats, done, last in zip(plans, measured["stats"], measured["finished_s"],
                                    measured["last_429_s"], strict=True):
        requests = p["table"].num_rows
        bound = 60.0 * max(requests / p["rpm"], p["tokens"] / p["tpm"])
        per_model.append({
            "model": p["name"], "wire": p["wire"], "requests": requests, "rpm": p["rpm"],
            "tpm": p["tpm"], "bound_s": round(bound, 2), "wall_s": round(done, 2),
            "wall_over_bound": round(done / bound, 3), "attempts": stats["attempts"],
            "rate_limited": stats["rate_limited"],
            "rate_limited_share": round(stats["rate_limited"] / requests, 5),
            "last_429_s": None if last is None else round(last, 2),
            "failed": stats["failed"], "min_rate_factor": round(stats["min_rate_factor"], 3)})
    requests = sum(m["requests"] for m in per_model)
    bound = max(m["bound_s"] for m in per_model)
    last = [m["last_429_s"] for m in per_model if m["last_429_s"] is not None]
    return {
        "rate": rate, "models": len(plans), "latency_ms": latency_ms, "requests": requests,
        "bound_s": bound, "wall_s": round(measured["wall_s"], 2),
        "wall_over_bound": round(measured["wall_s"] / bound, 3),
        "client_cpu_ms_per_request": round(1000 * measured["cpu_s"] / requests, 3),
        # The kernel's share: the sockets' system calls, and on loopback much of the TCP work
        # of both ends; a floor no client code avoids.
        "client_system_cpu_ms_per_request": round(1000 * measured["system_cpu_s"] / requests, 3),
        "server_cpu_share": round(measured["server_cpu_s"] / measured["wall_s"], 3),
        "rate_limited": sum(m["rate_limited"] for m in per_model),
        "rate_limited_share": round(sum(m["rate_limited"] for m in per_model) / requests, 5),
        "last_429_s": max(last) if last else None,
        "failed": sum(m["failed"] for m in per_model),
        "per_model": per_model,
    }
