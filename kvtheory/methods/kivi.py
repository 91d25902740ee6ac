r"""The ``kivi`` family (``int{b}-kivi[-g{n}][-sym]``): keys quantized per channel in groups of
n consecutive tokens (default 128), values per token (Liu et al. 2024, KIVI, arXiv 2402.02750).

Key storage :math:`b + 32\lceil T/G\rceil/T` (:math:`b + 32/G` when G divides T or T is
unknown); values :math:`b + 32/d`. Key groups span tokens, so a padding mask matters: the
groups run over the real tokens of each sequence only (:class:`~.uniform.Quantize`).

>>> parse_method("int4-kivi").compressor("k"), parse_method("int4-kivi").compressor("v")
(Quantize(bits=4, axis='channel', group=128, symmetric=False), Quantize(bits=4, axis='token', group=None, symmetric=False))
"""

from __future__ import annotations

from .registry import Family, add_family, parse_method  # noqa: F401 (doctest)
from .storage import KIVI_GROUP
from .uniform import Quantize

__all__ = ["KiviFamily"]


class KiviFamily(Family):
    key = kind = "kivi"
    plot_family = "kivi"
    legend = "INT KIVI"
    grammar = "int{b}-kivi[-g{n}][-sym]"
    shape, marker, options, requires = "int", "kivi", frozenset({"kivi", "group", "sym"}), None

    def head(self, spec):
        return f"int{spec.bits}-kivi"

    def compressor(self, spec, role):
        if role == "k":
            return Quantize(spec.bits, "channel", spec.group or KIVI_GROUP, spec.symmetric)
        return Quantize(spec.bits, "token", None, spec.symmetric)

    def series_label(self, spec):
        return "INT-b KIVI"

    def tick(self, spec):
        return f"{str(spec).split('-')[0]}\nKIVI"

    def sweep(self, d):
        return [f"int{b}-kivi" for b in range(1, 17)]


add_family(KiviFamily())
