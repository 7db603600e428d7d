"""``batchroute bench ...``: the benchmarks' command line (each bench imported when run)."""

from __future__ import annotations

import argparse
from typing import Any

from batchroute.errors import ConfigError


def on_mock(models: dict[str, dict[str, Any]], url: str, key_env: str, **extra: Any) -> None:
    """Point a job document's ``[models]`` at the mock provider on ``url`` (OpenAI-wire
    models under ``/v1``), with limits that do not bind and ``extra`` keys."""
    for m in models.values():
        m.update(base_url=url if m["provider"] == "anthropic" else url + "/v1",
                 api_key_env=key_env, rpm=10_000_000, tpm=10_000_000_000, **extra)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks: memory, dispatch, route, similarity, task, cache, tiers, "
                           "quality",
                           description="Measure the job. `memory` runs the whole job on N "
                           "generated prompts against the mock provider with high limits and "
                           "prints peak memory over every process of the job (driver and Ray "
                           "workers) and rows per second. `dispatch` measures dispatch against "
                           "the mock provider's rate limits. `route` measures the router's "
                           "scoring rate on one core, alternately with a scikit-learn "
                           "baseline, and the Ray route stage for each actor count.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bm = bench_sub.add_parser("memory", help="peak memory and rate of the whole job")
    bm.add_argument("--rows", type=int, default=200_000, help="prompts to generate (200000)")
    bm.add_argument("--workdir", metavar="DIR", help="keep input and run here (default: temp)")
    bm.add_argument("--kind", choices=("prompts", "tickets"), default="prompts",
                    help="prompts: the demo's queue (default); tickets: the tickets job "
                         "(template, labels) on `batchroute sample --kind tickets`")
    bm.add_argument("--tier", choices=("sync", "batch"), default="sync",
                    help="sync (default), or batch: every model through the mock's batch "
                         "API (one-second batches)")
    bm.add_argument("--json", action="store_true", help="print JSON only")
    bm.set_defaults(func=_bench_memory)
    bs = bench_sub.add_parser(
        "similarity", help="the similarity stage on a synthetic bank: embedding and stage "
        "rates per core, top-32 recall against exact search, bank memory")
    bs.add_argument("--features", choices=("static", "minilm"), default="static",
                    help="sentence embedder (default static)")
    bs.add_argument("--bank-rows", type=int, default=None, metavar="N",
                    help="bank entries (default 1000000 for static, 2000 for minilm)")
    bs.add_argument("--queries", type=int, default=None, metavar="Q",
                    help="prompts routed through the stage (default 20000 static, 200 minilm)")
    bs.add_argument("--index", choices=("auto", "exact", "ivf", "hnsw"), default="auto",
                    help="the bank's search, as [router.similarity] index (default auto)")
    bs.add_argument("--context-chars", type=int, default=300, metavar="C",
                    help="characters of unrelated context after each prompt's question "
                    "(default 300; more makes neighbours harder to find)")
    bs.add_argument("--compare-rows", type=int, default=200, metavar="R",
                    help="prompts MiniLM embeds beside, for its rate in the same run "
                    "(default 200; 0: none)")
    bs.add_argument("--workdir", metavar="DIR", help="keep the bank and its index here")
    bs.add_argument("--json", action="store_true", help="print the figures as JSON")
    bs.set_defaults(func=_bench_similarity)
    bq = bench_sub.add_parser(
        "quality", help="shadow checks' honesty: how often the 95%% interval of retained "
        "quality covers the truth, over seeds of the demo input (the mock's quality model)")
    bq.add_argument("--seeds", type=int, default=20, metavar="N",
                    help="demo inputs, seeds 0..N-1 (default 20)")
    bq.add_argument("--rows", type=int, default=20_000, metavar="N",
                    help="rows per demo input (default 20000, the demo's)")
    bq.add_argument("--share", type=float, action="append", dest="shares", metavar="S",
                    help="shadow_share to measure; repeat (default 0.01, 0.02, 0.05)")
    bq.add_argument("--json", action="store_true", help="print JSON only")
    bq.set_defaults(func=_bench_quality)
    bd = bench_sub.add_parser(
        "dispatch", help="dispatch against the mock provider's rate limits: wall time over the "
        "limits' lower bound, client CPU per request, 429s")
    bd.add_argument("--rate", type=float, default=1000.0, metavar="R",
                    help="aggregate limit over all models, requests/s (default 1000)")
    bd.add_argument("--models", type=int, default=3, metavar="K",
                    help="models, with limits in the ratio K:K-1:...:1 (default 3)")
    bd.add_argument("--latency-ms", type=float, default=300.0, metavar="L",
                    help="the mock's median latency (default 300)")
    bd.add_argument("--n", type=int, default=20_000, metavar="N",
                    help="requests in all (default 20000)")
    bd.add_argument("--baseline", action="store_true",
                    help="also run a naive aiohttp + aiolimiter loop as the yardstick, "
                    "alternating with batchroute's client (--pairs pairs), and report "
                    "client_cpu_ratio (ours / naive) and both wall_over_bound figures")
    bd.add_argument("--pairs", type=int, default=5, metavar="P",
                    help="with --baseline: pairs of runs, ours then naive (default 5)")
    bd.add_argument("--json", action="store_true", help="print the figures as JSON")
    bd.set_defaults(func=_bench_dispatch)
    br = bench_sub.add_parser(
        "route", help="router scoring rate on one core beside a scikit-learn baseline (their "
        "ratio: baseline_ratio), and the Ray route stage's rows/s and efficiency for each "
        "actor count")
    br.add_argument("--n", type=int, default=1_000_000, metavar="N",
                    help="generated prompts (default 1000000)")
    br.add_argument("--actors", type=_int_list, default=[1, 2], metavar="K1,K2",
                    help="routing actor counts to measure (default 1,2)")
    br.add_argument("--chars", type=int, default=940, metavar="C",
                    help="characters per prompt, about (default 940)")
    br.add_argument("--batch-size", type=int, default=4096, metavar="B",
                    help="rows per scoring call, alone and in the stage (default 4096)")
    br.add_argument("--router", default=None, metavar="ROUTER.onnx",
                    help="router file (default: the bundled one)")
    br.add_argument("--workdir", metavar="DIR", help="keep the generated shards here "
                    "(default: a temporary folder, removed afterwards)")
    br.add_argument("--ray-address", metavar="ADDR", help="existing Ray cluster to use "
                    "(default: $RAY_ADDRESS, else a local Ray started for the bench)")
    br.add_argument("--json", action="store_true", help="print the figures as JSON")
    br.set_defaults(func=_bench_route)
    bt = bench_sub.add_parser(
        "task", help="[task] costs on one core: template rendering + routing against the "
        "prompt-column path, and parsing answers (µs/row)")
    bt.add_argument("--n", type=int, default=1_000_000, metavar="N",
                    help="generated tickets (default 1000000)")
    bt.add_argument("--rounds", type=int, default=2, metavar="R",
                    help="alternating rounds of the three paths; the best is kept (default 2)")
    bt.add_argument("--parse-rows", type=int, default=100_000, metavar="P",
                    help="answers parsed per output kind (default 100000)")
    bt.add_argument("--workdir", metavar="DIR", help="keep the generated files here")
    bt.add_argument("--json", action="store_true", help="print the figures as JSON")
    bt.set_defaults(func=_bench_task)
    bc = bench_sub.add_parser(
        "cache", help="the tickets job on its Anthropic model with and without [task] "
        "cache_prefix: input cost, total cost, share of input from cache")
    bc.add_argument("--job", default="jobs/classify-tickets.toml", metavar="JOB.toml",
                    help="the job (default jobs/classify-tickets.toml)")
    bc.add_argument("--rows", type=int, default=3000, metavar="N",
                    help="generated tickets (default 3000, as in the demo)")
    bc.add_argument("--latency-ms", type=float, default=250.0, metavar="L",
                    help="the mock's median latency (default 250, as in the demo)")
    bc.add_argument("--workdir", metavar="DIR", help="keep the input and runs here")
    bc.add_argument("--json", action="store_true", help="print the figures as JSON")
    bc.set_defaults(func=_bench_cache)
    bti = bench_sub.add_parser(
        "tiers", help="the demo input's cost four ways: all on the reference model or routed, "
        "each at sync prices and through the batch API")
    bti.add_argument("--job", default="jobs/demo.toml", metavar="JOB.toml",
                     help="the job (default jobs/demo.toml)")
    bti.add_argument("--rows", type=int, default=20_000, metavar="N",
                     help="sample rows (default 20000, as in the demo)")
    bti.add_argument("--workdir", metavar="DIR", help="keep the input and runs here")
    bti.add_argument("--json", action="store_true", help="print the figures as JSON")
    bti.set_defaults(func=_bench_tiers)


