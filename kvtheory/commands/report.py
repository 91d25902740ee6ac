"""``kvtheory report``: the whole pipeline (the README's ``make report``).

Runs every analysis at the default size (≤ 15 min on 2 CPU cores; a second run loads the
saved results), draws ``figures/`` and writes ``REPORT.md``.
"""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "Run every analysis (cached), draw the figures and write REPORT.md."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..report import DEFAULT_MODELS
    from ..stages import stages

    parser.add_argument("--data-dir", help="folder with the corpora (default $KVTHEORY_DATA)")
    parser.add_argument("--size", choices=("default", "small"), default="default")
    parser.add_argument("--results", default="results", help="folder of saved results")
    parser.add_argument("--figures", default="figures", help="folder of figures")
    parser.add_argument("--out", default="REPORT.md", help="the report file")
    parser.add_argument("--stages", help="comma-separated subset of: " + ",".join(s.name for s in stages()))
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated models every applicable stage runs on "
                             f"(default {','.join(DEFAULT_MODELS)}); registry names or paths")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="run the (stage, model) tasks in this process or as Ray tasks")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    parser.add_argument("--device-map", default=None,
                        help="place each model's layers with accelerate: auto, balanced, sequential "
                             "or JSON {module: device}")
    parser.add_argument("--force", action="store_true", help="recompute saved results")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..report import ReportConfig, report

    cfg = ReportConfig(size=args.size, data_dir=args.data_dir, results=args.results,
                       figures=args.figures, report=args.out, stages=args.stages,
                       models=args.models, force=args.force, progress=not args.no_progress,
                       executor=args.executor, address=args.address,
                       device_map=args.device_map)
    report(cfg)
    return 0
