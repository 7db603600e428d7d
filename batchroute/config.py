"""The job file: one TOML document parsed once into frozen, validated objects.

Every problem is a :class:`~batchroute.errors.ConfigError` raised at load time whose message
names the offending key (``models.gpt-4o.rpm``), so nothing is spent before a typo is caught.
Secrets are never in the file: a model names the environment variable that holds its key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchroute.errors import ConfigError

if TYPE_CHECKING:
    from batchroute.task import TaskConfig

PROVIDERS = ("openai", "anthropic")
TIERS = ("sync", "batch", "flex")
DISCOUNTED_TIERS = ("batch", "flex")  # billed at batch_discount off
_RESOLVED_PRICE = {"input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
                   "cache_write_input_usd_per_mtok", "batch_discount"}
# Integers a job file may hold: what Arrow and numpy hold in an int64 (TOML allows more).
MAX_INT = 2**63 - 1
# A token budget travels as an int32 (schemas.REQUESTS.max_tokens).
MAX_TOKENS = 2**31 - 1
# A dollar a token: far above any real price, and low enough that a row's cost in
# micro-dollars stays an exact integer.
MAX_USD_PER_MTOK = 1_000_000.0
BUNDLED_ROUTER = str(Path(__file__).resolve().parent / "assets" / "router.onnx")
# Real outcomes of two models on MMLU questions, shipped with the package (batchroute/data/README.md
# has their provenance): the demo's questions, the bundled router's training data, the tests' labels.
MMLU_LABELS = str(Path(__file__).resolve().parent / "data" / "mmlu_labels.parquet")


@dataclass(frozen=True)
class Price:
    """What a model costs per million tokens from ``effective_from`` (None: since always)
    until the next entry of its schedule takes over."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cached_input_usd_per_mtok: float | None = None  # None: cached prompt tokens cost as input
    # Prompt tokens written to the cache (Anthropic bills them at 1.25x input); None: as input.
    cache_write_input_usd_per_mtok: float | None = None
    # Share taken off every token price of calls billed at the batch or flex tier.
    batch_discount: float = 0.0
    effective_from: date | None = None


@dataclass(frozen=True)
class ModelConfig:
    """One catalog entry: where a model lives, what it costs and how fast it may be called."""

    name: str
    provider: str
    base_url: str
    api_key_env: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    rpm: int
    tpm: int
    # Concurrency bounds open connections; too low and latency caps throughput below RPM
    # (throughput <= concurrency / latency), too high and a provider hiccup strands many calls.
    concurrency: int = 64
    context_window: int = 128_000
    timeout_s: float = 60.0
    remote_name: str = ""
    # The price schedule, oldest first; the price fields above are the entry in force on the
    # run's date (see priced_on).
    prices: tuple[Price, ...] = ()
    cached_input_usd_per_mtok: float | None = None
    cache_write_input_usd_per_mtok: float | None = None
    batch_discount: float = 0.0
    # How the model is called: "sync" (one request per row, full price), "batch" (the
    # provider's batch API: files of requests answered within 24 h, at batch_discount off) or
    # "flex" (OpenAI's service_tier=flex: synchronous calls at batch prices that may be
    # refused as resource-unavailable).
    tier: str = "sync"
    # The provider's cap on tokens queued in this model's unfinished batches (OpenAI's
    # enqueued-token limit); 0: none known. Files are submitted as earlier ones finish.
    batch_queue_tokens: int = 0
    # The expected time a batch takes, for the plan's wall-time forecast.
    batch_turnaround_s: float = 3600.0
    # Requests per batch file; 0: the provider's limit (OpenAI 50,000, Anthropic 100,000).
    batch_max_lines: int = 0
    # flex: a row still refused after its attempts goes to the standard tier at full price.
    flex_fallback: bool = False
    # The shortest prefix the provider caches (Anthropic: 1,024 tokens for most models, 2,048
    # for Haiku; OpenAI: 1,024): a shorter one is sent unmarked and forecast uncached.
    cache_min_tokens: int = 1024
    # How structured output ([task.output]) is asked for: "json_schema" (OpenAI strict
    # response_format), "tool" (Anthropic's forced tool), "vllm" (vLLM's structured_outputs),
    # "vllm-guided" (vLLM before 0.12: guided_choice / guided_json). "" until parsed.
    structured_output: str = ""
    # The name of the output-token cap on the wire: "max_tokens", or "max_completion_tokens"
    # (OpenAI's reasoning models, the o-series and GPT-5, refuse max_tokens). "" until parsed:
    # the model's family decides, and an explicit value wins.
    token_param: str = ""
    reasoning_effort: str = ""  # OpenAI reasoning models: minimal, low, medium or high
    thinking_budget_tokens: int = 0  # Anthropic extended thinking; 0: off
    # How the key is presented: "bearer" (Authorization: Bearer, OpenAI and compatible
    # servers), "api-key" (Azure OpenAI), "x-api-key" (Anthropic). "" until parsed.
    auth: str = ""
    api_version: str = ""  # Azure OpenAI: sent as the api-version query parameter

    @property
    def reasoning(self) -> bool:
        """A reasoning model: it thinks in billed output tokens and takes no temperature."""
        return self.token_param == "max_completion_tokens" or self.thinking_budget_tokens > 0

    @property
    def wire_name(self) -> str:
        """The model id sent to the provider (defaults to the catalog name)."""
        return self.remote_name or self.name

    def price_on(self, day: date) -> Price:
        """The schedule's entry in force on ``day``. Raises ConfigError when there is none:
        a model without a price would be counted as free."""
        current = None
        for price in self.prices:
            if price.effective_from is None or price.effective_from <= day:
                current = price
        if current is None:
            first = min(p.effective_from for p in self.prices if p.effective_from)
            raise ConfigError(f"models.{self.name}: no price in force on {day.isoformat()} "
                              f"(the first takes effect on {first.isoformat()})")
        return current

    def priced_on(self, day: date) -> ModelConfig:
        """This model with the prices in force on ``day``."""
        p = self.price_on(day)
        return replace(self, input_usd_per_mtok=p.input_usd_per_mtok,
                       output_usd_per_mtok=p.output_usd_per_mtok,
                       cached_input_usd_per_mtok=p.cached_input_usd_per_mtok,
                       cache_write_input_usd_per_mtok=p.cache_write_input_usd_per_mtok,
                       batch_discount=p.batch_discount)

    @property
    def cached_price(self) -> float:
        """Per million prompt tokens read from the provider's cache."""
        return (self.input_usd_per_mtok if self.cached_input_usd_per_mtok is None
                else self.cached_input_usd_per_mtok)

    @property
    def cache_write_price(self) -> float:
        """Per million prompt tokens written to the provider's cache."""
        return (self.input_usd_per_mtok if self.cache_write_input_usd_per_mtok is None
                else self.cache_write_input_usd_per_mtok)

    def cost_usd(self, input_tokens: float, output_tokens: float,
                 cached_input_tokens: float = 0, cache_write_input_tokens: float = 0, *,
                 tier: str = "sync") -> float:
        """The exact cost of a call billed at ``tier``: the batch and flex tiers take
        ``batch_discount`` off every price. ``cached_input_tokens`` (read from the
        provider's prompt cache) and ``cache_write_input_tokens`` (written to it) are parts
        of ``input_tokens``, each at its own price."""
        uncached = input_tokens - cached_input_tokens - cache_write_input_tokens
        full = (uncached * self.input_usd_per_mtok
                + cached_input_tokens * self.cached_price
                + cache_write_input_tokens * self.cache_write_price
                + output_tokens * self.output_usd_per_mtok)
        discount = self.batch_discount if tier in DISCOUNTED_TIERS else 0.0
        return full * (1.0 - discount) / 1e6

    def cost_micro_usd(self, input_tokens: int, output_tokens: int,
                       cached_input_tokens: int = 0, cache_write_input_tokens: int = 0, *,
                       tier: str = "sync") -> int:
        """The cost in whole micro-dollars (rounded half to even): what result rows record,
        so that any sum of them is exact."""
        return round(self.cost_usd(input_tokens, output_tokens, cached_input_tokens,
                                   cache_write_input_tokens, tier=tier) * 1e6)


