"""The one module that wires the stages into Ray.

    source (driver) ─► route (a pool of routing actors) ─► plan (driver)
                    ─► dispatch (one async actor per model) ─► sink (driver) ─► rollup

Stage logic lives in plain classes that take Arrow tables (:mod:`batchroute.route`,
:mod:`batchroute.dispatch.dispatcher`, ...); this module only decides where they run.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from batchroute import __version__, plan, rollup, source
from batchroute import router as rt
from batchroute.config import DispatchConfig, JobConfig, ModelConfig
from batchroute.errors import ConfigError
from batchroute.plan import failed_results, with_route_cost
from batchroute.progress import Progress
from batchroute.route import RouteSpec, RouteStage, check_compatible
from batchroute.sink import ResultSink, RunFolder

log = logging.getLogger("batchroute")
# Small shards keep every process's working set flat: a routing actor holds one shard (and its
# routed copy) at a time, and prompts can be long documents.
SOURCE_SHARD_ROWS = 8_192
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
START_ATTEMPTS = 4


@dataclass
class Outcome:
    folder: RunFolder
    manifest: dict[str, Any]
    forecast: dict[str, Any]
    rollups: pa.Table | None

    @property
    def exit_code(self) -> int:
        """0 when no row failed, 1 when some did (rejected rows are data, not failures)."""
        return 1 if self.manifest["counts"].get("failed", 0) else 0


def new_run_id(job: JobConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{job.name}-{stamp}-{secrets.token_hex(2)}"


def start_ray(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start Ray on this machine, with ``num_cpus``
    logical CPUs if given (default: one per core)."""
    import ray

    if ray.is_initialized():
        return
    # Arrow's allocator sets much of each process's footprint. Its default (mimalloc) keeps
    # freed pages, so a long pass over large string batches grows the process by hundreds of
    # MiB. The system allocator (glibc) keeps them too, in one arena per Arrow thread: a 2M-row
    # run's driver ended with a dozen arenas holding ~60 MiB each. jemalloc, bundled with
    # pyarrow, gives freed pages back within a second. Set before Ray starts so local workers
    # inherit it; a user's own choice is kept.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", _arrow_pool())
    pool = _ARROW_POOLS.get(os.environ["ARROW_DEFAULT_MEMORY_POOL"])
    if pool is not None:
        pa.set_memory_pool(pool())
    address = address or os.environ.get("RAY_ADDRESS") or None
    # A Ray started here gets a bounded object store: by default Ray reserves 30% of RAM.
    # Beyond the bound Ray spills to disk. A cluster's own setting is left alone.
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True,
             object_store_memory=None if address else LOCAL_OBJECT_STORE_BYTES,
             num_cpus=None if address else num_cpus)


_ARROW_POOLS = {"jemalloc": pa.jemalloc_memory_pool, "mimalloc": pa.mimalloc_memory_pool,
                "system": pa.system_memory_pool}


def _arrow_pool() -> str:
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        return "system"
    return "jemalloc"


def run(job: JobConfig, *, run_id: str | None = None, ray_address: str | None = None,
        dry_run: bool = False, force: bool = False, progress: Progress | None = None,
        price_date: date | None = None) -> Outcome:
    """Run a job end to end (or up to the plan with ``dry_run``), or resume the run folder
    ``run_id`` if it exists.

    Resuming skips finished stages, never re-sends or re-writes ``ok`` rows, retries
    ``failed`` ones and keeps ``rejected`` ones. A run whose config, router or input changed
    is refused unless ``force``.

    Calls are priced at the prices in force on ``price_date`` (default: today, UTC).

    Raises SchemaError/ConfigError/RouterError before anything is written; once the run folder
    exists, per-row problems become result rows and never exceptions.
    """
    price_date = price_date or datetime.now(UTC).date()
    job = job.priced_on(price_date)
    progress = progress or Progress()
    data = source.open_input(job.input)
    spec = RouteSpec.from_job(job)
    router_bytes, version = None, "none"
    if spec.uses_classifier:
        router_bytes = rt.read_bytes(job.router.path)
        info = rt.inspect(router_bytes, path=job.router.path)
        check_compatible(info, spec, path=job.router.path)
        version = info.version
    run_id = run_id or new_run_id(job)
    folder = RunFolder(job.output, run_id)
    previous = _previous_manifest(folder)
    if previous is not None:
        _check_resumable(previous, job, version, data.fingerprint, force=force,
                         uri=folder.uri)

    start_ray(ray_address)
    # Dispatch actors start before any work so that a key missing from the workers'
    # environment (not just the driver's) stops the job before routing is paid for. An llm
    # router asks its model through that model's actor, so a plan with one needs them too.
    actors = (None if dry_run and "llm" not in spec.stages
              else _DispatchActors(job, run_id))
    try:
        return _run(job, data, router_bytes, version, spec, folder, actors, progress,
                    previous, price_date, dry_run)
    finally:
        if actors is not None:
            actors.kill()


