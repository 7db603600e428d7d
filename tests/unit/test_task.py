"""The [task] section: parsing and its refusals, rendering (the Arrow join and Jinja agree),
answers read into labels and typed objects, and the source stage over a user's own table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import config, task
from batchroute.errors import ConfigError, SchemaError
from batchroute.stages import source
from tests.helpers import job_doc

LABELS = ["billing", "bug", "how-to"]


def _parse(t: dict[str, Any], **job: Any) -> config.JobConfig:
    doc = job_doc()
    doc["task"] = t
    doc["job"].update(job)
    return config.parse(doc)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "needle"), [
    ({"template": "Subject: {{ subject }\n\n{{ body }}"},
     r"task\.template: syntax error at line 1, column 10: unexpected"),
    ({"template": "hi\n{% if x %}no end"}, r"task\.template: syntax error at line 2"),
    ({"template": "the same for every row"}, r"task\.template: names no input column"),
    ({"output": {"labels": []}}, r"task\.output\.labels: must be a non-empty list"),
    ({"output": {"labels": ["bug", "Bug"]}}, r"task\.output\.labels\[1\]: 'Bug' repeats"),
    ({"output": {"labels": ["bug", " "]}}, r"task\.output\.labels\[1\]: must be a non-blank"),
    ({"output": {"labels": ["a"], "json_schema": {}}}, r"labels or json_schema, not both"),
    ({"output": {"kind": "json"}}, r"task\.output\.json_schema: missing"),
    ({"output": {"labels": ["a"], "retries_on_invalid": -1}}, r"retries_on_invalid"),
    ({"output": {"json_schema": "no/such/file.json"}}, r"json_schema: file not found: .*file"),
    ({"output": {"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}},
     r"json_schema \(inline\): not a valid JSON Schema at properties/a/type"),
    ({"output": {"json_schema": {"type": "array", "items": {"type": "string"}}}},
     r"the top level must be type \"object\""),
    ({"output": {"json_schema": {"type": "object", "additionalProperties": False,
                                 "required": ["a"], "properties": {"a": {}}}}},
     r"properties\.a: needs one type"),
    ({"output": {"json_schema": {"type": "object", "properties": {"a": {"type": "string"}},
                                 "required": ["a"]}}},
     r"additionalProperties must be false; models\.cheap-model asks with OpenAI's strict"),
    ({"output": {"json_schema": {"type": "object", "additionalProperties": False,
                                 "properties": {"a": {"type": "string"}}}}},
     r"json_schema \(inline\)\.properties\.a: every property must be required"),
    ({"keep_columns": ["priority", "priority"]}, r"task\.keep_columns: a column is listed twice"),
    ({"keep_columns": ["status"]}, r"task\.keep_columns\[0\]: 'status' is already a results"),
    ({"keep_columns": ["label"]}, r"'label' is already a results column"),
    ({"templat": "{{ x }}"}, r"task\.templat: unknown key"),
])
def test_bad_task_sections_are_refused_naming_the_key(t: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _parse(t)


def test_a_json_schema_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "s.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{bad} is not valid JSON"):
        _parse({"output": {"json_schema": str(bad)}})


def test_other_job_keys_of_the_task() -> None:
    with pytest.raises(ConfigError, match=r"job\.id_column: 'model' is already a results"):
        _parse({}, id_column="model")
    doc = job_doc()
    doc["dispatch"]["escalate_on"] = ["invalid"]
    with pytest.raises(ConfigError, match=r"\"invalid\" needs \[task\.output\] labels"):
        config.parse(doc)
    doc["models"]["mid-model"]["structured_output"] = "vllm"
    with pytest.raises(ConfigError, match=r"structured_output: 'vllm' is not one of tool"):
        config.parse(doc)


def test_the_task_is_part_of_the_config_hash() -> None:
    a = _parse({"template": "{{ x }}"})
    assert a.config_hash == _parse({"template": "{{ x }}"}).config_hash
    assert a.config_hash != _parse({"template": "{{ x }}!"}).config_hash
    assert a.config_hash != _parse({"template": "{{ x }}", "output": {"labels": ["a"]}}
                                   ).config_hash


def test_nested_schemas_become_nested_columns() -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["lines", "who"],
              "properties": {
                  "lines": {"type": "array", "items": {
                      "type": "object", "additionalProperties": False,
                      "required": ["q", "what"],
                      "properties": {"q": {"type": "integer"}, "what": {"enum": ["a", "b"]}}}},
                  "who": {"type": ["string", "null"]}}}
    job = _parse({"output": {"json_schema": schema}})
    (f,) = task.result_fields(job.task.output)
    assert f.type == pa.struct([
        pa.field("lines", pa.list_(pa.struct([pa.field("q", pa.int64()),
                                              pa.field("what", pa.string())]))),
        pa.field("who", pa.string())])
    arr = task.values_array(job.task.output, [
        {"lines": [{"q": 2.0, "what": "a"}], "who": None, "extra": 1}, None])
    assert arr.to_pylist() == [{"lines": [{"q": 2, "what": "a"}], "who": None}, None]


# --- reading answers ----------------------------------------------------------------------


def test_labels_are_matched_trimmed_and_ignoring_case_and_nothing_else() -> None:
    p = task.OutputParser(task.OutputSpec(kind="labels", labels=("billing", "How-To")))
    assert p.parse(" how-to\n") == ("How-To", None)
    assert p.parse('{"label": "BILLING"}') == ("billing", None)
    assert p.parse('"billing"') == ("billing", None)
    for text in ("billing issue", "", "{}", '{"label": 3}', "billing, how-to"):
        value, why = p.parse(text)
        assert value is None and why is not None and "is not one of the labels" in why


def test_json_answers_are_validated_by_the_schema() -> None:
    spec = task.OutputSpec(kind="json", schema={
        "type": "object", "required": ["n", "d"],
        "properties": {"n": {"type": "integer", "minimum": 0},
                       "d": {"type": "string", "format": "date"}}})
    p = task.OutputParser(spec)
    assert p.parse('{"n": 3, "d": "2026-11-30"}') == ({"n": 3, "d": "2026-11-30"}, None)
    cases = {'{"n": 3': "not valid JSON", '{"n": -1, "d": "2026-11-30"}': "at n:",
             '{"n": 1}': "'d' is a required property", '{"n": 1, "d": "yesterday"}': "at d:",
             "[1]": "at (top)"}
    for text, needle in cases.items():
        value, why = p.parse(text)
        assert value is None and why is not None and needle in why, (text, why)


# --- rendering ------------------------------------------------------------------------------


def _render(template: str, columns: dict[str, pa.Array], *, jinja: bool = False
            ) -> tuple[list[str | None], list[str | None]]:
    r = task.Renderer(task.parse({"template": template}))
    if jinja:
        r._parts = None  # the per-row Jinja path the join stands in for
    prompts, reasons = r.render(columns)
    return prompts.to_pylist(), list(reasons)


def test_simple_templates_are_joined_by_arrow() -> None:
    assert task.Renderer(task.parse({"template": "S: {{ s }}\n{{ b or '' }} #{{ n }} "
                                                 "{{ b | default('-') }}"})).vectorised
    assert not task.Renderer(task.parse({"template": "{{ s | upper }}"})).vectorised
    assert not task.Renderer(task.parse({"template": "{% if b %}{{ b }}{% endif %}"})
                             ).vectorised


texts = st.one_of(st.none(), st.text(max_size=12))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(texts, texts, st.one_of(st.none(), st.integers(-10**12, 10**12))),
                min_size=1, max_size=8),
       st.sampled_from(["S: {{ s }}\n\n{{ b or '' }}", "{{ s }}-{{ n }}",
                        "{{ b | default('none', true) }}|{{ s | default('?') }}",
                        "x{{ s or \"y\" }}{{ n }}z\n"]))
def test_the_arrow_join_renders_exactly_what_jinja_renders(
        rows: list[tuple[str | None, str | None, int | None]], template: str) -> None:
    cols = {"s": pa.array([r[0] for r in rows], pa.string()),
            "b": pa.array([r[1] for r in rows], pa.string()),
            "n": pa.array([r[2] for r in rows], pa.int64())}
    names = task.parse({"template": template}).variables
    used = {k: cols[k] for k in names}
    assert _render(template, used) == _render(template, used, jinja=True)


def test_a_null_the_template_renders_rejects_the_row_naming_the_column() -> None:
    cols = {"s": pa.array(["a", None]), "b": pa.array([None, "x"])}
    for jinja in (False, True):
        prompts, reasons = _render("{{ s }}: {{ b or '' }}", cols, jinja=jinja)
        assert prompts == ["a: ", None]
        assert reasons[0] is None and reasons[1] is not None
        assert reasons[1].startswith("s is null and the template renders it")
    prompts, reasons = _render("{% if b %}[{{ b }}]{% endif %}{{ s or 'none' }}", cols)
    assert (prompts, reasons) == (["a", "[x]none"], [None, None])


def test_the_sandbox_refuses_unsafe_templates_row_by_row() -> None:
    prompts, reasons = _render("{{ s.__class__.__mro__ }}", {"s": pa.array(["a"])})
    assert prompts == [None] and "template failed on this row" in str(reasons[0])


# --- the source stage over a user's table ---------------------------------------------------


def _tickets(path: Path, **overrides: Any) -> None:
    cols: dict[str, Any] = {
        "ticket_id": pa.array([501, 502, 503, 502, 505], pa.int64()),
        "subject": ["refund", "crash", None, "dup", "login"],
        "body": ["charged twice", None, "x", "y", "z"],
        "priority": pa.array(["high", "low", "low", "low", "urgent"]).dictionary_encode(),
        "tier": pa.array([1, 2, 3, 1, 2], pa.int16()),
    }
    cols.update(overrides)
    pq.write_table(pa.table(cols), path)


def _task(template: str = "{{ subject }}\n{{ body or '' }}", keep: tuple[str, ...] = (
        "priority", "tier")) -> task.TaskConfig:
    return task.parse({"template": template, "keep_columns": list(keep)})


def test_a_table_without_a_prompt_column_becomes_requests_with_its_ids_and_columns(
        tmp_path: Path) -> None:
    _tickets(tmp_path / "t.parquet")
    data = source.open_input(str(tmp_path), id_column="ticket_id", task=_task())
    t = pa.concat_tables(source.read_requests(data))
    assert t.column("request_id").to_pylist() == ["501", "502", "503", "502", "505"]
    assert t.column("prompt").to_pylist() == ["refund\ncharged twice", "crash\n", None,
                                              "dup\ny", "login\nz"]
    reasons = t.column("reject_reason").to_pylist()
    assert reasons[0] is None and reasons[1] is None
    assert reasons[2].startswith("subject is null")
    assert reasons[3] == "duplicate ticket_id (first at input row 1)"
    # carried with their types: the integer id, a dictionary string decoded, an int16
    assert t.schema.field("ticket_id").type == pa.int64()
    assert t.schema.field("priority").type == pa.string()
    assert t.schema.field("tier").type == pa.int16()
    assert t.column("ticket_id").to_pylist() == [501, 502, 503, 502, 505]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"task": task.parse({"template": "{{ subject }} {{ sender }}"})},
     "template names column 'sender', which this file does not have"),
    ({"task": task.parse({"template": "{{ subject }}", "keep_columns": ["owner"]})},
     "task.keep_columns names column 'owner'"),
    ({"id_column": "case_id"}, "missing required column 'case_id' (job.id_column)"),
    ({"id_column": "score"}, "column 'score' has type double, expected a string or an integer"),
])
def test_a_table_that_does_not_fit_the_task_is_refused_naming_file_and_column(
        tmp_path: Path, kwargs: dict[str, Any], needle: str) -> None:
    _tickets(tmp_path / "t.parquet", score=[1.0, 2.0, 3.0, 4.0, 5.0])
    kwargs = {"id_column": "ticket_id", "task": _task(), **kwargs}
    with pytest.raises(SchemaError, match=json.dumps(needle)[1:-1].replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")) as err:
        source.open_input(str(tmp_path), **kwargs)
    assert str(tmp_path / "t.parquet") in str(err.value)


def test_kept_columns_need_one_type_over_every_file(tmp_path: Path) -> None:
    _tickets(tmp_path / "a.parquet")
    _tickets(tmp_path / "b.parquet", ticket_id=pa.array([1, 2, 3, 4, 6], pa.int32()),
             tier=pa.array([1, 2, 3, 4, 5], pa.int64()))
    data = source.open_input(str(tmp_path), id_column="ticket_id", task=_task())
    assert {f.name: f.type for f in data.carried} == {
        "ticket_id": pa.int64(), "priority": pa.string(), "tier": pa.int64()}
    _tickets(tmp_path / "b.parquet", tier=["one", "two", "three", "four", "five"])
    with pytest.raises(SchemaError, match=r"b\.parquet: column 'tier' has type string, but "
                                          r".*a\.parquet has int16"):
        source.open_input(str(tmp_path), id_column="ticket_id", task=_task())


def test_routing_sees_the_rendered_prompt_and_counts_the_system_prompt() -> None:
    from batchroute.stages.route import RouteSpec

    doc = job_doc()
    doc["task"] = {"system": "x" * 400, "template": "{{ subject }}",
                   "output": {"labels": LABELS}}
    job = config.parse(doc)
    spec = RouteSpec.from_job(job)
    schema = json.dumps(task.wire_schema(job.task.output).schema,  # type: ignore[union-attr]
                        separators=(",", ":"))
    assert spec.extra_chars == 400 + len(schema) and spec.extra_messages == 1


INVOICE = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "invoice.schema.json"
                      ).read_text())
GOOD_INVOICE = {"invoice_number": "INV-1", "invoice_date": "2026-11-30", "due_date": None,
                "vendor": "Acme", "currency": "EUR", "subtotal": 10.0, "tax": 2.0,
                "total": 12.0, "line_items": ["a"], "paid": False}
MUTATIONS = st.sampled_from([
    ("drop", None), ("extra", "x"), ("invoice_number", 7), ("invoice_date", "30/11/2026"),
    ("invoice_date", "2026-02-30"), ("due_date", "soon"), ("currency", "JPY"),
    ("subtotal", -1), ("subtotal", "10"), ("tax", None), ("total", True),
    ("line_items", [1]), ("line_items", "a"), ("paid", 0), ("paid", None)])


@settings(max_examples=200, deadline=None)
@given(st.lists(MUTATIONS, max_size=3), st.sampled_from(sorted(GOOD_INVOICE)))
def test_the_fast_validator_agrees_with_the_reference(
        mutations: list[tuple[str, Any]], dropped: str) -> None:
    import jsonschema

    answer = dict(GOOD_INVOICE)
    for key, value in mutations:
        if key == "drop":
            answer.pop(dropped, None)
        else:
            answer[key] = value
    parser = task.OutputParser(task.OutputSpec(kind="json", schema=INVOICE))
    assert parser._fast is not None  # the invoice schema takes the fast path
    cls = jsonschema.validators.validator_for(INVOICE)
    reference = cls(INVOICE, format_checker=cls.FORMAT_CHECKER).is_valid(answer)
    value, why = parser.parse(json.dumps(answer))
    assert (why is None) == reference, (answer, why)


def test_schemas_beyond_the_portable_keywords_are_checked_by_the_reference_alone() -> None:
    defs = {"type": "object", "$defs": {"n": {"type": "integer"}},
            "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"]}
    with_default = {"type": "object", "required": ["a"],
                    "properties": {"a": {"type": "string", "default": "x"}}}
    for schema in (defs, with_default):
        parser = task.OutputParser(task.OutputSpec(kind="json", schema=schema))
        assert parser._fast is None
        assert parser.parse("{}")[1] is not None  # a missing "a" is never filled in


def test_a_valid_answer_its_column_cannot_hold_is_unusable_not_a_failed_batch() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "s": {"type": "string"}}, "required": ["a"]}
    spec = task.OutputSpec(kind="json", schema=schema)
    p = task.OutputParser(spec)
    for text in ('{"a": 123456789012345678901234567890}', '{"a": 1, "s": "\\ud800"}'):
        value, why = p.parse(text)
        assert value is None and why is not None and "does not fit the output column" in why
    good, _ = p.parse('{"a": 1, "s": "x"}')
    arr = task.values_array(spec, [good, {"a": 10**30}])  # one bad value never sinks the rest
    assert arr.to_pylist() == [{"a": 1, "s": "x"}, None]


def test_kept_columns_may_not_take_a_name_the_job_uses_and_odd_files_unify(
        tmp_path: Path) -> None:
    for name in ("prompt", "max_tokens", "row", "model"):
        with pytest.raises(ConfigError, match=rf"'{name}' is already a results column"):
            _parse({"keep_columns": [name]})
    with pytest.raises(ConfigError, match=r"job\.id_column: 'row'"):
        _parse({}, id_column="row")
    # an all-null column takes the other file's type; uint64 beside int64 is refused
    pq.write_table(pa.table({"t": pa.array([1], pa.int64()), "b": ["x"],
                             "p": pa.nulls(1, pa.null())}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"t": pa.array([2], pa.int64()), "b": ["y"],
                             "p": pa.array([b"hi"], pa.binary())}), tmp_path / "2.parquet")
    data = source.open_input(str(tmp_path), id_column="t",
                             task=task.parse({"template": "{{ b }}", "keep_columns": ["p"]}))
    assert {f.name: f.type for f in data.carried} == {"t": pa.int64(), "p": pa.binary()}
    assert pa.concat_tables(source.read_requests(data)).column("p").to_pylist() == [None, b"hi"]
    pq.write_table(pa.table({"t": pa.array([2**63 + 5], pa.uint64()), "b": ["z"],
                             "p": ["q"]}), tmp_path / "3.parquet")
    with pytest.raises(SchemaError, match=r"column 't' has type uint64"):
        source.open_input(str(tmp_path), id_column="t",
                          task=task.parse({"template": "{{ b }}", "keep_columns": ["p"]}))
