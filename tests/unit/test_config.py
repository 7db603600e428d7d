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


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.toml")), ids=lambda p: p.name)
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
    assert after.models[CHEAP].cost_micro_usd(1_000_000, 0) == 100_000  # 0.20, half off
    assert after.models[CHEAP].cost_micro_usd(1_000_000, 0, 1_000_000) == 25_000
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
     "price[1].output_usd_per_mtok: must be a number >= 0"),
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