def _previous_manifest(folder: RunFolder) -> dict[str, Any] | None:
    if not folder.exists():
        return None
    if not folder.has("manifest.json"):
        raise ConfigError(f"{folder.uri} exists but holds no manifest.json: not a batchroute "
                          "run folder; choose another --run-id")
    return folder.read_json("manifest.json")


def _check_resumable(previous: dict[str, Any], job: JobConfig, router_version: str,
                     fingerprint: str, *, force: bool, uri: str) -> None:
    changes = [f"{what} changed ({was} -> {now})" for what, was, now in (
        ("the job configuration", previous.get("config_hash"), job.config_hash),
        ("the router", previous.get("router_version"), router_version),
        ("the input", previous.get("input_fingerprint"), fingerprint),
    ) if was != now]
    if changes and not force:
        raise ConfigError(f"cannot resume run {uri}: {'; '.join(changes)}. Rerun with --force "
                          "to resume it anyway, or choose a new --run-id")
    if changes:
        log.warning("resuming %s although %s (--force)", uri, "; ".join(changes))


def _run(job: JobConfig, data: source.InputDataset, router_bytes: bytes | None,
         router_version: str, spec: RouteSpec, folder: RunFolder,
         actors: _DispatchActors | None, progress: Progress, previous: dict[str, Any] | None,
         price_date: date, dry_run: bool) -> Outcome:
    manifest: dict[str, Any] = previous or {
        "run_id": folder.run_id, "job": job.name, "job_file": job.source,
        "batchroute_version": __version__, "config_hash": job.config_hash,
        "router_version": router_version,
        "router_path": job.router.path if router_bytes is not None else None,
        "router_stages": list(spec.stages),
        "input": job.input, "input_fingerprint": data.fingerprint,
        "input_files": len(data.files), "started_at": _now(),
        "price_date": price_date.isoformat(), "stages": {},
        "paths": {"source": folder.sub("source"), "routed": folder.sub("routed"),
                  "forecast": folder.sub("forecast.json"), "results": folder.sub("results"),
                  "rollups": folder.sub("rollups")},
        "counts": {},
    }
    stages: dict[str, Any] = manifest["stages"]
    if previous is not None:
        manifest.setdefault("resumes", []).append(
            {"at": _now(), "price_date": price_date.isoformat(),
             "temp_files_discarded": folder.discard_temp_files()})
        if "plan" not in stages:
            # The cheap stages redo from scratch: nothing was sent before the plan was done.
            for part in ("source", "routed", "results"):
                folder.remove(part)
            stages.clear()
    elif job.text:
        folder.write_text("job.toml", job.text)
    folder.write_json("manifest.json", manifest)

    with progress:
        if "plan" in stages:
            forecast = folder.read_json("forecast.json")
            planned = {m: int(v["rows"]) for m, v in forecast["models"].items()}
            progress.total_rows = progress.routed = int(manifest["input_rows"])
            sink = ResultSink(folder)
        else:
            sink = ResultSink(folder)
            forecast, planned = _plan(job, data, router_bytes, spec, folder, sink, manifest,
                                      progress, actors)
        progress.planned = planned

        if actors is None or dry_run:
            folder.write_json("manifest.json", manifest)
            return Outcome(folder, manifest, forecast, None)

        progress.set_phase("dispatching")
        answered = sink.settle_for_resume() if previous is not None else None
        if answered is not None:
            log.info("resuming %s: %d rows already answered ok are skipped", folder.uri,
                     len(answered))
        manifest["dispatch"] = actors.dispatch(folder, planned, sink, progress, answered)
        _stage(folder, manifest, "dispatch")
        # The actors' memory (~150-200 MiB each) is not needed for the rollup.
        actors.kill()

        progress.set_phase("rolling up")
        table = rollup.rollup(rollup.read_results(folder), run_id=folder.run_id,
                              models=job.models, reference_model=job.reference_model,
                              reference_output_ratio=job.reference_output_ratio)
        folder.write_table(folder.sub("rollups"), "rollups.parquet", table)
        manifest["counts"] = {s: int(pc.sum(table.column(s)).as_py() or 0)
                              for s in ("ok", "failed", "rejected")}
        manifest["cost_usd"] = int(pc.sum(table.column("cost_micro_usd")).as_py() or 0) / 1e6
        manifest["finished_at"] = _now()
        _stage(folder, manifest, "rollup")
        progress.set_phase("done")
    return Outcome(folder, manifest, forecast, table)


