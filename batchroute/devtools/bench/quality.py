"""``batchroute bench quality``: is the shadow checks' interval honest?

For each seed, the demo's input (``batchroute sample --seed SEED``) is routed in-process by the
demo job's own router (jobs/demo.toml: its rules and the bundled classifier), and every
answered row's true quality relative to the reference model is computed from the mock
provider's quality model (:mod:`batchroute.devtools.mock_quality`): what a perfect judge
reading the mock's answers would report. The shadow sample and the quality rollup are the
product's own (:mod:`batchroute.stages.quality`), fed the sampled rows' true grades as the
mock's judge returns them. Over the seeds the bench counts how often the run's 95% interval
covers the true retained quality, and its mean width.

Only the HTTP round trips are left out; the integration test of the job checks that a real run
over the mock grades exactly these pairs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import config
from batchroute.devtools import sample
from batchroute.devtools.mock_quality import QualityModel
from batchroute.routers import classifier as rt
from batchroute.stages import quality, source
from batchroute.stages.route import RouteSpec, RouteStage

DEMO_JOB = Path(__file__).resolve().parents[3] / "jobs" / "demo.toml"


def routed_demo(rows: int, seed: int, job: config.JobConfig, workdir: Path) -> pa.Table:
    """The demo input of ``seed`` routed by ``job``'s router: the rows that reach a model."""
    path = workdir / f"prompts-{seed}.parquet"
    pq.write_table(sample.generate(rows, seed=seed), path)
    data = source.open_input(str(path))
    spec = RouteSpec.from_job(job)
    stage = RouteStage(rt.read_bytes(job.router.path), spec, job.router.path)
    parts = [stage(batch) for batch in source.read_requests(data, job.router.batch_size)]
    routed = pa.concat_tables(parts)
    return routed.filter(pc.is_null(routed.column("reject_reason")))


def one_seed(routed: pa.Table, *, reference: str, share: float, seed: int,
             model: QualityModel) -> dict[str, Any]:
    """One simulated night: the truth, the estimate and whether the interval covers it."""
    models = routed.column("model").to_pylist()
    texts = source.request_text(routed).to_pylist()
    truth_rows = np.array([1.0 if m == reference else model.true_score(t, m, reference)
                           for m, t in zip(models, texts, strict=True)])
    answered = routed.select(["request_id", "model", "route_stage"])
    picked = quality.sample(quality.candidates(
        answered.append_column("status", pa.array(["ok"] * routed.num_rows)), reference),
        share=share, seed=seed)
    index = {rid: i for i, rid in enumerate(routed.column("request_id").to_pylist())}
    at = [index[r] for r in picked.column("request_id").to_pylist()]
    n = picked.num_rows
    shadows = quality.shadow_table(
        picked, reference_model=reference, status=["ok"] * n,
        score=[float(truth_rows[i]) for i in at], graded_by="judge",
        reference_response=[None] * n, errors=[None] * n, cost=[0] * n)
    table = quality.rollup(answered, shadows, reference=reference, run_id=f"seed-{seed}",
                           seed=seed)
    run = quality.run_row(table)
    truth = float(truth_rows.mean())
    return {"seed": seed, "truth": truth, "retained": run["retained"],
            "low": run["retained_low"], "high": run["retained_high"],
            "shadowed": run["shadowed"],
            "covered": bool(run["retained_low"] <= truth <= run["retained_high"])}


def coverage(seeds: Sequence[int], shares: Sequence[float], *, rows: int = 20_000,
             job_path: str | Path = DEMO_JOB) -> dict[str, Any]:
    """Coverage and mean interval width of the run's retained quality over ``seeds``, for
    each shadow share."""
    job = config.load(job_path)
    job = replace(job, router=replace(job.router, path=config.BUNDLED_ROUTER))
    model = QualityModel()
    out: dict[str, Any] = {"rows": rows, "seeds": len(seeds), "reference": job.reference_model,
                           "shares": []}
    with tempfile.TemporaryDirectory(prefix="batchroute-bench-quality-") as tmp:
        nights = {s: routed_demo(rows, s, job, Path(tmp)) for s in seeds}
        for share in shares:
            runs = [one_seed(nights[s], reference=job.reference_model, share=share, seed=s,
                             model=model) for s in seeds]
            widths = [r["high"] - r["low"] for r in runs]
            out["shares"].append({
                "shadow_share": share,
                "coverage": sum(r["covered"] for r in runs) / len(runs),
                "mean_width": float(np.mean(widths)),
                "mean_shadowed": float(np.mean([r["shadowed"] for r in runs])),
                "mean_truth": float(np.mean([r["truth"] for r in runs])),
                "runs": runs})
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['seeds']} seeds of the demo input, {result['rows']} rows each, "
             f"reference {result['reference']}",
             "shadow_share  coverage  mean width  mean shadowed  mean true retained"]
    for s in result["shares"]:
        lines.append(f"{s['shadow_share']:>12.2f}  {s['coverage']:>8.0%}  "
                     f"{100 * s['mean_width']:>9.2f}%  {s['mean_shadowed']:>13.0f}  "
                     f"{100 * s['mean_truth']:>17.2f}%")
    return "\n".join(lines)
