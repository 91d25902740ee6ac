r"""KV-cache compressors and the method-spec strings that name them.

A compressor is a small frozen dataclass acting on keys or values shaped
(batch, kv_head, token, d): ``comp(x)`` returns the reconstruction :math:`\hat x` (same shape and
dtype) and ``comp.bits_per_element(d, tokens)`` its storage (:mod:`kvtheory.ledger`). Compressors
with a data-dependent basis (identity, pca, pcac, qaware) have ``needs_fit``: call
``comp = comp.fit(k, q)`` on calibration tensors (one compressor per layer; the basis is fitted
per kv head) and apply the returned copy to other tensors. Random and Hadamard bases need only
the shape and are built on first use.

====================== ===================================================================
class                  :math:`\hat x`
====================== ===================================================================
``FP``                 :math:`x` (fp16 storage, 16 bits)
``Quantize``           :math:`Q_b(x)` in groups (:func:`kvtheory.quantize.quantize`)
``RotatedQuantize``    :math:`\mu + Q_b((x-\mu)U)\,U^{\top}`
``RankReduce``         :math:`\mu + (x-\mu)U_rU_r^{\top}`
``Hybrid``             :math:`\mu + Q_b((x-\mu)U_r)\,U_r^{\top}` (b-bit coefficients per token)
====================== ===================================================================

Method specs (:func:`parse_method`, :func:`make_compressor`), with ``[...]`` optional::

    fp                           no compression
    int{b}[-g{n}][-sym]          per token, groups of n channels (default: all d), asymmetric
    int{b}-kivi[-g{n}][-sym]     keys per channel in groups of n tokens (default 128); values per token
    int{b}-{basis}[-g{n}][-sym]  quantized in a rotated basis
    rank{r}-{basis}              rank r, fp16 coefficients
    rank{r}x{b}-{basis}[-g{n}][-sym]   rank r, then b-bit coefficients per token (groups of n of r)
    basis: identity, pca, pcac (centered PCA), random, random{seed}, hadamard, qaware

``-sym`` selects the symmetric absmax grid (no zero-point stored). Source: KIVI, Liu et al. 2024
(arXiv 2402.02750) for ``-kivi``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from ._checks import check_bits, check_choice, check_int, check_rank, check_tensor
from .bases import Basis, FittedBasis, basis_from_name
from .errors import KVTheoryError, bad_argument
from .ledger import (
    FP_BITS, KIVI_GROUP, basis_bits_per_element, quant_bits_per_element, rank_bits_per_element,
)
from .quantize import AXES, _quantize_checked, quantize, resolve_group

__all__ = [
    "Compressor", "FP", "Identity", "Quantize", "RotatedQuantize", "RankReduce", "Hybrid",
    "MethodSpec", "parse_method", "make_compressor", "GRAMMAR", "KINDS",
]

KV_AXES = "batch kv_head token d"
KINDS = ("fp", "int", "kivi", "rank", "hybrid")
GRAMMAR = ("a method spec: fp | int{b}[-g{n}][-sym] | int{b}-kivi[-g{n}][-sym] | "
           "int{b}-{basis}[-g{n}][-sym] | rank{r}-{basis} | rank{r}x{b}-{basis}[-g{n}][-sym], "
           "with b in 1..16, r in 1..d and basis one of identity, pca, pcac, random, "
           "random{seed}, hadamard, qaware")


def _check_options(bits: int, group: int | None, symmetric: bool) -> None:
    check_bits(bits)
    if group is not None:
        check_int("group", group, 1)
    if not isinstance(symmetric, bool):
        raise bad_argument("symmetric", symmetric, "True or False")
    if symmetric and bits < 2:
        raise bad_argument("bits", bits, "an integer in 2..16 for symmetric quantization")


#: device flags of the open :func:`deferred_finite_checks` blocks (innermost last)
_DEFERRED: list[Tensor] = []


def _check_kv(x: Tensor) -> Tensor:
    """``check_tensor("x", x, ndim=4)`` with a cheaper finite test: one sum instead of
    ``isfinite(x).all()`` (a sum is finite when every term is; when it is not, because of a
    NaN/Inf or an overflow, the exact test decides and words the error). Compressors run on
    every attention call, so this keeps validation from costing more than the compression.
    Inside :func:`deferred_finite_checks` on an accelerator the test is folded into a device
    flag instead (no host sync per call) and decided when the block ends."""
    check_tensor("x", x, ndim=4, axes=KV_AXES, finite=False)
    if not x.numel():
        return x
    if _DEFERRED and x.device == _DEFERRED[-1].device:
        _DEFERRED[-1].logical_and_(torch.isfinite(x.sum()))
    elif not bool(torch.isfinite(x.sum())):
        check_tensor("x", x, ndim=4, axes=KV_AXES)
    return x


@contextlib.contextmanager
def deferred_finite_checks(device: Any) -> Iterator[None]:
    """On an accelerator, check the compressors' inputs for NaN/Inf once, when the block ends
    (one host sync instead of one per attention call; the error is the same
    :class:`KVTheoryError`, raised at the end of the block); on the CPU, do nothing special.

    >>> with deferred_finite_checks("cpu"):
    ...     _ = _check_kv(torch.zeros(1, 1, 2, 2))
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        yield
        return
    flag = torch.ones((), dtype=torch.bool, device=dev)
    _DEFERRED.append(flag)
    try:
        yield
    finally:
        del _DEFERRED[next(i for i, f in enumerate(_DEFERRED) if f is flag)]
    if not bool(flag):
        raise KVTheoryError("x: got key/value states with NaN or Inf inside compressed_kv (checked "
                            "once at the end of the block on the accelerator); expected finite "
                            "attention inputs")


