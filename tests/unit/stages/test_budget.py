"""The spend cap's solver: a multiple-choice knapsack by a Lagrangian on gain per dollar."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import config
from batchroute.errors import ConfigError
from batchroute.stages import budget
from tests.helpers import CHEAP, STRONG, job_doc


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
