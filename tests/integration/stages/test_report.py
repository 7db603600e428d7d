"""``batchroute report`` over real runs: a price change between two nights, and the page in a
real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from batchroute import cli, config
from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider
from batchroute.job import runner
from batchroute.stages import report
from tests.helpers import REPO, demo_job_doc, quiet_progress

pytestmark = [pytest.mark.integration]
CHEAP = "mixtral-8x7b-instruct"
ARTIFACTS = Path(os.environ.get("BATCHROUTE_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory: pytest.TempPathFactory, provider: MockProvider,
               ray_session: None) -> dict[str, object]:
    """The same 300 prompts run on 14 and 16 November; the cheap model's price doubles on
    the 15th."""
    tmp = tmp_path_factory.mktemp("report")
    sample.write(sample.generate(300, seed=5), tmp / "in.parquet")
    (tmp / "prices.toml").write_text(f"""
[[price]]
model = "{CHEAP}"
effective_from = 2026-11-15
input_usd_per_mtok = 0.50
output_usd_per_mtok = 1.50
""")
    doc = demo_job_doc(tmp / "in.parquet", tmp / "runs", provider.url,
                       dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.1})
    doc["job"]["prices"] = str(tmp / "prices.toml")
    job = config.parse(doc)  # the job file's own price holds until the 15th
    for run_id, day in (("night-14", date(2026, 11, 14)), ("night-16", date(2026, 11, 16))):
        out = runner.run(job, run_id=run_id, progress=quiet_progress(), price_date=day)
        assert out.exit_code == 0
    return {"tmp": tmp, "job": job}


def test_each_night_is_priced_at_its_own_date(two_nights: dict[str, object]) -> None:
    tmp, job = two_nights["tmp"], two_nights["job"]
    assert isinstance(tmp, Path) and isinstance(job, config.JobConfig)
    code = cli.main(["report", "--runs", str(tmp / "runs"), "--out", str(tmp / "out"),
                     "--by", "day,model"])
    assert code == 0
    daily = pl.read_parquet(tmp / "out" / "report.parquet")
    for run_id, day in (("night-14", "2026-11-14"), ("night-16", "2026-11-16")):
        results = pl.read_parquet(tmp / "runs" / run_id / "results")
        cheap_rows = results.filter((pl.col("model") == CHEAP) & (pl.col("status") == "ok"))
        price = job.priced_on(date.fromisoformat(day)).models[CHEAP]
        expected = sum(price.cost_micro_usd(i, o) for i, o in
                       zip(cheap_rows["input_tokens"], cheap_rows["output_tokens"],
                           strict=True))
        got = daily.filter((pl.col("day") == day) & (pl.col("model") == CHEAP))
        assert got["cost_micro_usd"].item() == expected > 0
        assert daily.filter(pl.col("day") == day)["cost_micro_usd"].sum() == (
            results["cost_micro_usd"].sum())
    # Same prompts, same answers: only the price moved.
    night = daily.filter(pl.col("model") == CHEAP).sort("day")
    assert night["input_tokens"][0] == night["input_tokens"][1]
    assert night["cost_micro_usd"][1] > 1.5 * night["cost_micro_usd"][0]
    forecast = pl.read_parquet(tmp / "out" / "forecast.parquet")
    assert set(forecast["run_id"]) == {"night-14", "night-16"}
    assert forecast["error_pct"].drop_nulls().len() > 0


def test_the_page_renders_in_a_headless_browser(two_nights: dict[str, object]) -> None:
    tmp = two_nights["tmp"]
    assert isinstance(tmp, Path)
    out = tmp / "browser"
    built = report.build(str(tmp / "runs"), out, by=["day", "job", "model"])
    page = (out / "report.html").read_text()
    total = re.search(r'<b id="total">([^<]+)</b>', page)
    assert total and total.group(1) == report.format_usd(built.total_micro_usd)
    # Every chart is inlined, and none is blank.
    from PIL import Image, ImageStat

    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(report.CHARTS)
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        assert img.size[0] > 300 and ImageStat.Stat(img).stddev[0] > 10

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:  # make test installs it; a test that cannot run here fails
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    shot.unlink(missing_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1300,2600",
                    (out / "report.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    img = Image.open(shot).convert("L")
    assert img.size == (1300, 2600)
    # Charts drawn: the rendered page is far from a blank or text-only sheet.
    assert ImageStat.Stat(img).stddev[0] > 20
