"""Compression methods: one module per family, a registry, and the compressor protocol.

===================  ==============================================================
module               holds
===================  ==============================================================
``compressor``       :class:`Compressor` (validation, ``mask``, ``from_fn``)
``storage``          the exact storage arithmetic (the ledger reads it)
``registry``         :class:`Method`, :class:`Family`, :func:`parse_method`,
                     :func:`register_method`, plugins (entry points ``kvtheory.methods``)
``spec``             :class:`MethodSpec`, the built-in grammar
``fp``, ``uniform``, ``kivi``, ``rotated``, ``rank``, ``hybrid``: one family each
===================  ==============================================================

>>> str(parse_method("rank16x4-pca-sym")), make_compressor("rank16-pca")
('rank16x4-pca-sym', RankReduce(basis=PCABasis(centered=False), rank=16))
"""

from __future__ import annotations

from .compressor import Compressor, FnCompressor, deferred_finite_checks
from .registry import (
    ENTRY_POINT_GROUP, FAMILIES, Family, Method, RegisteredSpec, check_methods, grammar,
    load_plugins, parse_method, register_method, registered_methods, unregister_method,
)
from .spec import KINDS, MethodSpec
from .fp import FP, Identity  # noqa: E402  (each family module registers itself on import)
from .uniform import Quantize
from .kivi import KiviFamily  # noqa: F401
from .rotated import RotatedQuantize
from .rank import RankReduce
from .hybrid import Hybrid

__all__ = [
    "Compressor", "FnCompressor", "FP", "Identity", "Quantize", "RotatedQuantize", "RankReduce",
    "Hybrid", "Method", "MethodSpec", "Family", "RegisteredSpec", "FAMILIES", "KINDS",
    "parse_method", "make_compressor", "register_method", "unregister_method",
    "registered_methods", "load_plugins", "check_methods", "grammar", "ENTRY_POINT_GROUP",
    "deferred_finite_checks",
]


def make_compressor(spec: "str | Method", role: str = "k") -> Compressor:
    """The compressor a spec names; ``role`` ("k" or "v") matters only for ``-kivi``
    (keys per channel in groups of 128 tokens, values per token) and registered families
    whose factory takes a role.

    >>> make_compressor("int4-kivi", role="k")
    Quantize(bits=4, axis='channel', group=128, symmetric=False)
    """
    return parse_method(spec).compressor(role)
