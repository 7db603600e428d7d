"""SIGKILL (and SIGTERM) a real run at random points, resume it, and check that nothing was
lost, nothing was written twice, and that the calls paid twice stay within what was in flight
at the kill plus one journal flush interval; two resumes at once: one writer."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.stages import journal
from tests.helpers import REPO, demo_job_doc, to_toml

pytestmark = pytest.mark.slow
N = 300  # about ten committed shards of BATCH_ROWS: kills land between shards and in them
# `batchroute ...` with every commit held open for 0.2 s between writing the temp file and
# moving it into place (RunFolder.before_commit), so that a kill can land mid-commit.
PAUSED_COMMITS = ("import sys, time\n"
                  "from batchroute.stages.sink import RunFolder\n"
                  "RunFolder.before_commit = lambda tmp, final: time.sleep(0.2)\n"
                  "from batchroute.cli import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")
BATCH_ROWS, IN_FLIGHT = 32, 2
CONCURRENCY = 4  # per model: at most this many calls in flight at a kill
RPM = 6000  # per model: 100 answers/s
MODELS = 3
# Paid twice at most: each model's calls in flight at the kill, and the answers of one journal
# flush interval (with a margin for the flusher's own turn). Committing only whole batches, a
# kill lost up to MODELS x IN_FLIGHT x BATCH_ROWS = 192 answers.
WINDOW = MODELS * (CONCURRENCY + math.ceil(RPM / 60 * journal.FLUSH_S * 2))
ARTIFACTS = Path(os.environ.get("BATCHROUTE_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _job(tmp: Path, url: str) -> Path:
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", url, rpm=RPM, concurrency=CONCURRENCY,
                       dispatch={"batch_rows": BATCH_ROWS, "batches_in_flight": IN_FLIGHT,
                                 "backoff_base_s": 0.01, "backoff_max_s": 0.05})
    path = tmp / "job.toml"
    path.write_text(to_toml(doc))
    return path


def _wait_for(stage: str, folder: Path, proc: subprocess.Popen[str], rng: random.Random,
              deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    target = rng.randint(1, 6)
    while time.monotonic() < end and proc.poll() is None:
        if stage == "routing" and (folder / "manifest.json").exists():
            stages = json.loads((folder / "manifest.json").read_text())["stages"]
            if "source" in stages:
                time.sleep(rng.uniform(0.0, 1.0))
                return
        if stage == "dispatch" and len(list((folder / "results").glob("part-*"))) >= target:
            return
        if stage == "commit" and len(list((folder / "results").glob("part-*"))) >= target \
                and any((folder / "_tmp").glob("*")):
            return  # a shard is half-committed: written under _tmp/, not yet moved
        time.sleep(0.02)
    pytest.fail(f"run ended or stalled before the {stage} stage (exit {proc.poll()})")


# Three seeds: kills once 4, 2 and 1 shards are committed, and 0.76, 0.57 and 0.09 s
# into routing (seeds 3 and 4 would repeat seed 1's shard). A torn journal write and a resume
# of journalled answers are also tested without Ray, in tests/unit/stages/test_journal.py.
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stage", ["routing", "dispatch", "commit"])
def test_kill_anywhere_then_resume(tmp_path: Path, stage: str, seed: int, api_key: str,
                                   ray_session: None) -> None:
    import ray

    _inputs(tmp_path)
    cfg = MockProviderConfig(latency_ms=20.0, api_key=api_key, seed=seed)
    with MockProvider(cfg) as provider:
        job = _job(tmp_path, provider.url)
        folder = tmp_path / "runs" / "k"
        env = {**os.environ, "BATCHROUTE_TEST_KEY": api_key}
        command = ["-c", PAUSED_COMMITS] if stage == "commit" else ["-m", "batchroute"]
        proc = subprocess.Popen(
            [sys.executable, *command, "run", str(job), "--run-id", "k",
             "--ray-address", ray.get_runtime_context().gcs_address],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        try:
            _wait_for(stage, folder, proc, random.Random(seed))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        time.sleep(1.0)  # let Ray reap the dead driver's actors before counting calls
        calls_before_resume = provider.stats()["requests"]
        assert cli.main(["resume", str(folder)]) == 0
        calls = provider.stats()["requests"]

    # Calls paid twice: everything the provider answered beyond the attempts on record.
    paid_twice = _check_complete(folder, calls)
    _record(f"kill -9 during {stage}", seed, paid_twice)
    assert 0 <= paid_twice <= WINDOW, (paid_twice, calls_before_resume)
    assert not any((folder / "_tmp").glob("*"))  # the half-committed shard was discarded
    assert not (folder / "journal").exists()  # committed, then cleared


def _record(case: str, seed: int, paid_twice: int) -> None:
    """Keep the paid-twice figure of every kill for the record (test-artifacts/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS / "paid-twice.jsonl").open("a") as f:
        f.write(json.dumps({"case": case, "seed": seed, "paid_twice": paid_twice,
                            "window": WINDOW}) + "\n")
    print(f"\n{case} seed {seed}: provider calls paid twice = {paid_twice} (window {WINDOW})")


