"""Demo input: a deterministic Parquet file of queued prompts that looks like a nightly queue.

`generate` returns one Arrow table (`SCHEMA`) mixing five kinds of row, in shuffled order:

    faq        ~35%  short support questions, templated          max_tokens 128-256
    mmlu       ~35%  real questions from the routing labels file  max_tokens 16-64
    code       ~15%  questions around a fenced code block         max_tokens ~512
    summarise  ~15%  "Summarise the following report ..." 3k-12k chars, plus a handful of
                     150k+ char reports that no 32k-token model can take
    bad        a few rows the source stage must reject: null, empty and whitespace-only
               prompts, and request_ids that repeat an earlier row's id

About 0.5% of the good rows name a `force_model` when the caller passes model names.

The same (rows, seed, labels file, force_models) always gives the same table. Text is built
once per *pool* (a few thousand distinct prompts per kind, never more than the kind's row
count) and rows index into the pools with numpy, so 2M rows cost little more than 20k.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute.config import MMLU_LABELS
from batchroute.errors import ConfigError, SchemaError

__all__ = ["DEFAULT_MMLU_PATH", "KINDS", "MIX", "SCHEMA", "generate", "run_cli", "write"]

DEFAULT_MMLU_PATH = Path(MMLU_LABELS)

# A subset of schemas.PROMPTS (request_id is required there too), plus `kind` for the demo's
# own statistics; the source stage reads only the columns it knows.
SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("max_tokens", pa.int32()),
    pa.field("force_model", pa.string()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("kind", pa.string()),
])

KINDS = ("faq", "mmlu", "code", "summarise", "bad")
# Shares of the good rows; the bad rows are counted first and taken off the top.
MIX = {"faq": 0.35, "mmlu": 0.35, "code": 0.15, "summarise": 0.15}

FORCE_FRACTION = 0.005
MAX_TOKENS_NULL_FRACTION = 0.05
MAX_BAD_ROWS = 24
# Pools never hold more texts than their kind has rows, so a 20k demo has (almost) no repeats;
# past the cap rows reuse pool texts under fresh request_ids.
POOL_CAP = {"faq": 8192, "code": 4096, "summarise": 4096}
GIANT_POOL_CAP = 8
GIANT_CHARS = (152_000, 190_000)  # > 32k tokens at 4 chars/token, whatever the tokenizer's luck
REPORT_CHARS = (3_000, 12_000)
FAQ_CHARS = (30, 200)
CODE_CHARS = (200, 1_500)
# Small enough that a row group of long reports stays far below Arrow's 2 GiB string limit
# and that a reader can stream the file; large enough that Parquet overhead does not matter.
CHUNK_ROWS = 65_536

_BAD_VARIANTS = ("null", "empty", "whitespace", "duplicate_id")
_WHITESPACE = (" ", "   ", "\n", "\t", " \n\t ", "\n\n")

# Tag sets a real queue would carry, with how often each kind of job is submitted under them.
_TAGS: dict[str, tuple[tuple[tuple[str, ...], float], ...]] = {
    "faq": ((("team:support",), 0.7), (("team:support", "nightly"), 0.2),
            (("team:support", "priority"), 0.1)),
    "mmlu": ((("team:research",), 0.5), (("team:research", "eval"), 0.4),
             (("team:research", "nightly"), 0.1)),
    "code": ((("team:platform",), 0.6), (("team:platform", "nightly"), 0.3),
             (("team:platform", "ci"), 0.1)),
    "summarise": ((("team:research", "nightly"), 0.4), (("team:platform", "nightly"), 0.2),
                  (("team:finance", "nightly"), 0.3), (("team:support",), 0.1)),
    "bad": ((("team:support",), 0.5), (("team:platform", "nightly"), 0.5)),
}
_TAG_SETS: tuple[tuple[str, ...], ...] = tuple(
    dict.fromkeys(tags for choices in _TAGS.values() for tags, _ in choices))

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------------------------
# Public API


def generate(rows: int = 20000, *, seed: int = 0,
             mmlu_path: str | os.PathLike[str] = DEFAULT_MMLU_PATH,
             force_models: Sequence[str] = ()) -> pa.Table:
    """Return `rows` demo prompt rows matching `SCHEMA`, the same table for the same arguments.

    Raises ValueError if rows or seed is negative, ConfigError if the MMLU labels file is
    missing or unreadable, SchemaError if it has no usable `prompt` column.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    mmlu = _read_mmlu_prompts(Path(mmlu_path))

    # Independent streams, so changing one generator does not reshuffle every other column.
    streams = np.random.SeedSequence(seed).spawn(3)
    text_rnd = random.Random(int(np.random.default_rng(streams[0]).integers(2**63)))
    rng = np.random.default_rng(streams[1])
    shuffle_rng = np.random.default_rng(streams[2])

    counts = _kind_counts(rows)
    pool = _PromptPool()
    parts = [
        _faq_rows(counts["faq"], pool, text_rnd, rng),
        _mmlu_rows(counts["mmlu"], mmlu, pool, rng),
        _code_rows(counts["code"], pool, text_rnd, rng),
        _summarise_rows(counts["summarise"], pool, text_rnd, rng),
        _bad_rows(counts["bad"], pool, rng),
    ]
    plan = _Plan.concat(parts)
    plan.max_tokens[rng.random(rows) < MAX_TOKENS_NULL_FRACTION] = 0
    plan = plan.take(shuffle_rng.permutation(rows))
    id_of = _place_duplicate_ids(plan, shuffle_rng)
    _force_models(plan, len(force_models), rng)
    return _materialise(plan, id_of, pool.to_arrow(), force_models, seed)


