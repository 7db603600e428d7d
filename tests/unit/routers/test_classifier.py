"""The router file: real ONNX, metadata that travels with it, serving equal to training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from batchroute import config
from batchroute.errors import RouterError, SchemaError
from batchroute.routers import classifier as rt
from batchroute.training import train
from tests.helpers import MMLU

BUNDLED = rt.read_bytes(config.BUNDLED_ROUTER)


def _graph_tokens(texts: list[str]) -> list[list[str]]:
    """The graph's own tokenizer subgraph, run by onnxruntime."""
    got = rt.session(rt.tokenizer_model()).run(None, {"prompt": rt.clip(pa.array(texts))})[0]
    return [[str(t) for t in row if t] for row in got]


def _reference_scores(model_bytes: bytes, texts: list[str]) -> np.ndarray:
    """The same function in plain Python: tokens from the graph's tokenizer, weights from its
    initializers, vocabulary from its LabelEncoder."""
    model = onnx.load_from_string(model_bytes)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    enc = next(n for n in model.graph.node if n.op_type == "LabelEncoder")
    keys = next(a.strings for a in enc.attribute if a.name == "keys_strings")
    vocab = {k.decode(): i for i, k in enumerate(keys)}
    unk = len(vocab)
    out = []
    for toks in _graph_tokens(texts):
        ids = [vocab.get(str(t), unk) for t in toks]
        n = len(ids)
        s = init["W"][ids].sum(axis=0) if ids else np.zeros(init["W"].shape[1])
        z = s / np.sqrt(max(n, 1)) + init["a"] * np.log1p(n) + init["b"]
        out.append(1 / (1 + np.exp(-z)))
    return np.array(out)


# The two characters the graph lowercases to ASCII and the served tokenizer does not (see
# batchroute.routers.words) are left out of the random texts.
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\u0130\u212a"),
                max_size=300)
mixed = st.text(alphabet=st.sampled_from([*"aZz09 _-.,\n\té€ß東🚀"]), max_size=300)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(texts, mixed), min_size=1, max_size=20))
def test_served_and_onnx_scores_equal_the_reference_on_random_prompts(prompts: list[str]) -> None:
    arr = pa.array(prompts, pa.string())
    want = _reference_scores(BUNDLED, prompts)
    np.testing.assert_allclose(rt.Router(BUNDLED).score(arr), want, atol=1e-5)
    np.testing.assert_allclose(rt.Router(BUNDLED, engine="onnxruntime").score(arr), want,
                               atol=1e-5)


def test_served_scores_equal_onnxruntime_on_real_prompts() -> None:
    """The numpy words path and onnxruntime on the same file, over every MMLU prompt and the
    bench's prompts (some longer than MAX_CHARS), nulls and empties."""
    from batchroute.devtools.bench.route import prompts

    served, graph = rt.Router(BUNDLED), rt.Router(BUNDLED, engine="onnxruntime")
    assert served.words is not None and graph.words is None
    mmlu = pq.read_table(MMLU, columns=["prompt"]).column("prompt").unique()
    for arr in (mmlu, prompts(500, 3000)["prompt"], pa.array([None, "", "...", "Hi"])):
        assert float(np.abs(served.score(arr) - graph.score(arr)).max()) < 1e-5


def test_a_graph_of_another_form_runs_in_onnxruntime() -> None:
    model = onnx.load_from_string(BUNDLED)
    tok = next(n for n in model.graph.node if n.op_type == "Tokenizer")
    next(a for a in tok.attribute if a.name == "tokenexp").s = b"[a-z]+"  # digits split words
    other = model.SerializeToString()
    assert rt.WordsModel.from_graph(other) is None
    router = rt.Router(other)
    assert router.words is None
    arr = pa.array(["route 42 prompts", "x1y2"])
    np.testing.assert_array_equal(router.score(arr),
                                  rt.Router(other, engine="onnxruntime").score(arr))
    assert not np.allclose(router.score(arr), rt.Router(BUNDLED).score(arr))
    with pytest.raises(ValueError, match="engine"):
        rt.Router(BUNDLED, engine="torch")


