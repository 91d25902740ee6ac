"""kvtheory.bounds: headline ratio, projection/quantization damage, exact ratio, certificate."""

import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tol import TOL, assert_close

from kvtheory.bounds import (
    exact_ratio,
    expected_quant_damage,
    headline_ratio,
    logit_bound,
    margin_certificate,
    mc_quant_damage,
    projection_damage,
    projection_kl,
    rounded_quant_damage,
)
from kvtheory.errors import KVTheoryError
from kvtheory.fisher import causal_mask, fisher_damage, softmax_fisher, softmax_kl


def raw(fn):
    """The function as users call it: without the jaxtyping/beartype wrapper of the test hook,
    which rejects wrong types and shapes (TypeCheckError) before our KVTheoryError checks."""
    return inspect.unwrap(fn)


def _data(gen, heads=2, queries=4, tokens=16, d=16):
    q = torch.randn(heads, queries, d, generator=gen)
    k = torch.randn(heads, tokens, d, generator=gen)
    u = torch.randn(heads, d, generator=gen)
    return q, k, u / u.norm(dim=-1, keepdim=True)


def _loop_projection(q, k, u, mask=None):
    """Plain-Python D_proj = 1/2 alpha^2 Var_p(c), one (head, query) at a time."""
    heads, queries, d = q.shape
    q, k, u = q.tolist(), k.tolist(), u.tolist()
    out = torch.zeros(heads, queries)
    for h in range(heads):
        norm = math.sqrt(sum(x * x for x in u[h]))
        un = [x / norm for x in u[h]]
        for i in range(queries):
            toks = [j for j in range(len(k[h])) if mask is None or bool(mask[i, j])]
            s = {j: sum(a * b for a, b in zip(q[h][i], k[h][j])) / math.sqrt(d) for j in toks}
            z = sum(math.exp(v) for v in s.values())
            c = {j: sum(a * b for a, b in zip(un, k[h][j])) for j in toks}
            alpha = sum(a * b for a, b in zip(q[h][i], un)) / math.sqrt(d)
            mean = sum(math.exp(s[j]) / z * c[j] for j in toks)
            var = sum(math.exp(s[j]) / z * (c[j] - mean) ** 2 for j in toks)
            out[h, i] = 0.5 * alpha**2 * var
    return out


# ------------------------------------------------------------------------------ headline
def test_headline_ratio_exact():
    for b in range(1, 9):
        r = headline_ratio(b)
        assert type(r) is int and r == 3 * 4**b
    assert headline_ratio(4) == 768 and headline_ratio(16) == 3 * 2**32


@pytest.mark.parametrize("bad", [0, 17, -1, 4.0, True, "4"])
def test_headline_ratio_rejects(bad):
    with pytest.raises(KVTheoryError, match=r"bits: got .*; expected an integer in 1\.\.16"):
        raw(headline_ratio)(bad)


# ----------------------------------------------------------------------------- projection
def test_projection_matches_plain_loop(gen):
    q, k, u = _data(gen, tokens=7, d=8)
    assert_close(projection_damage(q, k, u), _loop_projection(q, k, u), "float64")
    assert_close(projection_damage(q, k, 3.0 * u), _loop_projection(q, k, u), "float64")
    mask = causal_mask(4, 7)
    assert_close(projection_damage(q, k, u, mask), _loop_projection(q, k, u, mask), "float64")


def test_projection_is_fisher_form_of_actual_logit_change(gen):
    q, k, u = _data(gen)
    d = q.shape[-1]
    proj = torch.eye(d) - u.unsqueeze(-1) * u.unsqueeze(-2)  # I - u u^T, per head
    s = q @ k.mT / math.sqrt(d)
    delta = q @ (k @ proj).mT / math.sqrt(d) - s
    p = torch.softmax(s, -1)
    quad = 0.5 * torch.einsum("hqi,hqij,hqj->hq", delta, softmax_fisher(p), delta)
    assert_close(projection_damage(q, k, u), quad, "float64")
    assert_close(projection_damage(q, k, u), fisher_damage(p, delta), "float64")
    assert_close(projection_kl(q, k, u), softmax_kl(s, delta), "float64")


