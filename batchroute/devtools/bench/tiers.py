"""``batchroute bench tiers``: what the demo input costs four ways, from one run each.

1. every row on the reference model at sync prices (what a job without batchroute pays);
2. every row on the reference model through the provider's batch API;
3. routed (jobs/demo.toml's router) at sync prices;
4. routed and batched: every model through the batch API.

The runs use ``jobs/demo.toml`` as shipped against the mock provider (no latency, limits that
do not bind, one-second batches), with every model's ``batch_discount`` at 0.5 (OpenAI's and
Anthropic's batch discount). The demo's sample rows carry ``force_model`` on a few rows; those
are kept in every run, so the "all on the reference" runs are all on it but for them.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from batchroute.devtools.bench import on_mock

RUNS = (("reference, sync", False, False), ("reference, batch", False, True),
        ("routed, sync", True, False), ("routed, batch", True, True))


def run(job_path: str, rows: int, workdir: str | None) -> dict[str, Any]:
    import polars as pl

    from batchroute import config
    from batchroute.devtools import sample
    from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
    from batchroute.job import runner
    from batchroute.job.progress import Progress

    folder = Path(workdir or tempfile.mkdtemp(prefix="bench-tiers-"))
    folder.mkdir(parents=True, exist_ok=True)
    sample.write(sample.generate(rows, seed=0), folder / "prompts.parquet")
    doc = tomllib.loads(Path(job_path).read_text())
    os.environ.setdefault("BATCHROUTE_BENCH_KEY", "sk-bench-not-a-real-key")
    figures: dict[str, Any] = {"job": job_path, "rows": rows, "runs": {}}
    cfg = MockProviderConfig(batch_delay_s=1.0)
    with MockProvider(cfg) as provider:
        for name, routed, batched in RUNS:
            job = config.parse(_job(doc, provider.url, folder, routed, batched))
            out = runner.run(job, run_id=name.replace(", ", "-"),
                             progress=Progress(io.StringIO(), interval_s=3600))
            roll = pl.read_parquet(out.folder.sub("rollups"))
            results = pl.read_parquet(out.folder.sub("results"), columns=["status", "tier"])
            figures["runs"][name] = {
                "ok": int((results["status"] == "ok").sum()),
                "cost_usd": int(roll["cost_micro_usd"].sum()) / 1e6,
                "batch_cost_usd": int(roll["batch_cost_micro_usd"].sum()) / 1e6,
                "routing_savings_usd": float(roll["routing_savings_usd"].sum()),
                "tier_savings_usd": float(roll["tier_savings_usd"].sum()),
            }
    base = figures["runs"]["reference, sync"]["cost_usd"]
    for r in figures["runs"].values():
        r["off_reference_sync_pct"] = round(100 * (1 - r["cost_usd"] / base), 1) if base else None
    return figures


def _job(doc: dict[str, Any], url: str, folder: Path, routed: bool,
         batched: bool) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc.pop("quality", None)  # shadow checks are overhead apart from what this bench prices
    reference = doc["job"]["reference_model"]
    name = f"{'routed' if routed else 'reference'}-{'batch' if batched else 'sync'}"
    doc["job"].update(name=name, input=str(folder / "prompts.parquet"),
                      output=str(folder / "runs"))
    if not routed:
        doc["router"] = {"stages": ["rules"], "fallback": reference,
                         "rules": [{"name": "all", "min_chars": 1, "model": reference}]}
    on_mock(doc["models"], url, "BATCHROUTE_BENCH_KEY", concurrency=128, batch_discount=0.5,
            tier="batch" if batched else "sync")
    return doc


def format_figures(f: dict[str, Any]) -> str:
    lines = [f"{f['job']} on {f['rows']} sample rows (batch_discount 0.5)",
             f"{'':<18}{'ok':>7}{'cost $':>11}{'vs ref sync':>13}{'from routing $':>16}"
             f"{'from tier $':>13}"]
    for name, r in f["runs"].items():
        lines.append(f"{name:<18}{r['ok']:>7}{r['cost_usd']:>11.4f}"
                     f"{r['off_reference_sync_pct']:>12.1f}%{r['routing_savings_usd']:>16.4f}"
                     f"{r['tier_savings_usd']:>13.4f}")
    return "\n".join(lines)
