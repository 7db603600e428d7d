"""Router metrics on synthetic sets with known answers, and the eval command on real labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchroute import cli
from batchroute.training import evaluate
from tests.helpers import MMLU


def _outcomes(n: int = 4000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    strong = (rng.random(n) < 0.8).astype(float)
    weak = np.where(strong == 1, (rng.random(n) < 0.8).astype(float),
                    (rng.random(n) < 0.2).astype(float))
    return weak, strong


def test_oracle_beats_one_random_is_half_inverted_is_below() -> None:
    weak, strong = _outcomes()
    rng = np.random.default_rng(2)
    needs = (strong > weak).astype(float)
    oracle = evaluate.evaluate(needs + rng.random(len(weak)) * 1e-9, weak, strong,
                               price_ratio=0.05)
    random = [evaluate.evaluate(rng.random(len(weak)), weak, strong, price_ratio=0.05).apgr
              for _ in range(20)]
    inverted = evaluate.evaluate(-needs + rng.random(len(weak)) * 1e-9, weak, strong,
                                 price_ratio=0.05)
    assert oracle.apgr > 1.0 and oracle.auc == 1.0
    assert np.mean(random) == pytest.approx(0.5, abs=0.03)
    assert inverted.apgr < 0.5
    assert oracle.cpt50 < np.mean(random)


def test_curve_uses_eleven_quantile_thresholds_and_strict_last() -> None:
    scores = np.arange(10, dtype=float)
    weak, strong = np.zeros(10), np.ones(10)
    c = evaluate.curve(scores, weak, strong)
    assert len(c.strong_share) == 11
    assert c.strong_share[0] == 0.0  # strictly above the maximum: nobody goes strong
    assert c.strong_share[-1] == 1.0  # >= the minimum: everybody does
    np.testing.assert_allclose(c.quality, c.strong_share)  # strong always right, weak never


def test_cpt_interpolates_linearly_and_apgr_by_hand() -> None:
    c = evaluate.Curve(np.array([0.0, 0.5, 1.0]), np.array([0.6, 0.9, 1.0]))
    # target 0.6 + 0.5 * 0.4 = 0.8 lies 2/3 of the way from 0.6 to 0.9 on [0, 0.5]
    assert evaluate.share_for_quality(c, 0.8) == pytest.approx(1 / 3)
    assert evaluate.share_for_quality(c, 1.1) == 1.0
    # area = 0.5 * (0.6 + 0.9) / 2 + 0.5 * (0.9 + 1.0) / 2 = 0.85; weak 0.6, strong 1.0
    assert evaluate.apgr(c, 0.6, 1.0) == pytest.approx((0.85 - 0.6) / 0.4)


def test_eval_command_on_the_bundled_router(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    plot = tmp_path / "curve.png"
    assert cli.main(["eval", "--labels", str(MMLU), "--json", "--plot", str(plot)]) == 0
    from PIL import Image, ImageStat

    img = Image.open(plot).convert("L")
    assert img.size == (700, 500) and ImageStat.Stat(img).stddev[0] > 10
    r = json.loads(capsys.readouterr().out)
    assert r["split"] == "holdout" and 1500 < r["rows"] < 2500
    assert r["oracle"]["apgr"] > 1.0
    assert r["router"]["gain"]["apgr"] > r["random"]["apgr"] + 0.05
    assert cli.main(["eval", "--labels", str(MMLU), "--weak", "nobody"]) == 2
