"""kvtheory.fisher: Fisher metric = Hessian of the KL, Fisher damage, exact stable KL, masks."""

import inspect
import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tol import TOL, assert_close, rel_err

from kvtheory.errors import KVTheoryError
from kvtheory.fisher import (
    causal_mask,
    fisher_damage,
    masked_log_softmax,
    masked_softmax,
    softmax_fisher,
    softmax_kl,
)


def raw(fn):
    """The function as users call it: without the jaxtyping/beartype wrapper of the test hook,
    which rejects wrong types and shapes (TypeCheckError) before our KVTheoryError checks."""
    return inspect.unwrap(fn)


def _mp_kl(s, delta):
    """KL(softmax(s) || softmax(s + delta)) in 50-digit arithmetic (reference)."""
    with mpmath.workdps(50):
        s = [mpmath.mpf(float(x)) for x in s]
        t = [a + mpmath.mpf(float(b)) for a, b in zip(s, delta)]
        zs, zt = mpmath.fsum(mpmath.exp(x) for x in s), mpmath.fsum(mpmath.exp(x) for x in t)
        return float(mpmath.fsum(mpmath.exp(a) / zs * ((a - mpmath.log(zs)) - (b - mpmath.log(zt)))
                                 for a, b in zip(s, t)))


# ----------------------------------------------------------------------------- hand-worked
def test_two_token_hand_case():
    p = torch.tensor([0.5, 0.5])
    delta = torch.tensor([1.0, -1.0])
    assert_close(softmax_fisher(p), torch.tensor([[0.25, -0.25], [-0.25, 0.25]]), "exact64")
    assert_close(fisher_damage(p, delta), 0.5, "exact64")  # 1/2 Var_p(delta) = 1/2
    assert_close(softmax_kl(torch.zeros(2), delta), math.log(math.cosh(1.0)), "float64")


def test_fisher_matrix_properties(gen):
    p = torch.softmax(torch.randn(3, 7, generator=gen), -1)
    f = softmax_fisher(p)
    assert f.shape == (3, 7, 7)
    assert_close(f, f.mT, "exact64")
    assert_close(f.sum(-1), torch.zeros(3, 7), "exact64")  # F 1 = 0 (shift invariance)
    assert bool((torch.linalg.eigvalsh(f) > -TOL["exact64"][1]).all())  # PSD


# ------------------------------------------------------------------ Hessian of the KL is F
@pytest.mark.parametrize("n", [2, 5, 9])
def test_autograd_hessian_of_kl_is_fisher(n, gen):
    s = 2 * torch.randn(n, generator=gen)
    hess = torch.autograd.functional.hessian(lambda d: softmax_kl(s, d), torch.zeros(n))
    assert_close(hess, softmax_fisher(torch.softmax(s, -1)), "float64")


def test_autograd_hessian_with_mask(gen):
    s = torch.randn(6, generator=gen)
    mask = torch.tensor([True, False, True, True, False, True])
    hess = torch.autograd.functional.hessian(lambda d: softmax_kl(s, d, mask), torch.zeros(6))
    expected = torch.zeros(6, 6)
    idx = mask.nonzero().squeeze(-1)
    expected[idx[:, None], idx] = softmax_fisher(torch.softmax(s[mask], -1))
    assert_close(hess, expected, "float64")


def test_quadratic_form_equals_damage(gen):
    p = torch.softmax(torch.randn(4, 8, generator=gen), -1)
    delta = torch.randn(4, 8, generator=gen)
    quad = 0.5 * torch.einsum("bi,bij,bj->b", delta, softmax_fisher(p), delta)
    assert_close(fisher_damage(p, delta), quad, "float64")


def test_second_order_limit_third_order_error(gen):
    """KL - 1/2 d^T F d = kappa_3/6 t^3 + O(t^4): error ratio 8 when t halves, and the value."""
    s, v = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    p = torch.softmax(s, -1)
    kappa3 = (p * (v - (p * v).sum()) ** 3).sum()  # third cumulant of v under p
    assert abs(float(kappa3)) > 0.05  # the cubic term is really there

    def gap(t):
        return float(softmax_kl(s, t * v) - fisher_damage(p, t * v))

    t = 1e-4
    assert_close(gap(t) / gap(t / 2), 8.0, "approx")
    assert_close(gap(t) / t**3, kappa3 / 6, "approx")
    ratio = [float(fisher_damage(p, t * v) / softmax_kl(s, t * v)) for t in (1e-1, 1e-2, 1e-3)]
    assert abs(ratio[2] - 1) < abs(ratio[1] - 1) < abs(ratio[0] - 1)
    assert_close(ratio[2], 1.0, "approx")


# ------------------------------------------------------------------------ exact, stable KL
@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1.0, 20.0, 200.0])
def test_kl_against_50_digit_reference(scale, gen):
    s = 3 * torch.randn(2, 6, generator=gen)
    delta = scale * torch.randn(2, 6, generator=gen)
    ours = softmax_kl(s, delta)
    for row in range(2):
        assert rel_err(float(ours[row]), _mp_kl(s[row], delta[row])) < TOL["float64"][0]


def test_kl_overflow_branch_hand_case():
    # s = (0, 0), delta = (1000, 0): q = (1, e^-1000); KL = 500 - log 2
    kl = softmax_kl(torch.zeros(2), torch.tensor([1000.0, 0.0]))
    assert_close(kl, 500 - math.log(2), "float64")