@dataclass(frozen=True)
class Rule:
    """A routing rule: rows matching every given condition go to ``model``."""

    name: str
    model: str
    contains_code: bool | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    # Estimated prompt tokens (4 characters per token, as the limits estimate them).
    min_tokens: int | None = None
    max_tokens: int | None = None
    regex: str | None = None
    tag: str | None = None


ROUTER_STAGES = ("rules", "similarity", "classifier", "llm")
# The similarity router's sentence embedders (routers/similarity.py's embedder_for).
SIMILARITY_FEATURES = ("static", "minilm")
POLICIES = ("success", "relative")
# The default [router] policy: the best measured ordering, in domain and on the out-of-domain
# checks (README, "The router"; `batchroute eval --robustness`).
DEFAULT_POLICY = "relative"


@dataclass(frozen=True)
class SimilarityConfig:
    """Nearest neighbours in a bank of past prompts with known outcomes (batchroute memory)."""

    bank: str = ""
    k: int = 16
    # Neighbours less similar than this (cosine) are ignored; a row with none passes on.
    min_similarity: float = 0.3
    # exact (matrix product), ivf (inverted file, batchroute.routers.ivf) or hnsw (faiss), or
    # auto: ivf from 50,000 bank entries.
    index: str = "auto"
    # Lists an ivf search reads per prompt, of about 4·sqrt(bank) lists: more finds more of
    # the true nearest neighbours and costs time in proportion (README, "Static embeddings":
    # top-32 recall 0.954 at 24, 0.964 at 32, 0.975 at 48 on a million-entry bank).
    nprobe: int = 32
    # The sentence embedder: "static" (word vectors distilled from MiniLM) or "minilm" (the
    # transformer); "" takes the one the bank was built with.
    features: str = ""
    # Rows whose predicted success of the cheapest model (what its threshold applies to: under
    # policy = "relative", relative to the strongest model's) falls in [low, high] pass on to
    # the next stage (a cascade's uncertain band); None: this stage decides every row it sees.
    uncertain: tuple[float, float] | None = None


@dataclass(frozen=True)
class ClassifierConfig:
    uncertain: tuple[float, float] | None = None


@dataclass(frozen=True)
class LLMRouterConfig:
    """Ask a cheap catalog model, through its own dispatcher and limits, how hard a prompt is."""

    model: str = ""
    # Answer label -> catalog model, in order from easiest to hardest.
    labels: Mapping[str, str] = field(default_factory=dict)
    default: str = ""  # where a row goes when the answer cannot be parsed or the call failed
    cache: str = ""  # a folder of Parquet decisions keyed by prompt hash; "" = no cache
    max_tokens: int = 16


