"""The ``kvtheory`` command line.

Each sub-command lives in its own module under :mod:`kvtheory.commands` and defines::

    NAME = "verify"                      # the sub-command
    HELP = "one line shown by --help"
    def add_arguments(parser): ...       # argparse arguments
    def run(args) -> int: ...            # the exit status

User errors (:class:`~kvtheory.errors.KVTheoryError`) print one line and exit 2; an error
of the system (``OSError`` such as an I/O error, ``MemoryError``) prints one line and exits 1;
no traceback is shown unless ``KVTHEORY_DEBUG=1``. SIGTERM unwinds like Ctrl-C (temporary files
and locks removed) and exits 143.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Sequence

from .errors import KVTheoryError

__all__ = ["main", "build_parser"]


def _command_modules():
    from . import commands

    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return mods


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="kvtheory",
        description="Theory and analysis of KV-cache compression: why quantization "
        "dominates rank reduction.",
    )
    parser.add_argument("--version", action="version", version=f"kvtheory {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    old_term = _on_sigterm()
    try:
        return int(args._run(args) or 0)
    except _Terminated:
        print(f"kvtheory {args.command}: terminated; finished rows are saved", file=sys.stderr)
        return 143
    except KVTheoryError as exc:
        if os.environ.get("KVTHEORY_DEBUG"):
            raise
        print(f"kvtheory {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvtheory {args.command}: interrupted; finished rows are saved", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:  # the system refused: one line, never a traceback
        if os.environ.get("KVTHEORY_DEBUG"):
            raise
        what = (f"{exc.strerror or exc} ({exc.filename})" if isinstance(exc, OSError) and exc.filename
                else f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        print(f"kvtheory {args.command}: error: the system refused: {what}; nothing more was "
              "written (set KVTHEORY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


class _Terminated(BaseException):
    """SIGTERM as an exception, so that temporary files and locks are cleaned up on the way out."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _on_sigterm():
    """Turn SIGTERM into :class:`_Terminated` (main thread only); the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _console() -> None:  # pragma: no cover
    sys.exit(main())
