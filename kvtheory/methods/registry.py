r"""The method registry: a method spec string is parsed once into a :class:`Method` object.

A :class:`Method` (a frozen, hashable spec) knows its :class:`Family`, its canonical string
(``str(spec)``), how to build its compressor for keys or values (:meth:`Method.compressor`), its
storage split into payload, scales and basis (:meth:`Method.storage`, the one implementation
the ledger reads), its figure labels and how to validate itself against a head dimension.

Families register here: the built-in ones (fp, int, kivi, rotated, rank, hybrid; one module
each in :mod:`kvtheory.methods`) and user families added with :func:`register_method`, or by a
separate package through an entry point in the group ``kvtheory.methods`` (loaded lazily, the
first time a spec string is not a built-in one). :func:`parse_method` caches its parses.

>>> parse_method("int4-kivi").family.key, parse_method("int4-kivi") is parse_method("int4-kivi")
('kivi', True)
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
from dataclasses import dataclass
from fractions import Fraction
from collections.abc import Callable
from typing import Any, ClassVar

from .._checks import check_choice, check_int
from ..errors import KVTheoryError, bad_argument
from .compressor import Compressor

__all__ = ["Family", "Method", "RegisteredSpec", "RegisteredFamily", "FAMILIES", "add_family",
           "register_method", "unregister_method", "registered_methods", "parse_method",
           "grammar", "load_plugins", "check_methods", "ENTRY_POINT_GROUP", "ROLES"]

ENTRY_POINT_GROUP = "kvtheory.methods"
#: the parser of the built-in grammar, installed by :mod:`.spec` when it is imported (spec
#: builds on this module's types, so this module does not import it)
_BUILTIN_PARSER: list[Callable[[str], Any]] = []


def install_builtin_parser(parse: Callable[[str], Any]) -> None:
    """Set the parser of the built-in grammar (``str -> Method | None``)."""
    _BUILTIN_PARSER[:] = [parse]
    _parse_str.cache_clear()


def _parse_builtin(text: str) -> Any:
    # importing any kvtheory.methods module runs the package __init__, which imports spec
    return _BUILTIN_PARSER[0](text)
ROLES = ("k", "v")
#: registry key -> family (built-in families first, in grammar order)
FAMILIES: dict[str, "Family"] = {}
_PLUGINS: dict[str, Any] = {"loaded": False, "errors": []}


class Family:
    """One method family: how its specs build compressors, and how figures name them."""

    #: registry key; ``plot_family`` picks the colour; ``legend`` names the family in a legend
    key: ClassVar[str] = ""
    plot_family: ClassVar[str] = "other"
    legend: ClassVar[str] = ""
    #: the family's part of the grammar message
    grammar: ClassVar[str] = ""
    builtin: ClassVar[bool] = True

    def compressor(self, spec: "Method", role: str) -> Compressor:  # pragma: no cover
        raise NotImplementedError

    def storage(self, spec: "Method", d: int, tokens: int | None, role: str
                ) -> tuple[Fraction, Fraction, Fraction]:
        """(payload, scales, basis) bits per element: the compressor's own :meth:`storage`."""
        d = check_int("d", d, 1)
        tokens = None if tokens is None else check_int("tokens", tokens, 1)
        return self.compressor(spec, role).storage(d, tokens)

    def series(self, spec: "Method") -> tuple[str, str]:
        """(colour family, line) of a spec in a figure with one line per family."""
        return self.plot_family, self.plot_family

    def series_label(self, spec: "Method") -> str:
        return self.legend

    def tick(self, spec: "Method") -> str:
        return str(spec).split("-")[0]

    def validate(self, spec: "Method", d: int, role: str) -> None:
        self.storage(spec, d, None, role)

    def sweep(self, d: int) -> list[str]:
        """Specs in increasing storage for :func:`kvtheory.ledger.matched` (``[]``: none)."""
        return []


