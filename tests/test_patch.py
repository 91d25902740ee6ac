"""compressed_kv: routing through AttentionInterface on tiny GPT-2, Llama, Mistral, Qwen2, BERT."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import inspect

import pytest
import torch
from _tiny import ARCHS, outputs, tiny_ids, tiny_model
from tol import assert_close

from kvtheory.capture import capture
from kvtheory.errors import KVTheoryError
from kvtheory.patch import (
    PREFIX,
    _HANDLERS,
    attention_modules,
    clear_fit_cache,
    compressed_kv,
    fit_compressors,
)

DECODERS = ("gpt2", "llama", "mistral", "qwen2")
ROPE_ARCHS = ("llama", "mistral", "qwen2")


# ----------------------------------------------------------------------------- toy compressors
@dataclass(frozen=True)
class Scale:
    """x -> c·x: a compressor whose effect is known exactly."""

    c: float = 2.0
    calls: list = field(default_factory=list, compare=False, repr=False)
    needs_fit: bool = False

    def __call__(self, x):
        self.calls.append(x.detach().clone())
        return x * self.c

    def fit(self, k, q=None):
        return self

    def bits_per_element(self, d, tokens=None):
        return 16.0


@dataclass(frozen=True)
class Recorder:
    """Needs a fit; remembers the calibration tensors; acts as the identity."""

    seen_k: torch.Tensor | None = field(default=None, compare=False)
    seen_q: torch.Tensor | None = field(default=None, compare=False)
    needs_fit: bool = True

    def __call__(self, x):
        return x

    def fit(self, k, q=None):
        return replace(self, seen_k=k.clone(), seen_q=None if q is None else q.clone(), needs_fit=False)

    def bits_per_element(self, d, tokens=None):
        return 16.0


class Boom(Exception):
    pass


@dataclass(frozen=True)
class Exploding:
    needs_fit: bool = False

    def __call__(self, x):
        raise Boom("compressor failed")

    def fit(self, k, q=None):
        return self


# ----------------------------------------------------------------------------- helpers
def snapshot(model):
    """Everything compressed_kv may touch: weights, attention implementations, hooks, handlers."""
    from kvtheory.patch import _configs

    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "impl": [getattr(c, "_attn_implementation_internal", None) for c in _configs(model)],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "handlers": sum(1 for m in model.modules() if m in _HANDLERS),
    }


def assert_restored(model, before, ids, ref):
    after = snapshot(model)
    assert after["impl"] == before["impl"]
    assert not any(str(i).startswith(PREFIX) for i in after["impl"])
    assert after["hooks"] == before["hooks"] == 0
    assert after["handlers"] == 0
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert torch.equal(outputs(model, ids), ref)


@pytest.fixture(scope="module")
def models():
    return {(a, impl): tiny_model(a, impl) for a in ARCHS for impl in ("sdpa", "eager")}


# ----------------------------------------------------------------------------- fp / int8 / restore
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fp_identical_int8_close_and_restored(models, arch, impl):
    model, ids = models[(arch, impl)], tiny_ids()
    before, ref = snapshot(model), outputs(model, ids)
    with compressed_kv(model, keys="fp", values="fp"):
        assert model.config._attn_implementation == PREFIX + impl
        fp = outputs(model, ids)
    with compressed_kv(model, keys="int8", values="int8"):
        q8 = outputs(model, ids)
    with compressed_kv(model, keys="int2", values="int2"):
        q2 = outputs(model, ids)
    assert torch.equal(fp, ref)
    assert_close(q8, ref, "int8_model")
    assert not torch.equal(q8, ref)  # compression did happen ...
    assert (q2 - ref).norm() > 10 * (q8 - ref).norm()  # ... and its size follows the bits
    assert_restored(model, before, ids, ref)


def test_gpt2_eager_reorder_and_upcast_path():
    """GPT-2 with eager + reorder_and_upcast_attn bypasses the interface; the patch keeps that kernel."""
    model, ids = tiny_model("gpt2", "eager", reorder_and_upcast_attn=True), tiny_ids()
    ref = outputs(model, ids)
    with compressed_kv(model, "fp", "fp"):
        assert torch.equal(outputs(model, ids), ref)
    with compressed_kv(model, "int8", "int8"):
        assert_close(outputs(model, ids), ref, "int8_model")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", DECODERS)
def test_causal_mask_active_under_patch(models, arch, impl):
    model, ids = models[(arch, impl)], tiny_ids(tokens=12)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 63 + 1
    with compressed_kv(model, "int8", "int8"):
        a, b = outputs(model, ids), outputs(model, changed)
    assert_close(a[:, :-1], b[:, :-1], "float32")  # earlier positions cannot see the last token
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_causal_test_detects_a_lost_mask(monkeypatch):
    """Without the mask registration, eager attention loses causality: the test above would fail."""
    from transformers.masking_utils import AttentionMaskInterface

    import kvtheory.patch as patch

    model, ids = tiny_model("llama", "eager"), tiny_ids()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 7) % 63 + 1
    kept = {k: v for k, v in AttentionMaskInterface._global_mapping.items() if not k.startswith(PREFIX)}
    monkeypatch.setattr(AttentionMaskInterface, "_global_mapping", kept)
    monkeypatch.setattr(AttentionMaskInterface, "register", classmethod(lambda cls, k, v: None))
    patch._routed_name("eager")
    with compressed_kv(model, "fp", "fp"):
        a, b = outputs(model, ids), outputs(model, changed)
    assert not torch.allclose(a[:, :-1], b[:, :-1])


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_mask_kept(models, arch, impl):
    model, ids = models[(arch, impl)], tiny_ids(tokens=10)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # first sequence padded after 6 tokens
    ref = outputs(model, ids, mask)
    with compressed_kv(model, "fp", "fp"):
        fp = outputs(model, ids, mask)
    assert torch.equal(fp, ref)
    if arch == "bert":  # a bidirectional model really depends on the padding mask
        assert not torch.allclose(outputs(model, ids)[0, :6], ref[0, :6])
    with compressed_kv(model, "int8", "int8"):
        assert_close(outputs(model, ids, mask)[1], ref[1], "int8_model")


# ----------------------------------------------------------------------------- nesting / exceptions
def test_nesting_composes_and_restores(models):
    model, ids = models[("llama", "sdpa")], tiny_ids()
    before, ref = snapshot(model), outputs(model, ids)
    with compressed_kv(model, keys="int8"):
        outer_only = outputs(model, ids)
        with compressed_kv(model, values="int8"):
            assert model.config._attn_implementation == PREFIX + "sdpa"
            both = outputs(model, ids)
        assert model.config._attn_implementation == PREFIX + "sdpa"
        assert torch.equal(outputs(model, ids), outer_only)
    with compressed_kv(model, keys="int8", values="int8"):
        assert torch.equal(outputs(model, ids), both)
    assert_restored(model, before, ids, ref)


@pytest.mark.parametrize("where", ["block", "forward", "nested"])
def test_exception_leaves_model_intact(models, where):
    model, ids = models[("qwen2", "eager")], tiny_ids()
    before, ref = snapshot(model), outputs(model, ids)
    with pytest.raises(Boom):
        if where == "block":
            with compressed_kv(model, "int8", "int8"):
                raise Boom
        elif where == "forward":
            with compressed_kv(model, keys=Exploding()):
                outputs(model, ids)
        else:
            with compressed_kv(model, "int8", "int8"), compressed_kv(model, keys="int4", rope="pre"):
                raise Boom
    assert_restored(model, before, ids, ref)


# ----------------------------------------------------------------------------- where compression acts
@pytest.mark.parametrize("arch", ARCHS)
def test_states_compressed_are_post_rope_cache_states_of_chosen_layers(models, arch):
    """Capture inside compressed_kv(keys=2x, layers=[1]) sees 2·k at layer 1 only, v untouched."""
    model, ids = models[(arch, "sdpa")], tiny_ids()
    plain = capture(model, ids)
    scale = Scale(2.0)
    with compressed_kv(model, keys=scale, layers=[1]):
        inside = capture(model, ids, layers=[0, 1])
    assert len(scale.calls) == 1
    assert torch.equal(scale.calls[0], plain[1]["k"])  # (batch, kv_head, token, d), before GQA expansion
    assert torch.equal(inside[0]["k"], plain[0]["k"])
    assert torch.equal(inside[1]["k"], 2 * plain[1]["k"])
    assert torch.equal(inside[1]["v"], plain[1]["v"])


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_pre_rope_keys_hook_k_proj(models, arch):
    model, ids = models[(arch, "eager")], tiny_ids()
    ref, pre = outputs(model, ids), capture(model, ids, rope="pre")
    scale = Scale(1.0)
    with compressed_kv(model, keys=scale, rope="pre"):
        out = outputs(model, ids)
    assert len(scale.calls) == 2
    assert torch.equal(scale.calls[0], pre[0]["k"])
    assert_close(out, ref, "float32")  # x·1 through a reshape round trip
    with compressed_kv(model, "int8", "int8", rope="pre"):
        assert_close(outputs(model, ids), ref, "int8_model")
    with compressed_kv(model, "int2", rope="pre"):
        pre2 = outputs(model, ids)
    with compressed_kv(model, "int2", rope="post"):
        post2 = outputs(model, ids)
    assert not torch.allclose(pre2, post2)  # the two sides are different experiments


def test_pre_equals_post_without_rope(models):
    model, ids = models[("gpt2", "sdpa")], tiny_ids()
    with compressed_kv(model, "int4", "int4", rope="pre"):
        pre = outputs(model, ids)
    with compressed_kv(model, "int4", "int4", rope="post"):
        post = outputs(model, ids)
    assert torch.equal(pre, post)


def test_bf16_states_upcast_for_compression():
    model, ids = tiny_model("llama").to(torch.bfloat16), tiny_ids()
    ref = outputs(model, ids)
    scale = Scale(1.0)
    with compressed_kv(model, keys=scale, values="int8"):
        out = outputs(model, ids)
    assert scale.calls[0].dtype == torch.float32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out.float(), ref.float(), "int8_model")


# ----------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("rope", ["post", "pre"])
def test_fit_uses_calibration_states_per_layer_and_caches(models, rope):
    clear_fit_cache()
    model, calib = models[("llama", "sdpa")], tiny_ids(batch=1, tokens=16, seed=9)
    spec = Recorder()
    fits = fit_compressors(model, spec, "int8", calib, rope)
    cap = capture(model, calib, rope=rope)
    assert sorted(fits) == [0, 1]
    for layer, (ck, cv) in fits.items():
        assert torch.equal(ck.seen_k, cap[layer]["k"])
        assert torch.equal(ck.seen_q, cap[layer]["q"])
        assert type(cv).__name__ == "Quantize"
    again = fit_compressors(model, spec, "int8", calib.clone(), rope)
    assert all(again[layer][0] is fits[layer][0] for layer in fits)  # cached
    other = fit_compressors(model, spec, "int8", tiny_ids(batch=1, tokens=16, seed=10), rope)
    assert not torch.equal(other[0][0].seen_k, fits[0][0].seen_k)


def test_full_rank_pca_is_identity_and_rank_cut_hurts(models):
    clear_fit_cache()
    model, ids, calib = models[("mistral", "sdpa")], tiny_ids(), tiny_ids(batch=1, tokens=32, seed=3)
    ref = outputs(model, ids)
    with compressed_kv(model, "rank8-pca", "rank8-pca", calibration=calib):  # d = 8: keeps everything
        full = outputs(model, ids)
    assert_close(full, ref, "float32")
    fits = fit_compressors(model, "rank2-pca", "fp", calib)
    with compressed_kv(model, calibration=fits) as plan:
        assert plan[1][0] is fits[1][0]
        cut = outputs(model, ids)
    assert (cut - ref).norm() > 100 * (full - ref).norm()


# ----------------------------------------------------------------------------- errors
def test_errors(models):
    model = models[("llama", "sdpa")]
    with pytest.raises(KVTheoryError, match="calibration"):
        with compressed_kv(model, keys="rank4-pca"):
            pass
    with pytest.raises(KVTheoryError, match="spec"):
        with compressed_kv(model, keys="int4-bogus"):
            pass
    with pytest.raises(KVTheoryError, match="keys"):
        with compressed_kv(model, keys=3):
            pass
    with pytest.raises(KVTheoryError, match="rope"):
        with compressed_kv(model, rope="middle"):
            pass
    with pytest.raises(KVTheoryError, match="layers"):
        with compressed_kv(model, layers=[5]):
            pass
    with pytest.raises(KVTheoryError, match="calibration"):
        inspect.unwrap(fit_compressors)(model, "rank4-pca", "fp", torch.rand(1, 8))
    with pytest.raises(KVTheoryError, match="model"):
        with compressed_kv(torch.nn.Linear(2, 2)):
            pass
    assert len(attention_modules(model)) == 2
