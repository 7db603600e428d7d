"""Progress: a live table on a terminal, plain periodic log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


class Progress:
    """Collects counters from the driver loop and shows them at most every ``interval`` s."""

    def __init__(self, stream: TextIO = sys.stderr, *, interval_s: float | None = None,
                 live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.interval_s = interval_s if interval_s is not None else (0.25 if self.live else 5.0)
        self.phase = "starting"
        self.total_rows = 0
        self.routed = 0
        self.planned: dict[str, int] = {}
        self.models: dict[str, Mapping[str, Any]] = {}
        self._last = 0.0
        self._t0 = time.monotonic()
        self._live: Any = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render(), console=Console(file=self.stream),
                              refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        if self._live is not None:
            self._live.update(self._render())
        else:
            self._emit()

    def _emit(self) -> None:
        t = time.monotonic() - self._t0
        parts = [f"[{t:6.1f}s] {self.phase}: routed {self.routed}/{self.total_rows}"]
        for name, s in self.models.items():
            parts.append(f"{name} {s.get('done', 0)}/{self.planned.get(name, 0)} "
                         f"ok={s.get('ok', 0)} failed={s.get('failed', 0)} "
                         f"429s={s.get('rate_limited', 0)} ${s.get('cost_usd', 0.0):.4f}"
                         + batch_line(s.get("batch")))
        print(" | ".join(parts), file=self.stream, flush=True)

    def _render(self) -> Any:
        from rich.table import Table

        t = time.monotonic() - self._t0
        table = Table(title=f"batchroute: {self.phase}  ({t:.0f}s, routed "
                            f"{self.routed}/{self.total_rows})", title_justify="left")
        for col in ("model", "done", "planned", "ok", "failed", "429s", "retries", "cost $"):
            table.add_column(col, justify="left" if col == "model" else "right")
        errors = 0
        for name in self.planned:
            s = self.models.get(name, {})
            errors += int(s.get("failed", 0))
            table.add_row(name, str(s.get("done", 0)), str(self.planned[name]),
                          str(s.get("ok", 0)), str(s.get("failed", 0)),
                          str(s.get("rate_limited", 0)), str(s.get("retries", 0)),
                          f"{s.get('cost_usd', 0.0):.4f}")
        batches = [f"{name}{batch_line(self.models.get(name, {}).get('batch'))}"
                   for name in self.planned if self.models.get(name, {}).get("batch")]
        table.caption = "\n".join([f"errors so far: {errors}", *batches])
        return table


def batch_line(batch: Mapping[str, Any] | None) -> str:
    """A batch-tier model's batches: by status, lines, and the time left to the deadline."""
    if not batch:
        return ""
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(batch["batches_by_status"].items()))
    left = ""
    if batch.get("deadline"):
        from datetime import UTC, datetime

        seconds = (datetime.fromisoformat(batch["deadline"]) - datetime.now(UTC)).total_seconds()
        left = (f", deadline in {seconds / 60:.0f} min" if seconds > 0
                else ", deadline passed: the rest goes sync")
    return (f" [batches: {statuses or 'none yet'}; {batch['files']} files, "
            f"{batch['lines_submitted']} lines sent, {batch['succeeded']} answered, "
            f"{batch['errored']} errored{left}]")
