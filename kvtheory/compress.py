r"""KV-cache compressors and the method-spec strings that name them (re-exported from
:mod:`kvtheory.methods`, where each family lives in its own module).

A compressor is a small frozen dataclass acting on keys or values shaped
(batch, kv_head, token, d): ``comp(x)`` returns the reconstruction :math:`\hat x` (same shape,
dtype and device) and ``comp.bits_per_element(d, tokens)`` its storage (the same code the
ledger reads). Compressors with a data-dependent basis (identity, pca, pcac, qaware) have
``needs_fit``: call ``comp = comp.fit(k, q)`` on calibration tensors (one compressor per layer;
the basis is fitted per kv head) and apply the returned copy to other tensors. Random and
Hadamard bases need only the shape and are built on first use.

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

plus any family added with :func:`register_method`. ``-sym`` selects the symmetric absmax grid
(no zero-point stored). Source: KIVI, Liu et al. 2024 (arXiv 2402.02750) for ``-kivi``.

>>> make_compressor("int4-kivi", role="k")
Quantize(bits=4, axis='channel', group=128, symmetric=False)
>>> make_compressor("rank16-pca")
RankReduce(basis=PCABasis(centered=False), rank=16)
"""

from __future__ import annotations

from .methods import (
    FP, KINDS, Compressor, FnCompressor, Hybrid, Identity, Method, MethodSpec, Quantize,
    RankReduce, RotatedQuantize, check_methods, deferred_finite_checks, make_compressor,
    parse_method, register_method, registered_methods, unregister_method,
)
from .methods.compressor import KV_AXES, _DEFERRED, _check_kv  # noqa: F401 (tests, benchmarks)
from .methods.registry import grammar
from .methods.rotated import InBasis as _InBasis, project as _project  # noqa: F401
from .methods.spec import check_options as _check_options  # noqa: F401

__all__ = [
    "Compressor", "FnCompressor", "FP", "Identity", "Quantize", "RotatedQuantize", "RankReduce",
    "Hybrid", "Method", "MethodSpec", "parse_method", "make_compressor", "GRAMMAR", "KINDS",
    "register_method", "unregister_method", "registered_methods", "check_methods",
    "deferred_finite_checks",
]

#: the built-in grammar message (``methods.registry.grammar()`` adds registered families)
GRAMMAR = grammar()