def write(table: pa.Table, out: str | os.PathLike[str]) -> None:
    """Write `table` to the Parquet file `out`, creating parent directories.

    The file appears whole or not at all: it is written to `out + ".tmp"` and renamed.
    Raises OSError (or an Arrow error) if writing fails; the temporary file is removed.
    """
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp, row_group_size=CHUNK_ROWS)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def run_cli(args: argparse.Namespace) -> int:
    """``batchroute sample``: write the file, print what it holds (its parser: devtools)."""
    table = generate(args.rows, seed=args.seed, mmlu_path=args.mmlu or DEFAULT_MMLU_PATH,
                     force_models=args.force_models or ())
    write(table, args.out)
    by_kind = _count_by_kind(table)
    summary = ", ".join(f"{kind} {by_kind.get(kind, 0):,}" for kind in KINDS)
    print(f"sample: wrote {table.num_rows:,} rows to {args.out} ({summary})")
    return 0


def _count_by_kind(table: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(table["kind"])
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                    strict=True))


# --------------------------------------------------------------------------------------------
# Row plan: one entry per output row, as indices into small pools. Strings are only copied
# in `_materialise`, chunk by chunk, so the row count never multiplies Python work.


@dataclass
class _Plan:
    kind: IntArray        # index into KINDS
    prompt: IntArray      # index into the prompt pool (entry 0 is the null prompt)
    max_tokens: IntArray  # 0 means null: the job default
    tags: IntArray        # index into _TAG_SETS
    force: IntArray       # index into force_models; -1 means none
    duplicate: BoolArray  # takes the request_id of an earlier row once positions are final

    @classmethod
    def of_kind(cls, kind: str, prompt: IntArray, max_tokens: IntArray,
                rng: np.random.Generator) -> _Plan:
        n = len(prompt)
        tag_sets, weights = zip(*_TAGS[kind], strict=True)
        tag_ids = np.array([_TAG_SETS.index(tags) for tags in tag_sets], dtype=np.int64)
        return cls(kind=np.full(n, KINDS.index(kind), dtype=np.int64),
                   prompt=prompt.astype(np.int64),
                   max_tokens=max_tokens.astype(np.int64),
                   tags=tag_ids[rng.choice(len(tag_sets), size=n, p=np.array(weights))],
                   force=np.full(n, -1, dtype=np.int64),
                   duplicate=np.zeros(n, dtype=np.bool_))

    @classmethod
    def concat(cls, parts: Sequence[_Plan]) -> _Plan:
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in _PLAN_FIELDS))

    def take(self, order: IntArray) -> _Plan:
        return _Plan(*(getattr(self, name)[order] for name in _PLAN_FIELDS))


_PLAN_FIELDS = tuple(_Plan.__dataclass_fields__)


class _PromptPool:
    """Every distinct prompt text once, the null prompt first; rows refer to texts by index."""

    def __init__(self) -> None:
        self._parts: list[pa.Array] = [pa.nulls(1, pa.string())]
        self._size = 1

    def add(self, texts: Sequence[str] | pa.Array) -> IntArray:
        """Append texts; return their pool indices."""
        part = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
        start, self._size = self._size, self._size + len(part)
        self._parts.append(part)
        return np.arange(start, self._size, dtype=np.int64)

    def to_arrow(self) -> pa.Array:
        return pa.concat_arrays(self._parts)


