"""Route stage with a real (tiny, hand-weighted) ONNX router: rules, policy, evidence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import config, schemas
from batchroute.config import Rule
from batchroute.errors import RouterError
from batchroute.stages.route import RouteSpec, RouteStage
from tests.helpers import CHEAP, MID, STRONG, job_doc, tiny_router


def _requests(prompts: list[str | None], **cols: list[object]) -> pa.Table:
    n = len(prompts)
    data: dict[str, object] = {
        "request_id": [f"r{i}" for i in range(n)], "row": list(range(n)), "prompt": prompts,
        "messages": [None] * n, "max_tokens": [None] * n, "temperature": [None] * n,
        "force_model": [None] * n, "tags": [None] * n, "reject_reason": [None] * n}
    data.update(cols)
    return pa.table(data, schema=schemas.REQUESTS)


def _stage(**overrides: object) -> RouteStage:
    spec = RouteSpec.from_job(config.parse(job_doc()))
    return RouteStage(tiny_router(), dataclasses.replace(spec, **overrides))  # type: ignore[arg-type]


def _col(t: pa.Table, name: str) -> list[object]:
    return t.column(name).to_pylist()


def test_policy_picks_cheapest_model_that_clears_its_threshold() -> None:
    out = _stage()(_requests(["easy", "hard", "neither"]))
    assert out.schema == schemas.ROUTED
    assert _col(out, "model") == [CHEAP, STRONG, CHEAP]  # neutral: sigmoid(0) = 0.5 >= 0.5
    assert _col(out, "route_reason") == ["classifier", "fallback", "classifier"]
    assert _col(out, "threshold") == [0.5, 0.0, 0.5]
    scores = _col(out, "router_scores")[0]
    assert [s["model"] for s in scores] == [CHEAP, STRONG]
    assert scores[0]["score"] == pytest.approx(1 / (1 + np.exp(-4)), rel=1e-5)
    assert set(_col(out, "router_version")) == {"tiny-1"}


def test_job_thresholds_override_the_router_file() -> None:
    # relative success of the cheap model: easy 1 - (0.88 - 0.98) -> 1, neither 0.62
    prompts = _requests(["this is easy", "neither"])
    assert _col(_stage()(prompts), "model") == [CHEAP, CHEAP]  # the file's 0.5
    out = _stage(thresholds={CHEAP: 0.99})(prompts)
    assert _col(out, "model") == [CHEAP, STRONG]
    assert _col(out, "threshold") == [pytest.approx(0.99), 0.0]


def test_forced_model_then_rules_then_classifier() -> None:
    stage = _stage(rules=(Rule("long", MID, min_chars=50),
                          Rule("support", CHEAP, tag="team:support"),
                          Rule("code", MID, contains_code=True),
                          Rule("sql", STRONG, regex=r"(?i)\bjoin\b")))
    out = stage(_requests(
        ["easy " * 20, "hard", "```python\nprint(1)\n```", "hard", "hard left join", "easy",
         "hard"],
        force_model=[STRONG, None, None, None, None, "ghost", None],
        tags=[None, ["team:support"], None, None, None, None, ["team:other"]]))
    assert _col(out, "route_reason") == ["forced", "rule:support", "rule:code", "fallback",
                                         "rule:sql", None, "fallback"]
    assert _col(out, "model") == [STRONG, CHEAP, MID, STRONG, STRONG, None, STRONG]
    assert _col(out, "reject_reason")[5] == "force_model 'ghost' is not in the catalog"


def test_rows_over_the_context_window_are_rejected_with_numbers() -> None:
    out = _stage()(_requests(["easy " + "x" * 40_000, "easy"], max_tokens=[100, 100]))
    reason = _col(out, "reject_reason")[0]
    assert reason is not None and "over cheap-model's context window of 8192" in str(reason)
    assert _col(out, "model")[0] == CHEAP  # the model it would have gone to stays as evidence
    assert _col(out, "route_reason")[0] is None
    assert _col(out, "est_input_tokens") == [10_006, 5]
    assert _col(out, "est_output_tokens") == [100, 100]


def test_source_rejections_pass_through_untouched() -> None:
    out = _stage()(_requests(["easy", None], reject_reason=[None, "null prompt"],
                             force_model=[None, STRONG]))
    assert _col(out, "reject_reason") == [None, "null prompt"]
    assert _col(out, "model") == [CHEAP, None]


def test_router_naming_unknown_models_is_refused() -> None:
    doc = job_doc()
    del doc["models"][CHEAP]
    spec = RouteSpec.from_job(config.parse(doc))
    with pytest.raises(RouterError, match="'cheap-model' is not in the job's catalog"):
        RouteStage(tiny_router(), spec)


def test_empty_batch() -> None:
    assert _stage()(_requests([])).num_rows == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["easy", "hard", "easy easy hard", "x", "hard hard easy"]),
                min_size=1, max_size=12),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_raising_a_threshold_never_sends_more_rows_to_that_model(
        prompts: list[str], t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    cheap_lo = np.array(_col(_stage(thresholds={CHEAP: lo})(_requests(prompts)), "model")) == CHEAP
    cheap_hi = np.array(_col(_stage(thresholds={CHEAP: hi})(_requests(prompts)), "model")) == CHEAP
    assert not np.any(cheap_hi & ~cheap_lo)


def test_policy_over_three_router_models() -> None:
    from batchroute.routers import classifier as rt

    # output order is strong, cheap, mid (not price order); rows: easy, medium, hard, unknown
    w = np.array([[4, 4, 4], [4, -4, 4], [4, -4, -4], [0, 0, 0]], np.float32)
    meta = {"version": "tiny-3", "policy": "relative",
            "thresholds": f'{{"{CHEAP}": 0.5, "{MID}": 0.5}}'}
    three = rt.build_graph(["easy", "medium", "hard"], w, np.zeros(3, np.float32),
                           np.zeros(3, np.float32), [STRONG, CHEAP, MID], meta)
    stage = RouteStage(three, RouteSpec.from_job(config.parse(job_doc())))
    out = stage(_requests(["easy", "medium", "hard"]))
    assert _col(out, "model") == [CHEAP, MID, STRONG]
    assert _col(out, "route_reason") == ["classifier", "classifier", "fallback"]
    assert [s["model"] for s in _col(out, "router_scores")[0]] == [STRONG, CHEAP, MID]


def test_the_default_policy_is_relative() -> None:
    job = config.parse(job_doc())
    assert job.router.policy == config.DEFAULT_POLICY == "relative"
    assert RouteSpec.from_job(job).policy == "relative"
    assert config.RouterConfig().policy == RouteSpec((), (), {}, 64).policy == "relative"
