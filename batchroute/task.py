"""The job's task: what every row asks, and what it wants back.

A ``[task]`` section declares a job over the user's own table rather than a ready-made
``prompt`` column::

    [task]
    system = "You label support tickets."
    template = "Subject: {{ subject }}\\n\\n{{ body or '' }}"
    keep_columns = ["priority"]

    [task.output]
    labels = ["billing", "bug", "how-to", "account", "other"]   # or json_schema = "x.json"
    retries_on_invalid = 1

This module is the one home of that contract:

- :func:`parse` turns the section into a frozen :class:`TaskConfig`, refusing what cannot work
  (a template syntax error, an empty or repeated label, a JSON schema that is missing, not JSON,
  not a JSON Schema, or that no wire can carry) with a :class:`ConfigError` naming the key;
- :class:`Renderer` renders the template over a batch of input columns (Jinja2's sandbox, with
  undefined names an error). Templates that only join columns and text, the common case, are
  rendered by Arrow's string kernels over the whole batch, identically;
- :class:`OutputParser` reads an answer into a label or a typed object, validated by the
  ``jsonschema`` library, and says why an answer is unusable;
- :func:`wire_schema` is what the dispatcher asks each provider for (OpenAI strict
  ``response_format``, Anthropic's forced tool, vLLM's structured outputs), and
  :func:`result_fields` the columns the answers land in (``label``, or the ``output`` struct).

A null in a column the template renders rejects the row, naming the column, unless the
template says what to render instead: ``{{ body or "" }}`` or ``{{ body | default("") }}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchroute.errors import ConfigError

KINDS = ("text", "labels", "json")
LABEL_FIELD = "label"  # the property a labels answer carries on json-schema wires
# The results columns parsed answers land in, per output kind.
LABEL_COLUMN = "label"
OUTPUT_COLUMN = "output"
# How a model is asked for structured output, per wire (models.NAME.structured_output).
STRUCTURED = ("json_schema", "tool", "vllm", "vllm-guided")
MAX_SHOWN = 120  # characters of an unusable answer quoted in its error message


@dataclass(frozen=True)
class OutputSpec:
    """What the answers must be: free text, one of ``labels``, or JSON matching ``schema``."""

    kind: str = "text"
    labels: tuple[str, ...] = ()
    schema: Mapping[str, Any] | None = None
    schema_source: str = ""  # the file it came from, or "inline"
    retries_on_invalid: int = 0

    @property
    def structured(self) -> bool:
        return self.kind != "text"


@dataclass(frozen=True)
class TaskConfig:
    system: str = ""
    template: str = ""
    keep_columns: tuple[str, ...] = ()
    output: OutputSpec = field(default_factory=OutputSpec)
    variables: tuple[str, ...] = ()  # the input columns the template reads, sorted
    # Mark the shared prefix for the provider's prompt cache; None: on for Anthropic when
    # there is a shared prefix (OpenAI caches a long enough one unasked).
    cache_prefix: bool | None = None
    # The template's literal text before its first tag: the start every prompt shares.
    template_prefix: str = ""

    def system_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def marks_cache(self, provider: str) -> bool:
        """Whether requests to a ``provider`` model carry a cache breakpoint (Anthropic's
        ``cache_control``): asked for, or by default where there is a shared prefix."""
        shared = bool(self.system or self.template_prefix or self.output.structured)
        if provider != "anthropic" or not shared:
            return False
        return self.cache_prefix is not False

    def prefix_tokens(self) -> int:
        """Estimated tokens of what every request starts with (output schema, system prompt,
        the template's literal start): the most of each prompt a provider can cache."""
        from batchroute import tokens

        chars = self.fixed_input_chars() + len(self.template_prefix)
        return (tokens.from_chars(chars)
                + (tokens.MESSAGE_OVERHEAD_TOKENS if self.system else 0)) if chars else 0

    def fixed_input_chars(self) -> int:
        """Characters every request carries besides its own text: the system prompt and the
        output schema (providers bill the schema, or the tool definition, as prompt)."""
        schema = wire_schema(self.output)
        return len(self.system) + (len(json.dumps(schema.schema, separators=(",", ":")))
                                   if schema is not None else 0)


# --- parsing the [task] section -------------------------------------------------------------


def parse(t: Mapping[str, Any], *, reserved: Sequence[str] = ()) -> TaskConfig:
    """The ``[task]`` table (``{}`` when absent). ``reserved`` are column names the results
    already have, which ``keep_columns`` may not reuse."""
    _known(t, "task", {"system", "template", "keep_columns", "output", "cache_prefix"})
    system = _text(t, "system")
    template = _text(t, "template")
    cache = t.get("cache_prefix")
    if cache is not None and not isinstance(cache, bool):
        raise ConfigError("task.cache_prefix: must be true or false")
    variables: tuple[str, ...] = ()
    prefix = ""
    if template:
        found, prefix = _template_variables(template)
        variables = tuple(sorted(found))
        if not variables:
            raise ConfigError("task.template: names no input column; every row would get "
                              "the same prompt")
    keep = t.get("keep_columns", [])
    if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
        raise ConfigError("task.keep_columns: must be a list of column names")
    for i, name in enumerate(keep):
        if name in reserved:
            raise ConfigError(f"task.keep_columns[{i}]: {name!r} is already a results column")
    if len(set(keep)) != len(keep):
        raise ConfigError("task.keep_columns: a column is listed twice")
    out = t.get("output", {})
    if not isinstance(out, Mapping):
        raise ConfigError("task.output: must be a table")
    return TaskConfig(system=system, template=template, keep_columns=tuple(keep),
                      output=_output(out), variables=variables, cache_prefix=cache,
                      template_prefix=prefix)


def _output(t: Mapping[str, Any]) -> OutputSpec:
    _known(t, "task.output", {"kind", "labels", "json_schema", "retries_on_invalid"})
    given = [k for k in ("labels", "json_schema") if k in t]
    if len(given) > 1:
        raise ConfigError("task.output: give labels or json_schema, not both")
    kind = t.get("kind", {"labels": "labels", "json_schema": "json"}.get(
        given[0], "text") if given else "text")
    if kind not in KINDS:
        raise ConfigError(f"task.output.kind: {kind!r} is not one of {', '.join(KINDS)}")
    retries = t.get("retries_on_invalid", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
        raise ConfigError("task.output.retries_on_invalid: must be a whole number from 0 to 10")
    if kind == "text":
        if given:
            raise ConfigError(f"task.output.{given[0]}: kind = \"text\" takes no {given[0]}")
        return OutputSpec(retries_on_invalid=retries)
    if kind == "labels":
        return OutputSpec(kind="labels", labels=_labels(t.get("labels")),
                          retries_on_invalid=retries)
    if "json_schema" not in t:
        raise ConfigError("task.output.json_schema: missing (a file name or an inline table)")
    schema, source = _schema(t["json_schema"])
    return OutputSpec(kind="json", schema=schema, schema_source=source,
                      retries_on_invalid=retries)


def _labels(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("task.output.labels: must be a non-empty list of strings")
    seen: dict[str, int] = {}
    for i, label in enumerate(raw):
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"task.output.labels[{i}]: must be a non-blank string")
        if label != label.strip():
            raise ConfigError(f"task.output.labels[{i}]: {label!r} has surrounding whitespace")
        key = label.casefold()
        if key in seen:
            raise ConfigError(f"task.output.labels[{i}]: {label!r} repeats labels[{seen[key]}] "
                              "(labels are matched ignoring case)")
        seen[key] = i
    return tuple(raw)


def _schema(raw: object) -> tuple[dict[str, Any], str]:
    import jsonschema

    if isinstance(raw, str):
        path = Path(raw).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"task.output.json_schema: file not found: {path.resolve()}"
                              ) from None
        except OSError as exc:
            raise ConfigError(f"task.output.json_schema: cannot read {path}: {exc}") from None
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"task.output.json_schema: {path} is not valid JSON ({exc})"
                              ) from None
        source = str(path)
    elif isinstance(raw, Mapping):
        schema, source = json.loads(json.dumps(raw)), "inline"
    else:
        raise ConfigError("task.output.json_schema: must be a file name or an inline table")
    if not isinstance(schema, dict):
        raise ConfigError(f"task.output.json_schema ({source}): must be a JSON object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(top)"
        raise ConfigError(f"task.output.json_schema ({source}): not a valid JSON Schema at "
                          f"{where}: {exc.message}") from None
    if schema.get("type") != "object":
        raise ConfigError(f"task.output.json_schema ({source}): the top level must be "
                          "type \"object\" (its properties become the output columns)")
    _arrow_type(schema, f"task.output.json_schema ({source})")  # refuses what has no column
    return schema, source


def check_wire(output: OutputSpec, model: str, structured: str) -> None:
    """Refuse an output ``model`` cannot be asked for the way it is configured. OpenAI's
    strict mode takes only schemas whose every object lists all its properties as required
    and forbids others."""
    if output.kind != "json" or structured != "json_schema":
        return
    assert output.schema is not None
    _check_strict(output.schema, f"task.output.json_schema ({output.schema_source})", model)


def _check_strict(node: Mapping[str, Any], where: str, model: str) -> None:
    why = (f"; models.{model} asks with OpenAI's strict json_schema (set its "
           "structured_output = \"vllm\" for a vLLM server)")
    if _types(node) & {"object"} or "properties" in node:
        props = node.get("properties", {})
        if node.get("additionalProperties", True) is not False:
            raise ConfigError(f"{where}: additionalProperties must be false{why}")
        missing = [p for p in props if p not in node.get("required", [])]
        if missing:
            raise ConfigError(f"{where}.properties.{missing[0]}: every property must be "
                              f"required in strict mode (make it nullable instead){why}")
        for name, sub in props.items():
            _check_strict(sub, f"{where}.properties.{name}", model)
    if isinstance(node.get("items"), Mapping):
        _check_strict(node["items"], f"{where}.items", model)


# --- the output columns ---------------------------------------------------------------------


def _types(node: Mapping[str, Any]) -> set[str]:
    t = node.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return set()


_SCALARS = {"string": pa.string(), "number": pa.float64(), "integer": pa.int64(),
            "boolean": pa.bool_()}


def _arrow_type(node: Mapping[str, Any], where: str) -> pa.DataType:
    """The Arrow type of a schema node: string, number, integer, boolean, enum (as string),
    array, object; a type list with "null" is the same, nullable. Others are refused."""
    types = _types(node) - {"null"}
    if not types and "enum" in node:
        values = [v for v in node["enum"] if v is not None]
        kinds = {type(v) for v in values}
        if kinds <= {str}:
            return pa.string()
        types = {"integer"} if kinds <= {int} else {"number"} if kinds <= {int, float} else set()
    if not types and "const" in node and isinstance(node["const"], str):
        return pa.string()
    if len(types) != 1:
        raise ConfigError(f"{where}: needs one type (string, number, integer, boolean, array "
                          "or object, optionally with \"null\") to become a column"
                          + (f"; it has {sorted(types)}" if types else ""))
    kind = types.pop()
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        items = node.get("items")
        if not isinstance(items, Mapping):
            raise ConfigError(f"{where}.items: an array needs one items schema")
        return pa.list_(_arrow_type(items, f"{where}.items"))
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping) or not props:
            raise ConfigError(f"{where}: an object needs properties to become a column")
        return pa.struct([pa.field(str(name), _arrow_type(sub, f"{where}.properties.{name}"))
                          for name, sub in props.items()])
    raise ConfigError(f"{where}: type {kind!r} cannot become a column")


