"""``kvtheory figures``: redraw every figure from the saved results (no computation)."""

from __future__ import annotations

import argparse

NAME = "figures"
HELP = "Redraw every figure from the saved results in --results."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", help="folder of saved results")
    parser.add_argument("--out", default="figures", help="folder for PNG and PDF files")


def run(args: argparse.Namespace) -> int:
    from ..report import draw_figures, load_saved

    paths = draw_figures(load_saved(args.results), args.out)
    for p in paths:
        print(p)
    return 0