def _bench_dispatch(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import dispatch as bench_dispatch

    try:
        result = bench_dispatch.dispatch(rate=args.rate, models=args.models,
                                         latency_ms=args.latency_ms, n=args.n,
                                         baseline=args.baseline, pairs=args.pairs)
    except ValueError as exc:
        raise ConfigError(f"bench dispatch: {exc}") from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'model':<16}{'wire':<10}{'requests':>9}{'rpm':>8}{'bound s':>9}{'wall s':>8}"
          f"{'÷bound':>8}{'429s':>6}{'failed':>7}")
    for m in result["per_model"]:
        print(f"{m['model']:<16}{m['wire']:<10}{m['requests']:>9}{m['rpm']:>8}"
              f"{m['bound_s']:>9.2f}{m['wall_s']:>8.2f}{m['wall_over_bound']:>8.3f}"
              f"{m['rate_limited']:>6}{m['failed']:>7}")
    print(f"\n{result['requests']} requests in {result['wall_s']} s, "
          f"{result['wall_over_bound']}x the limits' lower bound of {result['bound_s']} s; "
          f"client CPU {result['client_cpu_ms_per_request']} ms/request; "
          f"429s {result['rate_limited_share']:.2%} (last at {result['last_429_s']} s); "
          f"failed {result['failed']}")
    if args.baseline:
        print(f"naive aiohttp loop: {result['baseline_wall_over_bound']}x the bound, client CPU "
              f"{result['baseline_client_cpu_ms_per_request']} ms/request; client_cpu_ratio "
              f"{result['client_cpu_ratio']} ({result['client_cpu_ratio_of']}; "
              f"{result['client_cpu_ratios']})")
        for r in result["runs"]:
            print(f"  {r['client']:<11} wall÷bound {r['wall_over_bound']:.3f}  CPU "
                  f"{r['client_cpu_ms_per_request']:.3f} ms/request (system "
                  f"{r['client_system_cpu_ms_per_request']:.3f})  429s {r['rate_limited']}"
                  f"  failed {r['failed']}  load average at start {r['load_average_at_start']}")
    print("pinned: " + (f"client on core {result['pinned']['client_core']}, mock on core "
                        f"{result['pinned']['mock_core']}" if result["pinned"]
                        else result["pinning"]))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2, got {text!r}")
    return values


