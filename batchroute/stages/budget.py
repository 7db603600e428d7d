"""A spend cap solved over the whole batch: ``[router] budget_usd`` or ``max_strong_share``.

The whole night's input is known before the first call, so instead of per-row thresholds
calibrated on other traffic, the rows a classifier or similarity stage decided are assigned
together: each row gets the model that maximises the total predicted success under the cap.
That is a multiple-choice knapsack (one model per row, a predicted success ``q[i, m]`` and an
estimated cost ``c[i, m]`` for each), solved by a Lagrangian threshold on gain per dollar:
every row takes ``argmax_m q[i, m] - lam * c[i, m]``, and ``lam`` is the smallest price of a
dollar (found by bisection) at which the total cost fits. A row then moves to a dearer model
exactly when the extra success it buys is worth more than ``lam`` per extra dollar, so the
budget goes where it buys the most. ``max_strong_share`` is the same with a price on a row
sent to the strongest model instead of on a dollar.

What each model can serve before ``[dispatch] deadline`` at its RPM and TPM is respected
inside the solve: a model given more rows than that keeps the rows that lose most by moving,
and the others take their next best model, still under the cap.

Everything here is numpy over whole arrays; :func:`reassign` applies the solution to a run
folder's plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute.config import JobConfig
from batchroute.errors import ConfigError
from batchroute.stages import history, plan
from batchroute.stages.sink import RunFolder

BISECTIONS = 60
# The stages whose rows carry a predicted success per model.
PREDICTED = ("classifier", "similarity")
REASON = "budget"
CURVE = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the plan's curve: these multiples of the cap


class Infeasible(ConfigError):
    """The cap cannot be met even with every row on its cheapest model."""


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # int64 [n]: column of the chosen model per row
    lam: float          # the price put on a dollar (budget) or a strong row (share)
    cost: float         # estimated dollars of the chosen assignment
    quality: float      # mean predicted success of the chosen models


def _value(q: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """``q - lam * c``, and -inf where a row cannot go (inf cost), whatever ``lam``."""
    finite = np.isfinite(c)
    out: np.ndarray = np.where(finite, q - lam * np.where(finite, c, 0.0), -np.inf)
    return out


def _pick(q: np.ndarray, c: np.ndarray, lam: float,
          caps: dict[int, int] | None = None) -> np.ndarray:
    """Each row's best column at a price ``lam`` on a dollar, then no column above its cap.
    Ties go to the first (cheapest) column; an impossible cell never wins unless every cell
    of the row is impossible, which the caller refuses."""
    value = _value(q, c, lam)
    choice: np.ndarray = np.argmax(value, axis=1)
    return _capped(value, c, choice, caps) if caps else choice


def _finish(q: np.ndarray, c: np.ndarray, choice: np.ndarray, lam: float) -> Solution:
    rows = np.arange(len(choice))
    return Solution(choice, lam, float(c[rows, choice].sum()),
                    float(q[rows, choice].mean()) if len(choice) else 0.0)


def cheapest(c: np.ndarray, caps: dict[int, int] | None = None) -> np.ndarray:
    """Each row's cheapest possible model (column); with ``caps``, a full model keeps the rows
    that would cost most more elsewhere, and the others take their next cheapest."""
    choice: np.ndarray = np.argmin(c, axis=1)
    return _capped(-c, c, choice, caps) if caps else choice


def floor_usd(c: np.ndarray, caps: dict[int, int] | None = None) -> float:
    """The cost of the cheapest possible assignment (:func:`cheapest`)."""
    return float(c[np.arange(len(c)), cheapest(c, caps)].sum()) if len(c) else 0.0


def _fill(q: np.ndarray, c: np.ndarray, over: np.ndarray, within: np.ndarray, budget: float,
          caps: dict[int, int] | None) -> np.ndarray:
    """``within`` (at most ``budget``) with the rows that ``over`` (the assignment just above
    the budget, at a slightly lower lambda) puts elsewhere moved there too, best gain per
    dollar first, while the money lasts. Rows that tie at lambda (a night's duplicated
    prompts) otherwise all move together, and the cap would be left unused."""
    rows = np.flatnonzero(over != within)
    if not len(rows):
        return within
    gain = q[rows, over[rows]] - q[rows, within[rows]]
    extra = c[rows, over[rows]] - c[rows, within[rows]]
    good = gain > 0
    rows, gain, extra = rows[good], gain[good], extra[good]
    with np.errstate(divide="ignore"):
        ratio = np.where(extra > 0, gain / np.where(extra > 0, extra, 1.0), np.inf)
    order = np.argsort(-ratio, kind="stable")
    left = budget - float(c[np.arange(len(within)), within].sum())
    spent = np.maximum.accumulate(np.cumsum(extra[order]))
    take = rows[order[spent <= left]]
    out = within.copy()
    out[take] = over[take]
    if caps:
        before, after = (np.bincount(x, minlength=c.shape[1]) for x in (within, out))
        if any(after[j] > max(cap, before[j]) for j, cap in caps.items()):
            return within
    return out


def solve_budget(q: np.ndarray, c: np.ndarray, budget: float,
                 caps: dict[int, int] | None = None) -> Solution:
    """The assignment of most predicted success whose cost is at most ``budget``, with no
    column given more rows than ``caps`` allows (column -> rows). ``q`` and ``c`` are [rows,
    models] (``c`` inf where a row cannot go). Raises Infeasible when even the cheapest
    assignment costs more."""
    n = len(q)
    if n == 0:
        return Solution(np.zeros(0, np.int64), 0.0, 0.0, 0.0)
    low = cheapest(c, caps)
    floor = float(c[np.arange(n), low].sum())
    if floor > budget * (1 + 1e-12):
        raise Infeasible(f"router.budget_usd: {budget:.2f} is below the cheapest assignment "
                         f"of these rows, ${floor:.2f}")
    best = _finish(q, c, _pick(q, c, 0.0, caps), 0.0)
    if best.cost <= budget:
        return best
    lo, hi = 0.0, 1.0
    while _finish(q, c, _pick(q, c, hi, caps), hi).cost > budget:
        lo, hi = hi, 2.0 * hi
        if hi > 1e18:  # only exact ties in q keep dearer models: take the cheapest
            return _finish(q, c, low, math.inf)
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        if _finish(q, c, _pick(q, c, mid, caps), mid).cost > budget:
            lo = mid
        else:
            hi = mid
    choice = _fill(q, c, _pick(q, c, lo, caps), _pick(q, c, hi, caps), budget, caps)
    return _finish(q, c, choice, hi)


def solve_share(q: np.ndarray, c: np.ndarray, share: float,
                caps: dict[int, int] | None = None) -> Solution:
    """The assignment of most predicted success with at most ``share`` of the rows on the
    strongest (last) model, and no column above ``caps``. The price ``mu`` put on a row sent
    to the strongest model is found by bisection; the rows that tie at it (duplicated prompts)
    then fill the share, those that lose most by leaving first."""
    n, m = q.shape if q.ndim == 2 else (0, 0)
    if n == 0:
        return Solution(np.zeros(0, np.int64), 0.0, 0.0, 0.0)
    limit = math.floor(share * n + 1e-9)
    strong = {m - 1: min(limit, (caps or {}).get(m - 1, limit))}
    penalty = np.zeros(m)
    penalty[-1] = 1.0

    def count(mu: float) -> int:
        return int((_pick(q - mu * penalty, c, 0.0, caps) == m - 1).sum())

    lo, hi = 0.0, 2.0  # success is in [0, 1]: a price of 2 sends no row to the strongest
    if count(0.0) <= limit:
        hi = 0.0
    else:
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo + hi)
            if count(mid) > limit:
                lo = mid
            else:
                hi = mid
    # At ``lo`` the strongest model is (just) over the share: keep the rows it helps most.
    choice = _pick(q - lo * penalty, c, 0.0, {**(caps or {}), **strong})
    return _finish(q, c, choice, hi)


def _capped(value: np.ndarray, c: np.ndarray, choice: np.ndarray,
            caps: dict[int, int] | None) -> np.ndarray:
    """``choice`` with no column holding more rows than its cap: a full column keeps the rows
    that lose most by leaving it; the others take their best column with room. A row with
    no such column stays (nothing can serve it in time)."""
    choice = choice.copy()
    if not caps:
        return choice
    value = np.where(np.isfinite(c), value, -np.inf)
    closed: set[int] = set()
    for _ in range(value.shape[1]):
        over = [j for j, cap in caps.items() if (choice == j).sum() > cap]
        if not over:
            break
        for j in over:
            closed.add(j)
            rows = np.flatnonzero(choice == j)
            alt = value[rows].copy()
            alt[:, sorted(closed)] = -np.inf
            second = np.argmax(alt, axis=1)
            best_alt = alt[np.arange(len(rows)), second]
            loss = value[rows, j] - best_alt
            keep = np.argsort(-loss, kind="stable")[:max(caps[j], 0)]
            move = np.setdiff1d(np.arange(len(rows)), keep)
            move = move[np.isfinite(best_alt[move])]
            choice[rows[move]] = second[move]
    return choice


def capacity(job: JobConfig, models: Sequence[str], tokens: np.ndarray,
             used: dict[str, tuple[int, int]] | None = None, now: datetime | None = None,
             started: datetime | None = None) -> dict[int, int]:
    """Rows each sync model can still be sent before ``[dispatch] deadline`` (column ->
    rows), none without a deadline: its RPM and its TPM over the time left, less what the
    rows the cap does not move already take of it (``used``: model -> (rows, tokens)), the
    TPM at the mean estimated tokens of the rows to assign (``tokens``: input plus
    max_tokens per row, as the forecast's wall time counts them). Batch-tier models are
    bounded by the provider's turnaround, not by their limits. A deadline given as a
    duration counts from ``started`` (the run's start, as dispatch counts it; default
    ``now``)."""
    now = now or datetime.now(UTC)
    deadline = job.dispatch.deadline_at(started or now)
    if deadline is None:
        return {}
    minutes = max(0.0, (deadline - now).total_seconds() / 60.0)
    mean = float(tokens.mean()) if len(tokens) else 0.0
    out = {}
    for j, m in enumerate(models):
        cfg = job.models[m]
        if cfg.tier == "batch":
            continue
        rows, toks = (used or {}).get(m, (0, 0))
        by_rpm = cfg.rpm * minutes - rows
        by_tpm = (cfg.tpm * minutes - toks) / mean if mean > 0 else math.inf
        out[j] = max(0, math.floor(min(by_rpm, by_tpm)))
    return out


def costs(job: JobConfig, models: Sequence[str], est_in: np.ndarray, est_out: np.ndarray,
          per_answer: dict[str, float]) -> np.ndarray:
    """Estimated dollars of each row on each model [rows, models]: the forecast's own
    estimate (:func:`batchroute.stages.plan.row_cost_usd`)."""
    cols = [plan.row_cost_usd(job.models[m], est_in, est_out, per_answer) for m in models]
    return np.stack(cols, axis=1) if cols else np.zeros((len(est_in), 0))


def fits(job: JobConfig, models: Sequence[str], tokens: np.ndarray) -> np.ndarray:
    """[rows, models]: whether a row's estimated tokens fit the model (its context window
    and one minute of its TPM), as the route stage checks its own choice."""
    limit = np.array([min(job.models[m].context_window, job.models[m].tpm) for m in models])
    out: np.ndarray = tokens[:, None] <= limit[None, :]
    return out


def scores_matrix(routed: pa.Table, models: Sequence[str]) -> np.ndarray:
    """[rows, models] predicted success from the rows' evidence: the classifier's scores,
    or the similarity stage's for rows it decided. NaN where a model has none."""
    n = routed.num_rows
    out = np.full((n, len(models)), np.nan)
    index = {m: j for j, m in enumerate(models)}
    stage = routed.column("route_stage").to_numpy(zero_copy_only=False)
    for column, rows in (("router_scores", stage != "similarity"),
                         ("similarity_scores", stage == "similarity")):
        if column not in routed.column_names or not rows.any():
            continue
        lists = routed.column(column).combine_chunks()
        flat = pc.list_flatten(lists)
        if not len(flat):
            continue
        parent = pc.list_parent_indices(lists).to_numpy()
        names = flat.field("model").to_numpy(zero_copy_only=False)
        vals = flat.field("score").to_numpy(zero_copy_only=False).astype(np.float64)
        cols = np.array([index.get(x, -1) for x in names], np.int64)
        keep = (cols >= 0) & rows[parent]
        out[parent[keep], cols[keep]] = vals[keep]
    return out


