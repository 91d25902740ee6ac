r"""The ``rotated`` family (``int{b}-{basis}[-g{n}][-sym]``): rotate, quantize, rotate back,
:math:`\hat x = \mu + Q_b\big((x-\mu)U\big)U^{\top}`; and :class:`InBasis`, the fitting and basis
storage shared with the rank and hybrid families.

Storage: :class:`~.uniform.Quantize`'s plus the full d×d basis amortised over ``tokens``.
Query-aware bases (``qaware``) weight key directions by the queries that read them; values are
read through the attention weights, not by queries, so ``qaware`` has no definition for values
and a values spec with it is refused before any work (:func:`check_qaware_role`).

>>> parse_method("int4-hadamard").compressor().bits_per_element(64, 256)
4.5
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float
from torch import Tensor

from .._checks import check_choice, check_tensor
from ..bases import Basis, FittedBasis, basis_from_name
from ..errors import KVTheoryError
from ..quantize import AXES, quantize
from .compressor import KV_AXES, Compressor, on_real_tokens
from .registry import Family, add_family, parse_method  # noqa: F401 (doctest)
from .spec import check_options
from .storage import basis as basis_bits
from .uniform import Quantize

__all__ = ["InBasis", "RotatedQuantize", "RotatedFamily", "project", "check_qaware_role"]


def check_qaware_role(spec: str, basis: str | None, role: str) -> None:
    """Refuse the query-aware basis for values (see the module docstring).

    >>> check_qaware_role("rank8-qaware", "qaware", "v")
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: values: got 'rank8-qaware'; expected a values method without the qaware basis: qaware weights key directions by the queries that read them, and values are not read by queries (compress only the keys, e.g. targets k, or use pca for values)
    """
    if role == "v" and basis == "qaware":
        raise KVTheoryError(
            f"values: got {spec!r}; expected a values method without the qaware basis: qaware "
            "weights key directions by the queries that read them, and values are not read by "
            "queries (compress only the keys, e.g. targets k, or use pca for values)")


def project(fb: FittedBasis, x: Tensor, rank: int) -> Tensor:
    """``fb.project(x, rank)`` for an ``x`` already validated by :meth:`Compressor.__call__`:
    the same operations, without validating ``x`` and its coordinates again."""
    if x.shape[1] != fb.kv_heads or x.shape[-1] != fb.d:
        return fb.project(x, rank)  # raises the message
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = fb.rotation.to(work)[..., :rank]
    mean = None if fb.mean is None else fb.mean.to(work)[:, None, :]
    xw = x.to(work)
    c = (xw if mean is None else xw - mean) @ u
    y = c @ u.transpose(-1, -2)
    return (y if mean is None else y + mean).to(x.dtype)


@dataclass(frozen=True)
class InBasis(Compressor):
    """Shared by compressors that work in a basis: fitting and the basis' storage."""

    @property
    def needs_fit(self) -> bool:
        return self.basis.data_dependent

    def _rank(self, d: int) -> int:
        return d

    def fit(
        self,
        k: Float[Tensor, "batch kv_head token d"],
        q: Float[Tensor, "batch q_head query d"] | None = None,
    ) -> Compressor:
        check_tensor("k", k, ndim=4, axes=KV_AXES)
        self._rank(k.shape[-1])
        return replace(self, fitted=self.basis.fit(k, q))

    def _basis_for(self, x: Tensor) -> FittedBasis:
        self._rank(x.shape[-1])
        if self.fitted is not None:
            return self.fitted
        if self.basis.data_dependent:
            raise KVTheoryError(
                f"compressor: got an unfitted {self!r}; expected a fitted one: the "
                f"{self.basis.name} basis is learnt from data, so call comp = comp.fit(k)"
                f"{' with queries, comp.fit(k, q)' if self.basis.name == 'qaware' else ''} "
                "on calibration tensors first")
        return self.basis.fit(x)

    def _basis_bits(self, d: int, tokens: int | None):
        return basis_bits(self.basis.name, d, self._rank(d), tokens)


_InBasis = InBasis


@dataclass(frozen=True)
class RotatedQuantize(InBasis):
    r"""Rotate, quantize, rotate back: :math:`\hat x = \mu + Q_b\big((x-\mu)U\big)U^{\top}`, the
    groups of :class:`~.uniform.Quantize` taken over the rotated coordinates (per-channel groups
    over the real tokens only when a mask hides padding). Storage: Quantize's plus the full
    d×d basis amortised over ``tokens``.

    >>> RotatedQuantize(basis_from_name("hadamard"), 4).bits_per_element(64, 256)
    4.5
    """

    basis: Basis
    bits: int
    axis: str = "token"
    group: int | None = None
    symmetric: bool = False
    fitted: FittedBasis | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_choice("axis", self.axis, AXES)
        check_options(self.bits, self.group, self.symmetric)

    @property
    def token_grouped(self) -> bool:  # type: ignore[override]
        return self.axis == "channel"

    def _apply(self, x, *mask):
        fb = self._basis_for(x)

        def run(t):
            c = quantize(fb.to_coords(t), self.bits, axis=self.axis, group=self.group,
                         symmetric=self.symmetric)
            return fb.from_coords(c).to(t.dtype)

        return on_real_tokens(run, x, mask[0] if mask else None)

    def storage(self, d, tokens=None):
        payload, scales, _ = Quantize(self.bits, self.axis, self.group, self.symmetric).storage(d, tokens)
        return payload, scales, self._basis_bits(d, tokens)


class RotatedFamily(Family):
    key = "rotated"
    kind = "int"
    plot_family = "quant"
    legend = "INT per token"
    grammar = "int{b}-{basis}[-g{n}][-sym]"
    shape, marker, options, requires = "int", "basis", frozenset({"basis", "group", "sym"}), None

    def head(self, spec):
        return f"int{spec.bits}"

    def compressor(self, spec, role):
        return RotatedQuantize(basis_from_name(spec.basis), spec.bits, "token", spec.group,
                               spec.symmetric)

    def series_label(self, spec):
        return "INT-b per token"

    def validate(self, spec, d, role):
        check_qaware_role(str(spec), spec.basis, role)
        super().validate(spec, d, role)


add_family(RotatedFamily())
