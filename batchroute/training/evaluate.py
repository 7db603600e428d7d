"""Router metrics as the field reports them (RouteLLM's evaluation), on labelled prompts.

For a weak/strong pair, a router gives every prompt a score: higher means "needs the strong
model". The scores of the evaluated set are cut into 10 quantile bins, whose 11 edges are the
thresholds. At each threshold a prompt goes strong when its score is >= the threshold
(strictly > for the last one), which gives one point (share of strong calls, quality).

- APGR: trapezoid area between the router's curve and the weak model's line, over the area
  between the strong and weak lines, both over the same strong-call shares.
- CPT(x): the strong-call share at which quality reaches weak + x * (strong - weak), by linear
  interpolation along the curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from batchroute.config import DEFAULT_POLICY

if TYPE_CHECKING:  # imported where used: eval of a router file needs none of them
    import pyarrow as pa

    from batchroute.config import JobConfig
    from batchroute.routers.similarity import TextEmbedder
    from batchroute.stages.route import RouteSpec

BINS = 10


@dataclass(frozen=True)
class Curve:
    strong_share: np.ndarray  # one point per threshold, ascending
    quality: np.ndarray


@dataclass(frozen=True)
class Report:
    n: int
    weak_quality: float
    strong_quality: float
    apgr: float
    cpt50: float
    cpt80: float
    strong_share_at_95pct_quality: float
    cost_reduction_at_95pct_quality: float
    auc: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def curve(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> Curve:
    """The (strong share, quality) points at the 11 quantile thresholds of ``scores``."""
    thresholds = np.quantile(scores, np.linspace(0.0, 1.0, BINS + 1))
    shares, quality = [], []
    for i, t in enumerate(thresholds):
        to_strong = scores > t if i == len(thresholds) - 1 else scores >= t
        shares.append(to_strong.mean())
        quality.append(np.where(to_strong, strong, weak).mean())
    order = np.argsort(shares, kind="stable")
    return Curve(np.asarray(shares)[order], np.asarray(quality)[order])


def apgr(c: Curve, weak_quality: float, strong_quality: float) -> float:
    x = c.strong_share
    area = np.trapezoid(c.quality, x)
    weak_area = weak_quality * (x[-1] - x[0])
    strong_area = strong_quality * (x[-1] - x[0])
    return float((area - weak_area) / (strong_area - weak_area))


def share_for_quality(c: Curve, target: float) -> float:
    """Smallest strong-call share whose interpolated quality reaches ``target`` (1.0 when the
    curve never does)."""
    for i in range(len(c.quality)):
        if c.quality[i] >= target:
            if i == 0:
                return float(c.strong_share[0])
            q0, q1 = c.quality[i - 1], c.quality[i]
            s0, s1 = c.strong_share[i - 1], c.strong_share[i]
            return float(s0 + (target - q0) * (s1 - s0) / (q1 - q0))
    return 1.0


def evaluate(scores: np.ndarray, weak: np.ndarray, strong: np.ndarray, *,
             price_ratio: float) -> Report:
    """All metrics for one router. ``weak``/``strong`` are per-prompt quality in [0, 1];
    ``price_ratio`` is a weak call's cost over a strong call's."""
    from sklearn.metrics import roc_auc_score

    wq, sq = float(weak.mean()), float(strong.mean())
    c = curve(scores, weak, strong)
    s95 = share_for_quality(c, 0.95 * sq)
    # Cost per prompt relative to all-strong: share * 1 + (1 - share) * ratio.
    reduction = 1.0 - (s95 + (1.0 - s95) * price_ratio)
    needs_strong = (strong > weak).astype(int)
    auc = (float(roc_auc_score(needs_strong, scores))
           if 0 < needs_strong.sum() < len(needs_strong) else None)
    return Report(n=len(scores), weak_quality=wq, strong_quality=sq, apgr=apgr(c, wq, sq),
                  cpt50=share_for_quality(c, wq + 0.5 * (sq - wq)),
                  cpt80=share_for_quality(c, wq + 0.8 * (sq - wq)),
                  strong_share_at_95pct_quality=s95, cost_reduction_at_95pct_quality=reduction,
                  auc=auc)


Ordering = Callable[[np.ndarray, np.ndarray], np.ndarray]
ORDERINGS: dict[str, Ordering] = {
    # [router] policy = "success": send up when the weak model is unlikely to succeed.
    "weak-failure": lambda p_weak, p_strong: 1.0 - p_weak,
    # policy = "relative", the default: the expected gain from sending up, the strong model's
    # success minus the weak model's.
    "gain": lambda p_weak, p_strong: p_strong - p_weak,
}


def evaluate_router(model_bytes: bytes, labels_uri: str | Sequence[str], *, weak: str,
                    strong: str, split: str = "holdout", price_ratio: float = 0.024,
                    seed: int = 0, plot: str | None = None,
                    exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Metrics of a router file on labelled prompts, for each ordering, with the random and
    oracle routers on the same rows as anchors. ``split`` is "holdout" (the rows training
    never saw, see :mod:`batchroute.training.train`) or "all". ``labels_uri`` is one label
    dataset or several (merged as train merges them); only prompts labelled for both models
    count, less those whose text is in one of the ``exclude`` label files (e.g. a router's
    training labels, so that the rows are truly unseen)."""
    import pyarrow as pa

    from batchroute.errors import RouterError
    from batchroute.routers import classifier as rt
    from batchroute.training import train

    router = rt.Router(model_bytes)
    for m in (weak, strong):
        if m not in router.info.models:
            raise RouterError(f"router has no output for model {m!r} "
                              f"(it scores: {', '.join(router.info.models)})")
    table = train.labelled(labels_uri, [weak, strong], split, exclude=exclude)
    probs = router.score(pa.array(table["prompt"].to_list(), pa.string()))
    p_weak = probs[:, router.info.models.index(weak)].astype(np.float64)
    p_strong = probs[:, router.info.models.index(strong)].astype(np.float64)
    w = table[weak].to_numpy().astype(np.float64)
    s = table[strong].to_numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    # Ties broken by tiny noise so quantile thresholds are distinct for the 0/1 oracle.
    oracle = (s > w).astype(np.float64) + rng.random(len(w)) * 1e-9
    random_scores = rng.random(len(w))
    if plot:
        curves = {**{f"router ({name})": curve(f(p_weak, p_strong), w, s)
                     for name, f in ORDERINGS.items()},
                  "random": curve(random_scores, w, s), "oracle": curve(oracle, w, s)}
        plot_curves(curves, plot, weak_quality=float(w.mean()), strong_quality=float(s.mean()),
                    price_ratio=price_ratio, title=f"{weak} / {strong}, {len(w)} prompts "
                    f"({split})")
    out: dict[str, Any] = {
        "rows": len(table), "split": split, "weak": weak, "strong": strong,
        "router_version": router.info.version, "price_ratio": price_ratio,
        "excluded": list(exclude),
        "router": {name: evaluate(f(p_weak, p_strong), w, s, price_ratio=price_ratio).as_dict()
                   for name, f in ORDERINGS.items()},
        "random": evaluate(random_scores, w, s, price_ratio=price_ratio).as_dict(),
        "oracle": evaluate(oracle, w, s, price_ratio=price_ratio).as_dict(),
    }
    return out