def _scored_models(table: pa.Table) -> list[str]:
    names: set[str] = set()
    for column in ("router_scores", "similarity_scores"):
        flat = pc.list_flatten(table.column(column))
        if len(flat):
            names |= {n for n in pc.unique(pc.struct_field(flat, "model")).to_pylist() if n}
    return sorted(names)


def reassign(folder: RunFolder, job: JobConfig, started: datetime | None = None
             ) -> tuple[dict[str, int], dict[str, Any]]:
    """Apply the spend cap to the plan written in ``folder``: read every routed row's
    evidence (not its prompt), solve, and rewrite the rows whose model changed. Returns the
    routed rows per model and what the forecast reports of the solution. Raises Infeasible
    (a ConfigError) when the cap cannot be met."""
    r = job.router
    shards = folder.shards(folder.sub("routed"))
    cols = ["request_id", "route_stage", "route_reason", "router_scores",
            "similarity_scores", "est_input_tokens", "est_output_tokens"]
    parts, owner = [], []
    for k, path in enumerate(shards):
        t = pq.read_table(path, filesystem=folder.fs, columns=cols)
        parts.append(t.append_column("model", pa.array(
            [_partition_model(path)] * t.num_rows, pa.string())))
        owner.append(np.full(t.num_rows, k))
    table = pa.concat_tables(parts) if parts else None
    past = history.read(folder, job.name)
    per_answer = plan.output_per_answer(job, past)
    if table is None:
        return {}, {}
    models = sorted((m for m in _scored_models(table) if m in job.models),
                    key=lambda m: (job.models[m].input_usd_per_mtok
                                   + job.models[m].output_usd_per_mtok, m))
    est_in = table.column("est_input_tokens").to_numpy().astype(np.int64)
    est_out = table.column("est_output_tokens").to_numpy().astype(np.int64)
    stage = table.column("route_stage").to_numpy(zero_copy_only=False)
    q = scores_matrix(table, models)
    eligible = np.isin(stage, PREDICTED) & ~np.isnan(q).any(axis=1)
    planned = table.column("model").to_numpy(zero_copy_only=False)
    # What the rows the cap does not move cost: each on its planned model.
    fixed = 0.0
    for m in np.unique(planned[~eligible]):
        rows = ~eligible & (planned == m)
        fixed += float(plan.row_cost_usd(job.models[str(m)], est_in[rows], est_out[rows],
                                         per_answer).sum())
    c = costs(job, models, est_in[eligible], est_out[eligible], per_answer)
    tokens = (est_in + est_out).astype(np.int64)
    c = np.where(fits(job, models, tokens[eligible]), c, np.inf)
    qe = q[eligible]
    used = {str(m): (int(((~eligible) & (planned == m)).sum()),
                     int(tokens[(~eligible) & (planned == m)].sum()))
            for m in np.unique(planned[~eligible])}
    caps = capacity(job, models, tokens[eligible], used, started=started)
    if r.budget_usd is not None:
        floor = fixed + floor_usd(c, caps)
        if floor > r.budget_usd:
            raise Infeasible(f"router.budget_usd: {r.budget_usd:.2f} is below the cheapest "
                             f"possible assignment of this input, ${floor:.2f} (every row "
                             f"the router decides on its cheapest model"
                             f"{' that can serve it before the deadline' if caps else ''}, "
                             f"the others as routed); raise it to at least "
                             f"{math.ceil(floor * 100) / 100:.2f}")
        solution = solve_budget(qe, c, r.budget_usd - fixed, caps)
    else:
        assert r.max_strong_share is not None
        solution = solve_share(qe, c, r.max_strong_share, caps)
    choice = solution.choice
    new = planned.copy()
    new[eligible] = np.array(models, dtype=object)[choice]
    counts = _rewrite(folder, shards, table, np.concatenate(owner), new, eligible,
                      solution.lam)
    curve = []
    if r.budget_usd is not None:
        for f in CURVE:
            try:
                point: Solution | None = solve_budget(qe, c, f * r.budget_usd - fixed, caps)
            except Infeasible:
                point = None
            curve.append({"budget_usd": round(f * r.budget_usd, 2),
                          "est_cost_usd": None if point is None else round(point.cost + fixed, 4),
                          "predicted_quality": None if point is None else round(point.quality,
                                                                                4)})
    reasons = table.column("route_reason").to_numpy(zero_copy_only=False).astype(object)
    reasons[eligible] = REASON
    kinds, n_kind = np.unique(reasons[reasons != None].astype(str),  # noqa: E711
                              return_counts=True)
    share_strong = float((choice == len(models) - 1).mean()) if len(choice) else 0.0
    summary = {
        "kind": "budget_usd" if r.budget_usd is not None else "max_strong_share",
        "budget_usd": r.budget_usd, "max_strong_share": r.max_strong_share,
        "rows": int(eligible.sum()), "fixed_rows": int((~eligible).sum()),
        "fixed_cost_usd": round(fixed, 4),
        "est_cost_usd": round(solution.cost + fixed, 4),
        "predicted_quality": round(solution.quality, 4),
        "strong_share": round(share_strong, 4),
        "lambda": solution.lam if math.isfinite(solution.lam) else None,
        "per_model": {m: int((choice == j).sum()) for j, m in enumerate(models)},
        "curve": curve,
        "decided_by": {str(k): int(v) for k, v in zip(kinds, n_kind, strict=True)},
    }
    return counts, summary