def test_unicode_empty_null_and_very_long_prompts() -> None:
    long_text = "Explain the proof of the theorem in detail. " * 20_000
    prompts = ["", "ünïcödé 東京 🚀 résumé", long_text, "Answer: A. B. C. D."]
    r = rt.Router(BUNDLED)
    got = r.score(pa.array([*prompts, None], pa.string()))
    assert got.shape == (5, 2)
    assert np.all((got > 0) & (got < 1))
    np.testing.assert_allclose(got[:4], _reference_scores(BUNDLED, prompts), atol=1e-5)
    np.testing.assert_allclose(got[4], got[0])  # null scores like an empty prompt
    # Only the first MAX_CHARS characters count, so a huge prompt costs like a normal one.
    np.testing.assert_allclose(r.score(pa.array([long_text[: rt.MAX_CHARS]])), got[2:3],
                               atol=1e-6)


def test_bundled_router_metadata() -> None:
    info = rt.inspect(BUNDLED)
    assert set(info.models) == {"mixtral-8x7b-instruct", "gpt-4-1106-preview"}
    assert info.version.startswith(train.ROUTER_KIND)
    assert 0 < info.thresholds["mixtral-8x7b-instruct"] < 1
    metrics = json.loads(info.metadata["metrics"])
    # Measured on held-out questions: a real classifier, well above chance.
    assert metrics["mixtral-8x7b-instruct"]["holdout_auc"] > 0.65
    assert json.loads(info.metadata["featurisation"])["max_chars"] == rt.MAX_CHARS
    assert len(BUNDLED) < 20 * 2**20
    # Its default thresholds are for the default policy, and it says so.
    assert info.metadata["policy"] == config.DEFAULT_POLICY == "relative"
    assert info.version.endswith("-relative")


def test_default_thresholds_are_the_median_relative_success_on_training_rows(
        tmp_path: Path) -> None:
    from batchroute.stages.route import relative

    rows = [(f"q{i}", f"{('easy', 'hard', 'odd')[i % 3]} question {i % 7}", m,
             float(i % 3 == 0 or (m == "big" and i % 3 == 1) or (i % 3 == 2 and i % 5 == 0)))
            for i in range(300) for m in ("small", "big")]
    ids, prompts, models, scores = zip(*rows, strict=True)
    pq.write_table(pa.table({"request_id": ids, "prompt": prompts, "model": models,
                             "score": scores}), tmp_path / "labels.parquet")
    report = train.train(str(tmp_path / "labels.parquet"), str(tmp_path / "r.onnx"))
    router = rt.Router((tmp_path / "r.onnx").read_bytes())
    assert router.info.metadata["policy"] == config.DEFAULT_POLICY
    assert router.info.version.endswith(f"-{config.DEFAULT_POLICY}")
    kept = sorted({(r, p) for r, p, _, _ in rows if not train.is_holdout([r])[0]})
    probs = router.score(pa.array([p for _, p in kept]))
    cols = [router.info.models.index("small"), router.info.models.index("big")]
    want = float(np.median(relative(probs[:, cols].astype(np.float64))[:, 0]))
    assert report.thresholds == {"big": 0.0, "small": pytest.approx(want, abs=1e-6)}
    assert router.info.thresholds["small"] == pytest.approx(want, abs=1e-6)


def test_corrupt_or_foreign_router_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RouterError, match="not a valid ONNX model"):
        rt.Router(b"definitely not onnx")
    with pytest.raises(RouterError, match="cannot be read"):
        rt.read_bytes(str(tmp_path / "missing.onnx"))
    foreign = onnx.load_from_string(BUNDLED)
    del foreign.metadata_props[:]
    with pytest.raises(RouterError, match="missing or bad batchroute metadata"):
        rt.inspect(foreign.SerializeToString())


# Float training differs in its last bits between CPUs and BLAS kernels, so a rebuild on
# another machine is compared on what matters, within these tolerances, never byte for byte.
WEIGHT_ATOL = 1e-4  # every float tensor of the graph (weights, biases, vocabulary weights)
SCORE_ATOL = 1e-4  # predicted success on fixed prompts
THRESHOLD_ATOL = 1e-4


