"""Padding-correct compression (issue 14 part 1): pad positions never enter statistics that
span tokens (KIVI key groups, fitted bases); left and right padding give the single-passage
result on the real tokens."""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from tol import assert_close

from kvtheory.bases import HadamardBasis, PCABasis
from kvtheory.compress import Compressor, Quantize, RotatedQuantize, make_compressor
from kvtheory.errors import KVTheoryError
from kvtheory.methods.compressor import key_validity
from kvtheory.patch import clear_fit_cache, compressed_kv, fit_compressors

LENGTHS = (11, 6, 9)


def _padded(rows: list[torch.Tensor], side: str, fill: float = 0.0):
    """Stack (head, T_i, d) rows into (batch, head, T, d) padded on ``side`` with ``fill``; mask."""
    t = max(r.shape[1] for r in rows)
    x = torch.full((len(rows), rows[0].shape[0], t, rows[0].shape[-1]), fill, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for b, r in enumerate(rows):
        sl = slice(0, r.shape[1]) if side == "right" else slice(t - r.shape[1], t)
        x[b, :, sl], mask[b, sl] = r, True
    return x, mask


def _rows(seed=0, heads=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(heads, n, d, generator=g, dtype=torch.float64) * 3 + 1 for n in LENGTHS]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("comp", [Quantize(4, "channel", 4), Quantize(3, "channel", 128, True),
                                  RotatedQuantize(HadamardBasis(), 4, "channel", 4)])
def test_token_grouped_compressors_ignore_pad_tokens(side, comp):
    rows = _rows()
    x, mask = _padded(rows, side, fill=1e3)  # loud pads: they would set every group's range
    out = comp(x, mask)
    for b, r in enumerate(rows):
        alone = comp(r[None])[0]
        assert torch.equal(out[b][:, mask[b]], alone)  # identical, not merely close
        assert torch.equal(out[b][:, ~mask[b]], x[b][:, ~mask[b]])  # pads returned unchanged
    # the check can fail: without the mask the pads enter the groups
    assert not torch.equal(comp(x)[1][:, mask[1]], comp(rows[1][None])[0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_per_token_int4_does_not_depend_on_padding(side):
    rows = _rows(1)
    x, mask = _padded(rows, side, fill=-7.0)
    comp = make_compressor("int4")
    assert not comp.token_grouped
    out = comp(x, mask)
    assert torch.equal(out, comp(x))  # the mask is not even read
    for b, r in enumerate(rows):
        assert torch.equal(out[b][:, mask[b]], comp(r[None])[0])


def test_key_validity_from_bool_float_and_2d_masks():
    pad = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]]).bool()
    causal = torch.ones(4, 4).tril().bool()
    four = causal & pad[:, None, None, :]
    assert torch.equal(key_validity(four, 2, 4), pad)
    additive = torch.zeros(2, 1, 4, 4, dtype=torch.float32).masked_fill(~four, torch.finfo(torch.float32).min)
    assert torch.equal(key_validity(additive, 2, 4), pad)
    assert torch.equal(key_validity(pad.long(), 2, 4), pad)
    assert torch.equal(key_validity(pad.long(), 2, 2), pad[:, -2:])  # 2D: the newest tokens
    assert key_validity(None, 2, 4) is None and key_validity(causal[None, None], 1, 4) is None


# ----------------------------------------------------------------------------- through a model
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").double()  # float64: no batch-forward noise at this scale


def _ids(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in LENGTHS]


def _batch(passages, side):
    t = max(len(p) for p in passages)
    ids = torch.zeros(len(passages), t, dtype=torch.long)
    mask = torch.zeros(len(passages), t, dtype=torch.long)
    for b, p in enumerate(passages):
        sl = slice(0, len(p)) if side == "right" else slice(t - len(p), t)
        ids[b, sl], mask[b, sl] = p, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real positions start at 0
    return ids, mask, pos


def _recorder(seen):
    def f(x, mask=None):
        seen.append((x.clone(), mask))
        return x.clone()
    return Compressor.from_fn(f, bits_per_element=16)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compressed_kv_reads_the_padding_from_the_attention_mask(side, attn):
    model = tiny_model("llama", attn=attn)
    ids, mask, pos = _batch(_ids(), side)
    seen = []
    with torch.no_grad(), compressed_kv(model, keys=_recorder(seen), layers=[0]):
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    assert len(seen) == 1 and torch.equal(seen[0][1], mask.bool())
    seen.clear()
    with torch.no_grad(), compressed_kv(model, keys=_recorder(seen), layers=[0]):
        model(input_ids=ids[:1, :LENGTHS[0]])
    assert seen[0][1] is None  # nothing hidden: no mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("rope", ["post", "pre"])