def _kind_counts(rows: int) -> dict[str, int]:
    """Exact counts per kind summing to rows: bad first, then MIX by largest remainder."""
    bad = min(max(rows // 1000, len(_BAD_VARIANTS)), MAX_BAD_ROWS, rows // 10)
    good = rows - bad
    shares = {kind: good * frac for kind, frac in MIX.items()}
    counts = {kind: int(share) for kind, share in shares.items()}
    by_remainder = sorted(MIX, key=lambda kind: shares[kind] - counts[kind], reverse=True)
    for kind in by_remainder[:good - sum(counts.values())]:
        counts[kind] += 1
    counts["bad"] = bad
    return counts


def _draw(rng: np.random.Generator, pool_size: int, n: int) -> IntArray:
    """n indices into a pool: all distinct while the pool lasts, then with replacement."""
    if n <= pool_size:
        return rng.permutation(pool_size)[:n]
    return rng.integers(0, pool_size, size=n)


def _place_duplicate_ids(plan: _Plan, rng: np.random.Generator) -> IntArray:
    """Return, per row, the position whose request_id it carries: its own, except that each
    duplicate row carries the id of a random good row placed before it."""
    id_of = np.arange(len(plan.kind), dtype=np.int64)
    is_good = plan.kind != KINDS.index("bad")
    if not is_good.any():
        return id_of
    # Row 0 must be good so that every duplicate has an earlier row to copy.
    first_good = int(np.argmax(is_good))
    if first_good:
        swap = np.array([0, first_good])
        for name in _PLAN_FIELDS:
            column = getattr(plan, name)
            column[swap] = column[swap[::-1]]
        is_good[swap] = is_good[swap[::-1]]
    good_positions = np.flatnonzero(is_good)
    for position in np.flatnonzero(plan.duplicate):
        earlier = good_positions[:np.searchsorted(good_positions, position)]
        id_of[position] = earlier[rng.integers(len(earlier))]
    return id_of


def _force_models(plan: _Plan, n_models: int, rng: np.random.Generator) -> None:
    if n_models == 0:
        return
    good = np.flatnonzero(plan.kind != KINDS.index("bad"))
    chosen = rng.choice(good, size=round(len(good) * FORCE_FRACTION), replace=False)
    plan.force[chosen] = rng.integers(0, n_models, size=len(chosen))


def _materialise(plan: _Plan, id_of: IntArray, prompts: pa.Array,
                 force_models: Sequence[str], seed: int) -> pa.Table:
    kinds = pa.array(KINDS, pa.string())
    tag_sets = pa.array([list(t) for t in _TAG_SETS], pa.list_(pa.string()))
    models = pa.array(list(force_models), pa.string())
    batches = []
    for start in range(0, len(plan.kind), CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        ids = pc.binary_join_element_wise(
            f"req-{seed}-",
            pc.utf8_lpad(pc.cast(pa.array(id_of[part]), pa.string()), width=8,
                         padding="0"),
            "")
        force = plan.force[part]
        max_tokens = plan.max_tokens[part]
        batches.append(pa.record_batch([
            ids,
            prompts.take(pa.array(plan.prompt[part])),
            pa.array(max_tokens.astype(np.int32), pa.int32(), mask=max_tokens == 0),
            models.take(pa.array(force, mask=force < 0)),
            tag_sets.take(pa.array(plan.tags[part])),
            kinds.take(pa.array(plan.kind[part])),
        ], schema=SCHEMA))
    return pa.Table.from_batches(batches, schema=SCHEMA)


# --------------------------------------------------------------------------------------------
# MMLU


def _read_mmlu_prompts(path: Path) -> pa.Array:
    """Distinct non-empty prompts of the labels file, sorted so file row order does not matter."""
    if not path.is_file():
        raise ConfigError(f"MMLU labels file not found: {path} "
                          "(pass --mmlu PATH to use another mmlu_labels.parquet)")
    try:
        schema = pq.read_schema(path)
        if "prompt" not in schema.names:
            raise SchemaError(f"{path}: column 'prompt' is missing")
        column = pq.read_table(path, columns=["prompt"])["prompt"]
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"MMLU labels file {path} is not readable Parquet ({exc}); "
                          "pass --mmlu PATH to use another file") from exc
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise SchemaError(f"{path}: column 'prompt' is {column.type}, expected string")
    prompts = pc.unique(pc.drop_null(column).cast(pa.string()))
    prompts = prompts.filter(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(prompts)), 0))
    if len(prompts) == 0:
        raise SchemaError(f"{path}: column 'prompt' has no non-empty prompts")
    return prompts.take(pc.sort_indices(prompts))


def _mmlu_rows(n: int, questions: pa.Array, pool: _PromptPool,
               rng: np.random.Generator) -> _Plan:
    prompt = pool.add(questions)[_draw(rng, len(questions), n)]
    return _Plan.of_kind("mmlu", prompt, rng.choice([16, 32, 64], size=n, p=[0.3, 0.4, 0.3]),
                         rng)


# --------------------------------------------------------------------------------------------
# FAQ


_FAQ_TEMPLATES = (
    "How do I reset my password for {product}?",
    "Can I export my {data} from {product} to CSV?",
    "Why was I charged twice for my {plan} plan this month?",
    "How do I turn on {feature} in {product}?",
    "Is {feature} available on the {plan} plan?",
    "{product} keeps logging me out on my {device}. What should I do?",
    "How do I cancel my {plan} subscription?",
    "Where can I download last month's invoice for {product}?",
    "Does {product} support {integration}?",
    "How do I add a new user to my {product} workspace?",
    "What is the difference between the {plan} and {plan2} plans?",
    "How long does it take for {feature} changes to sync across devices?",
    "I can't find {feature} in the settings of {product}. Has it moved?",
    "How do I connect {product} to {integration}?",
    "The {device} app shows error {code} when I open {product}. How do I fix it?",
    "Can I change the email address on my {product} account?",
    "How do I upgrade from {plan} to {plan2} without losing my {data}?",
    "Is there a limit on how many {data} I can store in {product}?",
    "How do I delete my {product} account and all my {data}?",
    "Why is {product} so slow to load on my {device}?",
    "Can I get a refund if I cancel the {plan} plan mid-month?",
    "How do I enable {feature} for everyone in my team?",
    "Does the {plan} plan include phone support?",
    "How do I restore {data} I deleted by mistake in {product}?",
    "What are your support hours in {region}?",
    "Is my {data} stored in {region}?",
    "How do I set up {feature} with {integration}?",
    "Can I use {product} offline on my {device}?",
    "How do I change the billing currency to {currency}?",
    "Where do I find my API key for {product}?",
    "Why did {feature} stop working after the last update of {product}?",
    "How do I share {data} with someone outside my organisation?",
    "Can I pay for {product} by bank transfer in {currency}?",
    "How do I turn off email notifications from {product}?",
    "Is {product} compliant with {standard}?",
    "How many seats are included in the {plan} plan?",
    "What happens to my {data} when my {product} trial ends?",
    "How do I transfer ownership of a {product} workspace to a colleague?",
    "The {integration} sync in {product} fails with error {code}. Any ideas?",
    "Do you offer a non-profit discount on the {plan2} plan?",
    "How do I download all my {data} before I close my account?",
    "Can {product} email me a report of my {data} every Monday?",
    "What does error {code} mean in {product}?",
    "How do I update my card details for the {plan} plan?",
    "Why can't my colleague see the {data} I shared in {product}?",
    "Is there a way to undo a bulk edit of {data} in {product}?",
)
_FAQ_WORDS: dict[str, tuple[str, ...]] = {
    "product": ("Acme Cloud", "Acme Mail", "the mobile app", "the web dashboard",
                "Acme Analytics", "Acme Drive", "the desktop app", "Acme Pay", "Acme CRM",
                "the admin console", "Acme Chat", "Acme Forms"),
    "feature": ("two-factor authentication", "single sign-on", "dark mode", "auto-backup",
                "audit logs", "custom domains", "offline mode", "shared folders",
                "scheduled exports", "usage alerts", "webhooks", "role-based access",
                "SAML login", "read receipts", "version history", "bulk import"),
    "data": ("contacts", "invoices", "files", "reports", "chat history", "dashboards",
             "customer records", "photos", "form responses"),
    "plan": ("Free", "Starter", "Pro", "Team", "Business", "Enterprise"),
    "device": ("iPhone", "Android phone", "iPad", "Windows laptop", "Mac", "Chromebook",
               "Linux desktop"),
    "integration": ("Slack", "Salesforce", "Google Drive", "Microsoft Teams", "Zapier", "Jira",
                    "HubSpot", "Shopify", "QuickBooks"),
    "region": ("the EU", "the UK", "Australia", "Canada", "India", "Japan", "Brazil"),
    "currency": ("EUR", "GBP", "JPY", "AUD", "CAD", "INR", "BRL"),
    "standard": ("GDPR", "SOC 2", "HIPAA", "ISO 27001", "PCI DSS"),
}
_FAQ_OPENERS = ("", "", "", "", "Hi! ", "Hello. ", "Quick question: ", "Hi team, quick one. ")
_FAQ_CLOSERS = ("", "", "", "", " Thanks!", " Thanks in advance.", " This is urgent.",
                " I'm on the {plan} plan.", " Our account is on the {plan} plan.")


