"""Entry point of the ``mslim`` command: parse, dispatch, print errors without tracebacks."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mslim_core import MslimError, __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb."""
    from mslim.cli import listing
    from mslim.cli import demo, finalize, info, train
    from mslim.cli import export as export_cli

    parser = argparse.ArgumentParser(prog="mslim", description="Structured pruning for PyTorch, by plugins.")
    parser.add_argument("--version", action="version", version=f"mslim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing.add_parsers(sub)
    demo.add_parsers(sub)
    train.add_parsers(sub)
    finalize.add_parsers(sub)
    info.add_parsers(sub)
    export_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; an MslimError prints as one message and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except MslimError as exc:
        print(f"mslim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mslim: interrupted", file=sys.stderr)
        return 130
