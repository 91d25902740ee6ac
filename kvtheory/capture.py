r"""Capture the queries, keys and values a model's attention layers see, and store them.

:func:`capture` runs one forward pass with every chosen attention layer routed through the
kvtheory attention function (:mod:`kvtheory.patch`): post-RoPE states are exactly what the
attention kernel receives, before GQA expansion; pre-RoPE q and k are taken just before RoPE:
the ``q_proj``/``k_proj`` outputs, or the QK-norm outputs on models that normalise them
(Gemma 3, Qwen3, OLMo 2). Models without RoPE have pre = post.

Per layer: ``q`` (batch, q_head, query, d), ``k`` and ``v`` (batch, kv_head, token, d); query
head h reads kv head h // group. ``meta.windows`` holds each captured layer's attention window
(an int for a sliding-window layer: query i sees keys j with i - window < j <= i, as
transformers' ``sliding_window_overlay``; None for a global layer); pass it to
``kvtheory.flips.attention_metrics(..., window=...)`` so metrics use the layer's true mask.

:func:`save_capture` writes ``capture.safetensors`` and ``manifest.json`` (model, layers,
q_heads, kv_heads, group, d, windows, positions, token ids, dtype, RoPE side, kvtheory version,
the SHA-256 of the tensor file and the manifest's own SHA-256), each atomically, the manifest
last. :func:`load_capture` checks both hashes and the tensors' shapes against the manifest and
returns the same tensors and metadata bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_choice
from ._hf import check_fits, check_ids, forward, model_device, unwrap
from .errors import KVTheoryError, bad_argument
from .io import atomic_write, check_output_dir, check_output_file, read_json, sha256_file, write_json

__all__ = [
    "Capture", "CaptureMeta", "capture", "save_capture", "load_capture", "capture_size",
    "TENSOR_FILE", "MANIFEST",
]

TENSOR_FILE = "capture.safetensors"
MANIFEST = "manifest.json"
FORMAT = "kvtheory.capture"
FORMAT_VERSION = 2  # 2: per-layer windows and the manifest's own SHA-256
WHAT = ("q", "k", "v")
# kept for callers of the former private names (now in kvtheory._hf)
_check_ids, _check_fits, _forward = check_ids, check_fits, forward


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
    windows: tuple[int | None, ...] | None = None

    def window(self, layer: int) -> int | None:
        """The attention window of a captured ``layer`` (None: global attention)."""
        if layer not in self.layers:
            raise bad_argument("layer", layer, f"one of the captured layers {list(self.layers)}")
        return None if self.windows is None else self.windows[self.layers.index(layer)]


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

    ``dtype``/``device``: where the tensors are kept (``None``: as computed); ``dtype`` must be
    a floating torch dtype. ``model`` is a transformers model or a
    :class:`~kvtheory.models.LoadedModel` (whose name is recorded).

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=30)
    >>> cap = capture(LlamaForCausalLM(cfg).float().eval(), torch.tensor([1, 2, 3]), layers=[1])
    >>> tuple(cap[1]["q"].shape), tuple(cap[1]["k"].shape), cap.meta.group, cap.meta.windows
    ((1, 4, 3, 4), (1, 2, 3, 4), 2, (None,))
    """
    from . import __version__
    from ._hf import attention_modules
    from .models import model_info
    from .patch import layer_set, observe

    name = model_name or getattr(getattr(model, "info", None), "name", None)
    model = unwrap(model)
    ids = check_ids(input_ids, "input_ids")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise bad_argument("dtype", dtype, "None (keep the computed dtype) or a floating torch dtype "
                           "such as torch.float32 (integer, bool and complex dtypes would destroy the values)")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise bad_argument("device", device, "None or a torch device such as 'cpu'") from None
    if any(p.is_meta for p in model.parameters()) and not any(
            hasattr(m, "_hf_hook") for m in model.modules()):
        raise bad_argument("model", f"{type(model).__name__} with meta (unmaterialised) weights",
                           "a model whose weights are loaded (not on the 'meta' device)")
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
    chosen = layer_set(layers, len(attention_modules(model)))
    check_fits(model, ids, "input_ids")
    info = model_info(model, name)
    tensors: dict[int, dict[str, Tensor]] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chosen), desc="capture", unit="layer", disable=not progress, leave=False)

    def record(layer, q, k, v):
        tensors[layer] = {w: _keep(x, device, dtype) for w, x in zip(WHAT, (q, k, v)) if w in what}
        bar.update(1)

    dev = model_device(model)
    mask = None if attention_mask is None else attention_mask.reshape(ids.shape).to(dev)
    try:
        with torch.no_grad(), observe(model, chosen, rope, record):
            forward(model, ids.to(dev), mask)
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
        windows=tuple(info.windows[layer] if layer < len(info.windows) else None for layer in chosen),
    )
    return Capture(tensors={layer: tensors[layer] for layer in chosen}, meta=meta)


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_capture(cap: Capture, out_dir: str | os.PathLike) -> Path:
    """Write ``capture.safetensors`` then ``manifest.json`` (with both SHA-256s) into ``out_dir``.

    Each file is written atomically; the manifest goes last, so a reader never sees a manifest
    without its complete tensor file. Both paths are checked before anything is written.
    Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    from .io import provenance, to_jsonable

    if not isinstance(cap, Capture):
        raise bad_argument("cap", cap, "a Capture from kvtheory.capture.capture")
    out = check_output_dir(out_dir, "out")
    for name in (TENSOR_FILE, MANIFEST):
        check_output_file(out / name, "out")
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
    manifest = to_jsonable(manifest)
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    write_json(out / MANIFEST, manifest, arg="out")
    return out


def _corrupt(path: Path, why: str) -> KVTheoryError:
    return KVTheoryError(
        f"capture: got {str(path)!r}, {why}; expected a complete capture written by "
        "kvtheory (re-run `kvtheory capture`)"
    )


def load_capture(path: str | os.PathLike) -> Capture:
    """Read a capture folder (or its ``manifest.json``), verifying both SHA-256s and the shapes.

    Raises :class:`KVTheoryError` for a missing, truncated, corrupted or hand-edited file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise bad_argument("capture", path, "the path of a folder written by save_capture / kvtheory capture")
    path = Path(path)
    folder = path.parent if path.name in (MANIFEST, TENSOR_FILE) else path
    if not folder.is_dir():
        raise bad_argument("capture", str(path), "a folder written by save_capture / kvtheory capture")
    manifest = read_json(folder / MANIFEST, arg="capture")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(folder / MANIFEST, "which is not a kvtheory capture manifest")
    version = manifest.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise _corrupt(folder / MANIFEST, f"of format version {version!r} (this kvtheory reads 1 and "
                       f"{FORMAT_VERSION})")
    required = [f.name for f in fields(CaptureMeta) if f.name != "windows" or version >= 2]
    missing = [k for k in required if k not in manifest] + [
        k for k in ("sha256", "tensor_file", "shapes") + (("manifest_sha256",) if version >= 2 else ())
        if k not in manifest]
    if missing:
        raise _corrupt(folder / MANIFEST, f"whose manifest lacks {', '.join(missing)}")
    if version >= 2 and manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise _corrupt(folder / MANIFEST, "whose SHA-256 differs from its manifest_sha256 (edited by hand "
                       "or damaged)")
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
    _check_meta(meta, tensors, folder / MANIFEST)
    return Capture(tensors=tensors, meta=meta)