def _partition_model(path: str) -> str:
    import urllib.parse

    for part in path.split("/"):
        if part.startswith("model="):
            return urllib.parse.unquote(part[len("model="):])
    raise ValueError(f"{path}: not in a routed/model=NAME/ folder")


def _rewrite(folder: RunFolder, shards: list[str], table: pa.Table, owner: np.ndarray,
             new: np.ndarray, eligible: np.ndarray, lam: float) -> dict[str, int]:
    """Rewrite each routed shard whose rows changed model into the new models' folders."""
    counts: dict[str, int] = {}
    for m in np.unique(new):
        counts[str(m)] = int((new == m).sum())
    seq = 10**5  # after the plan's own shard numbers
    for k, path in enumerate(shards):
        mine = owner == k
        if not (eligible[mine].any()):
            continue
        t = pq.read_table(path, filesystem=folder.fs)
        models = new[mine]
        moved = eligible[mine]
        reason = np.where(moved, REASON, t.column("route_reason").to_numpy(
            zero_copy_only=False).astype(object))
        t = t.set_column(t.schema.get_field_index("route_reason"), "route_reason",
                         pa.array(reason.tolist(), pa.string()))
        thr = t.column("threshold").to_numpy(zero_copy_only=False).astype(np.float32)
        thr = np.where(moved, np.float32(lam if math.isfinite(lam) else np.nan), thr)
        t = t.set_column(t.schema.get_field_index("threshold"), "threshold",
                         pa.array(thr, t.schema.field("threshold").type))
        for m in np.unique(models):
            part = t.filter(pa.array(models == m))
            folder.write_table(folder.routed_dir(str(m)), folder.shard_name(seq), part)
            seq += 1
        folder.fs.delete_file(path)
    return counts
