"""kvtheory._hf: one home for model access, and no import cycle between patch, capture,
evaluate and models (module-level and function-level imports alike)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from _tiny import tiny_ids, tiny_model
from tol import assert_close

from kvtheory import _hf
from kvtheory.errors import KVTheoryError

PKG = Path(__file__).resolve().parents[1] / "kvtheory"
MODULES = ("_hf", "_packaged", "models", "patch", "capture", "evaluate")


def _kvtheory_imports(name: str) -> set[str]:
    """Every kvtheory module ``kvtheory/<name>.py`` imports, at any depth of the file."""
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvtheory."):
            out.add(node.module.split(".")[1])
    return out


def test_no_import_cycle_between_the_model_access_modules():
    graph = {m: _kvtheory_imports(m) & set(MODULES) for m in MODULES}
    assert graph["_hf"] == set() and _kvtheory_imports("_hf") <= {"errors"}
    assert "capture" not in graph["patch"]
    # depth-first search for a cycle
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_no_private_names_imported_across_patch_and_capture():
    for name, other in (("capture", "patch"), ("patch", "capture"), ("evaluate", "patch"),
                        ("evaluate", "capture")):
        tree = ast.parse((PKG / f"{name}.py").read_text())
        private = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.level == 1 and node.module == other for a in node.names if a.name.startswith("_")]
        assert private == [], (name, other, private)


def test_model_access_helpers():
    model = tiny_model("llama")
    assert _hf.unwrap(model) is model and _hf.model_device(model) == torch.device("cpu")
    assert _hf.context_length(model) == 64 and len(_hf.attention_modules(model)) == 2
    assert _hf.forward(model, tiny_ids()).logits.shape == (2, 12, 64)
    assert model.config in _hf.configs(model) and _hf.text_config(model) is model.config
    with pytest.raises(KVTheoryError, match="input_ids: got 65 tokens per sequence; expected at most 64"):
        _hf.check_fits(model, torch.ones(1, 65, dtype=torch.long), "input_ids")
    with pytest.raises(KVTheoryError, match=r"ids: got token ids in 0\.\.64; expected ids in 0\.\.63"):
        _hf.check_fits(model, torch.tensor([[0, 64]]), "ids")
    with pytest.raises(KVTheoryError, match="model: got"):
        _hf.unwrap(torch.nn.Linear(2, 2))
    plain = torch.nn.Linear(2, 2)
    plain.config = model.config  # a module with a config but no AttentionInterface attention
    with pytest.raises(KVTheoryError, match="ALL_ATTENTION_FUNCTIONS"):
        _hf.attention_modules(plain)


def test_cache_kwargs_follows_the_forward_signature():
    # transformers 5.3+ takes the cache as ``cache``; a forward that only knows
    # ``past_key_values`` (older versions) gets that name
    model = tiny_model("llama")
    assert _hf.cache_kwargs(model, "C") == {"cache": "C"}

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return past_key_values

    assert _hf.cache_kwargs(Old(), "C") == {"past_key_values": "C"}
    # the keyword reaches the model's cache: one token decoded after a 3-token prefill
    from transformers import DynamicCache

    ids = tiny_ids()[:1, :4]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :3], use_cache=True, **_hf.cache_kwargs(model, cache))
        step = model(input_ids=ids[:, 3:], use_cache=True, **_hf.cache_kwargs(model, cache))
        full = model(input_ids=ids, use_cache=False)
    assert cache.get_seq_length() == 4
    assert step.logits.dtype == torch.float32          # the tiny model's dtype
    assert_close(step.logits[:, -1], full.logits[:, -1], "float32")
