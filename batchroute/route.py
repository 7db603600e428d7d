"""Route stage: ``requests`` table in, ``routed`` table out, vectorised over the whole batch.

Order of decision for each row, first match wins:
1. already rejected by the source stage (reason kept, no model);
2. ``force_model`` from the row (rejected if it names no catalog model);
3. the job's rules, in file order;
4. the classifier policy: the cheapest router model whose predicted success clears its
   threshold, else the strongest (most expensive) one.
Then a row whose estimated tokens do not fit its model's context window (or one minute of its
TPM) is rejected with the numbers.

The classifier runs once per batch on every row: one onnxruntime call is cheaper than slicing
out the rows that need it, and the scores are evidence worth keeping on every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchroute import schemas
from batchroute.config import JobConfig, Rule
from batchroute.errors import RouterError
from batchroute.router import Router, RouterInfo
from batchroute.source import request_text

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
# Fenced blocks or a language keyword at a line start: cheap and precise enough for routing.
CODE_PATTERN = (r"```|^\s*(def |class |import |from \S+ import|#include|public static|"
                r"func |fn |let |const |function |SELECT |CREATE TABLE|package )")


@dataclass(frozen=True)
class Target:
    """What routing needs to know about one catalog model."""

    name: str
    price: float  # input + output USD per million tokens, used to order candidates
    context_window: int
    tpm: int


@dataclass(frozen=True)
class RouteSpec:
    """The route stage's own configuration, small and picklable for Ray actors."""

    targets: tuple[Target, ...]
    rules: tuple[Rule, ...]
    thresholds: Mapping[str, float]  # job overrides; router defaults fill the rest
    default_max_tokens: int

    @classmethod
    def from_job(cls, job: JobConfig) -> RouteSpec:
        targets = tuple(Target(m.name, m.input_usd_per_mtok + m.output_usd_per_mtok,
                               m.context_window, m.tpm) for m in job.models.values())
        return cls(targets, job.router.rules, dict(job.router.thresholds),
                   job.dispatch.default_max_tokens)


def check_compatible(info: RouterInfo, spec: RouteSpec, *, path: str) -> None:
    """Refuse a router that names a model the job's catalog lacks."""
    known = {t.name for t in spec.targets}
    missing = [m for m in info.models if m not in known]
    if missing:
        raise RouterError(f"router file {path}: model {missing[0]!r} is not in the job's "
                          f"catalog (catalog: {', '.join(sorted(known))})")


class RouteStage:
    """A callable for a routing actor: loads the router once, routes whole batches."""

    def __init__(self, router_bytes: bytes, spec: RouteSpec, router_path: str = "<router>"):
        self.router = Router(router_bytes, path=router_path)
        check_compatible(self.router.info, spec, path=router_path)
        self.spec = spec
        by_name = {t.name: t for t in spec.targets}
        # Router models ordered cheapest first: the policy takes the first that clears its bar.
        order = sorted(range(len(self.router.info.models)),
                       key=lambda j: by_name[self.router.info.models[j]].price)
        self._order = np.array(order, dtype=np.int64)
        names = [self.router.info.models[j] for j in order]
        thresholds = {**self.router.info.thresholds, **spec.thresholds}
        self._thresholds = np.array([thresholds.get(n, 0.5) for n in names], np.float32)
        # The strongest (dearest) model is the fallback and always clears.
        self._thresholds[-1] = 0.0
        self._names = np.array(names, dtype=object)
        self._context = {t.name: min(t.context_window, t.tpm) for t in spec.targets}
        self._context_kind = {t.name: ("context window" if t.context_window <= t.tpm
                                       else "tokens-per-minute limit") for t in spec.targets}

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        text = request_text(batch)
        reject = batch.column("reject_reason").to_numpy(zero_copy_only=False).astype(object)
        rejected = pc.is_valid(batch.column("reject_reason")).to_numpy(zero_copy_only=False)
        model = np.full(n, None, dtype=object)
        reason = np.full(n, None, dtype=object)
        decided = rejected.copy()

        forced = batch.column("force_model").to_numpy(zero_copy_only=False)
        has_force = ~decided & pc.is_valid(batch.column("force_model")).to_numpy(
            zero_copy_only=False)
        if has_force.any():
            known = np.isin(forced, [t.name for t in self.spec.targets])
            bad = has_force & ~known
            reject[bad] = [f"force_model {f!r} is not in the catalog" for f in forced[bad]]
            rejected |= bad
            model[has_force & known] = forced[has_force & known]
            reason[has_force & known] = "forced"
            decided |= has_force

        for rule in self.spec.rules:
            hit = ~decided & rule_mask(rule, text, batch)
            model[hit] = rule.model
            reason[hit] = f"rule:{rule.name}"
            decided |= hit

        scores = self.router.score(text)
        ordered = scores[:, self._order] if n else scores
        clears = ordered >= self._thresholds
        first = np.argmax(clears, axis=1) if n else np.zeros(0, np.int64)
        chosen = ~decided
        model[chosen] = self._names[first[chosen]]
        reason[chosen] = np.where(first[chosen] == len(self._names) - 1, "fallback",
                                  "classifier") if chosen.any() else []
        threshold = np.full(n, np.nan, np.float32)
        threshold[chosen] = self._thresholds[first[chosen]]

        est_in, est_out = estimate_tokens(batch, text, self.spec.default_max_tokens)
        need = est_in + est_out
        for name, limit in self._context.items():
            over = ~rejected & (model == name) & (need > limit)
            if over.any():
                reject[over] = [f"prompt needs ~{k} tokens (input + max output), over "
                                f"{name}'s {self._context_kind[name]} of {limit}"
                                for k in need[over]]
                rejected |= over
        reason[rejected] = None

        return _assemble(batch, reject, model, reason, scores, self.router.info, threshold,
                         est_in, est_out)


