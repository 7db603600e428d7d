"""The public surface: schemas in sync with schemas/, a light import, helpful CLI help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import batchroute
from batchroute import cli, errors, schemas


def test_schema_files_match_the_code() -> None:
    for name, schema in schemas.ALL.items():
        path = schemas.SCHEMA_DIR / f"{name}.schema.json"
        assert json.loads(path.read_text()) == schemas.describe(name, schema), (
            f"{path} is stale: run `python -m batchroute.schemas`")
    assert sorted(p.name for p in schemas.SCHEMA_DIR.glob("*.json")) == sorted(
        f"{n}.schema.json" for n in schemas.ALL)


def test_public_names() -> None:
    assert batchroute.__all__ == [
        "BatchrouteError", "ConfigError", "DispatchError", "RouterError", "SchemaError",
        "SinkError", "TerminalDispatchError", "TransientDispatchError", "__version__"]


def test_importing_the_package_and_cli_stays_light() -> None:
    code = ("import sys, batchroute, batchroute.cli; "
            "heavy = [m for m in ('ray', 'onnxruntime', 'httpx', 'aiohttp', 'sklearn', 'polars')"
            " if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("err", [
    errors.ConfigError("models.x.rpm: bad"),
    errors.RateLimited("HTTP 429", status=429, retry_after_s=1.5),
    errors.AuthError("HTTP 401", status=401),
])
def test_errors_pickle_across_process_boundaries(err: errors.BatchrouteError) -> None:
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    if isinstance(err, errors.DispatchError):
        assert isinstance(back, errors.DispatchError)
        assert (back.status, back.retry_after_s) == (err.status, err.retry_after_s)


@pytest.mark.parametrize("command", ["run", "plan", "resume", "train", "score", "eval",
                                     "mock-provider", "sample"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("run", "plan", "train", "mock-provider", "exit codes"):
        assert word in out


def test_config_error_exits_2_with_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "j.toml"
    job.write_text("[job]\ninput = 'x'\nbogus = 1\n[models]\n")
    assert cli.main(["plan", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "job.bogus: unknown key" in err[0]
