"""``batchroute backfill``: one run per date partition of the input, resumable as a whole.

The input is a Hive-partitioned tree (``<input>/date=2026-11-01/...``). Each day becomes its
own run whose id names the day, the router version and the config hash, so:
- a day already complete under the same router and config is skipped;
- a day that stopped half-way, or has failed rows, is resumed (ok rows are kept);
- a new router or config writes new runs and never touches old results.
One day's failure (bad input, missing key, ...) is recorded and the next day goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow.fs as pafs

from batchroute.config import JobConfig, check_segment
from batchroute.errors import BatchrouteError, ConfigError
from batchroute.job import runner
from batchroute.job.progress import Progress
from batchroute.routers import classifier as rt
from batchroute.stages.manifest import Manifest
from batchroute.stages.sink import RunFolder

log = logging.getLogger("batchroute")


@dataclass(frozen=True)
class DayOutcome:
    day: str
    run_id: str
    status: str  # done | skipped | no-input | error
    ok: int = 0
    failed: int = 0
    rejected: int = 0
    cost_usd: float = 0.0
    message: str = ""


def days(start: str, end: str) -> list[str]:
    """Every ISO date from start to end inclusive. Raises ConfigError for bad dates."""
    try:
        first, last = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    except ValueError as exc:
        raise ConfigError(f"--from/--to: {exc} (use YYYY-MM-DD)") from None
    if last < first:
        raise ConfigError(f"--to {end} is before --from {start}")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def run_id_for(job: JobConfig, key: str, day: str, router_version: str) -> str:
    # The version is whatever the router file's metadata says: only its safe characters go
    # into the run folder's name (the job name and key are checked, the rest are digits).
    version = re.sub(r"[^A-Za-z0-9._=-]", "_", router_version)
    return f"{job.name}-{key}={day}-{version}-{job.config_hash[:8]}"


def backfill(job: JobConfig, start: str, end: str, *, key: str = "date",
             ray_address: str | None = None, num_cpus: int | None = None,
             progress: Progress | None = None, force: bool = False) -> list[DayOutcome]:
    """Run (or resume, or skip) one run per day; never raises for a single day's failure."""
    check_segment(key, "--partition-key")
    version = rt.inspect(rt.read_bytes(job.router.path), path=job.router.path).version
    root = job.input.rstrip("/")
    outcomes = []
    for day in days(start, end):
        run_id = run_id_for(job, key, day, version)
        partition = f"{root}/{key}={day}"
        folder = RunFolder(job.output, run_id)
        manifest = Manifest.read(folder) if folder.has("manifest.json") else None
        if manifest is not None and manifest.finished and not manifest.counts.get("failed"):
            outcomes.append(_summary(day, run_id, "skipped", manifest))
            continue
        if not _exists(partition):
            outcomes.append(DayOutcome(day, run_id, "no-input",
                                       message=f"no partition {partition}"))
            continue
        try:
            out = runner.run(replace(job, input=partition), run_id=run_id,
                             ray_address=ray_address, num_cpus=num_cpus, force=force,
                             progress=progress or Progress())
            outcomes.append(_summary(day, run_id, "done", out.manifest))
        except BatchrouteError as exc:
            log.error("backfill %s failed: %s", day, exc)
            outcomes.append(DayOutcome(day, run_id, "error", message=str(exc)))
        except Exception as exc:  # one bad day must not cost the other days their run
            log.exception("backfill %s failed unexpectedly", day)
            outcomes.append(DayOutcome(day, run_id, "error",
                                       message=f"internal error: {type(exc).__name__}: {exc}"))
    return outcomes


def _exists(uri: str) -> bool:
    fs, path = (pafs.FileSystem.from_uri(uri) if "://" in uri
                else (pafs.LocalFileSystem(), uri))
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def _summary(day: str, run_id: str, status: str, manifest: Manifest) -> DayOutcome:
    counts = manifest.counts
    cost = float(manifest.cost_usd or 0.0)
    return DayOutcome(day, run_id, status, ok=int(counts.get("ok", 0)),
                      failed=int(counts.get("failed", 0)),
                      rejected=int(counts.get("rejected", 0)), cost_usd=cost)


def format_outcomes(outcomes: list[DayOutcome]) -> str:
    lines = [f"{'day':<12}{'status':<10}{'ok':>8}{'failed':>8}{'rejected':>9}{'cost $':>11}  run"]
    for o in outcomes:
        lines.append(f"{o.day:<12}{o.status:<10}{o.ok:>8}{o.failed:>8}{o.rejected:>9}"
                     f"{o.cost_usd:>11.4f}  {o.run_id}" + (f"\n{'':12}{o.message}"
                                                           if o.message else ""))
    return "\n".join(lines)


def as_json(outcomes: list[DayOutcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]
