"""Property and fuzz suite (hypothesis, 300 generated cases per property; issue 5).

* compressors: shape and dtype preserved; ``fp`` exact; quantization error <= Delta/2;
  rank-d projection is the identity for every basis; quantization is idempotent;
* ledger: the bits per element of a spec equal its compressor's (or both refuse the spec);
  ``matched()`` never exceeds the budget and returns the largest setting of each family;
* metrics: KL >= 0, Fisher >= 0, flip rate 0 (and KL, Fisher 0, overlap 1) when K_hat = K,
  flip rate and top-k overlap in [0, 1], strata counts consistent;
* spec parser: arbitrary strings and objects give a MethodSpec or a KVTheoryError, nothing else;
  what parses is a fixed point of ``str``; valid specs round-trip, options in any order.

Tensors are drawn from seeds (fast) except where hypothesis should pick the values themselves
(quantization bounds, where ties, constants and wide ranges matter).
"""

from __future__ import annotations

import inspect
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tol import TOL, assert_close

import kvtheory
from kvtheory import bases, compress, fisher, ledger
from kvtheory.compress import FP, MethodSpec, Quantize, RankReduce, make_compressor
from kvtheory.errors import KVTheoryError
from kvtheory.quantize import quantize, quantize_with_steps

N = 300
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
fuzz = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL, ATOL = TOL["float64"]
BASES = ["identity", "pca", "pcac", "random", "random7", "hadamard", "qaware"]
parse = inspect.unwrap(compress.parse_method)  # without the test-time type checker: any object


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread (two spin-waiting threads cost ~20x the CPU on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def randn(shape, seed, dtype=torch.float64, scale=1.0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x * scale).to(dtype)


# ============================================================================ spec strategies
@st.composite
def spec_parts(draw, d: int | None = None):
    """(kind, bits, rank, basis, group, symmetric) of a valid spec; valid for head dim ``d`` if given."""
    kind = draw(st.sampled_from(["fp", "int", "kivi", "rot", "rank", "hybrid"]))
    if kind == "fp":
        return ("fp", None, None, None, None, False)
    if kind == "rank":
        r = draw(st.integers(1, d if d else 200))
        return ("rank", None, r, draw(st.sampled_from(BASES)), None, False)
    bits = draw(st.integers(1, 16))
    sym = bits >= 2 and draw(st.booleans())
    if kind == "hybrid":
        r = draw(st.integers(1, d if d else 200))
        group = draw(st.sampled_from([None] + [g for g in (1, 2, 4, 8, 16, 32) if r % g == 0]))
        return ("hybrid", bits, r, draw(st.sampled_from(BASES)), group, sym)
    if kind == "kivi":
        return ("kivi", bits, None, None, draw(st.sampled_from([None, 1, 3, 32, 128, 1000])), sym)
    groups = [None] + ([g for g in (1, 2, 4, 8, 16) if d % g == 0] if d else [1, 2, 3, 16, 32, 64, 96, 1000])
    basis = draw(st.sampled_from(BASES)) if kind == "rot" else None
    return ("int", bits, None, basis, draw(st.sampled_from(groups)), sym)


def canonical(parts) -> str:
    kind, bits, rank, basis, group, sym = parts
    head = {"fp": "fp", "int": f"int{bits}", "kivi": f"int{bits}-kivi", "rank": f"rank{rank}",
            "hybrid": f"rank{rank}x{bits}"}[kind]
    return head + (f"-{basis}" if basis else "") + (f"-g{group}" if group else "") + ("-sym" if sym else "")


def _fitted(comp, kv_heads: int, d: int, seed: int):
    if not comp.needs_fit:
        return comp
    return comp.fit(randn((2, kv_heads, 12, d), seed + 1), randn((2, 2 * kv_heads, 12, d), seed + 2))


# ============================================================================ compressors
@fuzz
@given(data=st.data(), d=st.sampled_from([4, 8, 16]), batch=st.integers(1, 2), heads=st.integers(1, 2),
       tokens=st.integers(1, 10), dtype=st.sampled_from(DTYPES),
       role=st.sampled_from(["k", "v"]), seed=st.integers(0, 2**31), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_compressor_preserves_shape_and_dtype(data, d, batch, heads, tokens, dtype, role, seed, scale):
    spec = canonical(data.draw(spec_parts(d)))
    comp = _fitted(make_compressor(spec, role), heads, d, seed)
    x = randn((batch, heads, tokens, d), seed, dtype, scale)
    y = comp(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()
    if spec == "fp":
        assert torch.equal(y, x)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def values(draw, max_tokens=6, d_choices=(1, 2, 4)):
    """A (batch 1, token, d) float64 tensor whose values hypothesis picks (ties and constants too)."""
    d = draw(st.sampled_from(d_choices))
    t = draw(st.integers(1, max_tokens))
    pool = draw(st.lists(finite, min_size=1, max_size=4))  # few distinct values: ties, constant groups
    elems = draw(st.lists(st.one_of(finite, st.sampled_from(pool)), min_size=t * d, max_size=t * d))
    return torch.tensor(elems, dtype=torch.float64).view(1, t, d)


@fuzz
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 16)),
       seed=st.integers(0, 2**31), scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
       dtype=st.sampled_from(DTYPES))