def plot_curves(curves: dict[str, Curve], path: str, *, weak_quality: float,
                strong_quality: float, price_ratio: float, title: str) -> None:
    """Quality against cost (relative to sending everything to the strong model) for each
    curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, c in curves.items():
        cost = c.strong_share + (1.0 - c.strong_share) * price_ratio
        ax.plot(100 * cost, c.quality, marker="o", markersize=3, label=name,
                linestyle="--" if name in ("random", "oracle") else "-")
    ax.axhline(strong_quality, color="grey", linewidth=0.8)
    ax.axhline(weak_quality, color="grey", linewidth=0.8)
    ax.annotate("strong only", (100, strong_quality), ha="right", va="bottom", fontsize=8)
    ax.annotate("weak only", (100 * price_ratio, weak_quality), va="top", fontsize=8)
    ax.set(xlabel="cost, % of sending every prompt to the strong model",
           ylabel="quality (mean score)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def frontier_report(model_bytes: bytes, labels_uri: str | Sequence[str], job: JobConfig, *,
                    split: str = "holdout", exclude: Sequence[str] = ()) -> dict[str, Any]:
    """For every model of the router at once (cheapest first by the job's prices): the
    quality/cost frontier of the job's policy over shared thresholds, and, for each model
    alone, its quality and cost beside the cheapest policy point at least as good."""
    from batchroute.routers import classifier as rt
    from batchroute.training import calibrate, train

    router = rt.Router(model_bytes)
    order = calibrate.price_order(router.info.models, job)
    table = train.labelled(labels_uri, order, split, exclude=exclude)
    probs, scores, cost = calibrate.policy_inputs(router, table, order, job)
    assert cost is not None
    points = calibrate.frontier(calibrate.replay(probs, scores,
                                                 calibrate.threshold_grid(probs), cost))
    singles = []
    for j, m in enumerate(order):
        q, usd = float(scores[:, j].mean()), float(cost[:, j].mean() * 1000)
        match = next((p for p in points if p.quality >= q - 1e-12), None)
        singles.append({
            "model": m, "quality": q, "usd_per_1k": usd,
            "routed_usd_per_1k_at_that_quality": match.usd_per_1k if match else None,
            "routed_cost_vs_alone": (match.usd_per_1k or 0.0) / usd if match and usd else None})
    return {"rows": len(table), "split": split, "order": order,
            "frontier": [vars(p) for p in points], "single_models": singles}


def format_frontier(r: dict[str, Any]) -> str:
    lines = [f"policy frontier over {r['rows']} prompts ({r['split']}), models cheapest first: "
             f"{', '.join(r['order'])}",
             f"{'threshold':>10}{'quality':>9}{'$/1k':>10}{'to strongest':>14}"]
    pts = r["frontier"]
    step = max(1, len(pts) // 12)
    for p in [*pts[::step], *([pts[-1]] if (len(pts) - 1) % step else [])]:
        lines.append(f"{p['threshold']:>10.3f}{p['quality']:>9.3f}{p['usd_per_1k']:>10.4f}"
                     f"{p['strong_share']:>14.1%}")
    lines.append(f"{'model alone':<24}{'quality':>9}{'$/1k':>10}{'routed $/1k':>13}"
                 f"{'routed/alone':>14}")
    for s in r["single_models"]:
        routed = (f"{s['routed_usd_per_1k_at_that_quality']:>13.4f}"
                  if s["routed_usd_per_1k_at_that_quality"] is not None else f"{'-':>13}")
        ratio = (f"{s['routed_cost_vs_alone']:>14.1%}" if s["routed_cost_vs_alone"] is not None
                 else f"{'-':>14}")
        lines.append(f"{s['model']:<24}{s['quality']:>9.3f}{s['usd_per_1k']:>10.4f}"
                     f"{routed}{ratio}")
    return "\n".join(lines)


def format_report(r: dict[str, Any]) -> str:
    unseen = (f", none of them in {', '.join(r['excluded'])}" if r.get("excluded") else "")
    lines = [f"{r['rows']} labelled prompts ({r['split']} split{unseen}), weak {r['weak']}, "
             f"strong {r['strong']}, router {r['router_version']}",
             f"{'router':<40}{'APGR':>7}{'CPT(50%)':>10}{'CPT(80%)':>10}"
             f"{'strong@95%':>12}{'cost -%':>9}{'AUC':>7}"]
    policies = {"weak-failure": "success", "gain": "relative, the default"}
    rows = {**{f"policy {policies.get(k, k)} ({k})": v for k, v in r["router"].items()},
            "random": r["random"], "oracle": r["oracle"]}
    for name, m in rows.items():
        auc = f"{m['auc']:.3f}" if m["auc"] is not None else "-"
        lines.append(f"{name:<40}{m['apgr']:>7.3f}{m['cpt50']:>10.1%}{m['cpt80']:>10.1%}"
                     f"{m['strong_share_at_95pct_quality']:>12.1%}"
                     f"{m['cost_reduction_at_95pct_quality']:>9.1%}{auc:>7}")
    return "\n".join(lines)


def evaluate_config(job: JobConfig, labels_uri: str | Sequence[str], *, weak: str,
                    strong: str, split: str = "holdout", price_ratio: float = 0.024,
                    exclude: Sequence[str] = (),
                    embedder: TextEmbedder | None = None,
                    ask: Callable[[pa.Table], pa.Table] | None = None) -> dict[str, Any]:
    """The same metrics for any ``[router]`` configuration of a job file (rules, similarity,
    classifier, llm, or a cascade of them), run through the route stage itself on the
    labelled prompts.

    Kinds that decide in steps still need one score per prompt for RouteLLM's threshold sweep:
    a scoring stage's rows score 1 - P(weak succeeds) (with ``policy = "relative"``,
    P(strong succeeds) - P(weak succeeds)); an llm row scores its label's rank
    (easiest 0, hardest 1); a rule's, forced or fallback row scores 1 if it went to ``strong``
    else 0. Rows decided after a stage with an uncertain band are ranked inside that band, so
    the sweep orders them between the rows the earlier stage decided. The ``operating_point``
    is what the configuration itself does at its own thresholds.
    """
    import time

    import pyarrow as pa

    from batchroute import schemas
    from batchroute.errors import ConfigError
    from batchroute.routers import classifier as rt
    from batchroute.stages.route import RouteSpec, RouteStage
    from batchroute.training import train

    for m in (weak, strong):
        if m not in job.models:
            raise ConfigError(f"{job.source}: --{'weak' if m == weak else 'strong'} model {m!r} "
                              "is not in the job's catalog")
    # Eval measures what routing costs: the llm router's cache is neither read nor written.
    spec = replace(RouteSpec.from_job(job), llm=replace(job.router.llm, cache=""))
    router_bytes = rt.read_bytes(job.router.path) if spec.uses_classifier else None
    owned_ask = None
    if "llm" in spec.stages and ask is None:
        import os

        from batchroute.routers.llm import ask_in_process

        cfg = job.models[spec.llm.model]
        ask = owned_ask = ask_in_process(cfg, job.dispatch, os.environ.get(cfg.api_key_env))
    stage = RouteStage(router_bytes, spec, job.router.path, embedder=embedder, ask=ask)
    table = train.labelled(labels_uri, [weak, strong], split, exclude=exclude)
    n = len(table)
    prompts = table["prompt"].to_list()
    requests = pa.table({
        "request_id": table["request_id"].to_list(), "row": list(range(n)), "prompt": prompts,
        "messages": [None] * n, "max_tokens": [None] * n, "temperature": [None] * n,
        "force_model": [None] * n, "tags": [None] * n, "reject_reason": [None] * n},
        schema=schemas.REQUESTS)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        routed = pa.concat_tables([stage(requests.slice(i, job.router.batch_size))
                                   for i in range(0, n, job.router.batch_size)])
    finally:
        stage.flush()
        if owned_ask is not None:
            owned_ask.close()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    w = table[weak].to_numpy().astype(np.float64)
    s = table[strong].to_numpy().astype(np.float64)
    model = np.asarray(routed.column("model").to_pylist(), dtype=object)
    others = sorted({str(m) for m in model if m not in (weak, strong)})
    if others:
        raise ConfigError(f"{job.source}: the router sends rows to {others}, which the labels "
                          f"do not score (they have {weak} and {strong} only)")
    scores = config_scores(routed, spec, weak=weak, strong=strong)
    to_strong = model == strong
    route_micro = int(np.asarray(routed.column("route_cost_micro_usd")).sum())
    report = evaluate(scores, w, s, price_ratio=price_ratio).as_dict()
    stages = routed.column("route_stage").to_pylist()
    llm_model = job.models.get(spec.llm.model) if "llm" in spec.stages else None
    return {
        "job": job.source, "stages": list(spec.stages), "policy": spec.policy, "rows": n,
        "split": split,
        "weak": weak, "strong": strong, "price_ratio": price_ratio, **report,
        "operating_point": {
            "strong_share": float(to_strong.mean()),
            "quality": float(np.where(to_strong, s, w).mean()),
            "decided_by": {k: stages.count(k) for k in sorted(set(stages), key=str)},
        },
        "routing_usd_per_million_prompts": route_micro / n if n else 0.0,
        "prompts_per_s_per_core": n / cpu if cpu > 0 else None,
        "prompts_per_s_wall": n / wall if wall > 0 else None,
        "simulated": bool(llm_model is not None and is_bundled_mock(llm_model.base_url)),
    }


def config_scores(routed: pa.Table, spec: RouteSpec, *, weak: str, strong: str) -> np.ndarray:
    """One "needs the strong model" score per routed row (see :func:`evaluate_config`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = routed.num_rows
    model = np.asarray(routed.column("model").to_pylist(), dtype=object)
    stage = np.asarray(routed.column("route_stage").to_pylist(), dtype=object)
    out = (model == strong).astype(np.float64)
    bands: dict[str, tuple[float, float]] = {}
    last_band: tuple[float, float] | None = None
    for name in spec.stages:
        bands[name] = last_band  # type: ignore[assignment]
        band = (spec.classifier.uncertain if name == "classifier"
                else spec.similarity.uncertain if name == "similarity" else None)
        if band is not None:
            last_band = band
    bands["fallback"] = last_band  # type: ignore[assignment]
    for name, column in (("classifier", "router_scores"), ("similarity", "similarity_scores")):
        rows = stage == name
        if rows.any():
            # Every scored row lists each model once, so the flattened entries of one model
            # come out in row order.
            flat = pc.list_flatten(routed.column(column).take(pa.array(np.flatnonzero(rows)))
                                   .combine_chunks())
            p = {m: pc.filter(flat.field("score"), pc.equal(flat.field("model"), m))
                 .to_numpy(zero_copy_only=False).astype(np.float64) for m in (weak, strong)}
            # 1 - what the cheap model's threshold applies to (unclipped, to keep the order)
            out[rows] = (p[strong] - p[weak] if spec.policy == "relative"
                         else 1.0 - p[weak])
    if "llm" in spec.stages:
        labels = list(spec.llm.labels)
        rank = {lab: i / max(len(labels) - 1, 1) for i, lab in enumerate(labels)}
        llm_labels = routed.column("llm_label").to_pylist()
        rows = np.flatnonzero(stage == "llm")
        out[rows] = [rank.get(llm_labels[i], float(model[i] == strong)) for i in rows]
    for name, band in bands.items():
        if band is None:
            continue
        rows = stage == name
        lo, hi = 1.0 - band[1], 1.0 - band[0]  # the band on P(weak) as a band on 1 - P(weak)
        out[rows] = lo + (hi - lo) * out[rows]
    assert len(out) == n
    scores: np.ndarray = out
    return scores


MOCK_SERVER_NAME = "batchroute-mock-provider"  # what the bundled mock's /health says


def is_bundled_mock(base_url: str, *, timeout_s: float = 2.0) -> bool:
    """Whether ``base_url`` is served by batchroute's own mock provider, whose answers are
    simulated: a loopback address whose ``GET /health`` names the mock. A real model server
    on loopback (vLLM, llama.cpp, Ollama) is not simulated; nothing off loopback is asked."""
    import json
    import urllib.request
    from urllib.parse import urlparse

    url = urlparse(base_url)
    if (url.hostname or "") not in ("127.0.0.1", "localhost", "::1"):
        return False
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url.scheme}://{url.netloc}/health", timeout=timeout_s) as reply:
            doc = json.loads(reply.read())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("server") == MOCK_SERVER_NAME


