"""The llm router's building blocks: ask a cheap model how hard each prompt is, map its answer
to a catalog model, and remember the answer so a backfill does not pay twice.

    texts ─► prompt_keys ─► DecisionCache.lookup ─► misses, each distinct prompt once
          ─► ask (ROUTED rows: [system, user] at the routing model) ─► RESULTS rows
          ─► parse_decisions ─► label → model, else the default ─► LLMDecisions

:class:`LLMRouter` is a plain class; the call to the routing model goes through one injected
seam, ``ask``: a function from a ROUTED-schema table to the dispatcher's RESULTS-schema table
for those rows. In a job that is the routing model's dispatch actor
(``_DispatchActor.ask_route``, so routing calls share that model's limits); in ``batchroute
eval`` and tests it is :func:`ask_in_process`. The structured output the call asks for travels
inside the ROUTED table's schema metadata (:func:`routing_output`), so the seam needs no second
argument and a router with its own labels still reaches the right schema.

A decision the model gave in the wrong shape, or a call that failed, routes the row to the
configured default model and is counted; it never raises.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchroute import schemas, tokens
from batchroute.config import DispatchConfig, ModelConfig
from batchroute.errors import ConfigError
from batchroute.stages.dispatch.providers import OutputSchema

if TYPE_CHECKING:
    import httpx

    from batchroute.stages.dispatch.dispatcher import ModelDispatcher, Stats

__all__ = [
    "CACHE_SCHEMA",
    "DECISION_NAME",
    "DEFAULT_LABELS",
    "SCHEMA_VERSION",
    "SYSTEM_PROMPT",
    "Ask",
    "DecisionCache",
    "InProcessAsk",
    "LLMDecisions",
    "LLMRouter",
    "ask_in_process",
    "decision_schema",
    "parse_decisions",
    "prompt_keys",
    "routing_output",
]

log = logging.getLogger(__name__)

DECISION_NAME = "route_decision"
DEFAULT_LABELS = ("easy", "medium", "hard")
# Bump when the question changes in a way the prompt text above does not show (the answer
# format, how labels are read): cached decisions made under another version are not reused.
SCHEMA_VERSION = "1"
SYSTEM_PROMPT = (
    "You route prompts to language models. Do not answer the user's message. Judge how "
    "difficult it is for a language model to answer correctly and reply only with the JSON "
    "object the schema asks for; the allowed labels are listed from easiest to hardest.")
_OUTPUT_META = b"batchroute.output_schema"
_ERROR_SNIPPET = 60
_NONE = np.array(None, dtype=object)  # compared element-wise with object arrays

Ask = Callable[[pa.Table], pa.Table]


def decision_schema(labels: Sequence[str] = DEFAULT_LABELS) -> dict[str, Any]:
    """The JSON schema of one decision: ``{"difficulty": <one of labels>}``, written for
    OpenAI's strict mode (every property required, no others). Raises ConfigError for empty,
    blank or repeated labels."""
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels) or not all(
            isinstance(x, str) and x.strip() for x in labels):
        raise ConfigError(f"llm router labels must be distinct non-empty strings, got {labels}")
    return {"type": "object",
            "properties": {"difficulty": {"type": "string", "enum": labels}},
            "required": ["difficulty"], "additionalProperties": False}


def _output(labels: Sequence[str]) -> OutputSchema:
    return OutputSchema(DECISION_NAME, decision_schema(labels),
                        "Record how difficult the user's message is to answer well.")


def routing_output(routed: pa.Table) -> OutputSchema:
    """The structured output a routing table asks for: the schema :class:`LLMRouter` stored
    in its metadata, else the default labels' schema. For the ``ask`` side of the seam."""
    raw = (routed.schema.metadata or {}).get(_OUTPUT_META)
    if raw is None:
        return _output(DEFAULT_LABELS)
    doc = json.loads(raw)
    return OutputSchema(doc["name"], doc["schema"], doc.get("description", ""))


