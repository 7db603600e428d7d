"""One writer per run folder: a second process is refused at once with the holder named; the
lock dies with its holder; the object-store lease; shard names that never collide."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from batchroute.stages import lock
from batchroute.stages.lock import RunFolderLocked, RunLock
from batchroute.stages.sink import ResultSink, RunFolder
from tests.unit.stages.test_rollup_plan import _RecordingFS

HOLD = """
import sys
from batchroute.stages.lock import RunLock
from batchroute.stages.sink import RunFolder
RunLock(RunFolder(sys.argv[1], "run")).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _holder(tmp_path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunFolderLocked) as refused:
            RunLock(RunFolder(str(tmp_path), "run")).acquire()
        assert time.monotonic() - start < 1.0
        message = str(refused.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "started 20" in message and refused.value.exit_code == 2
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_dies_with_its_holder_even_under_kill_9(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(RunFolder(str(tmp_path), "run")) as held:  # no stale lock
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
        assert held.owner["pid"] == os.getpid()


def test_the_lock_is_released_for_the_next_run_of_the_same_process(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path), "run")
    # flock is per open file, so even a second lock in the same process is refused.
    with RunLock(folder), pytest.raises(RunFolderLocked):
        RunLock(RunFolder(str(tmp_path), "run")).acquire()
    with RunLock(RunFolder(str(tmp_path), "run")):
        pass


def test_on_an_object_store_a_lease_refuses_a_second_writer_until_it_lapses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = pafs.PyFileSystem(_RecordingFS())  # not a LocalFileSystem: no flock there
    first = RunLock(RunFolder(str(tmp_path), "run", fs=fs))
    first.acquire()
    try:
        with pytest.raises(RunFolderLocked, match=f"pid {os.getpid()}"):
            RunLock(RunFolder(str(tmp_path), "run", fs=fs)).acquire()
    finally:
        first.release()
    assert not (tmp_path / "run" / lock.LEASE_FILE).exists()
    # A holder that died: its lease is still there, but lapsed.
    (tmp_path / "run" / lock.LEASE_FILE).write_text(json.dumps(
        {"pid": 1, "host": "gone", "lease_id": "x", "expires_at": time.time() - 1}))
    with RunLock(RunFolder(str(tmp_path), "run", fs=fs)):
        pass


def test_two_writers_never_commit_a_shard_under_one_name(tmp_path: Path) -> None:
    one, two = RunFolder(str(tmp_path), "run"), RunFolder(str(tmp_path), "run")
    sinks = [ResultSink(one), ResultSink(two)]  # e.g. the lock bypassed: both count from 0
    for sink in sinks:
        sink.write(pa.table({"request_id": ["a"], "status": ["ok"]}))
    names = sorted(p.name for p in (tmp_path / "run" / "results").iterdir())
    assert len(names) == 2 and names == sorted([one.shard_name(0), two.shard_name(0)])


def test_the_manifest_round_trips_and_keeps_keys_it_does_not_know(tmp_path: Path) -> None:
    from batchroute.stages.manifest import Manifest

    folder = RunFolder(str(tmp_path), "run")
    m = Manifest.new(folder, job="j", input="in.parquet")
    m.unrecovered_by_model = {"a": 5}
    doc = {**m.to_json(), "from_a_newer_version": {"x": 1}}
    back = Manifest.from_json(doc)
    assert back.to_json() == doc and back.unrecovered_by_model == {"a": 5}
    assert "dispatch" not in doc and "finished_at" not in doc  # absent until their stage ran
    with pytest.raises(Exception, match="run_id"):
        Manifest.from_json({"job": "j"})
