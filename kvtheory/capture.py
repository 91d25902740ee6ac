r"""Capture the queries, keys and values a model's attention layers see, and store them.

:func:`capture` runs one forward pass with every chosen attention layer routed through the
kvtheory attention function (:mod:`kvtheory.patch`): post-RoPE states are exactly what the
attention kernel receives, before GQA expansion; pre-RoPE q and k are the ``q_proj`` and
``k_proj`` outputs (models without RoPE have pre = post).

Per layer: ``q`` (batch, q_head, query, d), ``k`` and ``v`` (batch, kv_head, token, d); query
head h reads kv head h // group.

:func:`save_capture` writes ``capture.safetensors`` and ``manifest.json`` (model, layers,
q_heads, kv_heads, group, d, positions, token ids, dtype, RoPE side, kvtheory version and the
SHA-256 of the tensor file), each atomically, the manifest last. :func:`load_capture` checks
the SHA-256 and returns the same tensors and metadata bit for bit.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_choice
from .errors import KVTheoryError, bad_argument
from .io import atomic_write, read_json, sha256_file, write_json

__all__ = [
    "Capture", "CaptureMeta", "capture", "save_capture", "load_capture", "capture_size",
    "TENSOR_FILE", "MANIFEST",
]

TENSOR_FILE = "capture.safetensors"
MANIFEST = "manifest.json"
FORMAT = "kvtheory.capture"
FORMAT_VERSION = 1
WHAT = ("q", "k", "v")


@dataclass(frozen=True)
class CaptureMeta:
    """What a capture holds and where it came from (all plain values; JSON round-trips)."""

    model: str
    layers: tuple[int, ...]
    what: tuple[str, ...]
    q_heads: int
    kv_heads: int
    group: int
    d: int
    positions: tuple[int, ...]
    token_ids: tuple[tuple[int, ...], ...]
    dtype: str
    rope: str
    kvtheory_version: str


@dataclass(frozen=True, eq=False)
class Capture:
    """``tensors[layer][name]`` for name in ``meta.what``: q (batch, q_head, query, d), k and v
    (batch, kv_head, token, d)."""

    tensors: dict[int, dict[str, Tensor]]
    meta: CaptureMeta

    def __getitem__(self, layer: int) -> dict[str, Tensor]:
        if layer not in self.tensors:
            raise bad_argument("layer", layer, f"one of the captured layers {list(self.tensors)}")
        return self.tensors[layer]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _keep(x: Tensor, device: Any, dtype: torch.dtype | None) -> Tensor:
    y = x.detach().to(device=x.device if device is None else device, dtype=dtype or x.dtype)
    if y.data_ptr() == x.data_ptr():  # never hold a buffer the model (or a cache) may reuse
        y = y.clone(memory_format=torch.contiguous_format)
    return y.contiguous()


def _check_ids(ids: Any, name: str) -> Tensor:
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.ndim not in (1, 2) or ids.numel() == 0:
        raise bad_argument(name, ids, "integer token ids shaped (token,) or (batch, token)")
    return ids[None] if ids.ndim == 1 else ids


def _check_fits(model: Any, ids: Tensor, name: str) -> None:
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


def _forward(model: nn.Module, ids: Tensor, attention_mask: Tensor | None = None) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return model(**kwargs)


def capture(
    model: Any,
    input_ids: Int[Tensor, "..."],
    layers: Any = None,
    what: Any = WHAT,
    rope: str = "post",
    attention_mask: Int[Tensor, "..."] | None = None,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = "cpu",
    model_name: str | None = None,
    progress: bool = False,
) -> Capture:
    """Capture q/k/v of ``layers`` (default all) for ``input_ids`` (batch, token) or (token,).

    ``dtype``/``device``: where the tensors are kept (``None``: as computed). ``model`` is a
    transformers model or a :class:`~kvtheory.models.LoadedModel` (whose name is recorded).

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=30)
    >>> cap = capture(LlamaForCausalLM(cfg).float().eval(), torch.tensor([1, 2, 3]), layers=[1])
    >>> tuple(cap[1]["q"].shape), tuple(cap[1]["k"].shape), cap.meta.group
    ((1, 4, 3, 4), (1, 2, 3, 4), 2)
    """
    from . import __version__
    from .models import model_info
    from .patch import _layer_set, _observe, _unwrap, attention_modules

    name = model_name or getattr(getattr(model, "info", None), "name", None)
    model = _unwrap(model)
    ids = _check_ids(input_ids, "input_ids")
    rope = check_choice("rope", rope, ("post", "pre"))
    what = (what,) if isinstance(what, str) else tuple(what)
    if not what or any(w not in WHAT for w in what) or len(set(what)) != len(what):
        raise bad_argument("what", what, "a non-empty subset of ('q', 'k', 'v')")
    what = tuple(w for w in WHAT if w in what)
    if attention_mask is not None and (
        not isinstance(attention_mask, Tensor) or attention_mask.shape[-1] != ids.shape[-1]
    ):
        raise bad_argument("attention_mask", attention_mask,
                           f"a (batch, token) mask matching input_ids {tuple(ids.shape)}")
    chosen = _layer_set(layers, len(attention_modules(model)))
    _check_fits(model, ids, "input_ids")
    info = model_info(model, name)
    tensors: dict[int, dict[str, Tensor]] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chosen), desc="capture", unit="layer", disable=not progress, leave=False)

    def record(layer, q, k, v):
        tensors[layer] = {w: _keep(x, device, dtype) for w, x in zip(WHAT, (q, k, v)) if w in what}
        bar.update(1)

    dev = next(model.parameters()).device
    mask = None if attention_mask is None else attention_mask.reshape(ids.shape).to(dev)
    try:
        with torch.no_grad(), _observe(model, chosen, rope, record):
            _forward(model, ids.to(dev), mask)
    finally:
        bar.close()
    missing = [layer for layer in chosen if layer not in tensors]
    if missing:
        raise KVTheoryError(
            f"layers: got no attention call for layers {missing}; expected every chosen layer to run")
    first = tensors[chosen[0]]
    out_dtype = next(iter(first.values())).dtype
    meta = CaptureMeta(
        model=info.name, layers=tuple(chosen), what=what, q_heads=info.q_heads, kv_heads=info.kv_heads,
        group=info.group, d=info.d, positions=tuple(range(ids.shape[-1])),
        token_ids=tuple(tuple(int(t) for t in row) for row in ids.tolist()),
        dtype=_dtype_name(out_dtype), rope=rope, kvtheory_version=__version__,
    )
    return Capture(tensors={layer: tensors[layer] for layer in chosen}, meta=meta)


def save_capture(cap: Capture, out_dir: str | os.PathLike) -> Path:
    """Write ``capture.safetensors`` then ``manifest.json`` (with its SHA-256) into ``out_dir``.

    Each file is written atomically; the manifest goes last, so a reader never sees a manifest
    without its complete tensor file. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    from .io import provenance

    if not isinstance(cap, Capture):
        raise bad_argument("cap", cap, "a Capture from kvtheory.capture.capture")
    out = Path(out_dir)
    flat = {f"layer{layer}.{w}": t.contiguous() for layer, d in cap.tensors.items() for w, t in d.items()}
    tensor_path = atomic_write(out / TENSOR_FILE, lambda p: save_file(flat, str(p)), arg="out")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{f.name: getattr(cap.meta, f.name) for f in fields(CaptureMeta)},
        "shapes": {k: list(v.shape) for k, v in flat.items()},
        "tensor_file": TENSOR_FILE,
        "tensor_bytes": tensor_path.stat().st_size,
        "sha256": sha256_file(tensor_path),
        "provenance": provenance(),
    }
    write_json(out / MANIFEST, manifest, arg="out")
    return out


