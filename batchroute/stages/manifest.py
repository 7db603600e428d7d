"""The run manifest: what a run folder holds, how far the run got, and whether it may resume.

One typed object, written as ``manifest.json`` in the run folder after every stage. The run
writes it; ``resume``, ``backfill``, ``report``, ``memory add --results`` and the benches read
it through :meth:`Manifest.read`, never by key. Keys a newer batchroute wrote and this one does
not know are kept through a rewrite (``extra``).
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from batchroute.errors import ConfigError
from batchroute.stages.lock import LOCK_ONLY
from batchroute.stages.sink import RunFolder

NAME = "manifest.json"
# Keys written only once the stage that sets them has run.
_SET_LATER = {"input_rows", "routing", "dispatch", "cost_usd", "finished_at", "quality"}
log = logging.getLogger("batchroute")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """A run's manifest. Only ``run_id`` is required when reading: the other keys default, so
    folders written by earlier versions (which lacked some of them) still read."""

    run_id: str
    job: str = ""
    job_file: str | None = None
    batchroute_version: str = ""
    config_hash: str = ""
    router_version: str = ""
    router_path: str | None = None
    router_stages: list[str] = field(default_factory=list)
    input: str = ""
    input_fingerprint: str = ""
    input_files: int = 0
    # Files the input folder or glob matched that are not Parquet, so were not read.
    input_skipped: list[str] = field(default_factory=list)
    started_at: str = ""
    price_date: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    # stage name -> {"state": "done", "at": time}, in the order the stages finished
    stages: dict[str, dict[str, str]] = field(default_factory=dict)
    # result rows by status: as planned after the plan, as rolled up after the rollup
    counts: dict[str, int] = field(default_factory=dict)
    input_rows: int | None = None
    routing: dict[str, Any] | None = None  # decided_by, route_cost_usd
    dispatch: dict[str, Any] | None = None  # each model's dispatcher counters
    cost_usd: float | None = None
    # The shadow checks ([quality]): retained quality, its interval, overhead, flagged
    quality: dict[str, Any] | None = None
    finished_at: str | None = None
    resumes: list[dict[str, Any]] = field(default_factory=list)
    # Calls billed whose answers were never used (lost in flight at a crash, malformed 2xx
    # replies), estimated from the request; per model and in all, over every attempt.
    unrecovered_cost_micro_usd: int = 0
    unrecovered_by_model: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, folder: RunFolder, **values: Any) -> Manifest:
        """A fresh run's manifest, with the folder's standard paths."""
        paths = {"source": folder.sub("source"), "routed": folder.sub("routed"),
                 "forecast": folder.sub("forecast.json"), "results": folder.sub("results"),
                 "rollups": folder.sub("rollups")}
        return cls(run_id=folder.run_id, started_at=now(), paths=paths, **values)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [f.name for f in fields(cls) if f.name in known and f.name not in doc
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"{NAME}: key {missing[0]!r} is missing")
        return cls(**{k: v for k, v in doc.items() if k in known},
                   extra={k: v for k, v in doc.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in _SET_LATER) or (
                    f.name == "resumes" and not value):
                continue  # absent until the stage that sets it has run
            doc[f.name] = value
        doc.update(self.extra)
        return doc

    @classmethod
    def read(cls, folder: RunFolder) -> Manifest | None:
        """The folder's manifest; None when the folder does not exist. Raises ConfigError for
        a folder that exists but is not a run folder, or whose manifest is unreadable."""
        if not folder.exists():
            return None
        if not folder.has(NAME):
            if folder.entries() <= LOCK_ONLY:
                return None  # locked (or started) by a run that had not written it yet
            raise ConfigError(f"{folder.uri} exists but holds no {NAME}: not a batchroute run "
                              "folder; choose another --run-id")
        try:
            return cls.from_json(folder.read_json(NAME))
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise ConfigError(f"{folder.sub(NAME)}: not a readable manifest ({exc})") from None

    def write(self, folder: RunFolder) -> None:
        folder.write_json(NAME, self.to_json())

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def mark_done(self, stage: str, folder: RunFolder) -> None:
        self.stages[stage] = {"state": "done", "at": now()}
        self.write(folder)

    @property
    def finished(self) -> bool:
        return self.done("rollup")

    @property
    def day(self) -> str:
        """The day the run's calls were priced (ISO)."""
        return self.price_date or self.started_at[:10]

    def check_resumable(self, *, config_hash: str, router_version: str, fingerprint: str,
                        force: bool, uri: str) -> None:
        """Refuse to resume under a changed config, router or input, unless ``force``.

        Raises ConfigError naming every change."""
        changes = [f"{what} changed ({was} -> {now_})" for what, was, now_ in (
            ("the job configuration", self.config_hash, config_hash),
            ("the router", self.router_version, router_version),
            ("the input", self.input_fingerprint, fingerprint),
        ) if was != now_]
        if changes and not force:
            raise ConfigError(f"cannot resume run {uri}: {'; '.join(changes)}. Rerun with "
                              "--force to resume it anyway, or choose a new --run-id")
        if changes:
            log.warning("resuming %s although %s (--force)", uri, "; ".join(changes))
