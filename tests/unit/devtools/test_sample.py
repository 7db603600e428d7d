"""batchroute.devtools.sample and sample_tables: the demo input generator and the task tables
(tickets, invoices). Reads the real MMLU labels file; no network."""

from __future__ import annotations

import datetime as dt
import re
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
from batchroute.devtools.sample_tables import (
    CATEGORIES,
    CURRENCIES,
    INVOICES_SCHEMA,
    LONG_CHARS,
    TICKET_BANKS,
    TICKETS_SCHEMA,
    VENDORS,
    generate_invoices,
    generate_tickets,
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


def test_cli_kind_prompts_is_the_default_file_and_line(tmp_path: Path, mmlu_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--kind prompts writes exactly what no --kind writes, and prints the same line."""
    parser = build_parser()
    lines = []
    for name, extra in (("default", []), ("explicit", ["--kind", "prompts"])):
        out = tmp_path / name / "prompts.parquet"
        args = parser.parse_args(["sample", "--out", str(out), "--rows", "600", "--seed", "4",
                                  *extra])
        assert args.func(args) == 0
        assert pq.read_table(out).equals(generate(600, seed=4, mmlu_path=mmlu_path))
        lines.append(capsys.readouterr().out.strip().replace(str(out), "OUT"))
    assert lines[0] == lines[1]
    assert lines[0].startswith("sample: wrote 600 rows to OUT (faq ")


# ============================================================================ tickets

TICKET_ROWS = 20_000


@pytest.fixture(scope="module")
def tickets() -> pa.Table:
    return generate_tickets(TICKET_ROWS, seed=7)


@pytest.fixture(scope="module")
def ticket_rows(tickets: pa.Table) -> list[dict[str, object]]:
    return tickets.to_pylist()  # type: ignore[no-any-return]


def _fragments(templates: tuple[str, ...]) -> list[str]:
    """The longest literal piece of each template: what every text rendered from it holds."""
    return [max(re.split(r"\{[a-z0-9]+\}", t), key=len) for t in templates]


def _is_long(text: object) -> bool:
    return isinstance(text, str) and len(text) >= LONG_CHARS[0]


def test_tickets_schema_and_types(tickets: pa.Table) -> None:
    assert tickets.schema.equals(TICKETS_SCHEMA)
    assert tickets.num_rows == TICKET_ROWS
    types = {f.name: f.type for f in tickets.schema}
    assert types == {"ticket_id": pa.int64(), "subject": pa.string(), "body": pa.string(),
                     "priority": pa.string(), "customer_tier": pa.string(),
                     "created_at": pa.timestamp("us", tz="UTC"), "category": pa.string()}
    nulls = {name: tickets[name].null_count for name in tickets.schema.names}
    assert nulls.pop("body") > 0
    assert set(nulls.values()) == {0}


def test_ticket_ids_are_unique_realistic_and_follow_creation_time(tickets: pa.Table) -> None:
    ids = tickets["ticket_id"].to_numpy()
    assert len(set(ids.tolist())) == len(ids)
    assert 100_000 <= ids.min() < 110_000
    gaps = ids[1:] - ids[:-1]
    assert (gaps >= 1).all() and (gaps > 1).mean() > 0.2  # increasing, with gaps
    times = tickets["created_at"].to_pylist()
    assert times == sorted(times)
    start = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    assert start <= times[0] and times[-1] < start + dt.timedelta(days=4)
    assert len({t.date() for t in times}) == 4


def test_ticket_null_and_long_bodies_have_their_shares(ticket_rows: list[dict[str, object]]
                                                        ) -> None:
    bodies = [r["body"] for r in ticket_rows]
    assert sum(b is None for b in bodies) / TICKET_ROWS == pytest.approx(0.02, abs=0.003)
    long = [b for b in bodies if _is_long(b)]
    assert len(long) / TICKET_ROWS == pytest.approx(0.01, abs=0.002)
    assert all(LONG_CHARS[0] <= len(b) <= LONG_CHARS[1] for b in long)  # type: ignore[arg-type]
    # Everything else is an ordinary ticket, nowhere near long.
    assert all(len(b) < 2_000 for b in bodies if isinstance(b, str) and not _is_long(b))
    # A long body is a ticket followed by a pasted log or a quoted thread.
    long_rows = [r for r in ticket_rows if _is_long(r["body"])]
    logs = [r for r in long_rows if "Z ERROR " in str(r["body"]) or "Z INFO " in str(r["body"])]
    threads = [r for r in long_rows if " wrote:\n> " in str(r["body"])]
    assert len(logs) + len(threads) == len(long_rows)
    assert logs and all(r["category"] == "bug" for r in logs)
    assert {r["category"] for r in threads} == set(CATEGORIES)


def test_ticket_categories_are_all_present_in_their_shares(tickets: pa.Table) -> None:
    counts = Counter(tickets["category"].to_pylist())
    assert set(counts) == set(CATEGORIES)
    shares = {c: counts[c] / TICKET_ROWS for c in CATEGORIES}
    expected = {"billing": 0.24, "bug": 0.28, "how-to": 0.22, "account": 0.16, "other": 0.10}
    for category, share in expected.items():
        assert shares[category] == pytest.approx(share, abs=0.015), category


def test_ticket_subjects_and_bodies_agree_with_their_category(
        ticket_rows: list[dict[str, object]]) -> None:
    """Each subject holds a piece of one of its category's subject templates and none of any
    other category's; each body holds one of its category's sentences and none of another's."""
    subjects = {c: _fragments(TICKET_BANKS[c].subjects) for c in CATEGORIES}
    sentences = {c: _fragments(TICKET_BANKS[c].sentences) for c in CATEGORIES}
    assert min(len(f) for fs in (*subjects.values(), *sentences.values()) for f in fs) >= 8
    sample = ticket_rows[::4] + [r for r in ticket_rows if _is_long(r["body"])]
    for row in sample:
        own, subject, body = str(row["category"]), str(row["subject"]), row["body"]
        assert any(f in subject for f in subjects[own]), (own, subject)
        for other in CATEGORIES:
            if other != own:
                assert not any(f in subject for f in subjects[other]), (own, other, subject)
        if body is None:
            continue
        assert any(f in body for f in sentences[own]), (own, body[:300])
        for other in CATEGORIES:
            if other != own:
                assert not any(f in body for f in sentences[other]), (own, other, body[:300])


def test_ticket_bodies_have_two_to_eight_sentences(ticket_rows: list[dict[str, object]]) -> None:
    counts = Counter(len(re.findall(r"[.!?](?=\s|$)", str(r["body"]))) for r in ticket_rows
                     if r["body"] is not None and not _is_long(r["body"]))
    assert min(counts) == 2 and max(counts) == 8
    greeted = [r for r in ticket_rows if str(r["body"]).startswith(("Hi", "Hello", "Dear"))]
    assert 0.6 < len(greeted) / TICKET_ROWS < 0.9


def test_ticket_priorities_and_tiers_are_skewed(tickets: pa.Table) -> None:
    priority = Counter(tickets["priority"].to_pylist())
    assert set(priority) == {"low", "normal", "high", "urgent"}
    assert priority["normal"] > TICKET_ROWS / 2 > priority["low"] > priority["urgent"]
    tier = Counter(tickets["customer_tier"].to_pylist())
    assert set(tier) == {"free", "pro", "enterprise"}
    assert tier["free"] > tier["pro"] > tier["enterprise"] > 0.05 * TICKET_ROWS
    urgent_bugs = tickets.filter(pc.and_(pc.equal(tickets["category"], "bug"),
                                         pc.equal(tickets["priority"], "urgent"))).num_rows
    urgent_other = tickets.filter(pc.and_(pc.equal(tickets["category"], "other"),
                                          pc.equal(tickets["priority"], "urgent"))).num_rows
    assert urgent_bugs > 5 * urgent_other


def test_tickets_same_seed_same_table_other_seed_other_table() -> None:
    a = generate_tickets(3_000, seed=11)
    assert a.equals(generate_tickets(3_000, seed=11))
    b = generate_tickets(3_000, seed=12)
    assert not a["body"].equals(b["body"])
    assert not a["ticket_id"].equals(b["ticket_id"])


@settings(max_examples=10, deadline=None)
@given(n=st.integers(min_value=0, max_value=300), seed=st.integers(0, 2**32))
def test_every_ticket_count_gives_exactly_that_many_rows(n: int, seed: int) -> None:
    small = generate_tickets(n, seed=seed)
    assert small.num_rows == n
    assert small.schema.equals(TICKETS_SCHEMA)
    assert small["subject"].null_count == 0


def test_negative_ticket_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="rows"):
        generate_tickets(-1)
    with pytest.raises(ValueError, match="seed"):
        generate_invoices(10, seed=-1)


# ============================================================================ invoices

INVOICE_ROWS = 20_000
_MONEY = re.compile(r"\d{1,3}(?:[.,]\d{3})*[.,]\d{2}(?!\d)")
_RATE = {v.name: v.tax_rate for v in VENDORS}


@pytest.fixture(scope="module")
def invoices() -> pa.Table:
    return generate_invoices(INVOICE_ROWS, seed=7)


@pytest.fixture(scope="module")
def invoice_rows(invoices: pa.Table) -> list[dict[str, object]]:
    return invoices.to_pylist()  # type: ignore[no-any-return]


def _last_money(line: str) -> int:
    """The last amount on a line, in cents, whether written 1,234.56 or 1.234,56."""
    return int(re.sub(r"[.,]", "", _MONEY.findall(line)[-1]))


def _parse_invoice(text: str) -> tuple[list[tuple[int, int, int]], int, int, int]:
    """(quantity, unit cents, amount cents) per line item, then subtotal, tax and total, read
    back from any of the three layouts."""
    lines = text.split("\n")
    rules = [i for i, line in enumerate(lines) if len(line) >= 40 and set(line) == {"-"}]
    items = []
    for i, line in enumerate(lines):
        if line.startswith("- "):                       # the email
            qty = int(re.search(r": (\d+) x ", line).group(1))  # type: ignore[union-attr]
        elif re.match(r"\d+ \| ", line):                # the pipe table
            qty = int(line.split(" | ")[2])
        elif rules and rules[0] < i < rules[1]:         # the fixed-width table
            qty = int(line.split()[-3])
        else:
            continue
        amounts = [int(re.sub(r"[.,]", "", m)) for m in _MONEY.findall(line)]
        items.append((qty, amounts[-2], amounts[-1]))
    at = next(i for i, line in enumerate(lines)
              if line.strip().startswith(("Subtotal", "Net total")))
    return items, _last_money(lines[at]), _last_money(lines[at + 1]), _last_money(lines[at + 2])


def test_invoices_schema_and_types(invoices: pa.Table) -> None:
    assert invoices.schema.equals(INVOICES_SCHEMA)
    assert invoices.num_rows == INVOICE_ROWS
    assert {f.name: f.type for f in invoices.schema} == {
        "invoice_id": pa.string(), "vendor": pa.string(), "text": pa.string(),
        "true_total": pa.string(), "true_currency": pa.string()}
    assert invoices["invoice_id"].null_count == invoices["vendor"].null_count == 0


def test_invoice_ids_are_unique_and_name_the_invoice(invoice_rows: list[dict[str, object]]
                                                    ) -> None:
    ids = [str(r["invoice_id"]) for r in invoice_rows]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"INV-2026-\d{6,}", i) for i in ids)
    assert ids == sorted(ids)
    assert {str(r["vendor"]) for r in invoice_rows} == set(_RATE)
    for row in invoice_rows[::50]:
        if row["text"] is not None:
            assert str(row["invoice_id"]) in str(row["text"])
            assert str(row["vendor"]) in str(row["text"])
            assert str(row["true_currency"]) in str(row["text"])