def test_invariance_to_constant_shifts(gen):
    s, delta = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    p = torch.softmax(s, -1)
    kl = softmax_kl(s, delta)
    assert_close(softmax_kl(s + 11.5, delta), kl, "float64")
    assert_close(softmax_kl(s, delta - 3.25), kl, "float64")
    assert_close(fisher_damage(p, delta + 7.0), fisher_damage(p, delta), "float64")
    assert_close(masked_softmax(s + 40.0), p, "float64")


# -------------------------------------------------------------------------------- masks
def test_masks_against_plain_loop(gen):
    s = torch.randn(5, 9, generator=gen)
    delta = torch.randn(5, 9, generator=gen)
    mask = torch.rand(5, 9, generator=gen) < 0.6
    mask[:, 0] = True
    mask[4] = False  # a fully masked row: nothing to damage
    s_bad = torch.where(mask, s, -math.inf)  # masked logits may be -inf ...
    delta_bad = torch.where(mask, delta, math.nan)  # ... and perturbations NaN
    p = masked_softmax(s_bad, mask)
    dmg, kl = fisher_damage(p, delta_bad, mask), softmax_kl(s_bad, delta_bad, mask)
    for r in range(5):
        idx = [j for j in range(9) if mask[r, j]]
        z = sum(math.exp(float(s[r, j])) for j in idx)
        zq = sum(math.exp(float(s[r, j] + delta[r, j])) for j in idx)
        pr = {j: math.exp(float(s[r, j])) / z for j in idx}
        m1 = sum(pr[j] * float(delta[r, j]) for j in idx)
        m2 = sum(pr[j] * float(delta[r, j]) ** 2 for j in idx)
        kl_loop = sum(pr[j] * math.log(pr[j] / (math.exp(float(s[r, j] + delta[r, j])) / zq))
                      for j in idx)
        assert_close(dmg[r], 0.5 * (m2 - m1**2), "float64")
        assert_close(kl[r], kl_loop, "float64")
        for j in range(9):
            assert_close(p[r, j], pr.get(j, 0.0), "float64")


def test_causal_mask_and_log_softmax():
    m = causal_mask(3, 5)
    assert m.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                          [True, True, True, True, True]]
    logp = masked_log_softmax(torch.zeros(3, 5), m)
    assert_close(logp[0, :3], torch.full((3,), -math.log(3)), "exact64")
    assert bool(torch.isneginf(logp[0, 3:]).all())


# ------------------------------------------------------------------------ properties
@given(
    logits=st.lists(st.floats(-30, 30), min_size=1, max_size=12),
    scale=st.floats(1e-8, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_damage_and_kl_nonnegative(logits, scale, seed):
    s = torch.tensor(logits, dtype=torch.float64)
    delta = scale * torch.randn(s.shape, generator=torch.Generator().manual_seed(seed),
                                dtype=torch.float64)
    p = torch.softmax(s, -1)
    dmg, kl = fisher_damage(p, delta), softmax_kl(s, delta)
    assert float(dmg) >= 0 and float(kl) >= 0 and math.isfinite(float(kl))


def test_half_precision_is_upcast(gen):
    s = torch.randn(4, 6, generator=gen).half()
    delta = (0.1 * torch.randn(4, 6, generator=gen)).half()
    kl = softmax_kl(s, delta)
    assert kl.dtype == torch.float32
    assert_close(kl, softmax_kl(s.double(), delta.double()), "float32")
    # uniform weights over 4094 tokens, rounded to half: the row sums to 1 - 4.9e-4, which is
    # within half precision (and must not be rejected as unnormalised)
    p_half = torch.full((4094,), 1 / 4094).half()
    assert abs(float(p_half.float().sum()) - 1) > 4e-4
    dmg = fisher_damage(p_half, torch.randn(4094, generator=gen).half())
    assert dmg.dtype == torch.float32 and float(dmg) > 0


# ------------------------------------------------------------------------------ errors
def test_errors_name_argument_value_and_expectation():
    p = torch.tensor([0.5, 0.5])
    with pytest.raises(KVTheoryError, match=r"p: got .*expected probabilities >= 0"):
        fisher_damage(torch.tensor([1.5, -0.5]), torch.zeros(2))
    with pytest.raises(KVTheoryError,
                       match=r"p: got a row summing to 2 over attended positions; expected"):
        softmax_fisher(torch.tensor([1.0, 1.0]))
    with pytest.raises(KVTheoryError, match=r"delta: got 1 NaN/Inf .*expected finite"):
        fisher_damage(p, torch.tensor([0.0, math.nan]))
    with pytest.raises(KVTheoryError, match=r"s: got 0 NaN and 1 Inf|s: got 1 NaN/Inf"):
        softmax_kl(torch.tensor([0.0, math.inf]), torch.zeros(2))
    with pytest.raises(KVTheoryError, match=r"mask: got .*expected a boolean"):
        raw(fisher_damage)(p, torch.zeros(2), torch.ones(2))
    with pytest.raises(KVTheoryError, match=r"mask: got .*broadcastable to shape \(2,\)"):
        raw(fisher_damage)(p, torch.zeros(2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(KVTheoryError, match=r"n_query: got 4; expected an integer in 1..3"):
        causal_mask(4, 3)
    with pytest.raises(KVTheoryError, match=r"p: got a tensor with 0 dimensions.*at least 1"):
        raw(softmax_fisher)(torch.tensor(1.0))
    with pytest.raises(KVTheoryError, match=r"delta: got .*expected a torch.Tensor"):
        raw(fisher_damage)(p, [0.0, 1.0])