def result_fields(output: OutputSpec) -> tuple[pa.Field, ...]:
    """The results columns this output adds: ``label`` (labels), ``output`` (json), or none."""
    if output.kind == "labels":
        return (pa.field(LABEL_COLUMN, pa.string(), metadata={
            "description": "The answer's label: exactly one of task.output.labels (ok rows)."}),)
    if output.kind == "json":
        assert output.schema is not None
        return (pa.field(OUTPUT_COLUMN, _arrow_type(output.schema, "json_schema"), metadata={
            "description": "The answer parsed and validated against task.output.json_schema "
                           "(ok rows); the raw text is in response."}),)
    return ()


# --- asking for it --------------------------------------------------------------------------


@dataclass(frozen=True)
class WireSchema:
    """A structured output as the dispatcher sends it (see providers.OutputSchema): a JSON
    schema, or for vLLM's choice form the bare labels."""

    name: str
    schema: dict[str, Any]
    choices: tuple[str, ...] = ()


def wire_schema(output: OutputSpec) -> WireSchema | None:
    if output.kind == "labels":
        return WireSchema(LABEL_FIELD, {
            "type": "object", "properties": {LABEL_FIELD: {"type": "string",
                                                           "enum": list(output.labels)}},
            "required": [LABEL_FIELD], "additionalProperties": False}, output.labels)
    if output.kind == "json":
        assert output.schema is not None
        return WireSchema(OUTPUT_COLUMN, dict(output.schema))
    return None


