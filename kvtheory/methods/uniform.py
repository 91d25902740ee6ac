r"""The ``int`` family: uniform ``b``-bit quantization per token (``int{b}[-g{n}][-sym]``), and
the :class:`Quantize` compressor it shares with KIVI.

Storage :math:`b + 16(1+z)/g` bits per element (z = 0 when symmetric), g channels per group
(all d by default).

>>> parse_method("int4-g32").compressor()
Quantize(bits=4, axis='token', group=32, symmetric=False)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch  # noqa: F401 (doctests)
from .._checks import check_choice, check_int
from ..errors import bad_argument
from ..quantize import AXES, _quantize_checked, resolve_group
from .compressor import Compressor, on_real_tokens
from .registry import Family, add_family, parse_method
from .spec import check_options
from .storage import kivi_group, quant

__all__ = ["Quantize", "IntFamily"]


@dataclass(frozen=True)
class Quantize(Compressor):
    r"""Uniform ``bits``-bit quantization in groups (:func:`kvtheory.quantize.quantize`):
    ``axis="token"`` groups ``group`` channels of a token (None: all d); ``axis="channel"``
    groups ``group`` tokens of a channel (None: all tokens; KIVI keys use 128), over the real
    tokens only when a ``mask`` hides padding. Storage :math:`b + 16(1+z)/g` bits per element.

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
        check_options(self.bits, self.group, self.symmetric)

    @property
    def token_grouped(self) -> bool:  # type: ignore[override]
        return self.axis == "channel"

    def _apply(self, x, *mask):
        return on_real_tokens(
            lambda t: _quantize_checked(t, self.bits, self.axis, self.group, self.symmetric),
            x, mask[0] if mask else None)

    def storage(self, d, tokens=None):
        d = check_int("d", d, 1)
        zp = not self.symmetric
        if self.axis == "token":
            g = resolve_group("token", self.group, 1, d)
        elif tokens is not None:  # ceil(T / G) groups per channel, the last one maybe partial
            t = check_int("tokens", tokens, 1)
            g = kivi_group(self.group or t, t)
        elif self.group is None:
            raise bad_argument("tokens", None, "the number of tokens: one group spans all of them")
        else:
            g = self.group
        return (*quant(self.bits, g, zero_point=zp), Fraction(0))


class IntFamily(Family):
    key = kind = "int"
    plot_family = "quant"
    legend = "INT per token"
    grammar = "int{b}[-g{n}][-sym]"
    shape, marker, options, requires = "int", None, frozenset({"group", "sym"}), None

    def head(self, spec):
        return f"int{spec.bits}"

    def compressor(self, spec, role):
        return Quantize(spec.bits, "token", spec.group, spec.symmetric)

    def series_label(self, spec):
        return "INT-b per token"

    def sweep(self, d):
        return [f"int{b}" for b in range(1, 17)]


add_family(IntFamily())
