"""kvpress adapter: presses on transformers 5.x, recorded keep masks, eviction metrics, PPL route."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, strategies as st

from tol import assert_close

kvpress = pytest.importorskip("kvpress", reason="optional kvpress not installed "
                              "(pip install --no-deps 'kvpress>=0.5.5,<0.6')")

from kvtheory.errors import KVTheoryError  # noqa: E402
from kvtheory.integrations.kvpress import (  # noqa: E402
    compat_kwargs, eviction_metrics, eviction_perplexity, keep_mask, make_press, press_context,
    score_window,
)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).float().eval()


def test_compat_kwargs_cache_position():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 7, 4)
    cache.update(k, k, 0)

    class M:
        layer_idx = 0

    out = compat_kwargs(M(), {"cache": cache, "hidden_states": torch.zeros(1, 3, 8)})
    assert out["past_key_values"] is cache
    assert out["cache_position"].tolist() == [4, 5, 6]  # the last 3 of 7 cached positions
    with pytest.raises(KVTheoryError, match="cache"):
        compat_kwargs(M(), {"hidden_states": torch.zeros(1, 3, 8)})


def test_keep_mask_and_rejections():
    b = torch.arange(24.0).view(1, 2, 4, 3)
    after = torch.stack([b[0, 0, [2, 0]], b[0, 1, [3, 1]]])[None]
    assert keep_mask(b, after).tolist() == [[[True, False, True, False], [False, True, False, True]]]
    with pytest.raises(KVTheoryError, match="not rows"):
        keep_mask(b, after + 0.5)


def _brute(q, k, keep, v):
    """Loop over every query: the eviction measures straight from their definitions."""
    B, H, Q, d = q.shape
    T, g = k.shape[2], H // k.shape[1]
    flip, mass, kl, err = (torch.zeros(B, H, Q, dtype=torch.float64) for _ in range(4))
    for b in range(B):
        for h in range(H):
            for i in range(Q):
                n = T - Q + i + 1
                s = [float(q[b, h, i] @ k[b, h // g, j]) / math.sqrt(d) for j in range(n)]
                z = sum(math.exp(x) for x in s)
                p = [math.exp(x) / z for x in s]
                kept = [bool(keep[b, h // g, j]) for j in range(n)]
                t = max(range(n), key=lambda j: (s[j], -j))
                m = sum(pj for pj, kj in zip(p, kept) if not kj)
                ph = [pj / (1 - m) if kj else 0.0 for pj, kj in zip(p, kept)]
                flip[b, h, i] = float(not kept[t])
                mass[b, h, i] = m
                kl[b, h, i] = sum(a * math.log(a / c) for a, c in zip(ph, p) if a > 0)
                o = sum(pj * v[b, h // g, j] for j, pj in enumerate(p))
                oh = sum(pj * v[b, h // g, j] for j, pj in enumerate(ph))
                err[b, h, i] = float((o - oh).norm() / o.norm())
    return flip, mass, kl, err


@given(st.integers(0, 10_000), st.floats(0.2, 0.8))
def test_eviction_metrics_against_definitions(seed, frac):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g),
               torch.randn(1, 2, 9, 3, generator=g))
    keep = torch.rand(1, 2, 9, generator=g) < frac
    keep[..., -5:] = True  # the queries' own tokens stay (as in the PPL route)
    m = eviction_metrics(q, k, keep, v)
    flip, mass, kl, err = _brute(q, k, keep, v)
    assert torch.equal(m.flip, flip.bool()) and torch.equal(m.top_evicted, m.flip)
    assert_close(m.evicted_mass, mass, "float64")
    assert_close(m.kl_kept, kl, "float64")
    assert_close(m.kl_kept, -torch.log1p(-m.evicted_mass), "float64")  # KL(p_hat||p) = -log(1-m)
    assert_close(m.output_rel_err, err, "float64")


def test_eviction_flip_equals_engine_with_kvpress_fake_keys():
    """Second route: kvpress's own head-wise masking replaces evicted keys by a key whose logit
    underflows for every query of the group; kvtheory's flip engine then counts the same flips."""
    from kvpress.attention_patch import search_hyperplane

    from kvtheory.flips import attention_metrics

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    keep = torch.rand(1, 2, 16, generator=g) < 0.5
    keep[..., -3:] = True
    fake = search_hyperplane(q.view(2, 2 * 3, 8).float()).double()  # (kv_head, d)
    k_hat = torch.where(keep[..., None], k, fake.view(1, 2, 1, 8))
    ref = attention_metrics(q, k, k_hat).flip_rate.mean()
    assert_close(eviction_metrics(q, k, keep).flip.double().mean(), ref, "exact64")


def test_eviction_metrics_bad_input():
    raw = inspect.unwrap(eviction_metrics)  # the user-facing checks, below the jaxtyping hook
    q, k = torch.randn(1, 2, 2, 4), torch.randn(1, 1, 3, 4)
    with pytest.raises(KVTheoryError, match="keep"):
        raw(q, k, torch.ones(1, 1, 3))
    with pytest.raises(KVTheoryError, match="keep"):
        raw(q, k, torch.ones(1, 1, 4, dtype=torch.bool))
    with pytest.raises(KVTheoryError, match="keep"):  # every visible token of a query evicted
        raw(q, k, torch.zeros(1, 1, 3, dtype=torch.bool))


def test_make_press_errors():
    with pytest.raises(KVTheoryError, match="press"):
        make_press("no-such-press", 0.5)
    with pytest.raises(KVTheoryError, match="compression_ratio"):
        make_press("knorm", 1.5)