def test_fp_is_exact(shape, seed, scale, dtype):
    x = randn(shape, seed, dtype, scale if dtype in (torch.float64, torch.float32) else min(scale, 1.0))
    y = FP()(x)
    assert torch.equal(y, x) and y.dtype == dtype and y.data_ptr() != x.data_ptr()
    assert torch.equal(make_compressor("fp", "v")(x), x)


def _quant_args(draw, x):
    axis = draw(st.sampled_from(["token", "channel"]))
    d, t = x.shape[-1], x.shape[-2]
    sizes = [g for g in (1, 2, 4) if d % g == 0] if axis == "token" else [1, 2, 3, 128]
    group = draw(st.sampled_from([None] + sizes))
    bits = draw(st.integers(1, 16))
    return bits, axis, group, bits >= 2 and draw(st.booleans())


@fuzz
@given(x=values(), data=st.data())
def test_quantization_error_at_most_half_a_step(x, data):
    bits, axis, group, sym = _quant_args(data.draw, x)
    x_hat, steps = quantize_with_steps(x, bits, axis=axis, group=group, symmetric=sym)
    err = (x_hat - x).abs()
    assert bool((err <= steps / 2 + RTOL * x.abs() + ATOL).all())
    assert bool((x_hat[steps == 0] == x[steps == 0]).all())  # a constant group is exact
    # the compressor is the same quantizer
    comp = Quantize(bits, axis, group, sym)
    assert torch.equal(comp(x[None]), x_hat[None])


@fuzz
@given(x=values(), data=st.data())
def test_quantization_is_idempotent(x, data):
    bits, axis, group, sym = _quant_args(data.draw, x)
    once = quantize(x, bits, axis=axis, group=group, symmetric=sym)
    twice = quantize(once, bits, axis=axis, group=group, symmetric=sym)
    scale = float(x.abs().max())
    assert float((twice - once).abs().max()) <= RTOL * scale + ATOL


@fuzz
@given(basis=st.sampled_from(BASES), d=st.sampled_from([1, 2, 4, 8]), heads=st.integers(1, 2),
       tokens=st.integers(1, 10), seed=st.integers(0, 2**31), scale=st.sampled_from([1e-2, 1.0, 1e2]))
def test_rank_d_projection_is_the_identity(basis, d, heads, tokens, seed, scale):
    comp = _fitted(RankReduce(bases.basis_from_name(basis), d), heads, d, seed)
    x = randn((2, heads, tokens, d), seed, scale=scale)
    assert_close(comp(x), x, "float64", msg=f"{basis}: rank d must reproduce x")
    fb = comp.fitted if comp.fitted is not None else bases.basis_from_name(basis).fit(x)
    u = fb.rotation
    assert_close(u.mT @ u, torch.eye(d, dtype=u.dtype).expand_as(u), "float64")  # orthonormal columns


