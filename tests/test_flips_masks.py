"""kvtheory.flips: sliding windows, per-head key masks, range safety, grad inputs, the fused-kernel
switch (issues 9, 11, 12, 13).

Independent check: a dense float64 reference (``_dense_flips.py``) that builds the whole
softmax under the mask and computes each metric from its definition; the window rule is checked
against transformers' own ``sliding_window_causal`` mask function.
"""

import importlib
import math
import subprocess
import sys

import pytest
import torch
from _dense_flips import dense_metrics, dense_visibility
from tol import assert_close

from kvtheory.errors import KVTheoryError
from kvtheory.flips import attention_metrics, flip_rate

METRICS = ("margin", "top1_prob", "topk_overlap", "kl", "fisher", "output_rel_err")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed, B=2, hq=6, hkv=2, Q=23, T=31, d=8, noise=0.5, values=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, Q, d, generator=g)
    k = torch.randn(B, hkv, T, d, generator=g)
    kh = k + noise * torch.randn(B, hkv, T, d, generator=g)
    if not values:
        return q, k, kh, None, None
    v = torch.randn(B, hkv, T, 5, generator=g)
    return q, k, kh, v, v + 0.3 * torch.randn(B, hkv, T, 5, generator=g)


def _check_against_dense(q, k, kh, v, vh, *, block=None, **kw):
    m = attention_metrics(q, k, kh, v, vh, return_per_query=True, block=block, **kw)
    ref = dense_metrics(q, k, kh, v, vh, **kw)
    pq = m.per_query
    vm = ref["valid"]
    assert torch.equal(~torch.isnan(pq.kl), vm), "valid (head, query) pairs differ"
    assert torch.equal(pq.flip, ref["flip"])
    for name in METRICS:
        x = getattr(pq, name)
        if x is None:
            assert name == "output_rel_err" and v is None
            continue
        assert_close(x[vm], ref[name][vm], "float64", msg=name)
    # head means over the valid pairs of that head
    w = vm.double()
    assert_close(m.flip_rate, (ref["flip"].double() * w).sum((0, 2)) / w.sum((0, 2)), "float64")
    assert_close(m.kl, torch.where(vm, ref["kl"], 0).sum((0, 2)) / w.sum((0, 2)), "float64")
    fr = flip_rate(q, k, kh, kw.get("causal", True), key_mask=kw.get("key_mask"),
                   window=kw.get("window"), block=block)
    assert_close(fr, m.flip_rate, "float64")
    return m, ref


@pytest.mark.parametrize("window", [1, 2, 7, 30, 100])
@pytest.mark.parametrize("block", [None, 5])
def test_window_matches_dense_reference(window, block):
    q, k, kh, v, vh = _inputs(window, values=True)
    m, ref = _check_against_dense(q, k, kh, v, vh, causal=True, window=window, block=block)
    # a query sees min(window, its position + 1) tokens: with window 1 only itself
    vis, _ = dense_visibility(2, 6, 2, 23, 31, True, window, None, "cpu")
    pos = torch.arange(31 - 23, 31)
    assert torch.equal(vis.sum(-1)[0, 0], torch.clamp(pos + 1, max=window))
    if window == 1:
        assert m.mean()["flip_rate"] == 0.0 and m.mean()["kl"] == 0.0


def test_window_is_transformers_sliding_window_causal():
    masking = pytest.importorskip("transformers.masking_utils")
    Q = T = 12
    for w in (1, 3, 5, 12):
        fn = masking.sliding_window_causal_mask_function(w)
        theirs = torch.tensor([[bool(fn(0, 0, torch.tensor(i), torch.tensor(j)))
                                for j in range(T)] for i in range(Q)])
        ours, _ = dense_visibility(1, 1, 1, Q, T, True, w, None, "cpu")
        assert torch.equal(ours[0, 0], theirs), w
        rule = torch.tensor([[i - w < j <= i for j in range(T)] for i in range(Q)])
        assert torch.equal(rule, theirs)


