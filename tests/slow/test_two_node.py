"""A real two-node Ray cluster on this machine runs the job as a single-node Ray does.

The cluster is two ``ray start --block`` processes on loopback: a head with 2 CPUs and a
worker node with 2 CPUs and a resource of its own. The job runs as the CLI in a subprocess
joining it with ``--ray-address``. The job asks for 3 routing actors; a cluster of 4 CPUs
gives it 3 (CPUs - 1), each holding one CPU, and since no node has more than 2 CPUs the pool
must span both nodes.

Which node each actor ran on is read from the GCS actor table, from a subprocess connected to
the cluster (``ray.util.state`` needs the dashboard, which ``ray[data]`` does not install; it
reads the same table).

Teardown: ``ray stop`` would stop every Ray on the machine, the test session's own included.
So each node is started in the foreground (``--block``) in a new session, its process tree is
snapshotted, and exactly those PIDs are terminated, then killed. The head's temp dir is a
private one, so the cluster's address never lands in /tmp/ray/ray_current_cluster, where a
later ``ray.init()`` would find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batchroute import config
from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.job import runner
from tests.helpers import demo_job_doc, is_loopback, quiet_progress, to_toml

pytestmark = [pytest.mark.slow]
# Three source shards of 8,192 rows: one per routing actor, and three actors of one CPU each
# do not fit on the two-CPU head.
ROWS = 20_000
TIMING = ["run_id", "started_at", "finished_at", "latency_ms"]
WORKER_RESOURCE = "batchroute_test_worker_node"
# `ray start`, with its nodes' servers on loopback only. Ray's CLI turns a loopback
# --node-ip-address into the machine's network address (services.resolve_ip_for_localhost),
# so both nodes would otherwise listen on every interface. batchroute's embedded Ray keeps to
# loopback with Ray's single-machine switch instead (batchroute.job.cluster._loopback_node),
# which a worker node's `ray start` refuses, so here the rewrite itself is turned off. The two
# nodes share 127.0.0.1 and differ by their ports.
RAY_START = ("import sys\n"
             "from ray._private import services\n"
             "services.resolve_ip_for_localhost = lambda host: host\n"
             "from ray.scripts.scripts import main\n"
             "sys.argv[0] = 'ray'\n"
             "sys.exit(main())\n")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen, since a port
    released at once can be handed out again by the next bind (Ray refuses a port given to
    two of its components)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _free_port() -> int:
    return _free_ports(1)[0]


def _node_ports() -> list[str]:
    # Fixed defaults (dashboard agent 52365, ...) would collide with the other node and with
    # the test session's own Ray.
    flags = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    return [f"--{flag}={port}" for flag, port in zip(flags, _free_ports(len(flags)),
                                                      strict=True)]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]

    def query(self, code: str) -> Any:
        """Run ``code`` in a driver connected to the cluster; it prints one JSON document."""
        # Joined as `batchroute run --ray-address` joins it (a loopback-only cluster).
        script = ("import json, ray\n"
                  "from batchroute.job import cluster\n"
                  f"cluster.start_ray({self.address!r})\n" + code)
        out = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True,
                             text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-c", RAY_START, "start", "--block",
                                 "--disable-usage-stats", *args],
                                env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the nodes' own process trees (snapshotted first: a raylet's workers would
    be re-parented once it exits), then kill whatever is left."""
    import psutil

    tree: list[psutil.Process] = []
    for p in procs:
        try:
            root = psutil.Process(p.pid)
            tree += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in reversed(tree):  # leaves first, then the `ray start` parents
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    for p in procs:
        p.wait(timeout=10)


@pytest.fixture
def cluster(api_key: str) -> Iterator[Cluster]:
    with _two_nodes(api_key, head_cpus=2) as c:
        yield c


@pytest.fixture
def roomy_cluster(api_key: str) -> Iterator[Cluster]:
    """A head with room for the whole routing pool, so that it can take over the actors of
    a lost worker node."""
    with _two_nodes(api_key, head_cpus=4) as c:
        yield c