def _faq_text(rnd: random.Random) -> str:
    words = {slot: rnd.choice(options) for slot, options in _FAQ_WORDS.items()}
    words["plan2"] = rnd.choice([p for p in _FAQ_WORDS["plan"] if p != words["plan"]])
    words["code"] = rnd.choice((f"E{rnd.randint(100, 999)}", "401", "403", "429", "500"))
    template = rnd.choice(_FAQ_OPENERS) + rnd.choice(_FAQ_TEMPLATES) + rnd.choice(_FAQ_CLOSERS)
    return template.format(**words)


def _faq_rows(n: int, pool: _PromptPool, rnd: random.Random,
              rng: np.random.Generator) -> _Plan:
    texts = [_within(FAQ_CHARS, _faq_text, rnd) for _ in range(min(n, POOL_CAP["faq"]))]
    prompt = pool.add(texts)[_draw(rng, len(texts), n)]
    return _Plan.of_kind("faq", prompt, rng.choice([128, 192, 256], size=n, p=[0.4, 0.2, 0.4]),
                         rng)


# --------------------------------------------------------------------------------------------
# Code questions. Snippets are string.Template so that code braces need no escaping.


@dataclass(frozen=True)
class _Snippet:
    lang: str
    questions: tuple[str, ...]
    code: str
    error: str = ""


