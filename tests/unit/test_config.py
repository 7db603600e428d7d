"""Job file parsing: every mistake is caught at load time and names its key."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from batchroute import config
from batchroute.errors import ConfigError
from tests.helpers import CHEAP, MID, REPO, STRONG, job_doc


def _mutated(path: list[str], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(job_doc())
    t = doc
    for key in path[:-1]:
        t = t[key]
    if value is _DELETE:
        del t[path[-1]]
    else:
        t[path[-1]] = value
    return doc


_DELETE = object()


def test_demo_job_loads() -> None:
    job = config.load(REPO / "jobs" / "demo.toml")
    assert set(job.models) == {"mixtral-8x7b-instruct", "claude-3-5-sonnet",
                               "gpt-4-1106-preview"}
    assert job.reference_model == "gpt-4-1106-preview"
    assert [r.name for r in job.router.rules] == ["code", "long-document"]
    assert job.router.path == config.BUNDLED_ROUTER


def test_reference_defaults_to_most_expensive() -> None:
    doc = job_doc()
    del doc["job"]["reference_model"]
    assert config.parse(doc).reference_model == STRONG


def test_config_hash_ignores_locations_but_not_prices() -> None:
    a = config.parse(job_doc(input_uri="a.parquet", output="x"))
    b = config.parse(job_doc(input_uri="b.parquet", output="y"))
    assert a.config_hash == b.config_hash
    doc = job_doc()
    doc["models"][CHEAP]["output_usd_per_mtok"] = 2.0
    assert config.parse(doc).config_hash != a.config_hash


@pytest.mark.parametrize(("path", "value", "needle"), [
    (["job", "colour"], "blue", "job.colour: unknown key"),
    (["models", CHEAP, "rpn"], 5, f"models.{CHEAP}.rpn: unknown key"),
    (["models", CHEAP, "input_usd_per_mtok"], _DELETE, f"models.{CHEAP}.input_usd_per_mtok"),
    (["models", CHEAP, "rpm"], 0, f"models.{CHEAP}.rpm"),
    (["models", CHEAP, "rpm"], "fast", f"models.{CHEAP}.rpm"),
    (["models", CHEAP, "tpm"], 10, f"models.{CHEAP}.tpm"),
    (["models", CHEAP, "provider"], "cohere", f"models.{CHEAP}.provider"),
    (["models", CHEAP, "base_url"], "ftp://x", f"models.{CHEAP}.base_url"),
    (["models", CHEAP, "api_key_env"], "sk-live-123", f"models.{CHEAP}.api_key_env"),
    (["job", "reference_model"], "nope", "job.reference_model"),
    (["job", "input"], _DELETE, "job.input"),
    (["router", "thresholds"], {CHEAP: 1.5}, f"router.thresholds.{CHEAP}"),
    (["router", "thresholds"], {"ghost": 0.5}, "router.thresholds.ghost"),
    (["router", "rules"], [{"name": "r", "model": "ghost", "min_chars": 1}],
     "router.rules[0].model"),
    (["router", "rules"], [{"name": "r", "model": MID}], "router.rules[0]: a rule needs"),
    (["router", "rules"], [{"name": "r", "model": MID, "regex": "("}], "router.rules[0].regex"),
    (["router", "rules"], [{"name": "r", "model": MID, "regex": "(?<=a)b"}],
     "router.rules[0].regex: invalid regular expression for Arrow's RE2"),
    (["router", "rules"], [{"name": "r", "model": MID, "min_chars": "10"}],
     "router.rules[0].min_chars: must be a non-negative integer"),
    (["router", "rules"], [{"name": "r", "model": MID, "regex": 5}],
     "router.rules[0].regex: must be a string"),
    (["dispatch", "max_attempts"], 0, "dispatch.max_attempts"),
    (["dispatch", "escalate_on"], ["length", "slow"], "dispatch.escalate_on[1]: 'slow'"),
    (["dispatch", "escalate_on"], "length", "dispatch.escalate_on: must be a list"),
    (["dispatch", "escalation_ladder"], [CHEAP, "ghost"], "dispatch.escalation_ladder[1]"),
    (["dispatch", "escalation_ladder"], [CHEAP, CHEAP], "listed twice"),
    (["models"], {}, "models: the catalog is empty"),
])
def test_bad_config_names_the_key(path: list[str], value: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config.parse(_mutated(path, value))


def test_load_reports_file_and_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job file not found"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        config.load(bad)


def test_relative_paths_resolve_from_working_directory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = config.parse(job_doc(input_uri="data/in.parquet"))
    assert job.input == str(tmp_path / "data" / "in.parquet")
    assert config.parse(job_doc(input_uri="s3://bucket/in/")).input == "s3://bucket/in/"


def test_cost_is_tokens_times_prices() -> None:
    m = config.parse(job_doc()).models[MID]
    assert m.cost_usd(1_000_000, 1_000_000) == pytest.approx(18.0)
    assert m.cost_usd(1000, 0) == pytest.approx(0.003)


@pytest.mark.parametrize("path", sorted([*(REPO / "jobs").glob("*.toml"),
                                         *(REPO / "jobs" / "providers").glob("*.toml")]),
                         ids=lambda p: p.name)
def test_every_example_job_loads_and_fits_the_bundled_router(path: Path) -> None:
    from batchroute.routers import classifier as rt
    from batchroute.stages.route import RouteSpec, check_compatible

    job = config.load(path)
    info = rt.inspect(rt.read_bytes(job.router.path))
    check_compatible(info, RouteSpec.from_job(job), path=job.router.path)


def test_escalation_ladder_defaults_to_the_catalog_by_price() -> None:
    job = config.parse(_mutated(["dispatch", "escalate_on"], ["length"]))
    assert job.dispatch.escalation_ladder == (CHEAP, MID, STRONG)
    assert [job.dispatch.escalates_to(m) for m in (CHEAP, MID, STRONG)] == [MID, STRONG, None]
    skip_mid = _mutated(["dispatch", "escalate_on"], ["failed"])
    skip_mid["dispatch"]["escalation_ladder"] = [CHEAP, STRONG]
    job = config.parse(skip_mid)
    assert [job.dispatch.escalates_to(m) for m in (CHEAP, MID, STRONG)] == [STRONG, None, None]
    assert config.parse(job_doc()).dispatch.escalates_to(CHEAP) is None  # off by default


def _with_catalog(tmp_path: Path, catalog: str, *, inline: bool = False) -> dict[str, Any]:
    (tmp_path / "prices.toml").write_text(catalog)
    doc = job_doc()
    doc["job"]["prices"] = str(tmp_path / "prices.toml")
    if not inline:
        for key in ("input_usd_per_mtok", "output_usd_per_mtok"):
            del doc["models"][CHEAP][key]
    return doc


CATALOG = f"""
[[price]]
model = "{CHEAP}"
effective_from = 2026-11-01
input_usd_per_mtok = 0.25
output_usd_per_mtok = 1.25

