"""``batchroute eval --robustness``: each policy's ordering against random, in domain and on
prompts unlike the router's training data.

The default policy must never route worse than random on traffic it was not trained on. The
project has labels of one kind only (MMLU), so the checks make unlike traffic out of them:

- ``in-domain``: the router file on the held-out split (as ``batchroute eval``).
- ``topic:GROUP``: a words router trained (as ``batchroute train`` does, on the training
  split) on every topic but GROUP, evaluated on all of GROUP's questions, none of which it
  saw. The topic key is the labels' ``domain`` column (the MMLU subject), with MMLU's 57
  subjects grouped into the four categories of the MMLU paper (:data:`MMLU_GROUPS`: STEM,
  humanities, social sciences, other); any other domain is its own topic.
- ``style:NAME``: the router file on the held-out prompts rewritten in another style
  (:data:`STYLES`), with each model's recorded outcome kept: the question and its options are
  unchanged, so a model's answer is assumed to be too.

Every ordering of :data:`ORDERINGS` gets RouteLLM's APGR (:mod:`evaluate`) on each check,
beside a random router's: the mean over :data:`RANDOM_SEEDS` seeds and its 5th-95th
percentile, and (in ``--json``, ``sent_up_first``) the gain of sending up the 30% of prompts it
scores highest, against the gain on the rest. An ordering whose APGR is below the random mean on any check is worse than random
there (``worse_than_random`` names the checks).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from batchroute.training import evaluate as ev

RANDOM_SEEDS = 200

# MMLU's 57 subjects in the four categories of Hendrycks et al. (2021).
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning"),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy", "prehistory",
        "professional_law", "world_religions"),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy"),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
        "nutrition", "professional_accounting", "professional_medicine", "virology"),
}
_GROUP_OF = {s: g for g, subjects in MMLU_GROUPS.items() for s in subjects}


def topic(domain: str) -> str:
    """The topic key of a labelled row: its MMLU category, or the domain itself."""
    return _GROUP_OF.get(domain, domain)


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


_WRAPPERS = (
    "You are a careful assistant. Read the question below and answer it.\n\n{p}\n\n"
    "Give the letter of the correct option.",
    "Task: multiple choice.\nInstructions: pick exactly one option and reply with its letter "
    "only, no explanation.\n---\n{p}\n---",
    "Hi! My teacher gave us this for homework and I am stuck, could you help me out "
    "please?\n{p}\nThanks so much!!",
)
_PREFIXES = (
    "Ticket #48213 was reassigned to the platform team on Monday after the nightly export "
    "failed twice; the on-call engineer restarted the worker and the backlog cleared by noon. ",
    "From: Dana Whitfield <dana@example.com>\nSubject: Re: offsite agenda\nSounds good, let "
    "us keep Thursday for the planning session and move the budget review to Friday "
    "morning.\n\n",
    "The weather in the coastal towns stayed mild this week, with light rain on Tuesday and a "
    "warm, windy weekend expected; ferries run on the summer timetable until the end of the "
    "month. ",
    "2026-11-30T02:14:07Z INFO worker-3 processed 18,442 rows in 41.2 s (447 rows/s), "
    "0 retries, cache hit rate 0.93\n",
)
_CHOICES = re.compile(r"(?s)(.*?)\nA\. (.*?)\nB\. (.*?)\nC\. (.*?)\nD\. (.*?)\nAnswer:\s*$")


def _template(prompt: str) -> str:
    m = _CHOICES.match(prompt)
    if not m:
        return prompt
    q, a, b, c, d = (x.strip() for x in m.groups())
    return (f"Question: {q}\nOptions:\n(a) {a}\n(b) {b}\n(c) {c}\n(d) {d}\n"
            "Respond with (a), (b), (c) or (d).")


# Each rewrites one prompt deterministically (a wrapper or prefix chosen by the prompt's
# digest), keeping the question and its options.
STYLES: dict[str, Callable[[str], str]] = {
    # inside one of three instructions (an assistant prompt, a terse task spec, a chat message)
    "wrapped": lambda p: _WRAPPERS[_digest(p) % len(_WRAPPERS)].format(p=p.strip()),
    # upper case, punctuation replaced by spaces
    "casing": lambda p: re.sub(r"[^\w\s]", " ", p).upper(),
    # after an unrelated text (a ticket note, an email, a weather report, a log line)
    "prefixed": lambda p: _PREFIXES[_digest(p) % len(_PREFIXES)] + p.strip(),
    # "Question: ... Options: (a) ..." instead of MMLU's "A. ... Answer:"
    "template": _template,
}

Ordering = Callable[[np.ndarray, np.ndarray], np.ndarray]
ORDERINGS: dict[str, Ordering] = {
    # policy = "success": send up when the weak model is unlikely to succeed
    "success": lambda pw, ps: 1.0 - pw,
    # policy = "relative" (the default): the expected gain, P(strong) - P(weak)
    "relative": lambda pw, ps: ps - pw,
    # candidates measured beside them, not policies
    "blend": lambda pw, ps: 0.5 * (1.0 - pw) + 0.5 * (ps - pw),
    "log-odds gain": lambda pw, ps: _logit(ps) - _logit(pw),
    "gain x P(strong)": lambda pw, ps: (ps - pw) * ps,
}


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-9, 1.0 - 1e-9)
    out: np.ndarray = np.log(q) - np.log1p(-q)
    return out


def apgr(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> float:
    return ev.apgr(ev.curve(scores, weak, strong), float(weak.mean()), float(strong.mean()))


def random_apgr(weak: np.ndarray, strong: np.ndarray, *, seeds: int = RANDOM_SEEDS,
                seed: int = 0) -> dict[str, float]:
    """A random router's APGR on these rows: mean, 5th and 95th percentile over ``seeds``."""
    rng = np.random.default_rng(seed)
    a = np.array([apgr(rng.random(len(weak)), weak, strong) for _ in range(seeds)])
    return {"mean": float(a.mean()), "p5": float(np.percentile(a, 5)),
            "p95": float(np.percentile(a, 95))}