@pytest.mark.parametrize("name", ["knorm", "snapkv", "streaming", "expected"])
def test_presses_run_on_tiny_llama(name):
    """Every eviction press of the analysis runs under the adapter and keeps compute_n_kept
    tokens per KV head in every layer; the press object is restored."""
    from kvpress.utils import compute_n_kept

    model = _tiny_llama()
    kw = {"window_size": 8} if name == "snapkv" else {}
    press = make_press(name, 0.5, **kw)
    w = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(0))
    nll, rec = score_window(model, w, 32, press, record=True)
    assert "forward_hook" not in vars(press)
    assert sorted(rec.keep) == [0, 1] and math.isfinite(float(nll))
    for mask in rec.keep.values():
        assert mask.shape == (1, 2, 32)
        assert mask.sum(-1).tolist() == [[compute_n_kept(32, 0.5)] * 2]


def test_streaming_ppl_equals_masked_full_cache():
    """StreamingLLM evicts the same tokens in every head and layer, so the pruned-cache route
    equals the full model with those context tokens hidden by the attention mask (a second
    implementation that also checks the continuation's position ids)."""
    model = _tiny_llama(1)
    w = torch.randint(0, 50, (48,), generator=torch.Generator().manual_seed(1))
    n_ctx = 40
    nll, rec = score_window(model, w, n_ctx, make_press("streaming", 0.5, n_sink=4), record=True)
    keep = rec.keep[0][0, 0]
    assert keep.tolist() == [True] * 4 + [False] * 20 + [True] * 16  # hand-worked: sinks + window
    # reference: one full forward pass with a 4-D mask: context queries see every earlier token
    # (the prefill is uncompressed), continuation queries do not see the evicted ones
    T = len(w) - 1
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[n_ctx:, :n_ctx] &= keep[None, :]
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min).float()
    with torch.no_grad():
        logits = model(w[None, :-1], attention_mask=mask).logits[0, n_ctx - 1:]
    ref = torch.nn.functional.cross_entropy(logits.float(), w[n_ctx:], reduction="sum")
    assert_close(float(nll), float(ref), "float32")


def test_ppl_route_without_press_equals_plain_forward():
    model = _tiny_llama(2)
    w = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(2))
    s = eviction_perplexity(model, w, 20, n_boot=10)
    with torch.no_grad():
        logits = model(w).logits[:, 19:-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50).float(), w[:, 20:].reshape(-1))
    assert_close(s.value, float(torch.exp(ref)), "float32")
    # a press with compression ratio 0 keeps the cache as it is
    s0 = eviction_perplexity(model, w, 20, press=make_press("knorm", 0.0), n_boot=10)
    assert_close(s0.value, s.value, "float32")


@pytest.mark.slow
def test_knorm_on_smollm2_keeps_low_norm_keys_and_flip_identity(data_dir):
    """On SmolLM2: the recorded Knorm decisions are the tokens with the smallest key norms
    (recomputed from an independent capture), and the flip rate equals the fraction of
    queries whose top key was evicted."""
    from kvtheory.analysis.common import get_model, wikitext_ids
    from kvtheory.capture import capture

    lm = get_model("smollm2-135m")
    w = wikitext_ids("smollm2-135m", str(data_dir))[:160]
    _, rec = score_window(lm.model, w, 128, make_press("knorm", 0.5), record=True)
    cap = capture(lm.model, w[None], layers=[0, 15, 29])
    for layer in (0, 15, 29):
        k = cap[layer]["k"][:, :, :128]
        norms = k.norm(dim=-1)
        want = torch.zeros_like(rec.keep[layer])
        want.scatter_(-1, (-norms).topk(64, -1).indices, True)
        agree = (want == rec.keep[layer]).double().mean()
        assert float(agree) >= 0.99, (layer, float(agree))  # ties of float32 norms aside
        keep = torch.cat([rec.keep[layer], torch.ones(1, 3, 32, dtype=torch.bool)], -1)
        m = eviction_metrics(cap[layer]["q"][:, :, 128:], cap[layer]["k"], keep)
        s = cap[layer]["q"][:, :, 128:].double() @ cap[layer]["k"].double().repeat_interleave(
            3, 1).transpose(-1, -2) / 8.0
        s = s.masked_fill(torch.ones(32, 160, dtype=torch.bool).triu(129), -math.inf)
        top = s.argmax(-1)  # (1, 9, 32)
        evicted = ~keep.repeat_interleave(3, 1).gather(-1, top)
        assert_close(m.flip.double().mean(), evicted.double().mean(), "exact64")


def test_dimension_press_recorded_as_k_hat():
    """ThinK zeroes key channels instead of evicting tokens: recorded as k_hat, no keep mask."""
    model = _tiny_llama(3)
    press = kvpress.ThinKPress(key_channel_compression_ratio=0.5, window_size=8)
    w = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(3))
    _, rec = score_window(model, w, 32, press, record=True)
    for layer in (0, 1):
        assert rec.keep[layer] is None
        before, k_hat = rec.keys_before[layer], rec.k_hat[layer]
        assert k_hat.shape == before.shape
        zero = (k_hat == 0).all(-2)  # (batch, kv_head, d): channels zeroed for every token
        assert zero.sum(-1).tolist() == [[4, 4]]  # half of d = 8 per KV head
        assert torch.equal(k_hat[~zero[:, :, None, :].expand_as(k_hat)],
                           before[~zero[:, :, None, :].expand_as(before)])