@dataclass(frozen=True)
class RouterConfig:
    path: str = BUNDLED_ROUTER
    # The deciding stages in order: each decides some rows and passes the rest on.
    stages: tuple[str, ...] = ("rules", "classifier")
    # Per-model thresholds on predicted success (classifier and similarity); unset ones come
    # from the router file.
    thresholds: Mapping[str, float] = field(default_factory=dict)
    # What the thresholds apply to. "relative" (the default): each model's predicted success
    # relative to the strongest model's, 1 - (P(strongest) - P(model)), so a prompt both would
    # fail stays cheap. "success": each model's predicted success (the cheapest model whose
    # P(success) >= its threshold).
    policy: str = DEFAULT_POLICY
    rules: tuple[Rule, ...] = ()
    # Where rows no stage decided go; "" = the strongest (dearest) catalog model.
    fallback: str = ""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    llm: LLMRouterConfig = field(default_factory=LLMRouterConfig)
    # Rows per scoring call: larger batches amortise call overhead (an embedding router's graph
    # pads every row to the batch's longest prompt, so there very large batches waste work).
    batch_size: int = 1024
    # Routing actors. Each holds one router (numpy or a single-threaded onnxruntime session)
    # and one CPU; more than the cluster's CPUs are not started.
    actors: int = 1
    # A spend cap solved over the whole batch instead of thresholds (batchroute.stages.budget):
    # the night's estimated dollars, or the share of rows on the strongest model.
    budget_usd: float | None = None
    max_strong_share: float | None = None


@dataclass(frozen=True)
class DispatchConfig:
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    default_max_tokens: int = 512
    # Rows per call into a model's dispatch actor. Each call's results are committed as one
    # shard, so this also bounds what a crash can lose.
    batch_rows: int = 256
    # Calls kept in flight per model; with batch_rows this must cover the model's concurrency,
    # or the limiter idles between batches.
    batches_in_flight: int = 4
    # Longest Retry-After honoured as asked; a provider asking for more is waited this long
    # and the attempt budget decides the rest, so one odd header cannot stall a nightly job.
    max_retry_after_s: float = 120.0
    # Outcomes that re-send a row to the next model up the ladder: "length" (the answer was
    # cut at max_tokens), "refusal", "failed" (retries exhausted or a terminal error; a
    # refused key is never escalated). Empty: no escalation.
    escalate_on: tuple[str, ...] = ()
    # Models from cheapest to dearest; by default the whole catalog ordered by price.
    escalation_ladder: tuple[str, ...] = ()
    # When batch-tier answers are due: "6h" after the run started, or an ISO 8601 time
    # ("2026-12-02T06:00:00+00:00"). Batches unfinished then are cancelled, their completed
    # lines kept, and the rest sent synchronously at full price. "": none.
    deadline: str = ""

    def deadline_at(self, started: datetime) -> datetime | None:
        """The deadline of a run that started at ``started`` (UTC), or None."""
        if not self.deadline:
            return None
        if self.deadline[0].isdigit() and not _ISO_DATE.match(self.deadline):
            return started + timedelta(seconds=duration_s(self.deadline, "dispatch.deadline"))
        return _iso_time(self.deadline)

    def escalates_to(self, model: str) -> str | None:
        """The model a row escalates to from ``model``, or None."""
        if not self.escalate_on or model not in self.escalation_ladder:
            return None
        i = self.escalation_ladder.index(model)
        return self.escalation_ladder[i + 1] if i + 1 < len(self.escalation_ladder) else None


@dataclass(frozen=True)
class QualityConfig:
    """[quality]: shadow checks. A seeded sample of the rows answered below the reference
    model, stratified by model and route stage, is also sent to the reference model and
    compared (labels and JSON field by field; free text graded by ``judge``)."""

    # Share of the rows answered below the reference model that are shadowed; 0: off.
    shadow_share: float = 0.0
    # For free text: the catalog model asked to grade an answer against the reference's.
    judge: str = ""
    # Flag the run when the retained quality's upper bound falls below this (None: never).
    min_retained: float | None = None
    seed: int = 0

    @property
    def on(self) -> bool:
        return self.shadow_share > 0.0


@dataclass(frozen=True)
class JobConfig:
    name: str
    input: str
    output: str
    models: Mapping[str, ModelConfig]
    reference_model: str
    router: RouterConfig
    dispatch: DispatchConfig
    source: str = ""
    text: str = ""  # the job file as written; kept in the run folder so a run can resume
    # The input column that identifies a row (string or integer); results carry it as is.
    id_column: str = "request_id"
    task: TaskConfig = field(default_factory=lambda: _no_task())
    # Output tokens per input token for the counterfactual when the reference model itself
    # answered nothing in a run (otherwise its observed ratio is used).
    reference_output_ratio: float | None = None
    quality: QualityConfig = field(default_factory=QualityConfig)

    def priced_on(self, day: date) -> JobConfig:
        """The job with every model's prices in force on ``day`` (ConfigError if a model has
        none)."""
        return replace(self, models={k: m.priced_on(day) for k, m in self.models.items()})

    @property
    def config_hash(self) -> str:
        """Hash of everything that changes answers or costs (not input/output locations)."""
        # The price schedule, not the prices resolved for one day: a run resumed the next
        # day is the same run.
        doc = {
            "models": {k: {f: x for f, x in asdict(v).items() if f not in _RESOLVED_PRICE}
                       for k, v in sorted(self.models.items())},
            "reference_model": self.reference_model,
            "reference_output_ratio": self.reference_output_ratio,
            "router": asdict(self.router),
            "dispatch": asdict(self.dispatch),
            "id_column": self.id_column,
            "task": asdict(self.task),
        }
        if self.quality != QualityConfig():  # hashes of jobs without [quality] stay as they were
            doc["quality"] = asdict(self.quality)
        blob = json.dumps(doc, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _no_task() -> TaskConfig:
    from batchroute.task import TaskConfig

    return TaskConfig()


def load(path: str | Path, *, input_override: str | None = None,
         output_override: str | None = None, router_override: str | None = None) -> JobConfig:
    """Parse and validate a job file. Raises ConfigError naming the key at fault."""
    p = Path(path)
    try:
        text = p.read_text()
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"job file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        job = parse(raw, source=str(p), input_override=input_override,
                    output_override=output_override)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    if router_override:
        job = replace(job, router=replace(job.router, path=router_override))
    return replace(job, text=text)


