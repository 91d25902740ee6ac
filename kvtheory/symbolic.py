r"""The theory's four derivations, proved with sympy and checked against the torch code.

Each :class:`Derivation` holds a ``statement`` (text), its sympy form ``expr``, the derivation
``steps`` as ``(text, sympy expression)`` pairs, ``verify()`` (every derived expression minus
its claimed closed form simplifies to exactly zero) and ``numeric_check()`` (largest absolute
difference between the sympy expression, lambdified, and the torch implementation at random
points). The derivations:

(a) ``kl_hessian_is_fisher``: :math:`\nabla^2_\delta\,\mathrm{KL}(\mathrm{softmax}(s)\,\|\,
    \mathrm{softmax}(s+\delta))|_{\delta=0} = \mathrm{diag}(p) - pp^\top` (n = 2, 3, 4 and
    the general entry), against :func:`kvtheory.fisher.softmax_fisher` and ``softmax_kl``;
(b) ``uniform_error_variance``: :math:`\mathbb E[\varepsilon^2] = \Delta^2/12` and the
    expected Fisher damage of independent errors, against
    :func:`kvtheory.bounds.expected_quant_damage`;
(c) ``damage_ratio``: :math:`3\cdot 2^{2b}` and the exact finite-b variant, against
    :func:`kvtheory.bounds.headline_ratio` and :func:`kvtheory.bounds.exact_ratio`;
(d) ``matched_storage``: equal bits per element for rank r and b-bit quantization, against
    :mod:`kvtheory.ledger`.

>>> [d.name for d in derivations()]
['kl_hessian_is_fisher', 'uniform_error_variance', 'damage_ratio', 'matched_storage']
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy as sp
import torch

from ._checks import check_int

__all__ = ["Derivation", "derivations", "verify_all", "verification_row"]

Step = tuple[str, Any]


@dataclass(frozen=True)
class Derivation:
    """One derivation: statement, steps, a symbolic proof and a numeric cross-check."""

    name: str
    statement: str
    expr: Any  # the statement as sympy relations (Eq, or a tuple of Eq)
    steps: tuple[Step, ...]
    #: (derived, claimed) pairs; verify() proves derived - claimed == 0 for each
    identities: tuple[tuple[Any, Any], ...] = field(repr=False)
    numeric: Callable[[int, int], float] = field(repr=False, compare=False)

    def verify(self) -> bool:
        """True iff every derived expression equals its claimed closed form symbolically."""
        for derived, claimed in self.identities:
            if _is_matrix(derived):
                parts = list(sp.Matrix(derived) - sp.Matrix(claimed))
            else:
                parts = [derived - claimed]
            if not all(_is_zero(part) for part in parts):
                return False
        return True

    def numeric_check(self, n_points: int = 20, seed: int = 0) -> float:
        """Max |sympy (lambdified) - torch| over ``n_points`` random points (float64)."""
        return float(self.numeric(check_int("n_points", n_points, 1), check_int("seed", seed, 0)))

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.statement}"]
        lines += [f"  {i}. {text}: {expr}" for i, (text, expr) in enumerate(self.steps, 1)]
        return "\n".join(lines)


def _is_matrix(x: Any) -> bool:
    return isinstance(x, sp.MatrixBase)


def _is_zero(expr: Any) -> bool:
    """Exact zero test: rational normal form first (fast), then ``simplify``."""
    return sp.cancel(sp.together(expr)) == 0 or sp.simplify(expr) == 0


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64)


# --------------------------------------------------------------------------- (a) Hessian = F
def _softmax(v: list) -> list:
    z = sum(sp.exp(x) for x in v)
    return [sp.exp(x) / z for x in v]


@functools.lru_cache(maxsize=None)
def _hessian_case(n: int) -> tuple[tuple, tuple, Any, Any, Any]:
    """(s, delta, KL(s, delta), Hessian at 0, F) for n explicit tokens."""
    s = sp.symbols(f"s1:{n + 1}", real=True)
    dl = sp.symbols(f"delta1:{n + 1}", real=True)
    p, q = _softmax(list(s)), _softmax([a + b for a, b in zip(s, dl)])
    kl = sum(pi * sp.log(pi / qi) for pi, qi in zip(p, q))
    hess = sp.hessian(kl, dl).subs({d: 0 for d in dl})
    fisher = sp.Matrix(n, n, lambda i, j: (p[i] if i == j else 0) - p[i] * p[j])
    return s, dl, kl, sp.ImmutableMatrix(hess), sp.ImmutableMatrix(fisher)


def _kl_hessian() -> Derivation:
    i, j, k, n, m = sp.symbols("i j k n m", integer=True, positive=True)
    p, dl = sp.IndexedBase("p", positive=True), sp.IndexedBase("delta", real=True)
    pk, z = sp.symbols("p_k Z", positive=True)
    dk = sp.Symbol("delta_k", real=True)
    term = sp.log(pk / (pk * sp.exp(dk) / z))  # log(p_k / q_k), q_k = p_k e^{delta_k} / Z
    zsum = sp.Sum(p[k] * sp.exp(dl[k]), (k, 1, n))
    kl = sp.log(zsum) - sp.Sum(p[k] * dl[k], (k, 1, n))
    h = sp.diff(kl, dl[i], dl[j])
    h0 = h.replace(lambda e: isinstance(e, sp.exp), lambda e: sp.Integer(1))  # delta = 0
    h0 = h0.subs(sp.Sum(p[k], (k, 1, n)), 1)  # sum_k p_k = 1
    h0 = h0.doit().subs(n, i + j + m)  # indices in range: 1 <= i, j <= n
    entry = p[i] * sp.KroneckerDelta(i, j) - p[i] * p[j]
    steps: list[Step] = [
        ("KL = sum_k p_k log(p_k/q_k), q_k = p_k e^{delta_k}/Z, Z = sum_m p_m e^{delta_m}",
         sp.Eq(sp.Symbol("KL"), sp.Sum(p[k] * sp.log(p[k] / sp.Symbol("q_k")), (k, 1, n)))),
        ("each log-ratio is log Z - delta_k", sp.Eq(term, sp.expand_log(term, force=True))),
        ("so, with sum_k p_k = 1, KL(delta) = log Z - sum_k p_k delta_k",
         sp.Eq(sp.Symbol("KL"), kl)),
        ("differentiate in delta_i and delta_j", h),
        ("at delta = 0 (Z = 1), for 1 <= i, j <= n", sp.Eq(sp.Symbol("H_ij"), h0)),
    ]
    identities: list[tuple[Any, Any]] = [(term, sp.log(z) - dk), (h0, entry)]
    for size in (2, 3, 4):
        _, _, _, hess, fisher = _hessian_case(size)
        steps.append((f"n = {size}: Hessian of the explicit KL at delta = 0", hess))
        identities.append((hess, fisher))
    return Derivation(
        name="kl_hessian_is_fisher",
        statement="The Hessian in delta of KL(softmax(s) || softmax(s + delta)) at delta = 0 is "
        "F = diag(p) - p p^T, entrywise d^2 KL/d delta_i d delta_j = p_i [i = j] - p_i p_j "
        "(proved for n = 2, 3, 4 explicitly and for general n)",
        expr=sp.Eq(sp.Symbol("H_ij"), entry),
        steps=tuple(steps),
        identities=tuple(identities),
        numeric=_numeric_hessian,
    )


def _numeric_hessian(n_points: int, seed: int) -> float:
    from .fisher import softmax_fisher, softmax_kl

    rng, err = _rng(seed), 0.0
    for size in (2, 3, 4):
        s, dl, kl, hess, _ = _hessian_case(size)
        f_hess = sp.lambdify([s], hess, "numpy")
        f_kl = sp.lambdify([s, dl], kl, "numpy")
        for _ in range(n_points):
            sv, dv = rng.normal(size=size), rng.normal(scale=0.5, size=size)
            fisher = softmax_fisher(torch.softmax(_t(sv), -1))
            err = max(err, float((fisher - _t(f_hess(sv))).abs().max()))
            err = max(err, abs(float(softmax_kl(_t(sv), _t(dv))) - float(f_kl(sv, dv))))
    i, j = sp.symbols("i j", integer=True)
    p_i, p_j = sp.symbols("p_i p_j", positive=True)
    f_entry = sp.lambdify([p_i, p_j, i, j], p_i * sp.KroneckerDelta(i, j) - p_i * p_j, "numpy")
    for _ in range(n_points):
        size = int(rng.integers(2, 9))
        p = torch.softmax(_t(rng.normal(size=size) * 2), -1)
        fisher = softmax_fisher(p)
        for a in range(size):
            for b in range(size):
                entry = float(f_entry(p[a].item(), p[b].item(), a, b))
                err = max(err, abs(float(fisher[a, b]) - entry))
    return err


# ------------------------------------------------------------------- (b) E[eps^2] = Delta^2/12
_DELTA = sp.Symbol("Delta", positive=True)
_EPS = sp.Symbol("epsilon", real=True)
_N_TOKENS_B = 4


def _moment(k: int, step: Any) -> Any:
    """E[eps^k] for eps ~ U[-step/2, step/2], by integration against the density 1/step."""
    return sp.integrate(_EPS**k / step, (_EPS, -step / 2, step / 2))


@functools.lru_cache(maxsize=None)
def _expected_damage_case() -> tuple[Any, tuple, Any, Any]:
    """(alpha, p, E[D] by expanding the moments, sigma^2) for n = 4 independent errors."""
    n = _N_TOKENS_B
    alpha = sp.Symbol("alpha", real=True)
    p = sp.symbols(f"p1:{n + 1}", positive=True)
    eps = sp.symbols(f"epsilon1:{n + 1}", real=True)
    delta = [alpha * e for e in eps]
    damage = sp.expand((sum(pi * d**2 for pi, d in zip(p, delta))
                        - sum(pi * d for pi, d in zip(p, delta)) ** 2) / 2)
    mom = {1: _moment(1, _DELTA), 2: _moment(2, _DELTA)}
    expected = sp.Integer(0)
    for powers, coef in sp.Poly(damage, *eps).terms():  # independence: E[prod] = prod E
        expected += coef * sp.Mul(*(mom[k] if k else 1 for k in powers))
    return alpha, p, expected, mom[2]


def _uniform_variance() -> Derivation:
    alpha, p, expected, var = _expected_damage_case()
    sigma2 = sp.Symbol("sigma^2", positive=True)
    claimed = alpha**2 * _DELTA**2 / 24 * (sum(p) - sum(pi**2 for pi in p))
    steps: tuple[Step, ...] = (
        ("epsilon ~ U[-Delta/2, Delta/2] has density 1/Delta", sp.Integer(1) / _DELTA),
        ("E[epsilon] = integral of epsilon/Delta",
         sp.Eq(sp.Symbol("E[epsilon]"), _moment(1, _DELTA))),
        ("E[epsilon^2] = integral of epsilon^2/Delta", sp.Eq(sigma2, var)),
        (f"independent errors, delta_j = alpha eps_j, n = {_N_TOKENS_B}: "
         "E[1/2 (sum p delta^2 - (sum p delta)^2)]", sp.factor(expected)),
        ("= 1/2 alpha^2 sigma^2 (sum p - sum p^2) = 1/2 alpha^2 sigma^2 (1 - |p|^2)", claimed),
    )
    return Derivation(
        name="uniform_error_variance",
        statement="For epsilon uniform on [-Delta/2, Delta/2], E[epsilon] = 0 and E[epsilon^2] = "
        "Delta^2/12; independent errors delta_j = alpha epsilon_j give expected Fisher damage "
        "1/2 alpha^2 (Delta^2/12)(1 - |p|^2)",
        expr=(sp.Eq(sigma2, _DELTA**2 / 12), sp.Eq(sp.Symbol("E[D]"), claimed)),
        steps=steps,
        identities=((_moment(1, _DELTA), sp.Integer(0)), (var, _DELTA**2 / 12),
                    (expected, claimed)),
        numeric=_numeric_uniform,
    )


def _numeric_uniform(n_points: int, seed: int) -> float:
    from .bounds import expected_quant_damage

    alpha_s, p_s, expected, var = _expected_damage_case()
    f_expected = sp.lambdify([alpha_s, p_s, _DELTA], expected, "numpy")
    f_var = sp.lambdify([_DELTA], var, "numpy")
    rng, err, n = _rng(seed), 0.0, _N_TOKENS_B
    for _ in range(n_points):
        d, bits = int(rng.integers(2, 17)), int(rng.integers(1, 9))
        q, k, u = rng.normal(size=(1, d)), rng.normal(size=(n, d)), rng.normal(size=d)
        u = u / np.linalg.norm(u)
        logits = k @ q[0] / math.sqrt(d)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        c = k @ u
        step = (c.max() - c.min()) / (2**bits - 1)
        ours = float(expected_quant_damage(_t(q), _t(k), _t(u), bits)[0])
        err = max(err, abs(ours - float(f_expected(q[0] @ u / math.sqrt(d), p, step))))
        err = max(err, abs(float(f_var(step)) - step**2 / 12))
    return err


# ------------------------------------------------------------------- (c) the ratio 3 * 2^(2b)
_A = sp.Symbol("a", positive=True)
_B = sp.Symbol("b", positive=True, integer=True)
_N = sp.Symbol("n", positive=True, integer=True)


@functools.lru_cache(maxsize=None)
def _ratio_case() -> tuple[Any, Any, list[Step]]:
    """(headline ratio, exact ratio(b, n)) derived for c = +-a balanced, p uniform over n."""
    alpha = sp.Symbol("alpha", positive=True)
    m, j = sp.Symbol("m", positive=True, integer=True), sp.Symbol("j", integer=True)
    n2 = 2 * m  # n = 2m tokens: c_j = +a for m of them, -a for the other m, p_j = 1/n
    mean = sp.Sum(_A / n2, (j, 1, m)).doit() + sp.Sum(-_A / n2, (j, 1, m)).doit()
    second = 2 * sp.Sum(_A**2 / n2, (j, 1, m)).doit()
    var_c = sp.simplify(second - mean**2)
    d_proj = alpha**2 * var_c / 2  # removing u: delta = -alpha c
    p_sq = sp.Sum(1 / _N**2, (j, 1, _N)).doit()  # |p|^2 for uniform attention
    span = sp.Max(_A, -_A) - sp.Min(_A, -_A)

    def e_quant(step: Any) -> Any:  # derivation (b): E[D] = 1/2 alpha^2 E[eps^2] (1 - |p|^2)
        return alpha**2 * _moment(2, step) / 2 * (1 - p_sq)

    cells, levels = span / 2**_B, span / (2**_B - 1)
    headline = sp.simplify(sp.limit(d_proj / e_quant(cells), _N, sp.oo))
    exact = sp.simplify(d_proj / e_quant(levels))
    steps: list[Step] = [
        ("c_j = +a or -a (m each, n = 2m), p_j = 1/n: Var_p(c)", var_c),
        ("projection cost D_proj = 1/2 alpha^2 Var_p(c)", d_proj),
        ("|p|^2 = sum 1/n^2", p_sq),
        ("range c_max - c_min", span),
        ("2^b cells: Delta = 2a/2^b; E[D_quant] by (b)", sp.simplify(e_quant(cells))),
        ("headline: D_proj/E[D_quant] as n -> oo", headline),
        ("2^b levels incl. both ends: Delta = 2a/(2^b - 1); exact D_proj/E[D_quant]", exact),
    ]
    return headline, exact, steps


def _damage_ratio() -> Derivation:
    headline, exact, steps = _ratio_case()
    claimed_exact = 3 * (2**_B - 1) ** 2 * _N / (_N - 1)
    limit = sp.limit(exact, _N, sp.oo)
    steps = steps + [("exact ratio as n -> oo, = 3 4^b (1 - 2^-b)^2", limit)]
    return Derivation(
        name="damage_ratio",
        statement="Removing a coordinate c = +-a costs 1/2 alpha^2 a^2; quantizing it on [-a, a] "
        "with 2^b cells (Delta = 2a/2^b) costs 1/2 alpha^2 a^2/(3 4^b) as |p|^2 -> 0, so the "
        "ratio is 3 2^(2b); with the 2^b-level grid (Delta = 2a/(2^b - 1)) and uniform attention "
        "over n tokens the exact ratio (bounds.exact_ratio) is 3 (2^b - 1)^2 n/(n - 1)",
        expr=(sp.Eq(sp.Symbol("R_headline"), 3 * 2 ** (2 * _B)),
              sp.Eq(sp.Symbol("R_exact"), claimed_exact)),
        steps=tuple(steps),
        identities=((headline, 3 * 2 ** (2 * _B)), (exact, claimed_exact),
                    (limit, 3 * 4**_B * (1 - 2**-_B) ** 2)),
        numeric=_numeric_ratio,
    )


def _numeric_ratio(n_points: int, seed: int) -> float:
    from .bounds import exact_ratio, headline_ratio

    headline, exact, _ = _ratio_case()
    f_headline = sp.lambdify([_B], headline, "numpy")
    f_exact = sp.lambdify([_B, _N], exact, "numpy")
    err = max(abs(headline_ratio(b) - float(f_headline(b))) for b in range(1, 17))
    rng = _rng(seed)
    for _ in range(n_points):
        # keys with c = u.k = +-a and logits all equal (p uniform) although alpha != 0:
        # k_j = c_j u - (sqrt(d) alpha c_j / |q_perp|^2) q_perp cancels alpha c_j in q.k_j
        d, n, bits = int(rng.integers(2, 17)), 2 * int(rng.integers(1, 9)), int(rng.integers(1, 7))
        a = float(rng.uniform(0.1, 3.0))
        q, u = rng.normal(size=d), rng.normal(size=d)
        u /= np.linalg.norm(u)
        q_perp = q - (q @ u) * u
        alpha = q @ u / math.sqrt(d)
        c = a * rng.permutation(np.repeat([1.0, -1.0], n // 2))
        k = np.outer(c, u) - np.outer(math.sqrt(d) * alpha * c / (q_perp @ q_perp), q_perp)
        ours = float(exact_ratio(_t(q[None]), _t(k), _t(u), bits)[0])
        err = max(err, abs(ours - float(f_exact(bits, n))))
    return err


# --------------------------------------------------------------------- (d) matched storage
_D, _R, _G, _T = sp.symbols("d r g T", positive=True)


@functools.lru_cache(maxsize=None)
def _storage_case() -> tuple[dict[str, Any], list[Step]]:
    rank_bits = 16 * _R / _D  # r fp16 coefficients per d-element vector
    basis_bits = 16 * _D * _R / (_D * _T)  # d x r fp16 basis over d*T elements
    quant_g = _B + 2 * 16 / _G  # fp16 scale + fp16 zero-point per g elements
    r_plain = sp.solve(sp.Eq(rank_bits, _B), _R)[0]
    r_group = sp.solve(sp.Eq(rank_bits, quant_g), _R)[0]
    r_basis = sp.solve(sp.Eq(rank_bits + basis_bits, quant_g), _R)[0]
    out = dict(rank_bits=rank_bits, rank_bits_T=rank_bits + basis_bits, quant_g=quant_g,
               r_plain=r_plain, r_group=r_group, r_basis=r_basis)
    steps: list[Step] = [
        ("rank r, 16-bit coefficients: bits per element", rank_bits),
        ("b-bit quantization: bits per element", _B),
        ("equal storage 16 r/d = b", r_plain),
        ("fp16 scale and zero-point per group of g: b + 32/g", quant_g),
        ("16 r/d = b + 32/g", r_group),
        ("d x r fp16 basis amortised over T tokens: 16 r/T per element", basis_bits),
        ("16 r/d + 16 r/T = b + 32/g", r_basis),
    ]
    return out, steps


def _matched_storage() -> Derivation:
    eq, steps = _storage_case()
    claims = (_D * _B / 16, _D * (_B + 32 / _G) / 16, _D * (_B + 32 / _G) / (16 * (1 + _D / _T)))
    r = sp.Symbol("r")
    return Derivation(
        name="matched_storage",
        statement="Rank r at 16 bits per coefficient matches b-bit quantization when r = d b/16; "
        "with an fp16 scale and zero-point per group of g elements r = d (b + 32/g)/16; with the "
        "d x r fp16 basis amortised over T tokens, 16 r/d + 16 r/T = b + 32/g so "
        "r = d (b + 32/g)/(16 (1 + d/T))",
        expr=tuple(sp.Eq(r, c) for c in claims),
        steps=tuple(steps),
        identities=tuple(zip((eq["r_plain"], eq["r_group"], eq["r_basis"]), claims)),
        numeric=_numeric_storage,
    )


def _numeric_storage(n_points: int, seed: int) -> float:
    from .ledger import quant_bits_per_element, rank_bits_per_element

    eq, _ = _storage_case()
    f = {key: sp.lambdify([_D, _R, _B, _G, _T], val, "numpy") for key, val in eq.items()}
    rng, err = _rng(seed), 0.0
    for _ in range(n_points):
        d = int(rng.choice([32, 64, 96, 128, 256]))
        b, g = int(rng.integers(1, 9)), int(rng.choice([16, 32, 64, 128]))
        t, r = int(rng.integers(16, 8193)), int(rng.integers(1, d + 1))
        args = (d, r, b, g, t)
        ledger_q = quant_bits_per_element(b, group=g)
        err = max(err, abs(ledger_q - float(f["quant_g"](*args))))
        err = max(err, abs(rank_bits_per_element(r, d) - float(f["rank_bits"](*args))))
        err = max(err, abs(rank_bits_per_element(r, d, tokens=t) - float(f["rank_bits_T"](*args))))
        # at the solved ranks the ledger's two sides agree
        r_plain, r_group, r_basis = (float(f[key](*args))
                                     for key in ("r_plain", "r_group", "r_basis"))
        err = max(err, abs(rank_bits_per_element(r_plain, d)
                           - quant_bits_per_element(b, group=g, scale_bits=0)))
        err = max(err, abs(rank_bits_per_element(r_group, d) - ledger_q))
        err = max(err, abs(rank_bits_per_element(r_basis, d, tokens=t) - ledger_q))
    return err


# ------------------------------------------------------------------------------ the registry
_BUILDERS = (_kl_hessian, _uniform_variance, _damage_ratio, _matched_storage)


@functools.lru_cache(maxsize=None)
def _all() -> tuple[Derivation, ...]:
    return tuple(build() for build in _BUILDERS)


def derivations() -> list[Derivation]:
    """The four derivations (a)-(d), built once and cached."""
    return list(_all())


def verification_row(derivation: Derivation, n_points: int = 20, seed: int = 0) -> dict[str, Any]:
    """``{"name", "statement", "symbolic", "numeric_max_abs_err"}`` for one derivation."""
    return {
        "name": derivation.name,
        "statement": derivation.statement,
        "symbolic": bool(derivation.verify()),
        "numeric_max_abs_err": derivation.numeric_check(n_points, seed),
    }


def verify_all(n_points: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """One :func:`verification_row` per derivation.

    >>> rows = verify_all(n_points=2)
    >>> all(r["symbolic"] and r["numeric_max_abs_err"] < 1e-9 for r in rows)
    True
    """
    n_points, seed = check_int("n_points", n_points, 1), check_int("seed", seed, 0)  # before the sympy work
    return [verification_row(d, n_points, seed) for d in derivations()]
