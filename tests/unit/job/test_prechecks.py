"""What a run refuses before it takes the run folder's lock and before Ray starts: run ids
that are not one safe path segment, an output location that is a file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.errors import ConfigError
from batchroute.job import backfill, cluster, runner
from tests.helpers import demo_job_doc, quiet_progress


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-check that lets the run go on reaches Ray: fail loudly there instead."""
    def start_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster, "start_ray", start_ray)


def _job(tmp_path: Path, output: Path | str | None = None) -> config.JobConfig:
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["hi"]}), tmp_path / "in.parquet")
    return config.parse(demo_job_doc(tmp_path / "in.parquet", output or tmp_path / "runs",
                                     "http://127.0.0.1:1"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "..", ".", "x y", "x" * 256,
                                    "/abs"])
def test_a_run_id_that_is_not_one_path_segment_is_refused(tmp_path: Path, no_ray: None,
                                                          run_id: str) -> None:
    job = _job(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=r"--run-id: .* is not a single safe path segment"):
        runner.run(job, run_id=run_id, progress=quiet_progress())
    assert _files(tmp_path) == before  # no run folder, inside the output or outside it


def test_backfill_run_ids_stay_one_segment(tmp_path: Path) -> None:
    job = _job(tmp_path)
    run_id = backfill.run_id_for(job, "date", "2026-11-01", "bow/lr 1:04e9")
    assert config.check_segment(run_id, "run id") == run_id
    assert run_id == f"demo-date=2026-11-01-bow_lr_1_04e9-{job.config_hash[:8]}"
    assert backfill.run_id_for(job, "date", "2026-11-01", "bow-lr-1-04e9f125") == (
        f"demo-date=2026-11-01-bow-lr-1-04e9f125-{job.config_hash[:8]}")
    with pytest.raises(ConfigError, match=r"--partition-key: '\.\./day'"):
        backfill.backfill(job, "2026-11-01", "2026-11-01", key="../day")


def test_resume_names_the_run_folder_argument(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from batchroute import cli

    assert cli.main(["resume", f"{tmp_path}/runs/.."]) == 2
    assert "RUN_FOLDER (its last part, the run id): '..' is not a single safe path segment" \
        in capsys.readouterr().err


@pytest.mark.parametrize("where", ["output", "above", "run folder"])
def test_an_output_that_is_a_file_is_refused_before_ray(tmp_path: Path, no_ray: None,
                                                        where: str) -> None:
    output = {"output": tmp_path / "out.txt", "above": tmp_path / "out.txt" / "runs",
              "run folder": tmp_path / "runs"}[where]
    blocker = tmp_path / ("runs/r1" if where == "run folder" else "out.txt")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    job = _job(tmp_path, output)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=rf"\[job\]\.output \(or --output\) {output}: "
                                          rf"{blocker} is a file, not a folder"):
        runner.run(job, run_id="r1", progress=quiet_progress())
    assert _files(tmp_path) == before


def test_the_cli_exits_2_naming_an_output_that_is_a_file(
        tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    from batchroute import cli
    from tests.helpers import to_toml

    job = tmp_path / "job.toml"
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["hi"]}), tmp_path / "in.parquet")
    job.write_text(to_toml(demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs",
                                        "http://127.0.0.1:1")))
    (tmp_path / "taken").write_text("")
    assert cli.main(["run", str(job), "--output", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'taken'} is a file, not a folder" in err
    assert "internal error" not in err