_SNIPPETS = (
    _Snippet("python", (
        "Why does this raise KeyError: '$key'? The file definitely has that section.",
        "I get a KeyError from this function. What is wrong?"), '''\
import json


def $fn(path):
    with open(path) as fh:
        config = json.load(fh)
    return config["$key"]["timeout"]


print($fn("settings.json"))''', """\
Traceback (most recent call last):
  File "main.py", line 9, in <module>
    print($fn("settings.json"))
  File "main.py", line 6, in $fn
    return config["$key"]["timeout"]
KeyError: '$key'"""),
    _Snippet("python", (
        "Why does b share items with a here? I expected an empty list.",
        "Two instances of $cls end up with the same list. Is this a bug in Python?"), '''\
class $cls:
    def __init__(self, name, $var=[]):
        self.name = name
        self.$var = $var

    def add(self, item):
        self.$var.append(item)


a = $cls("a")
b = $cls("b")
a.add(1)
print(b.$var)  # prints [1]'''),
    _Snippet("python", (
        "This is very slow on 5 million rows. How can I vectorise it?",
        "Can you rewrite $fn without the Python loop?"), '''\
import pandas as pd


def $fn(df: pd.DataFrame) -> list[float]:
    out = []
    for i in range(len(df)):
        row = df.iloc[i]
        if row["$num"] > $n:
            out.append(row["$num"] * 2)
    return out'''),
    _Snippet("python", (
        "How do I make these requests run concurrently but at most $n at a time?",
        "This async code still fetches one URL after another. Why?"), '''\
import asyncio

import httpx


async def $fn(urls):
    async with httpx.AsyncClient(timeout=10) as client:
        results = []
        for url in urls:
            r = await client.get(url)
            results.append(r.status_code)
        return results


asyncio.run($fn(["https://example.com"] * 100))'''),
    _Snippet("javascript", (
        "Why do I get this error for some users but not others?",
        "How should I guard against missing profiles in this handler?"), '''\
const express = require("express");
const app = express();

app.get("/users/:id", async (req, res) => {
  const user = await db.$fnCamel(req.params.id);
  res.json({ name: user.profile.$key });
});

app.listen(3000);''', "TypeError: Cannot read properties of undefined (reading '$key')"),
    _Snippet("javascript", (
        "Why does $fnCamel always return 0?",
        "The total is wrong even though every getPrice call succeeds. What am I missing?"), '''\
async function getPrice(id) {
  const res = await fetch("/api/prices/" + id);
  return (await res.json()).amount;
}

function $fnCamel(items) {
  let total = 0;
  items.forEach(async (item) => {
    const price = await getPrice(item.id);
    total += price;
  });
  return total;
}'''),
    _Snippet("javascript", (
        "This component keeps re-fetching in an endless loop. What am I missing?",
        "Why does this React component hammer our search API?"), '''\
import { useEffect, useState } from "react";

export function $cls({ query }) {
  const [results, setResults] = useState([]);
  useEffect(() => {
    fetch("/api/search?q=" + encodeURIComponent(query))
      .then((r) => r.json())
      .then((data) => setResults(data));
  });
  return <ResultList items={results} />;
}'''),
    _Snippet("sql", (
        "Postgres rejects this query. How do I fix it and still show the latest order date?",
        "What does this GROUP BY error mean?"), '''\
SELECT c.name, COUNT(o.id) AS orders, o.created_at
FROM $table c
JOIN orders o ON o.customer_id = c.id
WHERE o.created_at >= '2024-01-01'
GROUP BY c.name
ORDER BY orders DESC;''', 'ERROR:  column "o.created_at" must appear in the GROUP BY clause '
                          'or be used in an aggregate function'),
    _Snippet("sql", (
        "This query takes 9 seconds on a table with $n million rows. Which index would help?",
        "How can I speed up this search query?"), '''\
SELECT id, $col, created_at
FROM $table
WHERE LOWER($col) LIKE '%$key%'
ORDER BY created_at DESC
LIMIT 50;'''),
    _Snippet("sql", (
        "Can you explain what the OVER clause does here and rewrite it for MySQL 5.7?",
        "Is this running total correct when two rows share a day?"), '''\
SELECT user_id,
       day,
       $num,
       SUM($num) OVER (PARTITION BY user_id ORDER BY day) AS running_total
FROM $table
WHERE day BETWEEN '2024-03-01' AND '2024-03-31'
ORDER BY user_id, day;'''),
    _Snippet("go", (
        "Why does this panic?",
        "Can you spot the off-by-one in $fnCamel?"), '''\
package main

import "fmt"

func $fnCamel(xs []int) int {
	best := xs[0]
	for i := 1; i <= len(xs); i++ {
		if xs[i] > best {
			best = xs[i]
		}
	}
	return best
}

func main() {
	fmt.Println($fnCamel([]int{3, 9, 4}))
}''', "panic: runtime error: index out of range [3] with length 3"),
    _Snippet("go", (
        "This crashes now and then. How do I fix it properly?",
        "Should I use a mutex or a channel here?"), '''\
func $fnCamel(urls []string) map[string]int {
	sizes := make(map[string]int)
	var wg sync.WaitGroup
	for _, u := range urls {
		wg.Add(1)
		go func(u string) {
			defer wg.Done()
			resp, err := http.Get(u)
			if err != nil {
				return
			}
			defer resp.Body.Close()
			sizes[u] = int(resp.ContentLength)
		}(u)
	}
	wg.Wait()
	return sizes
}''', "fatal error: concurrent map writes"),
    _Snippet("go", (
        "What is the idiomatic way to add context to these errors so callers can still use "
        "errors.Is?",
        "How should I wrap the errors returned by $fnCamel?"), '''\
type Config struct {
	Region  string `json:"region"`
	Retries int    `json:"retries"`
}

func $fnCamel(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var cfg Config
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, err
	}
	return &cfg, nil
}'''),
    _Snippet("rust", (
        "Why can't I use $var after calling $fn?",
        "How do I fix this borrow of a moved value without cloning everything?"), '''\
fn $fn(names: Vec<String>) -> usize {
    names.iter().filter(|n| !n.is_empty()).count()
}

fn main() {
    let $var = vec![String::from("a"), String::from("b")];
    let n = $fn($var);
    println!("{} {:?}", n, $var);
}''', "error[E0382]: borrow of moved value: `$var`"),
    _Snippet("rust", (
        "What does this compiler error mean and how do I fix it?",
        "Why does Rust need a lifetime here when C does not?"), '''\
fn $fn(a: &str, b: &str) -> &str {
    if a.len() > b.len() {
        a
    } else {
        b
    }
}

fn main() {
    let x = String::from("hello");
    println!("{}", $fn(&x, "hi"));
}''', "error[E0106]: missing lifetime specifier"),
    _Snippet("rust", (
        "Why does the borrow checker reject add, and what's the idiomatic fix?",
        "Is there a cleaner way to count words in $cls?"), '''\
use std::collections::HashMap;

struct $cls {
    counts: HashMap<String, u32>,
}

impl $cls {
    fn add(&mut self, word: &str) {
        let c = self.counts.get(word).unwrap_or(&0);
        self.counts.insert(word.to_string(), c + 1);
    }
}''', "error[E0502]: cannot borrow `self.counts` as mutable because it is also borrowed "
      "as immutable"),
    _Snippet("python", (
        "Is this retry logic correct? In production it sometimes retries forever and never "
        "raises.",
        "Can you review $cls? I want exponential backoff with jitter and a hard cap on "
        "attempts.",
        "Why does $cls sleep far longer than max_delay after a few failures?"), '''\
import logging
import random
import time

import requests

log = logging.getLogger(__name__)


class $cls:
    def __init__(self, base_url, max_attempts=5, base_delay=0.5, max_delay=30.0):
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.session = requests.Session()

    def $fn(self, path, **params):
        attempt = 0
        while True:
            try:
                resp = self.session.get(f"{self.base_url}/{path}", params=params, timeout=10)
                if resp.status_code == 429 or resp.status_code >= 500:
                    raise requests.HTTPError(resp.status_code)
                return resp.json()
            except requests.RequestException as exc:
                attempt += 1
                delay = self.base_delay * 2 ** attempt + random.random()
                log.warning("attempt %d failed: %s; sleeping %.1fs", attempt, exc, delay)
                time.sleep(delay)
                if attempt > self.max_attempts and not isinstance(exc, requests.HTTPError):
                    raise'''),
    _Snippet("javascript", (
        "This script runs out of memory on a 4 GB CSV file. How do I stream it instead?",
        "How can I make $fnCamel process the file line by line and still return the totals?"),
        '''\
const fs = require("fs");
const path = require("path");

async function $fnCamel(file) {
  const text = fs.readFileSync(path.resolve(file), "utf8");
  const lines = text.split("\\n");
  const header = lines.shift().split(",");
  const idx = header.indexOf("$num");
  const totals = new Map();
  for (const line of lines) {
    if (!line.trim()) continue;
    const cols = line.split(",");
    const key = cols[0];
    const value = Number(cols[idx]);
    totals.set(key, (totals.get(key) || 0) + value);
  }
  return Object.fromEntries(totals);
}

$fnCamel(process.argv[2]).then((t) => console.log(JSON.stringify(t, null, 2)));''',
        "FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory"),
    _Snippet("sql", (
        "This report query returns more revenue than we actually booked. Where does the "
        "double counting come from?",
        "Can you rewrite this so each customer is counted once per month?"), '''\
WITH monthly AS (
    SELECT c.id AS customer_id,
           DATE_TRUNC('month', p.paid_at) AS month,
           SUM(p.$num) AS paid
    FROM $table c
    JOIN payments p ON p.customer_id = c.id
    JOIN subscriptions s ON s.customer_id = c.id
    WHERE p.paid_at >= DATE '2024-01-01'
      AND s.status IN ('active', 'past_due')
    GROUP BY c.id, DATE_TRUNC('month', p.paid_at)
),
ranked AS (
    SELECT customer_id,
           month,
           paid,
           RANK() OVER (PARTITION BY month ORDER BY paid DESC) AS rnk
    FROM monthly
)
SELECT month,
       COUNT(*) AS customers,
       SUM(paid) AS revenue,
       SUM(paid) FILTER (WHERE rnk <= 10) AS top10_revenue
FROM ranked
GROUP BY month
ORDER BY month;'''),
    _Snippet("go", (
        "The request keeps running after the client disconnects. How do I wire the context "
        "through properly?",
        "Is this the right way to put a timeout on the database call in $fnCamel?"), '''\
package api

import (
	"context"
	"database/sql"
	"encoding/json"
	"net/http"
	"time"
)

type Server struct {
	db *sql.DB
}

type item struct {
	ID    int64  `json:"id"`
	Title string `json:"title"`
}

func (s *Server) $fnCamel(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	owner := r.URL.Query().Get("owner")
	rows, err := s.db.QueryContext(ctx, "SELECT id, title FROM $table WHERE owner = $$1", owner)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer rows.Close()
	var out []item
	for rows.Next() {
		var it item
		if err := rows.Scan(&it.ID, &it.Title); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		out = append(out, it)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}'''),
)
_CODE_WORDS: dict[str, tuple[str, ...]] = {
    "fn": ("load_config", "get_user", "fetch_all", "parse_rows", "compute_total", "find_max",
           "read_settings", "sync_accounts", "process_batch", "build_index", "count_valid"),
    "fnCamel": ("loadConfig", "getUser", "fetchAll", "parseRows", "computeTotal", "findMax",
                "readSettings", "syncAccounts", "processBatch", "buildIndex", "fetchSizes"),
    "cls": ("UserStore", "Inventory", "WordCounter", "SearchResults", "Basket", "Registry",
            "OrderBook", "TagIndex"),
    "key": ("database", "auth", "region", "email", "cache", "billing", "displayName"),
    "var": ("items", "tags", "names", "queue", "children", "entries"),
    "col": ("email", "title", "name", "description", "city", "company"),
    "num": ("amount", "score", "duration_ms", "quantity", "revenue", "latency_ms"),
    "table": ("customers", "events", "payments", "sessions", "accounts", "tickets"),
}
_CODE_OPENERS = ("", "", "", "Can someone help? ", "Newbie question. ", "Code review request: ")
_CODE_TRIED = (
    "I already searched the docs and Stack Overflow but nothing I found matches this case.",
    "I tried adding more logging, but the output did not tell me anything new.",
    "It works fine on my laptop and only fails in CI, if that matters.",
    "Please explain why it happens, not only how to fix it; I want to understand it.",
    "A colleague suggested catching every error at the top level, which feels wrong to me.",
)
_CODE_VERSIONS = {"python": ("Python 3.11", "Python 3.12"), "javascript": ("Node 20", "Node 22"),
                  "sql": ("PostgreSQL 15", "PostgreSQL 16"), "go": ("Go 1.22", "Go 1.23"),
                  "rust": ("Rust 1.79", "Rust 1.80")}


