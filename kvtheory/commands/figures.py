"""``kvtheory figures``: redraw every figure from the saved results (no computation).

Every result file must carry its ``result_sha256`` and match it
(:func:`kvtheory.store.load_result`); ``--out`` must be a writable folder (checked first).
"""

from __future__ import annotations

import argparse

NAME = "figures"
HELP = "Redraw every figure from the saved results in --results."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", help="folder of saved results")
    parser.add_argument("--out", default="figures", help="folder for PNG and PDF files")


def run(args: argparse.Namespace) -> int:
    from ..errors import KVTheoryError
    from ..io import check_output_dir
    from ..report import draw_figures, load_saved

    from pathlib import Path

    if not Path(args.results).is_dir():
        raise KVTheoryError(f"--results: got {args.results!r}, which is not a folder; expected "
                            "a folder of saved results")
    out = check_output_dir(args.out, "--out")
    paths = draw_figures(load_saved(args.results), out)
    for p in paths:
        print(p)
    return 0
