"""``batchroute bench similarity`` on a small bank: the keys an acceptance check reads, and
figures that mean what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchroute.config import RouterConfig
from batchroute.devtools.bench import similarity as bench


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("bench-similarity")
    # 60,000 entries: past the exact-search limit, so the stage searches an IVF index.
    return bench.similarity(bank_rows=60_000, queries=2_000, recall_queries=300,
                            compare_rows=16, workdir=str(work))


def test_the_interface_keys_are_there_and_sane(result: dict[str, object]) -> None:
    for key in ("embed_prompts_per_s_per_core", "stage_prompts_per_s_per_core",
                "recall_at_32", "bank_rows", "bank_bytes"):
        assert key in result
    assert result["bank_rows"] == 60_000 and result["index"] == "IvfIndex"
    assert 0.0 < float(result["recall_at_32"]) <= 1.0  # type: ignore[arg-type]
    assert float(result["embed_prompts_per_s_per_core"]) > 0  # type: ignore[arg-type]
    assert float(result["stage_prompts_per_s_per_core"]) > 0  # type: ignore[arg-type]
    # The stage is fed as a routing actor feeds it: the job's default batch size.
    assert result["stage_batch_rows"] == RouterConfig().batch_size
    # The yardsticks measured beside it, in the same run.
    assert float(result["minilm_embed_prompts_per_s_per_core"]) > 0  # type: ignore[arg-type]
    assert float(result["words_router_prompts_per_s_per_core"]) > 0  # type: ignore[arg-type]
    assert 800 <= float(result["embed_chars_mean"]) <= 1100  # type: ignore[arg-type]
    # The stage holds int16 codes: well under the float32 vectors of the file.
    assert int(result["bank_bytes"]) < 0.75 * int(result["bank_file_bytes"])  # type: ignore[call-overload]
    json.dumps(result)


def test_the_curve_trades_recall_for_speed(result: dict[str, object]) -> None:
    curve = result["curve"]
    assert isinstance(curve, list)
    assert [c["nprobe"] for c in curve] == list(bench.NPROBES)
    recalls = [c["recall_at_32"] for c in curve]
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]
    at_default = next(c for c in curve if c["nprobe"] == result["nprobe"])
    assert at_default["recall_at_32"] == pytest.approx(result["recall_at_32"], abs=1e-9)
    # faiss's IVF over the same lists, the yardstick: about the same recall at each nprobe
    # (its float16 codes round differently), at its own rate.
    for c in curve:
        assert abs(c["faiss_recall_at_32"] - c["recall_at_32"]) < 0.02
        assert c["faiss_knn_queries_per_s_per_core"] > 0 and c["knn_queries_per_s_per_core"] > 0


def test_families_share_their_question_and_outcomes() -> None:
    base = ["alpha question", "beta question"]
    outcomes = np.array([[1.0, 1.0], [0.0, 1.0]], np.float32)
    text, out = bench.family_texts(base, outcomes, 400, context_chars=5, seed=0)
    starts = [t.split(" Context: ")[0] for t in text.to_pylist()]
    assert set(starts) == set(base)
    fam = np.array([base.index(s) for s in starts])
    flipped = (out != outcomes[fam]).any(axis=1)
    assert 0.03 < flipped.mean() < 0.2  # one in ten flipped
    assert len(set(text.to_pylist())) == 400  # no two alike: exact ties would blur recall


def test_the_table_prints(result: dict[str, object]) -> None:
    text = bench.format_table(result)
    assert "recall" in text and "nprobe" in text


def test_a_bank_of_the_default_million_entries_is_written(tmp_path: Path) -> None:
    """At the default size (pyarrow 26 turns a NumPy array of two million model names into a
    ChunkedArray; the bank's outcomes must not be built from one)."""
    from batchroute.routers import similarity as sim

    n = bench.DEFAULT_ROWS["static"]
    outcomes = np.tile(np.array([[1.0, 0.0]], np.float32), (n, 1))
    path = tmp_path / "bank.parquet"
    bench._write_bank(path, np.ones((n, 1), np.float32), outcomes, "test-embedder")
    bank = sim.Bank.read(str(path))
    assert len(bank) == n and bank.models == tuple(sorted((bench.CHEAP, bench.STRONG)))
    assert (bank.outcomes[:, bank.models.index(bench.CHEAP)] == 1.0).all()
    assert (bank.outcomes[:, bank.models.index(bench.STRONG)] == 0.0).all()
