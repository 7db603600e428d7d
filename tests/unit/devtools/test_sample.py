"""batchroute.devtools.sample: the demo input generator. Reads the real MMLU labels file; no network."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import schemas
from batchroute.cli import build_parser
from batchroute.devtools.sample import (
    DEFAULT_MMLU_PATH,
    GIANT_CHARS,
    KINDS,
    MIX,
    SCHEMA,
    generate,
    write,
)
from batchroute.errors import ConfigError, SchemaError

ROWS = 20_000
FORCED = ("gpt-4-1106-preview", "mixtral-8x7b-instruct")


@pytest.fixture(scope="module")
def mmlu_path() -> Path:
    return DEFAULT_MMLU_PATH


@pytest.fixture(scope="module")
def table(mmlu_path: Path) -> pa.Table:
    return generate(ROWS, seed=7, mmlu_path=mmlu_path, force_models=FORCED)


@pytest.fixture(scope="module")
def rows(table: pa.Table) -> list[dict[str, object]]:
    return table.to_pylist()  # type: ignore[no-any-return]


def _of_kind(rows: list[dict[str, object]], kind: str) -> list[dict[str, object]]:
    return [r for r in rows if r["kind"] == kind]


def _prompts(rows: list[dict[str, object]], kind: str) -> list[str]:
    return [str(r["prompt"]) for r in _of_kind(rows, kind)]


# ---------------------------------------------------------------------------- shape


def test_schema_is_the_job_input_schema(table: pa.Table) -> None:
    """What the generator writes is what schemas/prompts.schema.json declares for the job's
    input, column for column (plus ``kind``, the demo's own statistic)."""
    assert table.schema.equals(SCHEMA)
    assert [f.name for f in table.schema if f.name != "kind"] == [
        f.name for f in schemas.PROMPTS if f.name in table.schema.names]
    for f in table.schema:
        if f.name != "kind":
            assert f.type == schemas.PROMPTS.field(f.name).type, f.name


def test_row_count_is_exact(table: pa.Table) -> None:
    assert table.num_rows == ROWS


@settings(max_examples=12, deadline=None)
@given(n=st.integers(min_value=0, max_value=400), seed=st.integers(0, 2**32))
def test_every_size_gives_exactly_that_many_rows(mmlu_path: Path, n: int, seed: int) -> None:
    small = generate(n, seed=seed, mmlu_path=mmlu_path)
    assert small.num_rows == n
    assert small.schema.equals(SCHEMA)
    assert set(small["kind"].to_pylist()) <= set(KINDS)


def test_negative_rows_are_refused(mmlu_path: Path) -> None:
    with pytest.raises(ValueError, match="rows"):
        generate(-1, mmlu_path=mmlu_path)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_table(mmlu_path: Path) -> None:
    a = generate(3_000, seed=11, mmlu_path=mmlu_path, force_models=FORCED)
    b = generate(3_000, seed=11, mmlu_path=mmlu_path, force_models=FORCED)
    assert a.equals(b)


def test_other_seed_other_table(mmlu_path: Path) -> None:
    a = generate(3_000, seed=11, mmlu_path=mmlu_path)
    b = generate(3_000, seed=12, mmlu_path=mmlu_path)
    assert not a["prompt"].equals(b["prompt"])


def test_rows_are_shuffled(rows: list[dict[str, object]]) -> None:
    first_kinds = {r["kind"] for r in rows[:200]}
    assert first_kinds >= {"faq", "mmlu", "code", "summarise"}


# ---------------------------------------------------------------------------- mix


def test_mix_is_roughly_right(table: pa.Table) -> None:
    counts = Counter(table["kind"].to_pylist())
    for kind, share in MIX.items():
        assert counts[kind] / ROWS == pytest.approx(share, abs=0.01), kind
    assert 10 <= counts["bad"] <= 30


def test_faq_prompts_are_short_questions(rows: list[dict[str, object]]) -> None:
    prompts = _prompts(rows, "faq")
    assert all(30 <= len(p) <= 200 for p in prompts)
    assert sum("?" in p for p in prompts) > 0.9 * len(prompts)
    assert len(set(prompts)) > 0.5 * len(prompts)


def test_mmlu_prompts_are_real_and_distinct(rows: list[dict[str, object]],
                                            mmlu_path: Path) -> None:
    real = set(pq.read_table(mmlu_path, columns=["prompt"])["prompt"].to_pylist())
    prompts = _prompts(rows, "mmlu")
    assert set(prompts) <= real
    # 7k questions fit in the file's ~9.8k distinct ones, so none repeats.
    assert len(set(prompts)) == len(prompts)


def test_mmlu_rows_get_their_own_request_ids(rows: list[dict[str, object]]) -> None:
    assert not any(str(r["request_id"]).startswith("mmlu-") for r in _of_kind(rows, "mmlu"))


def test_mmlu_reuses_questions_when_asked_for_more_than_the_file_has(tmp_path: Path) -> None:
    labels = tmp_path / "labels.parquet"
    questions = [f"Question {i}?\nA. yes\nB. no\nAnswer:" for i in range(5)]
    pq.write_table(pa.table({"prompt": questions * 2, "model": ["a"] * 5 + ["b"] * 5}), labels)
    small = generate(200, seed=1, mmlu_path=labels)
    mmlu = small.filter(pc.equal(small["kind"], "mmlu"))
    assert mmlu.num_rows > len(questions)
    assert set(mmlu["prompt"].to_pylist()) == set(questions)
    assert len(set(mmlu["request_id"].to_pylist())) == mmlu.num_rows


def test_code_prompts_hold_fenced_code(rows: list[dict[str, object]]) -> None:
    prompts = _prompts(rows, "code")
    assert all(200 <= len(p) <= 1_500 for p in prompts)
    assert all(p.count("```") >= 2 for p in prompts)
    fences = Counter(lang for p in prompts for lang in ("python", "javascript", "sql", "go", "rust")
                     if f"```{lang}\n" in p)
    assert set(fences) == {"python", "javascript", "sql", "go", "rust"}
    keywords = ("def ", "class ", "import ", "SELECT ", "func ", "fn ", "const ")
    assert all(any(k in p for k in keywords) for p in prompts)


def test_summarise_prompts_are_long_and_some_exceed_32k_tokens(
        rows: list[dict[str, object]]) -> None:
    prompts = _prompts(rows, "summarise")
    assert all(p.startswith("Summarise the following report in ") for p in prompts)
    giants = [p for p in prompts if len(p) > 150_000]
    assert 1 <= len(giants) <= 20
    assert all(len(p) >= GIANT_CHARS[0] for p in giants)
    assert all(len(p) // 4 > 32_768 for p in giants)
    assert all(3_000 <= len(p) <= 12_000 for p in prompts if len(p) <= 150_000)


def test_max_tokens_follow_the_kind(rows: list[dict[str, object]]) -> None:
    ranges = {"faq": (128, 256), "mmlu": (16, 64), "code": (384, 1024), "summarise": (300, 800)}
    for kind, (lo, hi) in ranges.items():
        values = [r["max_tokens"] for r in _of_kind(rows, kind)]
        set_values = [v for v in values if v is not None]
        assert all(lo <= v <= hi for v in set_values), kind  # type: ignore[operator]
        assert len(set_values) > 0.9 * len(values), kind
    assert any(r["max_tokens"] is None for r in rows)  # null: the job default


def test_tags_name_a_team(rows: list[dict[str, object]]) -> None:
    tags = [r["tags"] for r in rows]
    assert all(isinstance(t, list) and t and t[0].startswith("team:") for t in tags)
    assert ["team:platform", "nightly"] in tags


# ---------------------------------------------------------------------------- bad rows


def test_bad_rows_cover_every_variant(rows: list[dict[str, object]]) -> None:
    bad = _of_kind(rows, "bad")
    prompts = [r["prompt"] for r in bad]
    assert None in prompts
    assert "" in prompts
    assert any(isinstance(p, str) and p and not p.strip() for p in prompts)
    # Only bad rows are bad: every other row has a real prompt.
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip()
               for r in rows if r["kind"] != "bad")


def test_duplicate_ids_repeat_an_earlier_good_row(rows: list[dict[str, object]]) -> None:
    seen: dict[object, int] = {}
    duplicates = []
    for position, row in enumerate(rows):
        if row["request_id"] in seen:
            duplicates.append((seen[row["request_id"]], position))
        else:
            seen[row["request_id"]] = position
    assert duplicates
    for first, later in duplicates:
        assert rows[first]["kind"] != "bad"
        assert rows[later]["kind"] == "bad"
        assert rows[first]["prompt"] != rows[later]["prompt"]
    assert len(seen) == len(rows) - len(duplicates)


def test_small_samples_still_carry_every_bad_variant(mmlu_path: Path) -> None:
    small = generate(200, seed=5, mmlu_path=mmlu_path).to_pylist()
    prompts = [r["prompt"] for r in small if r["kind"] == "bad"]
    assert None in prompts
    assert "" in prompts
    assert any(p and not p.strip() for p in prompts)
    ids = [r["request_id"] for r in small]
    assert len(set(ids)) == len(ids) - 1


# ---------------------------------------------------------------------------- force_model


def test_force_model_on_about_half_a_percent(rows: list[dict[str, object]]) -> None:
    forced = [r["force_model"] for r in rows if r["force_model"] is not None]
    assert len(forced) / ROWS == pytest.approx(0.005, abs=0.001)
    assert set(forced) == set(FORCED)


def test_no_force_model_by_default(mmlu_path: Path) -> None:
    assert generate(2_000, mmlu_path=mmlu_path)["force_model"].null_count == 2_000


# ---------------------------------------------------------------------------- labels file


def test_missing_mmlu_file_is_a_config_error_naming_path_and_flag(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "mmlu_labels.parquet"
    with pytest.raises(ConfigError) as info:
        generate(100, mmlu_path=missing)
    assert str(missing) in str(info.value)
    assert "--mmlu" in str(info.value)


def test_labels_file_without_prompt_column_is_a_schema_error(tmp_path: Path) -> None:
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"question": ["x"]}), labels)
    with pytest.raises(SchemaError, match="prompt"):
        generate(100, mmlu_path=labels)