TOP_SHARE = 0.3  # the share sent up first, for ``sent_up_first``


def check(name: str, p_weak: np.ndarray, p_strong: np.ndarray, weak: np.ndarray,
          strong: np.ndarray) -> dict[str, Any]:
    """Every ordering's APGR on one check, beside random's, and what the prompts it sends up
    first (its top :data:`TOP_SHARE` by score) are like: each model's quality on them and the
    gain of sending them up."""
    first = {}
    for k, f in ORDERINGS.items():
        score = f(p_weak, p_strong)
        top = score >= np.quantile(score, 1.0 - TOP_SHARE)
        first[k] = {"rows": int(top.sum()), "weak_quality": float(weak[top].mean()),
                    "strong_quality": float(strong[top].mean()),
                    "gain": float((strong - weak)[top].mean()),
                    "gain_of_the_rest": float((strong - weak)[~top].mean()) if (~top).any()
                    else None}
    return {"check": name, "rows": len(weak), "weak_quality": float(weak.mean()),
            "strong_quality": float(strong.mean()), "random": random_apgr(weak, strong),
            "apgr": {k: apgr(f(p_weak, p_strong), weak, strong) for k, f in ORDERINGS.items()},
            "sent_up_first": first}


def worse_than_random(checks: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """For each ordering, the checks where its APGR is below the random router's mean."""
    return {k: [c["check"] for c in checks if c["apgr"][k] < c["random"]["mean"]]
            for k in ORDERINGS}


def topic_probs(prompts: np.ndarray, y: np.ndarray, train_rows: np.ndarray, *,
                seed: int = 0) -> np.ndarray:
    """Predicted success [rows, models] of a words router trained as ``batchroute train``
    trains one (its featurisation, C grid and fit) on ``train_rows`` only, for every row.
    ``y`` is [rows, models] of 0/1 outcomes. The fit stops at scikit-learn's default
    tolerance: a ranking is all this needs."""
    from batchroute.training import train

    feats = train.words_features(prompts, ~train_rows)
    out = np.zeros(y.shape)
    for j in range(y.shape[1]):
        clf, _ = train.fit_head(feats.x[train_rows], y[train_rows, j], feats.c_grid,
                                seed=seed, tol=1e-4)
        out[:, j] = clf.predict_proba(feats.x)[:, 1]
    return out


def robustness(model_bytes: bytes, labels_uri: str, *, weak: str, strong: str,
               cut: float = 0.5, topics: bool = True) -> dict[str, Any]:
    """The checks of this module's docstring for ``model_bytes``'s ``weak``/``strong`` pair.
    ``topics=False`` skips the topic checks (they train a router per topic)."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.dataset as ds

    from batchroute.errors import RouterError, SchemaError
    from batchroute.routers import classifier as rt
    from batchroute.training import train

    router = rt.Router(model_bytes)
    for m in (weak, strong):
        if m not in router.info.models:
            raise RouterError(f"router has no output for model {m!r} "
                              f"(it scores: {', '.join(router.info.models)})")
    table = train.labelled(labels_uri, [weak, strong], "all")
    prompts = table["prompt"].to_numpy().astype(object)
    w = table[weak].to_numpy().astype(np.float64)
    s = table[strong].to_numpy().astype(np.float64)
    hold = train.is_holdout(table["request_id"].to_list())
    iw, i_s = router.info.models.index(weak), router.info.models.index(strong)

    def scored(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        p = router.score(pa.array(list(texts), pa.string())).astype(np.float64)
        return p[:, iw], p[:, i_s]

    held = prompts[hold].tolist()
    checks = [check("in-domain", *scored(held), w[hold], s[hold])]
    for name, rewrite in STYLES.items():
        checks.append(check(f"style:{name}", *scored([rewrite(p) for p in held]),
                            w[hold], s[hold]))
    if topics:
        source = ds.dataset(labels_uri, format="parquet")
        if "domain" not in source.schema.names:
            raise SchemaError(f"labels {labels_uri}: the topic checks need a 'domain' column "
                              "(or pass --no-topics)")
        frame = pl.from_arrow(source.to_table(columns=["request_id", "domain"]))
        assert isinstance(frame, pl.DataFrame)
        domains = frame.group_by("request_id").agg(pl.col("domain").first())
        joined = table.select("request_id").join(domains, on="request_id", how="left")
        if joined["domain"].null_count():
            bad = joined.filter(pl.col("domain").is_null())["request_id"][0]
            raise SchemaError(f"labels {labels_uri}: column 'domain' is null for request_id "
                              f"{bad!r}")
        key = np.array([topic(d) for d in joined["domain"].to_list()], dtype=object)
        y = np.stack([w >= cut, s >= cut], axis=1).astype(int)
        for group in sorted(set(key.tolist())):
            rows = key == group
            train_rows = ~rows & ~hold
            if len(np.unique(y[train_rows, 0])) < 2 or len(np.unique(y[train_rows, 1])) < 2:
                continue  # nothing to learn without this topic
            p = topic_probs(prompts, y, train_rows)
            checks.append(check(f"topic:{group}", p[rows, 0], p[rows, 1], w[rows], s[rows]))
    return {"weak": weak, "strong": strong, "router_version": router.info.version,
            "random_seeds": RANDOM_SEEDS, "checks": checks,
            "worse_than_random": worse_than_random(checks)}


def format_robustness(r: dict[str, Any]) -> str:
    names = list(ORDERINGS)
    width = max(len(n) for n in names) + 2
    lines = [f"APGR per check, weak {r['weak']}, strong {r['strong']}, router "
             f"{r['router_version']}; random: mean [5th, 95th percentile] of "
             f"{r['random_seeds']} seeds; * below the random mean",
             f"{'check':<24}{'rows':>6}{'random':>22}" + "".join(f"{n:>{width}}" for n in names)]
    for c in r["checks"]:
        rnd = c["random"]
        cells = "".join(f"{c['apgr'][n]:>{width - 1}.3f}"
                        + ("*" if c["apgr"][n] < rnd["mean"] else " ") for n in names)
        lines.append(f"{c['check']:<24}{c['rows']:>6}"
                     f"{rnd['mean']:>9.3f} [{rnd['p5']:.3f}, {rnd['p95']:.3f}]{cells}")
    for n, bad in r["worse_than_random"].items():
        lines.append(f"{n}: " + (f"worse than random on {', '.join(bad)}" if bad
                                 else "never worse than random"))
    return "\n".join(lines)
