"""``batchroute train``: learn, per model, P(that model's answer scores >= cut) from labels.

Labels are long-form Parquet (``request_id, prompt, model, score``, see
``schemas/labels.schema.json``). The model is one logistic regression per target model over
one of two featurisations (``--features``):

- ``words`` (default): a bag of words over the router's own tokens
  (:func:`batchroute.routers.words.tokens`, the tokenizer serving uses), so the exported ONNX
  file reproduces training-time probabilities exactly; a few hundred KB, over a hundred
  thousand prompts/s per core.
- ``embed``: the unit-length all-MiniLM-L6-v2 sentence embedding of the prompt's first
  MAX_CHARS characters, 128 tokens at most (see :mod:`batchroute.routers.embed`); the file holds the
  encoder, so it is about 90 MB and scores a few hundred prompts/s per core.

Held-out split: a question is held out when ``int(sha256(request_id)[:8], 16) % 5 == 0``
(about 20%). Training never sees those rows; the metrics written into the file are measured on
them.

Several label files (``--labels`` repeated, e.g. the bundled MMLU labels and what
``batchroute learn`` drew from the runs) are merged by :func:`read_label_files`. A prompt need
not have a label for every model: each model's regression is fitted on the prompts that have
that model's label, while calibrate and eval, which compare models on the same prompts, use
only the prompts labelled for every model they need.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds

from batchroute.config import DEFAULT_POLICY
from batchroute.errors import RouterError, SchemaError
from batchroute.routers import classifier as rt
from batchroute.routers import words

LABEL_COLUMNS = {"request_id": pl.String, "prompt": pl.String, "model": pl.String,
                 "score": pl.Float64}
HOLDOUT_MOD = 5
MIN_DF = 2
MAX_VOCAB = 30_000
C_GRID = (0.1, 0.3, 1.0, 3.0)
ROUTER_KIND = "bow-lr-1"
# Unit-length 384-d embeddings have small coordinates, so their best C is larger.
EMBED_C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
EMBED_KIND = "minilm-lr-1"
STATIC_KIND = "static-lr-1"
FEATURES = ("words", "embed", "static")
# The exported fit is solved to a tolerance far below the file's reproducibility check (1e-4
# on weights, thresholds and scores): at scikit-learn's default 1e-4, L-BFGS stopped where
# the library versions happened to take it, and a rebuild with other scipy/numpy releases
# moved the default threshold by 3e-4.
SOLVER_TOL = 1e-8
SOLVER_MAX_ITER = 20_000


@dataclass(frozen=True)
class TrainReport:
    models: tuple[str, ...]
    thresholds: dict[str, float]
    metrics: dict[str, dict[str, float]]
    version: str
    train_rows: int
    holdout_rows: int


def read_labels(uri: str) -> pl.DataFrame:
    """Load and check a labels dataset. Raises SchemaError naming the problem."""
    try:
        table = ds.dataset(uri, format="parquet").to_table()
    except (OSError, pa.ArrowInvalid) as exc:
        raise SchemaError(f"labels {uri}: cannot be read as Parquet ({exc})") from None
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    for col, dtype in LABEL_COLUMNS.items():
        if col not in frame.columns:
            raise SchemaError(f"labels {uri}: missing column '{col}'")
        try:
            frame = frame.with_columns(pl.col(col).cast(dtype, strict=True))
        except pl.exceptions.PolarsError:
            raise SchemaError(f"labels {uri}: column '{col}' has type {frame[col].dtype}, "
                              f"expected {dtype}") from None
        nulls = frame[col].null_count()
        if nulls:
            raise SchemaError(f"labels {uri}: column '{col}' has {nulls} null values")
    bad = frame.filter((pl.col("score") < 0) | (pl.col("score") > 1) | pl.col("score").is_nan())
    if len(bad):
        raise SchemaError(f"labels {uri}: column 'score' must lie in [0, 1]; request_id "
                          f"{bad['request_id'][0]!r} has {bad['score'][0]}")
    dup = frame.filter(pl.struct("request_id", "model").is_duplicated())
    if len(dup):
        raise SchemaError(f"labels {uri}: request_id {dup['request_id'][0]!r} has more than "
                          f"one score for model {dup['model'][0]!r}")
    return frame.select(list(LABEL_COLUMNS))


LabelsArg = str | Sequence[str]


def uris_of(labels: LabelsArg) -> list[str]:
    """One URI or several, as a list (SchemaError for none)."""
    uris = [labels] if isinstance(labels, str) else list(labels)
    if not uris:
        raise SchemaError("labels: no label file given")
    return uris


def describe_uris(labels: LabelsArg) -> str:
    return " + ".join(uris_of(labels))


def read_label_files(labels: LabelsArg) -> pl.DataFrame:
    """Load, check (each file as :func:`read_labels`) and merge one or more label datasets.

    Merging, when there are several, in the order given:

    - **One question, one id.** A prompt that an earlier file already holds takes the
      request_id it has there (the first file that holds it, its first row), so that the same
      question learnt from a run under a night's request_id and found in the bundled labels
      under another is one question, on one side of the held-out split.
    - **The later file wins.** The same (request_id, model) in several files keeps the later
      file's score: give the newest labels last.
    - A request_id that names different prompts in two files is refused (SchemaError naming
      both files)."""
    uris = uris_of(labels)
    frames = [read_labels(u) for u in uris]
    if len(frames) == 1:
        return frames[0]
    merged = frames[0]
    first_id = merged.group_by("prompt", maintain_order=True).agg(
        pl.col("request_id").first().alias("_first"))
    id_prompt = merged.unique("request_id", keep="first").select(
        "request_id", pl.col("prompt").alias("_prompt"), pl.lit(uris[0]).alias("_file"))
    for uri, frame in zip(uris[1:], frames[1:], strict=True):
        frame = (frame.join(first_id, on="prompt", how="left")
                 .with_columns(pl.coalesce("_first", "request_id").alias("request_id"))
                 .drop("_first"))
        clash = (frame.unique("request_id", keep="first")
                 .join(id_prompt, on="request_id", how="inner")
                 .filter(pl.col("prompt") != pl.col("_prompt")))
        if len(clash):
            raise SchemaError(f"labels {uri}: request_id {clash['request_id'][0]!r} names "
                              f"another prompt than it does in {clash['_file'][0]}")
        merged = pl.concat([merged, frame]).unique(["request_id", "model"], keep="last",
                                                   maintain_order=True)
        first_id = merged.group_by("prompt", maintain_order=True).agg(
            pl.col("request_id").first().alias("_first"))
        id_prompt = pl.concat([id_prompt, frame.unique("request_id", keep="first").select(
            "request_id", pl.col("prompt").alias("_prompt"), pl.lit(uri).alias("_file"))]
        ).unique("request_id", keep="first", maintain_order=True)
    return merged


def is_holdout(request_ids: Sequence[str]) -> np.ndarray:
    """The documented held-out rule, so eval and train agree on the split."""
    return np.array([int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) % HOLDOUT_MOD == 0
                     for r in request_ids], dtype=bool)


def labelled(labels_uri: LabelsArg, models: Sequence[str], split: str, *,
             exclude: Iterable[str] = ()) -> pl.DataFrame:
    """The wide table (see :func:`wide`) of ``models`` on the ``split`` rows ("holdout": the
    rows training never saw; "all"), only the prompts labelled for every one of ``models``,
    less the prompts that the label files ``exclude`` hold. Raises SchemaError for a bad
    split or an empty one."""
    table, _ = wide(read_label_files(labels_uri), models)
    if split == "holdout":
        table = table.filter(pl.Series(is_holdout(table["request_id"].to_list())))
    elif split != "all":
        raise SchemaError(f"--split must be holdout or all, got {split!r}")
    for uri in exclude:
        seen = read_labels(uri)["prompt"].unique()
        table = table.filter(~pl.col("prompt").is_in(seen.implode()))
    if len(table) == 0:
        raise SchemaError(f"labels {describe_uris(labels_uri)}: no rows in the {split} split"
                          + (" outside the excluded labels" if exclude else "")
                          + f" with a label for each of {', '.join(models)}")
    return table


def wide(labels: pl.DataFrame, models: Sequence[str] | None = None, *,
         complete: bool = True) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """One row per request with one score column per model. With ``complete`` (calibrate,
    eval: they compare the models on the same prompts), requests missing a model's label are
    dropped; without it (train), they are kept with a null score there, and only requests
    with none of the models are dropped."""
    present = sorted(labels["model"].unique().to_list())
    chosen = tuple(models) if models else tuple(present)
    missing = [m for m in chosen if m not in present]
    if missing:
        raise SchemaError(f"labels: no rows for model {missing[0]!r} (have: {', '.join(present)})")
    if len(chosen) < 2:
        raise SchemaError("labels: need outcomes for at least two models to route between them")
    prompts = labels.group_by("request_id").agg(pl.col("prompt").first())
    w = labels.filter(pl.col("model").is_in(chosen)).pivot(
        on="model", index="request_id", values="score")
    for m in chosen:  # pivot makes no column for a model with no row left
        if m not in w.columns:
            w = w.with_columns(pl.lit(None, pl.Float64).alias(m))
    w = w.join(prompts, on="request_id")
    w = (w.drop_nulls(list(chosen)) if complete else
         w.filter(pl.any_horizontal(pl.col(list(chosen)).is_not_null())))
    return w.sort("request_id"), chosen


def featurise(toks: words.Tokens, lookup: words.Lookup) -> tuple[object, np.ndarray]:
    """Sparse [N, V+1] scaled counts (last column: unknown words) and the length feature,
    matching the router: counts / sqrt(max(n, 1)) and log1p(n)."""
    from scipy import sparse

    unk = lookup.size
    lengths = toks.counts()
    ids = lookup.ids(toks.hashes)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    counts = sparse.csr_matrix((np.ones(len(ids), np.float64), (rows, ids)),
                               shape=(len(lengths), unk + 1))
    scale = 1.0 / np.sqrt(np.maximum(lengths, 1))
    return sparse.diags(scale) @ counts, np.log1p(lengths.astype(np.float64))


@dataclass(frozen=True)
class Features:
    """A featurisation's training matrix [N, F] and how to export heads fitted on it."""

    x: Any
    c_grid: tuple[float, ...]
    kind: str
    settings: dict[str, Any]
    extra_metadata: dict[str, str]
    export: Callable[[np.ndarray, np.ndarray, Sequence[str], dict[str, str]], bytes]