# --- reading answers ------------------------------------------------------------------------


# Keywords whose meaning is the same in every draft since 6: a schema made of these alone is
# also checked by fastjsonschema (which implements drafts 4 to 7) on the fast path. Not
# "default": fastjsonschema fills defaults in, which would pass an answer missing a property.
_PORTABLE = frozenset({
    "$schema", "$id", "title", "description", "examples", "$comment",
    "type", "enum", "const", "properties", "required", "additionalProperties", "items",
    "minItems", "maxItems", "uniqueItems", "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "anyOf",
    "oneOf", "allOf", "not", "minProperties", "maxProperties"})
_SUBSCHEMA_MAPS = ("properties",)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf")


def _portable(node: object) -> bool:
    if not isinstance(node, Mapping):
        return isinstance(node, bool)
    if not set(node) <= _PORTABLE:
        return False
    subs: list[object] = [node[k] for k in ("items", "not", "additionalProperties") if k in node
                          and isinstance(node[k], Mapping)]
    subs += [v for k in _SUBSCHEMA_MAPS for v in dict(node.get(k) or {}).values()]
    subs += [v for k in _SUBSCHEMA_LISTS for v in list(node.get(k) or [])]
    return all(_portable(sub) for sub in subs)


class OutputParser:
    """Reads one answer into its value (a label, or a dict shaped like the output column) or
    the reason it is unusable. Built once per dispatcher: the validators are compiled once.

    ``jsonschema`` is the reference: it decides, and words the reason. A schema that uses only
    keywords every draft agrees on (:data:`_PORTABLE`) is also compiled by ``fastjsonschema``,
    which clears a valid answer in a few microseconds (``jsonschema`` takes about a hundred);
    only an answer it refuses goes to ``jsonschema``."""

    def __init__(self, output: OutputSpec) -> None:
        self.output = output
        self._labels = {label.casefold(): label for label in output.labels}
        self._validator: Any = None
        self._fast: Any = None
        self._fast_refusal: type[Exception] = Exception
        if output.kind == "json":
            import jsonschema

            assert output.schema is not None
            cls = jsonschema.validators.validator_for(output.schema)
            self._validator = cls(output.schema, format_checker=cls.FORMAT_CHECKER)
            if _portable(output.schema):
                import fastjsonschema

                schema = {k: v for k, v in output.schema.items() if k != "$schema"}
                self._fast = fastjsonschema.compile(schema)
                self._fast_refusal = fastjsonschema.JsonSchemaException

    def parse(self, text: str) -> tuple[Any, str | None]:
        """(value, None) for a usable answer, (None, why) for an unusable one."""
        if self.output.kind == "labels":
            return self._label(text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, (f"answer is not valid JSON ({exc.msg} at character {exc.pos}): "
                          f"{_shown(text)}")
        except ValueError as exc:  # a number too long to convert, ...
            return None, f"answer is not valid JSON ({exc}): {_shown(text)}"
        if self._fast is not None:
            try:
                self._fast(value)
                return self._fitting(value)
            except self._fast_refusal:
                pass  # the reference decides, and says why
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            import jsonschema

            err = jsonschema.exceptions.best_match(errors)
            at = "/".join(str(p) for p in err.absolute_path) or "(top)"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            return None, f"answer does not match the schema at {at}: {err.message}{more}"
        return self._fitting(value)

    def _fitting(self, value: Any) -> tuple[Any, str | None]:
        """A valid answer that its column can also hold: JSON allows what Arrow does not (an
        integer beyond int64, a lone surrogate in a string), and that is an unusable answer
        too, not a failed batch."""
        why = _unfit(value)
        if why is not None:
            return None, f"answer does not fit the output column: {why}"
        return value, None

    def _label(self, text: str) -> tuple[str | None, str | None]:
        candidate: Any = text
        stripped = text.strip()
        if stripped.startswith(("{", '"')):
            try:
                doc = json.loads(stripped)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get(LABEL_FIELD), str):
                candidate = doc[LABEL_FIELD]
            elif isinstance(doc, str):
                candidate = doc
        label = self._labels.get(str(candidate).strip().casefold())
        if label is None:
            return None, (f"answer {_shown(str(candidate).strip())} is not one of the labels "
                          f"({', '.join(self.output.labels)})")
        return label, None


