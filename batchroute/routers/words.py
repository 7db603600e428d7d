"""The words router's tokenizer, vectorised over Arrow strings: one 64-bit hash per token.

A token is what the router has always read: lowercase the text, then take maximal runs of
``[a-z0-9]`` in its first ``max_chars`` characters (code points). :func:`tokens` returns the
tokens of a whole batch as two flat numpy arrays, never one Python object per row or token:

    hashes  uint64 [T]      one hash of each token's bytes, tokens in text order
    offsets int64  [N + 1]  row i's tokens are hashes[offsets[i]:offsets[i + 1]]

How, on the UTF-8 value buffer of the Arrow array (read zero-copy for string and large_string,
sliced or not, chunk by chunk; string_view and dictionary arrays are cast first):

1. Clipping. A row of at most ``max_chars`` bytes has at most that many characters, so only
   when some row is longer is the array clipped (``pyarrow.compute.utf8_slice_codeunits``,
   which counts code points). Nulls are filled with "" first.
2. Token bytes: ``a-z`` and ``0-9`` after ``A-Z`` are lowercased (``byte | 0x20``); every other
   byte is a separator, every byte >= 0x80 (all of non-ASCII UTF-8) among them.
3. Token bounds. Runs of token bytes start where the mask rises and end where it falls (the
   mask compared with itself shifted by one); a run that crosses from one row into the next is cut at the row
   start, so a token never spans two rows.
4. Hashes. A polynomial hash from one prefix sum, in wrapping uint64 arithmetic (mod 2^64):
   with ``G[k] = sum_{j<k} b_j Q^j`` and ``Q`` odd, the hash of bytes ``[s, e)`` is
   ``(G[e] - G[s]) * P^s`` where ``P = Q^-1 mod 2^64``, which is ``sum b_j Q^(j-s)`` and so
   depends only on the token's bytes. The result goes through murmur3's 64-bit finaliser (a
   bijection) so that every bit of it is well mixed and buckets by low or high bits are even.
   The work runs over blocks of about :data:`BLOCK` bytes (whole rows), which keeps the
   power tables small and the passes in cache.
5. Offsets: the token starts searched against the row starts.

Against the ONNX graph's tokenizer (StringNormalizer LOWER in C.UTF-8, then the ``[a-z0-9]+``
Tokenizer) this is exact for ASCII text, and for non-ASCII text it differs only where a
non-ASCII character lowercases to an ASCII letter, which (checked over every code point) only
two do: the KELVIN SIGN (U+212A, lowercase ``k``) and
LATIN CAPITAL LETTER I WITH DOT ABOVE (U+0130, lowercase ``i`` in the C locale, ``i`` + U+0307 in
Python). Here they stay separators, so ``"5\u212a"`` is the token ``5`` instead of ``5k``.
Every other non-ASCII character is a separator in both. The tests check the two agree on the
bundled MMLU prompts and on the bench's prompts.

Hash collisions: two different tokens may share a hash with probability about 2^-64 per
pair; :class:`Lookup` refuses a vocabulary with a collision inside it, so only an unknown word
colliding with a known one could be misread, and wrapping polynomial hashes can be made to
collide on purpose (Thue-Morse strings of 2,048 bytes, for any odd ``Q``): an adversary could at most
have one of its own tokens scored as a vocabulary word.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pyarrow as pa

# Routing looks at the first MAX_CHARS characters only, in training and in serving alike. (The
# ONNX graph pads every row to the batch's longest token list, so there one 150,000-character
# document would make a whole batch cost as much as thousands of prompts.)
MAX_CHARS = 2048
# Bytes hashed per pass (whole rows; a single longer row is a block of its own).
BLOCK = 1 << 18

_Q = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
_P = pow(_Q, -1, 1 << 64)
_U64 = np.uint64

def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64 (uint64): each pass doubles the prefix computed."""
    out = np.empty(n, _U64)
    if n == 0:
        return out
    out[0] = 1
    filled = 1
    while filled < n:
        take = min(filled, n - filled)
        with np.errstate(over="ignore"):
            np.multiply(out[:take], _U64(pow(base, filled, 1 << 64)),
                        out=out[filled:filled + take])
        filled += take
    return out