def test_gqa_broadcasting_matches_per_head(gen):
    q = torch.randn(2, 3, 4, 8, generator=gen)  # (kv_head, group, query, d)
    k = torch.randn(2, 1, 6, 8, generator=gen)  # one key set per kv head
    u = torch.randn(8, generator=gen)  # one direction for all
    out = projection_damage(q, k, u)
    assert out.shape == (2, 3, 4)
    for h in range(2):
        loop = _loop_projection(q[h], k[h].expand(3, 6, 8), u.expand(3, 8))
        assert_close(out[h], loop, "float64")


# --------------------------------------------------------------------------- quantization
def test_two_token_hand_case():
    # s = +-sqrt 2, p1 - p2 = tanh(sqrt 2), alpha^2 = 2, c = +-1, b = 1: Delta = 2
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    u = torch.tensor([1.0, 0.0])
    sech2 = 1 - math.tanh(math.sqrt(2)) ** 2
    assert_close(projection_damage(q, k, u), [sech2], "float64")
    assert_close(expected_quant_damage(q, k, u, 1), [sech2 / 6], "float64")  # 1/2*2*(4/12)*sech2/2
    assert_close(rounded_quant_damage(q, k, u, 1), [0.0], "exact64")  # both ends on the grid
    assert_close(exact_ratio(q, k, u, 1), [6.0], "float64")


def test_two_tokens_exact_ratio_is_6_times_levels_squared(gen):
    # n = 2: Var_p(c) = p1 p2 (c1 - c2)^2 and 1 - |p|^2 = 2 p1 p2, whatever q and K
    q, k, u = _data(gen, tokens=2)
    for b in range(1, 9):
        assert_close(exact_ratio(q, k, u, b), torch.full((2, 4), 6.0 * (2**b - 1) ** 2), "float64")


def test_exact_ratio_is_damage_ratio(gen):
    q, k, u = _data(gen)
    for b in (2, 4, 8):
        ratio = projection_damage(q, k, u) / expected_quant_damage(q, k, u, b)
        assert_close(exact_ratio(q, k, u, b), ratio, "float64")


