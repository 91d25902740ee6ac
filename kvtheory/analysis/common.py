"""Shared plumbing of the analyses: models loaded once, captures cached on disk, method grids.

Everything here is cached (a model per name in memory, captures as safetensors + manifest
under ``<results>/cache``), so that a second ``kvtheory report`` does no repeated work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._checks import check_choice, check_int
from ..engine import get_model, wikitext_ids  # noqa: F401  (re-exported for the stages)
from ..store import DEFAULT_ROOT, config_hash

__all__ = [
    "get_model",
    "wikitext_ids",
    "load_or_capture",
    "quant_specs",
    "rank_specs",
    "hybrid_specs",
    "method_grid",
    "small",
]


def small() -> bool:
    """True when ``KVTHEORY_SMALL=1``: notebooks and tests use the small settings."""
    return os.environ.get("KVTHEORY_SMALL", "") not in ("", "0")


def load_or_capture(
    model: str,
    n_tokens: int,
    *,
    rope: str = "post",
    offset: int = 0,
    layers: tuple[int, ...] | None = None,
    data_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
):
    """Q/K/V of ``model`` on WikiText-2 tokens ``[offset, offset + n_tokens)``, cached on disk
    (for a tokenizer that adds BOS, :func:`kvtheory.evaluate.bos_id`, the window is BOS and the
    first ``n_tokens - 1`` of those tokens).

    Returns a :class:`kvtheory.capture.Capture`; per layer ``q`` (1, q_head, token, d), ``k``
    and ``v`` (1, kv_head, token, d). The cache folder name derives from the arguments, and
    :func:`kvtheory.capture.load_capture` checks its SHA-256 on every load.
    """
    from ..capture import MANIFEST, capture, load_capture, save_capture

    check_int("n_tokens", n_tokens, 2)
    check_int("offset", offset, 0)
    check_choice("rope", rope, ("pre", "post"))
    from ..evaluate import bos_id

    bos = bos_id(get_model(model).tokenizer)
    key = {"model": model, "n_tokens": n_tokens, "rope": rope, "offset": offset,
           "layers": list(layers) if layers is not None else None}
    if bos is not None:  # the window starts with BOS, as the model's tokenizer would put it
        key["bos"] = bos
    folder = Path(root if root is not None else DEFAULT_ROOT) / "cache" / f"capture-{config_hash(key)}"
    if (folder / MANIFEST).exists():
        return load_capture(folder)
    ids = wikitext_ids(model, str(data_dir) if data_dir is not None else None)
    if offset + n_tokens > ids.numel():
        from ..errors import bad_argument

        raise bad_argument("n_tokens", n_tokens, f"at most {ids.numel() - offset} tokens after offset {offset}")
    window = ids[offset: offset + n_tokens - (bos is not None)]
    if bos is not None:
        window = torch.cat([window.new_full((1,), bos), window])
    window = window.unsqueeze(0)
    cap = capture(get_model(model).model, window, layers=list(layers) if layers else None,
                  rope=rope, model_name=model)
    save_capture(cap, folder)
    return cap


def quant_specs(bits: tuple[int, ...] = (8, 4, 3, 2)) -> list[str]:
    """Per-token and KIVI-style quantization at each bit width."""
    return [s for b in bits for s in (f"int{b}", f"int{b}-kivi")]


def rank_specs(d: int, basis: str = "pca", fractions: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 3 / 4)) -> list[str]:
    """Rank d/8, d/4, d/2, 3d/4 in one basis."""
    return [f"rank{max(1, round(d * f))}-{basis}" for f in fractions]


def hybrid_specs(d: int, basis: str = "pca") -> list[str]:
    """Rank reduction followed by quantization of the kept coefficients at the INT4 budget
    and around it: rank d/2 at 8 bits and rank 3d/4 at 4 bits... (r·b/d ≈ 4 or 3 bits)."""
    return [f"rank{d // 2}x8-{basis}", f"rank{3 * d // 4}x4-{basis}", f"rank{d // 2}x4-{basis}"]


def method_grid(d: int, size: str = "default") -> list[str]:
    """The method grid of the report, all placed at their storage by the ledger.

    ``size``: ``"small"`` (notebooks/tests) or ``"default"``.
    """
    check_choice("size", size, ("small", "default"))
    if size == "small":
        return ["fp", "int8", "int4", "int4-kivi", "int2-kivi", f"rank{d // 4}-pca", f"rank{d // 2}-pca"]
    return ["fp"] + quant_specs() + rank_specs(d) + hybrid_specs(d)