def test_invoice_null_and_long_texts_have_their_shares(invoice_rows: list[dict[str, object]]
                                                      ) -> None:
    texts = [r["text"] for r in invoice_rows]
    assert sum(t is None for t in texts) / INVOICE_ROWS == pytest.approx(0.02, abs=0.003)
    long = [t for t in texts if _is_long(t)]
    assert len(long) / INVOICE_ROWS == pytest.approx(0.005, abs=0.0015)
    assert all(len(t) <= LONG_CHARS[1] for t in long)  # type: ignore[arg-type]
    assert all("\n\nSTATEMENT OF ACCOUNT\n" in t for t in long)  # type: ignore[operator]
    assert all(len(t) < 4_000 for t in texts if isinstance(t, str) and not _is_long(t))
    # The ground truth is null exactly where there is no text to extract it from.
    for row in invoice_rows:
        assert (row["true_total"] is None) == (row["text"] is None)
        assert (row["true_currency"] is None) == (row["text"] is None)


def test_invoice_currencies_are_skewed_and_belong_to_the_vendor(
        invoice_rows: list[dict[str, object]]) -> None:
    currency_of = {v.name: v.currency for v in VENDORS}
    rows = [r for r in invoice_rows if r["text"] is not None]
    assert all(r["true_currency"] == currency_of[str(r["vendor"])] for r in rows)
    counts = Counter(r["true_currency"] for r in rows)
    for code, share in zip(CURRENCIES, (0.60, 0.25, 0.15), strict=True):
        assert counts[code] / len(rows) == pytest.approx(share, abs=0.02), code


