r"""The built-in method specs: :class:`MethodSpec` and the grammar of its strings.

Method specs, with ``[...]`` optional::

    fp                           no compression
    int{b}[-g{n}][-sym]          per token, groups of n channels (default: all d), asymmetric
    int{b}-kivi[-g{n}][-sym]     keys per channel in groups of n tokens (default 128); values per token
    int{b}-{basis}[-g{n}][-sym]  quantized in a rotated basis
    rank{r}-{basis}              rank r, fp16 coefficients
    rank{r}x{b}-{basis}[-g{n}][-sym]   rank r, then b-bit coefficients per token (groups of n of r)
    basis: identity, pca, pcac (centered PCA), random, random{seed}, hadamard, qaware

Each built-in family (``fp``, ``int``, ``kivi``, ``rotated``, ``rank``, ``hybrid``, one module
each) states its head (``fp``, ``int{b}``, ``rank{r}``, ``rank{r}x{b}``), the option that selects
it among the families of that head, and the options it allows; the parser below only splits
the string and asks the families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._checks import check_choice, check_int
from ..bases import basis_from_name
from ..errors import bad_argument
from .registry import FAMILIES, Method, grammar, install_builtin_parser

__all__ = ["MethodSpec", "parse_builtin", "KINDS", "check_options"]

#: ``MethodSpec.kind`` values (a rotated quantizer is kind ``int`` with a basis)
KINDS = ("fp", "int", "kivi", "rank", "hybrid")

_HEAD = re.compile(r"fp|int([0-9]+)|rank([0-9]+)(?:x([0-9]+))?")  # ASCII digits only
_BASIS = re.compile(r"identity|pcac?|random[0-9]*|hadamard|qaware")


def check_options(bits: int, group: int | None, symmetric: bool) -> None:
    """Check the quantization options ``bits`` (1..16; 2..16 symmetric), ``group`` and ``symmetric``."""
    from .._checks import check_bits

    check_bits(bits)
    if group is not None:
        check_int("group", group, 1)
    if not isinstance(symmetric, bool):
        raise bad_argument("symmetric", symmetric, "True or False")
    if symmetric and bits < 2:
        raise bad_argument("bits", bits, "an integer in 2..16 for symmetric quantization")


@dataclass(frozen=True)
class MethodSpec(Method):
    """A parsed built-in method spec; ``str(spec)`` gives the canonical string back.

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
            check_options(self.bits, self.group, self.symmetric)
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

    @property
    def family_key(self) -> str:
        return "rotated" if self.kind == "int" and self.basis is not None else self.kind

    def __str__(self) -> str:
        return self.family.head(self) + (f"-{self.basis}" if self.basis else "") + (
            f"-g{self.group}" if self.group is not None else "") + ("-sym" if self.symmetric else "")


def parse_builtin(text: str) -> MethodSpec | None:
    """The built-in spec ``text`` names, or None when it is not in the built-in grammar
    (a value out of range, e.g. ``int0``, raises :class:`KVTheoryError`).

    >>> parse_builtin("int4-kivi"), parse_builtin("topk8")
    (MethodSpec(kind='kivi', bits=4, rank=None, basis=None, group=None, symmetric=False), None)
    """
    head, *opts = text.split("-")
    m = _HEAD.fullmatch(head)
    if m is None:
        return None
    found: dict[str, str | int] = {}
    for opt in opts:
        if opt in ("sym", "kivi"):
            key, value = opt, opt
        elif re.fullmatch(r"g[0-9]+", opt):
            key, value = "group", int(opt[1:])
        elif _BASIS.fullmatch(opt):
            key, value = "basis", opt
        else:
            return None
        if key in found:
            raise bad_argument("spec", text, grammar())  # repeated option
        found[key] = value
    int_bits, rank, hybrid_bits = m.groups()
    shape = ("fp" if head == "fp" else "int" if int_bits is not None
             else "rank" if hybrid_bits is None else "rankx")
    candidates = [f for f in FAMILIES.values() if f.builtin and getattr(f, "shape", None) == shape]
    chosen = [f for f in candidates if f.marker in found] or [f for f in candidates if f.marker is None]
    if len(chosen) != 1 or not found.keys() <= chosen[0].options or (
            chosen[0].requires and chosen[0].requires not in found):
        raise bad_argument("spec", text, grammar())
    bits = int_bits or hybrid_bits
    return MethodSpec(chosen[0].kind, bits=None if bits is None else int(bits),
                      rank=None if rank is None else int(rank), basis=found.get("basis"),
                      group=found.get("group"), symmetric="sym" in found)


install_builtin_parser(parse_builtin)
