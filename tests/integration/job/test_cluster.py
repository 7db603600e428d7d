"""The Ray a run starts for itself, in its own process: what it listens on.

Each test starts one local Ray of its own (a few seconds), in a subprocess, the way
``batchroute run`` without ``--ray-address`` does: the shared test session's Ray would say
nothing about a fresh one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.integration

# Starts Ray the job's way, makes it start a worker (an actor), and reports every listening
# socket of this process and its descendants: Ray's GCS, raylet, agents and workers.
_LISTENERS = """
import json, os
import psutil
from batchroute.job import cluster

cluster.start_ray(None, num_cpus=1)
ray = cluster.ray

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()  # held: an actor without a handle is reaped at once
ray.get(probe.pid.remote())
me = psutil.Process()
listening = []
for proc in [me, *me.children(recursive=True)]:
    try:
        conns = proc.net_connections(kind="inet")
        name = proc.name()
    except psutil.NoSuchProcess:
        continue
    listening += [[name, c.laddr.ip, c.laddr.port] for c in conns
                  if c.status == psutil.CONN_LISTEN]
print(json.dumps({"listening": listening,
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "auth": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment as a user's shell would have it: no cluster to join, no auth mode
    chosen (the test session's own Ray sets RAY_AUTH_MODE in this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1
    return addr.is_loopback


def test_the_embedded_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _LISTENERS], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    listening = report["listening"]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # found Ray's servers at all
    assert any(name.startswith("ray::Probe") for name in names), listening  # and a worker's
    exposed = [s for s in listening if not _is_loopback(s[1])]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    assert report["nodes"] == ["127.0.0.1"]
    assert report["auth"] == "token"  # loopback only, and still behind Ray's token
