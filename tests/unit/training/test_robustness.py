"""``batchroute eval --robustness``: the topic key, the style rewrites, and every policy's APGR
against random on each check, on labels small enough to train a router per topic in a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from batchroute import cli
from batchroute.errors import SchemaError
from batchroute.training import robustness
from tests.helpers import CHEAP, MMLU, STRONG, tiny_router


def test_every_mmlu_subject_is_in_one_of_the_four_groups() -> None:
    subjects = set(pq.read_table(MMLU, columns=["domain"]).column("domain").to_pylist())
    listed = [s for group in robustness.MMLU_GROUPS.values() for s in group]
    assert len(listed) == len(set(listed)) == 57 and set(listed) == subjects
    assert {robustness.topic(s) for s in subjects} == {"stem", "humanities",
                                                      "social_sciences", "other"}
    assert robustness.topic("invoices") == "invoices"  # any other domain is its own topic


def test_styles_rewrite_every_mmlu_prompt_and_keep_its_question() -> None:
    prompts = pq.read_table(MMLU, columns=["prompt"]).column("prompt").unique().to_pylist()
    for name, rewrite in robustness.STYLES.items():
        out = [rewrite(p) for p in prompts]
        assert out == [rewrite(p) for p in prompts], name  # deterministic
        assert all(o != p for o, p in zip(out, prompts, strict=True)), name
    p = prompts[0]
    stem = p.split("\nA. ")[0].strip()
    assert stem in robustness.STYLES["wrapped"](p) and stem in robustness.STYLES["prefixed"](p)
    t = robustness.STYLES["template"](p)
    assert t.startswith(f"Question: {stem}\nOptions:\n(a) ") and "Answer:" not in t
    assert robustness.STYLES["casing"](p).isupper()


def _labels(path: Path, *, domain: bool = True) -> Path:
    """Three topics; in each, "easy" prompts both models answer, "hard" ones only the strong
    model, "lost" ones neither: the expected gain ranks hard > lost = easy, while P(weak
    fails) cannot tell hard from lost."""
    rows = []
    for i in range(240):
        kind = ("easy", "hard", "lost")[i % 3]
        topic = ("geology", "poetry", "tax")[i // 3 % 3]
        for m in (CHEAP, STRONG):
            score = float(kind == "easy" or (kind == "hard" and m == STRONG))
            rows.append({"request_id": f"q{i}", "prompt": f"{kind} {topic} question {i}",
                         "model": m, "score": score, "domain": topic})
    frame = pl.DataFrame(rows)
    (frame if domain else frame.drop("domain")).write_parquet(path)
    return path


def test_each_policy_against_random_on_every_check(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from batchroute.training import train

    labels = _labels(tmp_path / "labels.parquet")
    trained_on: list[set[str]] = []
    fit = robustness.topic_probs

    def spy(prompts: np.ndarray, y: np.ndarray, train_rows: np.ndarray, **kw: int) -> np.ndarray:
        trained_on.append({str(p).split()[1] for p in prompts[train_rows]})
        ids = [f"q{int(str(p).split()[-1])}" for p in prompts[train_rows]]
        assert not train.is_holdout(ids).any()  # the training split only, as train uses
        return fit(prompts, y, train_rows, **kw)

    monkeypatch.setattr(robustness, "topic_probs", spy)
    r = robustness.robustness(tiny_router(), str(labels), weak=CHEAP, strong=STRONG)
    # each topic's router saw the other two topics and nothing of its own
    assert trained_on == [{"poetry", "tax"}, {"geology", "tax"}, {"geology", "poetry"}]
    names = [c["check"] for c in r["checks"]]
    assert names == ["in-domain", "style:wrapped", "style:casing", "style:prefixed",
                     "style:template", "topic:geology", "topic:poetry", "topic:tax"]
    for c in r["checks"]:
        assert 0.3 < c["random"]["p5"] <= c["random"]["mean"] <= c["random"]["p95"] < 0.7
        assert set(c["apgr"]) == set(robustness.ORDERINGS)
    # A router trained without a topic still reads "easy", "hard" and "lost" in it.
    assert sum(c["rows"] for c in r["checks"][5:]) == 240  # every question in one topic
    for c in r["checks"][5:]:
        assert c["apgr"]["relative"] > c["random"]["p95"], c
    topics = r["checks"][5:]
    # What each ordering sends up first: relative the "hard" questions, the only ones with a
    # gain; success as many "lost" ones, which have none.
    first = topics[0]["sent_up_first"]
    assert first["relative"]["gain"] == pytest.approx(1.0)
    assert first["relative"]["gain_of_the_rest"] == pytest.approx(0.0)
    assert first["success"]["gain"] < 0.8
    assert all(c["apgr"]["relative"] >= c["apgr"]["success"] for c in topics)
    assert any(c["apgr"]["relative"] > c["apgr"]["success"] + 0.2 for c in topics)
    assert r["worse_than_random"]["relative"] == []
    text = robustness.format_robustness(r)
    assert "relative: never worse than random" in text and "topic:poetry" in text


def test_a_policy_below_the_random_mean_is_named_with_its_checks() -> None:
    def check(name: str, success: float) -> dict[str, object]:
        return {"check": name, "random": {"mean": 0.5},
                "apgr": dict.fromkeys(robustness.ORDERINGS, 0.6) | {"success": success}}

    bad = robustness.worse_than_random([check("in-domain", 0.55), check("topic:stem", 0.41),
                                        check("style:casing", 0.499)])
    assert bad["success"] == ["topic:stem", "style:casing"] and bad["relative"] == []


def test_topic_checks_need_a_domain_column(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    labels = _labels(tmp_path / "labels.parquet", domain=False)
    router = tmp_path / "r.onnx"
    router.write_bytes(tiny_router())
    with pytest.raises(SchemaError, match="topic checks need a 'domain' column"):
        robustness.robustness(router.read_bytes(), str(labels), weak=CHEAP, strong=STRONG)
    # Without the topic checks the style checks still run, from the command line.
    assert cli.main(["eval", "--labels", str(labels), "--router", str(router), "--weak", CHEAP,
                     "--strong", STRONG, "--robustness", "--no-topics"]) == 0
    out = capsys.readouterr().out
    assert "style:template" in out and "topic:" not in out
    assert np.isfinite(float(out.splitlines()[2].split()[1]))  # the in-domain row's count
    assert cli.main(["eval", "--labels", str(labels), "--robustness", "--router-config",
                     "job.toml"]) == 2
    assert "--robustness measures a router file" in capsys.readouterr().err
