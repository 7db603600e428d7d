"""An embedding-featurised router file (``train --features embed``): equal to the training-time
model, and usable wherever a words router is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute.errors import RouterError
from batchroute.routers import classifier as rt
from batchroute.routers import embed
from batchroute.training import train

CHEAP, STRONG = "cheap", "strong"
TOPICS = {
    # The cheap model answers trivia about places and fails arithmetic; the strong one
    # answers both, failing now and then.
    "geo": ["What is the capital of {}?", "Which river flows through {}?",
            "On which continent is {} located?", "What language is spoken in {}?"],
    "math": ["Compute the integral of x^{} from 0 to 1.", "Solve {}x + 7 = 22 for x.",
             "What is the derivative of sin(x)^{}?", "Factor the polynomial x^2 - {}."],
}
FILL = ["France", "Peru", "Kenya", "Japan", "Norway", "3", "5", "9", "12", "16"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(400):
        topic = "geo" if i % 2 else "math"
        prompt = rng.choice(TOPICS[topic]).format(rng.choice(FILL)) + f" (#{i})"
        cheap_ok = (topic == "geo") != (rng.random() < 0.1)
        strong_ok = rng.random() > 0.1
        rows += [(f"q{i}", prompt, CHEAP, float(cheap_ok)),
                 (f"q{i}", prompt, STRONG, float(strong_ok))]
    ids, prompts, models, scores = zip(*rows, strict=True)
    path = tmp_path_factory.mktemp("labels") / "labels.parquet"
    pq.write_table(pa.table({"request_id": ids, "prompt": prompts, "model": models,
                             "score": scores}), path)
    return path


@pytest.fixture(scope="module")
def router_file(labels: Path) -> Path:
    out = labels.parent / "embed.onnx"
    train.train(str(labels), str(out), features="embed")
    return out


@pytest.fixture(scope="module")
def reference(labels: Path, router_file: Path) -> dict[str, object]:
    """The training-time model rebuilt independently: embeddings of the training rows, then one
    scikit-learn logistic regression per model at the C the file records."""
    from sklearn.linear_model import LogisticRegression

    info = rt.inspect(router_file.read_bytes())
    metrics = json.loads(info.metadata["metrics"])
    table, _ = train.wide(train.read_labels(str(labels)), info.models)
    keep = ~train.is_holdout(table["request_id"].to_list())
    embedder = embed.Embedder.load()
    # All rows in one call, as training embeds them: the same batches give bit-equal
    # embeddings, so the refit lands on the same coefficients.
    x = embedder.embed([p[: rt.MAX_CHARS] for p in table["prompt"].to_list()])[keep]
    heads = {m: LogisticRegression(C=metrics[m]["C"], tol=train.SOLVER_TOL,
                                   max_iter=train.SOLVER_MAX_ITER).fit(
        x, (table[m].to_numpy()[keep] >= 0.5).astype(int)) for m in info.models}
    return {"embedder": embedder, "heads": heads, "models": info.models}


def _reference_scores(ref: dict[str, object], texts: list[str | None]) -> np.ndarray:
    embedder: embed.Embedder = ref["embedder"]  # type: ignore[assignment]
    heads = ref["heads"]
    clipped = [(t or "")[: rt.MAX_CHARS] for t in texts]
    x = embedder.embed(clipped)
    return np.column_stack([heads[m].predict_proba(x)[:, 1]  # type: ignore[index]
                            for m in ref["models"]])  # type: ignore[attr-defined]


LONG = "Compute the integral of x^3 from 0 to 1, showing every step. " * 3_000


def test_file_metadata_and_training_quality(router_file: Path) -> None:
    data = router_file.read_bytes()
    info = rt.inspect(data)
    assert info.models == (CHEAP, STRONG)
    assert info.version.startswith(train.EMBED_KIND)
    feats = json.loads(info.metadata["featurisation"])
    assert feats["kind"] == train.EMBED_KIND and feats["max_tokens"] == embed.MAX_TOKENS
    assert feats["encoder"] == "all-MiniLM-L6-v2"
    assert int(info.metadata["max_tokens"]) == embed.MAX_TOKENS
    assert json.loads(info.metadata["tokenizer_json"])["model"]["type"] == "WordPiece"
    assert {"training_data_sha256", "thresholds", "split", "cut"} <= set(info.metadata)
    assert 0 < info.thresholds[CHEAP] < 1 and info.thresholds[STRONG] == 0.0
    assert json.loads(info.metadata["metrics"])[CHEAP]["holdout_auc"] > 0.8


def test_fixed_prompts_equal_the_training_time_model(router_file: Path,
                                                     reference: dict[str, object]) -> None:
    texts: list[str | None] = ["", None, "What is the capital of Peru?", "ünïcödé 東京 🚀",
                               LONG, "Solve 3x + 7 = 22 for x.", "\u200b\t\n", "x" * 3000]
    got = rt.Router(router_file.read_bytes()).score(pa.array(texts, pa.string()))
    assert got.dtype == np.float32 and got.shape == (len(texts), 2)
    np.testing.assert_allclose(got, _reference_scores(reference, texts), atol=1e-5)
    np.testing.assert_array_equal(got[1], got[0])  # null scores as empty
    # It learned the topics: geography is likelier for the cheap model than arithmetic.
    assert got[2, 0] > got[5, 0] + 0.3


@settings(max_examples=20, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=3000), min_size=1,
                max_size=8))
def test_random_prompts_equal_the_training_time_model(router_file: Path,
                                                      reference: dict[str, object],
                                                      texts: list[str]) -> None:
    got = rt.Router(router_file.read_bytes(), embed_batch=3).score(pa.array(texts, pa.string()))
    np.testing.assert_allclose(got, _reference_scores(reference, list(texts)), atol=1e-5)


def test_a_wrong_export_is_caught_at_training_time(labels: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    build = rt.build_embed_graph

    def off_by_a_bit(encoder: bytes, w: np.ndarray, b: np.ndarray, *args: object) -> bytes:
        return build(encoder, w, b + 1e-3, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(rt, "build_embed_graph", off_by_a_bit)
    with pytest.raises(RouterError, match="disagrees with the trained model"):
        train.train(str(labels), str(tmp_path / "r.onnx"), features="embed")
    assert not (tmp_path / "r.onnx").exists()


def test_score_command_and_route_stage_take_either_kind(router_file: Path, labels: Path,
                                                        tmp_path: Path) -> None:
    from batchroute import cli

    out = tmp_path / "scores.parquet"
    assert cli.main(["score", "--input", str(labels), "--router", str(router_file),
                     "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["request_id", CHEAP, STRONG]
    assert t.num_rows == 400
    first = pq.read_table(labels).slice(0, 1)
    expected = rt.Router(router_file.read_bytes()).score(first.column("prompt"))
    assert t.column(CHEAP)[0].as_py() == pytest.approx(float(expected[0, 0]), abs=1e-6)

    # The job's route stage: geography goes to the cheap model, arithmetic to the strong one.
    from batchroute import config, schemas
    from batchroute.stages.route import RouteSpec, RouteStage
    from tests.helpers import job_doc, model_table

    doc = job_doc()
    doc["models"] = {name: model_table(name, p, p * 4, base_url="http://127.0.0.1:1/v1")
                     for name, p in ((CHEAP, 0.1), (STRONG, 10.0))}
    doc["router"] = {"thresholds": {CHEAP: 0.5}}
    doc["job"]["reference_model"] = STRONG
    stage = RouteStage(router_file.read_bytes(), RouteSpec.from_job(config.parse(doc)))
    prompts = {"geo": "What is the capital of Norway?", "math": "Solve 5x + 7 = 22 for x."}
    cols = {"request_id": list(prompts), "row": [0, 1], "prompt": list(prompts.values())}
    batch = pa.table({name: pa.array(cols[name], schemas.REQUESTS.field(name).type)
                      if name in cols else pa.nulls(2, schemas.REQUESTS.field(name).type)
                      for name in schemas.REQUESTS.names}, schema=schemas.REQUESTS)
    routed = stage(batch)
    assert dict(zip(routed.column("request_id").to_pylist(), routed.column("model").to_pylist(),
                    strict=True)) == {"geo": CHEAP, "math": STRONG}


def test_bad_tokenizer_metadata_is_refused(router_file: Path) -> None:
    bad = rt.with_metadata(router_file.read_bytes(), {"tokenizer_json": "{not json"})
    with pytest.raises(RouterError, match="bad tokenizer metadata"):
        rt.Router(bad)


def test_unknown_featurisation_is_refused(labels: Path, tmp_path: Path) -> None:
    from batchroute.errors import SchemaError

    with pytest.raises(SchemaError, match="--features must be one of"):
        train.train(str(labels), str(tmp_path / "r.onnx"), features="tfidf")


def test_calibrate_and_eval_take_an_embedding_router(router_file: Path, labels: Path) -> None:
    from batchroute.training import calibrate, evaluate

    data, summary = calibrate.calibrate(router_file.read_bytes(), str(labels),
                                        calibrate.CalibrationTarget.parse("strong-share=0.5"))
    info = rt.inspect(data)
    assert info.version.startswith(train.EMBED_KIND) and "+cal-" in info.version
    assert info.thresholds[CHEAP] == summary["thresholds"][CHEAP]
    texts = pa.array(["What is the capital of Japan?", ""])
    np.testing.assert_array_equal(rt.Router(data).score(texts),
                                  rt.Router(router_file.read_bytes()).score(texts))
    report = evaluate.evaluate_router(data, str(labels), weak=CHEAP, strong=STRONG)
    assert report["router"]["weak-failure"]["auc"] > 0.8
