"""The spend cap against thresholds, at equal spend, on labelled rows (``eval --budget-usd``).

For each budget (dollars per 1,000 prompts like the labelled ones, at the job's prices), and
for each threshold policy (``success`` and ``relative``):

1. the threshold policy calibrated to that budget, as ``calibrate --target budget-usd=B``
   chooses it (the best quality whose estimated spend is at most B);
2. the whole-batch assignment (:func:`batchroute.stages.budget.solve_budget`) capped at the
   spend the threshold policy actually reached, so the two are compared at equal spend.

Quality is the mean label score of the chosen models' answers on the rows (the held-out
split by default): the labels say how each model really did, the router only predicted it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from batchroute.config import JobConfig
from batchroute.routers import classifier as rt
from batchroute.stages import budget
from batchroute.stages.route import relative
from batchroute.training import calibrate, train


def compare(model_bytes: bytes, labels_uri: str, job: JobConfig, budgets: Sequence[float], *,
            split: str = "holdout") -> dict[str, Any]:
    router = rt.Router(model_bytes)
    models = list(router.info.models)
    table = train.labelled(labels_uri, models, split)
    order = calibrate.price_order(models, job)
    probs, scores, cost = calibrate.policy_inputs(router, table, order, job)
    assert cost is not None
    n = len(table)
    rows = np.arange(n)
    out: dict[str, Any] = {"rows": n, "split": split, "order": order, "points": [],
                           "strong_quality": float(scores[:, -1].mean()),
                           "weak_quality": float(scores[:, 0].mean())}
    for usd_per_1k in budgets:
        for policy in ("success", "relative"):
            ordered = relative(probs) if policy == "relative" else probs
            points = calibrate.replay(ordered, scores, calibrate.threshold_grid(ordered), cost)
            within = [p for p in points if p.usd_per_1k is not None
                      and p.usd_per_1k <= usd_per_1k]
            if not within:
                out["points"].append({"budget_usd_per_1k": usd_per_1k, "policy": policy,
                                      "feasible": False})
                continue
            best = max(within, key=lambda p: (p.quality, -(p.usd_per_1k or 0.0)))
            spend = (best.usd_per_1k or 0.0) * n / 1000
            solved = budget.solve_budget(probs, cost, spend)
            cap_quality = float(scores[rows, solved.choice].mean())
            out["points"].append({
                "budget_usd_per_1k": usd_per_1k, "policy": policy, "feasible": True,
                "threshold": best.threshold, "threshold_usd_per_1k": best.usd_per_1k,
                "threshold_quality": best.quality, "threshold_strong_share": best.strong_share,
                "budget_usd_per_1k_spent": solved.cost / n * 1000,
                "budget_quality": cap_quality,
                "budget_strong_share": float((solved.choice == len(order) - 1).mean()),
                "budget_predicted_quality": solved.quality})
    return out


def format_table(r: dict[str, Any]) -> str:
    lines = [f"{r['rows']:,} {r['split']} rows, {' < '.join(r['order'])} by price; all on the "
             f"cheapest {r['weak_quality']:.3f}, all on the strongest {r['strong_quality']:.3f}",
             f"{'$/1k cap':>9}  {'policy':<9}{'thresholds: $/1k':>17}{'quality':>9}"
             f"{'strong':>8}   {'budget: $/1k':>13}{'quality':>9}{'strong':>8}{'gain':>8}"]
    for p in r["points"]:
        if not p["feasible"]:
            lines.append(f"{p['budget_usd_per_1k']:>9.3f}  {p['policy']:<9}  below the cheapest "
                         "policy")
            continue
        lines.append(
            f"{p['budget_usd_per_1k']:>9.3f}  {p['policy']:<9}{p['threshold_usd_per_1k']:>17.3f}"
            f"{p['threshold_quality']:>9.3f}{100 * p['threshold_strong_share']:>7.1f}%   "
            f"{p['budget_usd_per_1k_spent']:>13.3f}{p['budget_quality']:>9.3f}"
            f"{100 * p['budget_strong_share']:>7.1f}%"
            f"{p['budget_quality'] - p['threshold_quality']:>+8.3f}")
    return "\n".join(lines)