def words_features(prompts: np.ndarray, hold: np.ndarray) -> Features:
    """Scaled bag-of-words counts + log1p(token count), vocabulary from the training rows."""
    from scipy import sparse

    # The serving tokenizer itself (the first MAX_CHARS characters), so serving equals training.
    arr = pa.array(prompts.tolist(), pa.string())
    toks = words.tokens(arr, max_chars=rt.MAX_CHARS)
    rows = np.repeat(np.arange(len(toks)), toks.counts())
    # Document frequency on the training split only; ties broken alphabetically so the
    # vocabulary (and hence the file) is deterministic.
    train_rows = pa.array(~hold[rows])
    pairs = pl.DataFrame({"row": pa.array(rows).filter(train_rows),
                          "token": words.token_text(arr, max_chars=rt.MAX_CHARS)
                          .filter(train_rows)}).unique()
    df = (pairs["token"].value_counts().filter(pl.col("count") >= MIN_DF)
          .sort(["count", "token"], descending=[True, False]))
    vocab_list = df["token"].head(MAX_VOCAB).to_list()
    x_tok, x_len = featurise(toks, words.Lookup(vocab_list))
    x = sparse.hstack([x_tok, x_len[:, None]]).tocsr()

    def export(coef: np.ndarray, bias: np.ndarray, names: Sequence[str],
               meta: dict[str, str]) -> bytes:
        return rt.build_graph(vocab_list, coef[:-1], coef[-1], bias, names, meta)

    settings = {"kind": ROUTER_KIND, "lowercase": True, "token_pattern": rt.TOKEN_PATTERN,
                "max_chars": rt.MAX_CHARS, "min_df": MIN_DF, "vocab_size": len(vocab_list),
                "scaling": "counts/sqrt(n) + log1p(n)"}
    return Features(x, C_GRID, ROUTER_KIND, settings, {}, export)


