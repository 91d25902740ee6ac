"""The one exception type users see, and the helper that builds its messages."""

from __future__ import annotations

from typing import Any

__all__ = ["KVTheoryError", "bad_argument"]


class KVTheoryError(ValueError):
    """A user error: bad input, a missing package, a corrupted file.

    The message always names the argument, the value received and what was expected,
    so that the CLI can print it as one line.

    >>> raise bad_argument("bits", 0, "an integer in 1..16")
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: bits: got 0; expected an integer in 1..16
    """


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        text = f"tensor of shape {tuple(shape)} and dtype {value.dtype}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad_argument(name: str, value: Any, expected: str) -> KVTheoryError:
    """Build a :class:`KVTheoryError` of the form ``name: got VALUE; expected WHAT``."""
    return KVTheoryError(f"{name}: got {_short(value)}; expected {expected}")
