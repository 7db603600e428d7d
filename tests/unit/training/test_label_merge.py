"""Several label files merged, and prompts labelled for only some models: train fits each
model on the prompts that have its label; calibrate and eval use the prompts labelled for every
model they compare (labels as ``batchroute learn`` draws them from runs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchroute import cli
from batchroute.errors import SchemaError
from batchroute.training import calibrate, evaluate, train
from tests.helpers import CHEAP, STRONG, tiny_router


def _write(path: Path, rows: list[tuple[str, str, str, float]], **extra: list[str]) -> str:
    ids, prompts, models, scores = zip(*rows, strict=True)
    pq.write_table(pa.table({"request_id": ids, "prompt": prompts, "model": models,
                             "score": scores, **extra}), path)
    return str(path)


def test_merging_label_files(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.parquet", [("q1", "what is 1", CHEAP, 1.0),
                                            ("q1", "what is 1", STRONG, 1.0),
                                            ("q2", "what is 2", CHEAP, 0.0)])
    second = _write(tmp_path / "b.parquet", [("night-9", "what is 1", CHEAP, 0.0),
                                             ("night-3", "what is 3", STRONG, 1.0)],
                    source=["judge", "judge"])
    merged = train.read_label_files([first, second])
    assert sorted(merged.iter_rows()) == [
        ("night-3", "what is 3", STRONG, 1.0),
        ("q1", "what is 1", CHEAP, 0.0),  # its id in the first file; the later file's score
        ("q1", "what is 1", STRONG, 1.0), ("q2", "what is 2", CHEAP, 0.0)]
    clash = _write(tmp_path / "c.parquet", [("q2", "another prompt", STRONG, 1.0)])
    with pytest.raises(SchemaError, match=r"c.parquet: request_id 'q2' names another prompt "
                                          r"than it does in .*a.parquet"):
        train.read_label_files([first, clash])


def _partial_labels(path: Path, n: int = 600) -> tuple[str, int]:
    """Every prompt labelled for CHEAP (it succeeds on "easy" prompts), one in three also for
    STRONG (which nearly always succeeds): labels as runs give them."""
    rng = np.random.default_rng(5)
    rows = []
    both = 0
    for i in range(n):
        easy = i % 2 == 0
        prompt = f"{'easy' if easy else 'hard'} question {rng.choice(['x', 'y', 'z'])} {i}"
        rows.append((f"r{i}", prompt, CHEAP, float(easy)))
        if i % 3 == 0:
            rows.append((f"r{i}", prompt, STRONG, float(rng.random() < 0.95)))
            both += 1
    return _write(path, rows), both


def test_train_fits_each_model_on_its_own_rows(tmp_path: Path) -> None:
    labels, both = _partial_labels(tmp_path / "partial.parquet")
    report = train.train(labels, str(tmp_path / "r.onnx"))
    hold = train.is_holdout([f"r{i}" for i in range(600)])
    assert report.metrics[CHEAP]["train_rows"] == int((~hold).sum())  # all 600 prompts
    strong_ids = [i for i in range(600) if i % 3 == 0]
    assert report.metrics[STRONG]["train_rows"] == int((~hold[strong_ids]).sum())
    assert report.metrics[CHEAP]["holdout_auc"] > 0.95
    assert report.train_rows + report.holdout_rows == 600

    # calibrate and eval compare the models on the same prompts: only those with both labels.
    _, out = calibrate.calibrate(tiny_router(), labels,
                                 calibrate.CalibrationTarget.parse("strong-share=0.5"))
    assert out["rows"] == both
    assert train.labelled(labels, [CHEAP, STRONG], "all").height == both


def test_train_and_calibrate_take_several_label_files(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    labels, _ = _partial_labels(tmp_path / "partial.parquet")
    extra = _write(tmp_path / "extra.parquet",
                   [(f"n{i}", f"hard question w {i}", STRONG, 1.0) for i in range(90)]
                   + [(f"n{i}", f"hard question w {i}", CHEAP, 0.0) for i in range(90)])
    assert cli.main(["train", "--labels", labels, "--labels", extra,
                     "--out", str(tmp_path / "r.onnx")]) == 0
    found = re.search(r"(\d+) training and (\d+) held-out", capsys.readouterr().out)
    assert found and int(found[1]) + int(found[2]) == 690  # 600 prompts and 90 more
    report = train.train([labels, extra], str(tmp_path / "r2.onnx"))
    assert report.train_rows + report.holdout_rows == 690
    assert cli.main(["calibrate", "--labels", labels, "--labels", extra, "--router",
                     str(tmp_path / "r.onnx"), "--target", "strong-share=0.3", "--json"]) == 0
    assert '"rows": 290' in capsys.readouterr().out  # 200 complete prompts + 90


def test_eval_can_leave_out_the_training_prompts(tmp_path: Path) -> None:
    weak, strong = "mixtral-8x7b-instruct", "gpt-4-1106-preview"
    rows = []
    for i in range(120):
        prompt = f"question {i} about {'maths' if i % 2 else 'history'}"
        rows += [(f"e{i}", prompt, weak, float(i % 2 == 0)), (f"e{i}", prompt, strong, 1.0)]
    night = _write(tmp_path / "night.parquet", rows)
    seen = _write(tmp_path / "seen.parquet",
                  [(f"t{i}", f"question {i} about {'maths' if i % 2 else 'history'}", weak, 1.0)
                   for i in range(30)])
    from batchroute import config
    from batchroute.routers import classifier as rt

    bundled = rt.read_bytes(config.BUNDLED_ROUTER)
    full = evaluate.evaluate_router(bundled, night, weak=weak, strong=strong, split="all")
    unseen = evaluate.evaluate_router(bundled, night, weak=weak, strong=strong, split="all",
                                      exclude=[seen])
    assert (full["rows"], unseen["rows"]) == (120, 90)