@pytest.mark.slow
def test_training_reproduces_the_bundled_router(tmp_path: Path) -> None:
    """`make router` on this machine rebuilds the bundled router: the same version (training
    data), models, vocabulary and featurisation; weights, default thresholds and scores on
    fixed prompts equal within the tolerances above."""
    out = tmp_path / "r.onnx"
    report = train.train(str(MMLU), str(out))
    assert report.holdout_rows > 1500
    built, bundled = rt.inspect(out.read_bytes()), rt.inspect(BUNDLED)
    stale = "bundled router is stale: run `make router`"
    assert (built.version, built.models) == (bundled.version, bundled.models), stale
    assert built.thresholds.keys() == bundled.thresholds.keys()
    for m, t in bundled.thresholds.items():
        assert built.thresholds[m] == pytest.approx(t, abs=THRESHOLD_ATOL), (m, stale)
    mine = {i.name: numpy_helper.to_array(i)
            for i in onnx.load_from_string(out.read_bytes()).graph.initializer}
    theirs = {i.name: numpy_helper.to_array(i)
              for i in onnx.load_from_string(BUNDLED).graph.initializer}
    assert mine.keys() == theirs.keys(), stale
    for name, want in theirs.items():
        got = mine[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=0, atol=WEIGHT_ATOL, err_msg=name)
        else:
            assert np.array_equal(got, want), (name, stale)
    fixed = pq.read_table(MMLU, columns=["prompt"]).column("prompt").unique().to_pylist()[:500]
    prompts = pa.array([*fixed, "", "def f(x): return x", "ünïcode ✓"])
    np.testing.assert_allclose(rt.Router(out.read_bytes()).score(prompts),
                               rt.Router(BUNDLED).score(prompts), rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize(("table", "needle"), [
    (pa.table({"request_id": ["a"], "prompt": ["p"], "model": ["m"]}), "missing column 'score'"),
    (pa.table({"request_id": ["a"], "prompt": ["p"], "model": ["m"], "score": [1.5]}),
     "must lie in \\[0, 1\\]"),
    (pa.table({"request_id": ["a"], "prompt": ["p"], "model": ["m"], "score": [None]},
              schema=pa.schema([("request_id", pa.string()), ("prompt", pa.string()),
                                ("model", pa.string()), ("score", pa.float64())])),
     "'score' has 1 null"),
    (pa.table({"request_id": ["a", "a"], "prompt": ["p", "p"], "model": ["m", "m"],
               "score": [1.0, 0.0]}), "more than one score"),
    (pa.table({"request_id": ["a"], "prompt": ["p"], "model": ["m"], "score": [1.0]}),
     "at least two models"),
])
def test_bad_label_files_are_refused(tmp_path: Path, table: pa.Table, needle: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "labels.parquet")
    with pytest.raises(SchemaError, match=needle):
        train.train(str(tmp_path / "labels.parquet"), str(tmp_path / "r.onnx"))
    assert not (tmp_path / "r.onnx").exists()


def test_score_file_on_labels_and_prompts(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from batchroute import cli

    pq.write_table(pa.table({
        "request_id": ["a", "a", "b", "c"], "prompt": ["What is 2+2?", "What is 2+2?", "", "Hi"],
        "model": ["m1", "m2", "m1", "m1"], "score": [1.0, 0.0, 1.0, 1.0]}),
        tmp_path / "labels.parquet")
    out = tmp_path / "scores.parquet"
    assert cli.main(["score", "--input", str(tmp_path / "labels.parquet"),
                     "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["request_id", *rt.inspect(BUNDLED).models]
    assert t.column("request_id").to_pylist() == ["a", "b", "c"]
    expected = rt.Router(BUNDLED).score(pa.array(["What is 2+2?", "Hi"]))
    mixtral = t.column("mixtral-8x7b-instruct").to_pylist()
    col = rt.inspect(BUNDLED).models.index("mixtral-8x7b-instruct")
    assert mixtral[1] is None  # an empty prompt has no score
    assert mixtral[0] == pytest.approx(float(expected[0, col]), abs=1e-6)
    assert mixtral[2] == pytest.approx(float(expected[1, col]), abs=1e-6)


def test_label_checks_follow_the_declared_labels_schema() -> None:
    from batchroute import schemas

    assert list(train.LABEL_COLUMNS) == schemas.required_names(schemas.LABELS)


def test_training_and_policy_for_three_models_on_synthetic_labels(tmp_path: Path) -> None:
    """small answers "easy" prompts, medium also "medium" ones, large everything: a router
    trained on that routes each kind to the cheapest model that can answer it."""
    import numpy as np
    import pyarrow.parquet as pq

    from batchroute import config
    from batchroute.stages.route import RouteSpec, RouteStage
    from tests.helpers import job_doc, model_table

    rng = np.random.default_rng(0)
    kinds = ("easy", "medium", "hard")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = []
    for i in range(3000):
        kind = kinds[i % 3]
        prompt = f"{kind} question " + " ".join(rng.choice(words, 4))
        ok = {"small": kind == "easy", "medium": kind != "hard", "large": True}
        rows += [(f"q{i}", prompt, m, float(v if rng.random() > 0.05 else not v))
                 for m, v in ok.items()]
    ids, prompts, models, scores = zip(*rows, strict=True)
    pq.write_table(pa.table({"request_id": ids, "prompt": prompts, "model": models,
                             "score": scores}), tmp_path / "labels.parquet")
    report = train.train(str(tmp_path / "labels.parquet"), str(tmp_path / "r.onnx"))
    assert report.models == ("large", "medium", "small")
    assert report.thresholds["large"] == 0.0  # the strongest is the fallback
    assert all(report.metrics[m]["holdout_auc"] > 0.9 for m in ("medium", "small"))

    doc = job_doc()
    doc["models"] = {name: model_table(name, p, p * 4, base_url="http://127.0.0.1:1/v1")
                     for name, p in (("small", 0.1), ("medium", 1.0), ("large", 10.0))}
    doc["router"] = {"thresholds": {"small": 0.5, "medium": 0.5}}
    doc["job"]["reference_model"] = "large"
    stage = RouteStage((tmp_path / "r.onnx").read_bytes(),
                       RouteSpec.from_job(config.parse(doc)))
    from batchroute import schemas

    batch = pa.table({"request_id": list(kinds), "row": [0, 1, 2],
                      "prompt": [f"{k} question alpha beta" for k in kinds]},
                     ).join(pa.table({"request_id": list(kinds)}), "request_id")
    batch = pa.table({name: batch.column(name) if name in batch.column_names
                      else pa.nulls(3, schemas.REQUESTS.field(name).type)
                      for name in schemas.REQUESTS.names}, schema=schemas.REQUESTS)
    routed = stage(batch)
    by_id = dict(zip(routed.column("request_id").to_pylist(),
                     routed.column("model").to_pylist(), strict=True))
    assert by_id == {"easy": "small", "medium": "medium", "hard": "large"}


def test_a_wrong_words_export_is_caught_at_training_time(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [(f"q{i}", f"{'easy' if i % 2 else 'hard'} question {i % 7}", m,
             float(i % 2 == 1 or (m == "big" and i % 3 > 0))) for i in range(200)
            for m in ("small", "big")]
    ids, prompts, models, scores = zip(*rows, strict=True)
    pq.write_table(pa.table({"request_id": ids, "prompt": prompts, "model": models,
                             "score": scores}), tmp_path / "labels.parquet")
    build = rt.build_graph

    def off_by_a_bit(vocab: list[str], w: np.ndarray, a: np.ndarray, b: np.ndarray,
                     *args: object) -> bytes:
        return build(vocab, w, a, b + 1e-3, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(rt, "build_graph", off_by_a_bit)
    with pytest.raises(RouterError, match=r"\(served\) disagrees with the trained model"):
        train.train(str(tmp_path / "labels.parquet"), str(tmp_path / "r.onnx"))
    assert not (tmp_path / "r.onnx").exists()
