"""Route stage: ``requests`` table in, ``routed`` table out, vectorised over the whole batch.

Order of decision for each row, first match wins:
1. already rejected by the source stage (reason kept, no model);
2. ``force_model`` from the row (rejected if it names no catalog model);
3. the job's ``[router] stages`` in order, each deciding some of the rows still open and
   passing the rest on (a cascade):
   - ``rules``: the job's rules in file order; rows no rule matches pass on;
   - ``classifier``: the ONNX router's predicted success per model, and the policy: the
     cheapest model whose predicted success relative to the strongest model's (``policy =
     "relative"``, the default) or whose predicted success (``"success"``) clears its
     threshold, else the strongest;
   - ``similarity``: the same policy on success predicted from the nearest past prompts in a
     memory bank (:mod:`batchroute.routers.similarity`); rows with no close neighbour pass on;
   - ``llm``: a cheap model asked, through its own dispatcher, how hard the prompt is;
   a classifier or similarity stage with an ``uncertain = [low, high]`` band passes on the rows
   whose predicted success of the cheapest model falls in the band;
4. rows no stage decided go to ``[router] fallback`` (default: the strongest model).
Then a row whose estimated tokens do not fit its model's context window (or one minute of its
TPM) is rejected with the numbers.

Every row records the stage that decided (``route_stage``), the detail (``route_reason``) and
each stage's evidence: classifier scores, nearest-neighbour scores and similarity, the llm's
label and what asking it cost.

The classifier runs once per batch on every row: one scoring call over the batch is cheaper
than slicing out the rows that need it, and the scores are evidence worth keeping on every row. Similarity
and llm run only on the rows still open when their turn comes: they cost more per row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchroute import schemas, tokens
from batchroute.config import (
    DEFAULT_POLICY,
    ClassifierConfig,
    JobConfig,
    LLMRouterConfig,
    Rule,
    SimilarityConfig,
)
from batchroute.errors import RouterError
from batchroute.routers.classifier import Router, RouterInfo
from batchroute.stages.source import request_text

if TYPE_CHECKING:
    from batchroute.routers.similarity import TextEmbedder

# Fenced blocks or a language keyword at a line start: cheap and precise enough for routing.
CODE_PATTERN = (r"```|^\s*(def |class |import |from \S+ import|#include|public static|"
                r"func |fn |let |const |function |SELECT |CREATE TABLE|package )")


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know about one catalog model."""

    name: str
    price: float  # input + output USD per million tokens, used to order candidates
    context_window: int
    tpm: int


@dataclass(frozen=True)
class RouteSpec:
    """The route stage's own configuration, small and picklable for Ray actors."""

    targets: tuple[Candidate, ...]
    rules: tuple[Rule, ...]
    thresholds: Mapping[str, float]  # job overrides; router defaults fill the rest
    default_max_tokens: int
    stages: tuple[str, ...] = ("rules", "classifier")
    policy: str = DEFAULT_POLICY  # "relative" or "success": see RouterConfig.policy
    fallback: str = ""  # "" = the strongest (dearest) target
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    llm: LLMRouterConfig = field(default_factory=LLMRouterConfig)
    # What every request sends besides its own text ([task] system prompt and output schema):
    # counted in its estimated input tokens, as the provider counts it.
    extra_chars: int = 0
    extra_messages: int = 0
    # A spend cap ([router] budget_usd or max_strong_share) reassigns the scored rows itself,
    # so no threshold, and no policy, decides them.
    capped: bool = False

    @classmethod
    def from_job(cls, job: JobConfig) -> RouteSpec:
        targets = tuple(Candidate(m.name, m.input_usd_per_mtok + m.output_usd_per_mtok,
                               m.context_window, m.tpm) for m in job.models.values())
        r = job.router
        return cls(targets, r.rules, dict(r.thresholds), job.dispatch.default_max_tokens,
                   stages=r.stages, policy=r.policy, fallback=r.fallback,
                   classifier=r.classifier,
                   similarity=r.similarity, llm=r.llm,
                   extra_chars=job.task.fixed_input_chars(),
                   extra_messages=1 if job.task.system else 0,
                   capped=r.budget_usd is not None or r.max_strong_share is not None)

    @property
    def uses_classifier(self) -> bool:
        return "classifier" in self.stages

    @property
    def fallback_model(self) -> str:
        return self.fallback or max(self.targets, key=lambda t: t.price).name