def parse(raw: Mapping[str, Any], *, source: str = "<memory>", input_override: str | None = None,
          output_override: str | None = None) -> JobConfig:
    """Validate an already-parsed TOML document. Raises ConfigError naming the key at fault."""
    from batchroute import schemas, task

    _known(raw, "", {"job", "router", "dispatch", "models", "task", "quality"})
    job = _table(raw, "job")
    _known(job, "job", {"name", "input", "output", "reference_model", "prices",
                        "reference_output_ratio", "id_column"})
    models_raw = _table(raw, "models")
    if not models_raw:
        raise ConfigError("models: the catalog is empty; define at least one [models.NAME]")
    catalog = _price_catalog(_resolve(_str(job, "prices", "job."))) if "prices" in job else {}
    models = {name: _model(name, _table(models_raw, name, "models."), catalog.get(name, ()))
              for name in models_raw}
    # Prices in force today: the run re-resolves them for its own date, and a model with none
    # is refused here rather than counted as free.
    today = datetime.now(UTC).date()
    models = {name: m.priced_on(today) for name, m in models.items()}
    dispatch = _dispatch(_table(raw, "dispatch", required=False), models)
    router = _router(_table(raw, "router", required=False), models)
    id_column = _str(job, "id_column", "job.") if "id_column" in job else "request_id"
    # Carried input columns may not take a name the requests, routed or results tables use.
    reserved = [n for n in dict.fromkeys((*schemas.ROUTED.names, *schemas.RESULTS.names,
                                          task.LABEL_COLUMN, task.OUTPUT_COLUMN))
                if n != "request_id"]
    if id_column in reserved:
        raise ConfigError(f"job.id_column: {id_column!r} is already a results column")
    the_task = task.parse(_table(raw, "task", required=False), reserved=reserved)
    if "invalid" in dispatch.escalate_on and not the_task.output.structured:
        raise ConfigError("dispatch.escalate_on: \"invalid\" needs [task.output] labels or "
                          "json_schema (free text is never invalid)")
    for m in models.values():
        task.check_wire(the_task.output, m.name, m.structured_output)
        if m.thinking_budget_tokens:
            where = f"models.{m.name}.thinking_budget_tokens"
            if m.thinking_budget_tokens >= dispatch.default_max_tokens:
                raise ConfigError(
                    f"{where}: {m.thinking_budget_tokens} must be below the output budget it "
                    f"is part of (dispatch.default_max_tokens = {dispatch.default_max_tokens})")
            if the_task.output.structured or (
                    "llm" in router.stages and router.llm.model == m.name):
                raise ConfigError(f"{where}: extended thinking cannot be combined with the "
                                  "forced tool a [task.output] or the llm router needs; use "
                                  "another model for labels, JSON outputs or routing calls")

    for m in models.values():
        if m.tpm < dispatch.default_max_tokens:
            raise ConfigError(
                f"models.{m.name}.tpm: {m.tpm} tokens per minute is below one request's output "
                f"budget (dispatch.default_max_tokens = {dispatch.default_max_tokens})")

    reference = job.get("reference_model")
    if reference is None:
        reference = max(models.values(),
                        key=lambda m: (m.input_usd_per_mtok + m.output_usd_per_mtok)).name
    elif reference not in models:
        raise ConfigError(f"job.reference_model: {reference!r} is not in the models catalog")

    quality = _quality(_table(raw, "quality", required=False), models, the_task.output.kind)

    input_uri = input_override or _str(job, "input", "job.")
    output_uri = output_override or job.get("output", "runs")
    return JobConfig(
        name=_job_name(job, source),
        input=_resolve(input_uri), output=_resolve(str(output_uri)),
        models=models, reference_model=str(reference),
        router=router, dispatch=dispatch, source=source,
        reference_output_ratio=(_num(job, "reference_output_ratio", "job.", minimum=0.0)
                                if "reference_output_ratio" in job else None),
        id_column=id_column, task=the_task, quality=quality,
    )


def _quality(t: Mapping[str, Any], models: Mapping[str, ModelConfig],
             output_kind: str) -> QualityConfig:
    _known(t, "quality", {"shadow_share", "judge", "min_retained", "seed"})
    share = _num(t, "shadow_share", "quality.", minimum=0.0, maximum=1.0, default=0.0)
    judge = _str(t, "judge", "quality.") if "judge" in t else ""
    if judge and judge not in models:
        raise ConfigError(f"quality.judge: {judge!r} is not a model in the catalog")
    if share > 0 and output_kind == "text" and not judge:
        raise ConfigError("quality.judge: a free-text task with a shadow_share needs a judge "
                          "model to grade its answers against the reference's (labels and "
                          "JSON outputs are compared field by field)")
    min_retained = None
    if "min_retained" in t:
        min_retained = _num(t, "min_retained", "quality.", minimum=0.0, maximum=1.0)
    seed = _int(t, "seed", "quality.", minimum=0, default=0)
    return QualityConfig(shadow_share=share, judge=judge, min_retained=min_retained, seed=seed)


# A run folder is one path segment below the output folder: a job name or run id holding "/"
# or ".." would put it somewhere else.
_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
MAX_SEGMENT = 255  # the longest file name common filesystems and object stores accept
# A run id is the job name plus a time stamp (run) or a day, router and hash (backfill).
MAX_JOB_NAME = 128


def check_segment(value: str, what: str, *, max_len: int = MAX_SEGMENT) -> str:
    """``value`` if it is a single safe path segment; ConfigError naming ``what`` if not."""
    if not _SEGMENT.fullmatch(value) or value in (".", "..") or len(value) > max_len:
        raise ConfigError(f"{what}: {value!r} is not a single safe path segment (letters, "
                          f"digits and -_.= only, not . or .., at most {max_len} characters)")
    return value