def _code_text(rnd: random.Random) -> str:
    snippet = rnd.choice(_SNIPPETS)
    words = {slot: rnd.choice(options) for slot, options in _CODE_WORDS.items()}
    words["n"] = str(rnd.choice((3, 5, 10, 20, 50, 100)))
    text = (rnd.choice(_CODE_OPENERS) + rnd.choice(snippet.questions)
            + f"\n\n```{snippet.lang}\n{snippet.code}\n```")
    if snippet.error and rnd.random() < 0.8:
        text += f"\n\nThe error:\n```\n{snippet.error}\n```"
    if rnd.random() < 0.3:
        text += "\n\n" + rnd.choice(_CODE_TRIED)
    if rnd.random() < 0.4:
        text += f"\n\nI'm on {rnd.choice(_CODE_VERSIONS[snippet.lang])}."
    return string.Template(text).substitute(words)


def _code_rows(n: int, pool: _PromptPool, rnd: random.Random,
               rng: np.random.Generator) -> _Plan:
    texts = [_within(CODE_CHARS, _code_text, rnd) for _ in range(min(n, POOL_CAP["code"]))]
    prompt = pool.add(texts)[_draw(rng, len(texts), n)]
    max_tokens = rng.choice([384, 512, 768, 1024], size=n, p=[0.15, 0.6, 0.15, 0.1])
    return _Plan.of_kind("code", prompt, max_tokens, rng)


