"""Numerics: half-precision inputs are upcast, large logits do not overflow (issue 5, Numerics).

* fp16 and bf16 inputs are computed in float32: the theory functions (fisher, bounds), the flip
  engine and the quantizers/compressors give the same numbers as for the same values passed in
  float32, and stay finite where the half-precision arithmetic itself would overflow.
* Queries scaled by 1e3 and 1e4 in float32 (logits in the thousands to tens of thousands): flip,
  KL and Fisher stay finite, the flips (the argmax) agree with a dense float64 reference, and
  the KL and Fisher values agree with it up to the rounding of the float32 logits themselves
  (relative error ``rtol("float32")`` of the logit scale).
"""

from __future__ import annotations

import math

import pytest
import torch
from tol import TOL, assert_close

import kvtheory
from kvtheory import bounds, fisher
from kvtheory.compress import make_compressor
from kvtheory.quantize import quant_steps, quantize

HALF = [torch.float16, torch.bfloat16]
RTOL32 = TOL["float32"][0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread (two spin-waiting threads cost ~20x the CPU on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def halves(*xs, dtype):
    """The tensors rounded to ``dtype``, and the same values in float32."""
    h = [x.to(dtype) for x in xs]
    return h, [x.float() for x in h]


# ============================================================================ fp16 / bf16
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_fisher_functions_upcast_half_inputs(dtype):
    s, delta = randn(5, 12), randn(5, 12, seed=1)
    (ph, dh, sh), (pf, df, sf) = halves(torch.softmax(s, -1), delta, s, dtype=dtype)
    # (the rounded p no longer sums to 1 within float32's tolerance: the float32 route for p is
    # the unchecked formula itself)
    for half, full in [
        (kvtheory.fisher_damage(ph, dh), fisher._damage(pf, df)),
        (kvtheory.softmax_kl(sh, dh), kvtheory.softmax_kl(sf, df)),
        (kvtheory.softmax_fisher(ph), torch.diag_embed(pf) - pf.unsqueeze(-1) * pf.unsqueeze(-2)),
        (fisher.masked_softmax(sh, torch.rand(5, 12, generator=torch.Generator().manual_seed(2)) > 0.3),
         fisher.masked_softmax(sf, torch.rand(5, 12, generator=torch.Generator().manual_seed(2)) > 0.3)),
    ]:
        assert half.dtype == torch.float32
        assert torch.equal(half, full)  # the same float32 computation on the same values
    # and that computation is accurate: the formulas in float64 on the same (rounded) values
    p64, d64, s64 = pf.double(), df.double(), sf.double()
    fisher64 = 0.5 * (p64 * (d64 - (p64 * d64).sum(-1, keepdim=True)).square()).sum(-1)
    kl64 = torch.logsumexp(s64 + d64, -1) - torch.logsumexp(s64, -1) - (torch.softmax(s64, -1) * d64).sum(-1)
    assert_close(kvtheory.fisher_damage(ph, dh).double(), fisher64, "float32")
    assert_close(kvtheory.softmax_kl(sh, dh).double(), kl64, "float32")


def test_fp16_values_whose_squares_overflow_fp16():
    """delta = 300: delta^2 = 9e4 > 65504 would be inf in fp16 arithmetic; the result is finite."""
    p = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float16)
    delta = torch.tensor([300.0, -300.0, 0.0], dtype=torch.float16)
    dmg = kvtheory.fisher_damage(p, delta)
    # 1/2 Var_p(delta) with mean 0: 1/2 (0.25 * 9e4 * 2) = 22500, by hand
    assert dmg.dtype == torch.float32 and float(dmg) == 22500.0
    s = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float16)
    kl = kvtheory.softmax_kl(s, delta)  # log(1/3 (e^300 + e^-300 + 1)) = 300 - log 3
    assert math.isfinite(float(kl))
    assert_close(kl.double(), torch.tensor(300 - math.log(3), dtype=torch.float64), "float32")