@pytest.mark.parametrize("kind", ["kv", "q", "shared3d"])
@pytest.mark.parametrize("window", [None, 9])
def test_per_head_key_mask_matches_dense_reference(kind, window):
    q, k, kh, v, vh = _inputs(3, values=True)
    g = torch.Generator().manual_seed(11)
    heads = {"kv": 2, "q": 6, "shared3d": 1}[kind]
    km = torch.rand(2, heads, 31, generator=g) > 0.45
    _check_against_dense(q, k, kh, v, vh, causal=True, window=window, key_mask=km)
    _check_against_dense(q, k, kh, v, vh, causal=True, window=window, key_mask=km, block=4)
    if window is None:
        _check_against_dense(q, k, kh, v, vh, causal=False, key_mask=km)


def test_per_head_mask_equal_across_heads_equals_shared_mask():
    q, k, kh, v, vh = _inputs(5, values=True)
    km = torch.rand(2, 31, generator=torch.Generator().manual_seed(2)) > 0.3
    a = attention_metrics(q, k, kh, v, vh, key_mask=km, return_per_query=True)
    for heads in (1, 2, 6):
        b = attention_metrics(q, k, kh, v, vh, key_mask=km[:, None].expand(2, heads, 31),
                              return_per_query=True)
        assert a.n_queries == b.n_queries
        for name in ("flip_rate", "kl", "fisher", "topk_overlap", "output_rel_err"):
            assert_close(getattr(b, name), getattr(a, name), "float64", msg=name)
        assert torch.equal(a.margin_counts, b.margin_counts)


def test_head_that_sees_nothing_is_left_out_of_its_mean():
    # KV head 0 keeps no token before position 10: its queries at positions < 10 see nothing
    q, k, kh, _, _ = _inputs(7, B=1, Q=31)
    km = torch.ones(1, 2, 31, dtype=torch.bool)
    km[0, 0, :10] = False
    m = attention_metrics(q, k, kh, key_mask=km, return_per_query=True)
    pq = m.per_query
    assert bool(pq.valid.all())                       # every position is real in some head
    assert bool(torch.isnan(pq.kl[0, :3, :10]).all())  # query heads 0-2 read KV head 0
    assert not bool(torch.isnan(pq.kl[0, 3:]).any())
    assert not bool(pq.flip[0, :3, :10].any())
    ref = dense_metrics(q, k, kh, key_mask=km)
    w = ref["valid"].double()
    assert_close(m.flip_rate, (ref["flip"].double() * w).sum((0, 2)) / w.sum((0, 2)), "float64")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_window_must_be_a_positive_int(bad):
    q, k, kh, _, _ = _inputs(0)
    with pytest.raises(KVTheoryError, match="window"):
        attention_metrics(q, k, kh, window=bad)
    with pytest.raises(KVTheoryError, match="window"):
        flip_rate(q, k, kh, window=bad)


def test_window_needs_causal():
    q, k, kh, _, _ = _inputs(0)
    with pytest.raises(KVTheoryError, match="window"):
        attention_metrics(q, k, kh, causal=False, window=4)


@pytest.mark.parametrize("shape", [(2, 3, 31), (2, 6, 30), (3, 2, 31), (2, 2, 2, 31)])
def test_key_mask_shapes_are_checked(shape):
    q, k, kh, _, _ = _inputs(0)
    with pytest.raises(KVTheoryError, match="key_mask"):
        attention_metrics(q, k, kh, key_mask=torch.ones(shape, dtype=torch.bool))


# ---------------------------------------------------------------- range safety (issue 11)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_that_overflow_float32_are_computed_in_float64(dtype):
    q, k, kh, _, _ = _inputs(1, B=1, hq=2, hkv=1, Q=9, T=9, noise=0.3)
    q, k, kh = (x * 1e20 for x in (q, k, kh))      # finite inputs, logits ~1e40
    q, k, kh = (x.to(dtype) for x in (q, k, kh))
    m = attention_metrics(q, k, kh, return_per_query=True)
    ref = dense_metrics(q.double(), k.double(), kh.double())
    vm = ref["valid"]
    for name in ("kl", "fisher", "top1_prob", "margin"):
        x = getattr(m.per_query, name)[vm]
        assert not bool(torch.isnan(x).any()), name
        assert torch.equal(torch.isinf(x), torch.isinf(ref[name][vm])), name  # margin: 1 token
        assert_close(x, ref[name][vm], "float64", msg=name)
    assert torch.equal(m.per_query.flip, ref["flip"])
    assert math.isfinite(m.mean()["kl"])
    assert torch.isfinite(flip_rate(q, k, kh)).all()


