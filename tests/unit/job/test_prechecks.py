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


def _corrupt_input(tmp_path: Path) -> Path:
    """A folder whose second file has a corrupt data page: the first file's rows are read,
    and a source shard written, before the second one fails."""
    from tests.helpers import corrupt_page

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["hi"]}), folder / "0.parquet")
    pq.write_table(pa.table({"request_id": [f"r{i}" for i in range(300)],
                             "prompt": [f"question {i} " * 20 for i in range(300)]}),
                   folder / "1.parquet", row_group_size=100)
    corrupt_page(folder / "1.parquet", 1, "prompt")
    return folder


@pytest.fixture
def ray_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run without an llm router needs Ray only from routing on, which a corrupt input
    never reaches."""
    monkeypatch.setattr(cluster, "start_ray", lambda *args, **kwargs: None)


def test_a_corrupt_page_leaves_no_run_folder(tmp_path: Path, ray_unused: None) -> None:
    from batchroute.stages.source import UnreadableInput

    folder = _corrupt_input(tmp_path)
    job = config.parse(demo_job_doc(folder, tmp_path / "runs", "http://127.0.0.1:1"))
    with pytest.raises(UnreadableInput, match=rf"{folder}/1\.parquet: row group 1 cannot be"):
        runner.run(job, run_id="r1", dry_run=True, progress=quiet_progress())
    assert not (tmp_path / "runs" / "r1").exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_corrupt_page_on_resume_removes_only_its_own_shards(tmp_path: Path,
                                                              ray_unused: None) -> None:
    from batchroute.routers import classifier as rt
    from batchroute.stages import source
    from batchroute.stages.manifest import Manifest
    from batchroute.stages.sink import RunFolder

    folder = _corrupt_input(tmp_path)
    job = config.parse(demo_job_doc(folder, tmp_path / "runs", "http://127.0.0.1:1"))
    run = RunFolder(str(tmp_path / "runs"), "r1")
    # A run that stopped before its plan was done, on this same input.
    Manifest.new(run, job=job.name, config_hash=job.config_hash,
                 router_version=rt.inspect(rt.read_bytes(job.router.path)).version,
                 input=job.input, input_fingerprint=source.open_input(job.input).fingerprint,
                 ).write(run)
    run.write_text("job.toml", "# as it started\n")
    with pytest.raises(source.UnreadableInput, match="row group 1"):
        runner.run(job, run_id="r1", dry_run=True, progress=quiet_progress())
    assert (tmp_path / "runs" / "r1" / "manifest.json").exists()
    assert (tmp_path / "runs" / "r1" / "job.toml").read_text() == "# as it started\n"
    assert not (tmp_path / "runs" / "r1" / "source").exists()
    assert len(Manifest.read(run).resumes) == 1  # the attempt is on record, nothing else


def test_the_cli_exits_2_naming_a_corrupt_file_and_row_group(
        tmp_path: Path, ray_unused: None, capsys: pytest.CaptureFixture[str]) -> None:
    from batchroute import cli
    from tests.helpers import to_toml

    folder = _corrupt_input(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(to_toml(demo_job_doc(folder, tmp_path / "runs", "http://127.0.0.1:1")))
    assert cli.main(["plan", str(job), "--run-id", "r1"]) == 2
    assert (f"batchroute: error: input file {folder}/1.parquet: row group 1 cannot be read"
            in capsys.readouterr().err)
    assert not (tmp_path / "runs" / "r1").exists()
