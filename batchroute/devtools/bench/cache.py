"""``batchroute bench cache``: the tickets job on its Anthropic model, with and without
``[task] cache_prefix``, against the mock provider's prompt cache: input cost, total cost and
the share of input served from cache, from one run each.

The job is ``jobs/classify-tickets.toml`` as shipped (its guidelines are the shared prefix),
with every ticket routed to its Anthropic model and the model's limits raised so that calls
overlap as they would at volume. Both runs read the same generated tickets
(``batchroute sample --kind tickets``) and get the same answers: only the price differs.
"""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path
from typing import Any

from batchroute.devtools.bench import on_mock


def run(job_path: str, rows: int, latency_ms: float, workdir: str | None) -> dict[str, Any]:
    import io
    import os

    import polars as pl
    import pyarrow.parquet as pq

    from batchroute import config
    from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
    from batchroute.devtools.sample_tables import generate_tickets
    from batchroute.job import runner
    from batchroute.job.progress import Progress

    folder = Path(workdir or tempfile.mkdtemp(prefix="bench-cache-"))
    folder.mkdir(parents=True, exist_ok=True)
    tickets = folder / "tickets.parquet"
    pq.write_table(generate_tickets(rows, seed=0), tickets)
    doc = tomllib.loads(Path(job_path).read_text())
    anthropic = [n for n, m in doc["models"].items() if m["provider"] == "anthropic"]
    if not anthropic:
        raise SystemExit(f"{job_path}: no Anthropic model to route the tickets to")
    model = anthropic[0]
    os.environ.setdefault("BATCHROUTE_BENCH_KEY", "sk-bench-not-a-real-key")
    figures: dict[str, Any] = {"job": job_path, "model": model, "rows": rows, "runs": {}}
    with MockProvider(MockProviderConfig(latency_ms=latency_ms)) as provider:
        for mode, cache in (("cache_prefix on", True), ("cache_prefix off", False)):
            job = config.parse(_job(doc, model, provider.url, tickets, folder / "runs", cache))
            out = runner.run(job, run_id=f"cache-{'on' if cache else 'off'}",
                             progress=Progress(io.StringIO(), interval_s=3600))
            results = pl.read_parquet(out.folder.sub("results"),
                                      columns=["status", "input_tokens", "cached_input_tokens",
                                               "cache_write_input_tokens", "output_tokens",
                                               "cost_micro_usd"])
            m = job.models[model]
            sums = results.sum().row(0, named=True)
            total = int(sums["cost_micro_usd"])
            output = round(sums["output_tokens"] * m.output_usd_per_mtok)
            figures["runs"][mode] = {
                "ok": int((results["status"] == "ok").sum()),
                "input_tokens": int(sums["input_tokens"]),
                "cached_input_tokens": int(sums["cached_input_tokens"]),
                "cache_write_input_tokens": int(sums["cache_write_input_tokens"]),
                "cached_share": (sums["cached_input_tokens"] / sums["input_tokens"]
                                 if sums["input_tokens"] else 0.0),
                # Output is billed alike in both runs; the rest of the bill is input.
                "input_cost_usd": (total - output) / 1e6,
                "total_cost_usd": total / 1e6,
            }
    return figures


def _job(doc: dict[str, Any], model: str, url: str, tickets: Path, runs: Path,
         cache: bool) -> dict[str, Any]:
    import copy

    doc = copy.deepcopy(doc)
    doc.pop("quality", None)  # shadow checks are overhead apart from what this bench prices
    doc["job"].update(input=str(tickets), output=str(runs), reference_model=model)
    doc["task"]["cache_prefix"] = cache
    doc["router"] = {"stages": ["rules"], "fallback": model,
                     "rules": [{"name": "all", "min_chars": 1, "model": model}]}
    doc["dispatch"]["escalate_on"] = []
    on_mock(doc["models"], url, "BATCHROUTE_BENCH_KEY")
    return doc


def format_figures(f: dict[str, Any]) -> str:
    lines = [f"{f['job']}: {f['rows']} tickets, all on {f['model']}",
             f"{'':<18}{'ok':>6}{'input tok':>12}{'from cache':>12}{'input $':>11}"
             f"{'total $':>11}"]
    for mode, r in f["runs"].items():
        lines.append(f"{mode:<18}{r['ok']:>6}{r['input_tokens']:>12}{r['cached_share']:>12.1%}"
                     f"{r['input_cost_usd']:>11.4f}{r['total_cost_usd']:>11.4f}")
    on, off = f["runs"]["cache_prefix on"], f["runs"]["cache_prefix off"]
    if off["total_cost_usd"]:
        lines.append(f"the cache takes {1 - on['input_cost_usd'] / off['input_cost_usd']:.1%} "
                     f"off the input cost, {1 - on['total_cost_usd'] / off['total_cost_usd']:.1%}"
                     " off the total")
    return "\n".join(lines)