def _job_name(job: Mapping[str, Any], source: str) -> str:
    if "name" in job:
        return check_segment(_str(job, "name", "job."), "job.name", max_len=MAX_JOB_NAME)
    # Without a name the job file's own name is used, so it must make a safe one too.
    return check_segment(Path(source).stem, f"job.name (unset, so taken from the file name "
                         f"{Path(source).name!r})", max_len=MAX_JOB_NAME)


def _resolve(uri: str) -> str:
    # Local relative paths are taken from the working directory; URIs pass through untouched.
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        return uri
    return str(Path(uri).expanduser().resolve()) if "*" not in uri else uri


def _model(name: str, t: Mapping[str, Any], dated: tuple[Price, ...]) -> ModelConfig:
    where = f"models.{name}."
    _known(t, f"models.{name}", {f.name for f in ModelConfig.__dataclass_fields__.values()}
           - {"name", "prices", "batch_turnaround_s"} | {"batch_turnaround"})
    provider = _str(t, "provider", where)
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}provider: {provider!r} is not one of {', '.join(PROVIDERS)}")
    base_url = _str(t, "base_url", where)
    if not re.match(r"^https?://", base_url):
        raise ConfigError(f"{where}base_url: {base_url!r} must start with http:// or https://")
    env = _str(t, "api_key_env", where)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
        raise ConfigError(f"{where}api_key_env: must name an environment variable, e.g. "
                          "OPENAI_API_KEY (the key itself never goes in the job file)")
    inline = [k for k in _PRICE_KEYS if k in t]
    if inline or not dated:
        for price in ("input_usd_per_mtok", "output_usd_per_mtok"):
            if price not in t:
                raise ConfigError(f"{where}{price}: missing; a model without a price would be "
                                  "counted as free (or give its prices in job.prices)")
    # The job file's own price holds until the catalog's first dated entry takes over.
    prices = ((_price(t, where, None),) if inline else ()) + dated
    return ModelConfig(
        name=name, provider=provider, base_url=base_url.rstrip("/"), api_key_env=env,
        input_usd_per_mtok=prices[0].input_usd_per_mtok,
        output_usd_per_mtok=prices[0].output_usd_per_mtok, prices=prices,
        rpm=_int(t, "rpm", where, minimum=1), tpm=_int(t, "tpm", where, minimum=1),
        concurrency=_int(t, "concurrency", where, minimum=1, default=64),
        context_window=_int(t, "context_window", where, minimum=16, default=128_000),
        timeout_s=_num(t, "timeout_s", where, minimum=0.001, default=60.0),
        remote_name=str(t.get("remote_name", "")),
        structured_output=_structured(t, provider, where),
        **_reasoning(t, provider, where, str(t.get("remote_name", "")) or name),
        auth=_choice(t, "auth", where, AUTH, _AUTH_DEFAULT[provider]),
        api_version=_str(t, "api_version", where) if "api_version" in t else "",
        cache_min_tokens=_int(t, "cache_min_tokens", where, minimum=1, default=1024),
        **_tier(t, provider, where),
    )


