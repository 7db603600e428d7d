"""Router kinds beyond the classifier: rules on estimated tokens, the similarity memory bank,
cascades through an uncertain band, and one decision with evidence for every row."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute import config, schemas
from batchroute.config import Rule, SimilarityConfig
from batchroute.errors import ConfigError
from batchroute.routers import similarity as memory
from batchroute.routers.ivf import IvfIndex
from batchroute.stages.route import RouteSpec, RouteStage
from batchroute.training import bank as bank_tools
from tests.helpers import CHEAP, MID, STRONG, FakeEmbedder, job_doc, tiny_router
from tests.unit.stages.test_route import _col, _requests

EMB = FakeEmbedder()


def _bank(tmp_path: Path, rows: list[tuple[str, dict[str, float]]]) -> str:
    path = str(tmp_path / "bank.parquet")
    frame = pl.DataFrame(
        [{"request_id": f"b{i}", "prompt": p, "model": m, "score": s}
         for i, (p, outcomes) in enumerate(rows) for m, s in outcomes.items()],
        schema={"request_id": pl.String, "prompt": pl.String, "model": pl.String,
                "score": pl.Float32})
    bank_tools.add(path, frame, source="test", embedder=EMB)
    return path


def _spec(**overrides: object) -> RouteSpec:
    """The helpers' job, under policy = "success" unless overridden: these tests set their
    thresholds and bands on predicted success (the relative policy has tests of its own)."""
    overrides = {"policy": "success", **overrides}
    return dataclasses.replace(RouteSpec.from_job(config.parse(job_doc())), **overrides)  # type: ignore[arg-type]


BANK_ROWS = [
    ("capital of france paris", {CHEAP: 1.0, STRONG: 1.0}),
    ("capital of spain madrid", {CHEAP: 1.0, STRONG: 1.0}),
    ("prove the riemann hypothesis zeta", {CHEAP: 0.0, STRONG: 1.0}),
    ("riemann zeta zeros proof", {CHEAP: 0.0, STRONG: 0.0}),
]


def test_nearest_neighbours_on_a_tiny_hand_made_bank(tmp_path: Path) -> None:
    bank = memory.Bank.read(_bank(tmp_path, BANK_ROWS))
    assert bank.models == (CHEAP, STRONG) and bank.embedder == EMB.name
    nn = memory.Neighbours(bank, EMB, k=2, min_similarity=0.1, models=[CHEAP, STRONG])
    queries = EMB.embed(["capital of france paris", "riemann zeta", "banana"])
    sims, idx = nn.nearest(queries)
    brute = queries @ bank.embeddings.T
    np.testing.assert_allclose(sims, -np.sort(-brute, axis=1)[:, :2], rtol=1e-6)
    assert idx[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0)
    assert set(idx[1]) == {2, 3}
    scores, top, found = nn.predict_embedded(queries)
    assert found.tolist() == [True, True, False]  # "banana" shares no word with the bank
    assert np.isnan(top).sum() == 0 and top[2] == pytest.approx(0.0)
    # france: both voters succeeded on cheap; riemann: both failed on cheap
    assert scores[0, 0] > 0.75 and scores[1, 0] < 0.35
    # one pseudo-neighbour at the bank's own rate keeps predictions off 0 and 1
    assert scores[1, 0] > 0.0 and scores[0, 0] < 1.0


def test_search_across_bank_chunks_equals_brute_force(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    rows = [(" ".join(rng.choice(words, 5)), {CHEAP: float(rng.integers(0, 2))})
            for _ in range(60)]
    bank = memory.Bank.read(_bank(tmp_path, rows))
    monkeypatch.setattr(memory, "BANK_CHUNK_ROWS", 7)
    nn = memory.Neighbours(bank, EMB, k=5, min_similarity=0.0, models=[CHEAP])
    q = EMB.embed([" ".join(rng.choice(words, 4)) for _ in range(20)])
    sims, idx = nn.nearest(q)
    brute = q @ bank.embeddings.T
    np.testing.assert_allclose(sims, -np.sort(-brute, axis=1)[:, :5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(brute, idx, axis=1), sims, atol=1e-6)


def test_adding_merges_outcomes_and_keeps_one_row_per_prompt(tmp_path: Path) -> None:
    path = _bank(tmp_path, BANK_ROWS)
    again = pl.DataFrame({"request_id": ["x", "y"], "prompt": ["capital of france paris", "new one"],
                          "model": [CHEAP, MID], "score": [0.0, 1.0]})
    counts = bank_tools.add(path, again, source="later", embedder=EMB)
    assert counts == {"prompts": 5, "new_prompts": 1, "outcomes": 2}
    bank = memory.Bank.read(path)
    assert bank.models == (CHEAP, MID, STRONG)
    row = list(bank.keys).index(memory.text_keys(pa.array(["capital of france paris"]))[0])
    assert bank.outcomes[row].tolist() == [0.0, pytest.approx(np.nan, nan_ok=True), 1.0]
    with pytest.raises(ConfigError, match="embedded with 'fake-bow-32'"):
        bank_tools.add(path, again, source="x", embedder=type("E", (), {"name": "other", "dim": 32})())


def test_similarity_stage_decides_with_evidence_and_passes_strangers_on(tmp_path: Path) -> None:
    spec = _spec(stages=("rules", "similarity"), rules=(Rule("code", MID, contains_code=True),),
                 similarity=SimilarityConfig(bank=_bank(tmp_path, BANK_ROWS), k=2,
                                             min_similarity=0.2))
    stage = RouteStage(None, spec, embedder=EMB)
    out = stage(_requests(["capital of spain madrid", "riemann zeta proof", "banana split",
                           "```\nx = 1\n```"]))
    assert out.schema == schemas.ROUTED
    assert _col(out, "model") == [CHEAP, STRONG, STRONG, MID]
    assert _col(out, "route_stage") == ["similarity", "similarity", "fallback", "rules"]
    assert _col(out, "route_reason") == ["similarity", "fallback", "fallback", "rule:code"]
    sims = _col(out, "neighbour_similarity")
    assert sims[0] == pytest.approx(1.0) and sims[2] == pytest.approx(0.0) and sims[3] is None
    ev = _col(out, "similarity_scores")
    assert [s["model"] for s in ev[0]] == [CHEAP, STRONG] and ev[3] is None
    assert _col(out, "router_scores") == [None] * 4  # no classifier stage, no classifier
    assert _col(out, "route_cost_micro_usd") == [0] * 4


def test_a_cascade_sends_only_the_uncertain_band_on(tmp_path: Path) -> None:
    # tiny_router: "easy" -> cheap 0.98, "hard" -> 0.02, other words -> 0.5 (uncertain)
    spec = _spec(stages=("classifier", "similarity"),
                 classifier=config.ClassifierConfig(uncertain=(0.4, 0.6)),
                 similarity=SimilarityConfig(bank=_bank(tmp_path, BANK_ROWS), k=2,
                                             min_similarity=0.2))
    stage = RouteStage(tiny_router(policy="success"), spec, embedder=EMB)
    out = stage(_requests(["easy", "hard", "capital of spain madrid", "riemann zeta proof",
                           "banana split"]))
    assert _col(out, "route_stage") == ["classifier", "classifier", "similarity", "similarity",
                                        "fallback"]
    assert _col(out, "model") == [CHEAP, STRONG, CHEAP, STRONG, STRONG]
    # Only the band's rows were looked up in the bank.
    assert [x is not None for x in _col(out, "similarity_scores")] == [False, False, True,
                                                                        True, True]
    # The classifier's scores are evidence on every row.
    assert all(s is not None for s in _col(out, "router_scores"))


def test_fallback_model_takes_rows_no_stage_decided() -> None:
    spec = _spec(stages=("rules",), rules=(Rule("long", STRONG, min_tokens=10),),
                 fallback=CHEAP)
    out = RouteStage(None, spec)(_requests(["short", "x" * 100]))
    assert _col(out, "model") == [CHEAP, STRONG]
    assert _col(out, "route_stage") == ["fallback", "rules"]


def test_rules_on_estimated_tokens() -> None:
    spec = _spec(stages=("rules",), rules=(Rule("small", CHEAP, max_tokens=5),
                                           Rule("big", STRONG, min_tokens=6)))
    # 4 characters a token plus 4 for the message: 4 chars -> 5 tokens, 8 chars -> 6
    out = RouteStage(None, spec)(_requests(["abcd", "abcdefgh"]))
    assert _col(out, "route_reason") == ["rule:small", "rule:big"]


def test_job_file_router_sections() -> None:
    doc = job_doc()
    doc["router"].update(stages=["rules", "classifier", "similarity"],
                         classifier={"uncertain": [0.3, 0.7]},
                         similarity={"bank": "bank.parquet", "k": 8, "nprobe": 48},
                         fallback=CHEAP)
    job = config.parse(doc)
    assert job.router.stages == ("rules", "classifier", "similarity")
    assert job.router.classifier.uncertain == (0.3, 0.7)
    assert job.router.similarity.k == 8 and job.router.similarity.bank.endswith("bank.parquet")
    assert job.router.similarity.nprobe == 48 and SimilarityConfig().nprobe == 32
    for change, message in [
        ({"stages": ["rules", "oracle"]}, "unknown stage 'oracle'"),
        ({"stages": ["classifier", "similarity"], "classifier": {}},
         "'classifier' decides every row it sees"),
        ({"classifier": {"uncertain": [0.8, 0.2]}}, r"uncertain: must be \[low, high\]"),
        ({"similarity": {"k": 8}}, "router.similarity.bank: missing"),
        ({"similarity": {"bank": "b", "index": "lsh"}},
         "router.similarity.index: must be one of auto, exact, ivf, hnsw"),
        ({"similarity": {"bank": "b", "nprobe": 0}},
         "router.similarity.nprobe: must be an integer >= 1, got 0"),
        ({"stages": ["rules"], "similarity": {"bank": "b"}}, "configured but not in"),
        ({"fallback": "ghost"}, "router.fallback: 'ghost' is not in the models catalog"),
        ({"stages": ["classifier", "similarity", "llm"],
          "llm": {"model": CHEAP, "labels": {"easy": "ghost"}, "default": STRONG},
          "similarity": {"bank": "b", "uncertain": [0.4, 0.6]}}, "labels.easy: 'ghost'"),
        ({"stages": ["classifier", "similarity", "llm"],
          "llm": {"model": CHEAP, "labels": {"easy": CHEAP}, "default": STRONG}},
         "'similarity' decides every row it sees"),
    ]:
        bad = job_doc()
        bad["router"].update({"stages": ["rules", "classifier", "similarity"],
                              "classifier": {"uncertain": [0.3, 0.7]},
                              "similarity": {"bank": "bank.parquet"}})
        bad["router"].update(change)
        with pytest.raises(ConfigError, match=message):
            config.parse(bad)


def test_a_bank_missing_or_malformed_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"memory bank .*nope\.parquet: not found"):
        memory.Bank.read(str(tmp_path / "nope.parquet"))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(Exception, match="column 'embedding' is missing"):
        memory.Bank.read(str(tmp_path / "bad.parquet"))


# -- the llm kind in the route stage, through the ask seam -----------------------------------

def _llm_spec(**overrides: object) -> RouteSpec:
    llm = config.LLMRouterConfig(model=CHEAP, labels={"easy": CHEAP, "medium": MID,
                                                      "hard": STRONG}, default=STRONG)
    return _spec(**{"stages": ("rules", "llm"), "llm": llm, **overrides})


def test_llm_stage_decides_counts_fallbacks_and_records_its_cost() -> None:
    from tests.unit.routers.test_llm import FakeAsk, by_word

    ask = FakeAsk(by_word, cost=7)
    stage = RouteStage(None, _llm_spec(), ask=ask)
    out = stage(_requests(["a hard one", "plain", "garbage please", "service down",
                           "```\ncode\n```", "plain"]))
    assert _col(out, "model") == [STRONG, CHEAP, STRONG, STRONG, MID, CHEAP]
    assert _col(out, "route_stage") == ["llm", "llm", "llm", "llm", "rules", "llm"]
    assert _col(out, "route_reason") == ["llm:hard", "llm:easy", "llm:default", "llm:default",
                                         "rule:code", "llm:easy"]
    assert _col(out, "llm_label") == ["hard", "easy", None, None, None, "easy"]
    # Four distinct prompts asked once each; the failed call cost nothing; the duplicate
    # "plain" is paid once; the rule's row was never asked.
    assert len(ask.asked) == 4
    assert _col(out, "route_cost_micro_usd") == [7, 7, 7, 0, 0, 0]


def test_a_cascade_asks_the_llm_only_inside_the_classifiers_band() -> None:
    from tests.unit.routers.test_llm import FakeAsk, by_word

    ask = FakeAsk(by_word)
    spec = _llm_spec(stages=("classifier", "llm"),
                     classifier=config.ClassifierConfig(uncertain=(0.4, 0.6)))
    out = RouteStage(tiny_router(policy="success"), spec, ask=ask)(
        _requests(["easy", "hard", "medium rare", "something else"]))
    assert sorted(ask.asked) == ["medium rare", "something else"]
    assert _col(out, "route_stage") == ["classifier", "classifier", "llm", "llm"]
    assert _col(out, "model") == [CHEAP, STRONG, MID, CHEAP]


@settings(max_examples=25, deadline=None)
@given(prompts=st.lists(st.sampled_from(["easy", "hard", "capital of spain madrid",
                                         "riemann zeta", "banana", "", "```\nx\n```",
                                         "garbage", "x" * 300]), max_size=12),
       stages=st.permutations(["rules", "classifier", "similarity", "llm"]),
       take=st.integers(1, 4))
def test_every_kind_emits_one_decision_per_row_with_its_evidence(
        tmp_path_factory: pytest.TempPathFactory, prompts: list[str], stages: list[str],
        take: int) -> None:
    from tests.unit.routers.test_llm import FakeAsk, by_word

    chosen = tuple(stages[:take])
    bank = _bank(tmp_path_factory.mktemp("bank"), BANK_ROWS)
    band = (0.0, 1.0)  # every stage but the last passes everything on: the longest cascade
    spec = _llm_spec(
        stages=chosen, classifier=config.ClassifierConfig(uncertain=band),
        similarity=SimilarityConfig(bank=bank, k=2, min_similarity=0.2, uncertain=band))
    out = RouteStage(tiny_router(policy="success"), spec, embedder=EMB, ask=FakeAsk(by_word))(
        _requests(prompts))
    assert out.num_rows == len(prompts) and out.schema == schemas.ROUTED
    stage_col = _col(out, "route_stage")
    assert all(m is not None for m in _col(out, "model"))
    assert set(stage_col) <= {*chosen, "fallback"}
    for i, s in enumerate(stage_col):
        if s == "similarity":
            assert _col(out, "similarity_scores")[i] is not None
        if s == "llm":
            assert (_col(out, "llm_label")[i] is not None) == (
                _col(out, "route_reason")[i] != "llm:default")
        if s == "rules":
            assert str(_col(out, "route_reason")[i]).startswith("rule:")
    if "classifier" in chosen:
        assert all(x is not None for x in _col(out, "router_scores"))


def test_bank_outcomes_from_labels_split_like_training(tmp_path: Path) -> None:
    from batchroute.training import train

    rows = [{"request_id": f"q{i}", "prompt": f"question {i}", "model": m,
             "score": float((i + j) % 3 == 0)} for i in range(60) for j, m in enumerate(
                 [CHEAP, STRONG])]
    path = tmp_path / "labels.parquet"
    pl.DataFrame(rows).write_parquet(path)
    parts = {s: bank_tools.outcomes_from_labels(str(path), split=s, cut=0.5)
             for s in ("train", "holdout", "all")}
    ids = {s: set(f["request_id"].to_list()) for s, f in parts.items()}
    assert ids["train"] | ids["holdout"] == ids["all"] and not ids["train"] & ids["holdout"]
    held = {r for r in ids["all"] if train.is_holdout([r])[0]}
    assert ids["holdout"] == held and held  # the same rows training holds out
    assert parts["all"].height == 120 and set(parts["all"]["score"].to_list()) == {0.0, 1.0}
    with pytest.raises(ConfigError, match="split must be train, holdout or all"):
        bank_tools.outcomes_from_labels(str(path), split="test")


def test_rules_are_vectorised_and_their_order_is_respected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.compute as pc

    from batchroute.stages import route

    calls: list[int] = []
    real = pc.match_substring_regex

    def counting(values: object, pattern: str, **kw: object) -> object:
        calls.append(len(values))  # type: ignore[arg-type]
        return real(values, pattern, **kw)

    monkeypatch.setattr(route.pc, "match_substring_regex", counting)
    # Both rules match "join tables"; the first listed wins. One regex call per rule for the
    # whole batch, however many rows.
    rules = (Rule("first", MID, regex="join"), Rule("second", STRONG, regex="tables"))
    prompts = ["join tables", "tables only", "nothing"] * 400
    out = RouteStage(None, _spec(stages=("rules",), rules=rules, fallback=CHEAP))(
        _requests(prompts))
    assert calls == [1200, 1200]
    assert _col(out, "route_reason")[:3] == ["rule:first", "rule:second", "fallback"]
    swapped = RouteStage(None, _spec(stages=("rules",), rules=rules[::-1], fallback=CHEAP))(
        _requests(prompts[:3]))
    assert _col(swapped, "route_reason") == ["rule:second", "rule:second", "fallback"]


@pytest.mark.parametrize(("kind", "cls"), [("ivf", IvfIndex), ("hnsw", "IndexHNSWFlat")])
def test_a_large_bank_is_searched_through_a_cached_approximate_index(
        tmp_path: Path, kind: str, cls: object) -> None:
    import faiss

    rng = np.random.default_rng(1)
    n, dim = 3000, 32
    # Prompts come in families (templates, topics): 100 clusters.
    centres = rng.standard_normal((100, dim)).astype(np.float32)
    family = rng.integers(0, 100, n)
    vectors = centres[family] + 0.25 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # A family's prompts mostly share their outcome.
    outcome = (family % 2 == (rng.random(n) < 0.9)).astype(np.float32)[:, None]
    bank = memory.Bank(np.array([f"k{i}" for i in range(n)], dtype=object), vectors,
                       (CHEAP,), outcome, EMB.name)
    path = tmp_path / "bank.parquet"
    path.write_bytes(b"stand-in: the stamp reads the file's size and time")
    index = memory.ann_index(bank, str(path), kind)
    assert isinstance(index, cls if isinstance(cls, type) else getattr(faiss, str(cls)))
    saved = tmp_path / f"bank.parquet.{kind}"
    stamp = saved.stat().st_mtime_ns
    again = memory.ann_index(bank, str(path), kind, nprobe=7)  # read back, not rebuilt
    assert again.ntotal == n and saved.stat().st_mtime_ns == stamp
    if kind == "ivf":
        assert again.nprobe == 7  # tuned once read
        assert index.nlist == memory.ivf_lists(n) == 64
    exact = memory.Neighbours(bank, EMB, k=10, min_similarity=0.0, models=[CHEAP])
    approx = memory.Neighbours(bank, EMB, k=10, min_similarity=0.0, models=[CHEAP], ann=index)
    # Queries near bank entries, as tonight's prompts are near last night's.
    queries = vectors[:200] + 0.3 * rng.standard_normal((200, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    (es, ei), (as_, ai) = exact.nearest(queries), approx.nearest(queries)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ai, ei, strict=True)])
    assert recall >= 0.9
    # The nearest is found (to float16 rounding) for almost every query.
    assert np.mean(np.abs(as_[:, 0] - es[:, 0]) < 1e-4) >= 0.9
    # Scores from either search agree closely on average (a query between two families may
    # see the other one's neighbours).
    diff = np.abs(approx.predict_embedded(queries)[0] - exact.predict_embedded(queries)[0])
    assert diff.mean() <= 0.02 and np.median(diff) <= 1e-3


def test_ivf_lists_grow_with_the_bank_and_keep_enough_training_points() -> None:
    assert memory.ivf_lists(1_000_000) == 4096
    assert memory.ivf_lists(50_000) == 1024
    assert memory.ivf_lists(100) == 2 and memory.ivf_lists(10) == 1
    for rows in (1, 77, 5_000, 123_456, 3_000_000):
        assert memory.ivf_lists(rows) * 39 <= max(rows, 39)


# -- policy = "relative" ---------------------------------------------------------------------

def test_relative_policy_keeps_prompts_both_models_would_fail_on_the_cheap_one() -> None:
    from batchroute.stages.route import _Policy, relative

    # columns: cheap, mid, strong (cheapest first); rows: both fail, only strong succeeds,
    # all succeed
    scores = np.array([[0.1, 0.1, 0.15], [0.1, 0.2, 0.9], [0.9, 0.9, 0.95]], np.float32)
    np.testing.assert_allclose(relative(scores)[:, 0], [0.95, 0.2, 0.95], rtol=1e-6)
    spec = _spec(thresholds={CHEAP: 0.8, MID: 0.8})
    models = (STRONG, CHEAP, MID)  # the router's output order need not be the price order
    cols = scores[:, [2, 0, 1]]
    success = _Policy(models, spec, {})
    rel = _Policy(models, dataclasses.replace(spec, policy="relative"), {})
    assert list(success.names[success.choose(cols)]) == [STRONG, STRONG, CHEAP]
    assert list(rel.names[rel.choose(cols)]) == [CHEAP, STRONG, CHEAP]


def test_thresholds_calibrated_for_one_policy_are_refused_under_the_other(
        tmp_path: Path) -> None:
    from batchroute.errors import RouterError
    from batchroute.routers import classifier as rt
    from batchroute.stages.route import check_compatible
    from batchroute.training import calibrate

    labels = tmp_path / "labels.parquet"
    pl.DataFrame([{"request_id": f"q{i}", "prompt": ("easy " if i % 2 else "hard ") + str(i),
                   "model": m, "score": float(m == STRONG or i % 2)}
                  for i in range(40) for m in (CHEAP, STRONG)]).write_parquet(labels)
    data, out = calibrate.calibrate(tiny_router(policy="success"), str(labels),
                                    calibrate.CalibrationTarget.parse("strong-share=0.5"),
                                    policy="relative")
    assert out["policy"] == "relative"
    info = rt.inspect(data)
    assert info.metadata["policy"] == "relative"
    check_compatible(info, _spec(policy="relative"), path="r.onnx")
    with pytest.raises(RouterError, match=r"set for router policy 'relative' but the job uses "
                                          r"'success'.*give \[router.thresholds\] for "
                                          r"cheap-model"):
        check_compatible(info, _spec(), path="r.onnx")
    # A job that sets every threshold below the strongest model takes none from the file, and
    # neither does one whose spend cap assigns the models.
    check_compatible(info, _spec(thresholds={CHEAP: 0.7}), path="r.onnx")
    check_compatible(info, _spec(capped=True), path="r.onnx")
    doc = job_doc()
    doc["router"] |= {"policy": "success", "budget_usd": 5.0}
    assert RouteSpec.from_job(config.parse(doc)).capped
    # A file that records no policy was trained when train's thresholds were for "success".
    old = rt.inspect(rt.build_graph(["easy"], np.zeros((2, 2), np.float32),
                                    np.zeros(2, np.float32), np.zeros(2, np.float32),
                                    [CHEAP, STRONG], {"version": "old-1", "thresholds":
                                                      '{"cheap-model": 0.6}'}))
    check_compatible(old, _spec(), path="old.onnx")
    with pytest.raises(RouterError, match="set for router policy 'success' but the job uses "
                                          "'relative'"):
        check_compatible(old, _spec(policy="relative"), path="old.onnx")
    doc = job_doc()
    doc["router"]["policy"] = "best"
    with pytest.raises(ConfigError, match=r"router\.policy: must be one of success, relative"):
        config.parse(doc)


# -- batchroute eval --router-config ----------------------------------------------------------

def test_eval_runs_a_router_config_through_the_route_stage(tmp_path: Path) -> None:
    from batchroute.training import evaluate

    # "easy" prompts: both succeed; "hard": only the strong model; "plain": both fail.
    kinds = ["easy", "hard", "plain"] * 20
    labels = tmp_path / "labels.parquet"
    pl.DataFrame([{"request_id": f"q{i}", "prompt": f"{k} question {i}", "model": m,
                   "score": float(k == "easy" or (k == "hard" and m == STRONG))}
                  for i, k in enumerate(kinds) for m in (CHEAP, STRONG)]).write_parquet(labels)
    router = tmp_path / "r.onnx"
    router.write_bytes(tiny_router())
    doc = job_doc(router_path=str(router))
    doc["router"]["rules"] = []
    job = config.parse(doc)
    r = evaluate.evaluate_config(job, str(labels), weak=CHEAP, strong=STRONG, split="all")
    # tiny_router: cheap easy 0.98, hard 0.02, plain 0.5, strong 0.88: relative success
    # easy 1, hard 0.14, plain 0.62 (clears the default 0.5)
    assert r["operating_point"]["strong_share"] == pytest.approx(1 / 3)
    assert r["operating_point"]["quality"] == pytest.approx(2 / 3)  # every prompt it can win
    assert r["operating_point"]["decided_by"] == {"classifier": 60}
    # Three score levels give the curve (0, 1/3) (1/3, 2/3) (2/3, 2/3) (1, 2/3): by hand,
    # (area 11/18 - weak 1/3) / (strong 2/3 - weak 1/3) = 5/6.
    assert r["apgr"] == pytest.approx(5 / 6)
    assert r["rows"] == 60 and r["routing_usd_per_million_prompts"] == 0
    doc["router"]["rules"] = [{"name": "all-plain", "regex": "plain", "model": "mid-model"}]
    with pytest.raises(ConfigError, match="sends rows to \\['mid-model'\\]"):
        evaluate.evaluate_config(config.parse(doc), str(labels), weak=CHEAP, strong=STRONG,
                                 split="all")


def test_eval_scores_a_cascade_inside_the_band_of_the_stage_before() -> None:
    from batchroute.training import evaluate

    spec = _llm_spec(stages=("rules", "classifier", "llm"),
                     classifier=config.ClassifierConfig(uncertain=(0.4, 0.6)))
    scores = [[{"model": CHEAP, "score": p}, {"model": STRONG, "score": 0.9}]
              for p in (0.9, 0.1, 0.5, 0.5, 0.5)]
    routed = pa.table({
        "model": [CHEAP, STRONG, CHEAP, STRONG, STRONG],
        "route_stage": ["classifier", "classifier", "llm", "llm", "rules"],
        "router_scores": pa.array(scores, pa.list_(schemas.ROUTER_SCORE)),
        "llm_label": [None, None, "easy", "hard", None]})
    out = evaluate.config_scores(routed, spec, weak=CHEAP, strong=STRONG)
    # classifier rows: 1 - P(cheap); llm rows: the label's rank mapped into the band on
    # 1 - P(cheap), [0.4, 0.6]; a rule's row: 1 when it went to the strong model.
    np.testing.assert_allclose(out, [0.1, 0.9, 0.4, 0.6, 1.0], rtol=1e-6)


def test_memory_add_builds_a_large_banks_index_once_for_the_routing_actors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bank_tools, "ANN_MIN_ROWS", 100)
    rows = [(f"prompt number {i} about topic {i % 7}", {CHEAP: float(i % 2)})
            for i in range(150)]
    path = _bank(tmp_path, rows)
    index = tmp_path / "bank.parquet.ivf"
    assert index.exists() and (tmp_path / "bank.parquet.ivf.stamp").exists()
    built = index.stat().st_mtime_ns
    # Opening the bank reads that index (its stamp matches the bank file), it does not build.
    loaded = memory.ann_index(memory.Bank.read(path), path, "ivf")
    assert loaded.ntotal == 150 and index.stat().st_mtime_ns == built
    # The job's [router.similarity] nprobe is what the routing stage searches with.
    nb = memory.Neighbours.open(SimilarityConfig(bank=path, index="ivf", nprobe=3), [CHEAP],
                                embedder=EMB)
    assert isinstance(nb.ann, IvfIndex) and nb.ann.nprobe == 3
