"""``kvtheory verify``: prove the derivations with sympy and check them against the torch code.

Prints one row per derivation of :mod:`kvtheory.symbolic`; ``--json PATH`` writes the rows
(a JSON list of ``{"name", "statement", "symbolic", "numeric_max_abs_err"}``) atomically.
Exit status 0 when every derivation is proved and its numeric error is below 1e-9, else 1.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from .._checks import check_int
from ..errors import KVTheoryError

NAME = "verify"
HELP = "Prove the theory's derivations (sympy) and check them numerically against the code."

#: a derivation passes when its numeric error is below this
NUMERIC_TOL = 1e-9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the rows to PATH as a JSON list")
    parser.add_argument("--points", type=int, default=20,
                        help="random points per numeric check (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the numeric checks")


def passed(row: dict[str, Any]) -> bool:
    """A row passes: proved symbolically and numeric error below :data:`NUMERIC_TOL`."""
    err = row["numeric_max_abs_err"]
    return bool(row["symbolic"]) and err is not None and math.isfinite(err) and err < NUMERIC_TOL


def _print_table(rows: list[dict[str, Any]]) -> None:
    """One line per derivation, then the statements (plain text, never parsed as markup)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is installed with the package
        width = max(len(r["name"]) for r in rows)
        print(f"{'derivation':<{width}}  symbolic  max |err|  result")
        for r in rows:
            print(f"{r['name']:<{width}}  {str(r['symbolic']):<8}  "
                  f"{r['numeric_max_abs_err']:9.1e}  {'PASS' if passed(r) else 'FAIL'}")
    else:
        table = Table(title="kvtheory verify")
        table.add_column("derivation")
        table.add_column("symbolic")
        table.add_column("max |err|", justify="right")
        table.add_column("result")
        for r in rows:
            table.add_row(r["name"], str(r["symbolic"]), f"{r['numeric_max_abs_err']:.1e}",
                          "[green]PASS" if passed(r) else "[red]FAIL")
        Console(file=sys.stdout, highlight=False).print(table)
    for i, r in enumerate(rows, 1):
        print(f"({chr(ord('a') + i - 1)}) {r['name']}: {r['statement']}")


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_file, write_json

    points = check_int("--points", args.points, 1)
    seed = check_int("--seed", args.seed, 0)
    if args.json:  # fail before the work, not after it (folders, FIFOs, long names, read-only)
        args.json = check_output_file(Path(args.json), "--json")
    from ..symbolic import derivations, verification_row
    rows = []
    for derivation in derivations():
        try:
            row = verification_row(derivation, points, seed)
        except KVTheoryError:
            raise
        except Exception as exc:  # a broken check is a failed derivation, not a crash
            print(f"kvtheory verify: {derivation.name}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            row = {"name": derivation.name, "statement": derivation.statement,
                   "symbolic": False, "numeric_max_abs_err": math.nan}
        rows.append(row)
    _print_table(rows)
    if args.json:
        path = write_json(args.json, rows, arg="--json")
        print(f"wrote {path}")
    failed = [r["name"] for r in rows if not passed(r)]
    if failed:
        print(f"kvtheory verify: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
