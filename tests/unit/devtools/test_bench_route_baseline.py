"""``bench route``'s scikit-learn baseline, timed alternately with the router (no Ray here)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from batchroute import config
from batchroute.devtools.bench import route as bench_route
from batchroute.routers import classifier as rt

BUNDLED = rt.read_bytes(config.BUNDLED_ROUTER)


def test_router_and_baseline_alternate_on_the_same_batches() -> None:
    texts = bench_route.prompts(300, 200)["prompt"]
    seen: list[int] = []

    def batches() -> list[pa.ChunkedArray]:
        seen.append(1)
        return [texts.slice(0, 200), texts.slice(200)]

    r = bench_route.score_alternately(BUNDLED, batches, chars=200, fit_rows=200)
    assert len(seen) == 2  # two batches a pass: a second pass reaches three alternations
    assert r["engine"] == "numpy" and r["chars_mean"] > 100
    b = r["baseline"]
    assert b["alternations"] == 4 and len(b["passes"]) == 2 and b["fit_rows"] == 200
    assert r["rate"] > 0 and r["baseline_rate"] > 0
    assert r["rate"] == pytest.approx(600 / r["seconds"])
    assert b["seconds"] == pytest.approx(600 / r["baseline_rate"], abs=0.0006)  # rounded
    assert r["baseline_ratio"] == round(r["rate"] / r["baseline_rate"], 2)


def test_the_baseline_is_a_fitted_model_over_the_same_tokens() -> None:
    fit = bench_route.prompts(400, 300, seed=1)["prompt"]
    router = rt.Router(BUNDLED)
    baseline = bench_route.Baseline(fit, router.score(fit))
    texts = pa.array(["Explain the theorem", "", "Invoice billing account cost"])
    got = baseline.score(texts)
    assert got.shape == (3, len(router.info.models))
    assert np.all((got > 0) & (got < 1)) and not np.allclose(got, got[0])
    assert baseline.vectorizer.build_analyzer()("Ünï X2 ab-cd") == ["n", "x2", "ab", "cd"]
