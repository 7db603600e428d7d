"""The spend cap's solver: a multiple-choice knapsack by a Lagrangian on gain per dollar."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import config
from batchroute.errors import ConfigError
from batchroute.stages import budget, plan
from tests.helpers import CHEAP, MID, STRONG, job_doc


def _instance(seed: int, n: int, m: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = np.sort(rng.random((n, m)), axis=1)  # dearer models predict better, as routers do
    price = np.array([1.0, 4.0, 12.0][:m])
    c = rng.uniform(0.5, 1.5, (n, 1)) * price[None, :] / 1000
    return q, c


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 200), st.floats(0.0, 1.0))
def test_the_cap_is_never_exceeded_and_more_money_never_buys_less(seed: int, n: int,
                                                                  frac: float) -> None:
    q, c = _instance(seed, n)
    low, high = c.min(axis=1).sum(), c.max(axis=1).sum()
    cap = low + frac * (high - low)
    s = budget.solve_budget(q, c, cap)
    assert s.cost <= cap * (1 + 1e-9)
    # and the cap is used: what is left would not move even the dearest single row up
    assert cap - s.cost <= (c.max(axis=1) - c.min(axis=1)).max() + 1e-12
    more = budget.solve_budget(q, c, cap + 0.25 * (high - low))
    assert more.quality >= s.quality - 1e-12


@pytest.mark.parametrize("seed", range(25))
def test_each_solution_is_the_best_assignment_at_its_own_spend(seed: int) -> None:
    """A Lagrangian solution is optimal for the spend it reaches: no assignment of at most
    that cost predicts more success (brute force over every assignment of 6 rows)."""
    q, c = _instance(seed, 6)
    low, high = c.min(axis=1).sum(), c.max(axis=1).sum()
    s = budget.solve_budget(q, c, low + (high - low) * (seed % 10) / 10)
    best = max(q[np.arange(6), list(a)].mean()
               for a in itertools.product(range(3), repeat=6)
               if c[np.arange(6), list(a)].sum() <= s.cost * (1 + 1e-12))
    assert s.quality == pytest.approx(best)


def test_a_cap_below_the_cheapest_assignment_is_refused_with_the_minimum() -> None:
    q, c = _instance(1, 50)
    floor = c.min(axis=1).sum()
    with pytest.raises(budget.Infeasible, match=rf"\${floor:.2f}"):
        budget.solve_budget(q, c, floor * 0.9)
    # at exactly the floor, every row is on its cheapest model
    assert (budget.solve_budget(q, c, floor).choice == 0).all()


def test_impossible_cells_are_never_chosen() -> None:
    q = np.array([[0.2, 0.9], [0.3, 0.95]])
    c = np.array([[1.0, np.inf], [1.0, 2.0]])  # row 0 does not fit the strong model
    s = budget.solve_budget(q, c, 100.0)
    assert s.choice.tolist() == [0, 1]


def test_the_strong_share_cap_and_the_rows_it_keeps() -> None:
    q, c = _instance(3, 400)
    s = budget.solve_share(q, c, 0.1)
    assert (s.choice == 2).sum() <= 40
    # the rows kept on the strongest model are those it helps most
    gain = q[:, 2] - q[:, :2].max(axis=1)
    kept = gain[s.choice == 2]
    assert kept.min() >= np.quantile(gain, 0.85)


def test_a_model_gets_no_more_rows_than_it_can_serve() -> None:
    q, c = _instance(4, 300)
    s = budget.solve_budget(q, c, c.max(axis=1).sum())  # enough for everything strong
    assert (s.choice == 2).all()
    capped = budget._capped(q, c, s.choice, {2: 50})
    assert (capped == 2).sum() == 50
    assert ((capped == 0) | (capped == 1) | (capped == 2)).all()


@pytest.mark.parametrize(("router", "needle"), [
    ({"budget_usd": 10.0, "max_strong_share": 0.3}, "not both"),
    ({"budget_usd": 10.0, "thresholds": {CHEAP: 0.5}}, r"router\.budget_usd: a spend cap"),
    ({"max_strong_share": 0.3, "thresholds": {CHEAP: 0.5}}, r"router\.max_strong_share"),
    ({"budget_usd": 0}, r"router\.budget_usd: must be above 0"),
    ({"max_strong_share": 1.5}, r"router\.max_strong_share: must be a finite number"),
    ({"budget_usd": 5.0, "stages": ["rules"]}, "needs a classifier or similarity stage"),
])
def test_bad_spend_caps_are_refused_naming_the_key(router: dict, needle: str) -> None:
    doc = job_doc()
    doc["router"].update(router)
    with pytest.raises(ConfigError, match=needle):
        config.parse(doc)


def test_a_valid_cap_loads() -> None:
    doc = job_doc()
    doc["router"]["budget_usd"] = 12.5
    assert config.parse(doc).router.budget_usd == 12.5
    doc["router"] = {**doc["router"], "max_strong_share": 0.25}
    del doc["router"]["budget_usd"]
    job = config.parse(doc)
    assert job.router.max_strong_share == 0.25 and job.router.budget_usd is None
    assert STRONG in job.models


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(5, 200), st.floats(0.0, 1.0),
       st.floats(0.05, 0.6))
def test_capacity_is_respected_and_the_cap_still_holds(seed: int, n: int, frac: float,
                                                       room: float) -> None:
    """A model that cannot serve every row before the deadline takes no more than it can,
    and the rows it cannot take move without breaking the cap."""
    q, c = _instance(seed, n)
    caps = {0: math.floor(room * n), 1: math.floor(room * n)}  # the strongest has room
    low, high = budget.floor_usd(c, caps), c.max(axis=1).sum()
    cap = low + frac * (high - low)
    s = budget.solve_budget(q, c, cap, caps)
    assert s.cost <= cap * (1 + 1e-9)
    counts = np.bincount(s.choice, minlength=3)
    assert counts[0] <= caps[0] and counts[1] <= caps[1]
    with pytest.raises(budget.Infeasible):
        budget.solve_budget(q, c, low * 0.99, caps)


@pytest.mark.parametrize("seed", range(25))
def test_at_the_budget_it_is_within_one_row_of_the_best_assignment(seed: int) -> None:
    """Brute force over every assignment of 6 rows at the budget itself: the Lagrangian
    solution never spends more, and loses at most one row's gain (the LP relaxation of a
    multiple-choice knapsack has at most one fractional row); on most it is the optimum."""
    q, c = _instance(seed, 6)
    low, high = c.min(axis=1).sum(), c.max(axis=1).sum()
    cap = low + (high - low) * ((seed * 7) % 10 + 0.5) / 10
    s = budget.solve_budget(q, c, cap)
    best = max(q[np.arange(6), list(a)].mean()
               for a in itertools.product(range(3), repeat=6)
               if c[np.arange(6), list(a)].sum() <= cap)
    assert s.cost <= cap
    assert s.quality <= best + 1e-12
    assert best - s.quality <= (q.max(axis=1) - q.min(axis=1)).max() / 6 + 1e-12


def test_duplicated_rows_share_the_budget() -> None:
    """Identical rows (a night's repeated prompts) tie at one lambda: they must not all stay
    cheap when the cap pays for some of them on the dearer model."""
    q, c = np.tile([[0.5, 0.9]], (100, 1)), np.tile([[1.0, 3.0]], (100, 1))
    s = budget.solve_budget(q, c, 200.0)
    assert s.cost == pytest.approx(200.0)
    assert (s.choice == 1).sum() == 50
    q3, c3 = np.tile([[0.5, 0.6, 0.9]], (100, 1)), np.tile([[1.0, 2.0, 3.0]], (100, 1))
    assert (budget.solve_share(q3, c3, 0.3).choice == 2).sum() == 30


def test_capacity_counts_rpm_tpm_and_the_rows_already_there() -> None:
    doc = job_doc()
    doc["dispatch"]["deadline"] = "10m"
    for m, rpm, tpm in ((CHEAP, 100, 10**9), (MID, 10**6, 50_000), (STRONG, 100, 10**9)):
        doc["models"][m].update(rpm=rpm, tpm=tpm)
    job = config.parse(doc)
    tokens = np.full(40, 500)  # 500 tokens a row
    caps = budget.capacity(job, [CHEAP, MID, STRONG], tokens, {STRONG: (300, 0)},
                           now=datetime(2026, 1, 1, tzinfo=UTC))
    # 100 rpm for 10 minutes; 500,000 tokens / 500 a row; 1,000 less the 300 rules sent there
    assert caps == {0: 1000, 1: 1000, 2: 700}
    # a deadline "10m" counts from the run's start: 4 minutes in, 6 are left
    start = datetime(2026, 1, 1, tzinfo=UTC)
    later = budget.capacity(job, [CHEAP], tokens, now=start + timedelta(minutes=4),
                            started=start)
    assert later == {0: 600}
    doc["dispatch"].pop("deadline")
    assert budget.capacity(config.parse(doc), [CHEAP], tokens) == {}


def test_the_plan_prints_the_cap_and_its_curve() -> None:
    f = {"models": {}, "rejected": 0, "est_cost_usd": 40.0, "est_reference_cost_usd": 90.0,
         "reference_model": STRONG, "est_wall_s": 10.0,
         "budget": {"kind": "budget_usd", "budget_usd": 40.0, "max_strong_share": None,
                    "rows": 13955, "predicted_quality": 0.758, "est_cost_usd": 39.99,
                    "strong_share": 0.106,
                    "curve": [{"budget_usd": 20.0, "est_cost_usd": None,
                               "predicted_quality": None},
                              {"budget_usd": 40.0, "est_cost_usd": 39.99,
                               "predicted_quality": 0.758},
                              {"budget_usd": 80.0, "est_cost_usd": 61.0,
                               "predicted_quality": 0.832}]}}
    text = plan.format_forecast(f)
    assert ("spend cap (budget $40.00), solved over the whole batch: 13,955 rows assigned, "
            "predicted success 75.8% at est $39.99 (10.6% on the strongest model)") in text
    assert "around it: $20.00 -> infeasible; $40.00 -> 75.8%; $80.00 -> 83.2%" in text


def test_row_costs_are_the_forecasts_estimate() -> None:
    """One home for the estimate: each row at ModelConfig.cost_usd on its input tokens and
    the model's output per answer from history, else the row's max_tokens."""
    job = config.parse(job_doc())
    est_in, est_out = np.array([100, 2000]), np.array([64, 512])
    c = budget.costs(job, [CHEAP, STRONG], est_in, est_out, {STRONG: 30.0})
    for i in range(2):
        assert c[i, 0] == pytest.approx(job.models[CHEAP].cost_usd(est_in[i], est_out[i]))
        assert c[i, 1] == pytest.approx(job.models[STRONG].cost_usd(est_in[i], 30.0))