def _tier(t: Mapping[str, Any], provider: str, where: str) -> dict[str, Any]:
    tier = _choice(t, "tier", where, TIERS, "sync")
    if tier == "flex" and provider != "openai":
        raise ConfigError(f"{where}tier: flex is OpenAI's service tier (Anthropic's batch "
                          "discount is its Message Batches: tier = \"batch\")")
    fallback = t.get("flex_fallback", False)
    if not isinstance(fallback, bool):
        raise ConfigError(f"{where}flex_fallback: must be true or false")
    turnaround = t.get("batch_turnaround", "1h")
    return {"tier": tier, "flex_fallback": fallback,
            "batch_queue_tokens": _int(t, "batch_queue_tokens", where, minimum=0, default=0),
            "batch_max_lines": _int(t, "batch_max_lines", where, minimum=0,
                                    maximum=100_000, default=0),
            "batch_turnaround_s": duration_s(turnaround, f"{where}batch_turnaround")}


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration_s(value: object, where: str) -> float:
    """Seconds in "6h", "90m", "1h30m", "45s" (or a number of seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not _finite(value) or value <= 0:
            raise ConfigError(f"{where}: must be a positive duration, got {value!r}")
        return float(value)
    m = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if not value or m is None or not any(m.groups()):
        raise ConfigError(f"{where}: {value!r} is not a duration such as \"6h\", \"90m\" or "
                          "\"1h30m\"")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + se
    if seconds <= 0:
        raise ConfigError(f"{where}: must be a positive duration, got {value!r}")
    return seconds


AUTH = ("bearer", "api-key", "x-api-key")
_AUTH_DEFAULT = {"openai": "bearer", "anthropic": "x-api-key"}


# OpenAI's reasoning families, by the model id sent on the wire: they take
# max_completion_tokens and only the default temperature.
_OPENAI_REASONING = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")
REASONING_EFFORTS = ("minimal", "low", "medium", "high")
MIN_THINKING_BUDGET = 1024  # Anthropic's smallest extended-thinking budget


def _reasoning(t: Mapping[str, Any], provider: str, where: str, wire: str) -> dict[str, Any]:
    family = ("max_completion_tokens" if provider == "openai" and _OPENAI_REASONING.match(wire)
              else "max_tokens")
    param = t.get("token_param", family)
    if param not in TOKEN_PARAMS:
        raise ConfigError(f"{where}token_param: {param!r} is not one of {', '.join(TOKEN_PARAMS)}")
    if provider == "anthropic" and param != "max_tokens":
        raise ConfigError(f"{where}token_param: Anthropic's messages API takes max_tokens only")
    effort = t.get("reasoning_effort", "")
    if effort:
        if provider != "openai":
            raise ConfigError(f"{where}reasoning_effort: an OpenAI setting (for Anthropic, "
                              "set thinking_budget_tokens)")
        if effort not in REASONING_EFFORTS:
            raise ConfigError(f"{where}reasoning_effort: {effort!r} is not one of "
                              f"{', '.join(REASONING_EFFORTS)}")
    budget = 0
    if "thinking_budget_tokens" in t:
        if provider != "anthropic":
            raise ConfigError(f"{where}thinking_budget_tokens: an Anthropic setting (for "
                              "OpenAI, set reasoning_effort)")
        budget = _int(t, "thinking_budget_tokens", where, minimum=MIN_THINKING_BUDGET,
                      maximum=MAX_TOKENS)
    return {"token_param": param, "reasoning_effort": effort, "thinking_budget_tokens": budget}


# What each wire can be asked with; the first is the default.
_STRUCTURED = {"openai": ("json_schema", "vllm", "vllm-guided"), "anthropic": ("tool",)}


def _structured(t: Mapping[str, Any], provider: str, where: str) -> str:
    allowed = _STRUCTURED[provider]
    value = t.get("structured_output", allowed[0])
    if value not in allowed:
        raise ConfigError(f"{where}structured_output: {value!r} is not one of "
                          f"{', '.join(allowed)} for provider {provider!r}")
    return str(value)


_PRICE_KEYS = ("input_usd_per_mtok", "cached_input_usd_per_mtok",
               "cache_write_input_usd_per_mtok", "output_usd_per_mtok", "batch_discount")


def _price(t: Mapping[str, Any], where: str, day: date | None) -> Price:
    discount = _num(t, "batch_discount", where, minimum=0.0, default=0.0)
    if discount >= 1.0:
        raise ConfigError(f"{where}batch_discount: must be below 1 (a share of the price), "
                          f"got {discount!r}")
    return Price(
        input_usd_per_mtok=_num(t, "input_usd_per_mtok", where, minimum=0.0,
                                maximum=MAX_USD_PER_MTOK),
        output_usd_per_mtok=_num(t, "output_usd_per_mtok", where, minimum=0.0,
                                 maximum=MAX_USD_PER_MTOK),
        cached_input_usd_per_mtok=(_num(t, "cached_input_usd_per_mtok", where, minimum=0.0,
                                        maximum=MAX_USD_PER_MTOK)
                                   if "cached_input_usd_per_mtok" in t else None),
        cache_write_input_usd_per_mtok=(
            _num(t, "cache_write_input_usd_per_mtok", where, minimum=0.0,
                 maximum=MAX_USD_PER_MTOK)
            if "cache_write_input_usd_per_mtok" in t else None),
        batch_discount=discount, effective_from=day)


def _price_catalog(path: str) -> dict[str, tuple[Price, ...]]:
    """A price catalog file: ``[[price]]`` entries of model, effective_from and prices.
    Entries for models the job does not use are ignored (one catalog serves many jobs)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"job.prices: price catalog not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _known(raw, path, {"price"})
    entries = raw.get("price", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"{path}: price must be an array of tables ([[price]])")
    schedule: dict[str, list[Price]] = {}
    for i, e in enumerate(entries):
        where = f"{path}: price[{i}]"
        _known(e, where, {"model", "effective_from", *_PRICE_KEYS})
        model = _str(e, "model", where + ".")
        day = e.get("effective_from")
        if not isinstance(day, date) or isinstance(day, datetime):
            raise ConfigError(f"{where}.effective_from: must be a date such as 2026-11-01, "
                              f"got {day!r}")
        schedule.setdefault(model, []).append(_price(e, where + ".", day))
    out = {}
    for model, prices in schedule.items():
        prices.sort(key=lambda p: p.effective_from or date.min)
        days = [p.effective_from for p in prices]
        if len(set(days)) != len(days):
            raise ConfigError(f"{path}: model {model!r} has two prices effective from the "
                              "same day")
        out[model] = tuple(prices)
    return out


def _router(t: Mapping[str, Any], models: Mapping[str, ModelConfig]) -> RouterConfig:
    _known(t, "router", {"path", "stages", "thresholds", "policy", "rules", "fallback",
                         "classifier", "similarity", "llm", "batch_size", "actors",
                         "budget_usd", "max_strong_share"})
    stages = tuple(_str_list(t, "stages", "router.")) if "stages" in t else RouterConfig.stages
    for s in stages:
        if s not in ROUTER_STAGES:
            raise ConfigError(f"router.stages: unknown stage {s!r} (known: "
                              f"{', '.join(ROUTER_STAGES)})")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"router.stages: a stage is listed twice: {list(stages)}")
    if not stages:
        raise ConfigError("router.stages: at least one stage is needed")
    for name in ("classifier", "similarity", "llm"):
        if name in t and name not in stages:
            raise ConfigError(f"router.{name}: configured but not in router.stages "
                              f"{list(stages)}")
    thresholds = dict(t.get("thresholds", {}))
    for k, v in thresholds.items():
        if not _finite(v) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"router.thresholds.{k}: must be a number in [0, 1]")
        if k not in models:
            raise ConfigError(f"router.thresholds.{k}: not a model in the catalog")
    rules = tuple(_rule(r, i, models) for i, r in enumerate(t.get("rules", [])))
    fallback = str(t.get("fallback", ""))
    if fallback and fallback not in models:
        raise ConfigError(f"router.fallback: {fallback!r} is not in the models catalog")
    # A stage that decides every row it sees leaves nothing for the stages after it.
    for i, s in enumerate(stages[:-1]):
        if s in ("classifier", "similarity") and "uncertain" not in _table(
                t, s, "router.", required=False):
            raise ConfigError(f"router.stages: {s!r} decides every row it sees, so "
                              f"{list(stages[i + 1:])} after it would never run; give "
                              f"[router.{s}] an uncertain = [low, high] band or drop them")
        if s == "llm":
            raise ConfigError(f"router.stages: 'llm' decides every row it sees, so "
                              f"{list(stages[i + 1:])} after it would never run")
    budget = (_num(t, "budget_usd", "router.", minimum=0.0) if "budget_usd" in t else None)
    if budget is not None and budget <= 0:
        raise ConfigError(f"router.budget_usd: must be above 0, got {budget}")
    share = (_num(t, "max_strong_share", "router.", minimum=0.0, maximum=1.0)
             if "max_strong_share" in t else None)
    capped = "budget_usd" if budget is not None else "max_strong_share" if share is not None \
        else ""
    if budget is not None and share is not None:
        raise ConfigError("router.budget_usd: give budget_usd or max_strong_share, not both")
    if capped and thresholds:
        raise ConfigError(f"router.{capped}: a spend cap assigns the models itself; it cannot "
                          "be combined with [router.thresholds] (remove one)")
    if capped and not {"classifier", "similarity"} & set(stages):
        raise ConfigError(f"router.{capped}: needs a classifier or similarity stage in "
                          f"router.stages (their predicted success is what it maximises)")
    path = str(t.get("path", BUNDLED_ROUTER))
    return RouterConfig(
        budget_usd=budget, max_strong_share=share,
        path=_resolve(path), stages=stages, thresholds=thresholds, rules=rules,
        policy=_choice(t, "policy", "router.", POLICIES, DEFAULT_POLICY),
        fallback=fallback,
        classifier=ClassifierConfig(uncertain=_band(
            _table(t, "classifier", "router.", required=False), "router.classifier.")),
        similarity=_similarity(_table(t, "similarity", "router.", required=False),
                               "similarity" in stages),
        llm=_llm(_table(t, "llm", "router.", required=False), models, "llm" in stages),
        batch_size=_int(t, "batch_size", "router.", minimum=1, default=1024),
        actors=_int(t, "actors", "router.", minimum=1, default=1),
    )


