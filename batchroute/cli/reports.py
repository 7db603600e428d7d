"""The finance report: ``report``."""

from __future__ import annotations

import argparse
import datetime


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rep = sub.add_parser(
        "report", help="spend, savings and routing over many runs: Parquet, CSV, charts and "
        "one self-contained HTML page")
    rep.add_argument("--runs", required=True, metavar="URI",
                     help="the output folder whose run folders to cover (a job's output)")
    rep.add_argument("--from", dest="date_from", type=_date, metavar="YYYY-MM-DD",
                     help="first day covered (the day a run's calls were priced)")
    rep.add_argument("--to", dest="date_to", type=_date, metavar="YYYY-MM-DD",
                     help="last day covered, inclusive")
    rep.add_argument("--by", default="day,model", metavar="DIMS",
                     help="grouping of the main table, from day,job,model,tag "
                     "(default day,model)")
    rep.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    rep.set_defaults(func=_report_cmd)


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _report_cmd(args: argparse.Namespace) -> int:
    from batchroute.stages import report

    by = [d.strip() for d in args.by.split(",") if d.strip()]
    out = report.build(args.runs, args.out, date_from=args.date_from, date_to=args.date_to,
                       by=by)
    print(f"{len(out.runs)} runs, {out.result_rows:,} result rows, total spend "
          f"{report.format_usd(out.total_micro_usd)}")
    for path, why in out.skipped:
        print(f"not covered: {path}: {why}")
    print(f"wrote {args.out}/report.html and {len(out.files) - 1} other files")
    return 0