def prompt_keys(texts: pa.Array | pa.ChunkedArray, *, model: str = "",
                labels: Sequence[str] = DEFAULT_LABELS) -> pa.Array:
    """A stable cache key per prompt: sha256 hex of (schema version, system prompt, routing
    ``model``, ``labels``) and the text. Null texts get null keys.

    No Arrow kernel hashes with sha256, so each text is hashed with hashlib, continuing a
    hash of the shared prefix (about a microsecond a prompt); callers hash distinct texts
    only (:meth:`LLMRouter.decide` does).
    """
    head = hashlib.sha256(json.dumps([SCHEMA_VERSION, SYSTEM_PROMPT, model, list(labels)],
                                     separators=(",", ":")).encode() + b"\0")
    out: list[str | None] = []
    for text in texts.to_pylist():
        if text is None:
            out.append(None)
            continue
        h = head.copy()
        h.update(text.encode())
        out.append(h.hexdigest())
    return pa.array(out, pa.string())


# --------------------------------------------------------------------------------------------
# The cache


CACHE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("model", pa.string()),  # the routing model that was asked
    pa.field("cost_micro_usd", pa.int64()),  # what the decision cost when it was paid for
    pa.field("decided_at", schemas.TIMESTAMP),
])
_KEY = "S64"  # sha256 hex


class DecisionCache:
    """Decisions by prompt key, kept as Parquet part files in one folder (local path or any
    pyarrow filesystem URI); ``DecisionCache(None)`` caches nothing.

    Writers never share a file: each :meth:`flush` writes one new ``part-*.parquet`` under a
    hidden temporary name and renames it into place, so any number of routing actors (or
    runs) can add to one folder at once and a reader never sees half a file. Readers read
    every part; a key decided twice (two actors met the same prompt) keeps its first label
    read, which is harmless since either was paid for and valid.

    The folder is read once, on the first lookup; decisions added later by this instance are
    found at once, those other writers add meanwhile on the next instance. Added decisions are
    buffered and written when ``flush_rows`` accumulate, and by :meth:`flush`, which the owner
    must call before it goes away (unflushed decisions are only lost savings).

    Invariant: ``_keys`` is sorted and unique and ``_labels[i]`` is the label of
    ``_keys[i]``, so lookups are one vectorised binary search.
    """

    def __init__(self, path: str | None, *, flush_rows: int = 4096) -> None:
        self.path = path
        self.flush_rows = flush_rows
        self._fs: pafs.FileSystem | None = None
        self._dir = ""
        if path is not None:
            if "://" in path:
                self._fs, self._dir = pafs.FileSystem.from_uri(path)
            else:
                self._fs, self._dir = pafs.LocalFileSystem(), path
            self._dir = self._dir.rstrip("/")
        self._keys: np.ndarray | None = None  # loaded lazily
        self._labels = np.empty(0, dtype=object)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def lookup(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The cached label of each key (object array), None for a miss or a null key."""
        n = len(keys)
        out = np.full(n, None, dtype=object)
        if not self.enabled or n == 0:
            return out
        index, labels = self._index()
        if len(index) == 0:
            return out
        valid = pc.is_valid(keys).to_numpy(zero_copy_only=False)
        wanted = _key_array(pc.fill_null(keys, ""))
        pos = np.minimum(np.searchsorted(index, wanted), len(index) - 1)
        hit = valid & (index[pos] == wanted)
        out[hit] = labels[pos[hit]]
        return out

    def add(self, keys: pa.Array | pa.ChunkedArray, labels: Sequence[str | None] | np.ndarray,
            *, model: str | None = None,
            cost_micro_usd: Sequence[int] | np.ndarray | None = None) -> None:
        """Remember ``labels`` for ``keys`` (rows with a null key or label are skipped); write
        a part file once ``flush_rows`` decisions are buffered. Raises OSError from the
        filesystem when that write fails."""
        if not self.enabled or len(keys) == 0:
            return
        label_arr = pa.array(list(labels), pa.string())
        cost = (pa.nulls(len(keys), pa.int64()) if cost_micro_usd is None
                else pa.array(np.asarray(cost_micro_usd, dtype=np.int64)))
        table = pa.table({
            "key": keys, "label": label_arr,
            "model": pa.repeat(pa.scalar(model, pa.string()), len(keys)),
            "cost_micro_usd": cost,
            "decided_at": pa.repeat(pa.scalar(datetime.now(UTC), schemas.TIMESTAMP), len(keys)),
        })
        table = table.filter(pc.and_(pc.is_valid(table.column("key")),
                                     pc.is_valid(table.column("label"))))
        if table.num_rows == 0:
            return
        table = table.cast(CACHE_SCHEMA)
        self._merge(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered decisions as one new part file; return its path (None when
        nothing was buffered). Raises OSError when the filesystem refuses."""
        if not self._pending or self._fs is None:
            return None
        table = pa.concat_tables(self._pending)
        name = f"part-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
        final = f"{self._dir}/{name}"
        tmp = f"{self._dir}/_tmp-{name}"
        self._fs.create_dir(self._dir, recursive=True)
        pq.write_table(table, tmp, filesystem=self._fs, compression="zstd")
        self._fs.move(tmp, final)
        self._pending, self._pending_rows = [], 0
        return final

    def __len__(self) -> int:
        return len(self._index()[0]) if self.enabled else 0

    def _parts(self) -> list[str]:
        assert self._fs is not None
        if self._fs.get_file_info(self._dir).type == pafs.FileType.NotFound:
            return []
        infos = self._fs.get_file_info(pafs.FileSelector(self._dir))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and i.base_name.endswith(".parquet")
                      and not i.base_name.startswith((".", "_")))

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._keys is None:
            self._keys = np.empty(0, dtype=_KEY)
            parts = [pq.read_table(p, filesystem=self._fs, columns=["key", "label"])
                     for p in self._parts()]
            if parts:
                self._merge(pa.concat_tables(parts))
        return self._keys, self._labels

    def _merge(self, table: pa.Table) -> None:
        """Fold new (key, label) rows into the sorted index; existing keys keep their label."""
        if self._keys is None:
            self._index()
        assert self._keys is not None
        keys = _key_array(table.column("key"))
        labels = table.column("label").to_numpy(zero_copy_only=False).astype(object)
        keys, first = np.unique(keys, return_index=True)  # sorted; first occurrence wins
        labels = labels[first]
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            new = self._keys[pos] != keys
            keys, labels = keys[new], labels[new]
        at = np.searchsorted(self._keys, keys)
        self._keys = np.insert(self._keys, at, keys)
        self._labels = np.insert(self._labels, at, labels)