def test_invoice_arithmetic_is_consistent(invoice_rows: list[dict[str, object]]) -> None:
    """Line items times unit price, their sum the subtotal, the vendor's tax rate rounded half
    up, subtotal plus tax the total, and that total the true_total."""
    rows = [r for r in invoice_rows[::5] if r["text"] is not None]
    item_counts = Counter()
    for row in rows:
        items, subtotal, tax, total = _parse_invoice(str(row["text"]))
        item_counts[len(items)] += 1
        assert all(qty * unit == amount for qty, unit, amount in items), row["text"]
        assert sum(amount for _, _, amount in items) == subtotal, row["text"]
        assert tax == (subtotal * _RATE[str(row["vendor"])] + 50_000) // 100_000, row["text"]
        assert subtotal + tax == total, row["text"]
        assert re.fullmatch(r"\d+\.\d{2}", str(row["true_total"]))
        assert int(str(row["true_total"]).replace(".", "")) == total, row["text"]
    assert set(item_counts) == {1, 2, 3, 4, 5, 6}


def test_invoices_come_in_three_layouts(invoice_rows: list[dict[str, object]]) -> None:
    texts = [str(r["text"]) for r in invoice_rows if r["text"] is not None]
    layouts = Counter("table" if t.startswith("INVOICE\n") else
                      "email" if "\nItems:\n" in t else
                      "compact" if "\nPos | Description |" in t else "?" for t in texts)
    assert set(layouts) == {"table", "email", "compact"}
    assert min(layouts.values()) > 0.15 * len(texts)
    # Euro amounts in the pipe table are written the European way.
    assert any("\nPos | " in t and re.search(r"Amount due: \d{1,3}(\.\d{3})*,\d{2} EUR", t)
               for t in texts)