def _bench_route(args: argparse.Namespace) -> int:
    import json

    from batchroute import config
    from batchroute.devtools.bench import route as bench_route

    try:
        result = bench_route.route(args.n, args.actors, chars=args.chars,
                                   batch_size=args.batch_size,
                                   router_path=args.router or config.BUNDLED_ROUTER,
                                   workdir=args.workdir, ray_address=args.ray_address)
    except ValueError as exc:
        raise ConfigError(f"bench route: {exc}") from None
    print(json.dumps(result, indent=2) if args.json else bench_route.format_table(result))
    return 0


def _bench_similarity(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import similarity as bench_similarity

    try:
        result = bench_similarity.similarity(
            features=args.features, bank_rows=args.bank_rows, queries=args.queries,
            index=args.index, context_chars=args.context_chars,
            compare_rows=args.compare_rows, workdir=args.workdir)
    except ValueError as exc:
        raise ConfigError(f"bench similarity: {exc}") from None
    print(json.dumps(result, indent=2) if args.json else bench_similarity.format_table(result))
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import quality as bench_quality

    shares = args.shares or [0.01, 0.02, 0.05]
    if args.seeds < 1 or args.rows < 1 or not all(0 < s <= 1 for s in shares):
        raise ConfigError("bench quality: --seeds and --rows must be at least 1 and each "
                          "--share in (0, 1]")
    result = bench_quality.coverage(range(args.seeds), shares, rows=args.rows)
    print(json.dumps(result, indent=2) if args.json else bench_quality.format_table(result))
    return 0


def _bench_task(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import task as bench_task

    if min(args.n, args.rounds, args.parse_rows) < 1:
        raise ConfigError("bench task: --n, --rounds and --parse-rows must be at least 1")
    result = bench_task.bench(args.n, rounds=args.rounds, parse_rows=args.parse_rows,
                              workdir=args.workdir)
    print(json.dumps(result, indent=2) if args.json else bench_task.format_table(result))
    return 0


def _bench_cache(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import cache

    if args.rows < 1:
        raise ConfigError("bench cache: --rows must be at least 1")
    result = cache.run(args.job, args.rows, args.latency_ms, args.workdir)
    print(json.dumps(result, indent=2) if args.json else cache.format_figures(result))
    return 0


def _bench_tiers(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import tiers

    if args.rows < 1:
        raise ConfigError("bench tiers: --rows must be at least 1")
    result = tiers.run(args.job, args.rows, args.workdir)
    print(json.dumps(result, indent=2) if args.json else tiers.format_figures(result))
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    import json

    from batchroute.devtools.bench import memory as bench

    result = bench.memory(args.rows, workdir=args.workdir, kind=args.kind, tier=args.tier)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    else:
        print("\n".join(result["table"]))
        print(f"\n{result['rows']} rows in {result['wall_s']} s ({result['rows_per_s']} rows/s); "
              f"peak memory of the whole job: {result['peak_pss_mib']} MiB PSS "
              f"(RSS sum {result['peak_rss_sum_mib']} MiB, driver {result['peak_driver_rss_mib']}"
              " MiB)")
        for model, b in result["batches"].items():
            print(f"{model}: {b['files']} files, {b['lines_submitted']} lines; writing and "
                  f"uploading {b['submit_s']} s, reading results into rows {b['read_s']} s")
    return int(result["exit_code"] != 0)

