"""``batchroute calibrate`` on synthetic labels whose answer is known: it lands on its target
within one bin, writes the thresholds into the router, and jobs then use them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli, config
from batchroute.errors import ConfigError
from batchroute.routers import classifier as rt
from batchroute.stages.route import relative
from batchroute.training import calibrate
from tests.helpers import CHEAP, STRONG, job_doc, tiny_router


def _labels(path: Path, n: int = 2000, seed: int = 3) -> Path:
    """Prompts with a mix of "easy" and "hard" words: the tiny router's cheap-model score
    rises with the easy share, and so does the cheap model's real success."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        easy = int(rng.integers(0, 8))
        hard = int(rng.integers(0, 8))
        prompt = " ".join(["easy"] * easy + ["hard"] * hard + [f"q{i}"])
        cheap_ok = float(rng.random() < 1 / (1 + np.exp(-(easy - hard))))
        strong_ok = float(rng.random() < 0.9)
        rows += [(f"r{i}", prompt, CHEAP, cheap_ok), (f"r{i}", prompt, STRONG, strong_ok)]
    ids, prompts, models, scores = zip(*rows, strict=True)
    pq.write_table(pa.table({"request_id": ids, "prompt": prompts, "model": models,
                             "score": scores}), path)
    return path


def test_strong_share_lands_within_one_bin(tmp_path: Path) -> None:
    labels = _labels(tmp_path / "labels.parquet")
    for share in (0.1, 0.3, 0.6):
        data, out = calibrate.calibrate(tiny_router(), str(labels),
                                        calibrate.CalibrationTarget.parse(f"strong-share={share}"))
        assert out["order"] == [CHEAP, STRONG]
        assert abs(out["strong_share"] - share) <= 0.1  # one of ten quantile bins
        info = rt.inspect(data)
        assert info.thresholds[CHEAP] == pytest.approx(out["thresholds"][CHEAP])
        assert info.thresholds[STRONG] == 0.0
        # Replaying the written router under the default (relative) policy reproduces the
        # share it reports.
        assert out["policy"] == info.metadata["policy"] == config.DEFAULT_POLICY == "relative"
        probs = rt.Router(data).score(pa.array(pq.read_table(labels).column("prompt")
                                               .to_pylist()[::2], pa.string()))
        ordered = probs[:, [info.models.index(CHEAP), info.models.index(STRONG)]]
        sent_up = (relative(ordered)[:, 0] < info.thresholds[CHEAP]).mean()
        assert sent_up == pytest.approx(out["strong_share"])
        assert info.version.startswith("tiny-1+cal-")
        assert json.loads(info.metadata["calibration"])["target"] == f"strong-share={share}"


def test_quality_and_budget_targets(tmp_path: Path) -> None:
    labels = _labels(tmp_path / "labels.parquet")
    _, q = calibrate.calibrate(tiny_router(), str(labels),
                               calibrate.CalibrationTarget.parse("quality=0.95"))
    assert q["quality"] >= 0.95 * q["strong_quality"]
    _, lower = calibrate.calibrate(tiny_router(), str(labels),
                                   calibrate.CalibrationTarget.parse("quality=0.85"))
    assert lower["strong_share"] <= q["strong_share"]  # a lower bar costs less

    job = config.parse(job_doc())
    _, b = calibrate.calibrate(tiny_router(), str(labels),
                               calibrate.CalibrationTarget.parse("budget-usd=1.0"), job=job)
    assert b["usd_per_1k_prompts"] <= 1.0
    _, rich = calibrate.calibrate(tiny_router(), str(labels),
                                  calibrate.CalibrationTarget.parse("budget-usd=1000"), job=job)
    assert rich["quality"] >= b["quality"]
    with pytest.raises(ConfigError, match="needs --job"):
        calibrate.calibrate(tiny_router(), str(labels), calibrate.CalibrationTarget.parse("budget-usd=1"))
    with pytest.raises(ConfigError, match="even the cheapest policy costs"):
        calibrate.calibrate(tiny_router(), str(labels),
                            calibrate.CalibrationTarget.parse("budget-usd=0.000001"), job=job)


@pytest.mark.parametrize("text", ["share=0.3", "strong-share", "quality=1.5", "budget-usd=-1",
                                  "strong-share=lots"])
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--target"):
        calibrate.CalibrationTarget.parse(text)


def test_the_cli_writes_the_router_and_a_job_uses_its_thresholds(tmp_path: Path) -> None:
    from batchroute.stages.route import RouteSpec, RouteStage

    labels = _labels(tmp_path / "labels.parquet")
    (tmp_path / "r.onnx").write_bytes(tiny_router())
    code = cli.main(["calibrate", "--labels", str(labels), "--router", str(tmp_path / "r.onnx"),
                     "--target", "strong-share=0.3", "--out", str(tmp_path / "cal.onnx")])
    assert code == 0
    data = (tmp_path / "cal.onnx").read_bytes()
    threshold = rt.inspect(data).thresholds[CHEAP]
    job = config.parse(job_doc())
    stage = RouteStage(data, RouteSpec.from_job(job))
    assert stage._policy.thresholds[0] == pytest.approx(threshold)
    doc = job_doc()
    doc["router"]["thresholds"] = {CHEAP: 0.5}  # the job file still has the last word
    stage = RouteStage(data, RouteSpec.from_job(config.parse(doc)))
    assert stage._policy.thresholds[0] == pytest.approx(0.5)


def test_the_policy_frontier_against_each_model_alone(tmp_path: Path) -> None:
    from batchroute.training import evaluate

    labels = _labels(tmp_path / "labels.parquet")
    r = evaluate.frontier_report(tiny_router(), str(labels), config.parse(job_doc()),
                                 split="all")
    points = r["frontier"]
    assert r["order"] == [CHEAP, STRONG] and len(points) > 5
    # A frontier: dearer points are strictly better.
    assert all(b["usd_per_1k"] >= a["usd_per_1k"] and b["quality"] > a["quality"]
               for a, b in itertools.pairwise(points))
    alone = {s["model"]: s for s in r["single_models"]}
    # Matching the strong model's quality costs no more than the strong model alone, and the
    # cheap model alone is the frontier's first point.
    assert alone[STRONG]["routed_cost_vs_alone"] <= 1.0
    assert points[0]["usd_per_1k"] == pytest.approx(alone[CHEAP]["usd_per_1k"])
    assert "model alone" in evaluate.format_frontier(r)
