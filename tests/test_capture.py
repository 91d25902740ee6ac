"""capture / save_capture / load_capture and the ``kvtheory capture`` command."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch
from _tiny import outputs, save_tiny, tiny_ids, tiny_model
from tol import assert_close

from kvtheory.capture import MANIFEST, TENSOR_FILE, _manifest_digest, capture, load_capture, save_capture
from kvtheory.cli import main
from kvtheory.errors import KVTheoryError
from kvtheory.io import sha256_file


def _attn_input(model, module, ids):
    """The hidden states entering ``module`` during a forward pass (batch, token, hidden)."""
    seen = {}

    def pre(mod, args, kwargs):
        seen["h"] = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach().clone()

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        outputs(model, ids)
    finally:
        handle.remove()
    return seen["h"]


def _heads(x, d):
    """(batch, token, head·d) -> (batch, head, token, d)."""
    return x.unflatten(-1, (-1, d)).transpose(1, 2)


def _rotary_by_hand(x, theta):
    """Rotate-half RoPE written out in float64: x·cos + rot(x)·sin with angle t·θ^(-2i/d)."""
    d, t = x.shape[-1], x.shape[-2]
    inv = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x = x.double()
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_post_rope_q_k_equal_projection_plus_rotary_by_hand(arch):
    model, ids = tiny_model(arch), tiny_ids()
    attn = model.model.layers[1].self_attn
    h = _attn_input(model, attn, ids).double()
    lin = lambda proj: h @ proj.weight.double().T + (0 if proj.bias is None else proj.bias.double())
    theta = model.config.rope_parameters["rope_theta"]
    k_hand = _rotary_by_hand(_heads(lin(attn.k_proj), 8), theta)
    q_hand = _rotary_by_hand(_heads(lin(attn.q_proj), 8), theta)
    post, pre = capture(model, ids, layers=[1]), capture(model, ids, layers=[1], rope="pre")
    assert post[1]["k"].shape == (2, 2, 12, 8) and post[1]["q"].shape == (2, 4, 12, 8)
    assert_close(post[1]["k"].double(), k_hand, "float32")
    assert_close(post[1]["q"].double(), q_hand, "float32")
    # pre-RoPE: exactly the projections' outputs; v is the same on both sides
    assert torch.equal(pre[1]["k"], _heads(attn.k_proj(h.float()), 8))
    assert torch.equal(pre[1]["q"], _heads(attn.q_proj(h.float()), 8))
    assert torch.equal(pre[1]["v"], post[1]["v"])
    assert_close(pre[1]["k"].double(), _heads(lin(attn.k_proj), 8), "float32")
    assert not torch.allclose(pre[1]["k"], post[1]["k"])


def test_gpt2_and_bert_capture_by_hand_pre_equals_post():
    gpt2, ids = tiny_model("gpt2"), tiny_ids()
    attn = gpt2.transformer.h[0].attn
    h = _attn_input(gpt2, attn, ids)
    q, k, v = (h @ attn.c_attn.weight + attn.c_attn.bias).split(32, dim=-1)
    cap = capture(gpt2, ids, layers=[0], rope="pre")
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert_close(cap[0][name], _heads(x, 8), "float32")
    post = capture(gpt2, ids, layers=[0])
    assert all(torch.equal(cap[0][w], post[0][w]) for w in "qkv")

    bert = tiny_model("bert")
    self_attn = bert.encoder.layer[1].attention.self
    h = _attn_input(bert, self_attn, ids)
    cap = capture(bert, ids, layers=[1], what=("k",), attention_mask=torch.ones_like(ids))
    assert list(cap[1]) == ["k"] and cap.meta.what == ("k",)
    assert_close(cap[1]["k"], _heads(self_attn.key(h), 8), "float32")


def _assert_same(a, b):
    assert a.meta == b.meta
    assert a.tensors.keys() == b.tensors.keys()
    for layer in a.tensors:
        assert a[layer].keys() == b[layer].keys()
        for w in a[layer]:
            assert a[layer][w].dtype == b[layer][w].dtype
            assert torch.equal(a[layer][w], b[layer][w])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, dtype):
    model = tiny_model("llama").to(dtype)
    cap = capture(model, tiny_ids(), rope="pre", dtype=None, model_name="tiny-llama")
    assert cap[0]["k"].dtype == dtype and cap.meta.dtype == str(dtype).removeprefix("torch.")
    out = save_capture(cap, tmp_path / "cap")
    assert sorted(p.name for p in out.iterdir()) == [TENSOR_FILE, MANIFEST]  # no temp files left
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sha256"] == sha256_file(out / TENSOR_FILE)
    assert manifest["model"] == "tiny-llama" and manifest["rope"] == "pre"
    assert (manifest["q_heads"], manifest["kv_heads"], manifest["group"], manifest["d"]) == (4, 2, 2, 8)
    assert manifest["token_ids"] == tiny_ids().tolist() and manifest["positions"] == list(range(12))
    back = load_capture(out)
    _assert_same(cap, back)
    _assert_same(back, load_capture(out / MANIFEST))
    save_capture(back, out)  # overwriting an existing capture
    _assert_same(cap, load_capture(out))


def test_default_is_cpu_float32_and_positions(tmp_path):
    cap = capture(tiny_model("qwen2").to(torch.bfloat16), torch.tensor([3, 4, 5, 6]))
    assert cap[0]["q"].dtype == torch.float32 and cap[0]["q"].device.type == "cpu"
    assert cap.meta.token_ids == ((3, 4, 5, 6),) and cap.meta.positions == (0, 1, 2, 3)
    assert cap.meta.layers == (0, 1) and cap.meta.kvtheory_version


@pytest.fixture
def saved(tmp_path):
    return save_capture(capture(tiny_model("gpt2"), tiny_ids()), tmp_path / "cap")


def test_corrupted_file_raises(saved):
    path = saved / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(KVTheoryError, match="SHA-256"):
        load_capture(saved)


def test_truncated_file_raises(saved):
    path = saved / TENSOR_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KVTheoryError, match="truncated"):
        load_capture(saved)
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["tensor_bytes"]  # without the size check, the hash still catches it
    manifest["manifest_sha256"] = _manifest_digest(manifest)  # an edit that re-signs the manifest
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KVTheoryError, match="SHA-256"):
        load_capture(saved)


@pytest.mark.parametrize("damage", ["no-tensors", "no-manifest", "bad-json", "foreign", "field"])
def test_missing_or_foreign_files_raise(saved, damage):
    if damage == "no-tensors":
        (saved / TENSOR_FILE).unlink()
    elif damage == "no-manifest":
        (saved / MANIFEST).unlink()
    elif damage == "bad-json":
        (saved / MANIFEST).write_text('{"format": "kvtheory.capture", ')
    else:
        manifest = json.loads((saved / MANIFEST).read_text())
        if damage == "foreign":
            manifest["format"] = "something else"
        else:
            del manifest["d"]
        (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KVTheoryError, match="capture"):
        load_capture(saved)
    with pytest.raises(KVTheoryError, match="capture"):
        load_capture(saved / "nowhere")


def test_capture_argument_errors():
    # The user-facing checks, below the jaxtyping hook that the test suite installs.
    raw_capture, raw_save = inspect.unwrap(capture), inspect.unwrap(save_capture)
    model = tiny_model("llama")
    for kwargs, word in [
        (dict(input_ids=torch.rand(2, 3)), "input_ids"),
        (dict(input_ids=tiny_ids(), what=("q", "x")), "what"),
        (dict(input_ids=tiny_ids(), what=()), "what"),
        (dict(input_ids=tiny_ids(), layers=[2]), "layers"),
        (dict(input_ids=tiny_ids(), rope="both"), "rope"),
        (dict(input_ids=tiny_ids(), attention_mask=torch.ones(2, 5)), "attention_mask"),
    ]:
        with pytest.raises(KVTheoryError, match=word):
            raw_capture(model, **kwargs)
    with pytest.raises(KVTheoryError, match="cap"):
        raw_save("not a capture", "/tmp")


def test_cli_capture_tiny_model(tmp_path, capsys):
    folder = save_tiny("llama", tmp_path / "tiny", tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text("the first of the things that he had was not a thing which it be " * 4)
    out = tmp_path / "out"
    rc = main(["capture", "--model", str(folder), "--tokens", "20", "--out", str(out), "--layers", "1",
               "--rope", "pre", "--text-file", str(text), "--no-progress"])
    assert rc == 0
    assert "captured q,k,v of 1 layers x 20 tokens" in capsys.readouterr().out
    cap = load_capture(out)
    assert cap.meta.layers == (1,) and cap.meta.rope == "pre" and cap[1]["k"].shape == (1, 2, 20, 8)
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(folder)(text.read_text(), add_special_tokens=False)["input_ids"]
    assert cap.meta.token_ids == (tuple(expected[:20]),)


@pytest.mark.parametrize("argv,word", [
    (["--model", "no-such-model-xyz", "--tokens", "8"], "no-such-model-xyz"),
    (["--model", "x", "--tokens", "0"], "--tokens"),
    (["--model", "x", "--tokens", "8", "--layers", "a,b"], "--layers"),
    (["--model", "x", "--tokens", "8", "--rope", "mid"], "--rope"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, word):
    text = tmp_path / "t.txt"
    text.write_text("the of and")
    rc = main(["capture", *argv, "--out", str(tmp_path / "o"), "--text-file", str(text)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and word in err and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_capture_smollm2(tmp_path, data_dir):
    out = tmp_path / "cap"
    assert main(["capture", "--model", "smollm2-135m", "--tokens", "64", "--out", str(out),
                 "--layers", "0,5", "--data-dir", str(data_dir), "--no-progress"]) == 0
    cap = load_capture(out)
    assert cap.meta.model == "smollm2-135m" and cap.meta.layers == (0, 5)
    assert (cap.meta.q_heads, cap.meta.kv_heads, cap.meta.group, cap.meta.d) == (9, 3, 3, 64)
    assert cap[5]["q"].shape == (1, 9, 64, 64) and cap[5]["k"].shape == (1, 3, 64, 64)
    assert all(math.isfinite(float(cap[layer][w].abs().max())) for layer in (0, 5) for w in "qkv")


# ----------------------------------------------------------------------------- issue 11: bad input
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64, "float32", 32, "int8"])
def test_non_floating_or_non_dtype_dtype_is_refused(dtype):
    with pytest.raises(KVTheoryError, match=r"^dtype: got .*expected None \(keep the computed dtype\) or a floating"):
        inspect.unwrap(capture)(tiny_model("llama"), tiny_ids(), dtype=dtype)


@pytest.mark.parametrize("ids,why", [
    (torch.ones(2, 3, dtype=torch.bool), "integer dtype"),
    (torch.ones(2, 3, dtype=torch.complex64), "integer dtype"),
    (torch.ones(2, 3, dtype=torch.float16), "integer dtype"),
    (torch.ones(2, 3, dtype=torch.long, device="meta"), "not a meta tensor"),
    ([[1, 2, 3]], "as a torch tensor"),
    (7, "as a torch tensor"),
    (torch.ones(1, 2, 3, dtype=torch.long), "shaped (token,) or (batch, token)"),
    (torch.ones(0, dtype=torch.long), "shaped (token,) or (batch, token)"),
])
def test_bad_ids_are_named(ids, why):
    with pytest.raises(KVTheoryError, match=r"^input_ids: got .*" + re.escape(why)):
        inspect.unwrap(capture)(tiny_model("llama"), ids)


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = tiny_model("llama")
    with pytest.raises(KVTheoryError, match="model: got .*meta.*expected a model whose weights are loaded"):
        inspect.unwrap(capture)(model, tiny_ids())


def test_bad_device_is_named():
    with pytest.raises(KVTheoryError, match="device: got 'warp'"):
        inspect.unwrap(capture)(tiny_model("llama"), tiny_ids(), device="warp")


@pytest.mark.parametrize("path", [None, 3, ""])
def test_load_capture_of_a_non_path_is_named(path):
    with pytest.raises(KVTheoryError, match="^capture: got .*expected the path of a folder"):
        inspect.unwrap(load_capture)(path)  # below the test suite's jaxtyping hook, as users call it


@pytest.mark.parametrize("field,value", [("d", 16), ("q_heads", 8), ("kv_heads", 2), ("model", "other"),
                                         ("group", 2), ("windows", [3, 3]), ("rope", "pre")])
def test_hand_edited_manifest_is_refused_naming_the_file(saved, field, value):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest[field] = value
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KVTheoryError, match=re.escape(str(saved / MANIFEST)) + ".*manifest_sha256"):
        load_capture(saved)


@pytest.mark.parametrize("field,value,word", [("d", 16, "shape"), ("q_heads", 8, "group"),
                                              ("dtype", "bfloat16", "dtype")])
def test_re_signed_edit_is_caught_by_the_shapes(saved, field, value, word):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest[field] = value
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KVTheoryError, match="metadata does not match its tensors.*" + word):
        load_capture(saved)


def test_version_1_manifest_without_windows_still_loads(saved):
    """Captures written before windows and the manifest hash (format 1) load, checked by shape."""
    manifest = json.loads((saved / MANIFEST).read_text())
    for key in ("windows", "manifest_sha256"):
        del manifest[key]
    manifest["format_version"] = 1
    (saved / MANIFEST).write_text(json.dumps(manifest))
    cap = load_capture(saved)
    assert cap.meta.windows is None and cap.meta.window(0) is None
    manifest["d"] = 16
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KVTheoryError, match="does not match its tensors"):
        load_capture(saved)


@pytest.mark.parametrize("blocker", ["out-is-file", "tensor-is-folder", "manifest-is-folder"])
def test_cli_out_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, blocker):
    import kvtheory.models

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(kvtheory.models, "load_model", never)
    out = tmp_path / "out"
    if blocker == "out-is-file":
        out.write_text("x")
    else:
        (out / (TENSOR_FILE if blocker == "tensor-is-folder" else MANIFEST)).mkdir(parents=True)
    text = tmp_path / "t.txt"
    text.write_text("the of and " * 10)
    rc = main(["capture", "--model", "whatever", "--tokens", "8", "--out", str(out), "--text-file", str(text)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--out" in err and "\n" not in err and "Traceback" not in err


def test_save_capture_checks_both_paths_before_writing(tmp_path):
    cap = capture(tiny_model("gpt2"), tiny_ids())
    out = tmp_path / "cap"
    (out / MANIFEST).mkdir(parents=True)
    with pytest.raises(KVTheoryError, match="folder"):
        save_capture(cap, out)
    assert not (out / TENSOR_FILE).exists()  # nothing half-written


# ----------------------------------------------------------------------------- device_map (accelerate)
def test_capture_of_a_model_placed_by_an_explicit_device_map(tmp_path, capsys, monkeypatch):
    pytest.importorskip("accelerate")
    import transformers

    from kvtheory.models import load_model

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    folder = save_tiny("llama", tmp_path / "tiny", tokenizer=True)
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    lm = load_model(str(folder), device_map=placement)
    assert seen == [placement]  # placement handed to accelerate
    ids = tiny_ids()
    placed, plain = capture(lm, ids, rope="pre"), capture(tiny_model("llama"), ids, rope="pre")
    for layer in (0, 1):
        for w in "qkv":
            assert torch.equal(placed[layer][w], plain[layer][w])
    text = tmp_path / "text.txt"
    text.write_text("the first of the things that he had was not a thing which it be " * 4)
    out = tmp_path / "out"
    assert main(["capture", "--model", str(folder), "--tokens", "16", "--out", str(out), "--device-map",
                 json.dumps(placement), "--text-file", str(text), "--no-progress"]) == 0
    assert load_capture(out)[1]["k"].shape == (1, 2, 16, 8) and seen[-1] == placement
    capsys.readouterr()
    rc = main(["capture", "--model", str(folder), "--tokens", "16", "--out", str(out), "--device-map",
               "everywhere", "--text-file", str(text)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--device-map: got 'everywhere'" in err and "\n" not in err
