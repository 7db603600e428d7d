"""Development tooling, kept apart from the product: the mock provider, the sample-data
generator and the benchmarks. They use only the product's public modules, and register their
own commands (:func:`register`) without importing anything heavy until one of them runs."""

from __future__ import annotations

import argparse

from batchroute.cli.argtypes import whole_number
from batchroute.devtools import bench, mock_provider


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mock-provider``, ``sample`` and ``bench`` to the CLI."""
    mock_provider.register_cli(sub)
    _register_sample(sub)
    bench.register(sub)


def _register_sample(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "sample", help="write a deterministic demo file of queued prompts (or a task table)",
        description="Write a demo Parquet file of queued prompts (FAQ, MMLU, code, long "
                    "reports and a few bad rows) for trying the router, or with --kind a "
                    "table for the task jobs: support tickets to classify or emailed "
                    "invoices to extract from. Same kind, rows and seed, same file.")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="Parquet file to write (parent directories are created)")
    parser.add_argument("--kind", choices=("prompts", "tickets", "invoices"),
                        default="prompts",
                        help="prompts: the router demo's queue (default); tickets: "
                             "ticket_id, subject, body, priority, customer_tier, created_at "
                             "and the true category; invoices: invoice_id, vendor, text and "
                             "the true total and currency")
    parser.add_argument("--rows", type=whole_number(0), default=20000, metavar="N",
                        help="number of rows (default: 20000)")
    parser.add_argument("--seed", type=whole_number(0), default=0,
                        help="random seed; the same seed gives the same file (default: 0)")
    parser.add_argument("--mmlu", metavar="PATH",
                        help="MMLU labels Parquet to draw questions from; --kind prompts "
                             "only (default: the copy bundled with the package)")
    parser.add_argument("--force-model", action="append", dest="force_models", metavar="NAME",
                        help="model name to force on ~0.5%% of rows; repeat for several; "
                             "--kind prompts only")
    parser.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    if args.kind != "prompts":
        from batchroute.devtools import sample_tables

        return sample_tables.run_cli(args)
    from batchroute.devtools import sample

    return sample.run_cli(args)