def test_logits_beyond_float64_raise_a_named_error():
    q, k, kh, _, _ = _inputs(1, B=1, hq=2, hkv=1, Q=4, T=4)
    with pytest.raises(KVTheoryError, match="q"):
        attention_metrics(q.double() * 1e160, k.double() * 1e160, kh.double())
    with pytest.raises(KVTheoryError, match="q"):
        flip_rate(q.double() * 1e160, k.double() * 1e160, kh.double())


def test_requires_grad_inputs_just_work():
    q, k, kh, v, vh = _inputs(4, values=True)
    plain = attention_metrics(q, k, kh, v, vh)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, kh, v, vh)]
    m = attention_metrics(*leaves)
    for name in ("flip_rate", "kl", "fisher", "topk_overlap", "output_rel_err"):
        x = getattr(m, name)
        assert not x.requires_grad
        assert_close(x, getattr(plain, name), "float64", msg=name)
    assert_close(flip_rate(*leaves[:3]), plain.flip_rate, "float64")
    assert all(x.grad is None for x in leaves)


# ---------------------------------------------------------------- the fused kernel's switch
def test_fused_kernel_module_imports_without_triton_or_cuda():
    code = ("import sys; sys.modules['triton'] = None; "
            "import kvtheory._triton_metrics as t, torch; "
            "print(t.triton is None, t.available(torch.device('cpu'), torch.bfloat16), "
            "t.available(torch.device('cuda'), torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_fused_switch_is_validated(monkeypatch):
    tm = importlib.import_module("kvtheory._triton_metrics")
    monkeypatch.setenv("KVTHEORY_FUSED", "sometimes")
    with pytest.raises(KVTheoryError, match="KVTHEORY_FUSED"):
        tm.available(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setenv("KVTHEORY_FUSED", "never")
    assert tm.available(torch.device("cuda"), torch.bfloat16) is False
    # the CPU path never takes the kernel, and the result does not depend on the switch
    q, k, kh, _, _ = _inputs(8)
    a = attention_metrics(q.bfloat16(), k.bfloat16(), kh.bfloat16())
    monkeypatch.setenv("KVTHEORY_FUSED", "auto")
    calls = tm.CALLS[0]
    b = attention_metrics(q.bfloat16(), k.bfloat16(), kh.bfloat16())
    assert tm.CALLS[0] == calls
    assert_close(a.kl, b.kl, "exact64")


# ---------------------------------------------------------------- the fused kernel's algebra
def _phi(u):
    return torch.expm1(u) - u


def _stream_like_the_kernel(s, sh, block):
    """The fused kernel's per-row streaming update (kvtheory/_triton_metrics.py), in float64
    torch: sums about the delta of the running top token, re-referenced when it moves."""
    R, T = s.shape
    m1 = torch.full((R,), -math.inf, dtype=s.dtype)
    c = torch.zeros(R, dtype=s.dtype)
    W, S1, S2, PH = (torch.zeros(R, dtype=s.dtype) for _ in range(4))
    for a in range(0, T, block):
        sb, shb = s[:, a:a + block], sh[:, a:a + block]
        bm, bi = sb.max(1)
        sh_b = shb.gather(1, bi[:, None]).squeeze(1)
        cn = torch.where(bm > m1, sh_b - bm, c)
        e, c = c - cn, cn
        m1n = torch.maximum(m1, bm)
        w = torch.exp(sb - bm[:, None])
        u = (shb - sb) - c[:, None]
        alpha = torch.where(torch.isinf(m1), 0.0, torch.exp(m1 - m1n))
        beta = torch.exp(bm - m1n)
        Wa, S1a = W * alpha, S1 * alpha
        PHa = torch.exp(e) * (PH * alpha) + Wa * _phi(e) + S1a * torch.expm1(e)
        S2 = S2 * alpha + e * (2 * S1a + Wa * e) + (w * u * u).sum(1) * beta
        S1 = S1a + Wa * e + (w * u).sum(1) * beta
        PH = PHa + (w * _phi(u)).sum(1) * beta
        W = Wa + w.sum(1) * beta
        m1 = m1n
    h = -S1 / W
    fisher = 0.5 * (S2 / W - h * h)
    kl = torch.log1p((torch.exp(h) * PH + W * (torch.exp(h) * (1 - h) - 1)) / W)
    return kl, fisher, 1 / W


@pytest.mark.parametrize("block", [1, 3, 16, 64])
@pytest.mark.parametrize("spread", [0.05, 1.0, 8.0])
def test_fused_kernel_streaming_algebra_matches_the_dense_definitions(block, spread):
    g = torch.Generator().manual_seed(block)
    s = 3 * torch.randn(40, 64, generator=g, dtype=torch.float64)
    sh = s + spread * torch.randn(40, 64, generator=g, dtype=torch.float64) + 2.5  # a shift too
    kl, fisher, p1 = _stream_like_the_kernel(s, sh, block)
    p = torch.softmax(s, 1)
    logp, logph = torch.log_softmax(s, 1), torch.log_softmax(sh, 1)
    delta = sh - s
    mu = (p * delta).sum(1, keepdim=True)
    assert_close(kl, (p * (logp - logph)).sum(1), "float64")
    assert_close(fisher, 0.5 * (p * (delta - mu) ** 2).sum(1), "float64")
    assert_close(p1, p.amax(1), "float64")


@pytest.mark.parametrize("deg, bound", [(3, 1 / 16), (6, 1 / 2), (8, 1.0)])
def test_fused_kernel_series_degrees_stay_within_float32_rounding(deg, bound):
    """The kernel's per-block choice (kvtheory/_triton_phi.py, ``_block_phi``): the series
    phi(u)/u^2 = sum_n u^n/(n+2)! cut after ``deg`` where max|u| < ``bound``. Its relative
    error in phi stays under 6.3e-8, about half a float32 unit (the module docstring's claim),
    against expm1 in float64 over [-bound, bound]."""
    worst = 0.0
    for i in range(-400, 401):
        u = bound * i / 400
        if u == 0:
            continue
        kept = sum(u ** n / math.factorial(n + 2) for n in range(deg + 1))
        exact = (math.expm1(u) - u) / u ** 2
        worst = max(worst, abs(kept - exact) / exact)
    assert 1e-8 < worst < 6.3e-8


def test_dense_reference_gaps_by_hand():
    # one query, d = 1, scale 1: s = q·k = the keys themselves, s^ = the perturbed keys
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([3.0, 1.0, 2.5, 0.5]).view(1, 1, 4, 1)
    kh = torch.tensor([2.0, 2.75, 1.0, 0.0]).view(1, 1, 4, 1)
    ref = dense_metrics(q, k, kh, causal=False, topk=2, scale=1.0)
    # s sorted 3, 2.5, 1, 0.5; s^ sorted 2.75, 2, 1, 0
    assert float(ref["gap_s"]) == 0.5 and float(ref["gap_sh"]) == 0.75
    assert float(ref["gap_ks"]) == 1.5 and float(ref["gap_ksh"]) == 1.0   # 2nd minus 3rd
    assert float(ref["gap_flip"]) == 0.75       # max s^ (2.75) minus s^ at the top of s (2.0)
    # top k of all 4 keys: no k+1-th to tie with
    full = dense_metrics(q, k, kh, causal=False, topk=4, scale=1.0)
    assert math.isinf(float(full["gap_ks"])) and math.isinf(float(full["gap_ksh"]))
