"""The mock provider's quality model (--quality): a truth that tests can compute."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import config, judge
from batchroute.devtools import mock_provider as mp
from batchroute.devtools import sample
from batchroute.devtools.mock_quality import QualityModel, judge_scores, true_letter

CHEAP, MID, STRONG = "mixtral-8x7b-instruct", "claude-3-5-sonnet", "gpt-4-1106-preview"
LABELS = ["billing", "bug", "how-to", "account", "other"]


def _server() -> mp._MockServer:
    return mp._MockServer(mp.MockProviderConfig(quality=True), clock=lambda: 0.0)


def _reply(server: mp._MockServer, body: dict) -> dict:
    payload, _, _ = server._reply(mp._parse_call("openai", body))
    return json.loads(payload)


def test_replayed_outcomes_follow_the_recorded_labels() -> None:
    labels = pq.read_table(config.MMLU_LABELS).slice(0, 400)
    server = _server()
    for row in labels.to_pylist():
        if row["model"] not in (CHEAP, STRONG):
            continue
        answer = _reply(server, {"model": row["model"], "max_tokens": 16, "messages": [
            {"role": "user", "content": row["prompt"]}]})["choices"][0]["message"]["content"]
        right = answer[0] == true_letter(row["prompt"])
        assert right == (row["score"] >= 0.5), row["request_id"]
        assert answer.startswith(f"{answer[0]}. [q={'1.00' if right else '0.00'}]")


def test_skills_order_the_demo_models_on_new_prompts() -> None:
    texts = sample.generate(600, seed=3).column("prompt")
    texts = [t for t in pc.drop_null(texts).to_pylist() if t.strip()
             and not t.rstrip().endswith("Answer:")]
    q = QualityModel(labels_path=None)
    rate = {m: np.mean([q.correct(t, m) for t in texts]) for m in (CHEAP, MID, STRONG)}
    assert rate[CHEAP] + 0.1 < rate[MID] < rate[STRONG]
    assert QualityModel({CHEAP: 9.0}, labels_path=None).skill(CHEAP) == 9.0


def test_a_labels_answer_is_the_true_label_or_another_one() -> None:
    server = _server()
    q = QualityModel()
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS}},
              "required": ["label"], "additionalProperties": False}
    seen_wrong = 0
    for i in range(60):
        text = f"Ticket {i}: my invoice {i * 7} is wrong"
        got = {}
        for m in (CHEAP, STRONG):
            body = {"model": m, "max_tokens": 64, "messages": [{"role": "user", "content": text}],
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "labels", "strict": True, "schema": schema}}}
            got[m] = json.loads(_reply(server, body)["choices"][0]["message"]["content"])["label"]
        if q.correct(text, CHEAP) and q.correct(text, STRONG):
            assert got[CHEAP] == got[STRONG]
        if q.correct(text, CHEAP) != q.correct(text, STRONG):
            assert got[CHEAP] != got[STRONG]
            seen_wrong += 1
    assert seen_wrong > 3


def test_free_text_carries_a_marker_the_judge_reads_back() -> None:
    server = _server()
    q = QualityModel()
    text = "How do I reset my password on the mobile app?"
    answers = {m: _reply(server, {"model": m, "max_tokens": 300, "messages": [
        {"role": "user", "content": text}]})["choices"][0]["message"]["content"]
        for m in (CHEAP, STRONG)}
    for m, a in answers.items():
        assert a.startswith(f"[q={q.quality(text, m):.2f}] ")
    request = judge.prompt(text, answers[STRONG], answers[CHEAP])
    assert judge_scores(request) == (q.quality(text, CHEAP), q.quality(text, STRONG))
    body = {"model": MID, "max_tokens": 64, "messages": [{"role": "user", "content": request}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": judge.NAME, "strict": True, "schema": judge.SCHEMA}}}
    verdict = _reply(server, body)["choices"][0]["message"]["content"]
    assert judge.read(verdict) == (q.quality(text, CHEAP), q.quality(text, STRONG))


def test_without_quality_the_answers_are_as_before() -> None:
    plain = mp._MockServer(mp.MockProviderConfig(), clock=lambda: 0.0)
    body = {"model": CHEAP, "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]}
    assert "[q=" not in _reply(plain, body)["choices"][0]["message"]["content"]