def test_padded_batch_equals_passages_one_at_a_time_under_kivi(llama, side, rope):
    passages = _ids()
    ids, mask, pos = _batch(passages, side)
    kw = dict(keys="int4-kivi-g4", values="int4-kivi", rope=rope)
    with torch.no_grad(), compressed_kv(llama, **kw):
        batch = llama(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for b, p in enumerate(passages):
            alone = llama(input_ids=p[None]).logits[0]
            assert_close(batch[b][mask[b].bool()], alone, "float64")
    # the same batch without the padding fix differs: pads inside KIVI's key groups
    with torch.no_grad(), compressed_kv(llama, **kw):
        unmasked = llama(input_ids=ids, position_ids=pos).logits  # no attention mask
    assert not torch.allclose(unmasked[1][mask[1].bool()], batch[1][mask[1].bool()], atol=1e-6)


@pytest.mark.parametrize("rope", ["post", "pre"])
def test_padding_is_read_once_a_forward_not_once_a_layer(llama, monkeypatch, rope):
    # deciding that nothing is hidden syncs a GPU with its host: once per mask, not per layer
    from kvtheory.methods import compressor as cm

    calls, real = [], cm.key_validity
    monkeypatch.setattr(cm, "key_validity", lambda *a: calls.append(a[1:]) or real(*a))
    ids, mask, pos = _batch(_ids(), "right")
    assert llama.config.num_hidden_layers >= 2
    with torch.no_grad(), compressed_kv(llama, keys="int4-kivi-g4", values="int4-kivi",
                                        rope=rope):
        llama(input_ids=ids, attention_mask=mask, position_ids=pos)
        assert len(calls) == 1
        llama(input_ids=ids, attention_mask=mask, position_ids=pos)
        assert len(calls) == 2    # a new forward reads its mask again (it may have changed)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fit_compressors_fits_on_real_tokens_only(llama, side):
    clear_fit_cache()
    passages = _ids(5)
    ids, mask, pos = _batch(passages, side)
    plan = fit_compressors(llama, "rank4-pca", "rank4-pca", ids, attention_mask=mask)
    keys = {0: [], 1: []}
    for p in passages:  # reference: the keys of every passage alone, pooled
        seen = []
        with torch.no_grad(), compressed_kv(llama, keys=_recorder(seen), values=_recorder(seen)):
            llama(input_ids=p[None])
        for layer in (0, 1):
            keys[layer].append((seen[2 * layer][0], seen[2 * layer + 1][0]))
    for layer in (0, 1):
        k = torch.cat([kv[0] for kv in keys[layer]], dim=2)
        v = torch.cat([kv[1] for kv in keys[layer]], dim=2)
        # fit_compressors fits on float32 states (k.float()), so the reference does too
        assert_close(plan[layer][0].fitted.rotation, PCABasis().fit(k.float()).rotation, "float64")
        assert_close(plan[layer][1].fitted.rotation, PCABasis().fit(v.float()).rotation, "float64")
    unmasked = fit_compressors(llama, "rank4-pca", "rank4-pca", ids)
    assert not torch.allclose(unmasked[0][0].fitted.rotation, plan[0][0].fitted.rotation)


def test_fit_mask_pre_rope_left_and_right_agree(llama):  # and the mask is checked
    clear_fit_cache()
    passages = _ids(6)
    fits = []
    for side in ("right", "left"):
        ids, mask, _ = _batch(passages, side)
        fits.append(fit_compressors(llama, "rank4-pca", "fp", ids, rope="pre", attention_mask=mask))
    assert_close(fits[0][1][0].fitted.rotation, fits[1][1][0].fitted.rotation, "float64")
    with pytest.raises(KVTheoryError, match=r"attention_mask: got 'shape \(3, 3\)'"):
        fit_compressors(llama, "rank4-pca", "fp", ids, attention_mask=mask[:, :3])


# ----------------------------------------------------------------------------- property
@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), group=st.integers(1, 24),
       bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 2**16),
       side=st.sampled_from(["right", "left"]))
def test_any_padding_gives_each_sequence_its_own_kivi_groups(lengths, group, bits, symmetric, seed, side):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(2, n, 4, generator=g, dtype=torch.float64) for n in lengths]
    x, mask = _padded(rows, side, fill=float(seed % 7) * 100)
    comp = Quantize(bits, "channel", group, symmetric)
    out = comp(x, mask)
    for b, r in enumerate(rows):
        assert torch.equal(out[b][:, mask[b]], comp(r[None])[0])