def add_family(family: Family) -> Family:
    """Register a family under ``family.key`` (refused when the key is taken)."""
    if family.key in FAMILIES:
        raise bad_argument("name", family.key, "a method family name that is not registered yet")
    FAMILIES[family.key] = family
    _parse_str.cache_clear()
    return family


class Method:
    """A parsed method spec. Subclasses are frozen dataclasses; ``family_key`` names the family."""

    #: the basis name, for methods that work in a fitted basis (None otherwise)
    basis: str | None = None

    @property
    def family_key(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def family(self) -> Family:
        return FAMILIES[self.family_key]

    def compressor(self, role: str = "k") -> Compressor:
        """The compressor of this method for keys (``"k"``) or values (``"v"``)."""
        return self.family.compressor(self, check_choice("role", role, ROLES))

    def storage(self, d: int, tokens: int | None = None, role: str = "k"
                ) -> tuple[Fraction, Fraction, Fraction]:
        """Exact (payload, scales, basis) bits per element at head dimension ``d``, a stored
        basis amortised over ``tokens`` (None: not counted)."""
        return self.family.storage(self, d, tokens, check_choice("role", role, ROLES))

    def bits_per_element(self, d: int, tokens: int | None = None, role: str = "k") -> float:
        return float(sum(self.storage(d, tokens, role)))

    @property
    def plot_family(self) -> str:
        """The colour family of figures: fp, quant, kivi, rank, hybrid, or the family's own."""
        return self.family.plot_family

    @property
    def series(self) -> tuple[str, str]:
        return self.family.series(self)

    @property
    def label(self) -> str:
        """The legend label of this spec's line (e.g. ``INT-b per token``)."""
        return self.family.series_label(self)

    @property
    def tick(self) -> str:
        """A short tick label (e.g. ``int4\\nKIVI``)."""
        return self.family.tick(self)

    def validate(self, d: int, roles: tuple[str, ...] = ROLES) -> "Method":
        """``self`` if it can run at head dimension ``d`` for every role, else a named
        :class:`KVTheoryError` (e.g. ``rank65-pca`` at d = 64)."""
        d = check_int("d", d, 1)
        for role in roles:
            try:
                self.family.validate(self, d, check_choice("role", role, ROLES))
            except KVTheoryError as exc:
                who = "keys" if role == "k" else "values"
                raise KVTheoryError(f"method: got {str(self)!r} for the {who} of a model with "
                                    f"head dimension d={d}; expected a method that fits it "
                                    f"({exc})") from None
        return self


# ------------------------------------------------------------------ user families
@dataclass(frozen=True)
class RegisteredSpec(Method):
    """A spec of a family added with :func:`register_method`: its name and integer parameters."""

    name: str
    params: tuple[tuple[str, int], ...]

    @property
    def family_key(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.family.pattern.format(**dict(self.params))


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class RegisteredFamily(Family):
    """A family added with :func:`register_method`."""

    builtin = False

    def __init__(self, pattern, factory, name, label, plot_family, validate, sweep):
        self.pattern, self.factory, self.key = pattern, factory, name
        self.legend, self.plot_family, self.grammar = label, plot_family, pattern
        self._validate, self._sweep = validate, sweep
        self._built: dict[tuple, Compressor] = {}  # one compressor per (spec, role): a plan matches it
        parts = re.split(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", pattern)
        self.names = parts[1::2]
        self.regex = re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[0-9]+)"
                                        for i, p in enumerate(parts)))

    def parse(self, text: str) -> RegisteredSpec | None:
        m = self.regex.fullmatch(text)
        if m is None:
            return None
        return RegisteredSpec(self.key, tuple((n, int(m.group(n))) for n in self.names))

    def compressor(self, spec, role):
        key = (spec.params, role)
        if key in self._built:
            return self._built[key]
        params = dict(spec.params)
        comp = self.factory(**params, role=role) if _accepts(self.factory, "role") else self.factory(**params)
        if not isinstance(comp, Compressor):
            raise KVTheoryError(f"method: got {comp!r:.80} from the factory of {str(spec)!r}; "
                                "expected a kvtheory Compressor (Compressor.from_fn wraps a function)")
        self._built[key] = comp
        return comp

    def series(self, spec):
        return self.plot_family, self.key

    def tick(self, spec):
        return str(spec)

    def validate(self, spec, d, role):
        if self._validate is not None:
            self._validate(d, **dict(spec.params))
        super().validate(spec, d, role)

    def sweep(self, d):
        if self._sweep is not None:
            return [str(parse_method(s)) for s in self._sweep(d)]
        if len(self.names) != 1:
            return []
        out = []
        for v in range(1, d + 1):
            spec = parse_method(self.pattern.format(**{self.names[0]: v}))
            try:
                spec.validate(d)
            except KVTheoryError:
                continue
            out.append(str(spec))
        return out


