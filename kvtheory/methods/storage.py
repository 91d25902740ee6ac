r"""Storage arithmetic shared by every compressor (one implementation; the ledger reads it).

Exact :class:`fractions.Fraction` counts of bits per element, split into ``payload`` (codes or
coefficients), ``scales`` (scales and zero-points) and ``basis``:

* group-wise uniform quantization, g elements sharing an s-bit scale (and zero-point):
  :math:`b + s(1+z)/g` (:func:`quant`);
* a basis of rank r amortised over T tokens (:func:`basis`): pca/qaware :math:`16dr/(dT)`,
  pcac :math:`16(dr + d)/(dT)`, identity :math:`16r/(dT)`, random/hadamard 0.

>>> quant(4, 64)
(Fraction(4, 1), Fraction(1, 2))
"""

from __future__ import annotations

from fractions import Fraction

from .._checks import check_choice, check_positive
from ..errors import bad_argument

__all__ = ["FP_BITS", "KIVI_GROUP", "SCALE_BITS", "INDEX_BITS", "frac", "quant", "basis",
           "kivi_group"]

#: bits per element of the uncompressed (fp16) cache
FP_BITS = 16
#: KIVI key group: tokens per per-channel group
KIVI_GROUP = 128
SCALE_BITS = 16
INDEX_BITS = 16


def frac(name: str, value, zero_ok: bool = False) -> Fraction:
    """A positive (or, with ``zero_ok``, non-negative) number as an exact fraction.

    >>> frac("g", 0.5), frac("s", 0, True)
    (Fraction(1, 2), Fraction(0, 1))
    """
    if zero_ok and not isinstance(value, bool) and value == 0:
        return Fraction(0)
    if isinstance(value, Fraction) and value > 0:
        return value
    check_positive(name, value)
    return Fraction(value)


def quant(bits, group, scale_bits=SCALE_BITS, zero_point=True) -> tuple[Fraction, Fraction]:
    r"""(payload, scale overhead) per element: :math:`(b,\ s(1+z)/g)`.

    >>> quant(4, 128, zero_point=False)
    (Fraction(4, 1), Fraction(1, 8))
    """
    scales = frac("scale_bits", scale_bits, True) * (1 + bool(zero_point))
    return frac("bits", bits), scales / frac("group", group)


def kivi_group(group: int, tokens: int | None) -> Fraction:
    r"""The mean group size of per-channel groups of ``group`` tokens over ``tokens`` tokens:
    :math:`T/\lceil T/G\rceil` (the last group may be partial; G when T is unknown).

    >>> kivi_group(128, 300), kivi_group(128, None)
    (Fraction(100, 1), Fraction(128, 1))
    """
    return Fraction(group) if tokens is None else Fraction(tokens, -(-tokens // group))


def basis(name: str, d: int, rank: int, tokens: int | None) -> Fraction:
    """Basis bits per element for a canonical basis ``name`` (see the module docstring).

    >>> basis("pca", 64, 16, 256), basis("hadamard", 64, 64, 256)
    (Fraction(1, 1), Fraction(0, 1))
    """
    if name == "hadamard" and d & (d - 1):  # as the compressor itself refuses it
        raise bad_argument("d", d, "a power of two for the Hadamard basis")
    if tokens is None or name == "hadamard" or name.startswith("random"):
        return Fraction(0)
    if name == "identity":
        return Fraction(INDEX_BITS * rank, d * tokens)
    stored = d * rank + (d if name == "pcac" else 0)
    check_choice("basis", name, ("pca", "pcac", "qaware"))
    return Fraction(SCALE_BITS * stored, d * tokens)