class _Tables:
    """Q^j and P^j for j < size, grown on demand (a block longer than BLOCK)."""

    def __init__(self) -> None:
        self.size = 0
        self.q = np.empty(0, _U64)
        self.p = np.empty(0, _U64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > self.size:
            size = max(n, BLOCK + 1)
            self.q, self.p, self.size = _powers(_Q, size), _powers(_P, size), size
        return self.q, self.p


_TABLES = _Tables()


@dataclass(frozen=True)
class Tokens:
    hashes: np.ndarray   # uint64 [T]: a 64-bit hash of each token's bytes, tokens in text order
    offsets: np.ndarray  # int64 [N + 1]: row i's tokens are hashes[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self) -> np.ndarray:
        """Tokens per row, int64 [N]."""
        return np.diff(self.offsets)


def tokens(texts: pa.Array | pa.ChunkedArray, *, max_chars: int = MAX_CHARS) -> Tokens:
    """The router's tokens of every row: lowercase, then maximal runs of ``[a-z0-9]`` in the
    first ``max_chars`` characters (code points) of each text; null counts as empty.
    Raises ValueError for a negative ``max_chars`` and TypeError for a non-string array."""
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    parts = [_chunk_tokens(c, max_chars) for c in chunks if len(c)]
    if not parts:
        return Tokens(np.empty(0, _U64), np.zeros(1, np.int64))
    return _concat(parts)


def hash_words(words: Sequence[str]) -> np.ndarray:
    """uint64 [len(words)]: the hash :func:`tokens` gives each word (a word is hashed as the
    single token it is; pass words that are tokens, ``[a-z0-9]+``). Raises ValueError for a
    word that is not exactly one token."""
    toks = tokens(pa.array(list(words), pa.large_string()), max_chars=1 << 62)
    bad = np.flatnonzero(toks.counts() != 1)
    if len(bad):
        raise ValueError(f"not a single [a-z0-9]+ token: {words[int(bad[0])]!r}")
    return toks.hashes


def token_text(texts: pa.Array | pa.ChunkedArray, *,
               max_chars: int = MAX_CHARS) -> pa.LargeStringArray:
    """Every token :func:`tokens` finds, as its lowercase text, flat and in the same order (so
    ``token_text(x)[i]`` is the word whose hash is ``tokens(x).hashes[i]``). For building a
    vocabulary and for reading; serving needs only the hashes."""
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    out = [pa.array([], pa.large_string())]
    for chunk in chunks:
        arr = _as_string_array(chunk, max_chars)
        _, spans = _chunk(arr)
        if not len(spans):
            continue
        low = np.frombuffer(arr.buffers()[2], np.uint8) | np.uint8(0x20)
        # Offsets s0, e0, s1, e1, ... give the tokens at even positions, the gaps between them
        # at odd ones.
        both = pa.LargeStringArray.from_buffers(
            2 * len(spans) - 1, pa.py_buffer(spans.astype(np.int64).ravel()), pa.py_buffer(low))
        out.append(both.take(pa.array(np.arange(0, len(both), 2))))
    return pa.concat_arrays(out)


class Lookup:
    """Token hashes to vocabulary ids through an open-addressing hash table (linear probing)
    of at least four slots per word, indexed by a hash's top bits. A lookup is one vectorised
    probe of every hash, then further probes only for the few that met another word's slot:
    about ten times faster than ``np.searchsorted`` over the sorted hashes, whose binary
    search misses the cache on every step."""

    def __init__(self, words: Sequence[str]) -> None:
        """Raises ValueError on a duplicate word, a hash collision, or a word that is not one
        token."""
        if len(set(words)) != len(words):
            dup = next(w for w, k in Counter(words).items() if k > 1)
            raise ValueError(f"duplicate word in the vocabulary: {dup!r}")
        h = hash_words(words)
        order = np.argsort(h, kind="stable")
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        if len(same):
            i = int(same[0])
            raise ValueError(f"hash collision in the vocabulary: {words[int(order[i])]!r} and "
                             f"{words[int(order[i + 1])]!r}")
        self.size = len(words)
        self._bits = max(4, (4 * max(self.size, 1) - 1).bit_length())
        slots = 1 << self._bits
        self._keys = np.zeros(slots, _U64)
        self._ids = np.full(slots, -1, np.int32 if self.size < 2**31 else np.int64)
        # Place the words round by round: each round every word still waiting takes its
        # current slot if it is free (one word per slot), the rest move one slot on.
        pos = self._home(h)
        waiting = np.arange(self.size)
        self._probes = 0
        while len(waiting):
            self._probes += 1
            free = self._ids[pos] < 0
            cand, cpos = waiting[free], pos[free]
            _, first = np.unique(cpos, return_index=True)
            self._keys[cpos[first]] = h[cand[first]]
            self._ids[cpos[first]] = cand[first]
            placed = np.zeros(len(waiting), np.bool_)
            placed[np.flatnonzero(free)[first]] = True
            waiting, pos = waiting[~placed], (pos[~placed] + 1) & (slots - 1)

    def _home(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> _U64(64 - self._bits)).astype(np.int64)

    def ids(self, hashes: np.ndarray) -> np.ndarray:
        """int64 [T]: the index into ``words`` of each hash, ``len(words)`` for one not in it."""
        pos = self._home(np.asarray(hashes, _U64))
        found = self._ids[pos]
        hit = self._keys[pos] == hashes
        out = np.where(hit, found, self.size).astype(np.int64)
        # A hash that met another word's slot probes on; one that met an empty slot is unknown.
        todo = np.flatnonzero(~hit & (found >= 0))
        mask = len(self._keys) - 1
        for _ in range(self._probes):
            if not len(todo):
                break
            p = (pos[todo] + 1) & mask
            pos[todo] = p
            found = self._ids[p]
            hit = self._keys[p] == hashes[todo]
            out[todo[hit]] = found[hit]
            todo = todo[~hit & (found >= 0)]
        return out


def _as_string_array(arr: pa.Array, max_chars: int) -> pa.Array:
    """``arr`` as string or large_string with no nulls and no row over ``max_chars`` chars."""
    import pyarrow.compute as pc

    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        if not (pa.types.is_string_view(arr.type) or pa.types.is_dictionary(arr.type)
                or pa.types.is_null(arr.type)):
            raise TypeError(f"tokens() needs strings, got {arr.type}")
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    offsets = _offsets(arr)
    if len(arr) and int((offsets[1:] - offsets[:-1]).max()) > max_chars:
        arr = pc.utf8_slice_codeunits(arr, 0, max_chars)
    return arr


def _offsets(arr: pa.Array) -> np.ndarray:
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    buf = arr.buffers()[1]
    return np.frombuffer(buf, width, count=len(arr) + 1, offset=arr.offset * width().itemsize)


def _chunk_tokens(arr: pa.Array, max_chars: int) -> Tokens:
    return _chunk(_as_string_array(arr, max_chars), spans=False)[0]


def _chunk(arr: pa.Array, *, spans: bool = True) -> tuple[Tokens, np.ndarray]:
    """The tokens of a clipped, null-free string array, and (with ``spans``) each token's
    [start, end) in its value buffer (int64 [T, 2]; else [0, 2])."""
    offsets = _offsets(arr).astype(np.int64)
    data_buf = arr.buffers()[2]
    if data_buf is None or offsets[-1] == offsets[0]:
        return Tokens(np.empty(0, _U64), np.zeros(len(arr) + 1, np.int64)), np.empty((0, 2), int)
    data = np.frombuffer(data_buf, np.uint8)
    # Whole rows per block: row r starts a new block when its start crosses a BLOCK multiple.
    rel = offsets - offsets[0]
    cuts = np.unique(np.searchsorted(rel, np.arange(0, int(rel[-1]), BLOCK), side="right") - 1)
    cuts = np.append(cuts, len(arr))
    if cuts[0] != 0:
        cuts = np.insert(cuts, 0, 0)
    parts = [_block(data, offsets[r0:r1 + 1], spans) for r0, r1 in pairwise(cuts)]
    if len(parts) == 1:
        return parts[0]
    return _concat([t for t, _ in parts]), np.concatenate([sp for _, sp in parts])


def _block(data: np.ndarray, offsets: np.ndarray, spans: bool) -> tuple[Tokens, np.ndarray]:
    """The tokens of the rows whose bytes are data[offsets[0]:offsets[-1]], and their spans."""
    lo = int(offsets[0])
    n_bytes = int(offsets[-1]) - lo
    rows = offsets - lo
    if n_bytes == 0:
        return Tokens(np.empty(0, _U64), np.zeros(len(rows), np.int64)), np.empty((0, 2), int)
    raw = data[lo:lo + n_bytes]
    # OR 0x20 lowercases A-Z and keeps a-z and 0-9; separators' values never reach a hash.
    low = raw | np.uint8(0x20)
    mask = np.zeros(n_bytes + 2, np.bool_)
    token = mask[1:-1]
    np.less(low - np.uint8(ord("a")), 26, out=token)
    token |= (raw - np.uint8(ord("0"))) < 10
    edges = np.flatnonzero(mask[1:] != mask[:-1])  # rises then falls, alternately
    starts, ends = edges[0::2], edges[1::2]
    # A run crossing a row start is cut there: that position ends one token and starts one.
    inner = rows[1:-1]
    inner = inner[(inner > 0) & (inner < n_bytes)]
    if len(inner):
        cross = np.unique(inner[token[inner - 1] & token[inner]])
        if len(cross):
            starts = np.insert(starts, np.searchsorted(starts, cross), cross)
            ends = np.insert(ends, np.searchsorted(ends, cross), cross)
    q, p = _TABLES.get(n_bytes + 1)
    g = np.empty(n_bytes + 1, _U64)
    g[0] = 0
    with np.errstate(over="ignore"):
        np.multiply(low, q[:n_bytes], out=g[1:])
        np.cumsum(g[1:], out=g[1:])
        h = g[ends] - g[starts]
        h *= p[starts]
    toks = Tokens(_fmix64(h), np.searchsorted(starts, rows).astype(np.int64))
    return toks, (np.stack([starts, ends], axis=1) + lo) if spans else np.empty((0, 2), int)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place: a bijection that mixes every bit."""
    with np.errstate(over="ignore"):
        h ^= h >> _U64(33)
        h *= _U64(0xFF51AFD7ED558CCD)
        h ^= h >> _U64(33)
        h *= _U64(0xC4CEB9FE1A85EC53)
        h ^= h >> _U64(33)
    return h


def _concat(parts: Sequence[Tokens]) -> Tokens:
    base = np.cumsum([0] + [len(t.hashes) for t in parts])
    offsets = np.concatenate([t.offsets[:-1] + b for t, b in zip(parts, base[:-1], strict=True)]
                             + [base[-1:]]).astype(np.int64)
    return Tokens(np.concatenate([t.hashes for t in parts]), offsets)
