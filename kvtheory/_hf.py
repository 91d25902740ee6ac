"""Model access shared by :mod:`kvtheory.patch`, :mod:`kvtheory.capture` and :mod:`kvtheory.evaluate`.

One private home for what every module needs from a transformers model: unwrap a
:class:`~kvtheory.models.LoadedModel`, its device, one forward pass without a cache, token-id
checks (dtype, shape, vocabulary, context length), its attention modules in layer order and its
configs, and where "just before RoPE" is for queries and keys (the projection, or the QK-norm
that follows it) with a forward hook that sees that output as (batch, head, token, d). This
module imports nothing else from kvtheory except the error helpers, so it can never be part of
an import cycle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import KVTheoryError, bad_argument

__all__ = ["unwrap", "model_device", "forward", "check_ids", "check_fits", "context_length",
           "routes", "attention_modules", "configs", "text_config", "pre_rope_site", "head_view",
           "head_hook", "cache_kwargs"]

_ROUTES_CACHE: dict[type, bool] = {}


def unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` of a transformers model or of a :class:`~kvtheory.models.LoadedModel`."""
    inner = getattr(model, "model", None)
    if hasattr(model, "info") and hasattr(model, "tokenizer") and isinstance(inner, nn.Module):
        return inner  # a models.LoadedModel
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise bad_argument("model", model, "a transformers model or a kvtheory LoadedModel")
    return model


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def forward(model: nn.Module, ids: Tensor, attention_mask: Tensor | None = None) -> Any:
    """``model(input_ids=ids)`` without a KV cache (when the model takes ``use_cache``)."""
    kwargs: dict[str, Any] = {"input_ids": ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return model(**kwargs)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that hands ``model``'s forward a KV cache: ``cache`` from transformers 5.3
    on, ``past_key_values`` before (the old name warns that it goes in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def check_ids(ids: Any, name: str) -> Tensor:
    """Integer token ids shaped (token,) or (batch, token), returned as (batch, token).

    Floats, bools, complex numbers, meta tensors, empty and 3-D tensors are refused by name.

    >>> check_ids(torch.tensor([1, 2]), "ids").shape
    torch.Size([1, 2])
    >>> check_ids(torch.tensor([True]), "ids")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvtheory.errors.KVTheoryError: ids: got tensor of shape (1,) and dtype torch.bool; expected integer token ids ...
    """
    expected = "integer token ids shaped (token,) or (batch, token)"
    if not isinstance(ids, Tensor):
        raise bad_argument(name, ids, expected + " as a torch tensor")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise bad_argument(name, ids, expected + " (an integer dtype such as torch.long)")
    if ids.is_meta:
        raise bad_argument(name, ids, expected + " holding values (not a meta tensor)")
    if ids.ndim not in (1, 2) or ids.numel() == 0:
        raise bad_argument(name, ids, expected)
    return ids[None] if ids.ndim == 1 else ids


def context_length(model: nn.Module) -> int | None:
    """The model's context length from its config (None when it has no limit)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_fits(model: Any, ids: Tensor, name: str) -> None:
    """Sequences no longer than the model's context, ids inside its vocabulary."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and ids.shape[-1] > limit:
        raise KVTheoryError(f"{name}: got {ids.shape[-1]} tokens per sequence; expected at most "
                            f"{limit}, the context length of the model (max_position_embeddings)")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(config, "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if isinstance(vocab, int) and (lo < 0 or hi >= vocab):
        raise KVTheoryError(f"{name}: got token ids in {lo}..{hi}; expected ids in 0..{vocab - 1}, "
                            "the vocabulary of the model")


def routes(cls: type) -> bool:
    """Whether the class's forward looks its kernel up in ``ALL_ATTENTION_FUNCTIONS``."""
    if cls not in _ROUTES_CACHE:
        try:
            src = inspect.getsource(inspect.unwrap(cls.forward))
        except (OSError, TypeError):
            src = ""
        _ROUTES_CACHE[cls] = "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src
    return _ROUTES_CACHE[cls]


def attention_modules(model: Any) -> list[nn.Module]:
    """The self-attention modules of ``model`` in layer order (list index = layer).

    A module counts when its ``forward`` dispatches through ``ALL_ATTENTION_FUNCTIONS``
    (Llama/Mistral/Qwen2/Gemma3 ``*Attention``, ``GPT2Attention``, ``BertSelfAttention``);
    cross attention is left out. Raises :class:`KVTheoryError` when there is none.
    """
    model = unwrap(model)
    found = [
        m for m in model.modules()
        if routes(type(m)) and hasattr(m, "layer_idx") and not getattr(m, "is_cross_attention", False)
        and "Cross" not in type(m).__name__
    ]
    if not found:
        raise KVTheoryError(
            f"model: got a {type(model).__name__} whose attention modules do not dispatch through "
            "transformers' ALL_ATTENTION_FUNCTIONS; expected a model written for the AttentionInterface "
            "(transformers >= 4.48 modelling code)"
        )
    return found


def configs(model: nn.Module) -> list[Any]:
    """The model's config, its sub-configs at any depth and every sub-module's config."""
    from transformers import PretrainedConfig

    seen: dict[int, Any] = {}
    todo = [model.config] + [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if not isinstance(cfg, PretrainedConfig) or id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        todo.extend(getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {}) or {})
    return list(seen.values())


def text_config(model: nn.Module) -> Any:
    """The config describing the language model (the text config of a multimodal model)."""
    config = getattr(model, "config", None)
    if config is None:
        raise bad_argument("model", model, "a transformers model (with a .config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


#: projection -> the norms that some models (Gemma 3, Qwen3, OLMo 2, Cohere, ...) apply to its
#: output before RoPE; the pre-RoPE site is the norm's output when the module has one in use
_QK_NORMS = {"q_proj": ("q_norm", "q_layernorm"), "k_proj": ("k_norm", "k_layernorm")}
# (attention class, norm name) -> layout learnt from an unambiguous call: "bhtd" or "bthd"
_LAYOUTS: dict[tuple[type, str], str] = {}


def pre_rope_site(module: nn.Module, name: str) -> tuple[nn.Module, int, int, str]:
    """Where ``name``'s states are just before RoPE: ``(site module, heads, head_dim, site name)``.

    The site is the projection ``name`` (``q_proj``/``k_proj``), or the QK-norm applied to its
    output when the attention module has one in use (``k_norm``, ``k_layernorm``, ...).
    """
    proj = getattr(module, name, None)
    head_dim = getattr(module, "head_dim", None)
    out = getattr(proj, "out_features", None)
    if not isinstance(proj, nn.Module) or not isinstance(head_dim, int) or not isinstance(out, int):
        raise KVTheoryError(
            f"rope: got 'pre' for attention class {type(module).__name__}, which has no "
            f"{name} projection and head_dim; expected a Llama-style attention module")
    heads = out // head_dim
    if getattr(module, "use_qk_norm", True) is not False and getattr(module, "qk_layernorm", True) is not False:
        for norm in _QK_NORMS.get(name, ()):
            site = getattr(module, norm, None)
            if isinstance(site, nn.Module):
                return site, heads, head_dim, norm
    return proj, heads, head_dim, name


def head_view(x: Tensor, heads: int, head_dim: int, inp: Tensor | None, key: tuple) -> tuple[Tensor, str]:
    """``x`` as (batch, head, token, d) and its layout: ``flat`` (batch, token, head·d),
    ``bhtd`` or ``bthd``; an ambiguous 4-D shape (heads == tokens) is told apart by the
    input's strides (a transposed view has the head axis inner) or by the class's earlier calls."""
    if x.ndim == 3 and x.shape[-1] == heads * head_dim:
        return x.unflatten(-1, (heads, head_dim)).transpose(-3, -2), "flat"
    if x.ndim == 4 and x.shape[-1] == head_dim and heads in (x.shape[1], x.shape[2]):
        if x.shape[1] != x.shape[2] or heads == 1:
            layout = "bhtd" if x.shape[1] == heads else "bthd"
            _LAYOUTS.setdefault(key, layout)
        elif key in _LAYOUTS:
            layout = _LAYOUTS[key]
        elif isinstance(inp, Tensor) and inp.ndim == 4 and inp.stride(1) != inp.stride(2):
            layout = "bhtd" if inp.stride(1) < inp.stride(2) else "bthd"
        else:
            layout = "bthd" if x.is_contiguous() else "bhtd"
        return (x if layout == "bhtd" else x.transpose(1, 2)), layout
    raise KVTheoryError(
        f"rope: got 'pre' for {key[0].__name__}.{key[1]} whose output has shape {tuple(x.shape)}; "
        f"expected (batch, token, {heads}*{head_dim}) or 4-D with {heads} heads of {head_dim}")


def head_hook(fn: Callable[[Tensor], Tensor | None], heads: int, head_dim: int, key: tuple) -> Callable:
    """Forward hook on a pre-RoPE site (projection or QK-norm): its output seen as
    (batch, head, token, d); a replacement returned by ``fn`` goes back in the site's layout."""

    def hook(site, inputs, output):
        view, layout = head_view(output, heads, head_dim, inputs[0] if inputs else None, key)
        new = fn(view)
        if new is None:
            return None
        if layout == "flat":
            return new.transpose(-3, -2).flatten(-2)
        return new if layout == "bhtd" else new.transpose(1, 2)

    return hook
