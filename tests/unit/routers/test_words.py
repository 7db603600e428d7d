"""The vectorised tokenizer: the router's tokens, as hashes and offsets, over any Arrow strings."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchroute.devtools.bench.route import prompts
from batchroute.routers import classifier as rt
from batchroute.routers import words
from tests.helpers import MMLU

# The only two code points the graph's lowercasing turns into ASCII letters (checked over every
# code point): here they are separators, as the module docstring says.
GRAPH_ONLY = "\u0130\u212a"


def _reference(texts: list[str | None], max_chars: int = words.MAX_CHARS) -> list[list[str]]:
    """The specification in plain Python: lowercase ASCII, every other character a separator."""
    return [re.findall("[a-z0-9]+", "".join(c.lower() if c.isascii() else " "
                                            for c in (t or "")[:max_chars])) for t in texts]


def _as_lists(toks: words.Tokens, ref: list[list[str]]) -> None:
    """Assert ``toks`` holds exactly the tokens ``ref`` lists, row by row."""
    assert toks.offsets.dtype == np.int64 and toks.hashes.dtype == np.uint64
    assert toks.offsets.tolist() == np.cumsum([0] + [len(r) for r in ref]).tolist()
    flat = [t for r in ref for t in r]
    np.testing.assert_array_equal(toks.hashes, words.hash_words(flat))


def _onnx_tokens(texts: pa.Array | pa.ChunkedArray) -> list[list[str]]:
    got = rt.session(rt.tokenizer_model()).run(None, {"prompt": rt.clip(texts)})[0]
    return [[str(t) for t in row if t] for row in got]


alphabet = st.sampled_from([*"aZz09 _-.,\n\té€ßİ\u212a東🚀", "\x00", "\x7f", "\x80"])
texts = st.one_of(st.none(), st.text(alphabet=alphabet, max_size=60),
                  st.text(alphabet=st.characters(codec="utf-8"), max_size=40))


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, max_size=12), st.integers(0, 70))
def test_tokens_equal_the_plain_python_reference(rows: list[str | None], max_chars: int) -> None:
    arr, ref = pa.array(rows, pa.string()), _reference(rows, max_chars)
    _as_lists(words.tokens(arr, max_chars=max_chars), ref)
    assert words.token_text(arr, max_chars=max_chars).to_pylist() == [t for r in ref for t in r]


graph_texts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=GRAPH_ONLY),
                      max_size=80)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(graph_texts, st.text(alphabet=alphabet, max_size=60).map(
    lambda t: t.replace("İ", "").replace("\u212a", ""))), min_size=1, max_size=12))
def test_tokens_equal_the_onnx_tokenizer_on_random_texts(rows: list[str]) -> None:
    _as_lists(words.tokens(pa.array(rows)), _onnx_tokens(pa.array(rows)))


def test_tokens_equal_the_onnx_tokenizer_on_real_prompts() -> None:
    mmlu = pc.unique(pq.read_table(MMLU, columns=["prompt"])["prompt"])
    bench = prompts(300, 3000)["prompt"]  # over MAX_CHARS: the clip counts
    for arr in (mmlu, bench):
        _as_lists(words.tokens(arr), _onnx_tokens(arr))


def test_the_two_graph_only_letters_are_separators() -> None:
    row = ["5\u212a İstanbul"]
    assert _onnx_tokens(pa.array(row)) == [["5k", "istanbul"]]
    _as_lists(words.tokens(pa.array(row)), [["5", "stanbul"]])


def test_empty_null_and_separator_only_rows() -> None:
    rows = [None, "", "  ...\n\t!?", "é東🚀", None, "a"]
    _as_lists(words.tokens(pa.array(rows)), [[], [], [], [], [], ["a"]])
    for empty in (pa.array([], pa.string()), pa.chunked_array([], pa.string()),
                  pa.array([None, None], pa.string()), pa.array(["", ""])):
        toks = words.tokens(empty)
        assert len(toks.hashes) == 0 and toks.offsets.tolist() == [0] * (len(empty) + 1)


def test_a_null_slot_with_bytes_behind_it_is_empty() -> None:
    arr = pa.array(["first", "hidden words", "last"])
    validity = pa.array([True, False, True]).buffers()[1]
    masked = pa.Array.from_buffers(pa.string(), 3, [validity, *arr.buffers()[1:]])
    assert masked.null_count == 1
    _as_lists(words.tokens(masked), [["first"], [], ["last"]])


def test_one_huge_row_is_clipped_and_blocks_cut_at_rows() -> None:
    huge = "Word42 " * 300_000  # 2.1 MB: many hashing blocks' worth in one row
    rows = ["before", huge, "after tail", *(["ab cd"] * 100_000)]  # blocks end between rows
    toks = words.tokens(pa.array(rows))
    _as_lists(toks, _reference(rows))
    assert toks.counts()[1] == len(re.findall("[a-z0-9]+", huge[:words.MAX_CHARS].lower()))
    long_rows = ["xy" * 200_000, "z" * 300_000]  # one row longer than a block, unclipped
    _as_lists(words.tokens(pa.array(long_rows), max_chars=10**6), [["xy" * 200_000],
                                                                   ["z" * 300_000]])


def test_tokens_never_span_two_rows() -> None:
    rows = ["abc", "def", "", "gh", "1", "2x"]  # contiguous bytes "abcdefgh12x"
    _as_lists(words.tokens(pa.array(rows)), [[r] if r else [] for r in rows])


def test_the_clip_counts_code_points_and_cuts_between_multibyte_characters() -> None:
    rows = ["é" * 9 + "ab", "東" * 9 + "cd", "🚀" * 10 + "e", "abcdefghijk", "a" * 9 + "é" + "b"]
    _as_lists(words.tokens(pa.array(rows), max_chars=10),
              [["a"], ["c"], [], ["abcdefghij"], ["a" * 9]])
    _as_lists(words.tokens(pa.array(rows), max_chars=11),
              [["ab"], ["cd"], ["e"], ["abcdefghijk"], ["a" * 9, "b"]])
    _as_lists(words.tokens(pa.array(["abcdefghijk", "ab"]), max_chars=10), [["abcdefghij"], ["ab"]])


def test_sliced_chunked_large_and_view_arrays() -> None:
    rows = ["Alpha beta", None, "GAMMA-7 delta", "", "eps", "zeta eta THETA"]
    ref = _reference(rows)
    arr = pa.array(rows)
    _as_lists(words.tokens(arr.slice(2, 3)), ref[2:5])
    _as_lists(words.tokens(pa.array(rows, pa.large_string()).slice(1)), ref[1:])
    chunked = pa.chunked_array([arr.slice(0, 2), pa.array([], pa.string()), arr.slice(2)])
    _as_lists(words.tokens(chunked), ref)
    assert words.token_text(chunked.slice(1)).to_pylist() == [t for r in ref[1:] for t in r]
    _as_lists(words.tokens(arr.cast(pa.string_view())), ref)
    _as_lists(words.tokens(arr.dictionary_encode()), ref)
    with pytest.raises(TypeError, match="strings"):
        words.tokens(pa.array([1, 2]))
    with pytest.raises(ValueError, match="max_chars"):
        words.tokens(arr, max_chars=-1)


def test_a_hash_depends_only_on_the_token() -> None:
    toks = words.tokens(pa.array(["x word y", "word", ("." * 1000) + " Word", "words"]))
    h = toks.hashes
    assert h[1] == h[3] == h[4] and len({int(h[0]), int(h[1]), int(h[2]), int(h[5])}) == 4
    assert words.hash_words(["word"])[0] == h[1]
    with pytest.raises(ValueError, match="single"):
        words.hash_words(["two words"])


def _thue_morse(n: int) -> str:
    s = "a"
    for _ in range(n):
        s += s.translate(str.maketrans("ab", "ba"))
    return s


def test_lookup_ids_unknown_words_and_refusals() -> None:
    vocab = [f"w{i}" for i in range(5000)]
    lookup = words.Lookup(vocab)
    query = ["w17", "nope", "w4999", "w0", "w5000", "w17"]
    assert lookup.ids(words.hash_words(query)).tolist() == [17, 5000, 4999, 0, 5000, 17]
    assert lookup.ids(np.empty(0, np.uint64)).tolist() == []
    assert words.Lookup([]).ids(words.hash_words(["a"])).tolist() == [0]
    with pytest.raises(ValueError, match="duplicate word in the vocabulary: 'w3'"):
        words.Lookup(["w3", "x", "w3"])
    # Wrapping polynomial hashes collide on Thue-Morse strings of 2^11 bytes, for any base.
    tm = _thue_morse(11)
    pair = [tm, tm.translate(str.maketrans("ab", "ba"))]
    with pytest.raises(ValueError, match="hash collision"):
        words.Lookup(pair)


@settings(max_examples=30, deadline=None)
@given(st.sets(st.text(alphabet="abc0", min_size=1, max_size=5), max_size=300),
       st.lists(st.text(alphabet="abc0d", min_size=1, max_size=5), max_size=50))
def test_lookup_equals_a_dict(vocab: set[str], query: list[str]) -> None:
    ordered = sorted(vocab)
    index = {w: i for i, w in enumerate(ordered)}
    got = words.Lookup(ordered).ids(words.hash_words(query + ordered))
    assert got.tolist() == [index.get(w, len(ordered)) for w in query + ordered]
