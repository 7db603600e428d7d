"""Shadow checks: how much quality the routing kept, measured on the night's own rows.

    results ─► sample ─► shadow calls (reference model) ─► grade ─► quality rollup

* **Sample** (:func:`sample`): of the rows answered ``ok`` by a model below the reference
  model, a seeded random ``shadow_share`` of each stratum (the answering model and the route
  stage), at least one row of a stratum that has any.
* **Shadow calls**: each sampled row's request, exactly as the job sends it, also goes to the
  reference model (never escalated, never journalled: these calls serve the job, they do not
  answer it).
* **Grade** (:func:`field_scores`, :func:`judge_rows`): labels and JSON outputs are compared
  field by field with the reference's; free text is graded by the job's judge model
  (:mod:`batchroute.judge`), and the row's score is its grade relative to the reference's.
* **Rollup** (:func:`rollup`): per stratum, per model, per stage and for the run, the mean
  score with a 95% interval (Wilson for agreement, a bootstrap for judge scores) and the
  estimated quality retained against sending every row to the reference model, with its
  interval. Rows the reference model answered count 1.

Everything here is a function of Arrow tables; :mod:`batchroute.job.runner` runs the calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchroute import judge, schemas, tokens
from batchroute.stages.source import request_text

Z95 = 1.959963984540054
DRAWS = 4000  # Monte Carlo draws for the bootstrap and the combined intervals
# A stratum larger than this is bootstrapped from the normal approximation of its mean, not by
# resampling (which would hold DRAWS x n indices).
RESAMPLE_MAX = 1000
NO_STAGE = "none"


def _strata_keys(model: pa.Array | pa.ChunkedArray, stage: pa.Array | pa.ChunkedArray
                 ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """A stratum code per row and the (model, stage) of each code."""
    stage = pc.fill_null(stage, NO_STAGE)
    key = pc.binary_join_element_wise(model, stage, "\x1f")
    enc = pc.dictionary_encode(key).combine_chunks() if isinstance(
        key, pa.ChunkedArray) else pc.dictionary_encode(key)
    names = [(m, st) for m, st in (k.split("\x1f", 1) for k in enc.dictionary.to_pylist())]
    return enc.indices.to_numpy(zero_copy_only=False), names


def candidates(results: pa.Table, reference: str) -> pa.Table:
    """The rows a shadow check may sample: answered ok by a model other than ``reference``."""
    keep = pc.and_(pc.equal(results.column("status"), "ok"),
                   pc.not_equal(results.column("model"), reference))
    return results.filter(pc.fill_null(keep, False)).select(
        ["request_id", "model", "route_stage"])


def sample(cands: pa.Table, *, share: float, seed: int) -> pa.Table:
    """A seeded, stratified sample of ``cands`` (request_id, model, route_stage): in each
    (model, route_stage) stratum of N rows, the ceil(share * N) rows with the smallest seeded
    uniform numbers. The numbers are drawn in request_id order, so the sample depends only on
    the rows, the share and the seed, not on the order the results were written in."""
    n = cands.num_rows
    if n == 0 or share <= 0:
        return cands.slice(0, 0)
    order = pc.sort_indices(cands, [("request_id", "ascending")]).to_numpy()
    u = np.empty(n)
    u[order] = np.random.default_rng(seed).random(n)
    codes, _ = _strata_keys(cands.column("model"), cands.column("route_stage"))
    sizes = np.bincount(codes)
    take = np.minimum(sizes, np.ceil(share * sizes - 1e-9).astype(np.int64))
    by = np.lexsort((u, codes))  # by stratum, then by u
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(n) - starts[codes[by]]
    picked = np.sort(by[rank < take[codes[by]]])
    return cands.take(pa.array(picked, pa.int64()))


def field_scores(kept: pa.Table, reference: pa.Table, fields: Sequence[pa.Field]
                 ) -> np.ndarray:
    """Per aligned row, the share of output fields the kept answer has equal to the
    reference's: a label is one field; a JSON object's fields are its top-level properties
    (another value is compared whole). A null on either side never agrees."""
    out = np.zeros(kept.num_rows)
    for f in fields:  # one output column per task (label, or output)
        a = kept.column(f.name).to_pylist()
        b = reference.column(f.name).to_pylist()
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out[i] += _agreement(x, y)
    return out / max(1, len(fields))


def _agreement(x: Any, y: Any) -> float:
    if x is None or y is None:
        return 0.0
    if isinstance(x, dict) and isinstance(y, dict):
        keys = set(x) | set(y)
        if not keys:
            return 1.0
        return sum(1 for k in keys if x.get(k) is not None and x.get(k) == y.get(k)) / len(keys)
    return 1.0 if x == y else 0.0


def judge_rows(routed: pa.Table, kept: Sequence[str | None], reference: Sequence[str | None]
               ) -> pa.Table:
    """``routed`` rows turned into judge calls: each asks to grade its (kept, reference)
    pair of answers."""
    texts = [judge.prompt(r, ref or "", k or "")
             for r, k, ref in zip(request_text(routed).to_pylist(), kept, reference,
                                  strict=True)]
    chars = np.array([len(t) for t in texts], np.int64)
    n = routed.num_rows
    return (routed
            .set_column(routed.schema.get_field_index("prompt"), "prompt",
                        pa.array(texts, pa.string()))
            .set_column(routed.schema.get_field_index("messages"), "messages",
                        pa.nulls(n, routed.schema.field("messages").type))
            .set_column(routed.schema.get_field_index("temperature"), "temperature",
                        pa.array(np.zeros(n, np.float32)))
            .set_column(routed.schema.get_field_index("est_input_tokens"), "est_input_tokens",
                        pa.array(tokens.input_estimate(chars), pa.int64()).cast(
                            routed.schema.field("est_input_tokens").type))
            .set_column(routed.schema.get_field_index("est_output_tokens"),
                        "est_output_tokens",
                        pa.array(np.full(n, judge.OUTPUT_TOKENS)).cast(
                            routed.schema.field("est_output_tokens").type)))


def shadow_table(sampled: pa.Table, *, reference_model: str, status: Sequence[str],
                 score: Sequence[float | None], graded_by: str,
                 candidate: Sequence[float | None] | None = None,
                 reference: Sequence[float | None] | None = None,
                 reference_response: Sequence[str | None], errors: Sequence[str | None],
                 cost: Sequence[int], judge_cost: Sequence[int] | None = None) -> pa.Table:
    """The ``shadows`` rows of graded pairs (``sampled``: request_id, model, route_stage)."""
    n = sampled.num_rows
    none: list[float | None] = [None] * n
    return pa.table({
        "request_id": sampled.column("request_id"),
        "model": sampled.column("model"),
        "route_stage": sampled.column("route_stage"),
        "reference_model": pa.array([reference_model] * n, pa.string()),
        "status": pa.array(list(status), pa.string()),
        "score": pa.array(list(score), pa.float64()),
        "graded_by": pa.array([graded_by] * n, pa.string()),
        "candidate_score": pa.array(list(candidate) if candidate is not None else none,
                                    pa.float64()),
        "reference_score": pa.array(list(reference) if reference is not None else none,
                                    pa.float64()),
        "reference_response": pa.array(list(reference_response), pa.string()),
        "error_message": pa.array(list(errors), pa.string()),
        "cost_micro_usd": pa.array(list(cost), pa.int64()),
        "judge_cost_micro_usd": pa.array(list(judge_cost) if judge_cost is not None
                                         else [0] * n, pa.int64()),
    }, schema=schemas.SHADOWS)


# -- the rollup ----------------------------------------------------------------------------

def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (``successes`` may be fractional: a mean of
    scores in [0, 1] times n)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class _Stratum:
    model: str
    stage: str
    rows: int
    scores: np.ndarray
    failed: int
    shadow_cost: int
    judge_cost: int


def _mean_draws(scores: np.ndarray, rng: np.random.Generator, *, judged: bool) -> np.ndarray:
    """DRAWS plausible values of a stratum's mean score. Agreement: Jeffreys' posterior of a
    proportion (a fractional field share counts as a fractional agreement). Judge scores: the
    bootstrap of the mean (resampled, or from its normal approximation for a large stratum)."""
    n = len(scores)
    if not judged:
        k = float(scores.sum())
        return rng.beta(k + 0.5, n - k + 0.5, DRAWS)
    if n > RESAMPLE_MAX:
        sd = float(scores.std(ddof=1)) / math.sqrt(n)
        return np.clip(rng.normal(float(scores.mean()), sd, DRAWS), 0.0, 1.0)
    means: np.ndarray = scores[rng.integers(0, n, size=(DRAWS, n))].mean(axis=1)
    return means


def _interval(draws: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(lo), float(hi)


def rollup(answered: pa.Table, shadows: pa.Table, *, reference: str, run_id: str,
           seed: int = 0) -> pa.Table:
    """The ``quality`` table of a run. ``answered``: the ok results rows (model,
    route_stage); ``shadows``: its graded pairs (schemas.SHADOWS).

    Per stratum the score's interval is Wilson's (agreement) or a bootstrap (judge scores).
    Retained quality over a scope is sum(W_h * mean_h) plus the reference rows' share (at 1);
    its interval comes from DRAWS joint draws of the strata means (each as
    :func:`_mean_draws`), so strata of different sizes and kinds combine without a normal
    approximation. A stratum with rows but no graded pair is unknown: it counts 0 at the low
    end, 1 at the high end, and the scope's mean score in the estimate."""
    rng = np.random.default_rng(seed)
    judged = bool(shadows.num_rows) and "judge" in set(shadows.column("graded_by").to_pylist())
    strata: list[_Stratum] = []
    ref_rows: dict[str, int] = {}
    if answered.num_rows:
        codes, names = _strata_keys(answered.column("model"), answered.column("route_stage"))
        counts = np.bincount(codes, minlength=len(names))
        by_key = {k: int(c) for k, c in zip(names, counts, strict=True)}
    else:
        by_key = {}
    graded = {}
    if shadows.num_rows:
        s_codes, s_names = _strata_keys(shadows.column("model"), shadows.column("route_stage"))
        ok = pc.equal(shadows.column("status"), "ok").to_numpy(zero_copy_only=False)
        score = pc.fill_null(shadows.column("score"), 0.0).to_numpy(zero_copy_only=False)
        cost = shadows.column("cost_micro_usd").to_numpy()
        jcost = shadows.column("judge_cost_micro_usd").to_numpy()
        for c, key in enumerate(s_names):
            mine = s_codes == c
            graded[key] = (score[mine & ok], int((mine & ~ok).sum()), int(cost[mine].sum()),
                           int(jcost[mine].sum()))
    for (model, stage), rows in sorted(by_key.items()):
        if model == reference:
            ref_rows[stage] = ref_rows.get(stage, 0) + rows
            continue
        s, failed, c, j = graded.get((model, stage), (np.zeros(0), 0, 0, 0))
        strata.append(_Stratum(model, stage, rows, s, failed, c, j))
    draws = {id(st): _mean_draws(st.scores, rng, judged=judged) if len(st.scores) else None
             for st in strata}

    out: list[dict[str, Any]] = []
    kind = "judge" if judged else "fields"

    def scope(name: str, model: str | None, stage: str | None, members: list[_Stratum],
              reference_rows: int) -> None:
        rows = reference_rows + sum(m.rows for m in members)
        known = [m for m in members if len(m.scores)]
        all_scores = np.concatenate([m.scores for m in known]) if known else np.zeros(0)
        row: dict[str, Any] = {
            "run_id": run_id, "scope": name, "model": model, "route_stage": stage,
            "rows": rows, "reference_rows": reference_rows,
            "shadowed": len(all_scores), "shadow_failed": sum(m.failed for m in members),
            "graded_by": kind if members else None,
            "shadow_cost_micro_usd": sum(m.shadow_cost for m in members),
            "judge_cost_micro_usd": sum(m.judge_cost for m in members),
            "score": None, "score_low": None, "score_high": None,
            "retained": None, "retained_low": None, "retained_high": None,
        }
        if rows == 0:
            out.append(row)
            return
        below = sum(m.rows for m in members)
        if known:
            # The strata-weighted mean score below the reference, and its draws.
            w = np.array([m.rows for m in known], float)
            w /= w.sum()
            mean = float(sum(wi * m.scores.mean() for wi, m in zip(w, known, strict=True)))
            joint = sum(wi * draws[id(m)] for wi, m in zip(w, known, strict=True))
            if len(known) == 1 and not judged:
                lo, hi = wilson(float(known[0].scores.sum()), len(known[0].scores))
            else:
                lo, hi = _interval(np.asarray(joint))
            row.update(score=mean, score_low=lo, score_high=hi)
        else:
            mean, lo, hi = 1.0, 0.0, 1.0
        known_rows = sum(m.rows for m in known)
        unknown_rows = below - known_rows
        ref_share = reference_rows / rows
        k_share, u_share = known_rows / rows, unknown_rows / rows
        if known:
            joint_ret = ref_share + k_share * np.asarray(joint)
            r_lo, r_hi = _interval(joint_ret)
            if len(known) == 1 and not judged:
                r_lo, r_hi = ref_share + k_share * lo, ref_share + k_share * hi
        else:
            r_lo = r_hi = ref_share
        row.update(retained=ref_share + (k_share + u_share) * mean,
                   retained_low=r_lo, retained_high=r_hi + u_share)
        out.append(row)

    for st in strata:
        scope("stratum", st.model, st.stage, [st], 0)
    for model in sorted({st.model for st in strata}):
        scope("model", model, None, [st for st in strata if st.model == model], 0)
    if ref_rows:
        scope("model", reference, None, [], sum(ref_rows.values()))
    for stage in sorted({st.stage for st in strata} | set(ref_rows)):
        scope("stage", None, stage, [st for st in strata if st.stage == stage],
              ref_rows.get(stage, 0))
    scope("run", None, None, strata, sum(ref_rows.values()))
    return pa.Table.from_pylist(out, schema=schemas.QUALITY)


