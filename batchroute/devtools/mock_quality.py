"""The mock provider's quality model: which model answers which prompt well.

With ``--quality`` the bundled mock's models differ in quality, so that shadow checks, the
quality rollup and the router's learning can be tested end to end against a truth the mock
knows. Everything here is a pure function of (prompt text, model), so a test can compute the
truth of any run without a server.

* **Replayed outcomes.** A prompt found in the bundled labels (``mmlu_labels.parquet``) is
  answered correctly by a model that the labels record exactly when its recorded score is at
  least 0.5.
* **Latent skill.** Any other (prompt, model) pair is correct with probability
  ``sigmoid(skill(model) - difficulty(prompt))``, drawn from a digest of the pair. The
  difficulty grows with length and maths and has a per-prompt part; see :func:`difficulty`.
  Skills (:data:`DEFAULT_SKILLS`, or ``--model-skill NAME=S``) make the demo's cheap, middle
  and strong models differ as real ones do.

What a correct or wrong answer is depends on what the request asks for:

* **MMLU style** (the prompt ends with ``Answer:``): the correct letter is fixed by a digest
  of the prompt alone; a wrong answer is another letter.
* **Labels and JSON outputs:** the true output is an instance of the schema drawn from the
  prompt alone (a labels task: the prompt's true label). A wrong answer changes at least one
  top-level field (a label: another label).
* **Free text:** every answer starts with a quality marker ``[q=0.73]``: 1.00 for a correct
  answer, 0.00 for a wrong letter, and 0.10-0.59 for wrong free text. A judge call (a
  structured output named :data:`JUDGE`) reads both answers' markers back and grades them
  exactly: the mock is a perfect judge, so what is tested is the sampling and the estimate.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Final

from batchroute import judge
from batchroute.config import MMLU_LABELS

__all__ = ["DEFAULT_SKILL", "DEFAULT_SKILLS", "JUDGE", "QualityModel", "difficulty",
           "judge_scores", "marker"]

JUDGE: Final = judge.NAME

# The demo's models (cheap, middle, strong by price) and common names: a gap of about one unit
# of skill is the gap between a small open model and a frontier one on a typical prompt.
DEFAULT_SKILLS: Final[Mapping[str, float]] = {
    "mixtral-8x7b-instruct": 1.0,
    "claude-3-5-sonnet": 2.2,
    "gpt-4-1106-preview": 2.8,
}
DEFAULT_SKILL: Final = 2.0
_SMALL = re.compile(r"mini|nano|haiku|flash|mixtral|mistral|llama|8b|7b|small", re.IGNORECASE)
_LARGE = re.compile(r"gpt-4|gpt-5|opus|sonnet|o1|o3|pro|large", re.IGNORECASE)
_MATHS: Final = frozenset("0123456789+-*/=^%<>")
_MARK = re.compile(r"\[q=(\d\.\d\d)\]")


def _u(*parts: str) -> float:
    """A uniform number in [0, 1) from a digest of ``parts``."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8,
                             person=b"mockquality").digest()
    return int.from_bytes(digest, "big") / 2**64


def difficulty(text: str) -> float:
    """A prompt's latent difficulty: about -1 (a short plain question) to 4 (a long, maths-
    heavy one), from its length, its maths characters and a digest of the text."""
    maths = sum(text.count(c) for c in _MATHS)
    return (-1.0 + 2.0 * min(1.0, len(text) / 4000) + 1.5 * min(1.0, maths / 40)
            + 2.0 * _u("difficulty", text))


def marker(q: float) -> str:
    """The quality marker a free-text answer starts with (9 characters with its space)."""
    return f"[q={min(1.0, max(0.0, q)):.2f}]"


