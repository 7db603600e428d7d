"""The router file: an ONNX graph from raw prompt strings to one success probability per model.

The text featurisation lives inside the graph, so the file alone defines the router:

    prompt ─► lowercase ─► tokens [a-z0-9]+ ─► vocabulary ids ─► Σ weights / √n + a·log1p(n) + b ─► sigmoid
                                                  (unknown words share one learned weight)

Everything the job needs to trust the file travels in its metadata: the model names in output
order, default thresholds, version, a hash of the training data, featurisation settings and the
training metrics. :func:`build_graph` is the single place the graph is written.

Serving does not run that graph through onnxruntime: its string ops (StringNormalizer and the
regex Tokenizer) were 90% of its time. :class:`WordsModel` reads the vocabulary (the
LabelEncoder's keys) and the weights (the initializers) out of the graph once at load, and
:meth:`Router.score` computes the same function in numpy: the tokens of
:func:`batchroute.routers.words.tokens`, vocabulary ids from a :class:`~batchroute.routers.words.Lookup`,
one gather of the weight rows and a segment sum per row. Its scores equal onnxruntime's on the
same file to float rounding (the tests hold them within 1e-5), except on the two characters
:mod:`batchroute.routers.words` documents. A file whose graph is not exactly the one
:func:`build_graph` writes is run by onnxruntime as before. Training computes its features with
the same :func:`~batchroute.routers.words.tokens`, so serving equals training.

A second kind of file (``batchroute train --features embed``, written by
:func:`build_embed_graph`) is the MiniLM sentence encoder of :mod:`batchroute.routers.embed` followed
by one logistic head per model:

    token ids, attention mask ─► encoder ─► unit embedding [N, 384] ─► · W + b ─► sigmoid

It takes token ids, so the tokenizer's exact setup travels in its metadata (``tokenizer_json``
and ``max_tokens``); :class:`Router` tokenises with it and callers cannot tell the two kinds
apart. Such a file is about 90 MB.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchroute.errors import RouterError
from batchroute.routers import words
from batchroute.routers.words import MAX_CHARS

__all__ = ["MAX_CHARS"]  # its home is batchroute.routers.words; re-exported for old callers

TOKEN_PATTERN = "[a-z0-9]+"
OPSETS = {"": 18, "ai.onnx.ml": 3, "com.microsoft": 1}
# onnxruntime's StringNormalizer defaults to en_US.UTF-8, which minimal images lack.
LOCALE = "C.UTF-8"
PAD = ""


def clip(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """What the graph sees: the first MAX_CHARS characters, null as empty, as an object array."""
    import pyarrow.compute as pc

    clipped = pc.utf8_slice_codeunits(pc.fill_null(texts, ""), 0, MAX_CHARS)
    return np.asarray(clipped.to_numpy(zero_copy_only=False), dtype=object)


# The graph build_graph writes, node by node: WordsModel serves only a file of exactly this form.
WORDS_OPS = ("StringNormalizer", "Tokenizer", "LabelEncoder", "Gather", "ReduceSum", "Gather",
             "ReduceSum", "Max", "Sqrt", "Div", "Add", "Log", "Mul", "Add", "Add", "Sigmoid")


def _tokenizer_nodes(input_name: str, output_name: str) -> list[Any]:
    from onnx import helper as h

    return [
        h.make_node("StringNormalizer", [input_name], ["_lower"], case_change_action="LOWER",
                    is_case_sensitive=1, locale=LOCALE),
        h.make_node("Tokenizer", ["_lower"], [output_name], domain="com.microsoft", mark=0,
                    mincharnum=1, pad_value=PAD, tokenexp=TOKEN_PATTERN),
    ]


def tokenizer_model() -> bytes:
    """An ONNX model from prompt strings to padded token strings [N, K] (the router's own)."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as h

    graph = h.make_graph(
        _tokenizer_nodes("prompt", "tokens"), "batchroute-tokenizer",
        [h.make_tensor_value_info("prompt", TensorProto.STRING, [None])],
        [h.make_tensor_value_info("tokens", TensorProto.STRING, [None, None])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in OPSETS.items()])
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def build_graph(vocab: Sequence[str], token_weights: np.ndarray, length_weights: np.ndarray,
                bias: np.ndarray, models: Sequence[str], metadata: Mapping[str, str]) -> bytes:
    """Serialise a router. ``token_weights`` is [len(vocab) + 1, M]: one row per word, then
    one for unknown words. Outputs ``probs`` [N, M] in the order of ``models``."""
    from onnx import TensorProto
    from onnx import helper as h

    m = len(models)
    v = len(vocab)
    if token_weights.shape != (v + 1, m) or length_weights.shape != (m,) or bias.shape != (m,):
        raise RouterError("router weights do not match the vocabulary and model count")
    # Row 0 is the padding id and must contribute nothing.
    table = np.vstack([np.zeros((1, m), np.float32), token_weights.astype(np.float32)])
    ones = np.ones(v + 2, np.float32)
    ones[0] = 0.0
    init = [
        h.make_tensor("W", TensorProto.FLOAT, table.shape, table.ravel()),
        h.make_tensor("is_token", TensorProto.FLOAT, ones.shape, ones),
        h.make_tensor("a", TensorProto.FLOAT, [m], length_weights.astype(np.float32)),
        h.make_tensor("b", TensorProto.FLOAT, [m], bias.astype(np.float32)),
        h.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        h.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    nodes = [
        *_tokenizer_nodes("prompt", "tokens"),
        h.make_node("LabelEncoder", ["tokens"], ["ids"], domain="ai.onnx.ml",
                    keys_strings=[PAD, *vocab], values_int64s=list(range(v + 1)),
                    default_int64=v + 1),
        h.make_node("Gather", ["W", "ids"], ["w_tok"], axis=0),
        h.make_node("ReduceSum", ["w_tok", "axis1"], ["w_sum"], keepdims=0),
        h.make_node("Gather", ["is_token", "ids"], ["tok"], axis=0),
        h.make_node("ReduceSum", ["tok", "axis1"], ["n"], keepdims=1),
        h.make_node("Max", ["n", "one"], ["n1"]),
        h.make_node("Sqrt", ["n1"], ["sqrt_n"]),
        h.make_node("Div", ["w_sum", "sqrt_n"], ["w_norm"]),
        h.make_node("Add", ["n", "one"], ["n_plus1"]),
        h.make_node("Log", ["n_plus1"], ["log_n"]),
        h.make_node("Mul", ["log_n", "a"], ["w_len"]),
        h.make_node("Add", ["w_norm", "w_len"], ["z0"]),
        h.make_node("Add", ["z0", "b"], ["z"]),
        h.make_node("Sigmoid", ["z"], ["probs"]),
    ]
    graph = h.make_graph(
        nodes, "batchroute-router",
        [h.make_tensor_value_info("prompt", TensorProto.STRING, [None])],
        [h.make_tensor_value_info("probs", TensorProto.FLOAT, [None, m])], initializer=init)
    return _finish(h.make_model(
        graph, opset_imports=[h.make_opsetid(d, x) for d, x in OPSETS.items()],
        producer_name="batchroute"), models, metadata)


def _finish(model: Any, models: Sequence[str], metadata: Mapping[str, str]) -> bytes:
    """A router file: ``model`` with the metadata and model names set, checked, serialised."""
    import onnx

    del model.metadata_props[:]
    for k, val in {**metadata, "models": json.dumps(list(models))}.items():
        model.metadata_props.add(key=k, value=val)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def build_embed_graph(encoder: bytes, weights: np.ndarray, bias: np.ndarray,
                      models: Sequence[str], metadata: Mapping[str, str]) -> bytes:
    """Serialise an embedding router: ``encoder`` (an :mod:`batchroute.routers.embed` graph with
    output ``embeddings`` [N, D]) then ``probs = sigmoid(embeddings @ weights + bias)``, with
    ``weights`` [D, M] in the order of ``models``. ``metadata`` must carry ``tokenizer_json``
    and ``max_tokens``. Raises RouterError for mismatched shapes or missing keys."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    model = onnx.load_from_string(encoder)
    graph = model.graph
    (emb,) = [o for o in graph.output if o.name == "embeddings"] or [None]
    if emb is None:
        raise RouterError("encoder graph has no 'embeddings' output")
    dim = emb.type.tensor_type.shape.dim[1].dim_value
    m = len(models)
    if weights.shape != (dim, m) or bias.shape != (m,):
        raise RouterError(f"head weights {weights.shape} / bias {bias.shape} do not match "
                          f"embedding size {dim} and {m} models")
    for key in ("tokenizer_json", "max_tokens"):
        if key not in metadata:
            raise RouterError(f"an embedding router needs '{key}' in its metadata")
    graph.initializer.extend([
        numpy_helper.from_array(weights.astype(np.float32), "head.W"),
        numpy_helper.from_array(bias.astype(np.float32), "head.b")])
    graph.node.extend([
        h.make_node("MatMul", ["embeddings", "head.W"], ["head_mm"]),
        h.make_node("Add", ["head_mm", "head.b"], ["head_z"]),
        h.make_node("Sigmoid", ["head_z"], ["probs"]),
    ])
    del graph.output[:]
    graph.output.append(h.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", m]))
    graph.name = "batchroute-embed-router"
    return _finish(model, models, metadata)


def build_static_graph(table: np.ndarray, weights: np.ndarray, bias: np.ndarray,
                       models: Sequence[str], metadata: Mapping[str, str]) -> bytes:
    """Serialise a static-embedding router (``batchroute train --features static``): the word
    table of :mod:`batchroute.routers.static` (weights folded in) and one logistic head per
    model:

        ids [N, L] ─► Gather(table ‖ zero row) ─► Σ over L ─► L2 normalisation ─► · W + b
            ─► sigmoid ─► probs [N, M]

    ``ids`` index the words of ``metadata["static_words"]`` (a JSON list, one per table row);
    ``len(words)`` pads and stands for every unknown word. Raises RouterError for mismatched
    shapes or a missing key."""
    from onnx import TensorProto
    from onnx import helper as h

    v, dim = table.shape
    m = len(models)
    if weights.shape != (dim, m) or bias.shape != (m,):
        raise RouterError(f"head weights {weights.shape} / bias {bias.shape} do not match "
                          f"embedding size {dim} and {m} models")
    if len(json.loads(metadata.get("static_words", "[]"))) != v:
        raise RouterError("a static router needs 'static_words' in its metadata, one per "
                          "table row")
    full = np.vstack([table.astype(np.float32), np.zeros((1, dim), np.float32)])
    init = [
        h.make_tensor("table", TensorProto.FLOAT, full.shape, full.ravel()),
        h.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.astype(np.float32).ravel()),
        h.make_tensor("b", TensorProto.FLOAT, [m], bias.astype(np.float32)),
        h.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        h.make_tensor("tiny", TensorProto.FLOAT, [], [1e-12]),
    ]
    nodes = [
        h.make_node("Gather", ["table", "ids"], ["vec"], axis=0),
        h.make_node("ReduceSum", ["vec", "axis1"], ["total"], keepdims=0),
        h.make_node("ReduceL2", ["total", "axis1"], ["norm_raw"], keepdims=1),
        h.make_node("Max", ["norm_raw", "tiny"], ["norm"]),
        h.make_node("Div", ["total", "norm"], ["embedding"]),
        h.make_node("MatMul", ["embedding", "W"], ["z0"]),
        h.make_node("Add", ["z0", "b"], ["z"]),
        h.make_node("Sigmoid", ["z"], ["probs"]),
    ]
    graph = h.make_graph(
        nodes, "batchroute-static-router",
        [h.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
        [h.make_tensor_value_info("probs", TensorProto.FLOAT, [None, m])], initializer=init)
    return _finish(h.make_model(graph, opset_imports=[h.make_opsetid("", OPSETS[""])],
                                producer_name="batchroute"), models, metadata)


def padded_ids(ids: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
    """Flat token ids with row ``offsets`` [N + 1] as a [N, longest] matrix padded with
    ``pad`` (vectorised: one scatter)."""
    counts = np.diff(offsets)
    n = len(counts)
    out = np.full((n, max(int(counts.max(initial=0)), 1)), pad, np.int64)
    rows = np.repeat(np.arange(n), counts)
    out[rows, np.arange(len(ids)) - offsets[:-1][rows]] = ids
    return out


def with_metadata(model_bytes: bytes, updates: Mapping[str, str]) -> bytes:
    """The same router with metadata keys set or replaced (the graph is untouched)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(updates)
    del model.metadata_props[:]
    for k, val in meta.items():
        model.metadata_props.add(key=k, value=val)
    return bytes(model.SerializeToString())


def session(model_bytes: bytes) -> Any:
    """A single-threaded onnxruntime session: one per actor scales better than intra-op threads
    on small machines."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class WordsModel:
    """A words router's function, read out of its graph: ``weights`` [V + 1, M] holds one row
    per vocabulary word, then the unknown words' row; ``a`` and ``b`` are [M]."""

    vocab: tuple[str, ...]
    weights: np.ndarray
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def from_graph(cls, model_bytes: bytes) -> WordsModel | None:
        """The function of a graph :func:`build_graph` wrote, or None for any other graph."""
        import onnx
        from onnx import helper as h
        from onnx import numpy_helper

        graph = onnx.load_from_string(model_bytes).graph
        if tuple(n.op_type for n in graph.node) != WORDS_OPS:
            return None
        attrs = [{a.name: h.get_attribute_value(a) for a in n.attribute} for n in graph.node]
        norm, tok, enc = attrs[:3]
        init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        keys = [k.decode() for k in enc.get("keys_strings", [])]
        v = len(keys) - 1
        table = init.get("W")
        same_function = (
            norm.get("case_change_action") == b"LOWER"
            and tok.get("tokenexp") == TOKEN_PATTERN.encode() and tok.get("mark") == 0
            and tok.get("mincharnum") == 1 and keys[:1] == [PAD]
            and list(enc.get("values_int64s", [])) == list(range(v + 1))
            and enc.get("default_int64") == v + 1
            and table is not None and table.ndim == 2 and table.shape[0] == v + 2
            and not table[0].any() and {"a", "b", "is_token"} <= init.keys()
            and np.array_equal(init["is_token"], (np.arange(v + 2) > 0).astype(np.float32)))
        if not same_function:
            return None
        assert table is not None
        m = table.shape[1]
        a, b = init["a"].astype(np.float32), init["b"].astype(np.float32)
        if a.shape != (m,) or b.shape != (m,):
            return None
        return cls(tuple(keys[1:]), np.ascontiguousarray(table[1:], np.float32), a, b)

    def scorer(self) -> WordsScorer:
        return WordsScorer(self)


class WordsScorer:
    """:class:`WordsModel` in numpy: tokens, vocabulary ids, gathered weights, segment sums."""

    def __init__(self, model: WordsModel) -> None:
        self.model = model
        self._lookup = words.Lookup(model.vocab)

    def score(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Probabilities [N, M] (float32): sigmoid(Σ w / √max(n, 1) + a·log1p(n) + b)."""
        toks = words.tokens(texts, max_chars=MAX_CHARS)
        m = self.model
        rows, n_models = len(toks), m.weights.shape[1]
        n = toks.counts()
        sums = np.zeros((rows, n_models), np.float32)
        filled = n > 0
        if filled.any():
            gathered = np.take(m.weights, self._lookup.ids(toks.hashes), axis=0)
            # Only non-empty rows start a segment, so each runs exactly to its row's end.
            sums[filled] = np.add.reduceat(gathered, toks.offsets[:-1][filled], axis=0)
        nf = n.astype(np.float32)[:, None]
        z = sums / np.sqrt(np.maximum(nf, np.float32(1))) + np.log1p(nf) * m.a + m.b
        out: np.ndarray = (np.float32(1) / (np.float32(1) + np.exp(-z))).astype(np.float32)
        return out


@dataclass(frozen=True)
class RouterInfo:
    models: tuple[str, ...]
    thresholds: Mapping[str, float]
    version: str
    metadata: Mapping[str, str]


def read_bytes(path: str) -> bytes:
    """The router file's bytes. Raises RouterError when it is missing."""
    try:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (
            pafs.LocalFileSystem(), str(Path(path).resolve()))
        with fs.open_input_stream(p) as f:
            return bytes(f.read())
    except (FileNotFoundError, OSError) as exc:
        raise RouterError(f"router file {path}: cannot be read ({exc}); build the bundled one "
                          "with `make router` or train one with `batchroute train`") from None


def inspect(model_bytes: bytes, *, path: str = "<router>") -> RouterInfo:
    """Parse the router's metadata. Raises RouterError for a corrupt or foreign file."""
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:
        raise RouterError(f"router file {path}: not a valid ONNX model ({exc})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        models = tuple(json.loads(meta["models"]))
        thresholds = {str(k): float(v) for k, v in json.loads(meta["thresholds"]).items()}
        version = meta["version"]
    except (KeyError, ValueError, TypeError) as exc:
        raise RouterError(f"router file {path}: missing or bad batchroute metadata ({exc}); "
                          "was it made by `batchroute train`?") from None
    return RouterInfo(models, thresholds, version, meta)


class Router:
    """Loads a router once. A words router scores in numpy (:class:`WordsScorer`); any other
    file runs one onnxruntime call per batch (per ``embed_batch`` rows of similar length for
    an embedding router). ``engine="onnxruntime"`` runs a words router's graph itself."""

    def __init__(self, model_bytes: bytes, *, path: str = "<router>",
                 embed_batch: int = 64, engine: str = "auto") -> None:
        if engine not in ("auto", "onnxruntime"):
            raise ValueError(f"engine must be auto or onnxruntime, got {engine!r}")
        self.info = inspect(model_bytes, path=path)
        self._tokenizer: Any = None
        self._static: Any = None
        self._embed_batch = embed_batch
        self.words: WordsScorer | None = None  # set: a words router, scored in numpy
        if engine == "auto" and "tokenizer_json" not in self.info.metadata:
            found = WordsModel.from_graph(model_bytes)
            try:
                self.words = found.scorer() if found is not None else None
            except ValueError:  # two vocabulary words share a hash: onnxruntime serves it
                self.words = None
            if self.words is not None:
                return
        if "tokenizer_json" in self.info.metadata:
            from batchroute.routers import embed

            try:
                self._tokenizer = embed.load_tokenizer(self.info.metadata["tokenizer_json"],
                                                       int(self.info.metadata["max_tokens"]))
            except Exception as exc:
                raise RouterError(f"router file {path}: bad tokenizer metadata ({exc})") from None
        if "static_words" in self.info.metadata:
            from batchroute.routers import words

            try:
                self._static = words.Lookup(json.loads(self.info.metadata["static_words"]))
            except (ValueError, TypeError) as exc:
                raise RouterError(f"router file {path}: bad static_words metadata ({exc})"
                                  ) from None
        try:
            self._session = session(model_bytes)
        except Exception as exc:
            raise RouterError(f"router file {path}: onnxruntime cannot load it ({exc})") from None

    def score(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Probabilities [len(texts), M] in the order of ``info.models``; null texts score as
        empty ones, and only the first MAX_CHARS characters count."""
        if len(texts) == 0:
            return np.zeros((0, len(self.info.models)), np.float32)
        if self.words is not None:
            return self.words.score(texts)
        if self._tokenizer is not None:
            from batchroute.routers import embed

            return embed.run_sorted(self._session, self._tokenizer, clip(texts).tolist(),
                                    len(self.info.models), self._embed_batch)
        if self._static is not None:
            return self._score_static(texts)
        out: np.ndarray = self._session.run(None, {"prompt": clip(texts)})[0]
        return out

    STATIC_CHUNK = 1024

    def _score_static(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Words to ids in numpy, then the graph on ``STATIC_CHUNK`` rows at a time, each
        padded to its own longest row."""
        from batchroute.routers import words

        tok = words.tokens(texts)
        ids = self._static.ids(tok.hashes)
        pad = self._static.size
        out = np.empty((len(tok.offsets) - 1, len(self.info.models)), np.float32)
        for start in range(0, len(out), self.STATIC_CHUNK):
            off = tok.offsets[start:start + self.STATIC_CHUNK + 1]
            chunk = padded_ids(ids[off[0]:off[-1]], off - off[0], pad)
            out[start:start + len(off) - 1] = self._session.run(None, {"ids": chunk})[0]
        return out


def score_file(model_bytes: bytes, input_uri: str, out: str, *, batch_rows: int = 8192) -> int:
    """Write ``request_id`` plus one float column per router model (named after the model:
    its predicted probability of success) for every distinct request_id in ``input_uri``.

    Works on prompts files and on long-form label files (one row per request and model: the
    first row of each request_id is scored). Rows without a usable prompt get null scores.
    Streams batch by batch; returns the number of rows written. Raises SchemaError for a bad
    input and RouterError for a bad router.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from batchroute.stages import source

    router = Router(model_bytes)
    data = source.open_input(input_uri)
    names = router.info.models
    schema = pa.schema([("request_id", pa.string())] + [(m, pa.float32()) for m in names])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in source.read_requests(data, batch_rows):
            reason = batch.column("reject_reason")
            repeat = pc.fill_null(pc.starts_with(reason, "duplicate request_id"), False)
            batch = batch.filter(pc.invert(repeat))
            usable = pc.is_null(batch.column("reject_reason"))
            scores = router.score(source.request_text(batch))
            cols = [batch.column("request_id")] + [
                pc.if_else(usable, pa.array(scores[:, j], pa.float32()), None)
                for j in range(len(names))]
            writer.write_table(pa.table(cols, schema=schema))
            rows += batch.num_rows
    tmp.replace(out)
    return rows
