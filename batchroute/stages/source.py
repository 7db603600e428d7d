"""Source stage: open the input dataset, check it against ``schemas/``, emit canonical requests.

The input may be a file, a folder, a glob or a Hive-partitioned tree on any pyarrow filesystem.
Files are checked one by one, because writers disagree on string types (pandas, polars, DuckDB
and Spark write string, large_string, string_view or dictionary columns) and a dataset-wide
schema would only describe the first file. A column that is missing or of the wrong kind stops
the job with a :class:`SchemaError` naming the file and the column, before anything is written.

Bad rows are never dropped: a null or blank request_id, a null or empty prompt, or a repeated
request_id (the first occurrence wins) becomes a row with ``reject_reason`` set, and later a
result row with ``status = "rejected"``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchroute import schemas
from batchroute.errors import SchemaError

if TYPE_CHECKING:
    from batchroute.task import Renderer, TaskConfig

MAX_TOKENS_LIMIT = 2**31 - 1
RANGE_REASON = f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"
FRACTION_REASON = "max_tokens must be a whole number"
# Row groups can be large: the input's are the writer's choice and can hold tens of thousands
# of long prompts (~90 MiB of text each). Parquet files are read through a buffered stream,
# which decodes a column chunk page by page, so a batch costs about its own size; without it
# the whole column chunk is read into memory first, and pyarrow.dataset's scanner decodes
# whole row groups (several, with its read-ahead) before slicing them into batches.
READ_BUFFER_BYTES = 2**20
DUPLICATE_SLICE_ROWS = 65_536
# Columns of text: each is checked for valid UTF-8, row by row.
TEXT_FIELDS = ("request_id", "prompt", "messages", "force_model", "tags")
PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
MAGIC = b"PAR1"  # a Parquet file's first and last four bytes
log = logging.getLogger("batchroute")


@dataclass(frozen=True)
class InputFile:
    path: str
    columns: tuple[str, ...]  # the schema columns this file has
    read: tuple[str, ...] = ()  # every column read from it (schema, id, template, kept)


@dataclass(frozen=True)
class InputDataset:
    uri: str
    filesystem: pafs.FileSystem
    files: tuple[InputFile, ...]
    fingerprint: str
    # Files a folder or glob matched that are not Parquet (README, SUCCESS markers, CSV, ...)
    skipped: tuple[str, ...] = ()
    id_column: str = "request_id"
    # Input columns carried unchanged into the results: the id column under its own name
    # (when it is not request_id) and the task's keep_columns, with one type over all files.
    carried: tuple[pa.Field, ...] = ()
    task: TaskConfig | None = field(default=None, compare=False)

    def read_ids(self) -> pa.ChunkedArray:
        """The id column over every file, in file order, as text (request_id). Raises
        UnreadableInput for a corrupt page."""
        chunks = []
        for f in self.files:
            for batch in _input_batches(self.filesystem, f.path, 65_536, [self.id_column]):
                chunks.extend(_ids(pa.chunked_array([batch.column(0)]))[0].chunks)
        return pa.chunked_array(chunks, type=pa.string())


class UnreadableInput(SchemaError):
    """An input file whose schema reads but whose data does not (a corrupt page). It is
    only found while the source stage streams the file, so the run takes back what it
    wrote before it reports this (exit 2)."""


def open_input(uri: str, *, id_column: str = "request_id",
               task: TaskConfig | None = None) -> InputDataset:
    """Resolve ``uri`` to its Parquet files and check each one's columns: the id column, the
    text (``prompt``/``messages``, or the columns the task's template names), the kept
    columns, and the optional schema columns.

    Raises SchemaError naming the file and column for a missing or mistyped column, and
    SchemaError when the URI matches no Parquet file.
    """
    filesystem, paths, skipped = _resolve(uri)
    if not paths:
        raise SchemaError(f"input {uri}: no Parquet files found" + (
            f" (not Parquet, so skipped: {_listing(skipped)})" if skipped else ""))
    if skipped:
        log.warning("input %s: skipped %d files that are not Parquet: %s", uri, len(skipped),
                    _listing(skipped))
    files = []
    digest = hashlib.sha256()
    templated = task is not None and bool(task.template)
    keep = [c for c in (id_column, *(task.keep_columns if task else ()))
            if c != "request_id"]
    keep = list(dict.fromkeys(keep))
    variables = list(task.variables) if templated and task else []
    carried: dict[str, tuple[pa.DataType, str]] = {}
    for path in paths:
        try:
            schema = pq.read_schema(path, filesystem=filesystem)
        except (OSError, pa.ArrowInvalid) as exc:
            raise SchemaError(f"input file {path}: not a readable Parquet file ({exc})") from None
        present = _check_schema(path, schema, id_column=id_column, templated=templated)
        for name in variables:
            if name not in schema.names:
                raise SchemaError(f"input file {path}: [task] template names column '{name}', "
                                  "which this file does not have")
        for name in keep:
            what = "job.id_column" if name == id_column else "task.keep_columns"
            if name not in schema.names:
                raise SchemaError(f"input file {path}: {what} names column '{name}', which "
                                  "this file does not have")
            t = _carried_type(schema.field(name).type)
            if name in carried and carried[name][0] != t:
                t = _common_type(carried[name][0], t)
                if t is None:
                    raise SchemaError(
                        f"input file {path}: column '{name}' has type {schema.field(name).type}"
                        f", but {carried[name][1]} has {carried[name][0]}: a kept column "
                        "needs one type over every file")
            carried[name] = (t, carried.get(name, (t, path))[1])
        read = [*present, *(c for c in (id_column, *variables, *keep) if c not in present)]
        files.append(InputFile(path, present, tuple(dict.fromkeys(read))))
        info = filesystem.get_file_info(path)
        digest.update(f"{path}\0{info.size}\0{info.mtime_ns}\n".encode())
    return InputDataset(uri, filesystem, tuple(files), digest.hexdigest()[:16], tuple(skipped),
                        id_column=id_column,
                        carried=tuple(pa.field(n, t) for n, (t, _) in carried.items()),
                        task=task if templated else None)


def _carried_type(t: pa.DataType) -> pa.DataType:
    """The type a carried column has in the results: dictionaries decoded, every string and
    binary kind as the plain one (writers disagree on those), anything else as written."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    return t


def _common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """One type for a kept column two files write differently: an all-null column takes the
    other's type, text and bytes are text, integers widen to int64 (not uint64: its values
    may not fit), numbers to float64; None when there is none."""
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    if _is_string(a) and _is_string(b):
        return pa.string()
    ints = pa.types.is_integer(a) and pa.types.is_integer(b)
    if ints:
        return None if pa.uint64() in (a, b) else pa.int64()
    if all(pa.types.is_integer(x) or pa.types.is_floating(x) for x in (a, b)):
        return pa.float64()
    return None


def _listing(paths: list[str], shown: int = 10) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def _resolve(uri: str) -> tuple[pafs.FileSystem, list[str], list[str]]:
    """The Parquet files ``uri`` names, and the files it matched that are not Parquet."""
    if "://" not in uri and not uri.startswith("/"):
        uri = f"{os.getcwd()}/{uri}"
    globbing = any(ch in uri for ch in "*?[")
    base = uri
    if globbing:
        cut = min(uri.find(ch) for ch in "*?[" if ch in uri)
        base = uri[:cut].rsplit("/", 1)[0]
    try:
        filesystem, base_path = pafs.FileSystem.from_uri(base)
    except (pa.ArrowInvalid, ValueError):
        filesystem, base_path = pafs.LocalFileSystem(), base
    info = filesystem.get_file_info(base_path)
    if info.type == pafs.FileType.NotFound:
        raise SchemaError(f"input {uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        return filesystem, [base_path], []  # named on its own: it must be Parquet
    pattern = _glob_regex(base_path + uri[len(base):]) if globbing else None
    # Only a "**" pattern (or a plain folder) needs the whole tree below the base.
    recursive = pattern is None or "**" in uri or uri[len(base):].count("/") > 1
    selector = pafs.FileSelector(base_path, recursive=recursive)
    found = sorted(
        (i for i in filesystem.get_file_info(selector)
         if i.type == pafs.FileType.File and not _hidden(i.path[len(base_path):])
         and (pattern is None or pattern.fullmatch(i.path))), key=lambda i: i.path)
    paths: list[str] = []
    skipped: list[str] = []
    for i in found:
        (paths if _is_parquet(filesystem, i) else skipped).append(i.path)
    return filesystem, paths, skipped


def _is_parquet(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """Whether a file a folder or glob matched is Parquet: by its extension, or else by the
    magic bytes at both ends (Hive and Spark part files often have no extension; a README or
    a SUCCESS marker has no magic).

    A name with a Parquet extension is taken whatever it holds, and refused later if broken,
    as is a file that starts as Parquet but lacks its end: skipping those would silently drop
    data. Other names cost two small reads each."""
    if info.base_name.endswith(PARQUET_EXTENSIONS):
        return True
    size = info.size or 0
    if size < 2 * len(MAGIC):
        return False
    with fs.open_input_file(info.path) as f:
        head, tail = f.read_at(len(MAGIC), 0), f.read_at(len(MAGIC), size - len(MAGIC))
    if head == MAGIC and tail != MAGIC:
        raise SchemaError(f"input file {info.path}: starts as Parquet but has no footer "
                          "(truncated, or still being written)")
    return bool(head == MAGIC)


def _glob_regex(glob: str) -> re.Pattern[str]:
    """Shell-style matching per path segment: ``*`` and ``?`` stay inside one folder level,
    ``**`` crosses levels, ``[...]`` is a character class."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 1)) > i:
            out.append("[" + glob[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def _hidden(relative: str) -> bool:
    # Same convention as pyarrow and Spark: _SUCCESS, .crc and temp files are not data.
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    # Binary too: older Hive and Impala write text as BYTE_ARRAY with no UTF-8 annotation.
    # Either way the bytes are checked row by row (see _text).
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_string_view(t) or pa.types.is_binary(t)
                or pa.types.is_large_binary(t) or pa.types.is_binary_view(t))


def _is_list_of(t: pa.DataType, item: object) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)):
        return False
    return bool(item(t.value_type))  # type: ignore[operator]


def _is_message(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return {"role", "content"} <= set(names) and all(
        _is_string(names[k]) for k in ("role", "content"))


_KINDS = {
    "request_id": ("a string", _is_string),
    "prompt": ("a string", _is_string),
    "messages": ("a list of {role, content} structs", lambda t: _is_list_of(t, _is_message)),
    # Decimals too: DuckDB writes a literal such as 0.2 or 64.0 as decimal128(p, s).
    "max_tokens": ("an integer (or a decimal)",
                   lambda t: pa.types.is_integer(t) or pa.types.is_decimal(t)),
    "temperature": ("a number", lambda t: (pa.types.is_floating(t) or pa.types.is_integer(t)
                                           or pa.types.is_decimal(t))),
    "force_model": ("a string", _is_string),
    "tags": ("a list of strings (or one string)",
             lambda t: _is_string(t) or _is_list_of(t, _is_string)),
}


def _is_id(t: pa.DataType) -> bool:
    return _is_string(t) or bool(pa.types.is_integer(t))


def _check_schema(path: str, schema: pa.Schema, *, id_column: str = "request_id",
                  templated: bool = False) -> tuple[str, ...]:
    """The schema columns (``_KINDS``) this file has, checked. With a template the text
    comes from the template's columns, and prompt/messages are not read."""
    names = set(schema.names)
    if id_column not in names:
        what = "" if id_column == "request_id" else " (job.id_column)"
        raise SchemaError(f"input file {path}: missing required column '{id_column}'{what}")
    t = schema.field(id_column).type
    if not _is_id(t):
        raise SchemaError(f"input file {path}: column '{id_column}' has type {t}, expected a "
                          "string or an integer to identify rows (job.id_column)")
    if not templated and not names & set(schemas.PROMPTS_TEXT):
        raise SchemaError(f"input file {path}: missing column 'prompt' (or 'messages'); "
                          "one of them must hold the text to send (or give a [task] template "
                          "over this file's columns)")
    present = []
    for name, (kind, check) in _KINDS.items():
        if name not in names or name == "request_id" or (
                templated and name in schemas.PROMPTS_TEXT):
            continue
        t = schema.field(name).type
        if not check(t):
            raise SchemaError(f"input file {path}: column '{name}' has type {t}, "
                              f"expected {kind}")
        present.append(name)
    return tuple(present)


def read_requests(data: InputDataset, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """Yield the canonical ``requests`` table in input order, in batches of up to batch_rows.

    Holds in memory only the id column (to find repeats) and one batch. With a template,
    the prompt is rendered here, batch by batch: every later stage sees what the model will.
    """
    from batchroute.task import Renderer

    duplicates = _duplicates(data.read_ids())
    renderer = Renderer(data.task) if data.task is not None else None
    row = 0
    for f in data.files:
        for batch in _input_batches(data.filesystem, f.path, batch_rows, list(f.read)):
            if batch.num_rows:
                yield _canonical(pa.Table.from_batches([batch]), row, duplicates, data,
                                 renderer)
                row += batch.num_rows


def _input_batches(fs: pafs.FileSystem, path: str, batch_rows: int,
                   columns: list[str]) -> Iterator[pa.RecordBatch]:
    """iter_parquet for an input file: page checksums are verified where the writer wrote
    them, and a page that cannot be decoded raises UnreadableInput naming the file and row
    group (Arrow's own error names neither)."""
    with fs.open_input_file(path) as handle:
        reader = pq.ParquetFile(handle, buffer_size=READ_BUFFER_BYTES, pre_buffer=False,
                                page_checksum_verification=True)
        done = 0
        try:
            for batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
                yield batch
                done += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            group = _failing_row_group(fs, path, columns, done)
            if group is None:
                raise  # not reproducible, so not the file's fault (a dropped connection)
            raise UnreadableInput(
                f"input file {path}: row group {group} cannot be read ({exc}); nothing was "
                "sent: rewrite the file, or move it out of the input") from None


def _failing_row_group(fs: pafs.FileSystem, path: str, columns: list[str],
                       done: int) -> int | None:
    """The first row group past the ``done`` rows already read that fails to decode again,
    read on its own; None if every one reads."""
    with fs.open_input_file(path) as handle:
        reader = pq.ParquetFile(handle, pre_buffer=False, page_checksum_verification=True)
        start = 0
        for i in range(reader.metadata.num_row_groups):
            end = start + reader.metadata.row_group(i).num_rows
            if end > done:
                try:
                    reader.read_row_group(i, columns=columns)
                except (OSError, pa.ArrowException):
                    return i
            start = end
    return None


def iter_parquet(fs: pafs.FileSystem, path: str, batch_rows: int,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of one Parquet file, read so that memory follows ``batch_rows``
    and not the file's row groups (see READ_BUFFER_BYTES)."""
    with fs.open_input_file(path) as handle:
        reader = pq.ParquetFile(handle, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
        yield from reader.iter_batches(batch_size=batch_rows, columns=columns)


def _duplicates(ids: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(rows that repeat an earlier request_id, the row of that first occurrence), sorted.

    Sorts row numbers by id (a stable sort, so equal ids keep row order and the first of a
    run is the first occurrence) and compares neighbours a slice at a time. Besides the ids
    this needs ~30 bytes a row, all of it freed on return; a hash group-by over the ids
    (polars) took ~250 bytes a row, and its allocator kept them for the rest of the job.
    """
    order = pc.sort_indices(ids, sort_keys=[("", "ascending", "at_end")]).to_numpy()
    order = order[:len(ids) - ids.null_count]  # a null request_id repeats nothing
    same = np.zeros(len(order), dtype=bool)  # same id as the previous row in sorted order
    for lo in range(1, len(order), DUPLICATE_SLICE_ROWS):
        hi = min(lo + DUPLICATE_SLICE_ROWS, len(order))
        window = ids.take(pa.array(order[lo - 1:hi]))
        same[lo:hi] = pc.equal(window[1:], window[:-1]).to_numpy(zero_copy_only=False)
    run_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))
    rows, firsts = order[same].astype(np.int64), order[run_start[same]].astype(np.int64)
    by_row = np.argsort(rows)
    return rows[by_row], firsts[by_row]


def _canonical(t: pa.Table, start: int, duplicates: tuple[np.ndarray, np.ndarray],
               data: InputDataset, renderer: Renderer | None = None) -> pa.Table:
    """The ``requests`` rows of one input batch, then the carried columns."""
    n = t.num_rows
    bad_values: dict[str, pa.ChunkedArray] = {}  # reason -> rows
    bad_text: dict[str, np.ndarray] = {}  # column (or part of one) -> rows
    out: dict[str, pa.Array | pa.ChunkedArray] = {}
    rendered: np.ndarray | None = None  # rows the template could not render: why
    for f in schemas.REQUESTS:
        if f.name == "row":
            out["row"] = pa.array(np.arange(start, start + n, dtype=np.int64))
        elif f.name == "reject_reason":
            continue
        elif f.name == "request_id":
            out["request_id"], bad = _ids(t.column(data.id_column), data.id_column)
            bad_text.update(bad)
        elif renderer is not None and f.name in schemas.PROMPTS_TEXT:
            if f.name == "prompt":
                out["prompt"], rendered = _render(renderer, t, bad_text)
            else:
                out["messages"] = pa.nulls(n, f.type)
        elif f.name not in t.column_names:
            out[f.name] = pa.nulls(n, f.type)
        elif f.name == "max_tokens":
            out["max_tokens"], bad_values = _max_tokens(t.column("max_tokens"))
        elif f.name in TEXT_FIELDS:
            out[f.name], bad = _text(t.column(f.name), f.type, f.name)
            bad_text.update(bad)
        else:
            out[f.name] = _cast(t.column(f.name), f.type)
    carried = {}
    for f in data.carried:
        col = t.column(f.name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if _is_string(col.type) and pa.types.is_string(f.type):
            col, bad = _text(col, f.type, f.name)
            bad_text.update(bad)
        carried[f.name] = col.cast(f.type)
    out["reject_reason"] = _reject_reasons(out, start, duplicates, bad_values, bad_text,
                                           data.id_column, rendered)
    table = pa.table(out, schema=schemas.REQUESTS)
    for f in data.carried:
        table = table.append_column(f, carried[f.name])
    return table


def _ids(col: pa.ChunkedArray, name: str = "request_id"
         ) -> tuple[pa.ChunkedArray, dict[str, np.ndarray]]:
    """The id column as text: integers in decimal, text checked for valid UTF-8 (the rows
    that are not, by ``name``)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_integer(col.type):
        return col.cast(pa.string()), {}
    text, bad = _text(col, pa.string(), name)
    return text, {"request_id" if k == name else k: v for k, v in bad.items()}


def _render(renderer: Renderer, t: pa.Table, bad_text: dict[str, np.ndarray]
            ) -> tuple[pa.Array, np.ndarray]:
    """The template rendered over this batch, and the rows it could not render. Text columns
    are checked for valid UTF-8 first (their bad rows are not rendered)."""
    columns: dict[str, pa.Array] = {}
    for name in renderer.task.variables:
        col = t.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if _is_string(col.type):
            col, bad = _text(col, pa.string(), name)
            bad_text.update(bad)
        columns[name] = col.combine_chunks()
    return renderer.render(columns)


def _max_tokens(given: pa.ChunkedArray
                ) -> tuple[pa.ChunkedArray, dict[str, pa.ChunkedArray]]:
    """The column as int32 with the unusable values nulled, and those rows by reason.

    The bounds are checked in float64, not int64: a uint64 beyond 2^63 fits no int64 (the
    cast would raise for the whole batch), and every integer up to 2^53 is exact in a
    float64, so the comparison is exact at both bounds. A decimal must also be whole."""
    as_float = pc.cast(given, pa.float64(), safe=False)
    bad = {RANGE_REASON: pc.fill_null(pc.invert(pc.and_(
        pc.greater_equal(as_float, 1), pc.less_equal(as_float, MAX_TOKENS_LIMIT))), False)}
    if pa.types.is_decimal(given.type):
        bad[FRACTION_REASON] = pc.fill_null(pc.not_equal(given, pc.floor(given)), False)
    unusable = functools.reduce(pc.or_, bad.values())
    return pc.if_else(unusable, None, given).cast(pa.int32()), bad


def _cast(col: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(target)


def _text(col: pa.ChunkedArray, target: pa.DataType, name: str
          ) -> tuple[pa.ChunkedArray, dict[str, np.ndarray]]:
    """A text column as ``target`` with every row holding invalid UTF-8 nulled, and those rows
    by the part at fault (``prompt``, ``messages content``, ``tags``, ...).

    Writers do produce invalid UTF-8 (lone surrogates encoded as CESU-8, raw bytes), and
    nothing in reading a Parquet string column checks it: left in, it fails whatever decodes
    it later (Python, polars, a provider's JSON) and takes the whole job down. The column is
    handled as bytes until checked, since a cast from binary to string raises for the whole
    batch and casts between string types check nothing."""
    texts: list[pa.Array] = []
    bad: dict[str, np.ndarray] = {}
    done = 0
    for chunk in col.chunks:  # one at a time: no copy of a whole file's column
        text, chunk_bad = _text_chunk(chunk, target, name)
        texts.append(text)
        for part, rows in chunk_bad.items():
            bad.setdefault(part, np.zeros(len(col), dtype=bool))[done:done + len(rows)] = rows
        done += len(chunk)
    return pa.chunked_array(texts, type=target), bad


def _text_chunk(arr: pa.Array, target: pa.DataType, name: str
                ) -> tuple[pa.Array, dict[str, np.ndarray]]:
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    one_string = pa.types.is_list(target) and _is_string(arr.type)  # tags given as one string
    shape = pa.string() if one_string else target
    raw = arr.cast(_as_bytes(shape))
    bad = {part: rows for part, rows in _invalid_utf8(raw, name).items() if rows.any()}
    if bad:
        rows = np.logical_or.reduce(list(bad.values()))
        raw = pc.if_else(pa.array(rows), pa.scalar(None, raw.type), raw)
    text = raw.view(shape)
    if one_string:
        text = pa.ListArray.from_arrays(pa.array(np.arange(len(text) + 1, dtype=np.int32)),
                                        text, mask=text.is_null()).cast(target)
    return text, bad


def _as_bytes(t: pa.DataType) -> pa.DataType:
    """``t`` with binary for every string in it: the same memory layout, and no UTF-8 check
    on a cast to it."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_list(t):
        return pa.list_(_as_bytes(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _as_bytes(f.type)) for f in t])
    return t


# One well-formed UTF-8 sequence per alternative (RFC 3629: no overlong forms, no surrogates,
# nothing beyond U+10FFFF). Arrow runs RE2 on a binary array byte by byte (Latin-1 mode).
_UTF8 = (r"^(?:[\x00-\x7F]|[\xC2-\xDF][\x80-\xBF]|\xE0[\xA0-\xBF][\x80-\xBF]"
         r"|[\xE1-\xEC\xEE\xEF][\x80-\xBF]{2}|\xED[\x80-\x9F][\x80-\xBF]"
         r"|\xF0[\x90-\xBF][\x80-\xBF]{2}|[\xF1-\xF3][\x80-\xBF]{3}"
         r"|\xF4[\x80-\x8F][\x80-\xBF]{2})*$")


def _invalid_utf8(arr: pa.Array, part: str) -> dict[str, np.ndarray]:
    """Per part of ``arr`` (a type made by _as_bytes), its rows holding invalid UTF-8."""
    t = arr.type
    if pa.types.is_binary(t):
        try:  # Arrow's own check of the whole array is fast; most batches pass it
            arr.view(pa.string()).validate(full=True)
            return {part: np.zeros(len(arr), dtype=bool)}
        except pa.ArrowInvalid:
            ok = pc.match_substring_regex(arr, _UTF8)  # the rows at fault
            return {part: ~pc.fill_null(ok, True).to_numpy(zero_copy_only=False)}
    out: dict[str, np.ndarray] = {}
    if pa.types.is_list(t):
        parents = pc.list_parent_indices(arr).to_numpy()
        for key, items in _invalid_utf8(arr.flatten(), part).items():
            rows = np.zeros(len(arr), dtype=bool)
            rows[parents[items]] = True
            out[key] = rows
    elif pa.types.is_struct(t):
        for f, child in zip(t, arr.flatten(), strict=True):
            out.update(_invalid_utf8(child, f"{part} {f.name}"))
    return out


def _reject_reasons(cols: dict[str, pa.Array | pa.ChunkedArray], start: int,
                    duplicates: tuple[np.ndarray, np.ndarray],
                    bad_values: dict[str, pa.ChunkedArray],
                    bad_text: dict[str, np.ndarray], id_column: str = "request_id",
                    rendered: np.ndarray | None = None) -> pa.Array:
    n = len(cols["row"])
    reason = np.full(n, None, dtype=object)
    prompt, messages = cols["prompt"], cols["messages"]
    text_len = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(prompt, "")))
    # Messages count as empty when every content is blank.
    contents = _message_text(messages)
    msg_len = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(contents, "")))
    has_prompt = pc.is_valid(prompt).to_numpy(zero_copy_only=False)
    has_messages = pc.is_valid(messages).to_numpy(zero_copy_only=False)
    empty = np.where(has_prompt, text_len.to_numpy(zero_copy_only=False) == 0,
                     msg_len.to_numpy(zero_copy_only=False) == 0)
    rows, firsts = duplicates
    lo, hi = np.searchsorted(rows, [start, start + n])
    if hi > lo:
        offsets = rows[lo:hi] - start
        reason[offsets] = [f"duplicate {id_column} (first at input row {f})"
                           for f in firsts[lo:hi]]
    for why, where in bad_values.items():
        if pc.any(where).as_py():
            reason[where.to_numpy(zero_copy_only=False)] = why
    reason[empty & (has_prompt | has_messages)] = "empty prompt"
    reason[~has_prompt & ~has_messages] = "null prompt"
    if rendered is not None:  # the template's own reasons: a null it renders, a failure
        failed = rendered != None  # noqa: E711
        reason[failed] = rendered[failed]
    # Text nulled for invalid UTF-8 would otherwise read as a null prompt (or id).
    for part, where in bad_text.items():
        if part != "request_id":
            reason[where] = f"{part} is not valid UTF-8"
    # A blank id (empty, or only whitespace: an unfilled CHAR column, a stray space) is no
    # key to join results on, so it is rejected like a null one. Other ids are kept verbatim,
    # surrounding whitespace included.
    ids = cols["request_id"]
    blank_id = pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(ids, "")))
    reason[blank_id.to_numpy(zero_copy_only=False) == 0] = f"empty {id_column}"
    reason[~pc.is_valid(ids).to_numpy(zero_copy_only=False)] = f"null {id_column}"
    if "request_id" in bad_text:
        reason[bad_text["request_id"]] = f"{id_column} is not valid UTF-8"
    return pa.array(reason, type=pa.string())


def _message_text(messages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Per row, the message contents joined by newlines (null when messages is null)."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    contents = pc.struct_field(messages.flatten(), "content")
    joined = pa.ListArray.from_arrays(messages.offsets, pc.fill_null(contents, ""),
                                      mask=messages.is_null())
    return pc.binary_join(joined, "\n")


def request_text(requests: pa.Table) -> pa.Array:
    """The text a router and token estimate look at: the prompt, or the joined messages."""
    prompt = requests.column("prompt").combine_chunks()
    return pc.if_else(pc.is_valid(prompt), prompt,
                      _message_text(requests.column("messages")))
