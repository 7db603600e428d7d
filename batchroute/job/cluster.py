"""The one module that imports Ray: where the stages run.

    source (driver) ─► route (a pool of routing actors) ─► plan (driver)
                    ─► dispatch (one async actor per model) ─► sink (driver) ─► rollup

Stage logic lives in plain classes that take Arrow tables (:mod:`batchroute.stages.route`,
:mod:`batchroute.stages.dispatch.dispatcher`, ...); this module only decides where they run,
and :mod:`batchroute.job.runner` the order they run in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray as _ray

from batchroute.config import DispatchConfig, JobConfig, ModelConfig
from batchroute.errors import ConfigError
from batchroute.job.progress import Progress
from batchroute.stages import results, source
from batchroute.stages.route import RouteSpec, RouteStage
from batchroute.stages.sink import ResultSink, RunFolder
from batchroute.task import TaskConfig, result_fields

# Ray's type stubs cover little of what is used here (actor options, exceptions, handles).
ray: Any = _ray
log = logging.getLogger("batchroute")
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
START_ATTEMPTS = 4
START_BACKOFF_S = 2.0  # times the attempt number, between attempts to start the actors
HEARTBEAT_S = 1.0
# A dispatch actor that has not heard from its driver for this long sends nothing more.
DRIVER_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


def start_ray(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a Ray of this process's own on this
    machine, listening on loopback only, with ``num_cpus`` logical CPUs if given (default:
    one per core)."""
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
    if address:  # a cluster's own settings (binding, authentication, object store) stand
        join = {"address": address, "include_dashboard": False,
                "logging_level": logging.WARNING, "configure_logging": True,
                "log_to_driver": True}
        if _on_loopback(address) and not _listens_beyond_loopback(address):
            # A Ray bound to this machine's loopback only (an embedded one of another
            # batchroute process, a test session's): Ray would rewrite 127.0.0.1 to the
            # machine's network address, where nothing listens, and wait for it.
            with _loopback_node():
                ray.init(**join, _node_ip_address=LOOPBACK)
            return
        ray.init(**join)
        return
    # A Ray started here gets a bounded object store: by default Ray reserves 30% of RAM.
    # Beyond the bound Ray spills to disk. "local": a Ray of its own, even when `ray start`
    # left a cluster running on this machine (ray.init() alone would join that one).
    with _loopback_node(), _without_token_auth_notice():
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, num_cpus=num_cpus,
                 _node_ip_address=LOOPBACK)