_RULE_CONDITIONS = {"contains_code": bool, "min_chars": int, "max_chars": int,
                    "min_tokens": int, "max_tokens": int, "regex": str, "tag": str}


def _rule(r: Mapping[str, Any], i: int, models: Mapping[str, ModelConfig]) -> Rule:
    where = f"router.rules[{i}]"
    _known(r, where, {f.name for f in Rule.__dataclass_fields__.values()})
    model = _str(r, "model", where + ".")
    if model not in models:
        raise ConfigError(f"{where}.model: {model!r} is not in the models catalog")
    if not set(r) & set(_RULE_CONDITIONS):
        raise ConfigError(f"{where}: a rule needs at least one condition "
                          f"({', '.join(_RULE_CONDITIONS)})")
    for key, kind in (*_RULE_CONDITIONS.items(), ("name", str)):
        value = r.get(key)
        if value is not None and not _is_kind(value, kind):
            raise ConfigError(f"{where}.{key}: must be {_KIND_NAMES[kind]}, got {value!r}")
    if "regex" in r:
        _check_regex(r["regex"], f"{where}.regex")
    return Rule(name=str(r.get("name", f"rule{i}")), model=model,
                **{k: r.get(k) for k in _RULE_CONDITIONS})


def _band(t: Mapping[str, Any], where: str) -> tuple[float, float] | None:
    _known(t, where.rstrip("."), {"uncertain"} | ({"bank", "k", "min_similarity", "index",
                                                   "nprobe", "features"}
                                                  if "similarity" in where else set()))
    if "uncertain" not in t:
        return None
    v = t["uncertain"]
    if (not isinstance(v, list) or len(v) != 2
            or not all(_finite(x) for x in v) or not 0.0 <= v[0] <= v[1] <= 1.0):
        raise ConfigError(f"{where}uncertain: must be [low, high] with 0 <= low <= high <= 1, "
                          f"got {v!r}")
    return float(v[0]), float(v[1])


def _similarity(t: Mapping[str, Any], used: bool) -> SimilarityConfig:
    where = "router.similarity."
    band = _band(t, where)
    if not used:
        return SimilarityConfig()
    return SimilarityConfig(
        bank=_resolve(_str(t, "bank", where)), k=_int(t, "k", where, minimum=1, default=16),
        min_similarity=_num(t, "min_similarity", where, minimum=-1.0, maximum=1.0,
                            default=0.3),
        index=_choice(t, "index", where, ("auto", "exact", "ivf", "hnsw"), "auto"),
        nprobe=_int(t, "nprobe", where, minimum=1, default=SimilarityConfig.nprobe),
        features=_choice(t, "features", where, ("", *SIMILARITY_FEATURES), ""),
        uncertain=band)


def _choice(t: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...],
            default: str) -> str:
    v = t.get(key, default)
    if v not in allowed:
        raise ConfigError(f"{where}{key}: must be one of {', '.join(allowed)}, got {v!r}")
    return str(v)


def _llm(t: Mapping[str, Any], models: Mapping[str, ModelConfig], used: bool) -> LLMRouterConfig:
    where = "router.llm."
    _known(t, "router.llm", {f.name for f in LLMRouterConfig.__dataclass_fields__.values()})
    if not used:
        return LLMRouterConfig()
    model = _str(t, "model", where)
    if model not in models:
        raise ConfigError(f"{where}model: {model!r} is not in the models catalog")
    labels = _table(t, "labels", where)
    if not labels:
        raise ConfigError(f"{where}labels: map at least one answer label to a catalog model, "
                          'e.g. {easy = "cheap-model", hard = "strong-model"}')
    for label, target in labels.items():
        if not isinstance(target, str) or target not in models:
            raise ConfigError(f"{where}labels.{label}: {target!r} is not in the models catalog")
    default = _str(t, "default", where)
    if default not in models:
        raise ConfigError(f"{where}default: {default!r} is not in the models catalog")
    cache = str(t.get("cache", ""))
    return LLMRouterConfig(model=model, labels=dict(labels), default=default,
                           cache=_resolve(cache) if cache else "",
                           max_tokens=_int(t, "max_tokens", where, minimum=1,
                                           maximum=MAX_TOKENS, default=16))