# ============================================================================ ledger
D_CHOICES = [6, 8, 12, 16, 32, 64, 96, 128]


@fuzz
@given(parts=spec_parts(), d=st.sampled_from(D_CHOICES), tokens=st.one_of(st.none(), st.integers(1, 5000)),
       role=st.sampled_from(["k", "v"]))
def test_ledger_equals_compressor_bits(parts, d, tokens, role):
    spec = canonical(parts)
    outcomes = []
    for compute in (lambda: ledger.bits_per_element(spec, d, tokens, role=role),
                    lambda: make_compressor(spec, role).bits_per_element(d, tokens)):
        try:
            outcomes.append(compute())
        except KVTheoryError as exc:
            outcomes.append(exc)
    a, b = outcomes
    if isinstance(a, KVTheoryError) or isinstance(b, KVTheoryError):
        assert isinstance(a, KVTheoryError) and isinstance(b, KVTheoryError), (spec, d, a, b)
        return
    assert_close(a, b, "exact64", msg=spec)
    row = ledger.breakdown(spec, d, tokens, role=role)
    assert_close(row.total, a, "exact64")
    assert row.payload > 0 and row.scales >= 0 and row.basis >= 0
    # a quantized payload is exactly its bits (scaled by r/d for a hybrid); fp is 16
    kind, bits, rank, *_ = parts
    payload = {"fp": 16, "rank": 16 * (rank or 0) / d,
               "hybrid": (bits or 0) * (rank or 0) / d}.get(kind, bits)
    assert_close(row.payload, payload, "exact64")


