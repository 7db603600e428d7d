"""A run from start to end: the stages in order, the run folder, the manifest, resuming.

    source ─► route ─► plan ─► dispatch ─► sink ─► rollup

Where each stage runs (the driver, routing actors, dispatch actors) is
:mod:`batchroute.job.cluster`'s business, the only module that imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from batchroute import __version__, task
from batchroute.config import JobConfig, check_segment
from batchroute.errors import ConfigError, Interrupted
from batchroute.job import cluster, shadows
from batchroute.job.progress import Progress
from batchroute.routers import classifier as rt
from batchroute.routers import embed
from batchroute.stages import budget, journal, plan, results, rollup, source
from batchroute.stages.dispatch import batch_tier
from batchroute.stages.lock import LOCK_ONLY, RunLock
from batchroute.stages.manifest import Manifest, now
from batchroute.stages.route import RouteSpec, check_compatible
from batchroute.stages.sink import ResultSink, RunFolder

log = logging.getLogger("batchroute")
# Small shards keep every process's working set flat: a routing actor holds one shard (and its
# routed copy) at a time, and prompts can be long documents.
SOURCE_SHARD_ROWS = 8_192
# The longest a resume waits for a killed run's dispatch actors to go quiet: they finish the
# calls they hold (each at most its timeout) and journal the answers.
JOURNAL_WAIT_S = 90.0
# The exit code of a run the shadow checks flagged ([quality] min_retained).
QUALITY_FLAGGED = 4


@dataclass
class RunResult:
    """What a run (or a dry run, or a resume) left: its folder, manifest, forecast and
    rollups (None for a dry run)."""

    folder: RunFolder
    manifest: Manifest
    forecast: dict[str, Any]
    rollups: pa.Table | None

    quality: pa.Table | None = None

    @property
    def exit_code(self) -> int:
        """4 when the shadow checks flagged the run (retained quality's upper bound below
        [quality] min_retained), else 1 when some rows failed (rejected rows are data, not
        failures), else 0."""
        if (self.manifest.quality or {}).get("flagged"):
            return QUALITY_FLAGGED
        return 1 if self.manifest.counts.get("failed", 0) else 0


def new_run_id(job: JobConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{job.name}-{stamp}-{secrets.token_hex(2)}"


def run(job: JobConfig, *, run_id: str | None = None, ray_address: str | None = None,
        num_cpus: int | None = None, dry_run: bool = False, force: bool = False,
        progress: Progress | None = None, price_date: date | None = None) -> RunResult:
    """Run a job end to end (or up to the plan with ``dry_run``), or resume the run folder
    ``run_id`` if it exists.

    Resuming skips finished stages, never re-sends or re-writes ``ok`` rows, retries
    ``failed`` ones and keeps ``rejected`` ones. A run whose config, router or input changed
    is refused unless ``force``.

    Calls are priced at the prices in force on ``price_date`` (default: today, UTC). A Ray
    started here (no ``ray_address``) gets ``num_cpus`` CPUs (default: one per core).

    Raises SchemaError/ConfigError/RouterError before anything is written; once the run folder
    exists, per-row problems become result rows and never exceptions.
    """
    price_date = price_date or datetime.now(UTC).date()
    job = job.priced_on(price_date)
    progress = progress or Progress()
    data = source.open_input(job.input, id_column=job.id_column, task=job.task)
    spec = RouteSpec.from_job(job)
    router_bytes, version = None, "none"
    if spec.uses_classifier:
        router_bytes = rt.read_bytes(job.router.path)
        info = rt.inspect(router_bytes, path=job.router.path)
        check_compatible(info, spec, path=job.router.path)
        version = info.version
    if "similarity" in spec.stages:  # refused now, not in a routing actor after Ray started
        embed.model_dir()
    run_id = run_id or new_run_id(job)
    check_segment(run_id, "--run-id")
    folder = RunFolder(job.output, run_id)
    _check_output(folder, job.output)
    created = not folder.exists()
    try:
        with contextlib.ExitStack() as stack:
            # One writer: a second run or resume of this folder exits 2 here.
            stack.enter_context(RunLock(folder))
            previous = Manifest.read(folder)
            if previous is not None:
                previous.check_resumable(config_hash=job.config_hash, router_version=version,
                                         fingerprint=data.fingerprint, force=force,
                                         uri=folder.uri)
            manifest = previous or Manifest.new(
                folder, job=job.name, job_file=job.source, batchroute_version=__version__,
                config_hash=job.config_hash, router_version=version,
                router_path=job.router.path if router_bytes is not None else None,
                router_stages=list(spec.stages), input=job.input,
                input_fingerprint=data.fingerprint, input_files=len(data.files),
                input_skipped=list(data.skipped), price_date=price_date.isoformat())

            cluster.start_ray(ray_address, num_cpus=num_cpus)
            # After Ray, which sets handlers of its own.
            stop = stack.enter_context(_Stop().installed())
            # Dispatch actors start before any work so that a key missing from the workers'
            # environment (not just the driver's) stops the job before routing is paid for. An
            # llm router asks its model through that model's actor, so a plan with one needs them.
            actors = (None if dry_run and "llm" not in spec.stages
                      else cluster.DispatchActors(job, folder))
            try:
                return _run(job, data, router_bytes, spec, folder, actors, progress, manifest,
                            stop, resumed=previous is not None, dry_run=dry_run,
                            price_date=price_date)
            finally:
                if actors is not None:
                    actors.kill()
    except BaseException:
        if created and folder.entries() <= LOCK_ONLY:
            folder.delete()  # refused before anything was written: leave nothing behind
        raise


def _check_output(folder: RunFolder, output: str) -> None:
    """Refuse an output location that cannot hold the run folder: a file where the run
    folder, the output folder or any folder above them should be. Without this the lock's
    mkdir fails with a bare NotADirectoryError (exit 3)."""
    path = folder.path
    while path:
        info = folder.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise ConfigError(f"[job].output (or --output) {output}: {path} is a file, not a "
                              "folder")
        if info.type == pafs.FileType.Directory:
            return  # what lies below it, the lock creates
        parent = path.rpartition("/")[0]
        path = parent if parent != path else ""


def _run(job: JobConfig, data: source.InputDataset, router_bytes: bytes | None,
         spec: RouteSpec, folder: RunFolder, actors: cluster.DispatchActors | None,
         progress: Progress, manifest: Manifest, stop: _Stop, *, resumed: bool,
         dry_run: bool, price_date: date) -> RunResult:
    if resumed:
        manifest.resumes.append({"at": now(), "price_date": price_date.isoformat(),
                                 "temp_files_discarded": folder.discard_temp_files()})
        if not manifest.done("plan"):
            # The cheap stages redo from scratch: nothing was sent before the plan was done.
            for part in ("source", "routed", "results"):
                folder.remove(part)
            manifest.stages.clear()
    elif job.text:
        folder.write_text("job.toml", job.text)
    manifest.write(folder)

    with progress:
        sink = ResultSink(folder)
        if manifest.done("plan"):
            forecast = folder.read_json("forecast.json")
            planned = {m: int(v["rows"]) for m, v in forecast["models"].items()}
            progress.total_rows = progress.routed = int(manifest.input_rows or 0)
        else:
            try:
                forecast, planned = _plan(job, data, router_bytes, spec, folder, sink,
                                          manifest, progress, actors, stop)
            except (source.UnreadableInput, budget.Infeasible):
                _take_back(folder, actors, resumed=resumed)
                raise
        progress.planned = planned

        if actors is None or dry_run:
            manifest.write(folder)
            return RunResult(folder, manifest, forecast, None)

        progress.set_phase("dispatching")
        answered = None
        if resumed:
            waited = journal.wait_quiet(folder, quiet_s=cluster.DRIVER_TIMEOUT_S + 1.0,
                                        max_wait_s=JOURNAL_WAIT_S)
            if waited:
                log.info("waited %.1fs for the dispatch actors of the interrupted run to finish "
                         "journalling", waited)
            answered = _recover(folder, sink, manifest, sink.settle_for_resume())
            log.info("resuming %s: %d rows already answered ok are skipped", folder.uri,
                     len(answered))
        try:
            deadline = batch_tier.deadline_of(job.dispatch.deadline, manifest.started_at)
            manifest.dispatch = actors.dispatch(folder, planned, sink, progress, answered,
                                                stop=stop.check, deadline=deadline)
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            actors.flush()  # every answer received so far reaches the journal ...
            actors.kill()  # ... nothing more is sent ...
            before = sink.counts["ok"]
            _recover(folder, sink, manifest, sink.answered())  # ... and is committed
            raise Interrupted(
                f"interrupted by {signal.Signals(signum).name}: the answered rows are committed "
                f"({sink.counts['ok'] - before} from the journal); resume with: batchroute "
                f"resume {folder.uri}", signum=signum) from None
        _add_unrecovered(manifest, {m: int(s.get("unrecovered_micro_usd", 0))
                                    for m, s in manifest.dispatch.items()})
        if not actors.failed_batches:
            # Every answer is in a committed shard. (After a dispatch call that failed whole,
            # the journal keeps that batch's answers for the resume that retries it.)
            journal.clear(folder)
        manifest.mark_done("dispatch", folder)
        quality_table = None
        if job.quality.on:
            progress.set_phase("shadow checks")
            quality_table, manifest.quality = shadows.run(
                job, folder, actors, started_at=manifest.started_at, stop=stop.check)
            _add_unrecovered(manifest, manifest.quality["unrecovered_micro_usd"])
            manifest.mark_done("quality", folder)
        # The actors' memory (~150-200 MiB each) is not needed for the rollup.
        actors.kill()

        progress.set_phase("rolling up")
        table = rollup.rollup(rollup.read_results(folder), run_id=folder.run_id,
                              models=job.models, reference_model=job.reference_model,
                              reference_output_ratio=job.reference_output_ratio,
                              unrecovered=manifest.unrecovered_by_model)
        folder.write_table(folder.sub("rollups"), "rollups.parquet", table)
        manifest.counts = {s: int(pc.sum(table.column(s)).as_py() or 0)
                           for s in ("ok", "failed", "rejected")}
        manifest.cost_usd = int(pc.sum(table.column("cost_micro_usd")).as_py() or 0) / 1e6
        manifest.finished_at = now()
        manifest.mark_done("rollup", folder)
        progress.set_phase("done")
    return RunResult(folder, manifest, forecast, table, quality_table)


def _plan(job: JobConfig, data: source.InputDataset, router_bytes: bytes | None,
          spec: RouteSpec, folder: RunFolder, sink: ResultSink, manifest: Manifest,
          progress: Progress, actors: cluster.DispatchActors | None, stop: _Stop
          ) -> tuple[dict[str, Any], dict[str, int]]:
    """Source, route and plan: everything before the first model call."""
    progress.set_phase("reading input")
    rows = 0
    for i, batch in enumerate(source.read_requests(data, SOURCE_SHARD_ROWS)):
        folder.write_table(folder.sub("source"), folder.shard_name(i), batch)
        rows += batch.num_rows
        stop.check()
    progress.total_rows = rows
    manifest.input_rows = rows
    manifest.mark_done("source", folder)

    progress.set_phase("routing")
    writer = plan.PlanWriter(folder, sink, outputs=task.result_fields(job.task.output))
    asker = actors.actors[spec.llm.model] if actors is not None and "llm" in spec.stages \
        else None
    decided: dict[str, int] = {}
    route_micro = 0
    for routed in (_route(folder, router_bytes, spec, job, asker) if rows else ()):
        for item in pc.value_counts(routed.column("route_reason")).to_pylist():
            if item["values"] is not None:
                decided[item["values"]] = decided.get(item["values"], 0) + item["counts"]
        route_micro += pc.sum(routed.column("route_cost_micro_usd")).as_py() or 0
        writer.add(routed)
        progress.routed += routed.num_rows
        progress.tick()
        stop.check()
    planned = writer.close()
    capped = None
    if job.router.budget_usd is not None or job.router.max_strong_share is not None:
        # The cap is solved over the whole night's rows, so only once they are all routed.
        # A deadline given as a duration counts from the run's start, as dispatch counts it.
        started = (datetime.fromisoformat(manifest.started_at).replace(tzinfo=UTC)
                   if manifest.started_at else None)
        planned, capped = budget.reassign(folder, job, started)
        decided = dict(capped.get("decided_by", decided))
    forecast = plan.forecast(folder, job, writer.rejected)
    if capped:
        forecast["budget"] = capped
    folder.write_json("forecast.json", forecast)
    log.info("forecast: est $%.4f (%s)", forecast["est_cost_usd"], plan.basis_line(forecast))
    manifest.counts = dict(sink.counts)
    # What decided each routed row (rule:<name>, classifier, llm:<label>, llm:default, ...)
    # and what routing itself cost (the llm router's calls).
    manifest.routing = {"decided_by": dict(sorted(decided.items())),
                        "route_cost_usd": route_micro / 1e6}
    manifest.mark_done("plan", folder)
    return forecast, planned


def _take_back(folder: RunFolder, actors: cluster.DispatchActors | None, *,
               resumed: bool) -> None:
    """Remove what this attempt wrote, for an input found corrupt while the source stage
    streamed it: nothing has been routed or sent, and a run folder left behind would look
    like a run. Checking every page before the run folder exists would read the whole input
    twice; streaming reads it once and pays only in this rare case."""
    if actors is not None:
        actors.kill()  # they journal into the folder
    if resumed:
        folder.remove("source")  # its partial shards; the rest is as the resume found it
    else:
        # This run created the folder (or found only a lock in it). Its lock file goes too;
        # the lock is released right after and nothing is written in between.
        folder.delete()


def _route(folder: RunFolder, router_bytes: bytes | None, spec: RouteSpec,
           job: JobConfig, asker: Any = None) -> Iterator[pa.Table]:
    shards = folder.shards(folder.sub("source"))
    count = max(1, min(job.router.actors, cluster.cpus(), len(shards)))
    return cluster.route_shards(shards, folder.fs, router_bytes, spec, actors=count,
                                batch_rows=job.router.batch_size,
                                router_path=job.router.path, asker=asker)


def _recover(folder: RunFolder, sink: ResultSink, manifest: Manifest,
             answered: pa.Array) -> pa.Array:
    """Commit what earlier attempts journalled but did not commit; count the calls they had
    in flight and never got back as unrecovered; clear the journals. Returns ``answered``
    (the request ids already ``ok``) with the recovered ones added."""
    rows, lost = journal.read(folder).settle(answered)
    if rows.num_rows:
        sink.write(results.with_route_cost(rows))
        log.info("%s: %d answers paid for before the interruption are committed from the "
                 "journal, not sent again", folder.uri, rows.num_rows)
        answered = pa.concat_arrays([answered, rows.column("request_id").combine_chunks()])
    _add_unrecovered(manifest, lost)
    manifest.write(folder)  # before the journals go: a crash between counts them twice, not 0
    journal.clear(folder)
    return answered


def _add_unrecovered(manifest: Manifest, micro_by_model: dict[str, int]) -> None:
    for model, micro in micro_by_model.items():
        if micro:
            manifest.unrecovered_by_model[model] = (manifest.unrecovered_by_model.get(model, 0)
                                                    + micro)
    manifest.unrecovered_cost_micro_usd = sum(manifest.unrecovered_by_model.values())


class _Stop:
    """SIGINT and SIGTERM (how Kubernetes, Airflow and systemd stop a job) ask the run to stop.

    The handler only records the signal: raising from it could land inside Ray's or Arrow's
    native code, which does not expect a Python exception there. The run checks :meth:`check`
    where stopping is clean (between shards, and every turn of the dispatch loop), which
    raises Interrupted; the dispatch stage then commits what has been answered, and the CLI
    exits 130 or 143."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(f"interrupted by {signal.Signals(self.signum).name}",
                              signum=self.signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Stop]:
        """Catch the signals for the duration (only the main thread can), then restore the
        previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def record(signum: int, frame: object) -> None:
            self.signum = signum

        previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