# --------------------------------------------------------------------------------------------
# Long reports to summarise. Sentences are rendered once into a bank and reports are drawn
# from it, which keeps a 190k-char report as cheap as joining a list.


_REPORT_SENTENCES = (
    "Revenue in {region} grew {pct}% quarter over quarter, driven mostly by renewals of "
    "{product}.",
    "The {team} team closed {n} tickets during the quarter, up from {n2} in the previous one.",
    "Median response time for {system} was {ms} ms, against a target of {ms2} ms.",
    "Churn among small customers rose to {small}%, which the team attributes to the price "
    "change in {month}.",
    "On {weekday} {day} {month}, a misconfigured deploy of {system} caused a {mins}-minute "
    "partial outage in {region}.",
    "{person} led the migration of {system} to the new cluster, which finished {n} days ahead "
    "of plan.",
    "Cloud spend for {system} came to {money}, {pct}% over budget, mostly from unreserved GPU "
    "capacity.",
    "Customer satisfaction for {product} held at {score} out of 5 across {n} survey responses.",
    "The backlog of open bugs in {product} fell from {n2} to {n}.",
    "Hiring is behind plan: {n} of {n2} open roles in {team} are filled.",
    "Two enterprise customers in {region} asked for data residency before renewing {product}.",
    "Error rates on the {system} API stayed below {small}% except during the incident on "
    "{weekday}.",
    "The {team} team recommends {action} before the end of the quarter.",
    "A pilot of {product} with {n} customers in {region} converted {pct}% of trial accounts.",
    "Support volume peaked in {month} after the release of {product} {version}.",
    "The security review found {n} medium and {n2} low severity issues, none of them "
    "exploitable from outside the network.",
    "Gross margin on {product} improved to {pct}% as inference costs fell.",
    "The partnerships team signed {n} new resellers in {region}, bringing the total to {n2}.",
    "The on-call rotation for {system} handled {n} pages, {n2} of them outside business hours.",
    "Forecast revenue for next quarter is {money}, assuming churn stays near {small}%.",
    "Latency at the 99th percentile improved by {pct}% after the cache was moved closer to "
    "{region}.",
    "The audit of vendor contracts identified {money} of annual savings.",
    "Adoption of {feature} reached {pct}% of active accounts within {n} weeks of launch.",
    "The {team} team will freeze changes to {system} during the {month} peak.",
    "Legal approved the new terms for {region}; they take effect on {day} {month}.",
    "Three of the five objectives for the quarter are on track; the other two depend on "
    "{system}.",
    "Training spend rose to {money} as the team retrained the ranking model on {n} million "
    "examples.",
    "Partners reported that onboarding to {product} takes {n} days on average, down from {n2}.",
    "The data pipeline for {system} missed its nightly deadline {small} times this quarter.",
    "Net revenue retention in {region} came in at {nrr}%.",
    "{person} noted that most escalations from {region} concerned {feature}.",
    "Capacity planning assumes {pct}% growth in traffic to {system} over the next two "
    "quarters.",
)
_REPORT_WORDS: dict[str, tuple[str, ...]] = {
    "region": ("EMEA", "North America", "APAC", "LATAM", "the Nordics", "DACH", "Japan"),
    "product": ("Acme Cloud", "Acme Analytics", "Acme Pay", "Acme CRM", "Acme Drive",
                "the mobile app"),
    "team": ("Support", "Platform", "Billing", "Data", "Security", "Growth", "Search", "SRE"),
    "system": ("the billing service", "the search cluster", "the ingestion pipeline",
               "the auth gateway", "the recommendation service", "the data warehouse",
               "the notification service"),
    "month": ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "person": ("Priya Raman", "Tom Becker", "Ana Souza", "Kenji Sato", "Fatima Haddad",
               "Liam O'Neill", "Mei Chen", "Ola Nordmann"),
    "action": ("moving batch workloads to reserved capacity", "retiring the legacy export API",
               "hiring two more on-call engineers", "adding a second region for failover",
               "renegotiating the CDN contract", "routing simple requests to a cheaper model"),
    "feature": ("single sign-on", "audit logs", "usage alerts", "scheduled exports",
                "role-based access", "the new onboarding flow"),
    "version": ("2.3", "2.4", "3.0", "3.1", "4.0"),
}
_REPORT_TITLES = ("operating report", "business review", "engineering update",
                  "regional summary", "incident and reliability review")