def format_configs(reports: list[dict[str, Any]]) -> str:
    r0 = reports[0]
    lines = [f"{r0['rows']} labelled prompts ({r0['split']} split), weak {r0['weak']}, "
             f"strong {r0['strong']}",
             f"{'router config':<34}{'APGR':>7}{'CPT(50%)':>10}{'AUC':>7}{'strong%':>9}"
             f"{'quality':>9}{'route $/1M':>12}{'prompts/s/core':>16}"]
    for r in reports:
        auc = f"{r['auc']:.3f}" if r["auc"] is not None else "-"
        rate = (f"{r['prompts_per_s_per_core']:>16,.0f}" if r["prompts_per_s_per_core"]
                else f"{'-':>16}")
        scored = {"classifier", "similarity"} & set(r["stages"])
        name = (" > ".join(r["stages"])
                + (f" ({r['policy']})" if scored and r["policy"] != DEFAULT_POLICY else "")
                + (" (simulated)" if r["simulated"] else ""))
        op = r["operating_point"]
        lines.append(f"{name:<34}{r['apgr']:>7.3f}{r['cpt50']:>10.1%}{auc:>7}"
                     f"{op['strong_share']:>9.1%}{op['quality']:>9.3f}"
                     f"{r['routing_usd_per_million_prompts']:>12.2f}{rate}")
    return "\n".join(lines)
