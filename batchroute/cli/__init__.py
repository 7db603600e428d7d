"""Command line: ``batchroute COMMAND ...``; ``batchroute COMMAND --help`` explains each.

Exit codes: 0 success; 1 the run finished but some rows failed; 4 the run finished but its
shadow checks flagged it ([quality] min_retained; before 1); 2 bad job file, input, router
or arguments, or a run folder another process is writing (nothing was written); 3 any other
error; 130/143 interrupted by SIGINT/SIGTERM after committing what had been answered.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from batchroute.errors import BatchrouteError, Interrupted

EPILOG = """\
typical use:
  batchroute plan jobs/demo.toml            forecast rows, tokens, cost and time; no model calls
  batchroute run jobs/demo.toml             route, dispatch, write results and rollups
  batchroute learn runs/RUN_ID --out learnt.parquet   labels from a run's shadow checks
  batchroute train --labels L.parquet --out router.onnx
  batchroute mock-provider --port 8765      a local OpenAI/Anthropic-compatible test server

exit codes: 0 ok, 1 some rows failed (learn: a run folder was skipped), 4 quality flagged
            ([quality] min_retained), 2 bad job/input/router/arguments or a run folder
            another process is writing, 3 other error, 130/143 stopped by SIGINT/SIGTERM
            after committing what was answered (resume it)
"""


def build_parser() -> argparse.ArgumentParser:
    # Each command group registers its own commands and imports the heavy modules (pyarrow,
    # numpy, Ray, ...) only inside the command that runs: `batchroute --help` imports none of
    # them. Imported here, not at the top, so that the groups' own modules (and the dev tools,
    # which share batchroute.cli.argtypes) can be imported on their own.
    from batchroute.cli import jobs, reports, routers
    from batchroute.devtools import register as register_devtools

    parser = argparse.ArgumentParser(
        prog="batchroute", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Route queued Parquet prompts to the cheapest model likely to answer them "
                    "well, call the models within their rate limits, and write every answer "
                    "and per-model cost rollups back to Parquet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (jobs, routers, reports):
        group.register(sub)
    register_devtools(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except Interrupted as exc:
        print(f"batchroute: {exc}", file=sys.stderr)
        return exc.exit_code
    except BatchrouteError as exc:
        print(f"batchroute: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batchroute: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # keep exit code 1 meaning "some rows failed" and nothing else
        logging.getLogger("batchroute").debug("unexpected error", exc_info=True)
        print(f"batchroute: internal error: {type(exc).__name__}: {exc} (rerun with -v for the "
              "traceback)", file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