def _plan(job: JobConfig, data: source.InputDataset, router_bytes: bytes | None,
          spec: RouteSpec, folder: RunFolder, sink: ResultSink, manifest: dict[str, Any],
          progress: Progress, actors: _DispatchActors | None) -> tuple[dict[str, Any],
                                                                      dict[str, int]]:
    """Source, route and plan: everything before the first model call."""
    progress.set_phase("reading input")
    rows = 0
    for i, batch in enumerate(source.read_requests(data, SOURCE_SHARD_ROWS)):
        folder.write_table(folder.sub("source"), f"part-{i:06d}.parquet", batch)
        rows += batch.num_rows
    progress.total_rows = rows
    manifest["input_rows"] = rows
    _stage(folder, manifest, "source")

    progress.set_phase("routing")
    writer = plan.PlanWriter(folder, sink)
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
    planned = writer.close()
    forecast = plan.forecast(folder, job, writer.rejected)
    folder.write_json("forecast.json", forecast)
    manifest["counts"] = dict(sink.counts)
    # What decided each routed row (rule:<name>, classifier, llm:<label>, llm:default, ...)
    # and what routing itself cost (the llm router's calls).
    manifest["routing"] = {"decided_by": dict(sorted(decided.items())),
                           "route_cost_usd": route_micro / 1e6}
    _stage(folder, manifest, "plan")
    return forecast, planned


def _route(folder: RunFolder, router_bytes: bytes | None, spec: RouteSpec,
           job: JobConfig, asker: Any = None) -> Iterator[pa.Table]:
    shards = folder.shards(folder.sub("source"))
    cpus = float(_ray().cluster_resources().get("CPU", 1))
    count = max(1, min(job.router.actors, int(cpus), len(shards)))
    return route_shards(shards, folder.fs, router_bytes, spec, actors=count,
                        batch_rows=job.router.batch_size, router_path=job.router.path,
                        asker=asker)


def route_shards(shards: list[str], fs: pafs.FileSystem, router_bytes: bytes | None,
                 spec: RouteSpec, *, actors: int, batch_rows: int,
                 router_path: str, asker: Any = None) -> Iterator[pa.Table]:
    """Route ``requests`` shards on a pool of exactly ``actors`` routing actors; yield routed
    tables in shard order. The job sizes the pool from its config (:func:`_route`);
    ``batchroute bench route`` calls this with each actor count it measures.

    The actors read the shards themselves instead of going through Ray Data: its Parquet
    reader starts a pool of footer-reading actors that grows with the number of shards (up
    to 32 processes of ~100 MiB each), reads in 128 MiB units, and keeps a read worker and
    its own coordinator actors alive for the rest of the job. Shards are small and already
    canonical, so one actor call per shard needs none of that.

    ``asker`` is the llm router model's dispatch actor: routing calls share that model's
    limits with its answers.
    """
    ray = _ray()
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # Each routing actor holds one CPU for the whole stage; on a machine with less than
    # that, they share. Routing a shard is idempotent, so a crashed actor is restarted and
    # its shards retried (a few times, not forever: a shard that kills it every time must
    # fail the job).
    remote = ray.remote(num_cpus=min(1.0, cpus / actors), max_restarts=3,
                        max_task_retries=3)(_RouteActor)
    # The router travels through the object store (workers need not share the driver's disk);
    # wrapped in a list so Ray hands the actor the reference rather than inlining the bytes.
    router_ref = [ray.put(router_bytes)]
    pool = [remote.remote(router_ref, spec, router_path, fs, batch_rows, asker)
            for _ in range(actors)]
    # Two shards per actor in flight: one being routed, one queued so the actor never waits
    # on the driver. Results come back in submission order, so the plan is deterministic.
    pending: deque[Any] = deque()
    todo = iter(enumerate(shards))
    try:
        while True:
            while len(pending) < 2 * actors and (nxt := next(todo, None)) is not None:
                i, shard = nxt
                pending.append(pool[i % actors].route.remote(shard))
            if not pending:
                return
            yield ray.get(pending.popleft())
    finally:
        # Routing is over (or abandoned): free the actors' memory before dispatch starts.
        for actor in pool:
            ray.kill(actor)


