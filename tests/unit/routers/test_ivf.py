"""The inverted-file k-NN index (batchroute.routers.ivf) and its compiled scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute.errors import RouterError
from batchroute.routers import _ivfscan, ivf
from batchroute.routers import similarity as memory


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _families(rng: np.random.Generator, n: int, dim: int, families: int = 50,
              spread: float = 0.3) -> np.ndarray:
    """Unit vectors in clusters, as prompts come in families."""
    centres = rng.standard_normal((families, dim)).astype(np.float32)
    x = centres[rng.integers(0, families, n)] + spread * rng.standard_normal(
        (n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k by inner product with the vectors as the index stores them."""
    stored = ivf.quantise(vectors).astype(np.float32) / np.float32(ivf.SCALE)
    sims = queries @ stored.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 700), dim=st.sampled_from(
    [1, 3, 16, 33, 64]), lists=st.integers(1, 40), queries=st.integers(1, 70),
    k=st.integers(1, 50))
def test_probing_every_list_is_an_exact_search(seed: int, rows: int, dim: int, lists: int,
                                               queries: int, k: int) -> None:
    """Whatever the shapes (lists empty or of one block, fewer vectors than k, a dimension
    no multiple of anything), probing all lists finds exactly the top k, best first, and
    pads with (-inf, -1) past the bank."""
    rng = np.random.default_rng(seed)
    vectors, q = _unit(rng, rows, dim), _unit(rng, queries, dim)
    packed = ivf.Lists.pack(vectors, rng.integers(0, lists, rows), lists)
    every = np.broadcast_to(np.arange(lists), (queries, lists)).copy()
    sims, ids = ivf.top_k(packed, q / np.float32(ivf.SCALE), every, k)
    want_sims, _ = _exact(vectors, q, k)
    found = min(k, rows)
    np.testing.assert_allclose(sims[:, :found], want_sims, atol=2e-6)
    assert (np.diff(sims[:, :found], axis=1) <= 0).all()
    # The ids are the rows those similarities belong to, each once.
    stored = ivf.quantise(vectors).astype(np.float32) / np.float32(ivf.SCALE)
    np.testing.assert_allclose(np.einsum("nd,nkd->nk", q, stored[ids[:, :found]]),
                               sims[:, :found], atol=2e-6)
    assert all(len(set(row)) == found for row in ids[:, :found])
    assert (ids[:, found:] == -1).all() and np.isneginf(sims[:, found:]).all()


def test_a_query_gets_the_same_neighbours_alone_as_in_a_batch() -> None:
    """The scan takes the batch list by list; no query's result may depend on the others."""
    rng = np.random.default_rng(3)
    index = ivf.IvfIndex.build(_families(rng, 4000, 24), 32, nprobe=4)
    q = _families(np.random.default_rng(4), 300, 24)
    sims, ids = index.search(q, 10)
    for i in (0, 7, 150, 299):
        one_sims, one_ids = index.search(q[i:i + 1], 10)
        np.testing.assert_array_equal(one_ids[0], ids[i])
        np.testing.assert_array_equal(one_sims[0], sims[i])