def rule_mask(rule: Rule, text: pa.Array, batch: pa.Table) -> np.ndarray:
    """Rows matching every condition of ``rule`` (vectorised Arrow compute)."""
    n = len(text)
    mask = np.ones(n, dtype=bool)
    filled = pc.fill_null(text, "")
    if rule.min_chars is not None or rule.max_chars is not None:
        length = pc.utf8_length(filled).to_numpy(zero_copy_only=False)
        if rule.min_chars is not None:
            mask &= length >= rule.min_chars
        if rule.max_chars is not None:
            mask &= length <= rule.max_chars
    if rule.contains_code is not None:
        code = pc.match_substring_regex(filled, "(?m)" + CODE_PATTERN).to_numpy(
            zero_copy_only=False)
        mask &= code if rule.contains_code else ~code
    if rule.regex is not None:
        mask &= pc.match_substring_regex(filled, rule.regex).to_numpy(zero_copy_only=False)
    if rule.tag is not None:
        tags = batch.column("tags").combine_chunks()
        flat = pc.list_flatten(tags)
        parents = pc.list_parent_indices(tags).to_numpy(zero_copy_only=False)
        hit = np.zeros(n, dtype=bool)
        hit[parents[pc.equal(flat, rule.tag).to_numpy(zero_copy_only=False)]] = True
        mask &= hit
    return mask


def estimate_tokens(batch: pa.Table, text: pa.Array,
                    default_max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) token estimates: 4 characters per token plus a few per message, and
    the row's max_tokens or the job default."""
    chars = pc.fill_null(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
    n_msgs = pc.fill_null(pc.list_value_length(batch.column("messages")), 1).to_numpy(
        zero_copy_only=False)
    est_in = -(-chars.astype(np.int64) // CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * n_msgs
    est_out = pc.fill_null(batch.column("max_tokens"), default_max_tokens).to_numpy(
        zero_copy_only=False).astype(np.int64)
    return est_in.astype(np.int64), est_out


def _assemble(batch: pa.Table, reject: np.ndarray, model: np.ndarray, reason: np.ndarray,
              scores: np.ndarray, info: RouterInfo, threshold: np.ndarray,
              est_in: np.ndarray, est_out: np.ndarray) -> pa.Table:
    n, m = scores.shape
    names = pa.array(info.models, pa.string()).take(pa.array(np.tile(np.arange(m), n)))
    score_structs = pa.StructArray.from_arrays(
        [names, pa.array(scores.ravel(), pa.float32())], fields=list(schemas.ROUTER_SCORE))
    router_scores = pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * m + 1, m, dtype=np.int32)), score_structs)
    cols = {name: batch.column(name) for name in schemas.REQUESTS.names}
    cols["reject_reason"] = pa.array(reject, pa.string())
    cols.update(
        model=pa.array(model, pa.string()),
        route_reason=pa.array(reason, pa.string()),
        router_scores=router_scores,
        threshold=pa.array(threshold, pa.float32(), from_pandas=True),
        router_version=pa.repeat(pa.scalar(info.version, pa.string()), n),
        est_input_tokens=pa.array(est_in, pa.int64()),
        est_output_tokens=pa.array(est_out, pa.int64()),
    )
    return pa.table(cols, schema=schemas.ROUTED)