def check_compatible(info: RouterInfo, spec: RouteSpec, *, path: str) -> None:
    """Refuse a router that names a model the job's catalog lacks, or whose thresholds were
    set for another policy than the job's while the job still takes one of them from it
    (a job that sets every threshold below the strongest model takes none, and neither does a
    job with a spend cap)."""
    known = {t.name for t in spec.targets}
    missing = [m for m in info.models if m not in known]
    if missing:
        raise RouterError(f"router file {path}: model {missing[0]!r} is not in the job's "
                          f"catalog (catalog: {', '.join(sorted(known))})")
    calibrated = thresholds_policy(info)
    price = {t.name: t.price for t in spec.targets}
    strongest = max(info.models, key=lambda m: price[m])
    from_file = [m for m in info.models if m != strongest and m not in spec.thresholds]
    if calibrated and calibrated != spec.policy and from_file and not spec.capped:
        raise RouterError(
            f"router file {path}: its thresholds were set for router policy "
            f"{calibrated!r} but the job uses {spec.policy!r}; set [router] policy = "
            f"{calibrated!r}, give [router.thresholds] for {', '.join(from_file)}, or "
            f"recalibrate with --policy {spec.policy}")


@dataclass
class _Decisions:
    """One batch's decisions so far, filled in stage by stage."""

    n: int
    decided: np.ndarray
    model: np.ndarray
    stage: np.ndarray
    reason: np.ndarray
    threshold: np.ndarray
    evidence: dict[str, Any] = field(default_factory=dict)

    def decide(self, rows: np.ndarray, model: Any, stage: str, reason: Any) -> None:
        self.model[rows] = model
        self.stage[rows] = stage
        self.reason[rows] = reason
        self.decided |= rows


def relative(scores: np.ndarray) -> np.ndarray:
    """Predicted success relative to the last column's (the strongest model's):
    1 - (P(strongest) - P(model)), clipped to [0, 1]; ``scores`` ordered cheapest first."""
    if not len(scores):
        return scores
    rel: np.ndarray = np.clip(1.0 - (scores[:, -1:] - scores), 0.0, 1.0)
    return rel


class _Policy:
    """Cheapest model whose predicted success (or, with ``policy = "relative"``, success
    relative to the strongest model's) clears its threshold, else the strongest."""

    def __init__(self, models: tuple[str, ...], spec: RouteSpec,
                 defaults: Mapping[str, float]) -> None:
        price = {t.name: t.price for t in spec.targets}
        self.order = np.array(sorted(range(len(models)), key=lambda j: price[models[j]]),
                              np.int64)
        self.names = np.array([models[j] for j in self.order], dtype=object)
        thresholds = {**defaults, **spec.thresholds}
        self.thresholds = np.array([thresholds.get(n, 0.5) for n in self.names], np.float32)
        self.thresholds[-1] = 0.0  # the strongest (dearest) model always clears
        self.relative = spec.policy == "relative"

    def ordered(self, scores: np.ndarray) -> np.ndarray:
        """``scores`` cheapest first, as the thresholds apply to them."""
        out = scores[:, self.order] if len(scores) else scores
        return relative(out) if self.relative else out

    def choose(self, scores: np.ndarray) -> np.ndarray:
        """Index into ``names`` of the chosen model for each row of ``scores``."""
        if not len(scores):
            return np.zeros(0, np.int64)
        first: np.ndarray = np.argmax(self.ordered(scores) >= self.thresholds, axis=1)
        return first

    def cheapest(self, scores: np.ndarray) -> np.ndarray:
        """What the cheapest model's threshold applies to (for uncertain bands)."""
        return self.ordered(scores)[:, 0] if len(scores) else np.zeros(0, np.float32)


