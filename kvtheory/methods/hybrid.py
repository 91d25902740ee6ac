r"""The ``hybrid`` family (``rank{r}x{b}-{basis}[-g{n}][-sym]``): rank r, then ``b``-bit
quantization of the r coefficients of each token in groups of n (all r by default),
:math:`\hat x = \mu + Q_b\big((x-\mu)U_r\big)U_r^{\top}`. Storage
:math:`\tfrac{r}{d}(b + 16(1+z)/g)` plus the basis.

>>> parse_method("rank16x4-pca").storage(64, 256)
(Fraction(1, 1), Fraction(1, 2), Fraction(1, 1))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._checks import check_int, check_rank
from ..bases import Basis, FittedBasis, basis_from_name
from ..errors import bad_argument
from ..quantize import quantize
from .registry import Family, add_family, parse_method  # noqa: F401 (doctest)
from .rotated import InBasis, check_qaware_role
from .spec import check_options
from .storage import quant

__all__ = ["Hybrid", "HybridFamily"]


@dataclass(frozen=True)
class Hybrid(InBasis):
    r"""Rank r, then ``bits``-bit asymmetric (or ``symmetric``) quantization of the r coefficients
    of each token in groups of ``group`` (None: all r):
    :math:`\hat x = \mu + Q_b\big((x-\mu)U_r\big)U_r^{\top}`. Storage
    :math:`\tfrac{r}{d}(b + 16(1+z)/g)` plus the basis.

    >>> Hybrid(basis_from_name("hadamard"), rank=16, bits=4).bits_per_element(64)
    1.5
    """

    basis: Basis
    rank: int
    bits: int
    group: int | None = None
    symmetric: bool = False
    fitted: FittedBasis | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_int("rank", self.rank, 1)
        check_options(self.bits, self.group, self.symmetric)
        if self.group is not None and self.rank % self.group:
            raise bad_argument("group", self.group, f"a divisor of the rank r={self.rank}")

    def _rank(self, d: int) -> int:
        return check_rank(self.rank, d)

    def _apply(self, x):
        fb = self._basis_for(x)
        c = quantize(fb.to_coords(x, self.rank), self.bits, group=self.group,
                     symmetric=self.symmetric)
        return fb.from_coords(c).to(x.dtype)

    def storage(self, d, tokens=None):
        d = check_int("d", d, 1)
        r = self._rank(d)
        payload, scales = quant(self.bits, self.group or r, zero_point=not self.symmetric)
        return payload * r / d, scales * r / d, self._basis_bits(d, tokens)


class HybridFamily(Family):
    key = kind = "hybrid"
    plot_family = "hybrid"
    legend = "hybrid"
    grammar = "rank{r}x{b}-{basis}[-g{n}][-sym]"
    shape, marker, options, requires = "rankx", "basis", frozenset({"basis", "group", "sym"}), "basis"

    def head(self, spec):
        return f"rank{spec.rank}x{spec.bits}"

    def compressor(self, spec, role):
        return Hybrid(basis_from_name(spec.basis), spec.rank, spec.bits, spec.group, spec.symmetric)

    def series(self, spec):
        return "hybrid", f"x{spec.bits}"

    def series_label(self, spec):
        return f"rank r + INT{spec.bits} coefficients"

    def tick(self, spec):
        return f"rank{spec.rank}\n×INT{spec.bits}"

    def validate(self, spec, d, role):
        check_qaware_role(str(spec), spec.basis, role)
        super().validate(spec, d, role)

    def sweep(self, d, basis="pca", bits=4):
        return [f"rank{r}x{bits}-{basis}" for r in range(1, d + 1)]


add_family(HybridFamily())
