r"""Storage ledger: bits per cached element, counting scales, zero-points and the basis.

With ``d`` the head dimension and ``T`` the tokens a fitted basis is amortised over (per kv head
and layer; ``tokens=None`` means :math:`T \to \infty`, the basis is free):

* quantization, ``g`` elements per group sharing an fp16 scale (and zero-point if asymmetric):
  :math:`b + s\,(1 + z)/g` (int4, g = 64: :math:`4 + 32/64 = 4.5`);
* KIVI keys, groups of :math:`G` = 128 tokens per channel: :math:`b + 32\lceil T/G\rceil/T`
  (:math:`= b + 32/G` when G divides T or T is unknown); KIVI values are per-token (g = d);
* rank r with a stored basis: :math:`c\,r/d + \beta\,(d r + [\text{centered}]\,d)/(d T)`;
* hybrid (rank r, b-bit coefficients in per-token groups of g of the r coefficients):
  :math:`\tfrac{r}{d}\,(b + s(1+z)/g)` plus the basis;
* the basis term: pca/qaware store the d×r matrix (pcac also the mean), identity stores r
  channel indices of 16 bits, random and hadamard store nothing (regenerated from a seed);
  rotated quantization stores the full d×d basis (d indices for identity);
* ``fp``: 16.

Internally every count is an exact :class:`fractions.Fraction`, so budget comparisons are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from ._checks import check_choice, check_int, check_positive, check_rank
from .bases import basis_from_name
from .errors import bad_argument

__all__ = [
    "FP_BITS", "KIVI_GROUP", "quant_bits_per_element", "rank_bits_per_element",
    "basis_bits_per_element", "bits_per_element", "breakdown", "LedgerRow", "Setting",
    "matched", "ledger_table",
]

#: bits per element of the uncompressed (fp16) cache
FP_BITS = 16
#: KIVI key group: tokens per per-channel group
KIVI_GROUP = 128
_SCALE_BITS = 16
_INDEX_BITS = 16


def _frac(name: str, value, zero_ok: bool = False) -> Fraction:
    """A positive (or, with ``zero_ok``, non-negative) number as an exact fraction."""
    if zero_ok and not isinstance(value, bool) and value == 0:
        return Fraction(0)
    if isinstance(value, Fraction) and value > 0:
        return value
    check_positive(name, value)
    return Fraction(value)


def _quant(bits, group, scale_bits=_SCALE_BITS, zero_point=True) -> tuple[Fraction, Fraction]:
    """(payload, scale overhead) per element."""
    scales = _frac("scale_bits", scale_bits, True) * (1 + bool(zero_point))
    return _frac("bits", bits), scales / _frac("group", group)


def quant_bits_per_element(
    bits: int | float,
    *,
    group: int | float,
    scale_bits: int | float = _SCALE_BITS,
    zero_point: bool = True,
) -> float:
    r"""Bits per element of group-wise uniform quantization: :math:`b + s\,(1 + z)/g`.

    ``bits`` b and ``group`` g are positive numbers (a non-integer g is an average group size),
    ``scale_bits`` s per scale and zero-point, ``zero_point`` z (False for symmetric).

    >>> quant_bits_per_element(4, group=64), quant_bits_per_element(4, group=128)
    (4.5, 4.25)
    """
    payload, scales = _quant(bits, group, scale_bits, zero_point)
    return float(payload + scales)


def rank_bits_per_element(
    rank: int | float, d: int | float, *, tokens: int | float | None = None, coef_bits: int | float = 16,
    basis_bits: int | float = 16, centered: bool = False,
) -> float:
    r"""Bits per element of rank-r storage with a stored d×r basis (and mean if centered):
    :math:`c\,r/d + [T\ \text{given}]\;\beta\,(d\,r + [\text{centered}]\,d)/(d\,T)`.

    >>> rank_bits_per_element(16, 64), rank_bits_per_element(16, 64, tokens=256)
    (4.0, 5.0)
    """
    r, dd = _frac("rank", rank), _frac("d", d)
    total = _frac("coef_bits", coef_bits, True) * r / dd
    if tokens is not None:
        t = _frac("tokens", tokens)
        total += _frac("basis_bits", basis_bits, True) * (dd * r + bool(centered) * dd) / (dd * t)
    return float(total)


def _basis(basis: str, d: int, rank: int, tokens: int | None) -> Fraction:
    if basis == "hadamard" and d & (d - 1):  # as the compressor itself refuses it
        raise bad_argument("d", d, "a power of two for the Hadamard basis")
    if tokens is None or basis == "hadamard" or basis.startswith("random"):
        return Fraction(0)
    if basis == "identity":
        return Fraction(_INDEX_BITS * rank, d * tokens)
    stored = d * rank + (d if basis == "pcac" else 0)
    check_choice("basis", basis, ("pca", "pcac", "qaware"))
    return Fraction(_SCALE_BITS * stored, d * tokens)


def basis_bits_per_element(basis: str, d: int, rank: int, tokens: int | None) -> float:
    r"""Basis storage per element, amortised over ``tokens`` (0 when ``tokens`` is None):
    pca/qaware :math:`16\,d r/(dT)`, pcac :math:`16(dr + d)/(dT)`, identity :math:`16\,r/(dT)`
    (channel indices), random/hadamard 0.

    >>> basis_bits_per_element("identity", 64, 16, 256), basis_bits_per_element("hadamard", 64, 16, 256)
    (0.015625, 0.0)
    """
    name = basis_from_name(basis).name
    d = check_int("d", d, 1)
    tokens = None if tokens is None else check_int("tokens", tokens, 1)
    return float(_basis(name, d, check_rank(rank, d), tokens))


@dataclass(frozen=True)
class LedgerRow:
    """One method's storage: ``payload`` (codes or coefficients), ``scales`` (scales and
    zero-points), ``basis``, all in bits per element, and their ``total``."""

    spec: str
    payload: float
    scales: float
    basis: float

    @property
    def total(self) -> float:
        return self.payload + self.scales + self.basis

    @property
    def compression(self) -> float:
        """fp16 bits over these bits (4.0 means a cache 4× smaller)."""
        return FP_BITS / self.total


def _breakdown(spec, d: int, tokens: int | None, role: str) -> tuple[str, Fraction, Fraction, Fraction]:
    from .compress import parse_method

    m = parse_method(spec) if isinstance(spec, str) else spec
    d = check_int("d", d, 1)
    tokens = None if tokens is None else check_int("tokens", tokens, 1)
    check_choice("role", role, ("k", "v"))
    zp = not m.symmetric
    if m.kind == "fp":
        return str(m), Fraction(FP_BITS), Fraction(0), Fraction(0)
    if m.kind == "kivi" and role == "k":
        g = m.group or KIVI_GROUP
        eff = g if tokens is None else Fraction(tokens, -(-tokens // g))
        return (str(m), *_quant(m.bits, eff, zero_point=zp), Fraction(0))
    if m.kind in ("int", "kivi"):
        g = d if m.group is None or m.kind == "kivi" else m.group
        if d % g:
            raise bad_argument("group", g, f"a divisor of the head dimension d={d}")
        basis = Fraction(0) if m.basis is None else _basis(m.basis, d, d, tokens)
        return (str(m), *_quant(m.bits, g, zero_point=zp), basis)
    r = check_rank(m.rank, d)
    basis = _basis(m.basis, d, r, tokens)
    if m.kind == "rank":
        return str(m), Fraction(FP_BITS * r, d), Fraction(0), basis
    g = m.group or r
    if r % g:
        raise bad_argument("group", g, f"a divisor of the rank r={r}")
    payload, scales = _quant(m.bits, g, zero_point=zp)
    return str(m), payload * r / d, scales * r / d, basis


def breakdown(spec, d: int, tokens: int | None = None, *, role: str = "k") -> LedgerRow:
    """The storage of one method spec (string or :class:`~kvtheory.compress.MethodSpec`),
    split into payload, scales and basis.

    >>> breakdown("rank16x4-pca", 64, 256)
    LedgerRow(spec='rank16x4-pca', payload=1.0, scales=0.5, basis=1.0)
    """
    name, *parts = _breakdown(spec, d, tokens, role)
    return LedgerRow(name, *(float(p) for p in parts))


def bits_per_element(spec, d: int, tokens: int | None = None, *, role: str = "k") -> float:
    """Bits per cached element of a method spec at head dimension ``d``, basis amortised over
    ``tokens`` (None: not counted). ``role`` ("k"/"v") matters only for ``-kivi``.

    >>> bits_per_element("int4", 64), bits_per_element("int4-kivi", 64, 256), bits_per_element("fp", 64)
    (4.5, 4.25, 16.0)
    """
    return float(sum(_breakdown(spec, d, tokens, role)[1:]))


@dataclass(frozen=True)
class Setting:
    """A method meeting a storage budget: ``spec``, its ``family`` and ``bits_per_element``."""

    spec: str
    family: str
    bits_per_element: float


def matched(
    budget_bits: int | float, d: int, tokens: int | None = None, *, basis: str = "pca",
    role: str = "k", hybrid_bits: Sequence[int] = (2, 4, 8),
) -> list[Setting]:
    """The settings that meet ``budget_bits`` per element, the largest of each family that fits
    (bits ≤ budget compared exactly, or equal once rounded to a float, so that a budget of
    ``bits_per_element(spec, ...)`` admits that spec): ``fp`` (if 16 fits), ``int{b}`` and
    ``int{b}-kivi`` (largest b), ``rank{r}-{basis}`` (largest r ≤ d) and, for each b in
    ``hybrid_bits``, ``rank{r}x{b}-{basis}`` (largest r). A family that cannot meet the budget
    is left out.

    >>> matched(bits_per_element("rank16-pca", 48), 48, hybrid_bits=())[-1].spec  # 16/3 bits
    'rank16-pca'

    >>> [s.spec for s in matched(4.5, 64)]
    ['int4', 'int4-kivi', 'rank18-pca', 'rank64x2-pca', 'rank64x4-pca', 'rank32x8-pca']
    """
    budget_f = check_positive("budget_bits", budget_bits)
    budget = Fraction(budget_f)
    d = check_int("d", d, 1)
    name = basis_from_name(basis).name
    families = [("fp", ["fp"]), ("int", [f"int{b}" for b in range(1, 17)]),
                ("kivi", [f"int{b}-kivi" for b in range(1, 17)]),
                ("rank", [f"rank{r}-{name}" for r in range(1, d + 1)])]
    for b in hybrid_bits:
        b = check_int("hybrid_bits", b, 1, 16)
        families.append(("hybrid", [f"rank{r}x{b}-{name}" for r in range(1, d + 1)]))
    def cost(spec: str) -> Fraction:
        return sum(_breakdown(spec, d, tokens, role)[1:])

    out = []
    for family, specs in families:
        # bits grow with b and r: bisect for the last spec that fits
        lo, hi = 0, len(specs)  # specs[:lo] fit, specs[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            c = cost(specs[mid])
            if c <= budget or float(c) <= budget_f:  # 16/3 fits float(16/3), a hair below it
                lo = mid + 1
            else:
                hi = mid
        if lo:
            out.append(Setting(specs[lo - 1], family, float(cost(specs[lo - 1]))))
    return out


def ledger_table(
    specs: Sequence[str], d: int, tokens: int | None = None, *, role: str = "k"
) -> list[LedgerRow]:
    """Rows of :func:`breakdown` for reports (``dataclasses.asdict`` or :func:`kvtheory.io.to_jsonable`
    turn them into plain dicts).

    >>> [round(r.total, 4) for r in ledger_table(["fp", "int4-g32", "rank16-hadamard"], 64)]
    [16.0, 5.0, 4.0]
    """
    if isinstance(specs, str):
        specs = [specs]
    try:
        specs = list(specs)
    except TypeError:
        raise bad_argument("specs", specs, "a method spec or a list of method specs") from None
    return [breakdown(s, d, tokens, role=role) for s in specs]
