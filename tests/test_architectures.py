"""Architecture correctness on tiny random models with QK-norm and sliding windows.

* pre-RoPE is *just before RoPE*: after the key/query norm on Gemma 3, Qwen3 and OLMo 2 (hand
  RMS norm in float64), and post-RoPE = RoPE(pre-RoPE) with the layer's own RoPE base;
* sliding-window layers: the capture records each layer's window, and the softmax over the
  captured q, k with that window reproduces the model's own attention probabilities
  (eager attention, ``output_attentions``) at a length beyond the window;
* ``model_info`` per-layer facts; fp inside ``compressed_kv`` is the plain model.
"""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import GEMMA_WINDOW, QK_ARCHS, outputs, tiny_ids, tiny_model
from tol import assert_close

from kvtheory.capture import capture, load_capture, save_capture
from kvtheory.flips import attention_metrics
from kvtheory.methods.compressor import Compressor
from kvtheory.models import model_info
from kvtheory.patch import compressed_kv


def _randomise_norms(model, seed=3):
    """Random QK-norm weights, so a norm with weight 1 (or 1 + 0 in Gemma) cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name in ("q_norm", "k_norm"):
            norm = getattr(module, name, None)
            if norm is not None:
                norm.weight.data = 0.5 + torch.rand(norm.weight.shape, generator=g, dtype=norm.weight.dtype)
    return model


def _attn_input(model, module, ids):
    seen = {}

    def pre(mod, args, kwargs):
        seen["h"] = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach().clone()

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        outputs(model, ids)
    finally:
        handle.remove()
    return seen["h"]


def _rms(x, weight, eps, gemma):
    """RMS norm over the last axis in float64: x / sqrt(mean x^2 + eps) * (w or 1 + w)."""
    x = x.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * ((1 + weight.double()) if gemma else weight.double())


def _normed_by_hand(arch, attn, h, which):
    """Keys (or queries) just before RoPE, (batch, head, token, d), from the hidden states."""
    proj, norm = (attn.k_proj, attn.k_norm) if which == "k" else (attn.q_proj, attn.q_norm)
    x = h.double() @ proj.weight.double().T
    d = attn.head_dim
    if arch == "olmo2":  # OLMo 2 normalises the flat (token, head*d) projection
        return _rms(x, norm.weight, norm.variance_epsilon, False).unflatten(-1, (-1, d)).transpose(1, 2)
    heads = x.unflatten(-1, (-1, d)).transpose(1, 2)
    return _rms(heads, norm.weight, getattr(norm, "eps", getattr(norm, "variance_epsilon", None)),
                arch == "gemma3")


def _rotary(x, theta):
    d, t = x.shape[-1], x.shape[-2]
    inv = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x = x.double()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


@pytest.mark.parametrize("arch", QK_ARCHS)
def test_pre_rope_capture_sees_exactly_the_normalised_keys(arch):
    model, ids = _randomise_norms(tiny_model(arch)), tiny_ids()
    info = model_info(model)
    assert info.qk_norm
    for layer in range(info.n_layers):
        attn = model.model.layers[layer].self_attn
        h = _attn_input(model, attn, ids)
        pre = capture(model, ids, layers=[layer], rope="pre")[layer]
        post = capture(model, ids, layers=[layer])[layer]
        k_hand, q_hand = _normed_by_hand(arch, attn, h, "k"), _normed_by_hand(arch, attn, h, "q")
        assert pre["k"].shape == (2, info.kv_heads, 12, info.d) and pre["q"].shape == (2, info.q_heads, 12, info.d)
        assert_close(pre["k"].double(), k_hand, "float32")
        assert_close(pre["q"].double(), q_hand, "float32")
        # the projection's raw output is NOT what pre-RoPE means on these models
        raw = (h @ attn.k_proj.weight.T).unflatten(-1, (-1, info.d)).transpose(1, 2)
        assert not torch.allclose(pre["k"], raw, atol=1e-3)
        # post-RoPE = RoPE(pre-RoPE) with this layer's base: nothing happens in between
        assert_close(post["k"].double(), _rotary(pre["k"], info.rope_bases[layer]), "float32")
        assert_close(post["q"].double(), _rotary(pre["q"], info.rope_bases[layer]), "float32")


@pytest.mark.parametrize("arch", QK_ARCHS)
def test_pre_rope_compressor_acts_on_the_normalised_keys(arch):
    model, ids = _randomise_norms(tiny_model(arch)), tiny_ids()
    seen = []

    def record(x):
        seen.append(x.detach().clone())
        return x

    ident = Compressor.from_fn(record, bits_per_element=16.0, name="record")
    ref = outputs(model, ids)
    with compressed_kv(model, keys=ident, rope="pre", layers=[0]):
        same = outputs(model, ids)
    attn = model.model.layers[0].self_attn
    assert len(seen) == 1
    assert_close(seen[0].double(), _normed_by_hand(arch, attn, _attn_input(model, attn, ids), "k"), "float32")
    assert torch.equal(same, ref)  # identity at the pre-RoPE site changes nothing
    halve = Compressor.from_fn(lambda x: 0.5 * x, bits_per_element=16.0, name="halve")
    with compressed_kv(model, keys=halve, rope="pre", layers=[0]):
        halved = outputs(model, ids)
    with compressed_kv(model, keys=halve, layers=[0]):  # RoPE is linear: same keys after RoPE
        halved_post = outputs(model, ids)
    assert not torch.allclose(halved, ref)
    assert_close(halved, halved_post, "float32")


@pytest.mark.parametrize("arch", QK_ARCHS + ("mistral",))
def test_fp_inside_compressed_kv_is_the_plain_model(arch):
    model, ids = tiny_model(arch), tiny_ids()
    ref = outputs(model, ids)
    for rope in ("post", "pre"):
        with compressed_kv(model, keys="fp", values="fp", rope=rope):
            assert torch.equal(outputs(model, ids), ref)
    assert torch.equal(outputs(model, ids), ref)  # restored


def test_model_info_per_layer_facts():
    g = model_info(tiny_model("gemma3"))
    assert g.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert g.windows == (GEMMA_WINDOW, GEMMA_WINDOW, None)
    assert g.rope_bases == (10000.0, 10000.0, 1000000.0)
    assert (g.qk_norm, g.q_heads, g.kv_heads, g.group, g.head_dim) == (True, 4, 1, 4, 8)
    q3 = model_info(tiny_model("qwen3"))
    assert q3.qk_norm and q3.windows == (None, None) and q3.group == 2
    mistral = model_info(tiny_model("mistral"))  # one window for every layer, from the config
    assert mistral.windows == (6, 6) and not mistral.qk_norm
    llama = model_info(tiny_model("llama"))
    assert llama.windows == (None, None) and llama.rope_bases == (10000.0, 10000.0) and not llama.qk_norm
    assert model_info(tiny_model("bert")).rope_bases == (None, None)


def test_capture_records_windows_and_round_trips(tmp_path):
    cap = capture(tiny_model("gemma3"), tiny_ids(), layers=[1, 2])
    assert cap.meta.windows == (GEMMA_WINDOW, None)
    assert (cap.meta.window(1), cap.meta.window(2)) == (GEMMA_WINDOW, None)
    assert cap[1]["q"].shape == (2, 4, 12, 8) and cap[1]["k"].shape == (2, 1, 12, 8)
    back = load_capture(save_capture(cap, tmp_path / "cap"))
    assert back.meta == cap.meta


def test_window_matches_the_models_own_attention_probabilities():
    """Eager attention of a tiny Gemma 3 at 12 tokens (window 4): the model's own attention
    probabilities equal the softmax over the captured post-RoPE q, k with the recorded window
    (query i sees keys i-w < j <= i), and attention_metrics(window=...) finds the same top-1
    probability; without the window the sliding layers would differ."""
    model, ids = tiny_model("gemma3", attn="eager"), tiny_ids()
    with torch.no_grad():
        probs = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    cap = capture(model, ids)
    scale = model.config.query_pre_attn_scalar ** -0.5
    t = ids.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    for layer in cap.meta.layers:
        q, k = cap[layer]["q"].double(), cap[layer]["k"].double()
        w = cap.meta.window(layer)
        visible = (j <= i) & ((j > i - w) if w is not None else True)
        logits = (q @ k.transpose(-1, -2).expand(-1, q.shape[1], -1, -1)) * scale
        hand = torch.softmax(logits.masked_fill(~visible, -math.inf), -1)
        assert_close(probs[layer].double(), hand, "float32")
        m = attention_metrics(q, k, k, window=w, scale=scale, return_per_query=True)
        assert_close(m.per_query.top1_prob.double(), probs[layer].double().amax(-1), "float32")
        if w is not None:  # beyond the window the causal-only softmax is a different distribution
            full = attention_metrics(q, k, k, scale=scale, return_per_query=True)
            assert not torch.allclose(full.per_query.top1_prob.double(), probs[layer].double().amax(-1),
                                      atol=1e-4)