ESCALATE_ON = ("length", "refusal", "failed", "invalid")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _iso_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"dispatch.deadline: {text!r} is neither a duration (\"6h\") nor an "
                          "ISO 8601 time (\"2026-12-02T06:00:00+00:00\")") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _dispatch(t: Mapping[str, Any], models: Mapping[str, ModelConfig]) -> DispatchConfig:
    _known(t, "dispatch", {f.name for f in DispatchConfig.__dataclass_fields__.values()})
    d = DispatchConfig()
    on = _str_list(t, "escalate_on", "dispatch.")
    for i, kind in enumerate(on):
        if kind not in ESCALATE_ON:
            raise ConfigError(f"dispatch.escalate_on[{i}]: {kind!r} is not one of "
                              f"{', '.join(ESCALATE_ON)}")
    if "escalation_ladder" in t:
        ladder = _str_list(t, "escalation_ladder", "dispatch.")
        for i, name in enumerate(ladder):
            if name not in models:
                raise ConfigError(f"dispatch.escalation_ladder[{i}]: {name!r} is not in the "
                                  "models catalog")
        if len(set(ladder)) != len(ladder):
            raise ConfigError("dispatch.escalation_ladder: a model is listed twice")
    else:
        ladder = [m.name for m in sorted(models.values(), key=lambda m: (
            m.input_usd_per_mtok + m.output_usd_per_mtok, m.name))]
    return DispatchConfig(
        escalate_on=tuple(dict.fromkeys(on)), escalation_ladder=tuple(ladder),
        max_attempts=_int(t, "max_attempts", "dispatch.", minimum=1, default=d.max_attempts),
        backoff_base_s=_num(t, "backoff_base_s", "dispatch.", minimum=0.0,
                            default=d.backoff_base_s),
        backoff_max_s=_num(t, "backoff_max_s", "dispatch.", minimum=0.0,
                           default=d.backoff_max_s),
        default_max_tokens=_int(t, "default_max_tokens", "dispatch.", minimum=1,
                                maximum=MAX_TOKENS, default=d.default_max_tokens),
        batch_rows=_int(t, "batch_rows", "dispatch.", minimum=1, default=d.batch_rows),
        batches_in_flight=_int(t, "batches_in_flight", "dispatch.", minimum=1,
                               default=d.batches_in_flight),
        deadline=_deadline(t),
        max_retry_after_s=_num(t, "max_retry_after_s", "dispatch.", minimum=0.0,
                               default=d.max_retry_after_s),
    )


_KIND_NAMES = {bool: "true or false", int: "a non-negative integer", str: "a string"}


def _deadline(t: Mapping[str, Any]) -> str:
    value = t.get("deadline", "")
    if isinstance(value, datetime):  # a TOML datetime
        value = value.isoformat()
    if not isinstance(value, str):
        raise ConfigError("dispatch.deadline: must be a duration such as \"6h\" or an ISO 8601 "
                          "time")
    if value:
        DispatchConfig(deadline=value).deadline_at(datetime.now(UTC))  # refused now if bad
    return value


def _is_kind(value: object, kind: type) -> bool:
    if kind is int:  # bool is an int in Python, never in a job file
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT
    return isinstance(value, kind)


def _check_regex(pattern: str, where: str) -> None:
    # Rules run in Arrow, whose engine is RE2: Python's `re` would accept look-behinds and
    # back-references that only fail later, inside a routing actor.
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        pc.match_substring_regex(pa.array([""]), pattern)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ConfigError(f"{where}: invalid regular expression for Arrow's RE2 engine: "
                          f"{exc}") from None


def _known(t: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(t) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (allowed: "
                          f"{', '.join(sorted(allowed))})")


def _table(t: Mapping[str, Any], key: str, where: str = "",
           required: bool = True) -> Mapping[str, Any]:
    if key not in t:
        if required:
            raise ConfigError(f"{where}{key}: missing table [{where}{key}]")
        return {}
    v = t[key]
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}{key}: must be a table")
    return v


def _str(t: Mapping[str, Any], key: str, where: str) -> str:
    if key not in t:
        raise ConfigError(f"{where}{key}: missing")
    v = t[key]
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}{key}: must be a non-empty string")
    return v


def _str_list(t: Mapping[str, Any], key: str, where: str) -> list[str]:
    v = t.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{where}{key}: must be a list of non-empty strings, got {v!r}")
    return v


def _num(t: Mapping[str, Any], key: str, where: str, *, minimum: float,
         maximum: float = math.inf, default: float | None = None) -> float:
    v = t.get(key, default)
    if v is None:
        raise ConfigError(f"{where}{key}: missing")
    if not _finite(v) or not minimum <= v <= maximum:
        bounds = f">= {minimum}" if maximum == math.inf else f"between {minimum} and {maximum}"
        raise ConfigError(f"{where}{key}: must be a finite number {bounds}, got {v!r}")
    return float(v)


def _int(t: Mapping[str, Any], key: str, where: str, *, minimum: int,
         maximum: int = MAX_INT, default: int | None = None) -> int:
    v = t.get(key, default)
    if v is None:
        raise ConfigError(f"{where}{key}: missing")
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
        bounds = f">= {minimum}" if maximum == MAX_INT else f"between {minimum} and {maximum}"
        raise ConfigError(f"{where}{key}: must be an integer {bounds}, got {v!r}")
    return v


def _finite(v: object) -> bool:
    # TOML has nan and inf literals, and every comparison with nan is false: a range check
    # alone lets nan through, to surface later as a nan price, timeout or backoff.
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    # TOML integers are unbounded in Python; one beyond int64 is no sensible number either.
    return abs(v) <= MAX_INT if isinstance(v, int) else math.isfinite(v)
