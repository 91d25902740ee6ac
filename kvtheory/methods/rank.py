r"""The ``rank`` family (``rank{r}-{basis}``): keep the first r directions of a basis,
:math:`\hat x = \mu + (x-\mu)U_rU_r^{\top}`, fp16 coefficients. Storage :math:`16\,r/d` plus
the basis: :math:`16(dr + [\text{centered}]\,d)/(dT)` for pca/pcac/qaware, 16r/(dT) for
identity (channel indices), 0 for random/hadamard.

>>> parse_method("rank16-pca").storage(64, 256)
(Fraction(4, 1), Fraction(0, 1), Fraction(1, 1))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from .._checks import check_int, check_rank
from ..bases import Basis, FittedBasis, basis_from_name
from .registry import Family, add_family, parse_method  # noqa: F401 (doctest)
from .rotated import InBasis, check_qaware_role, project
from .storage import FP_BITS

__all__ = ["RankReduce", "RankFamily"]


@dataclass(frozen=True)
class RankReduce(InBasis):
    r"""Keep the first ``rank`` directions of a basis: :math:`\hat x = \mu + (x-\mu)U_rU_r^{\top}`,
    fp16 coefficients. Storage :math:`16\,r/d` plus the basis (ledger).

    >>> RankReduce(basis_from_name("pca"), 16).bits_per_element(64, 256)
    5.0
    """

    basis: Basis
    rank: int
    fitted: FittedBasis | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_int("rank", self.rank, 1)

    def _rank(self, d: int) -> int:
        return check_rank(self.rank, d)

    def _apply(self, x):
        return project(self._basis_for(x), x, self._rank(x.shape[-1]))

    def storage(self, d, tokens=None):
        d = check_int("d", d, 1)
        r = self._rank(d)
        return Fraction(FP_BITS * r, d), Fraction(0), self._basis_bits(d, tokens)


class RankFamily(Family):
    key = kind = "rank"
    plot_family = "rank"
    legend = "rank (PCA)"
    grammar = "rank{r}-{basis}"
    shape, marker, options, requires = "rank", "basis", frozenset({"basis"}), "basis"

    def head(self, spec):
        return f"rank{spec.rank}"

    def compressor(self, spec, role):
        return RankReduce(basis_from_name(spec.basis), spec.rank)

    def series_label(self, spec):
        return "rank-r PCA" if spec.basis == "pca" else f"rank-r {spec.basis}"

    def validate(self, spec, d, role):
        check_qaware_role(str(spec), spec.basis, role)
        super().validate(spec, d, role)

    def sweep(self, d, basis="pca"):
        return [f"rank{r}-{basis}" for r in range(1, d + 1)]


add_family(RankFamily())