def _matched_by_hand(budget, d, tokens, basis, role, hybrid):
    """An independent brute force of ``matched``: every family's storage written out (ledger
    module docstring), scanned exhaustively; a spec fits when its exact bits are <= budget or
    round to a float <= budget."""
    F = Fraction  # noqa: N806
    name = bases.basis_from_name(basis).name

    def basis_bits(r):
        if tokens is None or name == "hadamard" or name.startswith("random"):
            return F(0)
        stored = r if name == "identity" else d * r + (d if name == "pcac" else 0)  # indices or fp16 numbers
        return F(16 * stored, d * tokens)

    kivi_group = F(128) if tokens is None else F(tokens, -(-tokens // 128))
    families = [("fp", [("fp", F(16))]),
                ("int", [(f"int{b}", b + F(32, d)) for b in range(1, 17)]),
                ("kivi", [(f"int{b}-kivi", b + (32 / kivi_group if role == "k" else F(32, d)))
                          for b in range(1, 17)]),
                ("rank", [(f"rank{r}-{name}", F(16 * r, d) + basis_bits(r)) for r in range(1, d + 1)])]
    families += [("hybrid", [(f"rank{r}x{b}-{name}", F(r, d) * (b + F(32, r)) + basis_bits(r))
                             for r in range(1, d + 1)]) for b in hybrid]
    out = []
    for family, costs in families:
        fits = [(spec, c) for spec, c in costs if c <= F(budget) or float(c) <= budget]
        if fits:
            out.append(ledger.Setting(fits[-1][0], family, float(fits[-1][1])))
    return out


@fuzz
@given(budget=st.one_of(st.floats(0.05, 20, allow_nan=False),
                        st.sampled_from([16 / 3, 4.5, 4.25, 1 / 3, 2.0, 16.0, 0.5 + 1 / 48])),
       d=st.sampled_from([8, 16, 48, 64]), tokens=st.one_of(st.none(), st.integers(1, 4096)),
       basis=st.sampled_from(["pca", "pcac", "identity", "random3", "hadamard", "qaware"]),
       role=st.sampled_from(["k", "v"]),
       hybrid=st.lists(st.integers(1, 16), min_size=0, max_size=3, unique=True))
def test_matched_never_exceeds_the_budget(budget, d, tokens, basis, role, hybrid):
    assume(basis != "hadamard" or d & (d - 1) == 0)
    got = ledger.matched(budget, d, tokens, basis=basis, role=role, hybrid_bits=hybrid)
    assert all(s.bits_per_element <= budget for s in got)
    # and each is the largest of its family; a family is missing only when nothing of it fits
    assert got == _matched_by_hand(budget, d, tokens, basis, role, hybrid)


# ============================================================================ metrics
@fuzz
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), rows=st.integers(1, 4),
       s_scale=st.sampled_from([0.0, 1.0, 30.0, 1e3]),
       d_scale=st.sampled_from([0.0, 1e-8, 1e-3, 1.0, 50.0, 1e3]),
       masked=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_kl_and_fisher_are_nonnegative(seed, n, rows, s_scale, d_scale, masked, dtype):
    s, delta = randn((rows, n), seed, dtype, s_scale), randn((rows, n), seed + 1, dtype, d_scale)
    mask = (torch.rand(rows, n, generator=torch.Generator().manual_seed(seed)) > 0.4) if masked else None
    kl = kvtheory.softmax_kl(s, delta, mask)
    dmg = kvtheory.fisher_damage(fisher.masked_softmax(s, mask), delta, mask)
    assert kl.shape == dmg.shape == (rows,)
    assert bool((kl >= 0).all()) and bool((dmg >= 0).all())
    assert torch.isfinite(kl).all() and torch.isfinite(dmg).all()
    if d_scale == 0.0:
        assert bool((kl == 0).all()) and bool((dmg == 0).all())
    # a constant shift of delta changes neither (softmax invariance), up to the rounding of s + delta
    rtol = TOL["float64" if dtype == torch.float64 else "float32"][0]
    logits = float(s.abs().max() + delta.abs().max()) + 3.0
    shifted = kvtheory.softmax_kl(s, delta + 3.0, mask)
    assert float((shifted - kl).abs().max()) <= rtol * (logits + float(kl.max()))


@st.composite
def attention_case(draw):
    """Random q, k (with ties when keys are drawn from {-1, 0, 1}), GQA shape, causal, padding."""
    b, kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d, t = draw(st.sampled_from([1, 2, 4, 8])), draw(st.integers(1, 8))
    causal = draw(st.booleans())
    n_q = draw(st.integers(1, t)) if causal else draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31))
    q = randn((b, kv * g, n_q, d), seed, scale=draw(st.sampled_from([1.0, 10.0, 1e3])))
    if draw(st.booleans()):  # ties everywhere
        k = torch.randint(-1, 2, (b, kv, t, d), generator=torch.Generator().manual_seed(seed + 1)).double()
    else:
        k = randn((b, kv, t, d), seed + 1)
    key_mask = None
    if draw(st.booleans()):
        key_mask = torch.rand(b, t, generator=torch.Generator().manual_seed(seed + 2)) > 0.3
        key_mask[:, -1] = True  # the last query sees at least one token: every head has a query
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return q.to(dtype), k.to(dtype), causal, key_mask, seed


@fuzz
@given(case=attention_case(), topk=st.integers(1, 6))
def test_no_flip_and_no_damage_when_k_hat_equals_k(case, topk):
    q, k, causal, key_mask, seed = case
    v = randn(k.shape, seed + 3, k.dtype)
    m = kvtheory.attention_metrics(q, k, k.clone(), v, causal=causal, key_mask=key_mask, topk=topk,
                                   return_per_query=True)
    assert m.flip_rate.tolist() == [0.0] * q.shape[1]
    assert m.kl.tolist() == m.fisher.tolist() == m.output_rel_err.tolist() == [0.0] * q.shape[1]
    assert m.topk_overlap.tolist() == [1.0] * q.shape[1]
    assert int(m.margin_flips.sum()) == 0 and int(m.prob_flips.sum()) == 0


