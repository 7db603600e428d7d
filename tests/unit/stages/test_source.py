"""Source stage: every writer's strings, every layout, every bad row kept with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import schemas
from batchroute.errors import SchemaError
from batchroute.stages import source


def _read(uri: str | Path) -> pa.Table:
    return pa.concat_tables(source.read_requests(source.open_input(str(uri)), batch_rows=3))


def _reasons(t: pa.Table) -> dict[str, str | None]:
    return dict(zip(t.column("row").to_pylist(), t.column("reject_reason").to_pylist(),
                    strict=True))


def test_canonical_schema_and_row_order(tmp_path: Path) -> None:
    pq.write_table(pa.table({"request_id": ["a", "b", "c", "d"],
                             "prompt": ["one", "two", "three", "four"],
                             "max_tokens": pa.array([5, None, 7, 8], pa.int64()),
                             "tags": ["x", None, "y", "z"]}), tmp_path / "p.parquet")
    t = _read(tmp_path / "p.parquet")
    assert t.schema == schemas.REQUESTS
    assert t.column("row").to_pylist() == [0, 1, 2, 3]
    assert t.column("max_tokens").to_pylist() == [5, None, 7, 8]
    assert t.column("tags").to_pylist() == [["x"], None, ["y"], ["z"]]
    assert t.column("reject_reason").null_count == 4


@pytest.mark.parametrize("writer", ["pandas", "polars", "duckdb", "dictionary", "large",
                                    "view"])
def test_strings_from_every_writer(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "in.parquet"
    ids, prompts = ["r1", "r2", "r3"], ["What is 2+2?", "Summarise this.", "Hi"]
    if writer == "pandas":
        import pandas as pd

        pd.DataFrame({"request_id": ids, "prompt": pd.Categorical(prompts)}).to_parquet(path)
    elif writer == "polars":
        import polars as pl

        pl.DataFrame({"request_id": ids, "prompt": prompts}).write_parquet(path)
    elif writer == "duckdb":
        import duckdb

        con = duckdb.connect()
        con.execute("CREATE TABLE t (request_id VARCHAR, prompt VARCHAR)")
        con.executemany("INSERT INTO t VALUES (?, ?)", list(zip(ids, prompts, strict=True)))
        con.execute(f"COPY t TO '{path}' (FORMAT PARQUET)")
    else:
        typ = {"dictionary": pa.dictionary(pa.int8(), pa.string()),
               "large": pa.large_string(), "view": pa.string_view()}[writer]
        pq.write_table(pa.table({"request_id": pa.array(ids, pa.large_string()),
                                 "prompt": pa.array(prompts).cast(typ)}), path)
    t = _read(path)
    assert t.column("request_id").to_pylist() == ids
    assert t.column("prompt").to_pylist() == prompts


def test_folder_glob_and_hive_layouts(tmp_path: Path) -> None:
    for day, ids in (("2026-11-01", ["a", "b"]), ("2026-11-02", ["c"])):
        (tmp_path / f"day={day}").mkdir()
        pq.write_table(pa.table({"request_id": ids, "prompt": ["p"] * len(ids)}),
                       tmp_path / f"day={day}" / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "day=2026-11-01" / ".part-1.parquet.tmp").write_text("half written")
    assert _read(tmp_path).column("request_id").to_pylist() == ["a", "b", "c"]
    assert _read(f"{tmp_path}/day=2026-11-0[2]/*.parquet").column(
        "request_id").to_pylist() == ["c"]


def test_files_that_are_not_parquet_are_skipped_and_listed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["p"]}), tmp_path / "1.parquet")
    # Hive and Spark part files often have no extension: their magic bytes say Parquet.
    pq.write_table(pa.table({"request_id": ["b"], "prompt": ["p"]}), tmp_path / "000001_0")
    (tmp_path / "README").write_text("These are the prompts of 2026-11-01.\n")
    (tmp_path / "SUCCESS").write_text("")
    (tmp_path / "notes.md").write_text("# notes\n")
    (tmp_path / "PAR1-ish").write_bytes(b"PAR")  # too short to be anything
    (tmp_path / "_SUCCESS").write_text("")  # hidden by convention: neither read nor listed
    with caplog.at_level("WARNING", logger="batchroute"):
        data = source.open_input(str(tmp_path))
    assert [f.path for f in data.files] == [str(tmp_path / "000001_0"),
                                            str(tmp_path / "1.parquet")]
    skipped = [str(tmp_path / n) for n in ("PAR1-ish", "README", "SUCCESS", "notes.md")]
    assert list(data.skipped) == skipped
    assert f"skipped 4 files that are not Parquet: {', '.join(skipped)}" in caplog.text
    assert pa.concat_tables(source.read_requests(data)).column("request_id").to_pylist() == [
        "b", "a"]


def test_a_folder_without_parquet_is_still_an_error(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("nothing here yet")
    with pytest.raises(SchemaError, match=rf"input {tmp_path}: no Parquet files found \(not "
                                          rf"Parquet, so skipped: {tmp_path}/README\)"):
        source.open_input(str(tmp_path))


def test_a_truncated_or_broken_parquet_file_in_a_folder_is_refused_not_skipped(
        tmp_path: Path) -> None:
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["p"]}), tmp_path / "whole")
    data = (tmp_path / "whole").read_bytes()
    (tmp_path / "half").write_bytes(data[:len(data) // 2])
    with pytest.raises(SchemaError, match=rf"input file {tmp_path}/half: starts as Parquet "
                                          "but has no footer"):
        source.open_input(str(tmp_path))
    (tmp_path / "half").unlink()
    (tmp_path / "broken.parquet").write_text("a Parquet name is a promise")
    with pytest.raises(SchemaError, match=rf"input file {tmp_path}/broken\.parquet: not a "
                                          "readable Parquet file"):
        source.open_input(str(tmp_path))


def test_a_glob_takes_parquet_whatever_its_extension(tmp_path: Path) -> None:
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["p"]}), tmp_path / "x.dat")
    (tmp_path / "y.dat").write_text("text")
    data = source.open_input(f"{tmp_path}/*.dat")
    assert [f.path for f in data.files] == [str(tmp_path / "x.dat")]
    assert list(data.skipped) == [str(tmp_path / "y.dat")]


def test_glob_stays_within_one_folder_level(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    for path, rid in (("a.parquet", "a"), ("sub/b.parquet", "b")):
        pq.write_table(pa.table({"request_id": [rid], "prompt": ["p"]}), tmp_path / path)
    assert _read(f"{tmp_path}/*.parquet").column("request_id").to_pylist() == ["a"]
    assert _read(f"{tmp_path}/**/*.parquet").column("request_id").to_pylist() == ["a", "b"]
    monkeypatch.chdir(tmp_path)
    assert _read("*.parquet").column("request_id").to_pylist() == ["a"]
    with pytest.raises(SchemaError, match="no Parquet files found"):
        source.open_input(f"{tmp_path}/*.csv")


def test_messages_input_and_request_text(tmp_path: Path) -> None:
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
            [{"role": "user", "content": "   "}]]
    pq.write_table(pa.table({"request_id": ["m1", "m2"], "messages": msgs}),
                   tmp_path / "m.parquet")
    t = _read(tmp_path / "m.parquet")
    assert source.request_text(t).to_pylist() == ["Be brief.\nWhy?", "   "]
    assert _reasons(t) == {0: None, 1: "empty prompt"}


def test_bad_rows_are_kept_with_reasons(tmp_path: Path) -> None:
    pq.write_table(pa.table({
        "request_id": ["a", "b", "c", "a", None, "d", "c"],
        "prompt": ["ok", None, "", "again", "no id", " \t\n", "third"],
    }), tmp_path / "bad.parquet")
    assert _reasons(_read(tmp_path / "bad.parquet")) == {
        0: None, 1: "null prompt", 2: "empty prompt",
        3: "duplicate request_id (first at input row 0)", 4: "null request_id",
        5: "empty prompt", 6: "duplicate request_id (first at input row 2)"}


def test_blank_request_ids_are_rejected(tmp_path: Path) -> None:
    pq.write_table(pa.table({"request_id": ["", " ", "\t\n", " a ", "", "b"],
                             "prompt": ["p"] * 6}), tmp_path / "ids.parquet")
    t = _read(tmp_path / "ids.parquet")
    assert _reasons(t) == {0: "empty request_id", 1: "empty request_id", 2: "empty request_id",
                           3: None, 4: "empty request_id", 5: None}
    assert t.column("request_id").to_pylist()[3] == " a "  # a real id is kept as given


# A lone surrogate as CESU-8 and Java's "modified UTF-8" write it, a stray Latin-1 byte, a
# truncated sequence and an overlong "/": none is UTF-8, and Parquet readers check none of them.
INVALID = [b"caf\xed\xa0\x80", b"caf\xe9", b"\xe2\x82", b"\xc0\xaf"]


def _unchecked(values: list[bytes | None], typ: pa.DataType | None = None) -> pa.Array:
    """A string array (or ``typ``) holding these bytes as they are, valid UTF-8 or not."""
    typ = typ or pa.string()
    raw = pa.array(values, pa.binary())
    if pa.types.is_binary(typ):
        return raw
    text = raw.view(pa.string())
    return text.dictionary_encode() if pa.types.is_dictionary(typ) else text.cast(typ)


@pytest.mark.parametrize("typ", [pa.string(), pa.large_string(), pa.string_view(),
                                 pa.dictionary(pa.int32(), pa.string()), pa.binary(),
                                 pa.large_binary()], ids=str)
def test_invalid_utf8_prompts_are_rejected_rows(tmp_path: Path, typ: pa.DataType) -> None:
    prompts = [b"fine", *INVALID, "na\u00efve \U0001f600".encode(), None]
    pq.write_table(pa.table({"request_id": [f"r{i}" for i in range(len(prompts))],
                             "prompt": _unchecked(prompts, typ)}), tmp_path / "u.parquet")
    t = _read(tmp_path / "u.parquet")
    t.validate(full=True)  # what comes out is valid UTF-8 throughout
    assert _reasons(t) == {0: None, **dict.fromkeys(range(1, 5), "prompt is not valid UTF-8"),
                           5: None, 6: "null prompt"}
    assert t.column("prompt").to_pylist() == ["fine", None, None, None, None,
                                              "na\u00efve \U0001f600", None]


def test_invalid_utf8_in_any_text_column_names_it(tmp_path: Path) -> None:
    bad = INVALID[0]
    msg = pa.struct([("role", pa.binary()), ("content", pa.binary())])
    messages = pa.array([None, None, [{"role": b"user", "content": bad}],
                         [{"role": b"sys", "content": b"ok"}, {"role": bad, "content": b"ok"}],
                         None, None, None], pa.list_(msg))
    table = pa.table({
        "request_id": _unchecked([b"a", bad, b"c", b"d", b"e", b"f", b"g"]),
        "prompt": _unchecked([b"p", b"p", None, None, b"p", b"p", b"p"]),
        "messages": messages.view(pa.list_(schemas.MESSAGE)),
        "force_model": _unchecked([None, None, None, None, bad, None, None]),
        "tags": pa.array([None, None, None, None, None, [b"ok", bad], [b"x"]],
                         pa.list_(pa.binary())).view(pa.list_(pa.string())),
    })
    pq.write_table(table, tmp_path / "u.parquet")
    t = _read(tmp_path / "u.parquet")
    t.validate(full=True)
    assert _reasons(t) == {0: None, 1: "request_id is not valid UTF-8",
                           2: "messages content is not valid UTF-8",
                           3: "messages role is not valid UTF-8",
                           4: "force_model is not valid UTF-8", 5: "tags is not valid UTF-8",
                           6: None}
    assert t.column("tags").to_pylist()[5:] == [None, ["x"]]


def test_invalid_utf8_in_a_tags_string_and_among_duplicates(tmp_path: Path) -> None:
    bad = INVALID[1]
    pq.write_table(pa.table({"request_id": _unchecked([b"a", bad, bad, b"a"]),
                             "prompt": ["p"] * 4,
                             "tags": _unchecked([b"team", bad, None, b"x"])}),
                   tmp_path / "u.parquet")
    t = _read(tmp_path / "u.parquet")
    assert _reasons(t) == {0: None, 1: "request_id is not valid UTF-8",
                           2: "request_id is not valid UTF-8",
                           3: "duplicate request_id (first at input row 0)"}
    assert t.column("tags").to_pylist() == [["team"], None, None, ["x"]]


def test_impossible_max_tokens_are_rejected_not_fatal(tmp_path: Path) -> None:
    pq.write_table(pa.table({"request_id": ["a", "b", "c", "d"], "prompt": ["p"] * 4,
                             "max_tokens": pa.array([0, 2**40, None, 64], pa.int64())}),
                   tmp_path / "m.parquet")
    t = _read(tmp_path / "m.parquet")
    assert _reasons(t) == {0: "max_tokens must be between 1 and 2147483647",
                           1: "max_tokens must be between 1 and 2147483647", 2: None, 3: None}
    assert t.column("max_tokens").to_pylist() == [None, None, None, 64]


@pytest.mark.parametrize(("typ", "values", "bad"), [
    (pa.uint64(), [5, None, 2**63, 2**64 - 1, 2**31, 2**31 - 1, 0], {2, 3, 4, 6}),
    (pa.uint32(), [5, 2**32 - 1, 2**31 - 1], {1}),
    (pa.uint8(), [1, 255, 0], {2}),
    (pa.int8(), [-128, 127, None], {0}),
])
def test_max_tokens_of_every_integer_type(tmp_path: Path, typ: pa.DataType,
                                          values: list[int | None], bad: set[int]) -> None:
    pq.write_table(pa.table({"request_id": [f"r{i}" for i in range(len(values))],
                             "prompt": ["p"] * len(values), "max_tokens": pa.array(values, typ)}),
                   tmp_path / "m.parquet")
    t = _read(tmp_path / "m.parquet")
    assert _reasons(t) == {i: "max_tokens must be between 1 and 2147483647" if i in bad else None
                           for i in range(len(values))}
    assert t.column("max_tokens").to_pylist() == [
        None if i in bad else v for i, v in enumerate(values)]


def test_decimal_numbers_as_duckdb_writes_them(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "duck.parquet"
    duckdb.connect().execute(
        "COPY (SELECT * FROM (VALUES ('a', 'p', 0.2, 64.0), ('b', 'p', 1.5, 2.5), "
        "('c', 'p', 0.0, 0.0), ('d', 'p', NULL, 9999999999.0), ('e', 'p', 1, NULL)) "
        f"AS t(request_id, prompt, temperature, max_tokens)) TO '{path}' (FORMAT PARQUET)")
    schema = pq.read_schema(path)
    assert pa.types.is_decimal(schema.field("temperature").type)
    assert pa.types.is_decimal(schema.field("max_tokens").type)
    t = _read(path)
    assert t.column("temperature").to_pylist() == pytest.approx([0.2, 1.5, 0.0, None, 1.0])
    assert t.column("max_tokens").to_pylist() == [64, None, None, None, None]
    assert _reasons(t) == {0: None, 1: "max_tokens must be a whole number",
                           2: "max_tokens must be between 1 and 2147483647",
                           3: "max_tokens must be between 1 and 2147483647", 4: None}


def test_decimal256_max_tokens(tmp_path: Path) -> None:
    from decimal import Decimal

    values = [Decimal("12"), Decimal("1e60"), Decimal("-3"), Decimal("7.000")]
    pq.write_table(pa.table({"request_id": list("abcd"), "prompt": ["p"] * 4,
                             "max_tokens": pa.array(values, pa.decimal256(70, 3))}),
                   tmp_path / "d.parquet")
    t = _read(tmp_path / "d.parquet")
    assert t.column("max_tokens").to_pylist() == [12, None, None, 7]
    assert [r is None for r in t.column("reject_reason").to_pylist()] == [True, False, False,
                                                                          True]


def test_duplicates_across_files_keep_the_first(tmp_path: Path) -> None:
    pq.write_table(pa.table({"request_id": ["x", "y"], "prompt": ["1", "2"]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"request_id": ["y", "z"], "prompt": ["3", "4"]}),
                   tmp_path / "b.parquet")
    assert _reasons(_read(tmp_path)) == {
        0: None, 1: None, 2: "duplicate request_id (first at input row 1)", 3: None}


@pytest.mark.parametrize(("table", "needle"), [
    (pa.table({"prompt": ["x"]}), "missing required column 'request_id'"),
    (pa.table({"request_id": ["x"], "text": ["x"]}), "missing column 'prompt'"),
    (pa.table({"request_id": [1.0], "prompt": ["x"]}),
     "column 'request_id' has type double, expected a string or an integer"),
    (pa.table({"request_id": [["a"]], "prompt": ["x"]}), "column 'request_id' has type list"),
    (pa.table({"request_id": ["x"], "prompt": [1.5]}), "column 'prompt' has type double"),
    (pa.table({"request_id": ["x"], "prompt": ["x"], "max_tokens": ["lots"]}),
     "column 'max_tokens' has type string, expected an integer"),
    (pa.table({"request_id": ["x"], "messages": [["hi"]]}), "column 'messages' has type"),
])
def test_schema_errors_name_file_and_column(tmp_path: Path, table: pa.Table,
                                            needle: str) -> None:
    pq.write_table(pa.table({"request_id": ["ok"], "prompt": ["fine"]}), tmp_path / "a.parquet")
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match=needle) as err:
        source.open_input(str(tmp_path))
    assert str(tmp_path / "b.parquet") in str(err.value)


def _three_row_groups(path: Path, **options: Any) -> None:
    n = 300
    pq.write_table(pa.table({"request_id": [f"r{i}" for i in range(n)],
                             "prompt": [f"question number {i} " * 20 for i in range(n)]}),
                   path, row_group_size=100, **options)


@pytest.mark.parametrize(("column", "options"), [
    ("prompt", {}),  # snappy, pyarrow's default: the page no longer decompresses
    ("request_id", {}),  # found by the pass that looks for repeated ids
    # Uncompressed, the bytes would decode as other text: the page checksum catches it.
    ("prompt", {"compression": "none", "write_page_checksum": True}),
], ids=["snappy", "request_id", "checksum"])
def test_a_corrupt_data_page_names_the_file_and_row_group(tmp_path: Path, column: str,
                                                          options: dict[str, Any]) -> None:
    from tests.helpers import corrupt_page

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["p"]}), tmp_path / "in" / "0.parquet")
    path = tmp_path / "in" / "1.parquet"
    _three_row_groups(path, **options)
    corrupt_page(path, 1, column)
    data = source.open_input(str(tmp_path / "in"))  # the footer is intact
    with pytest.raises(source.UnreadableInput,
                       match=rf"input file {path}: row group 1 cannot be read \(.+\); nothing "
                             "was sent") as err:
        _read(tmp_path / "in")
    assert isinstance(err.value, SchemaError) and err.value.exit_code == 2
    assert len(data.files) == 2


def test_a_failure_that_does_not_reproduce_is_not_called_corrupt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _three_row_groups(tmp_path / "p.parquet")
    real = pq.ParquetFile.iter_batches

    def dropped(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        yield next(real(self, *args, **kwargs))
        raise OSError("connection reset by peer")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", dropped)
    with pytest.raises(OSError, match="connection reset by peer"):
        _read(tmp_path / "p.parquet")


def test_missing_input_and_non_parquet(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="no such file"):
        source.open_input(str(tmp_path / "nope.parquet"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        source.open_input(str(tmp_path / "x.parquet"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "", " ", None]),
                          st.sampled_from(["hello", "", "  ", None, "x y"])),
                min_size=1, max_size=30))
def test_every_input_row_comes_out_once(tmp_path_factory: pytest.TempPathFactory,
                                        rows: list[tuple[str | None, str | None]]) -> None:
    path = tmp_path_factory.mktemp("prop") / "in.parquet"
    ids, prompts = zip(*rows, strict=True)
    pq.write_table(pa.table({"request_id": pa.array(ids, pa.string()),
                             "prompt": pa.array(prompts, pa.string())}), path)
    t = _read(path)
    assert t.column("row").to_pylist() == list(range(len(rows)))
    accepted = [i for i, r in zip(t.column("request_id").to_pylist(),
                                  t.column("reject_reason").to_pylist(), strict=True)
                if r is None]
    assert len(accepted) == len(set(accepted))  # no id is accepted twice
    for (rid, prompt), reason in zip(rows, t.column("reject_reason").to_pylist(), strict=True):
        if rid is not None and rid.strip() and prompt is not None and prompt.strip():
            assert reason is None or reason.startswith("duplicate")
        else:
            assert reason is not None


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d", "é", ""])),
                max_size=60),
       st.integers(1, 7), st.integers(1, 5))
def test_duplicate_detection_matches_a_plain_reference(ids: list[str | None], chunk: int,
                                                       slice_rows: int) -> None:
    """The stable-sort detection, across chunk and slice boundaries, against a dict."""
    import numpy as np

    from batchroute.stages import source

    first: dict[str, int] = {}
    want_rows, want_firsts = [], []
    for i, rid in enumerate(ids):
        if rid is None:
            continue
        if rid in first:
            want_rows.append(i)
            want_firsts.append(first[rid])
        else:
            first[rid] = i
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)] or [[]]
    column = pa.chunked_array([pa.array(c, pa.string()) for c in chunks], pa.string())
    old, source.DUPLICATE_SLICE_ROWS = source.DUPLICATE_SLICE_ROWS, slice_rows
    try:
        rows, firsts = source._duplicates(column)
    finally:
        source.DUPLICATE_SLICE_ROWS = old
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(firsts, want_firsts)
