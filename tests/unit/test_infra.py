"""infra/ stays deployable: every YAML parses, every command it or the Airflow DAG runs is a
real batchroute command naming a job file that exists, and the image installs the package."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from batchroute import cli
from tests.helpers import REPO

INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"


def _workdir() -> PurePosixPath:
    """The image's last WORKDIR: where the repository copy (and jobs/) lives."""
    found = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert found, "infra/Dockerfile sets no WORKDIR"
    return PurePosixPath(found[-1])


def _check_batchroute_command(command: str, *, commands: set[str]) -> Any:
    """Parse ``command`` with the CLI's own parser; check the job file it names exists in the
    repository (as the image lays it out). Returns the parsed arguments."""
    argv = shlex.split(command)
    assert argv[0] == "batchroute", command
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse reports an unknown flag or command by exiting
        pytest.fail(f"not a valid batchroute command ({exc}): {command}")
    assert args.command in commands, command
    job = PurePosixPath(args.job)
    if job.is_absolute():
        assert job.is_relative_to(_workdir()), f"{job} is outside the image's WORKDIR"
        job = job.relative_to(_workdir())
    path = REPO / job
    assert path.is_file(), f"{command!r} names {job}, which the repository lacks"
    tomllib.loads(path.read_text())
    return args


def test_infra_holds_the_deployment_files() -> None:
    names = {p.name for p in INFRA.iterdir()}
    assert {"Dockerfile", "cluster-aws.yaml", "rayjob.yaml", "airflow_nightly.py"} <= names


@pytest.mark.parametrize("path", sorted(INFRA.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_rayjob_entrypoint_is_a_real_run_command() -> None:
    (doc,) = yaml.safe_load_all((INFRA / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    args = _check_batchroute_command(doc["spec"]["entrypoint"], commands={"run"})
    assert args.run_id and args.input and not args.dry_run
    cluster = doc["spec"]["rayClusterSpec"]
    assert set(cluster) >= {"headGroupSpec", "workerGroupSpecs"}


def test_rayjob_keys_come_from_a_secret_on_every_pod() -> None:
    (doc,) = yaml.safe_load_all((INFRA / "rayjob.yaml").read_text())
    cluster = doc["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]]
    job = tomllib.loads((REPO / "jobs" / "nightly-summarise.toml").read_text())
    needed = {m["api_key_env"] for m in job["models"].values()}
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert needed <= set(env), container["name"]
            for name in needed:
                assert "value" not in env[name], f"{name} is a literal in {container['name']}"
                assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name


def test_rayjob_and_launcher_run_the_rays_the_image_pins() -> None:
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert pinned
    assert pinned.group(1) == version("ray")  # the Ray the tests run with
    (rayjob,) = yaml.safe_load_all((INFRA / "rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pinned.group(1)
    launcher = yaml.safe_load((INFRA / "cluster-aws.yaml").read_text())
    assert launcher["provider"]["type"] == "aws"
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any(t.get("max_workers", 0) > 0 for t in launcher["available_node_types"].values())


def test_the_dockerfile_installs_the_package_on_the_ray_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-cpu\b", text,
                     flags=re.MULTILINE)
    joined = text.replace("\\\n", " ")
    installs = [line for line in joined.splitlines() if line.startswith("RUN")
                and "pip install" in line]
    assert installs, "no pip install step"
    # The install names the package: the repository copy (./, holding pyproject.toml whose
    # project is batchroute), and checks the console script it provides.
    assert any(re.search(r"pip install\b[^&]*\s\./?(\s|$)", line) for line in installs)
    assert any("batchroute --help" in line for line in installs)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, flags=re.MULTILINE)
    sources = {s for line in copied for s in line.split()}
    assert {"pyproject.toml", "batchroute", "jobs"} <= sources
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "batchroute"


def test_the_airflow_dag_submits_real_commands() -> None:
    source = (INFRA / "airflow_nightly.py").read_text()
    tree = ast.parse(source)  # a syntax check without importing Airflow
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(t := node.targets[0], ast.Name) and t.id.isupper()
              and not isinstance(node.value, ast.JoinedStr)
              and _literal(node.value)}
    job_file = consts["JOB_FILE"]
    rendered = {}
    for name in ("NIGHTLY_ENTRYPOINT", "BACKFILL_ENTRYPOINT"):
        node = next(n for n in tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", None) == name)
        text = _fstring_text(node.value, {"JOB_FILE": job_file})
        # Render Airflow's templates the way a run on 2026-11-28 would.
        text = (text.replace("{{ ds }}", "2026-11-28")
                .replace("{{ params['from'] }}", "2026-11-01")
                .replace("{{ params['to'] }}", "2026-11-07"))
        assert "{{" not in text, text
        rendered[name] = text
    nightly = _check_batchroute_command(rendered["NIGHTLY_ENTRYPOINT"], commands={"run"})
    assert nightly.run_id == "nightly-summarise-2026-11-28"
    backfill = _check_batchroute_command(rendered["BACKFILL_ENTRYPOINT"],
                                         commands={"backfill"})
    assert (backfill.start, backfill.end) == ("2026-11-01", "2026-11-07")


def _literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def _fstring_text(node: ast.expr, names: dict[str, str]) -> str:
    """The text of a string expression built from literals, f-strings and known names."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_fstring_text(v, names) for v in node.values)
    if isinstance(node, ast.FormattedValue) and isinstance(node.value, ast.Name):
        return names[node.value.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _fstring_text(node.left, names) + _fstring_text(node.right, names)
    raise AssertionError(f"cannot read the string at line {node.lineno}")