def _on_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _listens_beyond_loopback(address: str) -> bool:
    """Whether the Ray at a loopback ``address`` also answers on the machine's network
    address, as a `ray start` cluster does (and as Ray, joining, will try to reach it)."""
    node_ip = str(ray._private.services.get_node_ip_address())
    port = int(address.rsplit(":", 1)[1])
    try:
        socket.create_connection((node_ip, port), timeout=0.5).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts its processes here, make them listen on loopback only.

    A Ray started by ray.init serves its control plane, object transfers and workers on every
    interface of the machine: anyone who can reach the machine can talk to it. Its servers
    listen on loopback only when the node's address is 127.0.0.1, but on Linux Ray 2.60
    replaces a loopback ``_node_ip_address`` with the machine's network address unless its
    single-machine switch is off. That switch (what Ray uses on macOS and Windows, set from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when Ray is imported) is only read while the node
    address is resolved, so it is turned off for ray.init alone; once Ray runs, the address
    comes from the started node.
    """
    from ray._private import ray_constants

    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was


# Ray 2.60 turns token authentication on for a Ray that ray.init starts, and says so with a
# WARNING on every run unless RAY_AUTH_MODE is set. The notice is benign and kept out of a
# clean run's output; the authentication itself stays on, because loopback is shared by every
# user and container of the machine. Setting RAY_AUTH_MODE=token here would not do: this
# process's Ray read its mode when it was imported, and would start servers that ask for a
# token it does not send (RAY_AUTH_MODE=disabled would turn the authentication off).
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster."


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_AUTH_NOTICE)


@contextlib.contextmanager
def _without_token_auth_notice() -> Iterator[None]:
    logger = logging.getLogger(_TOKEN_AUTH_LOGGER)
    drop = _DropTokenAuthNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_ARROW_POOLS = {"jemalloc": pa.jemalloc_memory_pool, "mimalloc": pa.mimalloc_memory_pool,
                "system": pa.system_memory_pool}


def _arrow_pool() -> str:
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        return "system"
    return "jemalloc"


def cpus() -> int:
    """Logical CPUs of the cluster this process is connected to (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def route_shards(shards: list[str], fs: pafs.FileSystem, router_bytes: bytes | None,
                 spec: RouteSpec, *, actors: int, batch_rows: int,
                 router_path: str, asker: Any = None) -> Iterator[pa.Table]:
    """Route ``requests`` shards on a pool of exactly ``actors`` routing actors; yield routed
    tables in shard order. The job sizes the pool from its config (:func:`batchroute.job.runner`);
    ``batchroute bench route`` calls this with each actor count it measures.

    The actors read the shards themselves instead of going through Ray Data: its Parquet
    reader starts a pool of footer-reading actors that grows with the number of shards (up
    to 32 processes of ~100 MiB each), reads in 128 MiB units, and keeps a read worker and
    its own coordinator actors alive for the rest of the job. Shards are small and already
    canonical, so one actor call per shard needs none of that.

    ``asker`` is the llm router model's dispatch actor: routing calls share that model's
    limits with its answers.
    """
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
    # The router's reference and the asker's handle go with every call, not to the
    # constructor: Ray cannot restart an actor whose constructor held references (it logs an
    # ERROR saying so, ray-project/ray#53727), while a retried call brings its own, and a
    # restarted actor rebuilds its stage from them.
    pool = [remote.remote(spec, router_path, fs, batch_rows) for _ in range(actors)]
    # Two shards per actor in flight: one being routed, one queued so the actor never waits
    # on the driver. Results come back in submission order, so the plan is deterministic.
    pending: deque[Any] = deque()
    todo = iter(enumerate(shards))
    try:
        while True:
            while len(pending) < 2 * actors and (nxt := next(todo, None)) is not None:
                i, shard = nxt
                pending.append(pool[i % actors].route.remote(shard, router_ref, asker))
            if not pending:
                return
            yield ray.get(pending.popleft())
    finally:
        # Routing is over (or abandoned): free the actors' memory before dispatch starts.
        for actor in pool:
            ray.kill(actor)


class _RouteActor:
    """One routing actor: reads a source shard from the run folder and routes it. Its stage
    is built on the first call, from the router and asker that call brings."""

    def __init__(self, spec: RouteSpec, path: str, fs: pafs.FileSystem,
                 batch_rows: int) -> None:
        self.spec = spec
        self.path = path
        self.fs = fs
        self.batch_rows = batch_rows
        self.stage: RouteStage | None = None

    def route(self, shard: str, router_ref: list[Any], asker: Any = None) -> pa.Table:
        if self.stage is None:
            def ask(routed: pa.Table) -> pa.Table:
                result: pa.Table = ray.get(asker.ask_route.remote(routed))
                return result

            self.stage = RouteStage(ray.get(router_ref[0]), self.spec, self.path,
                                    ask=ask if asker is not None else None)
        stage = self.stage
        routed = pa.concat_tables([stage(pa.Table.from_batches([b]))
                                   for b in source.iter_parquet(self.fs, shard, self.batch_rows)])
        stage.flush()  # a shard's llm decisions reach the cache before it is returned
        return routed


class _DispatchActor:
    """Owns one model's dispatcher inside one async Ray actor: the only copy of its limits.

    It journals its answers into the run folder as they arrive (:mod:`batchroute.stages.
    journal`), and stops sending once its driver has not been heard from for
    ``DRIVER_TIMEOUT_S``: a driver killed with ``kill -9`` cannot tell its actors, and Ray
    takes a while to reap them.
    """

    def __init__(self, model: ModelConfig, policy: DispatchConfig, folder: RunFolder,
                 task: TaskConfig) -> None:
        from batchroute.stages.dispatch.dispatcher import tune_gc_for_dispatch

        tune_gc_for_dispatch()  # this process does nothing else
        self._args = (model, policy, folder)
        self._task = task
        self._dispatcher: Any = None
        self._upper: Any = None  # the actor of the next model up the escalation ladder
        self._journal: Any = None
        self._heard = time.monotonic()
        self._tier: Any = None  # the batch tier (tier = "batch"), once started
        self._shadow: Any = None  # (dispatcher, journal) of the shadow checks' calls

    def has_key(self) -> bool:
        return bool(os.environ.get(self._args[0].api_key_env))

    def connect(self, upper: Any) -> None:
        self._upper = upper

    async def heartbeat(self) -> None:
        self._heard = time.monotonic()

    def _alive(self) -> bool:
        return time.monotonic() - self._heard < DRIVER_TIMEOUT_S

    def _get(self) -> Any:
        if self._dispatcher is None:  # created inside the actor's event loop
            from batchroute.stages.dispatch.dispatcher import ModelDispatcher

            model, policy, folder = self._args
            self._dispatcher = ModelDispatcher(
                model, policy, run_id=folder.run_id, api_key=os.environ.get(model.api_key_env),
                escalate=self._escalate if self._upper is not None else None,
                journal=self._write_journal, alive=self._alive, task=self._task)
        return self._dispatcher

    def _write_journal(self, rows: pa.Table | None, in_flight: dict[str, int],
                       unrecovered_micro_usd: int) -> None:
        from batchroute.stages.journal import JournalWriter

        model, _, folder = self._args
        if self._journal is None:
            self._journal = JournalWriter(folder, model.name)
        if rows is not None:
            self._journal.append(rows)
        self._journal.snapshot(in_flight, unrecovered_micro_usd)

    # An exception that leaves the actor travels to the driver (and into its logs) with its
    # message: the dispatcher's scrubber sees it first.
    async def dispatch(self, routed: pa.Table, journal: bool = True) -> pa.Table:
        dispatcher = self._get()
        with dispatcher.scrubber.exceptions():
            result: pa.Table = await dispatcher.dispatch(routed, journal=journal)
        return result

    async def ask_route(self, routed: pa.Table) -> pa.Table:
        """The llm router's ``ask`` (see :mod:`batchroute.routers.llm`): its decision calls
        share this model's limits with the rows it answers, and never escalate."""
        from batchroute.routers.llm import routing_output

        dispatcher = self._get()
        with dispatcher.scrubber.exceptions():
            result: pa.Table = await dispatcher.ask(routed, routing_output(routed))
        return result

    def _shadow_get(self, folder: RunFolder) -> Any:
        """The dispatcher of the shadow checks' calls (:mod:`batchroute.job.shadows`): this
        model's, never escalating, journalling into ``folder`` (the shadow rows' own run
        folder under quality/), so that a killed run's resume commits what was answered and
        sends it no second time. It runs after the run's own dispatch, so the model's limits
        are its alone."""
        if self._shadow is None:
            from batchroute.stages.dispatch.dispatcher import ModelDispatcher
            from batchroute.stages.journal import JournalWriter

            model, policy, run = self._args
            writer = JournalWriter(folder, model.name)

            def write(rows: pa.Table | None, in_flight: dict[str, int],
                      unrecovered_micro_usd: int) -> None:
                if rows is not None:
                    writer.append(rows)
                writer.snapshot(in_flight, unrecovered_micro_usd)

            self._shadow = (ModelDispatcher(
                model, policy, run_id=run.run_id, api_key=os.environ.get(model.api_key_env),
                journal=write, alive=self._alive, task=self._task), writer)
        return self._shadow[0]

    async def shadow(self, routed: pa.Table, folder: RunFolder) -> pa.Table:
        """Shadow checks' second answer: each row's request as the job sends it, not
        escalated, journalled into ``folder`` (:meth:`_shadow_get`)."""
        dispatcher = self._shadow_get(folder)
        with dispatcher.scrubber.exceptions():
            result: pa.Table = await dispatcher.dispatch(routed)
        return result

    async def judge(self, routed: pa.Table) -> pa.Table:
        """Shadow checks' judge calls (:mod:`batchroute.judge`)."""
        from batchroute import judge
        from batchroute.stages.dispatch.providers import OutputSchema

        dispatcher = self._get()
        with dispatcher.scrubber.exceptions():
            result: pa.Table = await dispatcher.ask(
                routed, OutputSchema(judge.NAME, judge.SCHEMA, judge.DESCRIPTION))
        return result

    async def _escalate(self, model: str, routed: pa.Table) -> pa.Table:
        # The next model's own actor holds its limits; the rows wait their turn there. This
        # model journals them when they come back, with its own attempt's cost added.
        result: pa.Table = await self._upper.dispatch.remote(routed, False)
        return result

    async def flush(self) -> None:
        """Journal what has been answered and not yet journalled (before an interrupted
        driver commits the journals)."""
        if self._dispatcher is not None:
            self._dispatcher.flush_journal()

    async def start_batches(self, answered: pa.Array, deadline: str | None,
                            shadow: RunFolder | None = None) -> None:
        """Start this model's batch tier (tier = "batch") over the run's routed rows, or over
        those of the shadow checks' folder ``shadow`` (with :meth:`_shadow_get`'s dispatcher);
        its results are taken with :meth:`batch_results`."""
        import httpx

        from batchroute.stages.dispatch.batch_tier import BatchTier

        model, _, folder = self._args
        dispatcher = self._get() if shadow is None else self._shadow_get(shadow)
        folder = shadow or folder
        # Streams uploads and results (the sync path's transport reads bodies whole); a
        # 200 MB upload takes a while.
        client = httpx.AsyncClient(timeout=httpx.Timeout(max(model.timeout_s, 300.0)))
        self._tier = BatchTier(dispatcher, folder, client=client, answered=answered,
                               deadline=datetime.fromisoformat(deadline) if deadline else None)
        # Bounded: a batch tier that reads results faster than the driver commits them
        # waits, instead of holding every file's rows (a file is 50,000 answers).
        self._tier_results: asyncio.Queue[pa.Table] = asyncio.Queue(maxsize=2)

        async def run() -> None:
            try:
                with dispatcher.scrubber.exceptions():
                    await self._tier.run(self._tier_results.put)
            finally:
                await client.aclose()

        self._tier_task = asyncio.ensure_future(run())

    async def batch_results(self) -> tuple[pa.Table | None, bool]:
        """The batch tier's next result rows (waiting up to a second), and whether it has
        finished; raises what ended it, if it failed."""
        queue = self._tier_results
        try:
            table: pa.Table | None = await asyncio.wait_for(queue.get(), 1.0)
        except TimeoutError:
            table = None
        if table is None and self._tier_task.done():
            if not queue.empty():
                return queue.get_nowait(), False
            self._tier_task.result()
            return None, True
        return table, False

    async def stats(self) -> dict[str, Any]:
        stats = asdict(self._dispatcher.stats) if self._dispatcher else {}
        if self._tier is not None:
            stats["batch"] = self._tier.summary()
        return stats

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.flush_journal()
            await self._dispatcher.aclose()
            self._dispatcher = None  # a later call (the judge's) opens a new one
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._shadow is not None:
            dispatcher, writer = self._shadow
            dispatcher.flush_journal()
            await dispatcher.aclose()
            writer.close()
            self._shadow = None


class DispatchActors:
    """One async actor per catalog model, and the driver loop that feeds them. While they
    live, a thread of the driver tells them every ``HEARTBEAT_S`` that it is still there."""

    def __init__(self, job: JobConfig, folder: RunFolder) -> None:
        self.job = job
        self.actors: dict[str, Any] = {}
        self.failed_batches = 0  # dispatch calls that failed whole (their rows: failed_unsent)
        self.outputs = result_fields(job.task.output)
        self._beating = threading.Event()  # set: the heartbeat thread stops
        # A node that has just died can still be offered for new actors until Ray's health
        # check gives up on it (seconds): an actor placed there dies before it runs. Nothing
        # has been sent yet, so start the set again, a few times.
        for attempt in range(START_ATTEMPTS):
            try:
                have = self._start(folder)
                break
            except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
                self._kill_actors()  # the heartbeat is not started yet, and must stay startable
                if attempt == START_ATTEMPTS - 1:
                    raise
                log.warning("a dispatch actor died while starting (%s); starting again",
                            type(exc).__name__)
                time.sleep(START_BACKOFF_S * (attempt + 1))
        missing = [m for m, ok in zip(self.actors, have, strict=True) if not ok]
        if missing:
            self._kill_actors()
            m = job.models[missing[0]]
            raise ConfigError(f"models.{m.name}.api_key_env: environment variable "
                              f"{m.api_key_env} is not set where Ray's workers run")
        self._beat = threading.Thread(target=self._heartbeat, name="dispatch-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _start(self, folder: RunFolder) -> list[bool]:
        """Start one actor per model, connect the escalation ladder; return who has a key."""
        job = self.job
        remote = ray.remote(num_cpus=0, max_concurrency=10_000)(_DispatchActor)
        # Unnamed on purpose: a resumed run must not collide with the actors of a killed
        # driver that Ray has not reaped yet.
        self.actors = {m: remote.remote(cfg, job.dispatch, folder, job.task)
                       for m, cfg in job.models.items()}
        ray.get([self.actors[m].connect.remote(self.actors[up]) for m in job.models
                 if (up := job.dispatch.escalates_to(m)) is not None])
        have: list[bool] = ray.get([a.has_key.remote() for a in self.actors.values()])
        return have

    def _heartbeat(self) -> None:
        while not self._beating.wait(HEARTBEAT_S):
            for actor in list(self.actors.values()):
                with contextlib.suppress(Exception):  # a dead actor: the loop sees it
                    actor.heartbeat.remote()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Have every actor journal what it has answered (an interrupted run commits it)."""
        with contextlib.suppress(Exception):
            ray.get([a.flush.remote() for a in self.actors.values()], timeout=timeout_s)

    def dispatch(self, folder: RunFolder, planned: dict[str, int], sink: ResultSink,
                 progress: Progress, answered: pa.Array | None = None, *,
                 stop: Callable[[], None] = lambda: None,
                 deadline: datetime | None = None) -> dict[str, Any]:
        """Feed every model's actor until its plan is done; return each actor's counters.
        ``stop`` is called at every turn of the loop and may raise to end it early.

        Rows whose request_id is in ``answered`` (a resumed run's ``ok`` rows) are not sent.
        A batch whose actor call fails (the actor died, a bug) becomes ``failed`` rows with
        the error, so every planned row still ends in exactly one result row.

        A batch-tier model's actor sends its rows through the provider's batch API itself
        (:mod:`batchroute.stages.dispatch.batch_tier`, until ``deadline``); the loop takes its
        results as they come.
        """
        policy = self.job.dispatch
        self.failed_batches = 0
        tiered = [m for m in planned if self.job.models[m].tier == "batch"]
        readers = {m: _batches(folder, m, policy.batch_rows, answered) for m in planned
                   if m not in tiered}
        in_flight: dict[Any, tuple[str, pa.Table | None]] = {}
        done_ids = answered if answered is not None else pa.array([], pa.string())
        ray.get([self.actors[m].start_batches.remote(
            done_ids, deadline.isoformat() if deadline else None) for m in tiered])
        for m in tiered:
            in_flight[self.actors[m].batch_results.remote()] = (m, None)
        per_model = dict.fromkeys(planned, 0)
        used = {m: self.actors[m] for m in with_escalation_targets(planned, policy)}

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
            stop()
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
            for ref in ready:
                m, batch = in_flight.pop(ref)
                if batch is None:  # the batch tier's results (a failure stops the run)
                    table, finished = ray.get(ref)
                    if table is not None:
                        sink.write(results.with_route_cost(table))
                    if not finished:
                        in_flight[self.actors[m].batch_results.remote()] = (m, None)
                    continue
                per_model[m] -= 1
                try:
                    sink.write(results.with_route_cost(ray.get(ref)))
                except ray.exceptions.RayError as exc:
                    log.error("dispatch of %d rows to %s failed: %s", batch.num_rows, m,
                              type(exc).__name__)
                    self.failed_batches += 1
                    sink.write(results.failed_unsent(batch, folder.run_id, m, exc,
                                                     self.outputs))
            refill()
            if time.monotonic() - last_stats > progress.interval_s:
                last_stats = time.monotonic()
                progress.models = poll()
            progress.tick()
        progress.models = poll()
        ray.get([a.close.remote() for a in used.values()])
        return dict(progress.models)

    def each(self, model: str, method: str, tables: Iterable[pa.Table], *args: Any,
             stop: Callable[[], None] = lambda: None
             ) -> Iterator[tuple[pa.Table, pa.Table | None]]:
        """Send each table (and ``args``) to ``model``'s actor ``method`` (``shadow`` or
        ``judge``), ``batches_in_flight`` at a time, and yield (sent, returned) as each comes
        back; returned is None when the actor call failed (the error is logged)."""
        actor = self.actors[model]
        call = getattr(actor, method)
        pending = iter(tables)
        in_flight: dict[Any, pa.Table] = {}

        def refill() -> None:
            while len(in_flight) < self.job.dispatch.batches_in_flight:
                table = next(pending, None)
                if table is None:
                    return
                in_flight[call.remote(table, *args)] = table

        refill()
        while in_flight:
            stop()
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.25)
            for ref in ready:
                sent = in_flight.pop(ref)
                try:
                    got: pa.Table | None = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    log.error("%s of %d rows to %s failed: %s", method, sent.num_rows, model,
                              type(exc).__name__)
                    got = None
                yield sent, got
            refill()
        ray.get(actor.close.remote())

    def batch_each(self, model: str, folder: RunFolder, answered: pa.Array,
                   deadline: datetime | None, *, stop: Callable[[], None] = lambda: None
                   ) -> Iterator[pa.Table]:
        """The shadow checks' rows routed in ``folder`` for ``model``, sent through its batch
        tier (its ledger in ``folder``, so a resume sends no line twice); yields result rows
        as they come."""
        actor = self.actors[model]
        ray.get(actor.start_batches.remote(answered, deadline.isoformat() if deadline else None,
                                           folder))
        while True:
            stop()
            table, finished = ray.get(actor.batch_results.remote())
            if table is not None:
                yield table
            if finished:
                break
        ray.get(actor.close.remote())

    def kill(self) -> None:
        """Stop the heartbeat and kill every actor; killing again is a no-op."""
        self._beating.set()
        self._kill_actors()

    def _kill_actors(self) -> None:
        for a in self.actors.values():
            ray.kill(a)
        self.actors = {}


def with_escalation_targets(planned: Iterable[str], policy: DispatchConfig) -> list[str]:
    """The planned models and every model their rows may escalate to."""
    used = list(planned)
    for m in used:  # grows while iterating: a ladder can be several steps long
        up = policy.escalates_to(m)
        if up is not None and up not in used:
            used.append(up)
    return used


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


