"""Token estimates before a call: the one home of the characters-per-token rule.

Routing, the plan's forecast, the dispatcher's token limiter, the llm router and calibration
all estimate a request's tokens before any provider has counted them, and they must agree:
a forecast that counts differently from the limiter forecasts a different night. After a call
the provider's own count (``usage``) replaces the estimate. The bundled mock provider counts
with the same rule, so that in tests the estimates are exact.

The functions are plain integer arithmetic: they take an ``int`` or a numpy integer array
alike (and so this module imports nothing, for ``batchroute --help``'s sake).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np

CHARS_PER_TOKEN = 4
# Role markers and separators a chat message adds around its content.
MESSAGE_OVERHEAD_TOKENS = 4

N = TypeVar("N", int, "np.ndarray")


def from_chars(chars: N) -> N:
    """Estimated tokens of texts of ``chars`` characters each: ceil(chars / 4)."""
    return -(-chars // CHARS_PER_TOKEN)


def input_estimate(chars: N, messages: N | int = 1) -> N:
    """Estimated input tokens of requests of ``chars`` characters in ``messages`` messages."""
    return from_chars(chars) + MESSAGE_OVERHEAD_TOKENS * messages