def thresholds_policy(info: RouterInfo) -> str:
    """The policy a router file's thresholds were set for: its ``policy`` metadata (written
    by train and calibrate), else its calibration's; a file with neither was trained before
    policies were recorded, when train's default thresholds were for "success". "" for a
    file without thresholds."""
    import json

    if info.metadata.get("policy"):
        return info.metadata["policy"]
    raw = info.metadata.get("calibration")
    if raw:
        return str(json.loads(raw).get("policy", "success"))
    return "success" if info.thresholds else ""


def _band_mask(values: np.ndarray, band: tuple[float, float] | None) -> np.ndarray:
    if band is None:
        return np.zeros(len(values), bool)
    return (values >= band[0]) & (values <= band[1])


class RouteStage:
    """A callable for a routing actor: loads what its stages need once, routes whole batches.

    ``embedder`` and ``ask`` are seams: the similarity stage's sentence embedder (default: the
    packaged MiniLM) and the llm stage's way to call its model (in the job: that model's
    dispatch actor; in ``batchroute eval``: an in-process dispatcher).
    """

    def __init__(self, router_bytes: bytes | None, spec: RouteSpec,
                 router_path: str = "<router>", *, embedder: TextEmbedder | None = None,
                 ask: Callable[[pa.Table], pa.Table] | None = None) -> None:
        self.spec = spec
        self.router: Router | None = None
        if spec.uses_classifier:
            if router_bytes is None:
                raise RouterError("router.stages has 'classifier' but no router file was given")
            self.router = Router(router_bytes, path=router_path)
            check_compatible(self.router.info, spec, path=router_path)
            self._policy = _Policy(self.router.info.models, spec, self.router.info.thresholds)

        self._similarity: Any = None
        if "similarity" in spec.stages:
            from batchroute.routers.similarity import Neighbours

            self._similarity = Neighbours.open(
                spec.similarity, [t.name for t in spec.targets], embedder=embedder)
            self._sim_policy = _Policy(self._similarity.models, spec, {})
        self._llm: Any = None
        if "llm" in spec.stages:
            from batchroute.routers.llm import DecisionCache, LLMRouter

            if ask is None:
                raise RouterError("router.stages has 'llm' but nothing to ask it with")
            cfg = spec.llm
            self._llm = LLMRouter(model=cfg.model, labels_to_models=cfg.labels,
                                  default=cfg.default, ask=ask,
                                  cache=DecisionCache(cfg.cache or None),
                                  max_tokens=cfg.max_tokens)
        self._context = {t.name: min(t.context_window, t.tpm) for t in spec.targets}
        self._context_kind = {t.name: ("context window" if t.context_window <= t.tpm
                                       else "tokens-per-minute limit") for t in spec.targets}

    def flush(self) -> None:
        """Write what the stages buffer (the llm router's cache of decisions)."""
        if self._llm is not None:
            self._llm.close()

    @property
    def version(self) -> str:
        return self.router.info.version if self.router is not None else ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        text = request_text(batch)
        reject = batch.column("reject_reason").to_numpy(zero_copy_only=False).astype(object)
        rejected = pc.is_valid(batch.column("reject_reason")).to_numpy(zero_copy_only=False)
        st = _Decisions(n, rejected.copy(), np.full(n, None, object), np.full(n, None, object),
                        np.full(n, None, object), np.full(n, np.nan, np.float32))
        est_in, est_out = estimate_tokens(batch, text, self.spec.default_max_tokens,
                                          self.spec.extra_chars, self.spec.extra_messages)

        forced = batch.column("force_model").to_numpy(zero_copy_only=False)
        has_force = ~st.decided & pc.is_valid(batch.column("force_model")).to_numpy(
            zero_copy_only=False)
        if has_force.any():
            known = np.isin(forced, [t.name for t in self.spec.targets])
            bad = has_force & ~known
            reject[bad] = [f"force_model {f!r} is not in the catalog" for f in forced[bad]]
            rejected |= bad
            st.decided |= bad
            st.decide(has_force & known, forced[has_force & known], "forced", "forced")

        if self.router is not None:
            st.evidence["router_scores"] = self.router.score(text)
        for stage in self.spec.stages:
            if st.decided.all():
                break
            if stage == "rules":
                for rule in self.spec.rules:
                    hit = ~st.decided & rule_mask(rule, text, batch, est_in)
                    st.decide(hit, rule.model, "rules", f"rule:{rule.name}")
            elif stage == "classifier":
                self._apply_policy(st, "classifier", st.evidence["router_scores"],
                                   ~st.decided, self._policy, self.spec.classifier.uncertain)
            elif stage == "similarity":
                self._similar(st, text)
            elif stage == "llm":
                self._ask(st, text)
        rest = ~st.decided
        st.decide(rest, self.spec.fallback_model, "fallback", "fallback")

        need = est_in + est_out
        for name, limit in self._context.items():
            over = ~rejected & (st.model == name) & (need > limit)
            if over.any():
                reject[over] = [f"prompt needs ~{k} tokens (input + max output), over "
                                f"{name}'s {self._context_kind[name]} of {limit}"
                                for k in need[over]]
                rejected |= over
        st.reason[rejected] = None
        st.stage[rejected] = None
        return self._assemble(batch, reject, st, est_in, est_out)

    def _apply_policy(self, st: _Decisions, stage: str, scores: np.ndarray, rows: np.ndarray,
                      policy: _Policy, band: tuple[float, float] | None) -> None:
        idx = np.flatnonzero(rows)
        if not len(idx):
            return
        sub = scores[idx]
        idx = idx[~_band_mask(policy.cheapest(sub), band)]
        if not len(idx):
            return
        first = policy.choose(scores[idx])
        mask = np.zeros(st.n, bool)
        mask[idx] = True
        last = len(policy.names) - 1
        st.decide(mask, policy.names[first], stage,
                  np.where(first == last, "fallback", stage))
        st.threshold[idx] = policy.thresholds[first]

    def _similar(self, st: _Decisions, text: pa.Array) -> None:
        idx = np.flatnonzero(~st.decided)
        if not len(idx):
            return
        sim = self._similarity
        scores, top, found = sim.predict(text.take(pa.array(idx)))
        full = np.full((st.n, len(sim.models)), np.nan, np.float32)
        full[idx] = scores
        top_full = np.full(st.n, np.nan, np.float32)
        top_full[idx] = top
        st.evidence["similarity_scores"] = (full, sim.models)
        st.evidence["neighbour_similarity"] = top_full
        rows = np.zeros(st.n, bool)
        rows[idx[found]] = True
        self._apply_policy(st, "similarity", full, rows, self._sim_policy,
                           self.spec.similarity.uncertain)

    def _ask(self, st: _Decisions, text: pa.Array) -> None:
        idx = np.flatnonzero(~st.decided)
        if not len(idx):
            return
        d = self._llm.decide(text.take(pa.array(idx)))
        labels = np.full(st.n, None, object)
        labels[idx] = d.label
        cost = np.zeros(st.n, np.int64)
        cost[idx] = d.cost_micro_usd
        st.evidence["llm_label"] = labels
        st.evidence["route_cost_micro_usd"] = cost
        mask = np.zeros(st.n, bool)
        mask[idx] = True
        labelled = pc.binary_join_element_wise("llm:", pa.array(d.label, pa.string()), "")
        reason = np.where(d.fallback, "llm:default",
                          labelled.to_numpy(zero_copy_only=False).astype(object))
        st.decide(mask, d.model, "llm", reason)

    def _assemble(self, batch: pa.Table, reject: np.ndarray, st: _Decisions, est_in: np.ndarray,
                  est_out: np.ndarray) -> pa.Table:
        n = st.n
        cols = {name: batch.column(name) for name in schemas.REQUESTS.names}
        # Columns the source stage carries for the results (the id column, keep_columns).
        carried = [f for f in batch.schema if f.name not in schemas.REQUESTS.names]
        cols["reject_reason"] = pa.array(reject, pa.string())
        if self.router is not None:
            router_scores = _score_lists(st.evidence["router_scores"], self.router.info.models)
        else:
            router_scores = pa.nulls(n, pa.list_(schemas.ROUTER_SCORE))
        if "similarity_scores" in st.evidence:
            scores, models = st.evidence["similarity_scores"]
            similarity = _score_lists(scores, models, valid=~np.isnan(scores[:, 0]))
        else:
            similarity = pa.nulls(n, pa.list_(schemas.ROUTER_SCORE))
        cols.update(
            model=pa.array(st.model, pa.string()),
            route_reason=pa.array(st.reason, pa.string()),
            router_scores=router_scores,
            threshold=pa.array(st.threshold, pa.float32(), from_pandas=True),
            router_version=pa.repeat(pa.scalar(self.version or None, pa.string()), n),
            est_input_tokens=pa.array(est_in, pa.int64()),
            est_output_tokens=pa.array(est_out, pa.int64()),
            route_stage=pa.array(st.stage, pa.string()),
            similarity_scores=similarity,
            neighbour_similarity=pa.array(
                st.evidence.get("neighbour_similarity", np.full(n, np.nan, np.float32)),
                pa.float32(), from_pandas=True),
            llm_label=pa.array(st.evidence.get("llm_label", np.full(n, None, object)),
                               pa.string()),
            route_cost_micro_usd=pa.array(
                st.evidence.get("route_cost_micro_usd", np.zeros(n, np.int64)), pa.int64()),
        )
        table = pa.table(cols, schema=schemas.ROUTED)
        for f in carried:
            table = table.append_column(f, batch.column(f.name))
        return table


