"""``batchroute bench task``: what a [task] costs on one core.

- **Render + route.** N generated tickets (``batchroute sample --kind tickets``) through the
  source stage and the route stage (rules and the bundled classifier), in this process, three
  ways: the tickets job's template (``Subject: {{ subject }}\\n\\n{{ body or "" }}``, which
  Arrow joins), the same template rendered by Jinja row by row (what a template with logic
  costs), and today's path, the same prompts written beforehand into a ``prompt`` column.
  The three alternate, round after round, so that drift on the machine hits them alike; the
  ratio of each to the prompt-column path is the headline.
- **Parse and validate.** Answers of a labels task and of ``schemas/invoice.schema.json``
  read by :class:`batchroute.task.OutputParser` and built into their result column:
  microseconds per result row.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import config, schemas, task
from batchroute.stages import source
from batchroute.stages.route import Candidate, RouteSpec, RouteStage

TEMPLATE = 'Subject: {{ subject }}\n\n{{ body or "" }}'
# The same prompts through Jinja, row by row: a conditional is beyond the Arrow join.
TEMPLATE_JINJA = 'Subject: {{ subject }}\n\n{{ body if body else "" }}'
LABELS = ("billing", "bug", "how-to", "account", "other")
BATCH_ROWS = 65_536
MODELS = (("mixtral-8x7b-instruct", 1.0, 32_768), ("claude-3-5-sonnet", 18.0, 200_000),
          ("gpt-4-1106-preview", 40.0, 128_000))


def bench(n: int, *, rounds: int = 2, parse_rows: int = 100_000,
          workdir: str | None = None) -> dict[str, Any]:
    from batchroute.devtools import sample_tables

    tmp = Path(workdir or tempfile.mkdtemp(prefix="batchroute-bench-task-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        tickets = sample_tables.generate_tickets(n, seed=0)
        pq.write_table(tickets, tmp / "tickets.parquet", row_group_size=BATCH_ROWS)
        the_task = task.parse({"template": TEMPLATE, "output": {"labels": list(LABELS)}})
        jinja_task = task.parse({"template": TEMPLATE_JINJA,
                                 "output": {"labels": list(LABELS)}})
        assert task.Renderer(the_task).vectorised
        assert not task.Renderer(jinja_task).vectorised
        rendered, _ = task.Renderer(the_task).render(
            {k: tickets.column(k).combine_chunks() for k in the_task.variables})
        pq.write_table(pa.table({"request_id": pc.cast(tickets.column("ticket_id"),
                                                       pa.string()),
                                 "prompt": rendered}),
                       tmp / "prompts.parquet", row_group_size=BATCH_ROWS)
        del tickets, rendered
        stage = RouteStage(_router_bytes(), _spec(the_task), config.BUNDLED_ROUTER)
        paths = {
            "prompt_column": (tmp / "prompts.parquet", None),
            "template_joined": (tmp / "tickets.parquet", the_task),
            "template_jinja": (tmp / "tickets.parquet", jinja_task),
        }
        seconds: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for name, (path, t) in paths.items():
                seconds[name].append(_source_and_route(path, t, stage, n))
        best = {k: min(v) for k, v in seconds.items()}
        parse = _parse_rates(parse_rows)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = best["prompt_column"]
    return {
        "n": n, "rounds": rounds, "template": TEMPLATE,
        "seconds": {k: [round(s, 3) for s in v] for k, v in seconds.items()},
        "prompts_per_s_per_core": {k: round(n / s, 1) for k, s in best.items()},
        "overhead_ratio": {k: round(s / base, 3) for k, s in best.items()},
        "parse_us_per_row": parse,
    }


def _router_bytes() -> bytes:
    from batchroute.routers import classifier as rt

    return rt.read_bytes(config.BUNDLED_ROUTER)


def _spec(the_task: task.TaskConfig) -> RouteSpec:
    from batchroute.config import Rule

    targets = tuple(Candidate(name, price, window, 10**9) for name, price, window in MODELS)
    return RouteSpec(targets, (Rule(name="long", model="claude-3-5-sonnet", min_chars=20_000),),
                     {"mixtral-8x7b-instruct": 0.55}, 16,
                     extra_chars=the_task.fixed_input_chars(), extra_messages=0)


def _source_and_route(path: Path, the_task: task.TaskConfig | None, stage: RouteStage,
                      n: int) -> float:
    """Seconds to read, render (if templated), canonicalise and route every row."""
    t0 = time.perf_counter()
    data = source.open_input(str(path), id_column="ticket_id" if the_task else "request_id",
                             task=the_task)
    rows = 0
    for batch in source.read_requests(data, BATCH_ROWS):
        rows += stage(batch).num_rows
    if rows != n:
        raise RuntimeError(f"routed {rows} rows, not {n}")
    return time.perf_counter() - t0


def _parse_rates(n: int) -> dict[str, float]:
    """µs per result row to parse, validate and build the column, for both output kinds."""
    rnd = random.Random(0)
    labels_spec = task.OutputSpec(kind="labels", labels=LABELS)
    label_answers = [json.dumps({"label": rnd.choice(LABELS)}) for _ in range(n)]
    schema = json.loads((schemas.SCHEMA_DIR / "invoice.schema.json").read_text())
    json_spec = task.OutputSpec(kind="json", schema=schema)
    invoice_answers = [json.dumps(_invoice(rnd, i)) for i in range(n)]
    out = {}
    for name, spec, answers in (("labels", labels_spec, label_answers),
                                ("json_invoice", json_spec, invoice_answers)):
        parser = task.OutputParser(spec)
        t0 = time.perf_counter()
        values = []
        for text in answers:
            value, why = parser.parse(text)
            if why is not None:
                raise RuntimeError(f"bench answer refused: {why}")
            values.append(value)
        task.values_array(spec, values)
        out[name] = round((time.perf_counter() - t0) / n * 1e6, 2)
    return out


def _invoice(rnd: random.Random, i: int) -> dict[str, Any]:
    items = [f"item {k}" for k in range(rnd.randint(1, 6))]
    subtotal = round(rnd.uniform(10, 5000), 2)
    tax = round(subtotal * 0.2, 2)
    return {"invoice_number": f"INV-2026-{i:06d}", "invoice_date": "2026-11-30",
            "due_date": None if i % 5 == 0 else "2026-12-30", "vendor": f"Vendor {i % 97}",
            "currency": rnd.choice(["USD", "EUR", "GBP"]), "subtotal": subtotal, "tax": tax,
            "total": round(subtotal + tax, 2), "line_items": items, "paid": i % 3 == 0}


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['n']:,} tickets, source + route on one core, best of {r['rounds']} "
             "alternating rounds:",
             f"{'path':<18}{'prompts/s':>12}{'÷ prompt column':>17}"]
    for k, rate in r["prompts_per_s_per_core"].items():
        lines.append(f"{k:<18}{rate:>12,.0f}{r['overhead_ratio'][k]:>17.3f}")
    p = r["parse_us_per_row"]
    lines.append(f"\nparse + validate + column: labels {p['labels']} µs/row, "
                 f"invoice JSON schema {p['json_invoice']} µs/row")
    return "\n".join(lines)
