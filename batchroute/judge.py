"""The judge call of shadow checks ([quality] judge): what it is asked and how its answer reads.

A free-text answer has no field to compare, so a shadowed row's kept answer and the reference
model's answer go to the job's judge model together, and the judge grades both. The request is
built here and nowhere else; the bundled mock provider reads the same headings back.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

NAME: Final = "quality_judge"
"""The structured output (OpenAI) or forced tool (Anthropic) a judge call asks for."""
REQUEST_HEADING: Final = "=== REQUEST ==="
REFERENCE_HEADING: Final = "=== REFERENCE ANSWER ==="
CANDIDATE_HEADING: Final = "=== CANDIDATE ANSWER ==="
OUTPUT_TOKENS: Final = 64  # the answer is one small JSON object

SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "candidate": {"type": "number",
                      "description": "Quality of the candidate answer, 0 (wrong or useless) to "
                                     "1 (correct and complete)."},
        "reference": {"type": "number",
                      "description": "Quality of the reference answer on the same scale."},
    },
    "required": ["candidate", "reference"],
    "additionalProperties": False,
}
DESCRIPTION: Final = "Grade two answers to the same request."
INSTRUCTIONS: Final = (
    "You grade answers to a request. Read the request, then grade each of the two answers on "
    "its own from 0 (wrong or useless) to 1 (correct and complete). Grade what the answer "
    "says, not its length or style. Answer with the two grades only.")


def prompt(request: str, reference: str, candidate: str) -> str:
    """The judge's user message for one pair of answers."""
    return (f"{INSTRUCTIONS}\n\n{REQUEST_HEADING}\n{request}\n\n{REFERENCE_HEADING}\n"
            f"{reference}\n\n{CANDIDATE_HEADING}\n{candidate}\n")


def read(text: str | None) -> tuple[float, float] | None:
    """(candidate, reference) grades from a judge's answer, each clipped to [0, 1]; None when
    the answer is not such an object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    grades = []
    for key in ("candidate", "reference"):
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        grades.append(min(1.0, max(0.0, float(v))))
    return grades[0], grades[1]


def relative(candidate: float, reference: float) -> float:
    """The kept answer's quality relative to the reference's, in [0, 1]: 1 when it is at
    least as good (including when the reference is worthless)."""
    if reference <= 0.0 or candidate >= reference:
        return 1.0
    return max(0.0, candidate / reference)