def judge_scores(text: str) -> tuple[float, float]:
    """What the mock judge reads from a judge request: (candidate, reference) qualities, the
    first marker after each section heading; an answer without one is worth 0."""
    def after(heading: str, until: str | None) -> float:
        start = text.find(heading)
        if start < 0:
            return 0.0
        section = text[start + len(heading):]
        if until is not None and (end := section.find(until)) >= 0:
            section = section[:end]
        found = _MARK.search(section)
        return float(found.group(1)) if found else 0.0
    ref, cand = judge.REFERENCE_HEADING, judge.CANDIDATE_HEADING
    reference_first = text.find(ref) < text.find(cand)
    reference = after(ref, cand if reference_first else None)
    candidate = after(cand, None if reference_first else ref)
    return candidate, reference


@lru_cache(maxsize=4)
def _recorded(path: str) -> Mapping[str, Mapping[str, bool]]:
    """prompt -> {model: correct} from a labels file (score >= 0.5 is correct)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["prompt", "model", "score"])
    out: dict[str, dict[str, bool]] = {}
    for prompt, model, score in zip(table.column("prompt").to_pylist(),
                                    table.column("model").to_pylist(),
                                    table.column("score").to_pylist(), strict=True):
        if prompt is not None and model is not None and score is not None:
            out.setdefault(prompt, {})[model] = score >= 0.5
    return out


class QualityModel:
    """Which (prompt, model) pairs are answered correctly, and how well free text is."""

    def __init__(self, skills: Mapping[str, float] | None = None,
                 labels_path: str | Path | None = MMLU_LABELS) -> None:
        self.skills = {**DEFAULT_SKILLS, **(skills or {})}
        self._labels = str(labels_path) if labels_path is not None else None

    def skill(self, model: str) -> float:
        if model in self.skills:
            return self.skills[model]
        if _SMALL.search(model):
            return 1.0
        if _LARGE.search(model):
            return 2.8
        return DEFAULT_SKILL

    def p_correct(self, text: str, model: str) -> float:
        """P(model answers ``text`` correctly); 0 or 1 for a replayed outcome."""
        if self._labels is not None:
            recorded = _recorded(self._labels).get(text)
            if recorded is not None and model in recorded:
                return 1.0 if recorded[model] else 0.0
        return 1.0 / (1.0 + math.exp(difficulty(text) - self.skill(model)))

    def correct(self, text: str, model: str) -> bool:
        p = self.p_correct(text, model)
        return p >= 1.0 or (p > 0.0 and _u("correct", model, text) < p)

    def quality(self, text: str, model: str) -> float:
        """The free-text quality of the model's answer, as its marker carries it (2 decimals):
        1 when correct, else 0 for a multiple-choice question and 0.10-0.59 otherwise."""
        if self.correct(text, model):
            return 1.0
        if is_mmlu(text):
            return 0.0
        return round(0.1 + 0.49 * _u("partial", model, text), 2)

    def letter(self, text: str, model: str) -> str:
        """The model's letter for an MMLU-style question."""
        true = true_letter(text)
        if self.correct(text, model):
            return true
        others = [c for c in "ABCD" if c != true]
        return others[int(_u("wrong", model, text) * 3)]

    def true_score(self, text: str, model: str, reference: str) -> float:
        """The free-text truth a perfect judge reports for the pair
        (:func:`batchroute.judge.relative`)."""
        return judge.relative(self.quality(text, model), self.quality(text, reference))


def is_mmlu(text: str) -> bool:
    return text.rstrip().endswith("Answer:")


def true_letter(text: str) -> str:
    return "ABCD"[int(_u("letter", text) * 4)]


def prompt_seed(text: str, schema_key: str) -> int:
    """The seed of a prompt's true structured output (the same for every model)."""
    digest = hashlib.blake2b(f"{schema_key}\x1f{text}".encode(), digest_size=8,
                             person=b"mocktruth").digest()
    return int.from_bytes(digest, "big")


def wrong_seed(text: str, model: str, schema_key: str) -> int:
    digest = hashlib.blake2b(f"{schema_key}\x1f{model}\x1f{text}".encode(), digest_size=8,
                             person=b"mockwrong").digest()
    return int.from_bytes(digest, "big")
