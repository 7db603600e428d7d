"""Commands that run jobs: ``run``, ``plan``, ``resume``, ``backfill``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from batchroute.cli.argtypes import whole_number
from batchroute.errors import ConfigError

if TYPE_CHECKING:
    from batchroute.config import JobConfig
    from batchroute.job.runner import RunResult

NUM_CPUS_HELP = ("CPUs the local Ray started for this run may use (default: every core); "
                 "ignored with --ray-address")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        p.add_argument("--num-cpus", type=whole_number(1), metavar="N", help=NUM_CPUS_HELP)
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
    b.add_argument("--num-cpus", type=whole_number(1), metavar="N", help=NUM_CPUS_HELP)
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
    r.add_argument("--num-cpus", type=whole_number(1), metavar="N", help=NUM_CPUS_HELP)
    r.set_defaults(func=_resume)


def _run(args: argparse.Namespace) -> int:
    from batchroute import config
    from batchroute.job import runner

    job = config.load(args.job, input_override=args.input, output_override=args.output)
    out = runner.run(job, run_id=args.run_id, ray_address=args.ray_address,
                     num_cpus=args.num_cpus, dry_run=args.dry_run, force=args.force)
    return _report(job, out, dry_run=args.dry_run)


def _backfill(args: argparse.Namespace) -> int:
    import json

    from batchroute import config
    from batchroute.job import backfill

    job = config.load(args.job, input_override=args.input, output_override=args.output)
    outcomes = backfill.backfill(job, args.start, args.end, key=args.partition_key,
                                 ray_address=args.ray_address, num_cpus=args.num_cpus)
    print(json.dumps(backfill.as_json(outcomes), indent=2) if args.json
          else backfill.format_outcomes(outcomes))
    return 1 if any(o.status == "error" or o.failed for o in outcomes) else 0


def _resume(args: argparse.Namespace) -> int:
    import pathlib

    from batchroute import config
    from batchroute.job import runner
    from batchroute.stages.manifest import Manifest
    from batchroute.stages.sink import RunFolder

    path = args.folder.rstrip("/")
    output, _, run_id = path.rpartition("/")
    config.check_segment(run_id, "RUN_FOLDER (its last part, the run id)")
    folder = RunFolder(output or ".", run_id)
    manifest = Manifest.read(folder) if folder.has("manifest.json") else None
    if manifest is None or not folder.has("job.toml"):
        raise ConfigError(f"{path}: not a resumable run folder (needs manifest.json and "
                          "job.toml)")
    job_file = pathlib.Path(folder.sub("job.toml"))
    job = config.load(job_file, input_override=manifest.input, output_override=output or ".",
                      router_override=manifest.router_path)
    out = runner.run(job, run_id=run_id, ray_address=args.ray_address,
                     num_cpus=args.num_cpus, force=args.force)
    return _report(job, out, dry_run=False)


def _report(job: JobConfig, out: RunResult, *, dry_run: bool) -> int:
    from batchroute.stages import plan, rollup

    print(f"\nforecast (run {out.folder.run_id}):")
    print(plan.format_forecast(out.forecast))
    routing = out.manifest.routing
    if routing:
        by = ", ".join(f"{k} {v:,}" for k, v in routing["decided_by"].items())
        cost = (f"; routing calls cost ${routing['route_cost_usd']:.4f}"
                if routing["route_cost_usd"] else "")
        print(f"routed by: {by}{cost}")
    if out.rollups is not None:
        print(f"\nresults by model (reference: {job.reference_model}):")
        print(rollup.format_table(out.rollups))
        if job.task.output.kind == "labels":
            print(rollup.label_table(out.folder))
        print(_limits_line(out.manifest.dispatch or {}))
    if out.quality is not None and out.manifest.quality is not None:
        from batchroute.stages import quality

        print(f"\nquality against {job.reference_model} (shadow checks, "
              f"{100 * job.quality.shadow_share:g}% of the rows below it):")
        print(quality.format_table(out.quality))
        print(quality.describe(out.manifest.quality, savings=_savings(out.rollups)))
    paths = out.manifest.paths
    print(f"\nrun folder: {out.folder.uri}")
    for key in ("routed", "forecast") + (() if dry_run else ("results", "rollups")):
        print(f"  {key:<9}{paths[key]}")
    if out.quality is not None:
        print(f"  quality  {out.folder.sub('quality')}")
    print(f"  manifest {out.folder.sub('manifest.json')}")
    return out.exit_code


def _savings(rollups: Any) -> float | None:
    """The run's savings against sending every row to the reference model (a share)."""
    import pyarrow.compute as pc

    if rollups is None:
        return None
    ref = pc.sum(rollups.column("reference_cost_micro_usd")).as_py() or 0
    cost = pc.sum(rollups.column("cost_micro_usd")).as_py() or 0
    return 1.0 - cost / ref if ref else None


def _limits_line(stats: dict[str, dict[str, float]]) -> str:
    parts = [f"{m}: {int(s.get('rate_limited', 0))} x 429, {int(s.get('retries', 0))} retries, "
             f"paused {s.get('paused_s', 0.0):.1f}s" for m, s in stats.items()]
    return "rate limiting: " + ("; ".join(parts) if parts else "no model was called")


