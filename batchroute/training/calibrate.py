"""``batchroute calibrate``: choose the router's thresholds for a target, and write them into it.

The job's policy sends a row to the cheapest model whose predicted success relative to the
strongest model's (``policy = "relative"``, the default) or whose predicted success
(``"success"``) clears its threshold, else to the strongest. Calibration replays that policy on labelled prompts with one
threshold ``t`` shared by every model below the strongest, over a grid of candidate values (the
quantiles of the router's own scores), and keeps the ``t`` that meets the target:

- ``strong-share=S``: the share of prompts sent to the strongest model closest to S;
- ``quality=Q``: the cheapest policy whose mean label score is at least Q x the strongest
  model's alone;
- ``budget-usd=B``: the best quality whose estimated spend is at most B dollars per 1,000
  prompts like these (prices, and the output budget, from ``--job``).

The thresholds go into the router file's metadata (with what was achieved, under
``calibration``); a job uses them unless its ``[router.thresholds]`` overrides a model.
Models are ordered cheapest first by the job's prices with ``--job``, else by their mean label
score (the weakest first).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from batchroute import tokens
from batchroute.config import DEFAULT_POLICY, JobConfig
from batchroute.errors import ConfigError
from batchroute.routers import classifier as rt
from batchroute.training import train

TARGETS = ("strong-share", "quality", "budget-usd")
GRID = 1000  # candidate thresholds: quantiles of the router's scores


@dataclass(frozen=True)
class CalibrationTarget:
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> CalibrationTarget:
        kind, sep, value = text.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or kind not in TARGETS or not np.isfinite(number) or number < 0:
            raise ConfigError(f"--target {text!r}: expected strong-share=S, quality=Q or "
                              "budget-usd=B with a non-negative number")
        if kind != "budget-usd" and number > 1:
            raise ConfigError(f"--target {text!r}: {kind} is a fraction between 0 and 1")
        return cls(kind, number)


@dataclass(frozen=True)
class OperatingPoint:
    """What the policy does at one shared threshold."""

    threshold: float
    strong_share: float
    quality: float  # mean label score of the chosen models' answers
    usd_per_1k: float | None  # estimated spend per 1,000 prompts (with prices)


def replay(probs: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
           cost: np.ndarray | None = None) -> list[OperatingPoint]:
    """The policy at each shared threshold. ``probs``/``scores`` are (rows, models) with the
    models cheapest first (the last is the strongest); ``cost`` the same shape in dollars."""
    n, m = probs.shape
    out = []
    for t in thresholds:
        clears = probs[:, :-1] >= t
        first = np.where(clears.any(axis=1), clears.argmax(axis=1), m - 1)
        picked = scores[np.arange(n), first]
        usd = None if cost is None else float(cost[np.arange(n), first].mean() * 1000)
        out.append(OperatingPoint(float(t), float((first == m - 1).mean()), float(picked.mean()), usd))
    return out


def price_order(models: Sequence[str], job: JobConfig) -> list[str]:
    """``models`` cheapest first by the job's prices (ConfigError for one it lacks)."""
    missing = [m for m in models if m not in job.models]
    if missing:
        raise ConfigError(f"router model {missing[0]!r} is not in the job's catalog")
    return sorted(models, key=lambda m: (job.models[m].input_usd_per_mtok
                                         + job.models[m].output_usd_per_mtok, m))