BOUND_FUNCTIONS = {
    "projection_damage": lambda q, k, u: bounds.projection_damage(q, k, u),
    "projection_kl": lambda q, k, u: bounds.projection_kl(q, k, u),
    "expected_quant_damage": lambda q, k, u: bounds.expected_quant_damage(q, k, u, 4),
    "exact_ratio": lambda q, k, u: bounds.exact_ratio(q, k, u, 4),
    "rounded_fisher": lambda q, k, u: bounds.rounded_quant_damage(q, k, u, 3),
    "rounded_kl": lambda q, k, u: bounds.rounded_quant_damage(q, k, u, 3, metric="kl"),
    "mc_fisher": lambda q, k, u: bounds.mc_quant_damage(q, k, u, 2, samples=64,
                                                         generator=torch.Generator().manual_seed(0)),
    "mc_kl": lambda q, k, u: bounds.mc_quant_damage(q, k, u, 2, samples=64, metric="kl",
                                                     generator=torch.Generator().manual_seed(0)),
    "logit_bound": lambda q, k, u: bounds.logit_bound(q, u.abs()),
    "margin": lambda q, k, u: bounds.margin_certificate(q, k, u.abs()).margin,
    "certified": lambda q, k, u: bounds.margin_certificate(q, k, 0.05 * u.abs()).certified,
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(BOUND_FUNCTIONS))
def test_bounds_upcast_half_inputs(dtype, name):
    fn = BOUND_FUNCTIONS[name]
    q, k, u = randn(2, 3, 8), randn(2, 10, 8, seed=1), randn(8, seed=2)
    (qh, kh, uh), (qf, kf, uf) = halves(q, k, u, dtype=dtype)
    half, full = fn(qh, kh, uh), fn(qf, kf, uf)
    assert half.dtype == full.dtype and half.dtype in (torch.float32, torch.bool)
    assert torch.equal(half, full)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_bounds_finite_where_half_logits_would_overflow(dtype):
    """q.k/sqrt(d) ~ 1e5 here: beyond fp16's 65504; bf16 keeps the range but 3 digits."""
    q, k, u = randn(3, 8, scale=300.0), randn(10, 8, seed=1, scale=300.0), randn(8, seed=2)
    (qh, kh, uh), (qf, kf, uf) = halves(q, k, u, dtype=dtype)
    assert not torch.isfinite((qh @ kh.T)).all() or dtype == torch.bfloat16
    for fn in (bounds.projection_kl, bounds.projection_damage):
        out = fn(qh, kh, uh)
        assert torch.isfinite(out).all() and torch.equal(out, fn(qf, kf, uf))
    cert = bounds.margin_certificate(qh, kh, uh.abs())
    assert torch.isfinite(cert.margin).all() and torch.isfinite(cert.bound).all()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_flip_engine_upcasts_half_inputs(dtype):
    q, k = randn(2, 4, 12, 8), randn(2, 2, 12, 8, seed=1)
    k_hat, v = k + 0.2 * randn(2, 2, 12, 8, seed=2), randn(2, 2, 12, 8, seed=3)
    (qh, kh, khh, vh), (qf, kf, khf, vf) = halves(q, k, k_hat, v, dtype=dtype)
    half = kvtheory.attention_metrics(qh, kh, khh, vh, return_per_query=True)
    full = kvtheory.attention_metrics(qf, kf, khf, vf, return_per_query=True)
    for name in ("flip_rate", "topk_overlap", "kl", "fisher", "output_rel_err", "margin_counts",
                 "prob_flips"):
        assert torch.equal(getattr(half, name), getattr(full, name)), name
    assert half.per_query.kl.dtype == torch.float32
    assert torch.equal(kvtheory.flip_rate(qh, kh, khh), kvtheory.flip_rate(qf, kf, khf))


def test_flip_engine_fp16_logits_beyond_fp16_range():
    q, k = randn(1, 2, 8, 8, scale=200.0), randn(1, 1, 8, 8, seed=1, scale=200.0)
    k_hat = k + randn(1, 1, 8, 8, seed=2, scale=20.0)
    (qh, kh, khh), _ = halves(q, k, k_hat, dtype=torch.float16)
    assert not torch.isfinite(qh[0, 0] @ kh[0, 0].T).all()  # fp16 arithmetic would overflow
    m = kvtheory.attention_metrics(qh, kh, khh, return_per_query=True).per_query
    ref = _reference(qh.double(), kh.double(), khh.double())
    assert torch.isfinite(m.kl).all() and torch.isfinite(m.fisher).all()
    assert torch.equal(m.flip, ref["flip"])