def embed_features(prompts: np.ndarray, *, threads: int = 1) -> Features:
    """MiniLM embeddings of what the router graph sees (the first MAX_CHARS characters)."""
    from batchroute.routers import embed

    embedder = embed.Embedder.load(threads=threads)
    x = embedder.embed(rt.clip(pa.array(prompts.tolist(), pa.string())).tolist())

    def export(coef: np.ndarray, bias: np.ndarray, names: Sequence[str],
               meta: dict[str, str]) -> bytes:
        return rt.build_embed_graph(embedder.onnx_bytes(), coef, bias, names, meta)

    settings = {"kind": EMBED_KIND, "encoder": embedder.name,
                "weights": f"{embed.DISTRIBUTION}=={embed.package_version()}",
                "dim": embedder.dim, "max_chars": rt.MAX_CHARS,
                "max_tokens": embedder.max_tokens, "truncation": "longest_first, right",
                "padding": "right to the longest row of the batch, id 0, attention_mask 0",
                "inputs": ["input_ids", "attention_mask"],
                "pooling": "mean over attention_mask, L2-normalised"}
    extra = {"tokenizer_json": embedder.tokenizer_json(),
             "max_tokens": str(embedder.max_tokens)}
    return Features(x, EMBED_C_GRID, EMBED_KIND, settings, extra, export)


