"""The public surface: schemas in sync with schemas/, a light import, helpful CLI help."""

from __future__ import annotations

import argparse
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
    # Beside the tables' schemas: the example JSON Schema of jobs/extract-invoices.toml.
    examples = ["invoice.schema.json"]
    assert sorted(p.name for p in schemas.SCHEMA_DIR.glob("*.json")) == sorted(
        [f"{n}.schema.json" for n in schemas.ALL] + examples)


def test_public_names() -> None:
    assert batchroute.__all__ == [
        "BatchrouteError", "ConfigError", "DispatchError", "RouterError", "SchemaError",
        "SinkError", "TerminalDispatchError", "TransientDispatchError", "__version__"]


HEAVY = ("pyarrow", "numpy", "ray", "onnxruntime", "httpx", "aiohttp", "sklearn", "polars",
         "batchroute.devtools.sample", "batchroute.devtools.sample_tables")


def test_help_imports_nothing_heavy() -> None:
    """`batchroute --help` (the package, the CLI and its parser of every command) loads none
    of the data, model or network libraries, nor the sample corpus."""
    code = ("import contextlib, io, sys\n"
            "from batchroute.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
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


@pytest.mark.parametrize("command", ["run", "plan", "resume", "backfill", "learn", "train",
                                     "score", "eval", "calibrate", "report", "mock-provider",
                                     "sample"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_the_parser_has_every_command() -> None:
    """The parser's real subcommands, not words that the help text happens to contain."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"run", "plan", "resume", "backfill", "learn", "train", "score",
                             "eval", "calibrate", "memory", "static", "report", "bench",
                             "mock-provider", "sample"}
    bench = next(a for a in commands["bench"]._actions
                 if isinstance(a, argparse._SubParsersAction)).choices
    assert set(bench) == {"memory", "dispatch", "route", "similarity", "task", "cache",
                          "tiers", "quality"}


def test_every_parser_and_group_formats_its_help() -> None:
    """`--help` at every level, groups included (`bench --help` lists its commands' help
    strings, which argparse formats with %: a bare "95%" in one broke it)."""
    def walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, str]]:
        found = [(path, parser.format_help())]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found += walk(child, f"{path} {name}")
        return found

    helps = walk(cli.build_parser(), "batchroute")
    assert len(helps) > 20
    assert all(len(text) > 100 for _, text in helps), [p for p, t in helps if len(t) <= 100]


def test_top_level_help_names_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "exit codes" in capsys.readouterr().out


def test_config_error_exits_2_with_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "j.toml"
    job.write_text("[job]\ninput = 'x'\nbogus = 1\n[models]\n")
    assert cli.main(["plan", str(job)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "job.bogus: unknown key" in err[0]