def run_row(quality: pa.Table) -> dict[str, Any]:
    """The run's own row of a quality table."""
    rows = quality.filter(pc.equal(quality.column("scope"), "run")).to_pylist()
    return rows[0] if rows else {}


def summary(quality: pa.Table, *, min_retained: float | None, share: float,
            judge_model: str) -> dict[str, Any]:
    """What the manifest keeps of a run's quality: the run's estimate, its interval, what
    the checks cost and whether the run is flagged (upper bound below ``min_retained``)."""
    run = run_row(quality)
    high = run.get("retained_high")
    flagged = bool(min_retained is not None and high is not None and high < min_retained)
    return {
        "shadow_share": share, "judge": judge_model or None,
        "graded_by": run.get("graded_by"),
        "shadowed": run.get("shadowed", 0), "shadow_failed": run.get("shadow_failed", 0),
        "retained": run.get("retained"), "retained_low": run.get("retained_low"),
        "retained_high": high, "min_retained": min_retained, "flagged": flagged,
        "cost_usd": (int(run.get("shadow_cost_micro_usd", 0))
                     + int(run.get("judge_cost_micro_usd", 0))) / 1e6,
    }


def describe(summary_: dict[str, Any], *, savings: float | None = None) -> str:
    """One line for people: ``saved 64.2%, quality retained 97.1% (95% CI 95.8-98.2%) from
    312 shadowed rows (judge), overhead $1.23``."""
    r = summary_.get("retained")
    if r is None:
        return "quality retained: not measured (no row answered ok)"
    saved = f"saved {100 * savings:.1f}%, " if savings is not None else ""
    line = (f"{saved}quality retained {100 * r:.1f}% (95% CI "
            f"{100 * summary_['retained_low']:.1f}-"
            f"{100 * summary_['retained_high']:.1f}%) from {summary_['shadowed']} shadowed rows "
            f"({summary_['graded_by'] or 'none below the reference'}), overhead "
            f"${summary_['cost_usd']:.2f}")
    if summary_.get("flagged"):
        line += f"; FLAGGED: upper bound below min_retained {summary_['min_retained']:.3f}"
    return line


def format_table(table: pa.Table) -> str:
    """The quality rollup for people: one line per stratum, model, stage and the run."""
    head = (f"{'scope':<8}{'model':<24}{'stage':<12}{'rows':>8}{'shadowed':>10}"
            f"{'score (95% CI)':>22}{'retained (95% CI)':>24}")
    lines = [head, "-" * len(head)]

    def ci(v: float | None, lo: float | None, hi: float | None) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}% ({100 * (lo or 0):.1f}-{100 * (hi or 0):.1f})"

    for r in table.to_pylist():
        lines.append(f"{r['scope']:<8}{r['model'] or '':<24}{r['route_stage'] or '':<12}"
                     f"{r['rows']:>8,}{r['shadowed']:>10,}"
                     f"{ci(r['score'], r['score_low'], r['score_high']):>22}"
                     f"{ci(r['retained'], r['retained_low'], r['retained_high']):>24}")
    return "\n".join(lines)