def test_invoices_same_seed_same_table_other_seed_other_table() -> None:
    a = generate_invoices(3_000, seed=11)
    assert a.equals(generate_invoices(3_000, seed=11))
    assert not a["text"].equals(generate_invoices(3_000, seed=12)["text"])


@settings(max_examples=10, deadline=None)
@given(n=st.integers(min_value=0, max_value=300), seed=st.integers(0, 2**32))
def test_every_invoice_count_gives_exactly_that_many_rows(n: int, seed: int) -> None:
    small = generate_invoices(n, seed=seed)
    assert small.num_rows == n
    assert small.schema.equals(INVOICES_SCHEMA)


# ============================================================================ tables: CLI


def test_cli_kind_tickets_writes_a_readable_file_and_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tasks" / "tickets.parquet"
    args = build_parser().parse_args(["sample", "--kind", "tickets", "--out", str(out),
                                      "--rows", "5000", "--seed", "3"])
    assert args.func(args) == 0
    written = pq.read_table(out)
    assert written.equals(generate_tickets(5000, seed=3))
    assert pq.ParquetFile(out).metadata.num_row_groups >= 1
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith(f"sample: wrote 5,000 tickets to {out} (")
    counts = Counter(written["category"].to_pylist())
    for category in CATEGORIES:
        assert f"{category} {counts[category]:,}" in line
    assert f"null body {written['body'].null_count}," in line
    n_long = sum(_is_long(b) for b in written["body"].to_pylist())
    assert n_long > 0
    assert f"long body {n_long})" in line


def test_cli_kind_invoices_writes_a_readable_file_and_reports(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "invoices.parquet"
    args = build_parser().parse_args(["sample", "--kind", "invoices", "--out", str(out),
                                      "--rows", "2000"])
    assert args.func(args) == 0
    written = pq.read_table(out)
    assert written.equals(generate_invoices(2000, seed=0))
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"sample: wrote 2,000 invoices to {out} (USD ")
    assert f"null text {written['text'].null_count}," in line
    assert "long text 10)" in line


@pytest.mark.parametrize("flags", [["--force-model", "a"], ["--mmlu", "x.parquet"]])
def test_cli_tables_refuse_the_prompt_only_flags(tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "t.parquet"
    args = build_parser().parse_args(["sample", "--kind", "tickets", "--out", str(out),
                                      "--rows", "10", *flags])
    with pytest.raises(ConfigError, match="--kind prompts only"):
        args.func(args)
    assert not out.exists()


def test_cli_refuses_an_unknown_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--out", "x.parquet", "--kind", "emails"])
    assert "--kind" in capsys.readouterr().err
