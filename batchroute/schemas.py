"""Arrow schemas of every table the job reads or writes.

The JSON files in the repository's ``schemas/`` folder describe the same tables for people and
other tools; ``python -m batchroute.schemas`` rewrites them from this module and a unit test
fails when the two drift apart.

Input (``prompts``) is checked by name and kind rather than by exact Arrow type, because pandas,
polars, DuckDB and Spark each write strings differently (string, large_string, string_view,
dictionary-encoded); :mod:`batchroute.stages.source` casts them to the canonical ``requests`` table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
ROUTER_SCORE = pa.struct([pa.field("model", pa.string()), pa.field("score", pa.float32())])
TIMESTAMP = pa.timestamp("us", tz="UTC")
ESCALATION = pa.struct([
    pa.field("model", pa.string()), pa.field("reason", pa.string()),
    pa.field("input_tokens", pa.int64()), pa.field("cached_input_tokens", pa.int64()),
    pa.field("cache_write_input_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()), pa.field("reasoning_tokens", pa.int64()),
    pa.field("cost_micro_usd", pa.int64()),
    pa.field("attempts", pa.int32()), pa.field("invalid_answers", pa.int32()),
    pa.field("tier", pa.string()),
])


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True, *,
       optional: bool = False) -> pa.Field:
    """A documented column. An ``optional`` column may be absent from a file, and readers
    that do not use it ignore it."""
    meta = {"description": doc} | ({"optional": "true"} if optional else {})
    return pa.field(name, type_, nullable=nullable, metadata=meta)


def is_optional(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"optional") == b"true"


def required_names(schema: pa.Schema) -> list[str]:
    """The columns every file of ``schema`` must hold."""
    return [f.name for f in schema if not is_optional(f)]


# What a user's input may hold. Exactly one of prompt/messages must be present per row.
PROMPTS = pa.schema([
    _f("request_id", pa.string(), "Caller's unique id of the request; results are keyed by it.",
       nullable=False),
    _f("prompt", pa.string(), "The user prompt as plain text (either this or messages)."),
    _f("messages", pa.list_(MESSAGE), "Chat messages [{role, content}] (either this or prompt)."),
    _f("max_tokens", pa.int32(), "Per-row cap on output tokens; null means the job default."),
    _f("temperature", pa.float32(), "Per-row sampling temperature; null means provider default."),
    _f("force_model", pa.string(), "Send this row to the named catalog model, bypassing routing."),
    _f("tags", pa.list_(pa.string()), "Free-form labels (team, tenant) carried into results."),
])
PROMPTS_REQUIRED = ("request_id",)
PROMPTS_TEXT = ("prompt", "messages")

# The canonical table the source stage emits: one row per input row, in input order.
REQUESTS = pa.schema([
    _f("request_id", pa.string(), "As in the input."),
    _f("row", pa.int64(), "Position of the row in the input (0-based, in file order).",
       nullable=False),
    _f("prompt", pa.string(), "As in the input, or null when messages were given."),
    _f("messages", pa.list_(MESSAGE), "As in the input, or null when prompt was given."),
    _f("max_tokens", pa.int32(), "As in the input."),
    _f("temperature", pa.float32(), "As in the input."),
    _f("force_model", pa.string(), "As in the input."),
    _f("tags", pa.list_(pa.string()), "As in the input."),
    _f("reject_reason", pa.string(), "Why the row will not be sent; null for a good row."),
])

ROUTE_EVIDENCE = [
    _f("route_stage", pa.string(),
       "The router stage that decided: forced, rules, classifier, similarity, llm, or "
       "fallback (no stage did)."),
    _f("similarity_scores", pa.list_(ROUTER_SCORE),
       "Success per model predicted from the nearest prompts in the memory bank; null when the "
       "similarity stage did not see the row."),
    _f("neighbour_similarity", pa.float32(),
       "Cosine similarity of the nearest prompt in the memory bank (null when not looked up)."),
    _f("llm_label", pa.string(),
       "The llm router's answer (e.g. easy, hard); null when it was not asked or its answer "
       "could not be used."),
    _f("route_cost_micro_usd", pa.int64(),
       "What routing this row cost (the llm router's call, 0 when answered from its cache or "
       "decided by another stage); part of the row's cost_micro_usd in results.",
       nullable=False),
]

# The route stage's output: requests plus the routing decision and its evidence.
ROUTED = pa.schema([
    *REQUESTS,
    _f("model", pa.string(), "Target catalog model; null when rejected before routing."),
    _f("route_reason", pa.string(),
       "What decided, in detail: forced, rule:<name>, classifier, similarity, llm:<label>, "
       "llm:default (the answer could not be used), fallback (no cheaper model cleared its "
       "threshold, or no stage decided)."),
    _f("router_scores", pa.list_(ROUTER_SCORE),
       "The classifier's predicted probability of success per router model (null when the "
       "job's router has no classifier stage)."),
    _f("threshold", pa.float32(), "Threshold the chosen model's score had to clear, if any."),
    _f("router_version", pa.string(), "Version string of the router file that scored the row."),
    _f("est_input_tokens", pa.int64(), "Estimated prompt tokens (4 characters per token)."),
    _f("est_output_tokens", pa.int64(), "Output tokens budgeted: max_tokens or the job default."),
    *ROUTE_EVIDENCE,
])

STATUSES = ("ok", "failed", "rejected")

RESULTS = pa.schema([
    _f("request_id", pa.string(), "As in the input (null only on a row rejected for it)."),
    _f("run_id", pa.string(), "Run that produced the row.", nullable=False),
    _f("model", pa.string(), "Catalog model that served (or would have served) the row."),
    _f("status", pa.string(), "ok | failed | rejected.", nullable=False),
    _f("response", pa.string(), "The model's answer text (ok rows)."),
    _f("finish_reason", pa.string(),
       "Provider finish reason: stop, length (cut at max_tokens), refusal, ..."),
    _f("input_tokens", pa.int64(), "Prompt tokens as reported by the provider.", nullable=False),
    _f("cached_input_tokens", pa.int64(),
       "The part of input_tokens the provider served from its prompt cache.", nullable=False),
    _f("cache_write_input_tokens", pa.int64(),
       "The part of input_tokens written to the provider's prompt cache (Anthropic reports "
       "it apart and bills it at its own price).", nullable=False),
    _f("output_tokens", pa.int64(), "Output tokens as reported by the provider.", nullable=False),
    _f("reasoning_tokens", pa.int64(),
       "The part of output_tokens a reasoning model spent thinking, where the provider reports "
       "it (OpenAI's completion_tokens_details); billed as output.", nullable=False),
    _f("cost_micro_usd", pa.int64(),
       "What the row cost in all, in whole micro-dollars: the answering model's tokens at the "
       "prices in force on the run's date (uncached input, cached input, cache-write input and "
       "output prices per million, less any batch discount), rounded half to even, plus the cost of its "
       "escalations and of routing it (route_cost_micro_usd). Sum this column for totals: "
       "integer sums are exact.", nullable=False),
    _f("cost_usd", pa.float64(), "cost_micro_usd / 1,000,000, for reading.", nullable=False),
    _f("latency_ms", pa.float64(), "Wall time of the successful attempt, in milliseconds."),
    _f("tier", pa.string(),
       "The tier this model's call was billed at: sync (full price), batch (the provider's "
       "batch API) or flex (OpenAI's flex service tier); null for rows never sent."),
    _f("attempts", pa.int32(), "HTTP attempts made on this model (0 for rejected rows).",
       nullable=False),
    _f("invalid_answers", pa.int32(),
       "Answers from this model that were not one of [task.output] labels or did not match "
       "its json_schema (each retried, escalated, or ending the row as failed with "
       "error_type invalid_output); 0 for free-text tasks.", nullable=False),
    _f("escalated_from", pa.string(),
       "The model the row was first sent to, when its answer there was truncated, refused or "
       "failed and dispatch.escalate_on sent it up the ladder; null otherwise."),
    _f("escalations", pa.list_(ESCALATION),
       "Earlier attempts on cheaper models, in order: model, why it escalated (length, "
       "refusal, invalid, failed:<error_type>), its tokens, cost, HTTP attempts and unusable "
       "answers. Their cost is "
       "part of cost_micro_usd; null when the row did not escalate."),
    _f("error_type", pa.string(),
       "Short error class: rate_limited, transient, terminal, auth, invalid_output, ..."),
    _f("error_message", pa.string(), "Provider's or the job's error message; never a secret."),
    _f("reject_reason", pa.string(), "Why a rejected row was not sent."),
    _f("route_reason", pa.string(), "As in routed."),
    _f("router_scores", pa.list_(ROUTER_SCORE), "As in routed."),
    _f("threshold", pa.float32(), "As in routed."),
    _f("router_version", pa.string(), "As in routed."),
    *[_f(f.name, f.type, "As in routed.", f.nullable) for f in ROUTE_EVIDENCE],
    _f("tags", pa.list_(pa.string()), "As in the input."),
    _f("started_at", TIMESTAMP,
       "When the first attempt started; null when none was made (rejected rows, or rows "
       "failed without a call because the model's key had been refused)."),
    _f("finished_at", TIMESTAMP, "When the row reached its final status.", nullable=False),
])

ROLLUPS = pa.schema([
    _f("run_id", pa.string(), "Run the rollup covers.", nullable=False),
    _f("model", pa.string(), "Catalog model; null collects rows rejected before routing."),
    _f("rows", pa.int64(), "Result rows this model answered (or would have).", nullable=False),
    _f("ok", pa.int64(), "Rows with status ok.", nullable=False),
    _f("failed", pa.int64(), "Rows with status failed.", nullable=False),
    _f("rejected", pa.int64(), "Rows with status rejected.", nullable=False),
    _f("escalated", pa.int64(), "Rows this model answered badly and passed up the ladder.",
       nullable=False),
    _f("input_tokens", pa.int64(),
       "Prompt tokens billed by this model: its rows' input_tokens plus those of escalation "
       "attempts made on it.", nullable=False),
    _f("cached_input_tokens", pa.int64(), "The cached part of input_tokens, likewise.",
       nullable=False),
    _f("cache_write_input_tokens", pa.int64(),
       "The part of input_tokens written to the prompt cache, likewise.", nullable=False),
    _f("output_tokens", pa.int64(), "Output tokens billed by this model, likewise.",
       nullable=False),
    _f("reasoning_tokens", pa.int64(),
       "The part of output_tokens spent thinking (reasoning models), likewise.",
       nullable=False),
    _f("cost_micro_usd", pa.int64(),
       "What this model billed, escalation attempts included, in micro-dollars; the sum over "
       "models equals the sum of cost_micro_usd over the results.", nullable=False),
    _f("cost_usd", pa.float64(), "cost_micro_usd / 1,000,000.", nullable=False),
    _f("failed_cost_micro_usd", pa.int64(),
       "The part of cost_micro_usd billed for requests that still ended failed (escalation "
       "attempts before a final failure); the rest paid for ok answers.", nullable=False),
    _f("routing_cost_micro_usd", pa.int64(),
       "Routing overhead: what asking the llm router cost for the rows this model answered; "
       "part of cost_micro_usd.", nullable=False),
    _f("unrecovered_cost_micro_usd", pa.int64(),
       "Calls to this model the provider billed but whose answer was never used, estimated "
       "from the request at its full max_tokens (an upper bound): answers lost in flight when "
       "a run crashed, and malformed 2xx replies. Not part of cost_micro_usd, which sums the "
       "result rows; add it for what the provider will invoice.", nullable=False),
    _f("reference_model", pa.string(), "Model the counterfactual sends every request to.",
       nullable=False),
    _f("reference_output_ratio", pa.float64(),
       "Output tokens per input token assumed for the reference model.", nullable=False),
    _f("reference_ratio_from", pa.string(),
       "Where that ratio comes from: reference model (its own answers in this run), "
       "job.reference_output_ratio, or all models (the run's answers, when neither exists).",
       nullable=False),
    _f("reference_cost_micro_usd", pa.int64(),
       "What this model's ok rows would have cost on the reference model: the same input "
       "tokens, output tokens = input tokens x reference_output_ratio, at its prices (the "
       "reference model's own rows at their actual tokens).", nullable=False),
    _f("reference_cost_usd", pa.float64(), "reference_cost_micro_usd / 1,000,000.",
       nullable=False),
    _f("savings_usd", pa.float64(), "reference_cost_usd - cost_usd.", nullable=False),
    _f("savings_pct", pa.float64(),
       "savings_usd as a percentage of reference_cost_usd (null when that is 0)."),
    _f("standard_cost_micro_usd", pa.int64(),
       "What this model's bills would have cost at its standard (sync) price: cost_micro_usd "
       "with the batch and flex discounts undone.", nullable=False),
    _f("routing_savings_usd", pa.float64(),
       "The savings from routing: reference_cost_usd - standard cost (the reference model "
       "at its standard price against the chosen model at its standard price).",
       nullable=False),
    _f("tier_savings_usd", pa.float64(),
       "The savings from the tier: standard cost - cost_usd (the chosen model at its "
       "standard price against the tier it was billed at). routing_savings_usd + "
       "tier_savings_usd = savings_usd.", nullable=False),
    _f("sync_cost_micro_usd", pa.int64(), "The part of cost_micro_usd billed at the sync "
       "tier.", nullable=False),
    _f("batch_cost_micro_usd", pa.int64(), "The part billed through the provider's batch "
       "API.", nullable=False),
    _f("flex_cost_micro_usd", pa.int64(), "The part billed at OpenAI's flex tier.",
       nullable=False),
    _f("share_of_requests", pa.float64(), "rows / all result rows of the run.", nullable=False),
    _f("latency_p50_ms", pa.float64(), "Median latency of ok rows."),
    _f("latency_p95_ms", pa.float64(), "95th percentile latency of ok rows."),
    _f("attempts", pa.int64(), "HTTP attempts made on this model, escalations included.",
       nullable=False),
    _f("invalid", pa.int64(),
       "Unusable answers this model gave ([task.output]: not one of the labels, or not "
       "matching the json_schema), escalation attempts included; each was billed.",
       nullable=False),
    _f("invalid_rate", pa.float64(),
       "invalid / (invalid + ok): the share of this model's answers that could not be used "
       "(null when it gave none). A cheap model that answers off-label is a routing signal."),
])

# Training and evaluation labels, long form: one row per (request, model) outcome.
LABELS = pa.schema([
    _f("request_id", pa.string(), "The prompt's id; one row per model that answered it.",
       nullable=False),
    _f("prompt", pa.string(), "The prompt text (the same on every row of a request_id).",
       nullable=False),
    _f("model", pa.string(), "Catalog name of the model whose answer was scored.",
       nullable=False),
    _f("score", pa.float64(),
       "Quality of that model's answer in [0, 1] (1 = correct); train learns "
       "P(score >= cut).", nullable=False),
    _f("source", pa.string(),
       "Optional; train, calibrate and eval ignore it. Where the label comes from: mmlu (the "
       "bundled labels), or, from `batchroute learn`: shadow (a shadow check graded field by "
       "field: the kept answer's agreement with the reference model's, and 1 for the "
       "reference), judge (the judge's own grade of each answer), escalation (0: the row was "
       "escalated away from this model), invalid (0: this model's answer was not a valid "
       "output).", optional=True),
    _f("run_id", pa.string(), "Optional; ignored by train. The run the label was learnt from.",
       optional=True),
    _f("router_version", pa.string(),
       "Optional; ignored by train. The router version that routed that run.", optional=True),
])

# Shadow checks ([quality]): one row per sampled row, also sent to the reference model.
SHADOWS = pa.schema([
    _f("request_id", pa.string(), "The shadowed row.", nullable=False),
    _f("model", pa.string(), "The model whose answer the row kept (results.model).",
       nullable=False),
    _f("route_stage", pa.string(), "What decided the row (results.route_stage)."),
    _f("reference_model", pa.string(), "The model the row was also sent to.", nullable=False),
    _f("status", pa.string(), "ok when the reference answered and the pair was graded, else "
       "failed.", nullable=False),
    _f("score", pa.float64(), "The kept answer's quality relative to the reference's, in "
       "[0, 1]: labels and JSON, the share of output fields equal to the reference's; free "
       "text, the judge's candidate grade over its reference grade, capped at 1. Null when "
       "not graded."),
    _f("graded_by", pa.string(), "fields or judge.", nullable=False),
    _f("candidate_score", pa.float64(), "The judge's grade of the kept answer in [0, 1] "
       "(free text only)."),
    _f("reference_score", pa.float64(), "The judge's grade of the reference answer in "
       "[0, 1] (free text only)."),
    _f("reference_response", pa.string(), "The reference model's answer."),
    _f("error_message", pa.string(), "Why the pair was not graded (status failed)."),
    _f("cost_micro_usd", pa.int64(), "What the shadow call cost.", nullable=False),
    _f("judge_cost_micro_usd", pa.int64(), "What the judge call cost.", nullable=False),
])

# The quality rollup: per stratum (model and route stage), per model, per stage and the run.
QUALITY = pa.schema([
    _f("run_id", pa.string(), "Run the rollup covers.", nullable=False),
    _f("scope", pa.string(), "stratum (one model and route stage), model, stage, or run.",
       nullable=False),
    _f("model", pa.string(), "The model (null for stage and run rows)."),
    _f("route_stage", pa.string(), "The route stage (null for model and run rows)."),
    _f("rows", pa.int64(), "Rows answered ok in this scope.", nullable=False),
    _f("reference_rows", pa.int64(), "Of them, rows answered by the reference model itself "
       "(retained quality 1 by definition).", nullable=False),
    _f("shadowed", pa.int64(), "Rows shadowed and graded.", nullable=False),
    _f("shadow_failed", pa.int64(), "Rows shadowed but not graded (a call failed).",
       nullable=False),
    _f("graded_by", pa.string(), "fields (agreement with the reference) or judge."),
    _f("score", pa.float64(), "Mean agreement or judge score of the graded rows below the "
       "reference (null when none)."),
    _f("score_low", pa.float64(), "95% interval of score: Wilson for agreement, bootstrap "
       "for judge scores."),
    _f("score_high", pa.float64(), "Upper end of that interval."),
    _f("retained", pa.float64(), "Estimated quality retained against sending every row in "
       "the scope to the reference model (reference rows count 1)."),
    _f("retained_low", pa.float64(), "95% interval of retained (a stratum with rows but no "
       "grade counts 0 at the low end and 1 at the high end)."),
    _f("retained_high", pa.float64(), "Upper end of that interval."),
    _f("shadow_cost_micro_usd", pa.int64(), "Shadow calls' cost (quality overhead).",
       nullable=False),
    _f("judge_cost_micro_usd", pa.int64(), "Judge calls' cost (quality overhead).",
       nullable=False),
])

ALL = {"labels": LABELS, "prompts": PROMPTS, "requests": REQUESTS, "routed": ROUTED, "results": RESULTS,
       "rollups": ROLLUPS, "shadows": SHADOWS, "quality": QUALITY}
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def describe(name: str, schema: pa.Schema) -> dict[str, object]:
    """The JSON description of ``schema`` as stored in ``schemas/<name>.schema.json``."""
    return {
        "name": name,
        "columns": [
            {
                "name": f.name,
                "type": str(f.type),
                "nullable": f.nullable,
                "description": (f.metadata or {}).get(b"description", b"").decode(),
                **({"optional": True} if is_optional(f) else {}),
            }
            for f in schema
        ],
    }


def write_json(directory: Path = SCHEMA_DIR) -> None:
    """Rewrite every ``schemas/*.schema.json`` from the Arrow schemas above."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in ALL.items():
        text = json.dumps(describe(name, schema), indent=2) + "\n"
        (directory / f"{name}.schema.json").write_text(text)


if __name__ == "__main__":
    write_json(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR)
