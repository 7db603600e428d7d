"""Backfill over date partitions: failed days do not stop others, done days are skipped, a
new router writes new runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli, config
from batchroute.devtools.mock_provider import MockProvider
from batchroute.errors import ConfigError
from batchroute.job import backfill
from tests.helpers import demo_job_doc, quiet_progress, to_toml

pytestmark = pytest.mark.integration


def _job(tmp: Path, url: str, router: str | None = None) -> dict[str, Any]:
    doc = demo_job_doc(tmp / "queue", tmp / "runs", url)
    if router:
        doc["router"]["path"] = router
    return doc


def test_backfill_days(tmp_path: Path, provider: MockProvider, ray_session: None,
                       capsys: pytest.CaptureFixture[str]) -> None:
    for day, n in (("2026-11-01", 40), ("2026-11-02", 30), ("2026-11-04", 20)):
        (tmp_path / "queue" / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.table({"request_id": [f"{day}-{i}" for i in range(n)],
                                 "prompt": [f"Question {i} of {day}?" for i in range(n)]}),
                       tmp_path / "queue" / f"date={day}" / "part-0.parquet")
    # One day is broken: its file has a mistyped column.
    pq.write_table(pa.table({"request_id": ["x"], "prompt": [1]}),
                   tmp_path / "queue" / "date=2026-11-02" / "part-1.parquet")
    job_file = tmp_path / "job.toml"
    job_file.write_text(to_toml(_job(tmp_path, provider.url)))

    assert cli.main(["backfill", str(job_file), "--from", "2026-11-01", "--to", "2026-11-04",
                     "--json"]) == 1
    first = {o["day"]: o for o in json.loads(capsys.readouterr().out)}
    assert [first[d]["status"] for d in sorted(first)] == ["done", "error", "no-input", "done"]
    assert "column 'prompt' has type int64" in first["2026-11-02"]["message"]
    assert (first["2026-11-01"]["ok"], first["2026-11-04"]["ok"]) == (40, 20)
    ok_run = tmp_path / "runs" / first["2026-11-01"]["run_id"]
    assert len(pl.read_parquet(ok_run / "results")) == 40

    # Second pass: finished days are skipped without a single call; the fixed day runs.
    (tmp_path / "queue" / "date=2026-11-02" / "part-1.parquet").unlink()
    sent = provider.stats()["requests"]
    job = config.load(job_file)
    again = {o.day: o for o in backfill.backfill(job, "2026-11-01", "2026-11-04",
                                                 progress=quiet_progress())}
    assert [again[d].status for d in sorted(again)] == ["skipped", "done", "no-input", "skipped"]
    assert provider.stats()["requests"] - sent == 30

    # A new router version writes new runs beside the old ones.
    model = onnx.load(config.BUNDLED_ROUTER)
    for p in model.metadata_props:
        if p.key == "version":
            p.value = "bow-lr-1-retrained"
    onnx.save(model, tmp_path / "new.onnx")
    newer = config.parse(_job(tmp_path, provider.url, router=str(tmp_path / "new.onnx")))
    third = backfill.backfill(newer, "2026-11-01", "2026-11-01",
                              progress=quiet_progress())
    assert third[0].status == "done" and "bow-lr-1-retrained" in third[0].run_id
    assert third[0].run_id != first["2026-11-01"]["run_id"]
    assert len(pl.read_parquet(ok_run / "results")) == 40  # the old run is untouched


def test_bad_dates_are_refused() -> None:
    with pytest.raises(ConfigError, match="use YYYY-MM-DD"):
        backfill.days("2026-13-01", "2026-13-02")
    with pytest.raises(ConfigError, match="is before --from"):
        backfill.days("2026-11-05", "2026-11-01")
    assert backfill.days("2026-11-30", "2026-12-01") == ["2026-11-30", "2026-12-01"]