def static_features(prompts: np.ndarray) -> Features:
    """Static sentence embeddings (:mod:`batchroute.routers.static`, the bundled table) of the
    first MAX_CHARS characters; the file holds the table, so it needs nothing beside it."""
    from batchroute.routers import static, tensorfile

    embedder = static.StaticEmbedder.load()
    x = embedder.embed(pa.array(prompts.tolist(), pa.string()))
    meta = tensorfile.read_metadata(static.ASSET)

    def export(coef: np.ndarray, bias: np.ndarray, names: Sequence[str],
               meta: dict[str, str]) -> bytes:
        return rt.build_static_graph(embedder.table, coef, bias, names, meta)

    settings = {"kind": STATIC_KIND, "embedder": static.NAME, "dim": embedder.dim,
                "max_chars": rt.MAX_CHARS, "tokens": meta.get("tokens", ""),
                "teacher": meta.get("teacher", ""), "vocab_size": len(embedder.vocab),
                "inputs": ["ids"], "pooling": "sum of word vectors, L2-normalised"}
    extra = {"static_words": json.dumps(embedder.vocab)}
    return Features(x, EMBED_C_GRID, STATIC_KIND, settings, extra, export)


def train(labels_uri: LabelsArg, out: str, *, models: Sequence[str] | None = None,
          cut: float = 0.5, seed: int = 0, features: str = "words") -> TrainReport:
    """Train, export and verify a router; writes ``out`` atomically. ``labels_uri`` is one
    label dataset or several, merged (:func:`read_label_files`). ``features`` is one of
    :data:`FEATURES`. Raises SchemaError for bad labels or arguments and RouterError if the
    exported graph disagrees with the trained model."""
    from sklearn.metrics import roc_auc_score

    if not 0.0 < cut <= 1.0:
        raise SchemaError(f"--cut must lie in (0, 1], got {cut}")
    if features not in FEATURES:
        raise SchemaError(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    labels = read_label_files(labels_uri)
    table, names = wide(labels, models, complete=False)
    ids = table["request_id"].to_list()
    hold = is_holdout(ids)
    prompts = table["prompt"].to_numpy().astype(object)
    # Each model learns from the prompts that have its label (a prompt learnt from a run may
    # have labels for some models only).
    has = {name: table[name].is_not_null().to_numpy() for name in names}
    for name in names:
        if len(np.unique(table[name].to_numpy()[~hold & has[name]] >= cut)) < 2:
            raise SchemaError(f"labels: model {name!r} has only one outcome at cut {cut} "
                              "on its training rows; nothing to learn")
    feats = (words_features(prompts, hold) if features == "words" else
             embed_features(prompts) if features == "embed" else static_features(prompts))
    x = feats.x
    x_train, x_hold = x[~hold], x[hold]

    weights = np.zeros((x.shape[1], len(names)))
    bias = np.zeros(len(names))
    metrics: dict[str, dict[str, float]] = {}
    train_probs = np.zeros((int((~hold).sum()), len(names)))
    hold_probs = np.zeros((int(hold.sum()), len(names)))
    for j, name in enumerate(names):
        y = (table[name].fill_null(0.0).to_numpy() >= cut).astype(int)
        mine_train, mine_hold = has[name][~hold], has[name][hold]
        y_train, y_hold = y[~hold][mine_train], y[hold][mine_hold]
        clf, best_c = fit_head(x_train[mine_train], y_train, feats.c_grid, seed=seed)
        weights[:, j], bias[j] = clf.coef_[0], clf.intercept_[0]
        # Every prompt is scored (thresholds and the export check cover the whole traffic);
        # the metrics are measured on the prompts that have this model's label.
        train_probs[:, j] = clf.predict_proba(x_train)[:, 1]
        hold_probs[:, j] = clf.predict_proba(x_hold)[:, 1]
        metrics[name] = {
            "C": best_c,
            "holdout_auc": float(roc_auc_score(y_hold, hold_probs[mine_hold, j]))
            if len(np.unique(y_hold)) > 1 else float("nan"),
            "train_positive_rate": float(y_train.mean()),
            "holdout_positive_rate": float(y_hold.mean()) if len(y_hold) else float("nan"),
            "train_rows": int(mine_train.sum()),
            "holdout_rows": int(mine_hold.sum()),
        }

    # Default thresholds, for the default policy (config.DEFAULT_POLICY, "relative"): the
    # strongest model (highest success rate) is the fallback and needs none; every other model
    # takes the rows where its predicted success relative to the strongest model's,
    # 1 - (P(strongest) - P(model)), is above its median on the training rows, i.e. about half
    # of the traffic it is eligible for. `batchroute calibrate` refines this (for either
    # policy), and records the policy it calibrated for.
    strongest = max(names, key=lambda n: metrics[n]["train_positive_rate"])
    top = train_probs[:, names.index(strongest)]
    thresholds = {n: (0.0 if n == strongest else float(np.median(
        np.clip(1.0 - (top - train_probs[:, j]), 0.0, 1.0)))) for j, n in enumerate(names)}
    data_hash = hashlib.sha256(
        "\n".join(f"{r}\t{m}\t{s}" for r, m, s in labels.sort(["request_id", "model"])
                  .select("request_id", "model", "score").iter_rows()).encode()).hexdigest()
    # The policy its default thresholds are for: the same labels under another default policy
    # route differently, so they are another router for resumes and backfills.
    version = f"{feats.kind}-{data_hash[:8]}-{DEFAULT_POLICY}"
    meta = {
        "version": version,
        "thresholds": json.dumps(thresholds),
        "policy": DEFAULT_POLICY,
        "cut": str(cut),
        "training_data_sha256": data_hash,
        "featurisation": json.dumps(feats.settings),
        "split": f"holdout when int(sha256(request_id)[:8], 16) % {HOLDOUT_MOD} == 0",
        "metrics": json.dumps(metrics),
        "train_rows": str(int((~hold).sum())),
        "holdout_rows": str(int(hold.sum())),
        **feats.extra_metadata,
    }
    model_bytes = feats.export(weights, bias, names, meta)

    # Every way the file is served: as the job does (numpy for a words router) and, for a
    # words router, also its graph in onnxruntime, which any other reader of the file runs.
    held = pa.array(prompts[hold].tolist(), pa.string())
    served = rt.Router(model_bytes)
    routers = {"served": served}
    if served.words is not None:
        routers["onnxruntime"] = rt.Router(model_bytes, engine="onnxruntime")
    for how, router in routers.items():
        check = router.score(held)
        err = float(np.abs(check - hold_probs).max()) if len(check) else 0.0
        if err > 1e-5:
            raise RouterError(f"exported router ({how}) disagrees with the trained model by "
                              f"{err:.2e}")
    write_atomic(out, model_bytes)
    return TrainReport(names, thresholds, metrics, version, int((~hold).sum()), int(hold.sum()))


def fit_head(x_train: Any, y_train: np.ndarray, c_grid: Sequence[float], *, seed: int = 0,
             tol: float = SOLVER_TOL) -> tuple[Any, float]:
    """One model's logistic regression and its C: the C of ``c_grid`` with the best AUC on a
    seeded 20% of the training rows (fitted on the other 80%), then the fit on every
    training row at ``tol``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    inner = np.random.default_rng(seed).random(len(y_train)) < 0.2
    best_c, best_auc = c_grid[0], -1.0
    for c in c_grid:
        if len(np.unique(y_train[~inner])) < 2 or len(np.unique(y_train[inner])) < 2:
            break  # too few rows to choose C: keep the grid's first
        # Choosing C needs only the AUC at each C, which scikit-learn's default tolerance
        # settles far more finely than the grid's steps separate.
        clf = LogisticRegression(C=c, max_iter=SOLVER_MAX_ITER)
        clf.fit(x_train[~inner], y_train[~inner])
        auc = roc_auc_score(y_train[inner], clf.predict_proba(x_train[inner])[:, 1])
        if auc > best_auc:
            best_c, best_auc = c, auc
    return LogisticRegression(C=best_c, tol=tol, max_iter=SOLVER_MAX_ITER).fit(
        x_train, y_train), best_c


def write_atomic(path: str, data: bytes) -> None:
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)
