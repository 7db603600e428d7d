"""A [task] that cannot work is refused by ``batchroute run`` with exit code 2 and one line
naming the key, column or file, before Ray starts and before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli
from batchroute.job import cluster
from tests.helpers import demo_job_doc, to_toml


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def start_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster, "start_ray", start_ray)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


GOOD = {"template": "{{ subject }}: {{ body }}", "keep_columns": ["priority"],
        "output": {"labels": ["billing", "bug"]}}
CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("syntax", {"template": "{{ subject }}\n{{ body"}, {},
     r"task.template: syntax error at line 2, column 1:"),
    ("unknown variable", {"template": "{{ subject }} {{ sender }}"}, {},
     r"in.parquet: [task] template names column 'sender'"),
    ("labels empty", {"output": {"labels": []}}, {}, r"task.output.labels: must be a non-empty"),
    ("labels repeated", {"output": {"labels": ["bug", "BUG"]}}, {},
     r"task.output.labels[1]: 'BUG' repeats labels[0]"),
    ("schema missing", {"output": {"json_schema": "nowhere.json"}}, {},
     r"task.output.json_schema: file not found"),
    ("schema not json", {"output": {"json_schema": "SCHEMA_FILE"}}, {}, r"is not valid JSON"),
    ("schema invalid", {"output": {"json_schema": {"type": "object", "required": "all"}}}, {},
     r"not a valid JSON Schema at required"),
    ("keep missing", {"keep_columns": ["owner"]}, {},
     r"in.parquet: task.keep_columns names column 'owner'"),
    ("id missing", {}, {"id_column": "case_id"}, r"in.parquet: missing required column 'case_id'"),
    ("id float", {}, {"id_column": "score"},
     r"in.parquet: column 'score' has type double, expected a string or an integer"),
    ("id list", {}, {"id_column": "tags_list"}, r"column 'tags_list' has type list<"),
]


@pytest.mark.parametrize(("task", "job", "needle"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_bad_task_exits_2_naming_what_is_wrong_and_writes_nothing(
        tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str],
        task: dict[str, Any], job: dict[str, Any], needle: str) -> None:
    pq.write_table(pa.table({"ticket_id": [1, 2], "subject": ["a", "b"], "body": ["x", "y"],
                             "priority": [1, 2], "score": [0.5, 0.7],
                             "tags_list": [["a"], ["b"]]}), tmp_path / "in.parquet")
    (tmp_path / "bad.json").write_text("{not json")
    doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", "http://127.0.0.1:1")
    doc["job"].update({"id_column": "ticket_id", **job})
    t = {**GOOD, **task}
    if t["output"].get("json_schema") == "SCHEMA_FILE":
        t["output"]["json_schema"] = str(tmp_path / "bad.json")
    doc["task"] = t
    (tmp_path / "job.toml").write_text(to_toml(doc))
    before = _files(tmp_path)
    assert cli.main(["run", str(tmp_path / "job.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("batchroute: error: ")
    assert needle in err, err
    assert _files(tmp_path) == before
