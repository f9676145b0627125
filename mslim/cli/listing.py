"""``mslim plugins`` and ``mslim algorithms``: what is installed."""

from __future__ import annotations

import argparse
import json

import mslim
from mslim.cli.table import format_table


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the listing verbs."""
    p = sub.add_parser("plugins", help="list plugins: versions, hooks, failures")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_plugins)
    a = sub.add_parser("algorithms", help="list the registered pruning algorithms")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(run=run_algorithms)


def run_plugins(args: argparse.Namespace) -> int:
    """Print every plugin with its status; exit 1 when one failed."""
    records = mslim.plugins()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
    else:
        rows = [
            (
                r.name,
                r.distribution or "-",
                r.version or "-",
                r.status,
                ", ".join(r.pruners + r.importances + r.fusers) or "-",
            )
            for r in records
        ]
        print(format_table(["plugin", "distribution", "version", "status", "provides"], rows))
        for r in records:
            if r.error:
                print(f"\n{r.name}: {r.error}")
    return 0


def run_algorithms(args: argparse.Namespace) -> int:
    """Print the registered algorithms."""
    infos = mslim.algorithms()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
    else:
        rows = [(i.name, "yes" if i.trains else "no", i.plugin, i.description) for i in infos]
        print(format_table(["algorithm", "trains", "plugin", "description"], rows))
    return 0