def _project(fb: FittedBasis, x: Tensor, rank: int) -> Tensor:
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
class Compressor:
    """Base class: ``__call__`` validates ``x`` and calls ``_apply``; ``fit`` returns ``self``."""

    @property
    def needs_fit(self) -> bool:
        """Whether ``fit(k, q)`` on calibration tensors must come before use."""
        return False

    def fit(
        self,
        k: Float[Tensor, "batch kv_head token d"],
        q: Float[Tensor, "batch q_head query d"] | None = None,
    ) -> Compressor:
        """A copy fitted on calibration keys ``k`` (and queries ``q`` for qaware)."""
        check_tensor("k", k, ndim=4, axes=KV_AXES)
        return self

    def __call__(
        self, x: Float[Tensor, "batch kv_head token d"]
    ) -> Float[Tensor, "batch kv_head token d"]:
        """The reconstruction of ``x`` (batch, kv_head, token, d): same shape and dtype."""
        return self._apply(_check_kv(x))

    def _apply(self, x: Tensor) -> Tensor:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class FP(Compressor):
    """No compression: fp16 storage, 16 bits per element; ``x_hat`` is a copy of ``x``.

    >>> FP().bits_per_element(64)
    16.0
    """

    def _apply(self, x):
        return x.clone()

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        check_int("d", d, 1)
        return float(FP_BITS)


Identity = FP