def test_unreadable_labels_file_is_a_config_error(tmp_path: Path) -> None:
    labels = tmp_path / "labels.parquet"
    labels.write_text("not parquet")
    with pytest.raises(ConfigError, match="--mmlu"):
        generate(100, mmlu_path=labels)


# ---------------------------------------------------------------------------- write + CLI


def test_write_is_atomic_and_round_trips(tmp_path: Path, mmlu_path: Path) -> None:
    small = generate(500, seed=2, mmlu_path=mmlu_path)
    out = tmp_path / "deep" / "er" / "prompts.parquet"
    write(small, str(out))
    assert pq.read_table(out).equals(small)
    assert list(out.parent.iterdir()) == [out]


def test_cli_writes_file_and_reports_counts(tmp_path: Path, mmlu_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    out = tmp_path / "demo" / "prompts.parquet"
    args = parser.parse_args(["sample", "--out", str(out), "--rows", "1000", "--seed", "3",
                              "--mmlu", str(mmlu_path), "--force-model", "a",
                              "--force-model", "b"])
    assert args.func(args) == 0

    written = pq.read_table(out)
    assert written.equals(generate(1000, seed=3, mmlu_path=mmlu_path, force_models=["a", "b"]))
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert str(out) in line
    assert "1,000 rows" in line
    for kind in KINDS:
        assert kind in line


def test_cli_refuses_negative_rows(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--out", "x.parquet", "--rows", "-5"])
    assert "--rows" in capsys.readouterr().err
