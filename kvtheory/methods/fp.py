"""The ``fp`` family: no compression, fp16 storage (16 bits per element).

>>> FP()(torch.ones(1, 1, 1, 2)).tolist(), FP().bits_per_element(64)
([[[[1.0, 1.0]]]], 16.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from .._checks import check_int
from .compressor import Compressor
from .registry import Family, add_family
from .storage import FP_BITS

__all__ = ["FP", "Identity", "FPFamily"]


@dataclass(frozen=True)
class FP(Compressor):
    """No compression: fp16 storage, 16 bits per element; ``x_hat`` is a copy of ``x``.

    >>> FP().bits_per_element(64)
    16.0
    """

    def _apply(self, x):
        return x.clone()

    def storage(self, d, tokens=None):
        check_int("d", d, 1)
        return Fraction(FP_BITS), Fraction(0), Fraction(0)


Identity = FP


class FPFamily(Family):
    key = kind = "fp"
    plot_family = "fp"
    legend = "fp16"
    grammar = "fp"
    shape, marker, options, requires = "fp", None, frozenset(), None

    def head(self, spec):
        return "fp"

    def compressor(self, spec, role):
        return FP()

    def sweep(self, d):
        return ["fp"]


add_family(FPFamily())
