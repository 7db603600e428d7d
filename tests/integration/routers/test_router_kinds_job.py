"""Router kinds in the real job on Ray against the mock provider: a rules > classifier > llm
cascade whose routing calls go through the cheap model's own dispatch actor and are billed as
routing overhead, a second run of the same input answered from the llm router's cache, and a
memory bank grown from that run driving a similarity router (the packaged MiniLM embedder)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from batchroute import cli
from batchroute.devtools import sample
from batchroute.devtools.mock_provider import MockProvider
from batchroute.routers import similarity as memory
from tests.helpers import demo_job_doc, to_toml

pytestmark = [pytest.mark.integration]

ROWS = 240
CHEAP = "mixtral-8x7b-instruct"
STRONG = "gpt-4-1106-preview"


def _run(job: Path, run_id: str) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["run", str(job), "--run-id", run_id])
    folder = job.parent / "runs" / run_id
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "folder": folder,
            "results": pl.read_parquet(folder / "results"),
            "rollups": pl.read_parquet(folder / "rollups"),
            "manifest": json.loads((folder / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, provider: MockProvider,
          ray_session: None) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("kinds")
    inputs = tmp / "prompts.parquet"
    sample.write(sample.generate(ROWS, seed=11), inputs)
    doc = demo_job_doc(inputs, tmp / "runs", provider.url,
                       dispatch={"backoff_base_s": 0.01, "backoff_max_s": 0.1})
    doc["router"].update(
        stages=["rules", "classifier", "llm"], classifier={"uncertain": [0.5, 0.9]},
        llm={"model": CHEAP, "labels": {"easy": CHEAP, "medium": "claude-3-5-sonnet",
                                        "hard": STRONG},
             "default": STRONG, "cache": str(tmp / "llm-cache")})
    doc["router"].pop("thresholds", None)
    job = tmp / "cascade.toml"
    job.write_text(to_toml(doc))
    return {"tmp": tmp, "job": job, "doc": doc, "inputs": inputs}


@pytest.fixture(scope="module")
def cascade(setup: dict[str, Any]) -> dict[str, Any]:
    return _run(setup["job"], "cascade-1")


def test_the_cascade_asks_the_llm_only_for_uncertain_rows_and_bills_it(
        cascade: dict[str, Any]) -> None:
    assert cascade["code"] in (0, 1), cascade["stderr"][-2000:]
    res = cascade["results"]
    assert res.height == ROWS
    by_stage = res.group_by("route_stage").len().to_dict(as_series=False)
    stages = dict(zip(by_stage["route_stage"], by_stage["len"], strict=True))
    assert stages.get("llm", 0) > 0 and stages.get("classifier", 0) > 0
    llm_rows = res.filter(pl.col("route_stage") == "llm")
    # Every llm row has a label or says it fell back; its routing call is part of its cost.
    assert (llm_rows["llm_label"].is_not_null()
            | (llm_rows["route_reason"] == "llm:default")).all()
    assert llm_rows["route_cost_micro_usd"].sum() > 0
    assert res.filter(pl.col("route_stage") != "llm")["route_cost_micro_usd"].sum() == 0
    ok = res.filter(pl.col("status") == "ok")
    assert (ok["cost_micro_usd"] >= ok["route_cost_micro_usd"]).all()
    # Rollups: routing overhead per model equals the rows' own, and totals still reconcile.
    roll = cascade["rollups"]
    assert roll["routing_cost_micro_usd"].sum() == res["route_cost_micro_usd"].sum()
    assert roll["cost_micro_usd"].sum() == res["cost_micro_usd"].sum()
    routing = cascade["manifest"]["routing"]
    assert sum(routing["decided_by"].values()) == res.filter(
        pl.col("route_reason").is_not_null()).height
    assert routing["route_cost_usd"] == pytest.approx(
        res["route_cost_micro_usd"].sum() / 1e6)
    assert "routed by:" in cascade["stdout"]


def test_a_second_run_of_the_same_prompts_is_routed_from_the_cache(
        setup: dict[str, Any], cascade: dict[str, Any]) -> None:
    again = _run(setup["job"], "cascade-2")
    first, second = cascade["results"], again["results"]
    assert second["route_cost_micro_usd"].sum() == 0
    decided = (first.select("request_id", "model", "route_stage", "llm_label").sort("request_id")
               .equals(second.select("request_id", "model", "route_stage", "llm_label")
                       .sort("request_id")))
    assert decided
    assert list((setup["tmp"] / "llm-cache").glob("part-*.parquet"))


def test_a_bank_grown_from_the_run_drives_a_similarity_router(
        setup: dict[str, Any], cascade: dict[str, Any]) -> None:
    bank = setup["tmp"] / "bank.parquet"
    code = cli.main(["memory", "add", "--bank", str(bank), "--results", str(cascade["folder"])])
    assert code == 0
    grown = pq.read_table(bank)
    assert grown.num_rows == cascade["results"].filter(pl.col("status") != "rejected").height
    b = memory.Bank.read(str(bank))
    assert b.embedder == "all-MiniLM-L6-v2" and b.embeddings.shape[1] == 384
    doc = json.loads(json.dumps(setup["doc"]))
    # A quarter of the same prompts (MiniLM embeds some 16 to 24 prompts/s on one core).
    subset = setup["tmp"] / "similar-input.parquet"
    pq.write_table(pq.read_table(setup["inputs"]).slice(0, ROWS // 4), subset)
    doc["job"]["input"] = str(subset)
    doc["router"] = {"stages": ["similarity"], "batch_size": 64,
                     "similarity": {"bank": str(bank), "k": 4, "min_similarity": 0.5}}
    job = setup["tmp"] / "similar.toml"
    job.write_text(to_toml(doc))
    run = _run(job, "similar-1")
    assert run["code"] in (0, 1), run["stderr"][-2000:]
    res = run["results"]
    # The same prompts are in the bank, so every row finds itself (cosine 1) and is decided.
    sent = res.filter(pl.col("status") != "rejected")
    assert (sent["route_stage"] == "similarity").all()
    assert sent["neighbour_similarity"].min() == pytest.approx(1.0, abs=1e-4)