def policy_inputs(router: rt.Router, table: pl.DataFrame, order: Sequence[str],
                  job: JobConfig | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(predicted success, label scores, estimated dollars per call), each (rows, models)
    with the models in ``order``; dollars only with a job (prompt tokens at 4 characters per
    token, output at the job's default max_tokens)."""
    models = list(router.info.models)
    all_probs = router.score(pa.array(table["prompt"].to_list(), pa.string()))
    probs = all_probs[:, [models.index(m) for m in order]].astype(np.float64)
    scores = table.select(order).to_numpy().astype(np.float64)
    if job is None:
        return probs, scores, None
    chars = np.array([len(p) for p in table["prompt"].to_list()], np.int64)
    est_in = tokens.from_chars(chars)
    est_out = job.dispatch.default_max_tokens
    cost = np.stack([np.array([job.models[m].cost_usd(i, est_out) for i in est_in])
                     for m in order], axis=1)
    return probs, scores, cost


def threshold_grid(probs: np.ndarray) -> np.ndarray:
    """Candidate shared thresholds: quantiles of the cheaper models' scores, plus both ends
    (everything to the cheapest model, everything to the strongest)."""
    grid = np.unique(np.quantile(probs[:, :-1], np.linspace(0.0, 1.0, GRID)))
    return np.concatenate([[0.0], grid, [np.nextafter(1.0, 2.0)]])


def frontier(outcomes: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """The outcomes no other beats on both cost and quality, cheapest first."""
    best: list[OperatingPoint] = []
    for o in sorted(outcomes, key=lambda o: (o.usd_per_1k or 0.0, -o.quality)):
        if not best or o.quality > best[-1].quality:
            best.append(o)
    return best


def choose(outcomes: Sequence[OperatingPoint], target: CalibrationTarget, strong_quality: float) -> OperatingPoint:
    """The outcome that meets ``target`` (ConfigError when none can)."""
    if target.kind == "strong-share":
        return min(outcomes, key=lambda o: (abs(o.strong_share - target.value), -o.quality))
    if target.kind == "quality":
        good = [o for o in outcomes if o.quality >= target.value * strong_quality - 1e-12]
        if not good:
            best = max(o.quality for o in outcomes)
            raise ConfigError(f"--target quality={target.value}: no threshold reaches it; the "
                              f"best is {best / strong_quality:.3f} of the strongest model's")
        return min(good, key=lambda o: (o.strong_share, -o.quality))
    within = [o for o in outcomes if o.usd_per_1k is not None and o.usd_per_1k <= target.value]
    if not within:
        cheapest = min(o.usd_per_1k or 0.0 for o in outcomes)
        raise ConfigError(f"--target budget-usd={target.value}: even the cheapest policy costs "
                          f"${cheapest:.4f} per 1,000 prompts")
    return max(within, key=lambda o: (o.quality, -(o.usd_per_1k or 0.0)))


def calibrate(model_bytes: bytes, labels_uri: str | Sequence[str], target: CalibrationTarget,
              *,
              job: JobConfig | None = None, split: str = "all",
              policy: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """The router file with calibrated thresholds, and a summary of what they achieve.
    ``labels_uri`` is one label dataset or several, merged as train merges them; only the
    prompts labelled for every model of the router count. ``policy`` is what the thresholds
    apply to ("relative" or "success", see :class:`batchroute.config.RouterConfig`); default:
    the job's, else :data:`batchroute.config.DEFAULT_POLICY` ("relative")."""
    from batchroute.stages.route import relative

    policy = policy or (job.router.policy if job is not None else DEFAULT_POLICY)
    router = rt.Router(model_bytes)
    models = list(router.info.models)
    table = train.labelled(labels_uri, models, split)
    if job is not None:
        order = price_order(models, job)
    else:
        means = {m: float(table[m].to_numpy().mean()) for m in models}
        order = sorted(models, key=lambda m: (means[m], m))
    if target.kind == "budget-usd" and job is None:
        raise ConfigError("--target budget-usd needs --job JOB.toml for the models' prices")

    probs, scores, cost = policy_inputs(router, table, order, job)
    if policy == "relative":
        probs = relative(probs)
    outcomes = replay(probs, scores, threshold_grid(probs), cost)
    strong_quality = float(scores[:, -1].mean())
    best = choose(outcomes, target, strong_quality)
    thresholds = dict.fromkeys(order[:-1], best.threshold) | {order[-1]: 0.0}
    summary = {
        "target": f"{target.kind}={target.value}", "policy": policy, "rows": len(table),
        "split": split,
        "order": order, "thresholds": thresholds, "strong_share": best.strong_share,
        "quality": best.quality, "strong_quality": strong_quality,
        "quality_vs_strong": best.quality / strong_quality if strong_quality else None,
        "usd_per_1k_prompts": best.usd_per_1k,
    }
    # New thresholds route differently, so the file gets a new version: resumes and backfills
    # then treat it as a new router, as they must.
    base = router.info.version.split("+cal-")[0]
    digest = hashlib.sha256(json.dumps(thresholds, sort_keys=True).encode()).hexdigest()[:8]
    version = f"{base}+cal-{digest}"
    summary["version"] = version
    meta = {"thresholds": json.dumps(thresholds), "calibration": json.dumps(summary),
            "policy": policy, "version": version}
    return rt.with_metadata(model_bytes, meta), summary
