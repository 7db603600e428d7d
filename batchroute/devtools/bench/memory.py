"""``batchroute bench memory``: the whole job on N generated prompts, its peak memory and rate.

The input is generated, and the mock provider served, in processes of their own, so neither is
counted. The job runs as ``batchroute run`` in a child process that starts its own local Ray.
Its memory is sampled every half second over its whole process tree: the driver, Ray's GCS and
raylet, and every worker and actor.

The headline figure is the sum of PSS (proportional set size). Pages shared between
processes, such as Ray's object store and shared libraries, are split between the processes
that map them rather than counted once per process. The sum of RSS is reported beside it as an
upper bound.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAMPLE_S = 0.5
JOB = """\
[job]
name = "bench"
input = "{input}"
output = "{output}"
reference_model = "gpt-4-1106-preview"
{job_extra}
[[router.rules]]
name = "code"
contains_code = true
model = "claude-3-5-sonnet"

[[router.rules]]
name = "long-document"
min_chars = 2500
model = "claude-3-5-sonnet"

[dispatch]
batch_rows = 512
batches_in_flight = 4
max_attempts = 5
backoff_base_s = 0.05
backoff_max_s = 1.0
"""
# `--kind tickets`: the tickets job of jobs/classify-tickets.toml (a template over the table's
# columns, labels parsed into a column) on `batchroute sample --kind tickets`.
TICKETS_JOB = 'id_column = "ticket_id"\n'
TICKETS_TASK = """
[task]
system = "You label customer support tickets."
template = '''Subject: {{ subject }}

{{ body or "" }}'''
keep_columns = ["priority", "customer_tier"]

[task.output]
labels = ["billing", "bug", "how-to", "account", "other"]
retries_on_invalid = 1
"""
MODEL = """
[models."{name}"]
provider = "{provider}"
base_url = "{url}"
api_key_env = "BATCHROUTE_BENCH_KEY"
input_usd_per_mtok = {pin}
output_usd_per_mtok = {pout}
rpm = 10000000
tpm = 10000000000
concurrency = 128
context_window = 200000
{tier}"""
MODELS = (("mixtral-8x7b-instruct", "openai", 0.25, 0.75),
          ("claude-3-5-sonnet", "anthropic", 3.0, 15.0),
          ("gpt-4-1106-preview", "openai", 10.0, 30.0))


def memory(rows: int, *, workdir: str | None = None, kind: str = "prompts",
           tier: str = "sync") -> dict[str, Any]:
    """Run the job on ``rows`` generated rows of ``kind`` (prompts: the demo's queue;
    tickets: the tickets job), every model at ``tier`` (sync, or batch: the provider's batch
    API, against the mock's with a one-second batch); return rate and peak memory figures."""
    import psutil

    tmp = Path(workdir or tempfile.mkdtemp(prefix="batchroute-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "batchroute"]
    subprocess.run([*cli, "sample", "--kind", kind, "--out", str(tmp / "in.parquet"),
                    "--rows", str(rows)], check=True, stdout=subprocess.DEVNULL)
    tickets = kind == "tickets"
    key = f"sk-bench-{secrets.token_hex(8)}"
    env = {**os.environ, "BATCHROUTE_BENCH_KEY": key}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    batch = ["--batch-delay-s", "1"] if tier == "batch" else []
    mock = subprocess.Popen([*cli, "mock-provider", "--port", str(port),
                             "--api-key-env", "BATCHROUTE_BENCH_KEY", *batch],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        subprocess.run([*cli, "mock-provider", "--wait-ready", "--port", str(port)], check=True)
        url = f"http://127.0.0.1:{port}"
        text = JOB.format(input=tmp / "in.parquet", output=tmp / "runs",
                          job_extra=TICKETS_JOB if tickets else ""
                          ) + (TICKETS_TASK if tickets else "") + "".join(
            MODEL.format(name=n, provider=p, pin=i, pout=o,
                         url=url + ("/v1" if p == "openai" else ""),
                         tier='tier = "batch"\nbatch_discount = 0.5\n' if tier == "batch"
                         else "")
            for n, p, i, o in MODELS)
        (tmp / "job.toml").write_text(text)
        t0 = time.monotonic()
        job = subprocess.Popen([*cli, "run", str(tmp / "job.toml"), "--run-id", "bench"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
        peak_pss = peak_rss = peak_driver = 0
        peak_at, peak_parts = 0.0, {}
        driver = psutil.Process(job.pid)
        # One line per sample: when the peak happens and which process holds it is what
        # tells a fix where to look, not the peak alone.
        with (tmp / "memory-trace.jsonl").open("w") as trace:
            while job.poll() is None:
                pss, rss, own, parts = _tree_memory(driver)
                at = round(time.monotonic() - t0, 1)
                trace.write(json.dumps({"t": at, "pss_mib": round(pss / 2**20, 1),
                                        "parts": _mib(parts)}) + "\n")
                if pss > peak_pss:
                    peak_pss, peak_at, peak_parts = pss, at, parts
                peak_rss = max(peak_rss, rss)
                peak_driver = max(peak_driver, own)
                time.sleep(SAMPLE_S)
        wall = time.monotonic() - t0
        out = job.stdout.read() if job.stdout else ""
    finally:
        mock.terminate()
        mock.wait()
    manifest = json.loads((tmp / "runs" / "bench" / "manifest.json").read_text())
    mib = 2**20
    return {
        "rows": rows, "kind": kind, "exit_code": job.returncode, "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall, 1),
        "peak_pss_mib": round(peak_pss / mib, 1), "peak_rss_sum_mib": round(peak_rss / mib, 1),
        "peak_driver_rss_mib": round(peak_driver / mib, 1),
        "peak_at_s": peak_at, "peak_pss_by_process_mib": _mib(peak_parts),
        "counts": manifest.get("counts", {}), "workdir": str(tmp), "tier": tier,
        # Per batch-tier model: files, lines, and the actor's seconds writing + uploading
        # files (submit_s) and reading results into rows (read_s).
        "batches": {m: s["batch"] for m, s in (manifest.get("dispatch") or {}).items()
                    if s.get("batch")},
        "table": out.strip().splitlines()[-12:] if out else [],
    }


def _tree_memory(root: Any) -> tuple[int, int, int, dict[str, int]]:
    """(sum of PSS, sum of RSS, root's own RSS, PSS per process) over ``root`` and its
    descendants."""
    import psutil

    pss = rss = own = 0
    parts: dict[str, int] = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0, {}
    for p in procs:
        try:
            info = p.memory_full_info()
            label = "driver" if p.pid == root.pid else _label(p)
        except psutil.Error:  # exited between listing and reading
            continue
        one = getattr(info, "pss", info.rss)
        pss += one
        rss += info.rss
        parts[f"{label}[{p.pid}]"] = one
        if p.pid == root.pid:
            own = info.rss
    return pss, rss, own, parts


def _label(p: Any) -> str:
    """A short name for a process of the job: Ray names its workers ``ray::<task or actor>``
    and its daemons by their executable or script."""
    cmd: list[str] = p.cmdline()
    if not cmd:
        return str(p.name())
    if cmd[0].startswith("ray::"):
        return cmd[0]
    scripts = [Path(a).name for a in cmd if a.endswith(".py")]
    return scripts[0] if scripts else Path(cmd[0]).name


def _mib(parts: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 2**20, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