_REPORT_COMPANIES = ("Acme Corp", "Northwind", "Globex", "Initech", "Contoso", "Umbrella Labs")
_REPORT_INSTRUCTIONS = (
    "Summarise the following report in {k} bullet points:\n\n",
    "Summarise the following report in {k} bullet points:\n\n",
    "Summarise the following report in {k} bullet points for the leadership team:\n\n",
    "Summarise the following report in {k} bullet points. Keep every number exact.\n\n",
)
_SENTENCE_BANK_SIZE = 6000


def _report_sentence(rnd: random.Random) -> str:
    words = {slot: rnd.choice(options) for slot, options in _REPORT_WORDS.items()}
    n, n2 = sorted(rnd.sample(range(2, 400), 2))
    ms = rnd.randint(40, 900)
    words.update(
        n=str(n), n2=str(n2), pct=str(rnd.randint(2, 45)), small=str(rnd.randint(1, 9)),
        ms=str(ms), ms2=str(ms + rnd.choice((-30, -20, 10, 50, 100))), mins=str(rnd.randint(4, 95)),
        day=str(rnd.randint(1, 28)), score=f"{rnd.uniform(3.2, 4.9):.1f}",
        money=f"${rnd.randint(12, 980)}k" if rnd.random() < 0.7
        else f"${rnd.randint(1, 40)}.{rnd.randint(0, 9)}M",
        nrr=str(rnd.randint(88, 131)))
    return rnd.choice(_REPORT_SENTENCES).format(**words)


def _report_text(rnd: random.Random, bank: Sequence[str], target: int) -> str:
    """A report of whole paragraphs, at least `target` chars and at most one paragraph more."""
    header = (rnd.choice(_REPORT_INSTRUCTIONS).format(k=rnd.choice((3, 5, 5, 5, 7)))
              + f"{rnd.choice(_REPORT_COMPANIES)} Q{rnd.randint(1, 4)} {rnd.randint(2023, 2025)} "
              + rnd.choice(_REPORT_TITLES))
    paragraphs = [header]
    length = len(header)
    while length < target:
        paragraphs.append(" ".join(rnd.choice(bank) for _ in range(rnd.randint(4, 8))))
        length += 2 + len(paragraphs[-1])
    return "\n\n".join(paragraphs)


def _summarise_rows(n: int, pool: _PromptPool, rnd: random.Random,
                    rng: np.random.Generator) -> _Plan:
    if n == 0:
        return _Plan.of_kind("summarise", np.zeros(0, np.int64), np.zeros(0, np.int64), rng)
    bank = [_report_sentence(rnd) for _ in range(_SENTENCE_BANK_SIZE)]
    longest_paragraph = 2 + 8 * (max(map(len, bank)) + 1)
    lo, hi = REPORT_CHARS
    n_giant = min(n, max(3, n // 500))
    reports = [_report_text(rnd, bank, rnd.randint(lo, hi - longest_paragraph))
               for _ in range(min(n - n_giant, POOL_CAP["summarise"]))]
    giants = [_report_text(rnd, bank, rnd.randint(*GIANT_CHARS))
              for _ in range(min(n_giant, GIANT_POOL_CAP))]
    prompt = np.concatenate([pool.add(reports)[_draw(rng, len(reports), n - n_giant)],
                             pool.add(giants)[_draw(rng, len(giants), n_giant)]])
    return _Plan.of_kind("summarise", prompt, 50 * rng.integers(6, 17, size=n), rng)


# --------------------------------------------------------------------------------------------
# Bad rows


def _bad_rows(n: int, pool: _PromptPool, rng: np.random.Generator) -> _Plan:
    """Cycle through the variants so that even four bad rows cover every one of them.

    A duplicate row has an ordinary prompt; only its request_id is wrong, and that is set once
    rows have their final positions (`_place_duplicate_ids`).
    """
    variant = np.arange(n) % len(_BAD_VARIANTS)
    empty, *whitespace = pool.add(["", *_WHITESPACE])
    ordinary = pool.add(["Can I get an invoice for my last payment?",
                         "How do I change the billing email on my account?"])
    choices = {
        "null": np.zeros(n, dtype=np.int64),
        "empty": np.full(n, empty),
        "whitespace": np.array(whitespace)[np.arange(n) % len(whitespace)],
        "duplicate_id": ordinary[np.arange(n) % len(ordinary)],
    }
    prompt = np.choose(variant, [choices[v] for v in _BAD_VARIANTS])
    plan = _Plan.of_kind("bad", prompt, np.full(n, 256), rng)
    plan.duplicate = variant == _BAD_VARIANTS.index("duplicate_id")
    return plan


def _within(bounds: tuple[int, int], make: Callable[[random.Random], str],
            rnd: random.Random) -> str:
    """Draw texts until one is within the char bounds; the templates make retries rare."""
    lo, hi = bounds
    while True:
        text = make(rnd)
        if lo <= len(text) <= hi:
            return text