def _start(job: Path, api_key: str, *command: str, capture: bool = True,
           log: Path | None = None) -> subprocess.Popen[str]:
    import ray

    out: Any = subprocess.PIPE if capture else subprocess.DEVNULL
    if log is not None:
        out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "batchroute", *command, "--ray-address",
         ray.get_runtime_context().gcs_address],
        env={**os.environ, "BATCHROUTE_TEST_KEY": api_key}, stdout=out, stderr=out, text=True)


def _inputs(tmp_path: Path) -> None:
    prompts = [f"Item {i}: summarise the status of ticket {i * 7}." for i in range(N)]
    pq.write_table(pa.table({"request_id": [f"k{i}" for i in range(N)], "prompt": prompts}),
                   tmp_path / "in.parquet")


def _check_complete(folder: Path, calls: int) -> int:
    """Exactly one ok row per input row, rollups equal to the rows; the calls paid twice."""
    results = pl.read_parquet(folder / "results")
    assert len(results) == N and results["request_id"].n_unique() == N
    assert set(results["status"]) == {"ok"}
    rollups = pl.read_parquet(folder / "rollups")
    assert rollups["rows"].sum() == N
    assert rollups["cost_micro_usd"].sum() == results["cost_micro_usd"].sum()
    return int(calls - results["attempts"].sum())


def test_two_resumes_at_once_have_one_writer(tmp_path: Path, api_key: str,
                                             ray_session: None) -> None:
    """An orchestrator's retry overlapping a hung run: of two resumes started together, one
    is refused at once (exit 2, naming the holder) and sends nothing; the other finishes."""
    _inputs(tmp_path)
    with MockProvider(MockProviderConfig(latency_ms=20.0, api_key=api_key, seed=9)) as provider:
        job = _job(tmp_path, provider.url)
        folder = tmp_path / "runs" / "k"
        proc = _start(job, api_key, "run", str(job), "--run-id", "k", capture=False)
        try:
            _wait_for("dispatch", folder, proc, random.Random(9))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        both = [_start(job, api_key, "resume", str(folder)) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in both]
        codes = sorted(p.returncode for p in both)
        calls = provider.stats()["requests"]
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = next(err for p, (_, err) in zip(both, outs, strict=True) if p.returncode == 2)
    assert "being written by another process" in refused and "pid " in refused
    assert len(refused.strip().splitlines()) == 1
    paid_twice = _check_complete(folder, calls)
    _record("kill -9 during dispatch, then two resumes at once", 9, paid_twice)
    assert 0 <= paid_twice <= WINDOW


@pytest.mark.parametrize(("sig", "seed"), [(signal.SIGTERM, 0), (signal.SIGTERM, 1),
                                           (signal.SIGINT, 2)])
def test_a_stop_signal_commits_what_was_answered(tmp_path: Path, sig: signal.Signals,
                                                 seed: int, api_key: str,
                                                 ray_session: None) -> None:
    """How Kubernetes, Airflow and systemd (SIGTERM) or a user (Ctrl-C) stop a job: exit 143
    or 130 (never 1, which means "some rows failed"), one line, every answer received so far
    committed; the resume pays for almost nothing twice."""
    _inputs(tmp_path)
    with MockProvider(MockProviderConfig(latency_ms=20.0, api_key=api_key,
                                         seed=seed)) as provider:
        job = _job(tmp_path, provider.url)
        folder = tmp_path / "runs" / "k"
        log = tmp_path / "run.log"
        proc = _start(job, api_key, "run", str(job), "--run-id", "k", log=log)
        try:
            _wait_for("dispatch", folder, proc, random.Random(seed))
            proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = log.read_text()
        assert proc.returncode == 128 + sig, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"batchroute: interrupted by {sig.name}") and "resume" in last
        assert "Traceback" not in err and "SIGTERM received" not in err
        committed = pl.read_parquet(folder / "results")
        assert len(committed) > 0 and committed["request_id"].n_unique() == len(committed)
        assert not (folder / "journal").exists()  # its answers are in results now
        assert cli.main(["resume", str(folder)]) == 0
        calls = provider.stats()["requests"]
    paid_twice = _check_complete(folder, calls)
    _record(f"{sig.name} during dispatch", seed, paid_twice)
    assert 0 <= paid_twice <= WINDOW