@fuzz
@given(case=attention_case(), noise=st.sampled_from([1e-6, 1e-2, 0.3, 3.0, 100.0]), topk=st.integers(1, 6))
def test_metric_ranges(case, noise, topk):
    q, k, causal, key_mask, seed = case
    k_hat = k + randn(k.shape, seed + 4, k.dtype, noise)
    m = kvtheory.attention_metrics(q, k, k_hat, randn(k.shape, seed + 3, k.dtype), causal=causal,
                                   key_mask=key_mask, topk=topk, return_per_query=True)
    for name in ("flip_rate", "topk_overlap"):
        x = getattr(m, name)
        assert bool(((x >= 0) & (x <= 1)).all()), (name, x)
    for name in ("kl", "fisher", "output_rel_err"):
        assert bool((getattr(m, name) >= 0).all()), name
    pq = m.per_query
    ok = pq.valid.unsqueeze(1).expand_as(pq.flip)
    assert bool(((pq.topk_overlap[ok] >= 0) & (pq.topk_overlap[ok] <= 1)).all())
    assert bool(((pq.top1_prob[ok] > 0) & (pq.top1_prob[ok] <= 1)).all())
    assert bool((pq.margin[ok] >= 0).all()) and not torch.isnan(pq.kl[ok]).any()
    assert bool(pq.topk_overlap[~ok].isnan().all())
    # strata: every counted query is in exactly one bin; flips per head add up to the rate
    n = m.n_queries
    assert m.margin_counts.sum(1).tolist() == m.prob_counts.sum(1).tolist() == [n] * q.shape[1]
    assert bool((m.margin_flips <= m.margin_counts).all())
    assert_close(m.margin_flips.sum(1).double() / n, m.flip_rate, "float64")
    assert torch.equal(kvtheory.flip_rate(q, k, k_hat, causal, key_mask=key_mask), m.flip_rate)


# ============================================================================ spec parser
TOKENS = ["fp", "int", "rank", "x", "-", "g", "sym", "kivi", "pca", "pcac", "random", "hadamard", "qaware",
          "identity", "0", "1", "4", "8", "16", "17", "32", "99999999999999999999999", "٣", " ", "--",
          "X", "_"]
fragments = st.lists(st.sampled_from(TOKENS), min_size=0, max_size=8).map("".join)


def _parse_or_error(spec):
    try:
        return parse(spec)
    except KVTheoryError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith(("spec: got", "bits: got", "rank: got", "group: got", "seed: got"))
        return None


@fuzz
@given(spec=st.one_of(st.text(max_size=30), fragments, fragments.map(lambda s: s.lower())))
def test_random_strings_parse_or_raise_kvtheory_error(spec):
    m = _parse_or_error(spec)
    if m is None:
        return
    assert isinstance(m, MethodSpec)
    text = str(m)
    assert parse(text) == m and str(parse(text)) == text  # canonical form is a fixed point
    assert re.fullmatch(r"[a-z0-9-]+", text)
    try:
        comp = make_compressor(m)
    except KVTheoryError:
        return
    assert callable(comp) and comp == make_compressor(text)


@fuzz
@given(obj=st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=8),
                     st.lists(st.text(max_size=4)),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_non_string_specs_raise_kvtheory_error(obj):
    with pytest.raises(KVTheoryError, match=r"^spec: got .*; expected a method spec"):
        parse(obj)


@fuzz
@given(parts=spec_parts(), data=st.data())
def test_valid_specs_round_trip(parts, data):
    text = canonical(parts)
    m = parse(text)
    kind, bits, rank, basis, group, sym = parts
    assert str(m) == text
    assert (m.kind, m.bits, m.rank, m.group, m.symmetric) == (kind, bits, rank, group, sym)
    assert m.basis == (bases.basis_from_name(basis).name if basis else None)
    # options after the head may come in any order
    head, *opts = text.split("-")
    shuffled = "-".join([head, *data.draw(st.permutations(opts))])
    assert parse(shuffled) == m
    assert parse(m) is m  # a MethodSpec passes through
    assert kvtheory.parse_method(text) == m  # the typed entry point agrees
