"""The shadow checks' arithmetic: the sample, the grades, the rollup and its intervals."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from batchroute import judge, schemas
from batchroute.devtools.bench import quality as bench_quality
from batchroute.stages import quality

REF = "strong"


def _answered(strata: dict[tuple[str, str], int]) -> pa.Table:
    ids, models, stages = [], [], []
    for (m, st), n in strata.items():
        for i in range(n):
            ids.append(f"{m}-{st}-{i}")
            models.append(m)
            stages.append(st)
    return pa.table({"request_id": ids, "model": models, "route_stage": stages,
                     "status": ["ok"] * len(ids)})


def _shadows(picked: pa.Table, scores: list[float | None], graded_by: str = "fields",
             cost: int = 10) -> pa.Table:
    n = picked.num_rows
    return quality.shadow_table(
        picked, reference_model=REF, status=["ok" if s is not None else "failed"
                                              for s in scores],
        score=scores, graded_by=graded_by, reference_response=[None] * n,
        errors=[None] * n, cost=[cost] * n)


def test_the_sample_takes_the_share_of_every_stratum_below_the_reference() -> None:
    table = _answered({("cheap", "classifier"): 1000, ("mid", "rules"): 37,
                       ("cheap", "rules"): 3, (REF, "classifier"): 500})
    table = table.set_column(3, "status", pa.array(["failed" if i % 100 == 0 else "ok"
                                                    for i in range(table.num_rows)]))
    picked = quality.sample(quality.candidates(table, REF), share=0.02, seed=0)
    counts = {(r["model"], r["route_stage"]): 0 for r in picked.to_pylist()}
    for r in picked.to_pylist():
        counts[(r["model"], r["route_stage"])] += 1
    # ceil(share * N) of each stratum's ok rows; a stratum of 3 still gets one; none of the
    # reference's rows and none of the failed ones
    assert counts == {("cheap", "classifier"): 20, ("mid", "rules"): 1, ("cheap", "rules"): 1}
    failed = set(pc.filter(table.column("request_id"),
                           pc.equal(table.column("status"), "failed")).to_pylist())
    assert not failed & set(picked.column("request_id").to_pylist())


def test_the_sample_depends_on_the_rows_and_the_seed_not_their_order() -> None:
    table = quality.candidates(_answered({("cheap", "classifier"): 400,
                                          ("mid", "rules"): 100}), REF)
    a = quality.sample(table, share=0.1, seed=7)
    b = quality.sample(table.take(np.random.default_rng(1).permutation(table.num_rows)),
                       share=0.1, seed=7)
    c = quality.sample(table, share=0.1, seed=8)
    assert sorted(a.column("request_id").to_pylist()) == sorted(
        b.column("request_id").to_pylist())
    assert set(a.column("request_id").to_pylist()) != set(c.column("request_id").to_pylist())
    assert quality.sample(table, share=0.0, seed=7).num_rows == 0
    assert quality.sample(table, share=1.0, seed=7).num_rows == table.num_rows


def test_wilson_matches_the_textbook_values() -> None:
    lo, hi = quality.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    lo, hi = quality.wilson(0, 20)
    assert lo == 0.0 and round(hi, 3) == 0.161
    assert quality.wilson(0, 0) == (0.0, 1.0)


def test_field_scores_compare_labels_and_each_json_field() -> None:
    labels = [pa.field("label", pa.string())]
    kept = pa.table({"label": ["a", "b", None, "c"]})
    ref = pa.table({"label": ["a", "c", "a", "c"]})
    assert quality.field_scores(kept, ref, labels).tolist() == [1.0, 0.0, 0.0, 1.0]
    struct = pa.struct([("total", pa.float64()), ("currency", pa.string()),
                        ("due", pa.string())])
    out = [pa.field("output", struct)]
    kept = pa.table({"output": pa.array([{"total": 1.0, "currency": "EUR", "due": "x"},
                                         {"total": 2.0, "currency": "USD", "due": None}],
                                        struct)})
    ref = pa.table({"output": pa.array([{"total": 1.0, "currency": "EUR", "due": "y"},
                                        {"total": 2.0, "currency": "USD", "due": None}],
                                       struct)})
    # a null on both sides is no agreement: the field is not known to be right
    assert quality.field_scores(kept, ref, out).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_the_rollup_weights_strata_and_counts_reference_rows_as_retained() -> None:
    answered = _answered({("cheap", "classifier"): 800, ("mid", "rules"): 100,
                          (REF, "classifier"): 100})
    picked = quality.sample(quality.candidates(answered, REF), share=0.1, seed=0)
    scores = [1.0 if r["model"] == "mid" else (1.0 if i % 2 else 0.0)
              for i, r in enumerate(picked.to_pylist())]
    table = quality.rollup(answered, _shadows(picked, scores), reference=REF, run_id="r")
    rows = {(r["scope"], r["model"], r["route_stage"]): r for r in table.to_pylist()}
    cheap = rows[("stratum", "cheap", "classifier")]
    assert cheap["rows"] == 800 and cheap["shadowed"] == 80 and cheap["score"] == 0.5
    assert (cheap["score_low"], cheap["score_high"]) == pytest.approx(quality.wilson(40, 80))
    run = rows[("run", None, None)]
    # 100 reference rows at 1, 100 mid rows at 1, 800 cheap rows at 0.5
    assert run["retained"] == pytest.approx(0.6)
    assert run["retained_low"] < 0.6 < run["retained_high"]
    assert run["rows"] == 1000 and run["reference_rows"] == 100 and run["shadowed"] == 90
    assert run["shadow_cost_micro_usd"] == 900
    assert rows[("model", REF, None)]["retained"] == 1.0
    stage = rows[("stage", None, "classifier")]
    assert stage["rows"] == 900 and stage["retained"] == pytest.approx((100 + 400) / 900)
    assert table.schema.equals(schemas.QUALITY)


def test_a_stratum_with_rows_but_no_grade_widens_the_interval_honestly() -> None:
    answered = _answered({("cheap", "classifier"): 900, ("mid", "rules"): 100})
    picked = quality.sample(quality.candidates(answered, REF), share=0.1, seed=0)
    scores = [1.0 if r["model"] == "cheap" else None for r in picked.to_pylist()]
    run = quality.run_row(quality.rollup(answered, _shadows(picked, scores), reference=REF,
                                         run_id="r"))
    # the mid stratum (10% of the rows) is unknown: it may be anywhere in [0, 1]
    assert run["retained_high"] == pytest.approx(1.0)
    assert run["retained_low"] <= 0.9 * quality.wilson(90, 90)[0] + 1e-9
    assert run["shadow_failed"] == 10


def test_judge_grades_read_back_and_compare() -> None:
    assert judge.read('{"candidate": 0.4, "reference": 0.8}') == (0.4, 0.8)
    assert judge.read('{"candidate": 3, "reference": -1}') == (1.0, 0.0)
    for bad in (None, "nope", "[1, 2]", '{"candidate": "high", "reference": 1}',
                '{"candidate": true, "reference": 1}', '{"candidate": 1}'):
        assert judge.read(bad) is None
    assert judge.relative(0.4, 0.8) == 0.5
    assert judge.relative(0.9, 0.8) == 1.0
    assert judge.relative(0.0, 0.0) == 1.0  # both worthless: as good as the reference
    text = judge.prompt("What is 2+2?", "[q=1.00] 4", "[q=0.30] 5")
    assert text.index(judge.REQUEST_HEADING) < text.index(judge.REFERENCE_HEADING) < \
        text.index(judge.CANDIDATE_HEADING)


def test_the_interval_covers_the_true_retained_quality_over_20_demo_seeds() -> None:
    """The honesty test: over 20 seeds of the demo input (routed by the demo job, graded by
    the mock's quality model as its judge reads it), the run's 95% interval covers the true
    retained quality in at least 90% of them."""
    result = bench_quality.coverage(range(20), [0.02], rows=4000)
    share = result["shares"][0]
    assert share["coverage"] >= 0.9, share["runs"]
    assert 0.0 < share["mean_width"] < 0.25
    truths = [r["truth"] for r in share["runs"]]
    assert min(truths) > 0.5 and max(truths) < 0.99  # the models really differ
    assert all(not math.isnan(r["retained"]) for r in share["runs"])