[[price]]
model = "{CHEAP}"
effective_from = 2026-11-15
input_usd_per_mtok = 0.20
cached_input_usd_per_mtok = 0.05
cache_write_input_usd_per_mtok = 0.25
output_usd_per_mtok = 1.00
batch_discount = 0.5

[[price]]
model = "a-model-this-job-does-not-use"
effective_from = 2026-01-01
input_usd_per_mtok = 1
output_usd_per_mtok = 1
"""


def test_a_price_change_applies_from_its_date(tmp_path: Path) -> None:
    from datetime import date

    job = config.parse(_with_catalog(tmp_path, CATALOG))
    before, after = job.priced_on(date(2026, 11, 14)), job.priced_on(date(2026, 11, 15))
    assert before.models[CHEAP].cost_micro_usd(1_000_000, 0) == 250_000
    m = after.models[CHEAP]
    assert m.cost_micro_usd(1_000_000, 0) == 200_000  # 0.20 at the sync tier
    assert m.cost_micro_usd(1_000_000, 0, tier="batch") == 100_000  # half off in batch ...
    assert m.cost_micro_usd(1_000_000, 0, tier="flex") == 100_000  # ... and flex
    assert m.cost_micro_usd(1_000_000, 0, 1_000_000, tier="batch") == 25_000
    assert m.cost_micro_usd(1_000_000, 0, 0, 1_000_000, tier="batch") == 125_000
    assert before.config_hash == after.config_hash == job.config_hash  # same run either day
    with pytest.raises(ConfigError, match=rf"models.{re.escape(CHEAP)}: no price in force on "
                                          r"2026-10-31 \(the first takes effect on 2026-11-01"):
        job.priced_on(date(2026, 10, 31))


def test_the_job_files_own_price_holds_until_the_catalog_takes_over(tmp_path: Path) -> None:
    from datetime import date

    doc = _with_catalog(tmp_path, CATALOG, inline=True)
    doc["models"][CHEAP]["input_usd_per_mtok"] = 0.5
    job = config.parse(doc)
    assert job.priced_on(date(2020, 1, 1)).models[CHEAP].input_usd_per_mtok == 0.5
    assert job.priced_on(date(2026, 11, 2)).models[CHEAP].input_usd_per_mtok == 0.25


def test_a_model_with_no_price_in_force_today_is_refused_at_load(tmp_path: Path) -> None:
    future = CATALOG.replace("2026-11-01", "2999-01-01").replace("2026-11-15", "2999-02-01")
    with pytest.raises(ConfigError, match="no price in force on"):
        config.parse(_with_catalog(tmp_path, future))
    with pytest.raises(ConfigError, match="input_usd_per_mtok: missing"):
        config.parse(_with_catalog(tmp_path, ""))


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: c.replace("2026-11-15", '"soon"'), "price[1].effective_from: must be a date"),
    (lambda c: c.replace("2026-11-15", "2026-11-01"), "two prices effective from the same"),
    (lambda c: c.replace("batch_discount = 0.5", "batch_discount = 1.0"),
     "price[1].batch_discount: must be below 1"),
    (lambda c: c.replace("batch_discount = 0.5", "discount = 0.5"),
     "price[1].discount: unknown key"),
    (lambda c: c.replace("output_usd_per_mtok = 1.00", "output_usd_per_mtok = -1"),
     "price[1].output_usd_per_mtok: must be a finite number between 0.0 and 1000000.0"),
    (lambda c: c + "\n[[price]\n", "not valid TOML"),
])
def test_bad_price_catalogs_name_the_entry(tmp_path: Path, edit: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config.parse(_with_catalog(tmp_path, edit(CATALOG)))


def test_a_missing_price_catalog_is_named(tmp_path: Path) -> None:
    doc = job_doc()
    doc["job"]["prices"] = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"job\.prices: price catalog not found"):
        config.parse(doc)


def _numeric_doc(where: str) -> dict[str, Any]:
    """A valid job document in which the table at ``where`` exists and is in use."""
    doc = job_doc()
    doc["job"]["reference_output_ratio"] = 0.5
    doc["models"][CHEAP].update(cached_input_usd_per_mtok=0.1, batch_discount=0.2)
    doc["router"]["rules"][0].update(min_chars=1, max_chars=10_000, min_tokens=1,
                                     max_tokens=5_000)
    doc["router"]["thresholds"] = {CHEAP: 0.5}
    doc["dispatch"]["max_retry_after_s"] = 60.0
    doc["quality"] = {"shadow_share": 0.1, "judge": MID, "min_retained": 0.5, "seed": 1}
    if where == "router.classifier":
        doc["router"]["classifier"] = {"uncertain": [0.2, 0.8]}
    elif where == "router.similarity":
        doc["router"]["stages"] = ["rules", "similarity"]
        doc["router"]["similarity"] = {"bank": "bank.parquet", "k": 8, "min_similarity": 0.3,
                                       "nprobe": 16, "uncertain": [0.2, 0.8]}
    elif where == "router.llm":
        doc["router"]["stages"] = ["llm"]
        doc["router"]["llm"] = {"model": CHEAP, "labels": {"easy": CHEAP, "hard": STRONG},
                                "default": STRONG, "max_tokens": 16}
    return doc


# Every number a job file holds: (dataclass, field) -> where it sits in the document. A new
# numeric field must be added here, or test_every_numeric_field_is_covered fails.
NUMERIC_KEYS: dict[tuple[str, str], str] = {
    ("JobConfig", "reference_output_ratio"): "job.reference_output_ratio",
    **{("ModelConfig", f): f"models.{CHEAP}.{f}" for f in (
        "input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
        "cache_write_input_usd_per_mtok", "batch_discount", "rpm", "tpm", "concurrency",
        "context_window", "timeout_s", "cache_min_tokens", "batch_queue_tokens",
        "batch_max_lines")},
    ("ModelConfig", "batch_turnaround_s"): f"models.{CHEAP}.batch_turnaround",
    ("ModelConfig", "thinking_budget_tokens"): f"models.{MID}.thinking_budget_tokens",
    **{("Rule", f): f"router.rules.0.{f}"
       for f in ("min_chars", "max_chars", "min_tokens", "max_tokens")},
    ("RouterConfig", "thresholds"): f"router.thresholds.{CHEAP}",
    ("RouterConfig", "batch_size"): "router.batch_size",
    ("RouterConfig", "actors"): "router.actors",
    ("RouterConfig", "budget_usd"): "router.budget_usd",
    ("RouterConfig", "max_strong_share"): "router.max_strong_share",
    ("ClassifierConfig", "uncertain"): "router.classifier.uncertain",
    **{("SimilarityConfig", f): f"router.similarity.{f}"
       for f in ("k", "min_similarity", "nprobe", "uncertain")},
    ("LLMRouterConfig", "max_tokens"): "router.llm.max_tokens",
    **{("DispatchConfig", f): f"dispatch.{f}" for f in (
        "max_attempts", "backoff_base_s", "backoff_max_s", "default_max_tokens", "batch_rows",
        "batches_in_flight", "max_retry_after_s")},
    **{("QualityConfig", f): f"quality.{f}" for f in ("shadow_share", "min_retained", "seed")},
}
# Price entries of a catalog share the model's price keys (test_price_catalog_numbers...).
PRICE_KEYS = ("input_usd_per_mtok", "output_usd_per_mtok", "cached_input_usd_per_mtok",
              "cache_write_input_usd_per_mtok", "batch_discount")


def test_every_numeric_field_is_covered() -> None:
    import dataclasses

    numeric = set()
    for cls in (config.JobConfig, config.ModelConfig, config.Rule, config.RouterConfig,
                config.ClassifierConfig, config.SimilarityConfig, config.LLMRouterConfig,
                config.DispatchConfig, config.QualityConfig):
        for f in dataclasses.fields(cls):
            if re.search(r"\b(int|float)\b", str(f.type)):
                numeric.add((cls.__name__, f.name))
    assert numeric == set(NUMERIC_KEYS)
    price = {f.name for f in dataclasses.fields(config.Price)
             if re.search(r"\b(int|float)\b", str(f.type))}
    assert price == set(PRICE_KEYS)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    t: Any = doc
    for key in parents:
        t = t[int(key)] if key.isdigit() else t[key]
    if isinstance(t.get(last), list):  # a band: spoil its upper end
        value = [t[last][0], value]
    t[last] = value


_NOT_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", _NOT_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dotted", sorted(set(NUMERIC_KEYS.values())))
def test_no_number_may_be_nan_or_infinite(dotted: str, value: float) -> None:
    doc = _numeric_doc(dotted.rsplit(".", 1)[0])
    config.parse(doc)  # valid as built
    _set(doc, dotted, value)
    needle = dotted.replace(".0.", "[0].")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config.parse(doc)


@pytest.mark.parametrize(("dotted", "value"), [
    (f"models.{CHEAP}.input_usd_per_mtok", 1e300),
    (f"models.{CHEAP}.batch_discount", 1.0),
    (f"models.{CHEAP}.rpm", 2**63),
    ("router.rules.0.min_chars", 2**64),
    ("router.similarity.min_similarity", 1.5),
    ("router.llm.max_tokens", 2**31),
    ("dispatch.default_max_tokens", 2**31),
    ("dispatch.backoff_max_s", -1.0),
])
def test_numbers_out_of_range_name_the_key(dotted: str, value: float) -> None:
    doc = _numeric_doc(dotted.rsplit(".", 1)[0])
    _set(doc, dotted, value)
    with pytest.raises(ConfigError, match=re.escape(dotted.replace(".0.", "[0]."))):
        config.parse(doc)


@pytest.mark.parametrize("key", PRICE_KEYS)
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+nan"])
def test_price_catalog_numbers_must_be_finite(tmp_path: Path, key: str, literal: str) -> None:
    head, second, tail = CATALOG.partition("effective_from = 2026-11-15")  # price[1]
    tail = re.sub(rf"(?m)^{key} = .*$", f"{key} = {literal}", tail, count=1)
    with pytest.raises(ConfigError, match=re.escape(f"price[1].{key}: must be a finite")):
        config.parse(_with_catalog(tmp_path, head + second + tail))


def test_toml_nan_and_inf_literals_are_refused_at_load(tmp_path: Path) -> None:
    from tests.helpers import to_toml

    text = to_toml(job_doc()).replace('"timeout_s" = 5.0', '"timeout_s" = inf', 1)
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"job\.toml: models\.{CHEAP}\.timeout_s: must be a "
                                          r"finite number >= 0\.001, got inf"):
        config.load(path)
    path.write_text(to_toml(job_doc()).replace('"backoff_base_s" = 0.01',
                                               '"backoff_base_s" = nan'))
    with pytest.raises(ConfigError, match=r"dispatch\.backoff_base_s: must be a finite"):
        config.load(path)


def test_an_integer_too_big_for_a_float_is_refused_not_a_crash() -> None:
    doc = job_doc()
    doc["dispatch"]["backoff_max_s"] = 10**400
    with pytest.raises(ConfigError, match=r"dispatch\.backoff_max_s: must be a finite number"):
        config.parse(doc)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".", "x y", "tab\t", "é", "x" * 129,
                                  "a\\b"])
def test_a_job_name_must_be_one_safe_path_segment(name: str) -> None:
    doc = job_doc()
    doc["job"]["name"] = name
    with pytest.raises(ConfigError, match=r"job\.name: .* is not a single safe path segment"):
        config.parse(doc)


def test_safe_job_names_load(tmp_path: Path) -> None:
    doc = job_doc()
    doc["job"]["name"] = "nightly_v2.1-team=ml"
    assert config.parse(doc).name == "nightly_v2.1-team=ml"
    from tests.helpers import to_toml

    del doc["job"]["name"]
    (tmp_path / "my job.toml").write_text(to_toml(doc))
    with pytest.raises(ConfigError, match=r"job\.name \(unset, so taken from the file name "
                                          r"'my job\.toml'\): 'my job' is not a single safe"):
        config.load(tmp_path / "my job.toml")
    (tmp_path / "my-job.toml").write_text(to_toml(doc))
    assert config.load(tmp_path / "my-job.toml").name == "my-job"


def test_tiers_and_the_deadline_are_checked_at_load() -> None:
    from datetime import UTC, datetime

    doc = job_doc()
    doc["models"][CHEAP].update(tier="batch", batch_turnaround="1h30m", batch_queue_tokens=5)
    doc["dispatch"]["deadline"] = "6h"
    job = config.parse(doc)
    m = job.models[CHEAP]
    assert (m.tier, m.batch_turnaround_s, m.batch_queue_tokens) == ("batch", 5400.0, 5)
    started = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)
    assert job.dispatch.deadline_at(started) == datetime(2026, 12, 2, 4, 0, tzinfo=UTC)
    doc["dispatch"]["deadline"] = "2026-12-02T06:00:00+01:00"
    assert config.parse(doc).dispatch.deadline_at(started) == datetime(2026, 12, 2, 5, 0,
                                                                       tzinfo=UTC)
    for where, key, value, message in [
        (MID, "tier", "flex", "flex is OpenAI's service tier"),
        (CHEAP, "tier", "cheap", "must be one of sync, batch, flex, got 'cheap'"),
        (CHEAP, "batch_turnaround", "soon", "is not a duration"),
        (CHEAP, "flex_fallback", "yes", "must be true or false"),
    ]:
        bad = job_doc()
        bad["models"][where][key] = value
        with pytest.raises(ConfigError, match=re.escape(f"models.{where}.{key}")) as err:
            config.parse(bad)
        assert message in str(err.value)
    bad = job_doc()
    bad["dispatch"]["deadline"] = "tomorrow"
    with pytest.raises(ConfigError, match=r"dispatch\.deadline: 'tomorrow' is neither"):
        config.parse(bad)


@pytest.mark.parametrize(("quality", "needle"), [
    ({"shadow_share": 1.5}, r"quality\.shadow_share: must be a finite number between 0"),
    ({"shadow_share": -0.1}, r"quality\.shadow_share: must be a finite number between 0"),
    ({"shadow_share": 0.1, "judge": "gpt-9"}, r"quality\.judge: 'gpt-9' is not a model in "
                                              "the catalog"),
    ({"shadow_share": 0.1}, r"quality\.judge: a free-text task with a shadow_share needs a "
                            "judge"),
    ({"shadow_share": 0.1, "judge": MID, "min_retained": 1.2},
     r"quality\.min_retained: must be a finite number between 0"),
    ({"shadow_share": 0.1, "judge": MID, "typo": 1}, r"quality"),
])
def test_bad_quality_sections_are_refused_naming_the_key(quality: dict[str, Any],
                                                          needle: str) -> None:
    doc = job_doc()
    doc["quality"] = quality
    with pytest.raises(ConfigError, match=needle):
        config.parse(doc)


def test_a_labels_task_is_compared_field_by_field_without_a_judge() -> None:
    doc = job_doc()
    doc["task"] = {"template": "{{ prompt }}", "output": {"labels": ["a", "b"]}}
    doc["quality"] = {"shadow_share": 0.05}
    job = config.parse(doc)
    assert job.quality.on and job.quality.judge == ""
    # a job without [quality] keeps the config hash it had before the section existed
    plain = config.parse(job_doc())
    assert plain.quality == config.QualityConfig() and not plain.quality.on
