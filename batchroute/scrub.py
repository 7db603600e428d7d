"""API keys out of text: the one place a provider's words are cleaned before they are kept.

A provider that refuses a key may quote it back, and not always as it was sent: in capitals,
cut short, in the middle of a JSON body. So a :class:`Scrubber` replaces every run of
``MIN_CHARS`` or more consecutive characters of its key, in any case, with ``MASK``: error
messages in result rows, the dispatcher's log lines, and exceptions that leave a dispatch
actor all go through one. A shorter run could be ordinary prose ("sk-", "-key-"), and a key
shorter than ``MIN_CHARS`` is not scrubbed at all.

The pattern is built once per key: a compiled alternation of the key's ``MIN_CHARS``-grams
inside a lookahead, which finds every position where a gram starts (overlapping ones too).
The windows found are merged, so a run of any length becomes a single mask. It runs on error
text only, never on answers.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from batchroute.errors import InternalDispatchError

MIN_CHARS = 8
MASK = "***"


class Scrubber:
    """Removes ``key`` from text: every run of at least ``MIN_CHARS`` of its characters, in
    any case. ``Scrubber(None)`` (or a short key) returns text unchanged."""

    def __init__(self, key: str | None) -> None:
        key = key or ""
        grams = sorted({key[i:i + MIN_CHARS] for i in range(len(key) - MIN_CHARS + 1)})
        self._windows = re.compile(
            "(?=(?:" + "|".join(re.escape(g) for g in grams) + "))",
            re.IGNORECASE) if grams else None

    def scrub(self, text: str) -> str:
        if self._windows is None:
            return text
        spans: list[list[int]] = []
        for match in self._windows.finditer(text):
            start = match.start()
            if spans and start <= spans[-1][1]:
                spans[-1][1] = start + MIN_CHARS
            else:
                spans.append([start, start + MIN_CHARS])
        if not spans:
            return text
        out: list[str] = []
        at = 0
        for start, end in spans:
            out += [text[at:start], MASK]
            at = end
        out.append(text[at:])
        return "".join(out)

    @contextlib.contextmanager
    def exceptions(self) -> Iterator[None]:
        """Let no exception out whose message holds the key: one that does is replaced by an
        InternalDispatchError carrying its type and scrubbed message, raised ``from None``
        so that no traceback (Ray's included) prints the original's message."""
        try:
            yield
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            clean = self.scrub(text)
            if clean == text:
                raise
            raise InternalDispatchError(clean) from None