def register_method(
    pattern: str, factory: Callable[..., Compressor], *, name: str | None = None,
    label: str | None = None, plot_family: str = "other",
    validate: Callable[..., None] | None = None, sweep: Callable[[int], list[str]] | None = None,
    replace: bool = False,
) -> RegisteredFamily:
    r"""Add a method family to the spec grammar.

    ``pattern``: the spec with integer parameters in braces, e.g. ``"topk{n}"``;
    ``factory(**params)`` (also given ``role="k"|"v"`` when it takes a ``role`` argument)
    returns a :class:`Compressor` (:meth:`Compressor.from_fn` wraps a function).
    ``name`` (default: the pattern without its parameters) names the family; ``label`` its
    legend; ``validate(d, **params)`` raises :class:`KVTheoryError` for a head dimension the
    spec cannot run at; ``sweep(d)`` lists specs in increasing storage for
    :func:`kvtheory.ledger.matched` (default, for one parameter: its values 1..d that
    validate). The spec must not be a built-in one.

    >>> import torch
    >>> fam = register_method("halfp{n}", lambda n: Compressor.from_fn(
    ...     lambda x: x.half().to(x.dtype), bits_per_element=16), replace=True)
    >>> str(parse_method("halfp03")), parse_method("halfp3").bits_per_element(64)
    ('halfp3', 16.0)
    >>> unregister_method("halfp")
    """
    if not isinstance(pattern, str) or not re.fullmatch(r"[a-z](?:[a-z0-9_-]|\{[A-Za-z_]\w*\})*", pattern):
        raise bad_argument("pattern", pattern, "a spec pattern of lowercase letters, digits, '-' "
                           "and integer parameters in braces, e.g. 'topk{n}'")
    if not callable(factory):
        raise bad_argument("factory", factory, "a function (**params) -> Compressor")
    key = name if name is not None else re.sub(r"\{\w+\}", "", pattern).strip("-_") or pattern
    if not isinstance(key, str) or not key:
        raise bad_argument("name", name, "a non-empty family name")
    fam = RegisteredFamily(pattern, factory, key, label or key, plot_family, validate, sweep)
    example = re.sub(r"\{\w+\}", "1", pattern)
    try:
        clash = _parse_builtin(example) is not None
    except KVTheoryError:
        clash = True
    if clash or key in {f.key for f in FAMILIES.values() if f.builtin}:
        raise bad_argument("pattern", pattern, "a spec outside the built-in grammar "
                           "(fp, int{b}..., rank{r}...)")
    if key in FAMILIES and not replace:
        raise bad_argument("name", key, "a method family name that is not registered yet "
                           "(replace=True replaces it)")
    for other in FAMILIES.values():
        if isinstance(other, RegisteredFamily) and other.key != key and (
                other.regex.fullmatch(example) or fam.regex.fullmatch(re.sub(r"\{\w+\}", "1", other.pattern))):
            raise bad_argument("pattern", pattern, f"a spec that the registered {other.pattern!r} "
                               "does not also match")
    FAMILIES[key] = fam
    _parse_str.cache_clear()
    return fam