def test_exact_ratio_balanced_uniform_case():
    # q orthogonal to u makes p uniform over n tokens; c = +-a balanced: 3 (2^b - 1)^2 n/(n - 1)
    n, a = 6, 0.7
    c = torch.tensor([a, -a] * (n // 2))
    k = torch.stack([c, torch.full((n,), 0.3)], -1)
    for b in (1, 4, 8):
        r = exact_ratio(torch.tensor([[0.0, 1.5]]), k, torch.tensor([1.0, 0.0]), b)
        assert_close(r, [3 * (2**b - 1) ** 2 * n / (n - 1)], "float64")


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_monte_carlo_matches_expectation(bits, gen):
    q, k, u = _data(gen)
    mc = mc_quant_damage(q, k, u, bits, samples=10_000, generator=gen)
    assert_close(mc, expected_quant_damage(q, k, u, bits), "mc")


def test_monte_carlo_with_shared_keys(gen):
    q, k = torch.randn(3, 4, 8, generator=gen), torch.randn(6, 8, generator=gen)
    u = torch.randn(8, generator=gen)
    mc = mc_quant_damage(q, k, u, 4, samples=10_000, generator=gen)
    assert mc.shape == (3, 4)
    assert_close(mc, expected_quant_damage(q, k, u, 4), "mc")


def test_monte_carlo_kl_and_mask(gen):
    q, k, u = _data(gen, queries=5, tokens=5)
    mask = causal_mask(5, 5)
    expected = expected_quant_damage(q, k, u, 8, mask)
    fisher = mc_quant_damage(q, k, u, 8, 10_000, torch.Generator().manual_seed(7), mask)
    kl = mc_quant_damage(q, k, u, 8, 10_000, torch.Generator().manual_seed(7), mask, metric="kl")
    assert_close(fisher[:, 1:], expected[:, 1:], "mc")
    assert_close(kl[:, 1:], fisher[:, 1:], "mc")  # small noise: KL = Fisher + O(delta^3)
    assert_close(fisher[:, 0], torch.zeros(2), "exact64")  # one visible token: no damage


def test_padding_is_ignored_and_range_covers_visible_tokens(gen):
    q, k, u = _data(gen, queries=3, tokens=6, d=8)
    padded = torch.cat([k, 50 * torch.randn(2, 2, 8, generator=gen)], 1)  # garbage padding
    pad = torch.ones(3, 8, dtype=torch.bool)
    pad[:, 6:] = False
    fns = (projection_damage, projection_kl, exact_ratio, expected_quant_damage,
           rounded_quant_damage)
    for fn in fns:
        args = () if fn in (projection_damage, projection_kl) else (3,)
        assert_close(fn(q, padded, u, *args, mask=pad), fn(q, k, u, *args), "float64")
    # causal: the quantizer's range is that of all tokens (the last query sees them all),
    # also of the last token, which has the largest coordinate and only the last query sees
    k = k + 5 * torch.nn.functional.one_hot(torch.tensor(5), 6).view(1, 6, 1) * u.unsqueeze(-2)
    causal = causal_mask(3, 6)
    c = (k * u.unsqueeze(-2)).sum(-1)
    step = (c.amax(-1) - c.amin(-1)) / 7
    p = torch.softmax((q @ k.mT / math.sqrt(8)).masked_fill(~causal, -math.inf), -1)
    alpha = (q * u.unsqueeze(-2)).sum(-1) / math.sqrt(8)
    by_hand = 0.5 * alpha**2 * (step**2 / 12).unsqueeze(-1) * (1 - (p**2).sum(-1))
    assert_close(expected_quant_damage(q, k, u, 3, causal), by_hand, "float64")


def test_rounded_damage_matches_explicit_requantized_keys(gen):
    q, k, u = _data(gen, tokens=9, d=6)
    d = q.shape[-1]
    for b in (2, 3, 8):
        c = (k * u.unsqueeze(-2)).sum(-1)
        lo, hi = c.amin(-1, keepdim=True), c.amax(-1, keepdim=True)
        step = (hi - lo) / (2**b - 1)
        c_hat = lo + step * torch.round((c - lo) / step)
        assert bool(((c_hat - c).abs() <= step / 2 + TOL["exact64"][1]).all())
        k_hat = k + (c_hat - c).unsqueeze(-1) * u.unsqueeze(-2)
        s = q @ k.mT / math.sqrt(d)
        delta = q @ k_hat.mT / math.sqrt(d) - s
        expected = fisher_damage(torch.softmax(s, -1), delta)
        assert_close(rounded_quant_damage(q, k, u, b), expected, "float64")
        assert_close(rounded_quant_damage(q, k, u, b, metric="kl"), softmax_kl(s, delta), "float64")


def test_half_precision_is_upcast(gen):
    q, k, u = _data(gen)
    out = expected_quant_damage(q.half(), k.half(), u.half(), 4)
    assert out.dtype == torch.float32
    ref = expected_quant_damage(q.half().double(), k.half().double(), u.half().double(), 4)
    assert_close(out, ref, "float32")


# ----------------------------------------------------------------------- worst-case bound
def test_logit_bound_hand_case_and_tightness(gen):
    q = torch.tensor([[1.0, -3.0, 0.0, 2.0]])
    assert_close(logit_bound(q, torch.full((4,), 0.5)), [0.75], "exact64")  # 6 * 0.5 / (2*2)
    # the adversarial error e_i = sign(q_i) Delta_i / 2 reaches the bound exactly
    q, k, _ = _data(gen, heads=1, queries=3, tokens=5, d=8)
    steps = torch.rand(1, 5, 8, generator=gen)
    bound = logit_bound(q, steps, per_token=True)
    assert bound.shape == (1, 3, 5)
    for i in range(3):
        e = torch.sign(q[0, i]) * steps[0] / 2  # (token, d)
        assert_close((e @ q[0, i]) / math.sqrt(8), bound[0, i], "float64")


def _quantize_per_token(k, bits):
    """Per-token asymmetric min-max uniform quantizer (along d): returns k_hat, step."""
    lo, hi = k.amin(-1, keepdim=True), k.amax(-1, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    return lo + step * torch.round((k - lo) / step), step


def _quantize_per_channel(k, bits):
    """Per-channel asymmetric quantizer (along tokens): returns k_hat, step per coordinate."""
    lo, hi = k.amin(-2, keepdim=True), k.amax(-2, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    return lo + step * torch.round((k - lo) / step), step.squeeze(-2)


@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(2, 12), queries=st.integers(1, 4),
       d=st.integers(2, 16), bits=st.integers(1, 8), scale=st.floats(0.1, 6.0),
       per_token=st.booleans())
def test_certified_queries_never_flip(seed, tokens, queries, d, bits, scale, per_token):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(2, queries, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, tokens, d, generator=g, dtype=torch.float64)
    if per_token:
        k_hat, step = _quantize_per_token(k, bits)
        steps = step.expand(2, tokens, d)
    else:
        k_hat, steps = _quantize_per_channel(k, bits)
    s, s_hat = q @ k.mT / math.sqrt(d), q @ k_hat.mT / math.sqrt(d)
    bound = logit_bound(q, steps, per_token=per_token)
    bound = bound if per_token else bound.unsqueeze(-1)
    assert bool(((s_hat - s).abs() <= bound + TOL["exact64"][1]).all())  # the bound is sound
    cert = margin_certificate(q, k, steps, per_token=per_token)
    flipped = s.argmax(-1) != s_hat.argmax(-1)
    assert not bool((cert.certified & flipped).any())


def test_certificate_hand_case_and_masks(gen):
    q = torch.tensor([[2.0, 0.0], [2.0, 2.0]])
    k = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    cert = margin_certificate(q, k, torch.tensor([0.5, 3.0]))
    assert cert.certified.tolist() == [True, False]
    assert_close(cert.margin, torch.full((2,), 4 / math.sqrt(2)), "exact64")
    assert_close(cert.bound, torch.tensor([1.0, 7.0]) / (2 * math.sqrt(2)), "exact64")
    assert cert.fraction == 0.5
    # one visible token: nothing can flip
    causal = margin_certificate(torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen),
                                torch.full((4,), 10.0), causal_mask(3, 3))
    assert causal.certified.tolist() == [True, False, False] and math.isinf(causal.margin[0])


def test_certificate_separates_bit_widths(gen):
    q, k, _ = _data(gen, heads=4, queries=32, tokens=32, d=16)
    frac = {}
    for b in (2, 8):
        k_hat, step = _quantize_per_token(k, b)
        cert = margin_certificate(q, k, step.expand_as(k), per_token=True)
        frac[b] = cert.fraction
        flipped = (q @ k.mT).argmax(-1) != (q @ k_hat.mT).argmax(-1)
        assert not bool((cert.certified & flipped).any())
    assert frac[2] < 0.5 < frac[8]


# ---------------------------------------------------------------------------------- errors
def test_errors_name_argument_value_and_expectation(gen):
    q, k, u = _data(gen)
    for bits in (0, 17):
        with pytest.raises(KVTheoryError,
                           match=rf"bits: got {bits}; expected an integer in 1\.\.16"):
            expected_quant_damage(q, k, u, bits)
    q_nan = q.clone()
    q_nan[0, 1, 2] = math.nan
    with pytest.raises(KVTheoryError, match=r"q: got 1 NaN and 0 Inf .*expected finite"):
        projection_damage(q_nan, k, u)
    with pytest.raises(KVTheoryError, match=r"k: got 0 NaN and 1 Inf"):
        exact_ratio(q[:1], torch.where(k == k.max(), math.inf, k), u, 4)
    with pytest.raises(KVTheoryError, match=r"u: got .*expected a nonzero direction"):
        projection_damage(q, k, torch.zeros(16))
    with pytest.raises(KVTheoryError, match=r"samples: got 0; expected an integer >= 1"):
        mc_quant_damage(q, k, u, 4, samples=0)
    with pytest.raises(KVTheoryError, match=r"metric: got 'l2'; expected one of fisher, kl"):
        rounded_quant_damage(q, k, u, 4, metric="l2")
    with pytest.raises(KVTheoryError, match=r"steps: got .*expected quantization steps >= 0"):
        logit_bound(q, -torch.ones(16))
    # wrong shapes: the type-check hook of the test suite may reject them first
    with pytest.raises(KVTheoryError, match=r"q: got a tensor with 1 dimensions.*at least 2"):
        raw(projection_damage)(q[0, 0], k, u)
    with pytest.raises(KVTheoryError, match=r"k: got head dimension d=8; expected d=16 to match q"):
        raw(projection_damage)(q, k[..., :8], u)
    with pytest.raises(KVTheoryError, match=r"u: got head dimension d=8; expected d=16"):
        raw(expected_quant_damage)(q, k, u[..., :8], 4)
    with pytest.raises(KVTheoryError, match=r"k: got leading axes \(3,\).*broadcast with .*\(2,\)"):
        raw(projection_damage)(q, torch.randn(3, 16, 16, generator=gen), u[0])
    with pytest.raises(KVTheoryError, match=r"steps: got head dimension d=3; expected d=16"):
        raw(margin_certificate)(q, k, torch.ones(3))
