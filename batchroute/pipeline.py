"""The one module that wires the stages into Ray.

    source (driver) ─► route (Ray Data map_batches, actor pool) ─► plan (driver)
                    ─► dispatch (one async actor per model) ─► sink (driver) ─► rollup

Stage logic lives in plain classes that take Arrow tables (:mod:`batchroute.route`,
:mod:`batchroute.dispatch.dispatcher`, ...); this module only decides where they run.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from batchroute import __version__, plan, rollup, source
from batchroute import router as rt
from batchroute.config import DispatchConfig, JobConfig, ModelConfig
from batchroute.errors import ConfigError
from batchroute.progress import Progress
from batchroute.route import RouteSpec, RouteStage, check_compatible
from batchroute.sink import ResultSink, RunFolder

log = logging.getLogger("batchroute")
SOURCE_SHARD_ROWS = 65_536


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


def start_ray(address: str | None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None,
             include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run(job: JobConfig, *, run_id: str | None = None, ray_address: str | None = None,
        dry_run: bool = False, progress: Progress | None = None) -> Outcome:
    """Run a job end to end (or up to the plan with ``dry_run``).

    Raises SchemaError/ConfigError/RouterError before anything is written; once the run folder
    exists, per-row problems become result rows and never exceptions.
    """
    progress = progress or Progress()
    data = source.open_input(job.input)
    router_bytes = rt.read_bytes(job.router.path)
    info = rt.inspect(router_bytes, path=job.router.path)
    spec = RouteSpec.from_job(job)
    check_compatible(info, spec, path=job.router.path)
    if not dry_run:
        _check_keys(job.models.values())

    run_id = run_id or new_run_id(job)
    folder = RunFolder(job.output, run_id)
    if folder.exists():
        raise ConfigError(f"run folder {folder.uri} already exists; choose another --run-id "
                          "(resuming a run is not supported yet)")
    manifest: dict[str, Any] = {
        "run_id": run_id, "job": job.name, "job_file": job.source,
        "batchroute_version": __version__, "config_hash": job.config_hash,
        "router_version": info.version, "router_path": job.router.path,
        "input": job.input, "input_fingerprint": data.fingerprint,
        "input_files": len(data.files), "started_at": _now(), "stages": {},
        "paths": {"source": folder.sub("source"), "routed": folder.sub("routed"),
                  "forecast": folder.sub("forecast.json"), "results": folder.sub("results"),
                  "rollups": folder.sub("rollups")},
        "counts": {},
    }
    folder.write_json("manifest.json", manifest)
    sink = ResultSink(folder)

    with progress:
        progress.set_phase("reading input")
        rows = 0
        for i, batch in enumerate(source.read_requests(data, SOURCE_SHARD_ROWS)):
            folder.write_table(folder.sub("source"), f"part-{i:06d}.parquet", batch)
            rows += batch.num_rows
        progress.total_rows = rows
        manifest["input_rows"] = rows
        _stage(folder, manifest, "source")

        start_ray(ray_address)
        progress.set_phase("routing")
        writer = plan.PlanWriter(folder, sink)
        for routed in _route(folder, router_bytes, spec, job):
            writer.add(routed)
            progress.routed += routed.num_rows
            progress.tick()
        progress.planned = writer.close()
        forecast = plan.forecast(folder, job, writer.rejected)
        folder.write_json("forecast.json", forecast)
        _stage(folder, manifest, "plan")

        if dry_run:
            manifest["counts"] = dict(sink.counts)
            folder.write_json("manifest.json", manifest)
            return Outcome(folder, manifest, forecast, None)

        progress.set_phase("dispatching")
        manifest["dispatch"] = _dispatch(folder, job, progress.planned, sink, progress)
        _stage(folder, manifest, "dispatch")

        progress.set_phase("rolling up")
        table = rollup.rollup(rollup.read_results(folder), run_id=run_id, models=job.models,
                              reference_model=job.reference_model)
        folder.write_table(folder.sub("rollups"), "rollups.parquet", table)
        manifest["counts"] = dict(sink.counts)
        manifest["finished_at"] = _now()
        _stage(folder, manifest, "rollup")
        progress.set_phase("done")
    return Outcome(folder, manifest, forecast, table)


def _route(folder: RunFolder, router_bytes: bytes, spec: RouteSpec,
           job: JobConfig) -> Iterator[pa.Table]:
    ray = _ray()

    # Each routing actor holds a CPU; leave one for Ray Data's read tasks or the pipeline
    # stalls waiting for a CPU that the actors never give back.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, min(job.router.actors, cpus - 1))
    dataset = ray.data.read_parquet(folder.sub("source"), filesystem=folder.fs)
    # The router travels through the object store (workers need not share the driver's disk);
    # wrapped in a list so Ray hands the actor the reference rather than inlining the bytes.
    router_ref = [ray.put(router_bytes)]
    routed = dataset.map_batches(
        _RayRouteStage, fn_constructor_args=(router_ref, spec, job.router.path),
        batch_format="pyarrow", batch_size=job.router.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, zero_copy_batch=True)
    yield from routed.iter_batches(batch_format="pyarrow", batch_size=None)


class _RayRouteStage(RouteStage):
    def __init__(self, router_ref: list[Any], spec: RouteSpec, path: str) -> None:
        import ray

        super().__init__(ray.get(router_ref[0]), spec, path)


class _DispatchActor:
    """Owns one model's dispatcher inside one async Ray actor: the only copy of its limits."""

    def __init__(self, model: ModelConfig, policy: DispatchConfig, run_id: str) -> None:
        self._args = (model, policy, run_id)
        self._dispatcher: Any = None

    async def dispatch(self, routed: pa.Table) -> pa.Table:
        if self._dispatcher is None:  # created inside the actor's event loop
            from batchroute.dispatch.dispatcher import ModelDispatcher

            model, policy, run_id = self._args
            self._dispatcher = ModelDispatcher(model, policy, run_id=run_id,
                                               api_key=os.environ.get(model.api_key_env))
        result: pa.Table = await self._dispatcher.dispatch(routed)
        return result

    async def stats(self) -> dict[str, Any]:
        return asdict(self._dispatcher.stats) if self._dispatcher else {}

    async def close(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.aclose()


def _dispatch(folder: RunFolder, job: JobConfig, planned: dict[str, int], sink: ResultSink,
              progress: Progress) -> dict[str, Any]:
    """Feed every model's actor until its plan is done; return each actor's final counters."""
    ray = _ray()

    remote = ray.remote(num_cpus=0, max_concurrency=10_000)(_DispatchActor)
    actors = {m: remote.options(name=f"batchroute-dispatch-{folder.run_id}-{m}").remote(
        job.models[m], job.dispatch, folder.run_id) for m in planned}
    readers = {m: _batches(folder, m, job.dispatch.batch_rows) for m in planned}
    in_flight: dict[Any, str] = {}
    per_model = dict.fromkeys(planned, 0)

    def refill() -> None:
        for m, reader in list(readers.items()):
            while per_model[m] < job.dispatch.batches_in_flight:
                batch = next(reader, None)
                if batch is None:
                    del readers[m]
                    break
                in_flight[actors[m].dispatch.remote(batch)] = m
                per_model[m] += 1

    refill()
    last_stats = 0.0
    try:
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
            for ref in ready:
                m = in_flight.pop(ref)
                per_model[m] -= 1
                sink.write(ray.get(ref))
            refill()
            if time.monotonic() - last_stats > progress.interval_s:
                last_stats = time.monotonic()
                progress.models = dict(zip(actors, ray.get(
                    [a.stats.remote() for a in actors.values()]), strict=True))
            progress.tick()
        progress.models = dict(zip(actors, ray.get([a.stats.remote() for a in actors.values()]),
                                   strict=True))
        ray.get([a.close.remote() for a in actors.values()])
        return dict(progress.models)
    finally:
        for a in actors.values():
            ray.kill(a)


def _ray() -> Any:
    # Ray's type stubs cover little of what is used here; treat the module as dynamic.
    import ray

    return ray


def _batches(folder: RunFolder, model: str, rows: int) -> Iterator[pa.Table]:
    dataset = ds.dataset(folder.routed_dir(model), filesystem=folder.fs, format="parquet")
    for batch in dataset.to_batches(batch_size=rows):
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


def _check_keys(models: Any) -> None:
    for m in models:
        if not os.environ.get(m.api_key_env):
            raise ConfigError(f"models.{m.name}.api_key_env: environment variable "
                              f"{m.api_key_env} is not set")


def _stage(folder: RunFolder, manifest: dict[str, Any], name: str) -> None:
    manifest["stages"][name] = {"state": "done", "at": _now()}
    folder.write_json("manifest.json", manifest)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
