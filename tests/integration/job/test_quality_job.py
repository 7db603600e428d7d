"""Shadow checks end to end on the shared Ray session, against the mock's quality model: every
graded pair is the mock's truth, the rollup is written and read back, a run whose quality falls
below min_retained exits 4, and a resumed run sends no shadow call twice."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batchroute import config, schemas
from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider, MockProviderConfig
from batchroute.devtools.mock_quality import QualityModel
from batchroute.job import runner
from batchroute.stages import report
from tests.helpers import demo_job_doc, quiet_progress

pytestmark = pytest.mark.integration
REF = "gpt-4-1106-preview"


def _read(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.rglob("*.parquet")))


def test_free_text_shadow_checks_grade_the_truth_and_flag_a_low_run(
        tmp_path: Path, api_key: str, ray_session: None) -> None:
    pq.write_table(sample.generate(240, seed=5), tmp_path / "in.parquet")
    with MockProvider(MockProviderConfig(api_key=api_key, quality=True, seed=2)) as provider:
        doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", provider.url,
                           quality={"shadow_share": 0.3, "judge": "claude-3-5-sonnet",
                                    "min_retained": 0.999, "seed": 4})
        out = runner.run(config.parse(doc), progress=quiet_progress())
        calls = dict(provider.stats()["by_model"])
        # a resume of the finished run sends no shadow or judge call again
        again = runner.run(config.parse(doc), run_id=out.folder.run_id,
                           progress=quiet_progress())
        assert provider.stats()["by_model"] == calls
    folder = Path(out.folder.uri)
    shadows = _read(folder / "quality" / "shadows")
    assert shadows.schema.equals(schemas.SHADOWS)
    assert shadows.num_rows > 30 and set(shadows.column("graded_by").to_pylist()) == {"judge"}
    source = _read(folder / "source")
    prompt = dict(zip(source.column("request_id").to_pylist(),
                      source.column("prompt").to_pylist(), strict=True))
    truth = QualityModel()
    for r in shadows.to_pylist():
        assert r["status"] == "ok" and r["judge_cost_micro_usd"] > 0 and r["cost_micro_usd"] > 0
        assert r["score"] == pytest.approx(truth.true_score(prompt[r["request_id"]],
                                                            r["model"], REF)), r
    results = _read(folder / "results")
    assert results.num_rows == 240  # shadow answers never become result rows
    assert not set(shadows.column("request_id").to_pylist()) & set(pc.filter(
        results.column("request_id"), pc.equal(results.column("model"), REF)).to_pylist())
    table = pq.read_table(folder / "quality" / "quality.parquet")
    run = table.filter(pc.equal(table.column("scope"), "run")).to_pylist()[0]
    assert run["retained_low"] <= run["retained"] <= run["retained_high"] < 0.999
    assert out.manifest.quality is not None and out.manifest.quality["flagged"]
    assert out.exit_code == runner.QUALITY_FLAGGED == again.exit_code
    assert out.manifest.quality["cost_usd"] == pytest.approx(
        (run["shadow_cost_micro_usd"] + run["judge_cost_micro_usd"]) / 1e6)
    # the finance report shows savings and retained quality side by side, and the flag
    rep = report.build(str(tmp_path / "runs"), tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert 'id="quality-flag"' in page and out.folder.run_id in page
    row = pl.read_parquet(tmp_path / "report" / "quality.parquet").row(0, named=True)
    assert row["retained_pct"] == pytest.approx(100 * run["retained"])
    assert row["flagged"] and row["savings_pct"] > 0 and rep.runs[0].quality_flagged


def test_a_labels_job_is_compared_field_by_field(tmp_path: Path, api_key: str,
                                                 ray_session: None) -> None:
    labels = ["billing", "bug", "how-to", "account", "other"]
    pq.write_table(pa.table({"ticket_id": [f"t{i}" for i in range(150)],
                             "body": [f"My order {i} arrived {'late' if i % 2 else 'broken'}"
                                      for i in range(150)]}), tmp_path / "in.parquet")
    with MockProvider(MockProviderConfig(api_key=api_key, quality=True)) as provider:
        doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", provider.url,
                           quality={"shadow_share": 0.5})
        doc["job"]["id_column"] = "ticket_id"
        doc["task"] = {"template": "Ticket: {{ body }}", "output": {"labels": labels}}
        out = runner.run(config.parse(doc), progress=quiet_progress())
    folder = Path(out.folder.uri)
    shadows = _read(folder / "quality" / "shadows")
    results = _read(folder / "results")
    label = dict(zip(results.column("request_id").to_pylist(),
                     results.column("label").to_pylist(), strict=True))
    truth = QualityModel()
    body = dict(zip(*pq.read_table(tmp_path / "in.parquet").to_pydict().values(), strict=True))
    seen = {"both": 0, "one": 0}
    for r in shadows.to_pylist():
        text = f"Ticket: {body[r['request_id']]}"
        both = truth.correct(text, r["model"]) and truth.correct(text, REF)
        one = truth.correct(text, r["model"]) != truth.correct(text, REF)
        assert r["graded_by"] == "fields" and r["candidate_score"] is None
        if both:
            assert r["score"] == 1.0
            seen["both"] += 1
        if one:
            assert r["score"] == 0.0
            seen["one"] += 1
        assert label[r["request_id"]] is not None
    assert min(seen.values()) > 0, seen  # both kinds of pair were graded
    assert out.manifest.quality is not None and not out.manifest.quality["flagged"]
    assert out.exit_code == 0


def test_a_batch_tier_reference_shadows_through_its_batch_api(
        tmp_path: Path, api_key: str, ray_session: None) -> None:
    pq.write_table(sample.generate(120, seed=9), tmp_path / "in.parquet")
    cfg = MockProviderConfig(api_key=api_key, quality=True, batch_delay_s=0.2)
    with MockProvider(cfg) as provider:
        doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", provider.url,
                           quality={"shadow_share": 0.5, "judge": "claude-3-5-sonnet"})
        doc["models"][REF]["tier"] = "batch"
        out = runner.run(config.parse(doc), progress=quiet_progress())
        before = provider.stats()
        again = runner.run(config.parse(doc), run_id=out.folder.run_id,
                           progress=quiet_progress())
        assert provider.stats()["by_model"] == before["by_model"]  # nothing sent twice
    folder = Path(out.folder.uri)
    answers = _read(folder / "quality" / "answers")
    assert answers.num_rows > 10 and set(answers.column("tier").to_pylist()) == {"batch"}
    shadows = _read(folder / "quality" / "shadows")
    assert shadows.num_rows == answers.num_rows
    assert set(shadows.column("status").to_pylist()) == {"ok"}
    # the ledger of the shadow rows' batches lives apart from the run's own
    assert (folder / "quality" / f"{out.folder.run_id}-shadow" / "batches").is_dir()
    assert again.manifest.quality == out.manifest.quality