def _score_lists(scores: np.ndarray, models: tuple[str, ...],
                 valid: np.ndarray | None = None) -> pa.Array:
    """[n, m] scores as list<struct<model, score>> per row (null rows where not ``valid``)."""
    n, m = scores.shape if scores.ndim == 2 else (0, len(models))
    names = pa.array(models, pa.string()).take(pa.array(np.tile(np.arange(m), n)))
    structs = pa.StructArray.from_arrays(
        [names, pa.array(scores.ravel(), pa.float32())], fields=list(schemas.ROUTER_SCORE))
    offsets = pa.array(np.arange(0, n * m + 1, m, dtype=np.int32))
    if valid is None:
        return pa.ListArray.from_arrays(offsets, structs)
    return pa.ListArray.from_arrays(offsets, structs, mask=pa.array(~valid))


def rule_mask(rule: Rule, text: pa.Array, batch: pa.Table,
              est_tokens: np.ndarray | None = None) -> np.ndarray:
    """Rows matching every condition of ``rule`` (vectorised Arrow compute)."""
    n = len(text)
    mask = np.ones(n, dtype=bool)
    filled = pc.fill_null(text, "")
    if rule.min_tokens is not None or rule.max_tokens is not None:
        if est_tokens is None:
            est_tokens = estimate_tokens(batch, text, 0)[0]
        if rule.min_tokens is not None:
            mask &= est_tokens >= rule.min_tokens
        if rule.max_tokens is not None:
            mask &= est_tokens <= rule.max_tokens
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


def estimate_tokens(batch: pa.Table, text: pa.Array, default_max_tokens: int,
                    extra_chars: int = 0, extra_messages: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) token estimates (:mod:`batchroute.tokens`), and the row's max_tokens or
    the job default. ``extra_chars`` in ``extra_messages`` go with every request (a system
    prompt, an output schema)."""
    chars = pc.fill_null(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
    n_msgs = pc.fill_null(pc.list_value_length(batch.column("messages")), 1).to_numpy(
        zero_copy_only=False)
    est_in = tokens.input_estimate(chars.astype(np.int64) + extra_chars,
                                   n_msgs.astype(np.int64) + extra_messages)
    est_out = pc.fill_null(batch.column("max_tokens"), default_max_tokens).to_numpy(
        zero_copy_only=False).astype(np.int64)
    return est_in.astype(np.int64), est_out