SPECS = ["fp", "int4", "int2-g4", "int8-sym", "int4-kivi", "int3-hadamard", "int4-random", "rank4-hadamard",
         "rank4-pca", "rank3-identity", "rank4x4-random1", "rank4x2-qaware"]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("spec", SPECS)
def test_compressors_upcast_half_inputs(dtype, spec):
    x = randn(1, 2, 16, 8, scale=2.0)
    comp = make_compressor(spec)
    if comp.needs_fit:
        comp = comp.fit(randn(1, 2, 16, 8, seed=5), randn(1, 4, 16, 8, seed=6))
    (xh,), (xf,) = halves(x, dtype=dtype)
    out = comp(xh)
    assert out.dtype == dtype and out.shape == xh.shape
    assert torch.equal(out, comp(xf).to(dtype))  # computed in float32, rounded once at the end


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("axis, group, symmetric", [("token", None, False), ("token", 4, True),
                                                     ("channel", 8, False), ("channel", None, True)])
def test_half_quantization_error_within_half_a_step(dtype, axis, group, symmetric):
    """|x - x_hat| <= Delta/2 plus the one rounding of x_hat to the half dtype, also for values
    (6e4) whose range overflows fp16 arithmetic."""
    for scale in (1.0, 6e4 if dtype == torch.float16 else 1e30):
        x = randn(2, 16, 8, seed=3).clamp(-1, 1) * scale
        (xh,), (xf,) = halves(x, dtype=dtype)
        x_hat = quantize(xh, 4, axis=axis, group=group, symmetric=symmetric)
        steps = quant_steps(xh, 4, axis=axis, group=group, symmetric=symmetric)
        assert torch.isfinite(x_hat).all() and torch.isfinite(steps).all()
        err = (x_hat.float() - xf).abs()
        ulp = torch.finfo(dtype).eps * x_hat.float().abs()
        assert bool((err <= steps / 2 * (1 + RTOL32) + ulp).all())


