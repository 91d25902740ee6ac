"""``kvtheory report``: the whole pipeline (the README's ``make report``).

Runs every analysis at the default size (≤ 15 min on 2 CPU cores; a second run loads the
saved results), draws ``figures/`` and writes ``REPORT.md``.
"""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "Run every analysis (cached), draw the figures and write REPORT.md."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..report import STAGES

    parser.add_argument("--data-dir", help="folder with the corpora (default $KVTHEORY_DATA)")
    parser.add_argument("--size", choices=("default", "small"), default="default")
    parser.add_argument("--results", default="results", help="folder of saved results")
    parser.add_argument("--figures", default="figures", help="folder of figures")
    parser.add_argument("--out", default="REPORT.md", help="the report file")
    parser.add_argument("--stages", help="comma-separated subset of: " + ",".join(s.name for s in STAGES))
    parser.add_argument("--force", action="store_true", help="recompute saved results")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..report import ReportConfig, report

    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else None
    cfg = ReportConfig(size=args.size, data_dir=args.data_dir, results=args.results,
                       figures=args.figures, report=args.out, stages=stages, force=args.force,
                       progress=not args.no_progress)
    report(cfg)
    return 0