class _RouteActor:
    """One routing actor: reads a source shard from the run folder and routes it."""

    def __init__(self, router_ref: list[Any], spec: RouteSpec, path: str,
                 fs: pafs.FileSystem, batch_rows: int, asker: Any = None) -> None:
        import ray

        def ask(routed: pa.Table) -> pa.Table:
            result: pa.Table = ray.get(asker.ask_route.remote(routed))
            return result

        self.stage = RouteStage(ray.get(router_ref[0]), spec, path,
                                ask=ask if asker is not None else None)
        self.fs = fs
        self.batch_rows = batch_rows

    def route(self, shard: str) -> pa.Table:
        routed = pa.concat_tables([self.stage(pa.Table.from_batches([b]))
                                   for b in source.iter_parquet(self.fs, shard, self.batch_rows)])
        self.stage.flush()  # a shard's llm decisions reach the cache before it is returned
        return routed


class _DispatchActor:
    """Owns one model's dispatcher inside one async Ray actor: the only copy of its limits."""

    def __init__(self, model: ModelConfig, policy: DispatchConfig, run_id: str) -> None:
        from batchroute.dispatch.dispatcher import tune_gc_for_dispatch

        tune_gc_for_dispatch()  # this process does nothing else
        self._args = (model, policy, run_id)
        self._dispatcher: Any = None
        self._upper: Any = None  # the actor of the next model up the escalation ladder

    def has_key(self) -> bool:
        return bool(os.environ.get(self._args[0].api_key_env))

    def connect(self, upper: Any) -> None:
        self._upper = upper

    def _get(self) -> Any:
        if self._dispatcher is None:  # created inside the actor's event loop
            from batchroute.dispatch.dispatcher import ModelDispatcher

            model, policy, run_id = self._args
            self._dispatcher = ModelDispatcher(
                model, policy, run_id=run_id, api_key=os.environ.get(model.api_key_env),
                escalate=self._escalate if self._upper is not None else None)
        return self._dispatcher

    async def dispatch(self, routed: pa.Table) -> pa.Table:
        result: pa.Table = await self._get().dispatch(routed)
        return result

    async def ask_route(self, routed: pa.Table) -> pa.Table:
        """The llm router's ``ask`` (see :mod:`batchroute.llm_route`): its decision calls
        share this model's limits with the rows it answers, and never escalate."""
        from batchroute.llm_route import routing_output

        result: pa.Table = await self._get().ask(routed, routing_output(routed))
        return result

    async def _escalate(self, model: str, routed: pa.Table) -> pa.Table:
        # The next model's own actor holds its limits; the rows wait their turn there.
        result: pa.Table = await self._upper.dispatch.remote(routed)
        return result

    async def stats(self) -> dict[str, Any]:
        return asdict(self._dispatcher.stats) if self._dispatcher else {}

    async def close(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.aclose()


class _DispatchActors:
    """One async actor per catalog model, and the driver loop that feeds them."""

    def __init__(self, job: JobConfig, run_id: str) -> None:
        ray = _ray()
        self.job = job
        self.actors: dict[str, Any] = {}
        # A node that has just died can still be offered for new actors until Ray's health
        # check gives up on it (seconds): an actor placed there dies before it runs. Nothing
        # has been sent yet, so start the set again, a few times.
        for attempt in range(START_ATTEMPTS):
            try:
                have = self._start(run_id)
                break
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
                self.kill()
                if attempt == START_ATTEMPTS - 1:
                    raise
                log.warning("a dispatch actor died while starting (%s); starting again",
                            type(exc).__name__)
                time.sleep(2.0 * (attempt + 1))
        missing = [m for m, ok in zip(self.actors, have, strict=True) if not ok]
        if missing:
            self.kill()
            m = job.models[missing[0]]
            raise ConfigError(f"models.{m.name}.api_key_env: environment variable "
                              f"{m.api_key_env} is not set where Ray's workers run")

    def _start(self, run_id: str) -> list[bool]:
        """Start one actor per model, connect the escalation ladder; return who has a key."""
        ray = _ray()
        job = self.job
        remote = ray.remote(num_cpus=0, max_concurrency=10_000)(_DispatchActor)
        # Unnamed on purpose: a resumed run must not collide with the actors of a killed
        # driver that Ray has not reaped yet.
        self.actors = {m: remote.remote(cfg, job.dispatch, run_id)
                       for m, cfg in job.models.items()}
        ray.get([self.actors[m].connect.remote(self.actors[up]) for m in job.models
                 if (up := job.dispatch.escalates_to(m)) is not None])
        have: list[bool] = ray.get([a.has_key.remote() for a in self.actors.values()])
        return have

    def dispatch(self, folder: RunFolder, planned: dict[str, int], sink: ResultSink,
                 progress: Progress, answered: pa.Array | None = None) -> dict[str, Any]:
        """Feed every model's actor until its plan is done; return each actor's counters.

        Rows whose request_id is in ``answered`` (a resumed run's ``ok`` rows) are not sent.
        A batch whose actor call fails (the actor died, a bug) becomes ``failed`` rows with
        the error, so every planned row still ends in exactly one result row.
        """
        ray = _ray()
        policy = self.job.dispatch
        readers = {m: _batches(folder, m, policy.batch_rows, answered) for m in planned}
        in_flight: dict[Any, tuple[str, pa.Table]] = {}
        per_model = dict.fromkeys(planned, 0)
        used = {m: self.actors[m] for m in _with_escalation_targets(planned, policy)}

        def refill() -> None:
            for m, reader in list(readers.items()):
                while per_model[m] < policy.batches_in_flight:
                    batch = next(reader, None)
                    if batch is None:
                        del readers[m]
                        break
                    in_flight[self.actors[m].dispatch.remote(batch)] = (m, batch)
                    per_model[m] += 1

        def poll() -> dict[str, Any]:
            return dict(zip(used, ray.get([a.stats.remote() for a in used.values()]),
                            strict=True))

        refill()
        last_stats = time.monotonic()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
            for ref in ready:
                m, batch = in_flight.pop(ref)
                per_model[m] -= 1
                try:
                    sink.write(with_route_cost(ray.get(ref)))
                except ray.exceptions.RayError as exc:
                    log.error("dispatch of %d rows to %s failed: %s", batch.num_rows, m,
                              type(exc).__name__)
                    sink.write(failed_results(batch, folder.run_id, m, exc))
            refill()
            if time.monotonic() - last_stats > progress.interval_s:
                last_stats = time.monotonic()
                progress.models = poll()
            progress.tick()
        progress.models = poll()
        ray.get([a.close.remote() for a in used.values()])
        return dict(progress.models)

    def kill(self) -> None:
        """Kill every actor; killing again is a no-op."""
        ray = _ray()
        for a in self.actors.values():
            ray.kill(a)
        self.actors = {}


def _with_escalation_targets(planned: Iterable[str], policy: DispatchConfig) -> list[str]:
    """The planned models and every model their rows may escalate to."""
    used = list(planned)
    for m in used:  # grows while iterating: a ladder can be several steps long
        up = policy.escalates_to(m)
        if up is not None and up not in used:
            used.append(up)
    return used


def _ray() -> Any:
    # Ray's type stubs cover little of what is used here; treat the module as dynamic.
    import ray

    return ray


def _batches(folder: RunFolder, model: str, rows: int,
             answered: pa.Array | None) -> Iterator[pa.Table]:
    # Shard by shard, a batch at a time: the driver holds one reader per model for the whole
    # dispatch, and a dataset scanner's read-ahead would hold whole row groups in each.
    for path in folder.shards(folder.routed_dir(model)):
        for batch in source.iter_parquet(folder.fs, path, rows):
            table = pa.Table.from_batches([batch])
            if answered is not None and len(answered):
                table = table.filter(pc.invert(pc.is_in(table.column("request_id"),
                                                        value_set=answered)))
            if table.num_rows:
                yield table


def _stage(folder: RunFolder, manifest: dict[str, Any], name: str) -> None:
    manifest["stages"][name] = {"state": "done", "at": _now()}
    folder.write_json("manifest.json", manifest)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
