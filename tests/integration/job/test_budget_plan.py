"""The spend cap through `plan` (a dry run on the shared Ray session): the plan fits the cap,
records how each row was assigned, prints the curve, and a cap below the cheapest assignment
is refused before anything is kept."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchroute import config
from batchroute.devtools import sample
from batchroute.job import runner
from batchroute.stages import budget, plan
from tests.helpers import demo_job_doc, quiet_progress

pytestmark = pytest.mark.integration


def _doc(tmp: Path, **router: float) -> dict:
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", "http://127.0.0.1:9")
    del doc["router"]["thresholds"]
    doc["router"].update(router)
    return doc


def test_the_plan_fits_the_cap_and_says_how(tmp_path: Path, ray_session: None) -> None:
    pq.write_table(sample.generate(1500, seed=2), tmp_path / "in.parquet")
    free = runner.run(config.parse(_doc(tmp_path, max_strong_share=1.0)), dry_run=True,
                      progress=quiet_progress())
    floor = free.forecast["budget"]["fixed_cost_usd"]
    cap = round(floor + 0.5 * (free.forecast["est_cost_usd"] - floor), 2)
    out = runner.run(config.parse(_doc(tmp_path, budget_usd=cap)), dry_run=True,
                     progress=quiet_progress())
    f = out.forecast
    assert f["est_cost_usd"] <= cap + 0.01
    b = f["budget"]
    assert b["kind"] == "budget_usd" and b["rows"] > 100
    assert b["predicted_quality"] <= free.forecast["budget"]["predicted_quality"]
    assert [p["budget_usd"] for p in b["curve"]] == [round(x * cap, 2) for x in budget.CURVE]
    assert "spend cap (budget $" in plan.format_forecast(f)
    routed = plan.routed_dataset(out.folder).to_table(columns=["route_reason", "threshold"])
    assert pc.sum(pc.equal(routed.column("route_reason"), "budget")).as_py() == b["rows"]
    assert out.manifest.routing is not None
    assert out.manifest.routing["decided_by"]["budget"] == b["rows"]


def test_a_cap_below_the_cheapest_assignment_is_refused(tmp_path: Path,
                                                         ray_session: None) -> None:
    pq.write_table(sample.generate(300, seed=2), tmp_path / "in.parquet")
    with pytest.raises(budget.Infeasible, match=r"router\.budget_usd: 0\.01 is below the "
                                                r"cheapest possible assignment"):
        runner.run(config.parse(_doc(tmp_path, budget_usd=0.01)), dry_run=True,
                   progress=quiet_progress())
    assert not any((tmp_path / "runs").iterdir())  # nothing left behind


def test_a_model_gets_no_more_rows_than_it_can_serve_before_the_deadline(
        tmp_path: Path, ray_session: None) -> None:
    pq.write_table(sample.generate(400, seed=3), tmp_path / "in.parquet")
    doc = _doc(tmp_path, max_strong_share=1.0)
    doc["dispatch"]["deadline"] = "1m"
    doc["models"]["gpt-4-1106-preview"]["rpm"] = 100  # 100 rows before the deadline
    f = runner.run(config.parse(doc), dry_run=True, progress=quiet_progress()).forecast
    assert f["budget"]["per_model"]["gpt-4-1106-preview"] == f["models"][
        "gpt-4-1106-preview"]["rows"]
    assert 90 <= f["models"]["gpt-4-1106-preview"]["rows"] <= 100