@contextlib.contextmanager
def _two_nodes(api_key: str, *, head_cpus: int) -> Iterator[Cluster]:
    # Short: Ray's unix sockets live under the temp dir and their paths are limited to 107
    # characters, which pytest's tmp_path can exceed.
    temp = Path(tempfile.mkdtemp(prefix="br2n-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["BATCHROUTE_TEST_KEY"] = api_key  # where the dispatch actors run: both nodes
    # Ray enables token authentication by default; every node and every driver of this
    # cluster presents the cluster's own token, whatever ~/.ray/auth_token holds.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", f"--object-store-memory={256 * 2**20}"]
    procs = [_start(["--head", f"--port={port}", f"--temp-dir={temp}", f"--num-cpus={head_cpus}",
                     "--include-dashboard=false", *common, *_node_ports()],
                    env, temp / "head.log")]
    try:
        deadline = time.monotonic() + 60
        while not (temp / "ray_current_cluster").exists():
            assert procs[0].poll() is None, (temp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head did not start within 60 s"
            time.sleep(0.2)
        procs.append(_start([f"--address={address}", "--num-cpus=2", *common, *_node_ports(),
                             f"--resources={json.dumps({WORKER_RESOURCE: 1})}"],
                            env, temp / "worker.log"))
        c = Cluster(address, env, procs)
        nodes = c.query(
            "import time\n"
            "for _ in range(120):\n"
            "    alive = [n for n in ray.nodes() if n['Alive']]\n"
            "    if len(alive) == 2: break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps(len(alive)))")
        assert nodes == 2, (temp / "worker.log").read_text()[-3000:]
        yield c
    finally:
        _stop(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _job(tmp: Path, url: str) -> Path:
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", url)
    doc["router"]["actors"] = 3
    path = tmp / "job.toml"
    path.write_text(to_toml(doc))
    return path


def _results(folder: Path) -> pl.DataFrame:
    return pl.read_parquet(folder / "results").drop(TIMING).sort("request_id")


def test_the_job_on_two_nodes_equals_a_single_node_run(
        tmp_path: Path, cluster: Cluster, ray_session: None) -> None:
    sample.write(sample.generate(ROWS, seed=5), tmp_path / "in.parquet")
    cfg = MockProviderConfig(api_key=os.environ["BATCHROUTE_TEST_KEY"], seed=3)
    with MockProvider(cfg) as provider:
        job = _job(tmp_path, provider.url)
        proc = subprocess.run(
            [sys.executable, "-m", "batchroute", "run", str(job), "--run-id", "two-node",
             "--ray-address", cluster.address],
            env=cluster.env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # The same job on the test session's single-node Ray.
        single = runner.run(config.load(job), run_id="one-node", progress=quiet_progress())
        assert single.exit_code == 0

    found = cluster.query(
        "from ray._private import state\n"
        "nodes = {n['NodeID']: n['Resources'] for n in ray.nodes()}\n"
        "actors = [{'cls': a['ActorClassName'], 'node': a['Address']['NodeID'],\n"
        "           'job': a['JobID'], 'restarts': a['NumRestarts']}\n"
        "          for a in state.actors().values()]\n"
        "print(json.dumps({'nodes': nodes, 'actors': actors}))")
    actors = [{**a, "worker_node": WORKER_RESOURCE in found["nodes"].get(a["node"], {})}
              for a in found["actors"]]
    routing = [a for a in actors if a["cls"].endswith("_RouteActor")]
    assert len(routing) == 3, actors
    assert {a["worker_node"] for a in routing} == {True, False}  # head and worker node
    assert len({a["node"] for a in routing}) == 2
    dispatch = [a for a in actors if a["cls"].endswith("_DispatchActor")]
    models = config.load(job).models
    # One actor per catalog model, all from the one run, none restarted (a restart would
    # have made a second copy of that model's limits).
    assert len(dispatch) == len(models), dispatch
    assert len({a["job"] for a in dispatch}) == 1
    assert all(a["restarts"] == 0 for a in dispatch)

    listening = _listening(cluster)
    assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening
    exposed = [(name, ip) for name, ip in listening if not is_loopback(ip)]
    assert exposed == [], f"the cluster listens beyond loopback: {exposed}"

    two = _results(tmp_path / "runs" / "two-node")
    one = _results(tmp_path / "runs" / "one-node")
    assert len(two) == ROWS and two["request_id"].n_unique() == len(two) - _repeats(two)
    assert set(two["status"]) == {"ok", "rejected"}
    assert two.equals(one), _first_difference(two, one)
    assert len(set(two["model"].drop_nulls())) == len(models)


def _listening(cluster: Cluster) -> list[tuple[str, str]]:
    """(process name, address) of every listening TCP socket of the nodes' process trees."""
    import psutil

    found = []
    for p in cluster.procs:
        root = psutil.Process(p.pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [(proc.name(), c.laddr.ip) for c in proc.net_connections("tcp")
                          if c.status == psutil.CONN_LISTEN]
    return found


def _repeats(df: pl.DataFrame) -> int:
    # A repeated request_id is a row of its own (rejected as a duplicate), not a lost row.
    return len(df) - df["request_id"].n_unique()


def _first_difference(a: pl.DataFrame, b: pl.DataFrame) -> str:
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    for name in a.columns:
        if not a[name].equals(b[name]):
            i = next(i for i, (x, y) in enumerate(zip(a[name], b[name], strict=True)) if x != y)
            return f"column {name} differs first at row {i}: {a[name][i]!r} vs {b[name][i]!r}"
    return "equal"


def _worker_raylet(cluster: Cluster) -> Any:
    import psutil

    node = psutil.Process(cluster.procs[1].pid)
    (raylet,) = [p for p in node.children(recursive=True) if p.name() == "raylet"]
    return raylet


def test_losing_the_worker_node_during_routing_loses_and_duplicates_no_row(
        tmp_path: Path, roomy_cluster: Cluster) -> None:
    cluster = roomy_cluster
    sample.write(sample.generate(ROWS, seed=6), tmp_path / "in.parquet")
    cfg = MockProviderConfig(api_key=os.environ["BATCHROUTE_TEST_KEY"], seed=4)
    folder = tmp_path / "runs" / "lost-node"
    cli = [sys.executable, "-m", "batchroute"]
    with MockProvider(cfg) as provider:
        job = _job(tmp_path, provider.url)
        proc = subprocess.Popen([*cli, "run", str(job), "--run-id", "lost-node",
                                 "--ray-address", cluster.address], env=cluster.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not _routing(folder):
                assert proc.poll() is None and time.monotonic() < deadline, "never routed"
                time.sleep(0.05)
            time.sleep(1.0)  # routing actors started on both nodes
            _worker_raylet(cluster).kill()  # SIGKILL: the node is gone, its actors with it
            _, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # Ray restarts lost routing actors on the head, which has room for them, and their
        # shards are retried. What Ray cannot recover ends the run with exit 1 (a dispatch
        # actor on the lost node: its rows fail) or 3; the run's own resume then finishes it
        # from its last completed stage.
        assert proc.returncode in (0, 1, 3), err[-3000:]
        why = [line for line in err.splitlines() if "Error" in line or "error" in line]
        print(f"\nnode lost during routing: the run exited {proc.returncode}"
              + (f" ({why[-1].strip()[:300]})" if why else ""))
        if proc.returncode != 0:
            again = subprocess.run([*cli, "resume", str(folder), "--ray-address",
                                    cluster.address], env=cluster.env, capture_output=True,
                                   text=True, timeout=240, check=False)
            assert again.returncode == 0, again.stderr[-3000:]

    results = pl.read_parquet(folder / "results")
    wanted = pl.read_parquet(tmp_path / "in.parquet")["request_id"].value_counts()
    got = results["request_id"].value_counts()
    assert wanted.sort("request_id").equals(got.sort("request_id"))  # each id as often
    assert set(results["status"]) == {"ok", "rejected"}


def _routing(folder: Path) -> bool:
    if not (folder / "manifest.json").exists():
        return False
    try:
        stages = json.loads((folder / "manifest.json").read_text())["stages"]
    except json.JSONDecodeError:
        return False
    return "source" in stages and "plan" not in stages
