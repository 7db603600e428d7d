"""The Ray a run starts for itself, in its own process: what it listens on, and what a clean
run prints.

Each test starts one local Ray of its own (a few seconds), in a subprocess, the way
``batchroute run`` without ``--ray-address`` does: the shared test session's Ray would say
nothing about a fresh one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider
from tests.helpers import REPO, demo_job_doc, is_loopback, to_toml

pytestmark = pytest.mark.integration
# Ray's C++ log lines: "[date time,ms E pid tid] file.cc:line: ...", maybe after a "(process)" tag.
_RAY_CPP_ERROR = re.compile(r"^(\(\S+.*?\) )?\[[-\d :,]+ [EF] \d+ \d+\]")

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


def test_the_embedded_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _LISTENERS], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    listening = report["listening"]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # found Ray's servers at all
    assert any(name.startswith("ray::Probe") for name in names), listening  # and a worker's
    exposed = [s for s in listening if not is_loopback(s[1])]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    assert report["nodes"] == ["127.0.0.1"]
    assert report["auth"] == "token"  # loopback only, and still behind Ray's token


def test_a_clean_run_prints_no_ray_error_or_auth_notice(tmp_path: Path, api_key: str,
                                                        provider: MockProvider) -> None:
    sample.write(sample.generate(300, seed=5), tmp_path / "in.parquet")
    doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", provider.url)
    # Every routing actor's way of being built: the classifier's router through the object
    # store, and the llm stage's handle on the routing model's dispatch actor.
    doc["router"].update(
        stages=["rules", "classifier", "llm"], classifier={"uncertain": [0.55, 0.8]},
        llm={"model": "mixtral-8x7b-instruct", "default": "gpt-4-1106-preview",
             "labels": {"easy": "mixtral-8x7b-instruct", "medium": "mixtral-8x7b-instruct",
                        "hard": "gpt-4-1106-preview"}})
    job = tmp_path / "job.toml"
    job.write_text(to_toml(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "batchroute", "run", str(job), "--run-id", "quiet",
         "--num-cpus", "2"],
        capture_output=True, text=True, env=_env(BATCHROUTE_TEST_KEY=api_key), cwd=tmp_path,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: routed 300/300" in proc.stderr  # the progress lines are still there
    # Python's loggers say ERROR; Ray's C++ logs say E (or F) after the timestamp.
    errors = [line for line in proc.stderr.splitlines()
              if "ERROR" in line or "Traceback" in line or _RAY_CPP_ERROR.match(line)]
    assert errors == []
    assert "Token authentication" not in proc.stderr
    manifest = json.loads((tmp_path / "runs" / "quiet" / "manifest.json").read_text())
    assert manifest["dispatch"]["mixtral-8x7b-instruct"]["asked"] > 0  # the llm stage ran