@dataclass(frozen=True)
class Quantize(Compressor):
    r"""Uniform ``bits``-bit quantization in groups (:func:`kvtheory.quantize.quantize`):
    ``axis="token"`` groups ``group`` channels of a token (None: all d); ``axis="channel"``
    groups ``group`` tokens of a channel (None: all tokens; KIVI keys use 128).
    Storage :math:`b + 16(1+z)/g` bits per element (z = 0 when ``symmetric``).

    >>> Quantize(4).bits_per_element(64)
    4.5
    >>> Quantize(4, axis="channel", group=128).bits_per_element(64, tokens=256)
    4.25
    """

    bits: int
    axis: str = "token"
    group: int | None = None
    symmetric: bool = False

    def __post_init__(self):
        check_choice("axis", self.axis, AXES)
        _check_options(self.bits, self.group, self.symmetric)

    def _apply(self, x):
        return _quantize_checked(x, self.bits, self.axis, self.group, self.symmetric)

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        d = check_int("d", d, 1)
        zp = not self.symmetric
        if self.axis == "token":
            g = resolve_group("token", self.group, 1, d)
        elif tokens is not None:  # ceil(T / G) groups per channel, the last one maybe partial
            t = check_int("tokens", tokens, 1)
            g = t / -(-t // (self.group or t))
        elif self.group is None:
            raise bad_argument("tokens", None, "the number of tokens: one group spans all of them")
        else:
            g = self.group
        return quant_bits_per_element(self.bits, group=g, zero_point=zp)


@dataclass(frozen=True)
class _InBasis(Compressor):
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

    def _basis_bits(self, d: int, tokens: int | None) -> float:
        return basis_bits_per_element(self.basis.name, d, self._rank(d), tokens)


@dataclass(frozen=True)
class RotatedQuantize(_InBasis):
    r"""Rotate, quantize, rotate back: :math:`\hat x = \mu + Q_b\big((x-\mu)U\big)U^{\top}`, the
    groups of :class:`Quantize` taken over the rotated coordinates. Storage: :class:`Quantize`'s
    plus the full d×d basis amortised over ``tokens``.

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
        _check_options(self.bits, self.group, self.symmetric)

    def _apply(self, x):
        fb = self._basis_for(x)
        c = quantize(fb.to_coords(x), self.bits, axis=self.axis, group=self.group,
                     symmetric=self.symmetric)
        return fb.from_coords(c).to(x.dtype)

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        q = Quantize(self.bits, self.axis, self.group, self.symmetric).bits_per_element(d, tokens)
        return q + self._basis_bits(d, tokens)


@dataclass(frozen=True)
class RankReduce(_InBasis):
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
        return _project(self._basis_for(x), x, self._rank(x.shape[-1]))

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        d = check_int("d", d, 1)
        return rank_bits_per_element(self._rank(d), d) + self._basis_bits(d, tokens)


@dataclass(frozen=True)
class Hybrid(_InBasis):
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
        _check_options(self.bits, self.group, self.symmetric)
        if self.group is not None and self.rank % self.group:
            raise bad_argument("group", self.group, f"a divisor of the rank r={self.rank}")

    def _rank(self, d: int) -> int:
        return check_rank(self.rank, d)

    def _apply(self, x):
        fb = self._basis_for(x)
        c = quantize(fb.to_coords(x, self.rank), self.bits, group=self.group,
                     symmetric=self.symmetric)
        return fb.from_coords(c).to(x.dtype)

    def bits_per_element(self, d: int, tokens: int | None = None) -> float:
        d = check_int("d", d, 1)
        r = self._rank(d)
        q = quant_bits_per_element(self.bits, group=self.group or r, zero_point=not self.symmetric)
        return q * r / d + self._basis_bits(d, tokens)


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec; ``str(spec)`` gives the canonical string back.

    ``kind`` is fp, int (``basis`` None: plain; else rotated), kivi, rank or hybrid; ``group``
    None means the default (all d for int, 128 tokens for kivi keys, all r for hybrid).

    >>> str(MethodSpec("hybrid", bits=4, rank=16, basis="pca", symmetric=True))
    'rank16x4-pca-sym'
    """

    kind: str
    bits: int | None = None
    rank: int | None = None
    basis: str | None = None
    group: int | None = None
    symmetric: bool = False

    def __post_init__(self):
        kind = check_choice("kind", self.kind, KINDS)
        quantized = kind in ("int", "kivi", "hybrid")
        if quantized:
            _check_options(self.bits, self.group, self.symmetric)
        else:
            for name, default in (("bits", None), ("group", None), ("symmetric", False)):
                if getattr(self, name) != default:
                    raise bad_argument(name, getattr(self, name), f"{default} for a {kind} spec")
        if kind in ("rank", "hybrid"):
            check_int("rank", self.rank, 1)
        elif self.rank is not None:
            raise bad_argument("rank", self.rank, f"None for a {kind} spec")
        if kind in ("rank", "hybrid") or (kind == "int" and self.basis is not None):
            object.__setattr__(self, "basis", basis_from_name(self.basis).name)
        elif self.basis is not None:
            raise bad_argument("basis", self.basis, f"None for a {kind} spec")
        if kind == "hybrid" and self.group is not None and self.rank % self.group:
            raise bad_argument("group", self.group, f"a divisor of the rank r={self.rank}")

    def __str__(self) -> str:
        head = {"fp": "fp", "int": f"int{self.bits}", "kivi": f"int{self.bits}-kivi",
                "rank": f"rank{self.rank}", "hybrid": f"rank{self.rank}x{self.bits}"}[self.kind]
        return (head + (f"-{self.basis}" if self.basis else "")
                + (f"-g{self.group}" if self.group is not None else "")
                + ("-sym" if self.symmetric else ""))


_HEAD = re.compile(r"fp|int([0-9]+)|rank([0-9]+)(?:x([0-9]+))?")  # ASCII digits only
_BASIS = re.compile(r"identity|pcac?|random[0-9]*|hadamard|qaware")


def parse_method(spec: str | MethodSpec) -> MethodSpec:
    """Parse a method spec (grammar in the module docstring); options after the head may come
    in any order, ``str()`` writes them as basis, group, sym.

    >>> parse_method("int4-g32")
    MethodSpec(kind='int', bits=4, rank=None, basis=None, group=32, symmetric=False)
    >>> str(parse_method("rank8x4-random3"))
    'rank8x4-random3'
    """
    if isinstance(spec, MethodSpec):
        return spec
    if not isinstance(spec, str):
        raise bad_argument("spec", spec, GRAMMAR)
    head, *opts = spec.split("-")
    m = _HEAD.fullmatch(head)
    if m is None:
        raise bad_argument("spec", spec, GRAMMAR)
    found: dict[str, str | int] = {}
    for opt in opts:
        if opt in ("sym", "kivi"):
            key, value = opt, opt
        elif re.fullmatch(r"g[0-9]+", opt):
            key, value = "group", int(opt[1:])
        elif _BASIS.fullmatch(opt):
            key, value = "basis", opt
        else:
            raise bad_argument("spec", spec, GRAMMAR)
        if key in found or (key in ("kivi", "basis") and {"kivi", "basis"} & found.keys()):
            raise bad_argument("spec", spec, GRAMMAR)  # repeated, or both kivi and a basis
        found[key] = value
    int_bits, rank, hybrid_bits = m.groups()
    if head == "fp":
        kind = "fp"
    elif int_bits is not None:
        kind = "kivi" if "kivi" in found else "int"
    else:
        kind = "rank" if hybrid_bits is None else "hybrid"
    allowed = {"fp": set(), "int": {"basis", "group", "sym"}, "kivi": {"kivi", "group", "sym"},
               "rank": {"basis"}, "hybrid": {"basis", "group", "sym"}}[kind]
    if not found.keys() <= allowed or (kind in ("rank", "hybrid") and "basis" not in found):
        raise bad_argument("spec", spec, GRAMMAR)
    bits = int_bits or hybrid_bits
    return MethodSpec(kind, bits=None if bits is None else int(bits),
                      rank=None if rank is None else int(rank), basis=found.get("basis"),
                      group=found.get("group"), symmetric="sym" in found)


def make_compressor(spec: str | MethodSpec, role: str = "k") -> Compressor:
    """The compressor a spec names; ``role`` ("k" or "v") matters only for ``-kivi``
    (keys per channel in groups of 128 tokens, values per token).

    >>> make_compressor("int4-kivi", role="k")
    Quantize(bits=4, axis='channel', group=128, symmetric=False)
    >>> make_compressor("rank16-pca")
    RankReduce(basis=PCABasis(centered=False), rank=16)
    """
    m = parse_method(spec)
    check_choice("role", role, ("k", "v"))
    if m.kind == "fp":
        return FP()
    if m.kind == "kivi":
        if role == "k":
            return Quantize(m.bits, "channel", m.group or KIVI_GROUP, m.symmetric)
        return Quantize(m.bits, "token", None, m.symmetric)
    if m.kind == "int":
        if m.basis is None:
            return Quantize(m.bits, "token", m.group, m.symmetric)
        return RotatedQuantize(basis_from_name(m.basis), m.bits, "token", m.group, m.symmetric)
    if m.kind == "rank":
        return RankReduce(basis_from_name(m.basis), m.rank)
    return Hybrid(basis_from_name(m.basis), m.rank, m.bits, m.group, m.symmetric)
