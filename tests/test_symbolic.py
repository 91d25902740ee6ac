"""kvtheory.symbolic: the four derivations prove their statements and agree with the code."""

import dataclasses

import pytest
import sympy as sp
import torch

import kvtheory.bounds
import kvtheory.fisher
import kvtheory.ledger
from kvtheory.errors import KVTheoryError
from kvtheory.symbolic import Derivation, derivations, verify_all

NAMES = ["kl_hessian_is_fisher", "uniform_error_variance", "damage_ratio", "matched_storage"]
#: the acceptance threshold of `kvtheory verify` (numeric agreement of sympy and torch)
NUMERIC_MAX = 1e-9


def _by_name() -> dict[str, Derivation]:
    return {d.name: d for d in derivations()}


def test_derivations_are_listed_and_described():
    ds = derivations()
    assert [d.name for d in ds] == NAMES
    for d in ds:
        assert isinstance(d.statement, str) and d.statement
        assert d.steps and all(isinstance(text, str) and isinstance(expr, sp.Basic)
                               for text, expr in d.steps)
        exprs = d.expr if isinstance(d.expr, tuple) else (d.expr,)
        assert all(isinstance(e, sp.Eq) for e in exprs)
        assert str(d).startswith(f"{d.name}: ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds[0].name = "x"


@pytest.mark.parametrize("name", NAMES)
def test_each_derivation_verifies_and_matches_code(name):
    d = _by_name()[name]
    assert d.verify() is True
    assert d.numeric_check(n_points=5, seed=3) < NUMERIC_MAX


@pytest.mark.parametrize("name", NAMES)
def test_verify_rejects_a_wrong_claim(name):
    d = _by_name()[name]
    (derived, claimed), *rest = d.identities
    wrong = claimed * sp.Rational(1001, 1000) if not isinstance(claimed, sp.MatrixBase) \
        else claimed + sp.ImmutableMatrix.eye(claimed.shape[0]) / 1000
    if claimed == 0:
        wrong = sp.Rational(1, 1000)
    assert dataclasses.replace(d, identities=((derived, wrong), *rest)).verify() is False


def test_closed_forms_by_hand():
    d = _by_name()
    b, n = sp.symbols("b n", positive=True, integer=True)
    delta = sp.Symbol("Delta", positive=True)
    ratio_steps = dict(d["damage_ratio"].steps)
    headline = ratio_steps["headline: D_proj/E[D_quant] as n -> oo"]
    assert [headline.subs(b, k) for k in (1, 2, 4)] == [12, 48, 768]
    exact = ratio_steps["2^b levels incl. both ends: Delta = 2a/(2^b - 1); exact D_proj/E[D_quant]"]
    assert exact.subs({b: 4, n: 2}) == 1350 and exact.subs({b: 1, n: 4}) == 4
    variance = dict(d["uniform_error_variance"].steps)["E[epsilon^2] = integral of epsilon^2/Delta"]
    assert variance.rhs == delta**2 / 12
    storage = dict(d["matched_storage"].steps)
    dd, g, t = sp.symbols("d g T", positive=True)
    assert storage["equal storage 16 r/d = b"].subs({dd: 128, b: 4}) == 32  # rank 32 = INT4
    assert storage["16 r/d = b + 32/g"].subs({dd: 128, b: 4, g: 32}) == 40
    assert storage["16 r/d + 16 r/T = b + 32/g"].subs({dd: 128, b: 4, g: 32, t: 512}) == 32
    hess2 = dict(d["kl_hessian_is_fisher"].steps)["n = 2: Hessian of the explicit KL at delta = 0"]
    s1, s2 = sp.symbols("s1 s2", real=True)
    p1 = 1 / (1 + sp.exp(s2 - s1))
    assert sp.simplify(hess2[0, 0] - p1 * (1 - p1)) == 0
    assert sp.simplify(hess2[0, 1] + p1 * (1 - p1)) == 0


def test_numeric_checks_catch_wrong_implementations(monkeypatch):
    d = _by_name()
    monkeypatch.setattr(kvtheory.bounds, "headline_ratio", lambda bits: 3 * 4**bits + 1)
    assert d["damage_ratio"].numeric_check(n_points=2) >= 1
    monkeypatch.setattr(kvtheory.fisher, "softmax_fisher", lambda p: 1.01 * torch.diag_embed(p))
    assert d["kl_hessian_is_fisher"].numeric_check(n_points=2) > 1e-3
    monkeypatch.setattr(kvtheory.ledger, "quant_bits_per_element",
                        lambda bits, *, group, scale_bits=16, zero_point=True:
                        bits + scale_bits / group)  # forgets the zero-point
    assert d["matched_storage"].numeric_check(n_points=2) > 0.1


def test_verify_all_rows():
    rows = verify_all(n_points=3)
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        assert set(r) == {"name", "statement", "symbolic", "numeric_max_abs_err"}
        assert r["symbolic"] is True and isinstance(r["numeric_max_abs_err"], float)
        assert r["numeric_max_abs_err"] < NUMERIC_MAX


def test_numeric_check_rejects_bad_arguments():
    d = derivations()[1]
    with pytest.raises(KVTheoryError, match=r"n_points: got 0; expected an integer >= 1"):
        d.numeric_check(n_points=0)
    with pytest.raises(KVTheoryError, match=r"seed: got -1; expected an integer >= 0"):
        d.numeric_check(seed=-1)