def test_scanning_each_querys_nearest_list_first_changes_no_result() -> None:
    rng = np.random.default_rng(11)
    index = ivf.IvfIndex.build(_families(rng, 5000, 16), 64, nprobe=8)
    q = _families(np.random.default_rng(12), 400, 16) / np.float32(ivf.SCALE)
    probes = ivf.nearest_lists(index.coarse, q, 8)
    cold = ivf.top_k(index.lists, q, probes, 10)
    for warm in (1, 3):
        for got, want in zip(ivf.top_k(index.lists, q, probes, 10, warm=warm), cold,
                             strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_second_call_goes_on_from_where_the_first_left_off() -> None:
    rng = np.random.default_rng(5)
    vectors, q = _unit(rng, 500, 16), _unit(rng, 20, 16)
    lists = 6
    packed = ivf.Lists.pack(vectors, rng.integers(0, lists, 500), lists)
    scaled = q / np.float32(ivf.SCALE)
    both = ivf.top_k(packed, scaled, np.broadcast_to(np.arange(6), (20, 6)).copy(), 8)
    # The same lists in two calls on the same heaps: lists 0-2, then 3-5.
    dist = np.full((20, 8), -np.inf, np.float32)
    labels = np.full((20, 8), -1, np.int64)
    for part in (np.arange(3), np.arange(3, 6)):
        probes = np.broadcast_to(part, (20, 3)).ravel()
        order = np.argsort(probes, kind="stable")
        qstart = np.zeros(lists + 1, np.int64)
        np.cumsum(np.bincount(probes, minlength=lists), out=qstart[1:])
        _ivfscan.scan(packed.codes, packed.block_off, packed.ids, 16, scaled, qstart,
                      (order // 3).astype(np.int32), dist, labels)
    best = np.argsort(-dist, axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(labels, best, axis=1), both[1])


def test_recall_on_families_of_prompts_and_more_lists_probed_finds_more() -> None:
    rng = np.random.default_rng(6)
    vectors = _families(rng, 20_000, 32, families=200)
    q = _families(np.random.default_rng(7), 500, 32, families=200)
    index = ivf.IvfIndex.build(vectors, memory.ivf_lists(len(vectors)), seed=0)
    _, truth = _exact(vectors, q, 16)

    def recall(nprobe: int) -> float:
        found = index.search(q, 16, nprobe=nprobe)[1]
        return float(np.mean([len(np.intersect1d(a, b)) / 16
                              for a, b in zip(found, truth, strict=True)]))

    curve = [recall(p) for p in (1, 4, 16, index.nlist)]
    assert curve == sorted(curve) and curve[0] < 0.9
    assert curve[2] >= 0.9 and curve[-1] == 1.0
    assert index.ntotal == 20_000 and index.nlist == memory.ivf_lists(20_000)


def test_a_query_with_nan_has_no_neighbour_and_the_others_are_unaffected() -> None:
    rng = np.random.default_rng(8)
    index = ivf.IvfIndex.build(_unit(rng, 300, 8), 4)
    q = _unit(rng, 3, 8)
    q[1, 2] = np.nan
    sims, ids = index.search(q, 5)
    assert (ids[1] == -1).all() and np.isneginf(sims[1]).all()
    np.testing.assert_array_equal(ids[[0, 2]], index.search(q[[0, 2]], 5)[1])


def test_saved_and_loaded_an_index_answers_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    index = ivf.IvfIndex.build(_families(rng, 3000, 16), 16, nprobe=3)
    path = tmp_path / "bank.parquet.ivf"
    index.save(path, {"stamp": "abc"})
    loaded, meta = ivf.IvfIndex.load(path, nprobe=3)
    assert meta["stamp"] == "abc" and meta["format"] == ivf.FORMAT
    assert not loaded.lists.codes.flags.writeable  # memory-mapped, shared between actors
    q = _unit(rng, 50, 16)
    for got, want in zip(loaded.search(q, 7), index.search(q, 7), strict=True):
        np.testing.assert_array_equal(got, want)
    assert loaded.nbytes == index.nbytes


def test_a_file_that_is_not_an_index_is_refused(tmp_path: Path) -> None:
    from batchroute.routers import tensorfile

    other = tmp_path / "other.ivf"
    tensorfile.write(other, {"x": np.zeros(3, np.float32)}, {"format": "something-else"})
    with pytest.raises(RouterError, match="not a batchroute-ivf-1 index"):
        ivf.IvfIndex.load(other)
    lacking = tmp_path / "lacking.ivf"
    tensorfile.write(lacking, {"centroids": np.zeros((2, 4), np.float32)},
                     {"format": ivf.FORMAT})
    with pytest.raises(RouterError, match="index tensor 'codes' is missing"):
        ivf.IvfIndex.load(lacking)
    index = ivf.IvfIndex.build(_unit(np.random.default_rng(1), 100, 4), 2)
    torn = tmp_path / "torn.ivf"
    index.save(torn, {})
    torn.write_bytes(torn.read_bytes()[:-100])
    with pytest.raises(RouterError, match="outside the file"):
        ivf.IvfIndex.load(torn)


def _args(rows: int = 40, dim: int = 8, n: int = 3, k: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    packed = ivf.Lists.pack(_unit(rng, rows, dim), rng.integers(0, 2, rows), 2)
    return {"codes": packed.codes, "block_off": packed.block_off, "ids": packed.ids,
            "dim": np.int64(dim), "queries": _unit(rng, n, dim) / np.float32(ivf.SCALE),
            "qstart": np.array([0, n, 2 * n], np.int64),
            "qlist": np.concatenate([np.arange(n), np.arange(n)]).astype(np.int32),
            "distances": np.full((n, k), -np.inf, np.float32),
            "labels": np.full((n, k), -1, np.int64)}


def _scan(a: dict[str, np.ndarray]) -> None:
    _ivfscan.scan(a["codes"], a["block_off"], a["ids"], int(a["dim"]), a["queries"],
                  a["qstart"], a["qlist"], a["distances"], a["labels"])


@pytest.mark.parametrize(("change", "message"), [
    ({"queries": np.zeros((3, 8), np.float64)}, "queries: items of 8 bytes"),
    ({"codes": np.zeros((3, 8, 16), np.int32)}, "codes: items of 4 bytes"),
    ({"dim": np.int64(7)}, "codes: .* not whole blocks of 7"),
    ({"dim": np.int64(0)}, "dim: must be in"),
    ({"ids": np.zeros(5, np.int64)}, "ids: 5 entries"),
    ({"qstart": np.array([0, 3], np.int64)}, "need lists \\+ 1 entries"),
    ({"qstart": np.array([0, 7, 6], np.int64)}, "must not decrease"),
    ({"qstart": np.array([0, 5, 5], np.int64)}, "from 0 to the number"),
    ({"block_off": np.array([0, 9, 2], np.int64)}, "from 0 to the number"),
    ({"qlist": np.array([0, 1, 2, 0, 1, 3], np.int32)}, r"qlist\[5\] = 3: not a query of 3"),
    ({"qlist": np.array([0, 1, 2, 0, -1, 2], np.int32)}, r"qlist\[4\] = -1"),
    ({"labels": np.full((3, 5), -1, np.int64)}, "distances and labels: need n x k"),
    ({"distances": np.full((3, 4), -np.inf, np.float32)[:, ::2]}, "not a C-contiguous"),
    ({"queries": np.zeros((3, 8), ">f4")}, "queries: items"),
])
def test_the_scan_refuses_a_malformed_argument_instead_of_reading_out_of_bounds(
        change: dict[str, np.ndarray], message: str) -> None:
    a = _args() | change
    with pytest.raises(ValueError, match=message):
        _scan(a)


def test_the_scan_writes_only_into_writable_results() -> None:
    a = _args()
    a["distances"].flags.writeable = False
    with pytest.raises(ValueError, match="distances: not a C-contiguous writable buffer"):
        _scan(a)


def test_the_scan_fixes_a_results_row_that_is_not_a_heap() -> None:
    """A caller's row in any order is taken as the k best so far: here one entry better than
    anything in the lists, and three empty places."""
    fresh = _args(k=4)
    _scan(fresh)
    top3 = np.sort(fresh["distances"], axis=1)[:, ::-1][:, :3]
    a = _args(k=4)
    a["distances"][:] = [5.0, -np.inf, -np.inf, -np.inf]  # its root is not its smallest
    a["labels"][:] = [99, -1, -1, -1]
    _scan(a)
    best = np.argsort(-a["distances"], axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(a["distances"], best, axis=1)[:, 1:],
                                  top3)
    assert (np.take_along_axis(a["labels"], best, axis=1)[:, 0] == 99).all()


def test_an_unreadable_saved_index_is_built_again(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    n = 400
    bank = memory.Bank(np.array([f"k{i}" for i in range(n)], dtype=object),
                       _families(rng, n, 8), ("m",), np.ones((n, 1), np.float32), "")
    path = tmp_path / "bank.parquet"
    path.write_bytes(b"stand-in: the stamp reads the file's size and time")
    memory.ann_index(bank, str(path), "ivf")
    saved = tmp_path / "bank.parquet.ivf"
    saved.write_bytes(saved.read_bytes()[:200])
    index = memory.ann_index(bank, str(path), "ivf")
    assert index.ntotal == n and "unreadable" in caplog.text
    assert ivf.IvfIndex.load(saved)[0].ntotal == n  # and saved whole again
