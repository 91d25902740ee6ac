"""``python -m kvtheory``."""

from .cli import _console

if __name__ == "__main__":  # pragma: no cover
    _console()