def _corrupt(path: Path, why: str) -> KVTheoryError:
    return KVTheoryError(
        f"capture: got {str(path)!r}, {why}; expected a complete capture written by "
        "kvtheory (re-run `kvtheory capture`)"
    )


def load_capture(path: str | os.PathLike) -> Capture:
    """Read a capture folder (or its ``manifest.json``), verifying the tensor file's SHA-256.

    Raises :class:`KVTheoryError` for a missing, truncated or corrupted file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.name in (MANIFEST, TENSOR_FILE) else path
    if not folder.is_dir():
        raise bad_argument("capture", str(path), "a folder written by save_capture / kvtheory capture")
    manifest = read_json(folder / MANIFEST, arg="capture")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(folder / MANIFEST, "which is not a kvtheory capture manifest")
    missing = [f.name for f in fields(CaptureMeta) if f.name not in manifest] + [
        k for k in ("sha256", "tensor_file", "shapes") if k not in manifest]
    if missing:
        raise _corrupt(folder / MANIFEST, f"whose manifest lacks {', '.join(missing)}")
    tensor_path = folder / str(manifest["tensor_file"])
    if not tensor_path.is_file():
        raise _corrupt(tensor_path, "which does not exist")
    size = tensor_path.stat().st_size
    if "tensor_bytes" in manifest and size != manifest["tensor_bytes"]:
        raise _corrupt(tensor_path,
                       f"of {size} bytes where the manifest says {manifest['tensor_bytes']} (truncated?)")
    digest = sha256_file(tensor_path)
    if digest != manifest["sha256"]:
        raise _corrupt(tensor_path, f"whose SHA-256 {digest[:16]}... differs from the manifest's "
                       f"{str(manifest['sha256'])[:16]}... (corrupted or modified)")
    try:
        flat = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _corrupt(tensor_path, f"which safetensors cannot read ({exc})") from None
    meta = _meta_from_json(manifest, folder)
    tensors: dict[int, dict[str, Tensor]] = {}
    for layer in meta.layers:
        tensors[layer] = {}
        for w in meta.what:
            key = f"layer{layer}.{w}"
            if key not in flat or list(flat[key].shape) != list(manifest["shapes"].get(key, [])):
                raise _corrupt(tensor_path, f"which lacks tensor {key} of the manifest's shape")
            tensors[layer][w] = flat[key]
    return Capture(tensors=tensors, meta=meta)


def _meta_from_json(m: dict, folder: Path) -> CaptureMeta:
    try:
        return CaptureMeta(
            model=str(m["model"]), layers=tuple(int(x) for x in m["layers"]),
            what=tuple(str(x) for x in m["what"]), q_heads=int(m["q_heads"]),
            kv_heads=int(m["kv_heads"]), group=int(m["group"]), d=int(m["d"]),
            positions=tuple(int(x) for x in m["positions"]),
            token_ids=tuple(tuple(int(t) for t in row) for row in m["token_ids"]),
            dtype=str(m["dtype"]), rope=str(m["rope"]), kvtheory_version=str(m["kvtheory_version"]),
        )
    except (TypeError, ValueError) as exc:
        raise _corrupt(folder / MANIFEST, f"whose manifest has a malformed field ({exc})") from None


def capture_size(cap: Capture) -> int:
    """Bytes held by the captured tensors.

    >>> meta = CaptureMeta("m", (0,), ("k",), 1, 1, 1, 2, (0,), ((5,),), "float32", "post", "0")
    >>> capture_size(Capture({0: {"k": torch.zeros(1, 1, 1, 2, dtype=torch.float32)}}, meta))
    8
    """
    return sum(t.numel() * t.element_size() for d in cap.tensors.values() for t in d.values())

