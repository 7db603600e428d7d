"""One writer per run folder.

Two processes writing one run folder (an orchestrator's retry overlapping a hung run, two
operators) would both pay for every call and interleave their shards. So ``run``, ``plan`` and
``resume`` hold an exclusive lock on the folder for as long as they write it, taken before
anything is sent or written, and a second writer is refused at once (exit 2) with the holder's
pid, host and start time.

The lock dies with its holder, so a killed run never leaves a stale lock that blocks its
resume:
- on a local (or NFS/POSIX) filesystem it is ``flock`` on ``RUN/.lock``, which the kernel
  releases when the holding process exits, however it exits (``kill -9`` included);
- on an object store, where nothing can hold a file open, it is a lease object
  (``RUN/_lease.json``: owner, host, pid, start, expiry) that the holder renews every
  ``LEASE_S / 3`` seconds from a background thread. A holder that dies stops renewing and its
  lease lapses after ``LEASE_S``. Object stores offer no create-if-absent through pyarrow's
  filesystems, so two writers starting within the same second can both read "no lease": the
  second one's write is then seen by the first at its next renewal, which then stops. That
  window is the lease's known limit; the local lock has none.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from batchroute.errors import ConfigError
from batchroute.stages.sink import TMP, RunFolder

LOCK_FILE = ".lock"
LEASE_FILE = "_lease.json"
LEASE_S = 60.0
# What a run folder holds once locked and before its manifest is first written.
LOCK_ONLY = frozenset({LOCK_FILE, LEASE_FILE, TMP})


class RunFolderLocked(ConfigError):
    """The run folder is being written by another process (exit code 2)."""


class RunLock:
    """Exclusive, self-releasing ownership of one run folder. Use as a context manager, or
    :meth:`acquire` then :meth:`release`."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                      "writer": folder.writer}
        self._fd: int | None = None
        self._lease: _Lease | None = None

    def acquire(self) -> None:
        """Take the lock, creating the run folder if needed. Raises RunFolderLocked (naming
        the holder) when another process holds it."""
        self.folder.fs.create_dir(self.folder.path, recursive=True)
        if isinstance(self.folder.fs, pafs.LocalFileSystem):
            self._flock()
        else:
            self._lease = _Lease(self.folder, self.owner)
            self._lease.acquire()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _flock(self) -> None:
        import fcntl

        path = self.folder.sub(LOCK_FILE)
        # Not inherited by child processes (os.open's default): a Ray daemon started by this
        # driver must not keep the lock alive after the driver dies.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except (OSError, ValueError):
                holder = {}  # the holder is between taking the lock and writing its name
            os.close(fd)
            raise RunFolderLocked(_held(self.folder, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.owner).encode(), 0)
        self._fd = fd


class _Lease:
    """The object-store lock: a lease object renewed by a daemon thread."""

    def __init__(self, folder: RunFolder, owner: dict[str, Any]) -> None:
        self.folder = folder
        self.owner = {**owner, "lease_id": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        held = self._read()
        if held and held.get("lease_id") != self.owner["lease_id"] \
                and float(held.get("expires_at", 0)) > time.time():
            raise RunFolderLocked(_held(self.folder, held))
        self._write()
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held and held.get("lease_id") == self.owner["lease_id"]:
            with contextlib.suppress(OSError):
                self.folder.fs.delete_file(self.folder.sub(LEASE_FILE))

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            held = self._read()
            if held and held.get("lease_id") != self.owner["lease_id"]:
                return  # another writer took over a lapsed lease: stop claiming the folder
            with contextlib.suppress(OSError):
                self._write()

    def _read(self) -> dict[str, Any] | None:
        if not self.folder.has(LEASE_FILE):
            return None
        try:
            doc: dict[str, Any] = json.loads(self.folder.read_text(LEASE_FILE))
        except (OSError, ValueError):
            return None
        return doc

    def _write(self) -> None:
        self.folder.write_json(LEASE_FILE, {**self.owner, "expires_at": time.time() + LEASE_S})


def _held(folder: RunFolder, holder: dict[str, Any]) -> str:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
           f"{holder.get('started_at', '?')}")
    return (f"run folder {folder.uri} is being written by another process ({who}); "
            "wait for it to finish, or stop it, before running or resuming this run again")
