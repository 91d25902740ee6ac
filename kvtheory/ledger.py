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
There is one implementation: :func:`breakdown` parses the spec once
(:func:`kvtheory.methods.parse_method`) and reads its ``storage``, which is the compressor's own
``storage`` (``Compressor.bits_per_element`` sums the same numbers); families added with
:func:`kvtheory.methods.register_method` are counted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from collections.abc import Sequence

from ._checks import check_choice, check_int, check_positive, check_rank
from .bases import basis_from_name
from .errors import bad_argument
from .methods import FAMILIES, parse_method, registered_methods
from .methods.storage import FP_BITS, KIVI_GROUP, SCALE_BITS as _SCALE_BITS, basis as _basis
from .methods.storage import frac as _frac, quant as _quant

__all__ = [
    "FP_BITS", "KIVI_GROUP", "quant_bits_per_element", "rank_bits_per_element",
    "basis_bits_per_element", "bits_per_element", "breakdown", "LedgerRow", "Setting",
    "matched", "ledger_table",
]


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
    """(canonical spec, payload, scales, basis): the spec's own storage (one implementation:
    the compressor's ``storage``, which ``bits_per_element`` of the compressor also sums)."""
    m = parse_method(spec)
    d = check_int("d", d, 1)
    tokens = None if tokens is None else check_int("tokens", tokens, 1)
    check_choice("role", role, ("k", "v"))
    return (str(m), *m.storage(d, tokens, role))


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
    role: str = "k", hybrid_bits: Sequence[int] = (2, 4, 8), extra: Sequence[str] = (),
) -> list[Setting]:
    """The settings that meet ``budget_bits`` per element, the largest of each family that fits
    (bits ≤ budget compared exactly, or equal once rounded to a float, so that a budget of
    ``bits_per_element(spec, ...)`` admits that spec): ``fp`` (if 16 fits), ``int{b}`` and
    ``int{b}-kivi`` (largest b), ``rank{r}-{basis}`` (largest r ≤ d) and, for each b in
    ``hybrid_bits``, ``rank{r}x{b}-{basis}`` (largest r). A family that cannot meet the budget
    is left out. ``extra`` names families added with
    :func:`kvtheory.methods.register_method`; each contributes its costliest spec (of its
    ``sweep``) that fits.

    >>> matched(bits_per_element("rank16-pca", 48), 48, hybrid_bits=())[-1].spec  # 16/3 bits
    'rank16-pca'

    >>> [s.spec for s in matched(4.5, 64)]
    ['int4', 'int4-kivi', 'rank18-pca', 'rank64x2-pca', 'rank64x4-pca', 'rank32x8-pca']
    """
    budget_f = check_positive("budget_bits", budget_bits)
    budget = Fraction(budget_f)
    d = check_int("d", d, 1)
    name = basis_from_name(basis).name
    fam = FAMILIES
    families = [("fp", ["fp"]), ("int", fam["int"].sweep(d)), ("kivi", fam["kivi"].sweep(d)),
                ("rank", fam["rank"].sweep(d, basis=name))]
    for b in hybrid_bits:
        b = check_int("hybrid_bits", b, 1, 16)
        families.append(("hybrid", fam["hybrid"].sweep(d, basis=name, bits=b)))
    if isinstance(extra, str):
        extra = [extra]
    user = []
    for key in extra:
        if key not in registered_methods():
            raise bad_argument("extra", key, "the name of a family added with register_method "
                               f"(registered: {', '.join(registered_methods()) or 'none'})")
        user.append((key, FAMILIES[key].sweep(d)))

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
    for family, specs in user:  # no order assumed: the costliest spec that fits
        fits = [(cost(s), i, s) for i, s in enumerate(specs)]
        fits = [f for f in fits if f[0] <= budget or float(f[0]) <= budget_f]
        if fits:
            c, _, spec = max(fits)
            out.append(Setting(spec, family, float(c)))
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