def unregister_method(name: str) -> None:
    """Remove a family added with :func:`register_method`."""
    fam = FAMILIES.get(name)
    if not isinstance(fam, RegisteredFamily):
        raise bad_argument("name", name, "the name of a method family added with register_method")
    del FAMILIES[name]
    _parse_str.cache_clear()


def load_plugins(force: bool = False) -> list[str]:
    """Load the entry points of the group ``kvtheory.methods`` (once; ``force`` reloads): each
    names a function called with no arguments that registers methods (or a module that does
    so on import). Returns the loaded entry point names; failures are kept for the messages."""
    if _PLUGINS["loaded"] and not force:
        return []
    _PLUGINS["loaded"], _PLUGINS["errors"] = True, []
    done = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not inspect.ismodule(obj):
                obj()
            done.append(ep.name)
        except Exception as exc:  # a broken plugin must not break the built-in methods
            _PLUGINS["errors"].append(f"{ep.name} ({ep.value}): {type(exc).__name__}: {exc}")
    _parse_str.cache_clear()
    return done


def registered_methods() -> dict[str, str]:
    """``{family name: pattern}`` of the user families (plugins loaded first)."""
    load_plugins()
    return {k: f.pattern for k, f in FAMILIES.items() if isinstance(f, RegisteredFamily)}


def grammar() -> str:
    """The grammar message: the built-in grammar and the registered patterns."""
    builtin = " | ".join(f.grammar for f in FAMILIES.values() if f.builtin and f.grammar)
    text = (f"a method spec: {builtin}, with b in 1..16, r in 1..d and basis one of identity, pca, "
            "pcac, random, random{seed}, hadamard, qaware")
    extra = [f.pattern for f in FAMILIES.values() if isinstance(f, RegisteredFamily)]
    if extra:
        text += f", or a registered method: {', '.join(extra)}"
    if _PLUGINS["errors"]:
        text += f" (plugins that failed to load: {'; '.join(_PLUGINS['errors'])})"
    return text


@functools.lru_cache(maxsize=4096)
def _parse_str(text: str) -> Method:
    spec = _parse_builtin(text)
    if spec is not None:
        return spec
    for _ in range(2):
        for fam in FAMILIES.values():
            if isinstance(fam, RegisteredFamily):
                found = fam.parse(text)
                if found is not None:
                    return found
        if _PLUGINS["loaded"]:
            break
        load_plugins()
    raise bad_argument("spec", text, grammar())


def parse_method(spec: str | Method) -> Method:
    """Parse a method spec string once (cached) into its :class:`Method`; a Method is returned
    as it is. Options after the head may come in any order, ``str()`` writes them as basis,
    group, sym.

    >>> parse_method("int4-g32")
    MethodSpec(kind='int', bits=4, rank=None, basis=None, group=32, symmetric=False)
    >>> str(parse_method("rank8x4-random3"))
    'rank8x4-random3'
    """
    if isinstance(spec, Method):
        return spec
    if not isinstance(spec, str):
        raise bad_argument("spec", spec, grammar())
    return _parse_str(spec)


def check_methods(methods: Any, d: int, targets: Any = ("kv",)) -> list[Method]:
    """Parse every method and validate it against head dimension ``d`` for the roles its
    ``targets`` (k, v, kv) compress, before any computation; the parsed methods in order.

    >>> [str(m) for m in check_methods(["fp", "rank16-pca"], 64)]
    ['fp', 'rank16-pca']
    >>> check_methods(["rank65-pca"], 64)
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: method: got 'rank65-pca' for the keys of a model with head dimension d=64; expected a method that fits it (rank: got 65; expected an integer in 1..64)
    """
    if isinstance(methods, (str, Method)):
        methods = [methods]
    if isinstance(targets, str):
        targets = [targets]
    roles = tuple(r for r in ROLES if any(r in check_choice("targets", t, ("k", "v", "kv"))
                                          for t in targets))
    return [parse_method(m).validate(d, roles) for m in methods]