def _shown(text: str) -> str:
    return json.dumps(text[:MAX_SHOWN] + ("..." if len(text) > MAX_SHOWN else ""),
                      ensure_ascii=False)


_INT64 = (-(2**63), 2**63 - 1)


def _unfit(value: Any) -> str | None:
    """Why a parsed JSON value cannot become Arrow data, or None: the two things JSON allows
    and Arrow does not, an integer beyond int64 and a string that is not valid Unicode (a
    lone surrogate escape). A plain walk: converting each answer alone costs ten times more."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int):
            if not _INT64[0] <= v <= _INT64[1]:
                return f"the integer {v} is beyond int64"
        elif isinstance(v, str):
            try:
                v.encode()
            except UnicodeEncodeError:
                return "a string holds a lone surrogate (not valid Unicode)"
    return None


# What converting a parsed answer into its column can raise.
_UNFIT = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError,
          UnicodeError)


def values_array(output: OutputSpec, values: Sequence[Any]) -> pa.Array:
    """The ``label`` or ``output`` column for parsed values (None for rows without one).
    A value the column cannot hold becomes null (OutputParser refuses those already)."""
    (f,) = result_fields(output)
    if output.kind == "labels":
        return pa.array(values, pa.string())
    try:  # valid answers convert as they are: extra properties are left out, 3.0 becomes 3
        return pa.array(values, f.type)
    except _UNFIT:
        shaped = []
        for v in values:  # the rare batch with an odd value: row by row, nulling it
            value = _shaped(v, f.type)
            try:
                pa.array([value], f.type)
            except _UNFIT:
                value = None
            shaped.append(value)
        return pa.array(shaped, f.type)


def _shaped(value: Any, t: pa.DataType) -> Any:
    """``value`` (valid against the schema) with exactly the fields of ``t``: properties the
    schema does not declare are dropped (the raw answer keeps them), integers given as 3.0
    become 3."""
    if value is None:
        return None
    if pa.types.is_struct(t):
        if not isinstance(value, dict):
            return None
        return {t.field(i).name: _shaped(value.get(t.field(i).name), t.field(i).type)
                for i in range(t.num_fields)}
    if pa.types.is_list(t):
        return [_shaped(v, t.value_type) for v in value] if isinstance(value, list) else None
    if pa.types.is_integer(t):
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else None
    if pa.types.is_floating(t):
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else None
    if pa.types.is_boolean(t):
        return value if isinstance(value, bool) else None
    return value if isinstance(value, str) else json.dumps(value)


# --- rendering ------------------------------------------------------------------------------


def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                                keep_trailing_newline=True)


def _template_variables(source: str) -> tuple[set[str], str]:
    """The input columns a template reads, and its literal start (the text before its first
    tag, whitespace control applied): what every rendered prompt begins with."""
    from jinja2 import TemplateSyntaxError, meta, nodes

    try:
        ast = _environment().parse(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"task.template: syntax error at line {exc.lineno}"
                          f"{_tag_column(source, exc.lineno)}: {exc.message}") from None
    prefix = []
    if ast.body and isinstance(ast.body[0], nodes.Output):
        for node in ast.body[0].nodes:
            if not isinstance(node, nodes.TemplateData):
                break
            prefix.append(node.data)
    return set(meta.find_undeclared_variables(ast)), "".join(prefix)


def _tag_column(source: str, lineno: int) -> str:
    """", column C" of the last tag (``{{``, ``{%``, ``{#``) opened on line ``lineno``: Jinja
    reports the line of a syntax error only, and the broken tag is the last one opened there
    (or the line's only one). Empty when the line opens none."""
    lines = source.splitlines()
    if not 1 <= lineno <= len(lines):
        return ""
    line = lines[lineno - 1]
    starts = [i for i in range(len(line) - 1) if line[i] == "{" and line[i + 1] in "{%#"]
    return f", column {starts[-1] + 1}" if starts else ""


class NullValue(Exception):
    """A null input value reached the rendered text."""

    def __init__(self, column: str) -> None:
        super().__init__(column)
        self.column = column


def _null_class() -> type:
    from jinja2 import Undefined

    class Null(Undefined):
        """A null cell: false and empty to ``or``, ``default`` and ``if``, but an error once
        rendered as text (so a null is never silently sent as "None" or "")."""

        __slots__ = ()

        def __str__(self) -> str:
            raise NullValue(self._undefined_name or "?")

    return Null


class Renderer:
    """A compiled template over a batch's columns."""

    def __init__(self, task: TaskConfig) -> None:
        self.task = task
        env = _environment()
        self._template = env.from_string(task.template)
        self._null = _null_class()
        self._parts = _join_parts(env.parse(task.template))

    @property
    def vectorised(self) -> bool:
        """Whether this template is rendered by Arrow's string kernels (no per-row Python)."""
        return self._parts is not None

    def render(self, columns: Mapping[str, pa.Array]) -> tuple[pa.Array, np.ndarray]:
        """(prompt per row, reject reason per row or None). Rows whose reason is set have a
        null prompt."""
        n = len(next(iter(columns.values()))) if columns else 0
        if self._parts is not None and all(
                _joinable(columns[name].type, how) for how, name in self._parts if how):
            return self._render_joined(columns, n)
        return self._render_rows(columns, n)

    def _render_joined(self, columns: Mapping[str, pa.Array], n: int
                       ) -> tuple[pa.Array, np.ndarray]:
        assert self._parts is not None
        reason = np.full(n, None, dtype=object)
        pieces: list[pa.Array | str] = []
        for how, value in self._parts:
            if not how:
                pieces.append(value)
                continue
            col = columns[value]
            if how == "name":
                null = ~pc.is_valid(col).to_numpy(zero_copy_only=False)
                reason[null & (reason == None)] = _null_reason(value)  # noqa: E711
                pieces.append(col if pa.types.is_string(col.type) else pc.cast(col, pa.string()))
            else:  # "or:<text>": null or empty; "dflt:<text>": null only
                kind, _, fallback = how.partition(":")
                empty = pc.is_null(col) if kind == "dflt" else pc.fill_null(
                    pc.equal(col, ""), True)
                pieces.append(pc.if_else(empty, fallback, col))
        joined = pc.binary_join_element_wise(
            *[p if isinstance(p, pa.Array) else pa.scalar(p, pa.string()) for p in pieces], "")
        if not isinstance(joined, pa.Array):  # only text: a scalar
            joined = pa.repeat(joined, n)
        bad = reason != None  # noqa: E711
        if bad.any():
            joined = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), joined)
        return joined, reason

    def _render_rows(self, columns: Mapping[str, pa.Array], n: int
                     ) -> tuple[pa.Array, np.ndarray]:
        names = list(columns)
        values = [columns[k].to_pylist() for k in names]
        nulls = [[self._null(name=k) if v is None else v for v in vs]
                 for k, vs in zip(names, values, strict=True)]
        out: list[str | None] = [None] * n
        reason = np.full(n, None, dtype=object)
        render = self._template.render
        for i in range(n):
            try:
                out[i] = render({k: vs[i] for k, vs in zip(names, nulls, strict=True)})
            except NullValue as exc:
                reason[i] = _null_reason(exc.column)
            except Exception as exc:  # a sandbox violation, a filter on the wrong type, ...
                reason[i] = f"template failed on this row: {type(exc).__name__}: {exc}"[:300]
        return pa.array(out, pa.string()), reason


def _null_reason(column: str) -> str:
    return (f"{column} is null and the template renders it (write {{{{ {column} or \"\" }}}} "
            "to render a null as empty)")


def _joinable(t: pa.DataType, how: str) -> bool:
    if how == "name":
        return bool(pa.types.is_string(t) or pa.types.is_integer(t))
    return bool(pa.types.is_string(t))


def _join_parts(ast: Any) -> list[tuple[str, str]] | None:
    """The template as a list of (how, value) when it only joins text and columns:
    ("", text), ("name", column), ("or:<text>", column) for ``{{ c or "text" }}`` and
    ``{{ c | default("text", true) }}``, ("dflt:<text>", column) for ``{{ c | default("text")
    }}``. None for anything else (Jinja renders those)."""
    from jinja2 import nodes

    parts: list[tuple[str, str]] = []
    for node in ast.body:
        if not isinstance(node, nodes.Output):
            return None
        for item in node.nodes:
            if isinstance(item, nodes.TemplateData):
                parts.append(("", item.data))
            elif isinstance(item, nodes.Name) and item.ctx == "load":
                parts.append(("name", item.name))
            elif (isinstance(item, nodes.Or) and isinstance(item.left, nodes.Name)
                  and isinstance(item.right, nodes.Const) and isinstance(item.right.value, str)):
                parts.append((f"or:{item.right.value}", item.left.name))
            elif (isinstance(item, nodes.Filter) and item.name in ("default", "d")
                  and isinstance(item.node, nodes.Name) and 1 <= len(item.args) <= 2
                  and not item.kwargs and isinstance(item.args[0], nodes.Const)
                  and isinstance(item.args[0].value, str)
                  and all(isinstance(a, nodes.Const) and isinstance(a.value, bool)
                          for a in item.args[1:])):
                # default(x, true) replaces empty text too, as ``or`` does
                falsy = len(item.args) == 2 and bool(getattr(item.args[1], "value", False))
                parts.append((f"{'or' if falsy else 'dflt'}:{item.args[0].value}",
                              item.node.name))
            else:
                return None
    return parts


def _known(t: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in t:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (expected one of "
                              f"{', '.join(sorted(allowed))})")


def _text(t: Mapping[str, Any], key: str) -> str:
    value = t.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"task.{key}: must be a string")
    return value