def _key_array(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object).astype(_KEY)


# --------------------------------------------------------------------------------------------
# Parsing


def parse_decisions(answers: pa.Array | pa.ChunkedArray | Sequence[str | None],
                    labels: Sequence[str] = DEFAULT_LABELS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read each answer as ``{"difficulty": <label>}``.

    Returns (label: object array, None on failure; failed: bool array; error: object array,
    None where the answer parsed). Whitespace and a Markdown code fence around the JSON are
    tolerated; anything else that is not a JSON object whose ``difficulty`` is one of
    ``labels`` (a null answer, prose, cut-off JSON, another label) is a failure. Never raises
    on bad answers. Errors quote at most a short prefix of the answer.
    """
    values = answers.to_pylist() if isinstance(answers, pa.Array | pa.ChunkedArray) \
        else list(answers)
    allowed = frozenset(labels)
    n = len(values)
    out = np.full(n, None, dtype=object)
    error = np.full(n, None, dtype=object)
    for i, text in enumerate(values):  # JSON parsing has no vectorised form
        label, problem = _parse_one(text, allowed)
        out[i], error[i] = label, problem
    return out, np.equal(out, _NONE), error


def _parse_one(text: str | None, allowed: frozenset[str]) -> tuple[str | None, str | None]:
    if text is None:
        return None, "no answer"
    body = text.strip()
    if body.startswith("```"):
        body = body[3:]
        if body[:4].lower() == "json":
            body = body[4:]
        body = body.removesuffix("```").strip()
    try:
        doc = json.loads(body)
    except ValueError:
        return None, f"not JSON: {text[:_ERROR_SNIPPET]!r}"
    if not isinstance(doc, dict) or "difficulty" not in doc:
        return None, f"no difficulty in {text[:_ERROR_SNIPPET]!r}"
    label = doc["difficulty"]
    if not isinstance(label, str) or label not in allowed:
        return None, f"difficulty {str(label)[:_ERROR_SNIPPET]!r} is not one of the labels"
    return label, None


# --------------------------------------------------------------------------------------------
# The router


@dataclass(frozen=True)
class LLMDecisions:
    """One entry per input row.

    ``cost_micro_usd`` is what the routing call cost, on the first row of each distinct
    prompt asked (later duplicates in the batch, cached rows and rows never asked carry 0),
    so its sum is what the batch's routing cost. Counters count rows: ``parse_failures`` and
    ``call_failures`` rows that fell back to the default for that reason, ``cache_hits`` rows
    decided from the cache; ``asked`` counts calls made (distinct prompts asked).
    """

    label: np.ndarray  # object: the label, None when the row fell back
    model: np.ndarray  # object: labels_to_models[label], or the default
    fallback: np.ndarray  # bool: no valid decision (parse failure, failed call, null text)
    cached: np.ndarray  # bool: decided from the cache, nothing paid
    cost_micro_usd: np.ndarray  # int64
    error: np.ndarray  # object: why the row fell back, None otherwise; never a secret
    parse_failures: int
    call_failures: int
    cache_hits: int
    asked: int


class LLMRouter:
    """Routes prompts by a cheap model's judgement of their difficulty.

    ``labels_to_models`` maps each label, easiest first, to the catalog model that serves
    it; its keys are the labels the model chooses from. ``default`` serves rows without a
    valid decision. ``model`` is the routing model (its catalog name: the cache key and the
    ``model`` column of the rows handed to ``ask``). ``max_tokens`` caps the answer (a
    decision is under 10 tokens); ``max_prompt_chars`` is how much of a long prompt the
    routing model reads (its start), which bounds the routing cost and keeps every call
    within the routing model's context. Raises ConfigError for an unusable configuration.
    """

    def __init__(self, *, model: str, labels_to_models: Mapping[str, str], default: str,
                 ask: Ask, cache: DecisionCache | None, max_tokens: int = 16,
                 max_prompt_chars: int = 8000) -> None:
        self.labels = tuple(labels_to_models)
        self._output = _output(self.labels)  # validates the labels
        if not default:
            raise ConfigError("llm router default model must be named")
        if max_tokens < 1 or max_prompt_chars < 1:
            raise ConfigError("llm router max_tokens and max_prompt_chars must be >= 1")
        self.model = model
        self.labels_to_models = dict(labels_to_models)
        self.default = default
        self.max_tokens = max_tokens
        self.max_prompt_chars = max_prompt_chars
        self._ask = ask
        self.cache = cache if cache is not None else DecisionCache(None)
        schema_json = json.dumps(self._output.schema, separators=(",", ":"))
        # The system prompt and schema, and both messages' overhead; the user text is added
        # per row.
        self._fixed_tokens = tokens.input_estimate(len(SYSTEM_PROMPT) + len(schema_json), 2)
        self._meta = {_OUTPUT_META: json.dumps({
            "name": self._output.name, "schema": self._output.schema,
            "description": self._output.description}).encode()}

    def decide(self, texts: pa.Array | pa.ChunkedArray) -> LLMDecisions:
        """One decision per text. Never raises for a bad answer or a failed call: those rows
        get the default model and are counted. Null texts get the default without a call."""
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        n = len(texts)
        encoded = pc.dictionary_encode(texts)
        distinct = encoded.dictionary  # each distinct prompt once
        idx = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        m = len(distinct)
        keys = prompt_keys(distinct, model=self.model, labels=self.labels)

        label_u = self.cache.lookup(keys)
        cached_u = np.not_equal(label_u, _NONE)
        cost_u = np.zeros(m, dtype=np.int64)
        error_u = np.full(m, None, dtype=object)
        parse_u = np.zeros(m, dtype=bool)
        call_u = np.zeros(m, dtype=bool)
        ask_at = np.flatnonzero(~cached_u)
        if len(ask_at):
            answers, status, cost_u[ask_at], messages = self._call(
                distinct.take(pa.array(ask_at)), keys.take(pa.array(ask_at)))
            ok = status == "ok"
            call_u[ask_at] = ~ok
            error_u[ask_at[~ok]] = messages[~ok]
            parsed, failed, why = parse_decisions(answers, self.labels)
            bad = ok & failed
            parse_u[ask_at[bad]] = True
            error_u[ask_at[bad]] = why[bad]
            good = ok & ~failed
            label_u[ask_at[good]] = parsed[good]
            self.cache.add(keys.take(pa.array(ask_at[good])), parsed[good], model=self.model,
                           cost_micro_usd=cost_u[ask_at[good]])

        present = idx >= 0
        rows_u = np.where(present, idx, 0)  # gather with a safe index, then blank the nulls

        def per_row(values: np.ndarray, missing: Any) -> np.ndarray:
            out = values[rows_u] if m else np.full(n, missing, dtype=values.dtype)
            out[~present] = missing
            return out

        label = per_row(label_u, None)
        fallback = np.equal(label, _NONE)
        # label -> model by position in the labels; no label (or an unknown one) -> default
        slot = pc.fill_null(pc.index_in(pa.array(label_u, pa.string()),
                                        value_set=pa.array(self.labels, pa.string())),
                            len(self.labels)).to_numpy(zero_copy_only=False)
        to_model = np.array([*(self.labels_to_models[x] for x in self.labels), self.default],
                            dtype=object)[slot]
        model = per_row(to_model, self.default) if m else np.full(n, self.default, dtype=object)
        cost = np.zeros(n, dtype=np.int64)
        if m:
            _, first = np.unique(np.where(present, idx, -1), return_index=True)
            first = first[idx[first] >= 0]
            cost[first] = cost_u[idx[first]]
        error = per_row(error_u, "no prompt text")
        parse_rows = per_row(parse_u, False)
        call_rows = per_row(call_u, False)
        cached_rows = per_row(cached_u, False)
        return LLMDecisions(
            label=label, model=model, fallback=fallback, cached=cached_rows,
            cost_micro_usd=cost, error=error, parse_failures=int(parse_rows.sum()),
            call_failures=int(call_rows.sum()), cache_hits=int(cached_rows.sum()),
            asked=len(ask_at))

    def close(self) -> None:
        """Write the cache's buffered decisions."""
        self.cache.flush()

    def _call(self, texts: pa.Array, keys: pa.Array
              ) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
        """Ask about each text once: (answer text, status, cost, error message), in order."""
        routed = self.routing_table(texts, keys)
        k = len(texts)
        try:
            results = self._ask(routed)
        except Exception as exc:  # a dead actor: every row falls back, the job goes on
            log.error("llm routing call for %d prompts failed: %s", k, type(exc).__name__)
            return (pa.nulls(k, pa.string()), np.full(k, "failed", dtype=object),
                    np.zeros(k, dtype=np.int64),
                    np.full(k, f"routing call failed: {type(exc).__name__}", dtype=object))
        # Match rows by request_id: the seam promises the rows, not their order.
        where = pc.index_in(routed.column("request_id"), value_set=results.column("request_id"))
        found = pc.is_valid(where).to_numpy(zero_copy_only=False)
        take = pa.array(np.where(found, pc.fill_null(where, 0).to_numpy(
            zero_copy_only=False), 0).astype(np.int64))
        got = results.take(take) if results.num_rows else None
        status = np.full(k, "failed", dtype=object)
        cost = np.zeros(k, dtype=np.int64)
        message = np.full(k, "no result for this routing call", dtype=object)
        if got is None:
            return pa.nulls(k, pa.string()), status, cost, message
        status[found] = got.column("status").to_numpy(zero_copy_only=False)[found]
        cost[found] = got.column("cost_micro_usd").to_numpy(zero_copy_only=False)[found]
        # The dispatcher's error messages are already scrubbed of the key (batchroute.scrub).
        why = pc.binary_join_element_wise(
            "routing call ", pc.fill_null(got.column("error_type"), "failed"), ": ",
            got.column("error_message"), "")
        message[found] = why.to_numpy(zero_copy_only=False)[found]
        answers = pc.if_else(pa.array(found), got.column("response"), None)
        return answers, status, cost, message

    def routing_table(self, texts: pa.Array, keys: pa.Array) -> pa.Table:
        """The ROUTED rows that ask the routing model about ``texts``: messages [system,
        user (the text's first ``max_prompt_chars``)], this router's model and answer cap,
        request ids derived from the keys, and the decision schema in the metadata."""
        k = len(texts)
        user = pc.utf8_slice_codeunits(texts, 0, self.max_prompt_chars)
        # Interleave [system, user] pairs without a loop: take from [system] + user texts.
        contents = pa.concat_arrays([pa.array([SYSTEM_PROMPT], pa.string()),
                                     user.cast(pa.string())])
        order = np.empty(2 * k, dtype=np.int64)
        order[0::2], order[1::2] = 0, np.arange(1, k + 1)
        roles = pa.array(np.tile(np.array(["system", "user"], dtype=object), k), pa.string())
        messages = pa.ListArray.from_arrays(
            pa.array(np.arange(0, 2 * k + 1, 2, dtype=np.int32)),
            pa.StructArray.from_arrays([roles, contents.take(pa.array(order))],
                                       fields=list(schemas.MESSAGE)))
        chars = pc.fill_null(pc.utf8_length(user), 0).to_numpy(zero_copy_only=False)
        est_in = tokens.from_chars(chars.astype(np.int64)) + self._fixed_tokens
        cols: dict[str, Any] = {name: pa.nulls(k, f.type) for name, f in
                                zip(schemas.ROUTED.names, schemas.ROUTED, strict=True)}
        cols.update(
            request_id=pc.binary_join_element_wise("llm-route-", keys, ""),
            row=pa.array(np.arange(k, dtype=np.int64)),
            messages=messages,
            max_tokens=pa.repeat(pa.scalar(self.max_tokens, pa.int32()), k),
            model=pa.repeat(pa.scalar(self.model, pa.string()), k),
            route_reason=pa.repeat(pa.scalar("llm-router", pa.string()), k),
            router_version=pa.repeat(pa.scalar(f"llm:{self.model}:v{SCHEMA_VERSION}",
                                               pa.string()), k),
            est_input_tokens=pa.array(est_in, pa.int64()),
            est_output_tokens=pa.repeat(pa.scalar(self.max_tokens, pa.int64()), k),
            route_cost_micro_usd=pa.array(np.zeros(k, np.int64)),  # non-null: nothing paid yet
        )
        table = pa.table(cols, schema=schemas.ROUTED)
        return table.replace_schema_metadata({**(table.schema.metadata or {}), **self._meta})


# --------------------------------------------------------------------------------------------
# Asking in this process


class InProcessAsk:
    """An ``ask`` that runs one :class:`ModelDispatcher` on a private event loop in the
    calling thread, for ``batchroute eval`` and tests. The dispatcher (and so the model's
    limits) lives as long as this object; :meth:`close` ends it."""

    def __init__(self, model: ModelConfig, policy: DispatchConfig, api_key: str | None, *,
                 run_id: str = "llm-route",
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._args = (model, policy, run_id, api_key, transport)
        self._loop = asyncio.new_event_loop()
        self._dispatcher: ModelDispatcher | None = None
        self.stats: Stats | None = None  # the dispatcher's counters, once it exists

    def __call__(self, routed: pa.Table) -> pa.Table:
        result: pa.Table = self._loop.run_until_complete(self._ask(routed))
        return result

    async def _ask(self, routed: pa.Table) -> pa.Table:
        if self._dispatcher is None:  # created inside the loop that will use it
            from batchroute.stages.dispatch.dispatcher import ModelDispatcher

            model, policy, run_id, api_key, transport = self._args
            self._dispatcher = ModelDispatcher(model, policy, run_id=run_id, api_key=api_key,
                                               transport=transport)
            self.stats = self._dispatcher.stats
        return await self._dispatcher.ask(routed, routing_output(routed))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._dispatcher is not None:
            self._loop.run_until_complete(self._dispatcher.aclose())
        self._loop.close()

    def __enter__(self) -> InProcessAsk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask_in_process(model_cfg: ModelConfig, policy: DispatchConfig, api_key: str | None, *,
                   run_id: str = "llm-route",
                   transport: httpx.AsyncBaseTransport | None = None) -> InProcessAsk:
    """An ``ask`` for :class:`LLMRouter` that calls ``model_cfg`` from this thread (see
    :class:`InProcessAsk`); ``transport`` is the dispatcher's HTTP seam (None: its lean
    HTTP/1.1 client). Close it when done."""
    return InProcessAsk(model_cfg, policy, api_key, run_id=run_id, transport=transport)