def _check_meta(meta: CaptureMeta, tensors: dict[int, dict[str, Tensor]], where: Path) -> None:
    """The manifest's geometry must describe the tensors (catches edits of v1 manifests too)."""
    batch, tokens = len(meta.token_ids), len(meta.positions)
    problems = []
    if meta.kv_heads < 1 or meta.q_heads % meta.kv_heads or meta.group != meta.q_heads // meta.kv_heads:
        problems.append(f"group {meta.group} with {meta.q_heads} q heads over {meta.kv_heads} kv heads")
    if any(len(row) != tokens for row in meta.token_ids):
        problems.append(f"token_ids rows not of {tokens} positions")
    if meta.windows is not None and len(meta.windows) != len(meta.layers):
        problems.append(f"{len(meta.windows)} windows for {len(meta.layers)} layers")
    if meta.rope not in ("post", "pre"):
        problems.append(f"rope {meta.rope!r}")
    for layer, named in tensors.items():
        for w, t in named.items():
            heads = meta.q_heads if w == "q" else meta.kv_heads
            if tuple(t.shape) != (batch, heads, tokens, meta.d):
                problems.append(f"layer{layer}.{w} of shape {tuple(t.shape)} where the manifest says "
                                f"{(batch, heads, tokens, meta.d)}")
            if _dtype_name(t.dtype) != meta.dtype:
                problems.append(f"layer{layer}.{w} of dtype {_dtype_name(t.dtype)}, not {meta.dtype}")
    if problems:
        raise _corrupt(where, "whose metadata does not match its tensors: " + "; ".join(problems[:3]))


def _meta_from_json(m: dict, folder: Path) -> CaptureMeta:
    try:
        windows = m.get("windows")
        return CaptureMeta(
            model=str(m["model"]), layers=tuple(int(x) for x in m["layers"]),
            what=tuple(str(x) for x in m["what"]), q_heads=int(m["q_heads"]),
            kv_heads=int(m["kv_heads"]), group=int(m["group"]), d=int(m["d"]),
            positions=tuple(int(x) for x in m["positions"]),
            token_ids=tuple(tuple(int(t) for t in row) for row in m["token_ids"]),
            dtype=str(m["dtype"]), rope=str(m["rope"]), kvtheory_version=str(m["kvtheory_version"]),
            windows=None if windows is None else tuple(None if w is None else int(w) for w in windows),
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