# ============================================================================ large logits
def _reference(q, k, k_hat, causal=True):
    """Dense float64 per-query flip, margin, KL and Fisher damage (batch, q_head, query)."""
    q, k, k_hat = q.double(), k.double(), k_hat.double()
    g = q.shape[1] // k.shape[1]
    k, k_hat = k.repeat_interleave(g, 1), k_hat.repeat_interleave(g, 1)
    d, n_q, n_t = q.shape[-1], q.shape[-2], k.shape[-2]
    s, sh = q @ k.mT / math.sqrt(d), q @ k_hat.mT / math.sqrt(d)
    if causal:
        seen = torch.arange(n_t)[None, :] <= torch.arange(n_t - n_q, n_t)[:, None]
        s, sh = s.masked_fill(~seen, -math.inf), sh.masked_fill(~seen, -math.inf)
    logp, logph = torch.log_softmax(s, -1), torch.log_softmax(sh, -1)
    p = logp.exp()
    delta = torch.where(torch.isfinite(s), sh - s, 0.0)
    centred = delta - (p * delta).sum(-1, keepdim=True)
    top = s.argmax(-1, keepdim=True)
    two = s.topk(2, -1).values
    return {
        "flip": (sh.gather(-1, top) < sh.amax(-1, keepdim=True)).squeeze(-1),
        "margin": torch.where(torch.isfinite(two[..., 1]), two[..., 0] - two[..., 1], math.inf),
        "kl": torch.where(p > 0, p * (logp - logph), 0.0).sum(-1),
        "fisher": 0.5 * (p * centred.square()).sum(-1),
        "logit_scale": s[torch.isfinite(s)].abs().max(),
        "delta_scale": delta.abs().max(),
    }


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e4])
def test_flip_engine_large_logits_float32(scale, causal):
    q = (randn(2, 4, 16, 8) * scale).float()
    k = randn(2, 2, 16, 8, seed=1).float()
    k_hat = (k + 0.05 * randn(2, 2, 16, 8, seed=2)).float()
    m = kvtheory.attention_metrics(q, k, k_hat, causal=causal, return_per_query=True)
    per, ref = m.per_query, _reference(q, k, k_hat, causal)
    for name in ("kl", "fisher", "margin", "top1_prob", "topk_overlap"):
        assert not torch.isnan(getattr(per, name)).any(), name
    assert torch.isfinite(per.kl).all() and torch.isfinite(per.fisher).all()
    assert bool(((per.top1_prob > 0) & (per.top1_prob <= 1)).all())
    assert torch.equal(per.flip, ref["flip"])  # the argmax and the flips are right
    if scale > 1:
        assert bool(per.flip.any()) and float(ref["kl"].max()) > 10  # the test reaches the regime it claims
    # KL and Fisher are right up to the rounding of float32 logits of this size
    s_max, d_max = float(ref["logit_scale"]), float(ref["delta_scale"])
    assert float((per.kl.double() - ref["kl"]).abs().max()) <= RTOL32 * s_max
    assert float((per.fisher.double() - ref["fisher"]).abs().max()) <= RTOL32 * s_max * d_max
    assert_close(torch.where(torch.isinf(ref["margin"]), 0, per.margin.double()),
                 torch.where(torch.isinf(ref["margin"]), 0, ref["margin"]), "approx")
    assert torch.equal(torch.isinf(per.margin), torch.isinf(ref["margin"]))
    assert torch.equal(kvtheory.flip_rate(q, k, k_hat, causal), m.flip_rate)


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_no_spurious_damage_at_large_logits(scale):
    """K_hat = K: no flip, KL = Fisher = 0, full top-k overlap, even when exp(s) would overflow."""
    q, k = (randn(1, 4, 16, 8) * scale).float(), randn(1, 2, 16, 8, seed=1).float()
    m = kvtheory.attention_metrics(q, k, k.clone(), v=randn(1, 2, 16, 8, seed=3).float())
    assert m.mean() == {"flip_rate": 0.0, "topk_overlap": 1.0, "kl": 0.0, "fisher": 0.0,
                        "output_rel_err": 0.0, "n_queries": 64.0}


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_fisher_and_kl_large_logits_float32(scale):
    s, delta = randn(64, 32) * scale, randn(64, 32, seed=1) * scale
    sf, df = s.float(), delta.float()
    kl = kvtheory.softmax_kl(sf, df)
    ref = (torch.softmax(sf.double(), -1) * (torch.log_softmax(sf.double(), -1)
                                             - torch.log_softmax(sf.double() + df.double(), -1))).sum(-1)
    assert torch.isfinite(kl).all() and bool((kl >= 0).all())
    assert float((kl.double() - ref).abs().max()) <= RTOL32 * float(sf.abs().max() + df.abs().max())
    p = fisher.masked_softmax(sf)
    assert torch.isfinite(p).all()
    assert_close(p.sum(-1).double(), torch.ones(64, dtype=torch.float64), "float32")
    assert torch.equal(p.argmax(-1), s.argmax(-1))
    dmg = kvtheory.fisher_damage(p, df)
    assert torch.isfinite(dmg).all() and bool((dmg >= 0).all())
    p64, d64 = p.double(), df.double()
    dref = 0.5 * (p64 * (d64 - (p64 * d64).sum(-1, keepdim=True)).square()).sum(-1)
    assert float((dmg.double() - dref).abs().max()) <= RTOL32 * float(df.abs().max()) ** 2


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_bounds_large_logits_float32(scale):
    q, k, u = (randn(4, 8) * scale).float(), randn(24, 8, seed=1).float(), randn(8, seed=2).float()
    kl = bounds.projection_kl(q, k, u)
    kl64 = bounds.projection_kl(q.double(), k.double(), u.double())
    s_max = float((q.double() @ k.double().T).abs().max()) / math.sqrt(8)
    assert torch.isfinite(kl).all() and bool((kl >= 0).all())
    assert float((kl.double() - kl64).abs().max()) <= RTOL32 * s_max
    for metric in ("fisher", "kl"):
        r = bounds.rounded_quant_damage(q, k, u, 4, metric=metric)
        assert torch.isfinite(r).all() and bool((r >= 0).all())
    cert = bounds.margin_certificate(q, k, torch.full((8,), 0.01))
    cert64 = bounds.margin_certificate(q.double(), k.double(), torch.full((8,), 0.01, dtype=torch.float64))
    assert torch.isfinite(cert.margin).all() and torch.equal(cert.certified, cert64.certified)
