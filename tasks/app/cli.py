"""`rpcwatch` command line: each stage on its own, one hour through all stages, and the demo."""

from __future__ import annotations

import argparse
import logging
import sys

from tasks.app.commands import incidents, models, rerun, results, stages, tools


def build_parser() -> argparse.ArgumentParser:
    """The `rpcwatch` parser; each command module adds its subcommands (in the order `--help` lists them)."""
    parser = argparse.ArgumentParser(prog="rpcwatch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (stages, models, results, incidents, tools, rerun):
        commands.register(sub.add_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # a person's mistake or a busy/missing file: the message says what to do, a traceback would not
        print(f"rpcwatch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
