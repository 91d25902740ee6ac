r"""The evaluation engine shared by every analysis stage (and by notebooks): models loaded once
per process, WikiText-2 token windows, bases fitted once, and memoised perplexity points.

* :func:`get_model` — :func:`kvtheory.models.load_model`, once per (name, device).
* :func:`wikitext_ids` / :func:`eval_windows` — the WikiText-2 test text tokenized once by a
  model's own tokenizer (its BOS rule applied per window by the tokenizer convention of
  :mod:`kvtheory.evaluate`), cut into evaluation windows from the start and calibration windows
  from the end (:func:`kvtheory.evaluate.split_windows`: they never share a token).
* :func:`fitted_plan` — per-layer ``(keys, values)`` compressors whose data-dependent basis is
  fitted once per (model, basis, RoPE side, calibration ids) and shared by every spec in that
  basis. The fit itself is :func:`kvtheory.patch.fit_compressors`, whose cache is the only
  fit cache: the basis is fitted with a rank-1 spec, i.e. the full d×d rotation, and every
  rank / rotated quantizer / hybrid in that basis reads it.
* :func:`ppl_point` — one perplexity per (model key, key spec, value spec, RoPE side,
  evaluation ids, calibration ids, n_boot, seed), memoised in the process and, given a
  ``root``, on disk under ``root/cache/ppl`` (atomic JSON files).

For a ``target`` ("k", "v" or "kv") a spec compresses keys, values or both; the other stays
fp. Storage of a (spec, target) is the K or V bits, or their mean for ``kv``:

.. math:: b_{kv} = \tfrac12\,(b_k + b_v).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ._checks import check_choice
from .errors import bad_argument

__all__ = ["get_model", "set_placement", "wikitext_ids", "eval_windows", "fitted_plan", "ppl_point",
           "target_specs", "storage_bits", "clear_memo", "CALLS", "TARGETS"]

TARGETS = ("k", "v", "kv")
#: number of real perplexity evaluations per memo key (tests read it)
CALLS: Counter = Counter()
_MEMO: dict[str, dict] = {}


#: how each model name is placed in this process (:func:`set_placement`); default one device
_PLACEMENT: dict[str, Any] = {}


def set_placement(name: str, device_map: str | dict | None) -> None:
    """Load ``name`` with this accelerate ``device_map`` from now on in this process (None: on
    one device); a model already loaded with another placement is loaded again."""
    from .placement import parse_device_map

    device_map = parse_device_map(device_map)
    if _PLACEMENT.get(name) != device_map:
        _PLACEMENT[name] = device_map
        _load.cache_clear()


@functools.lru_cache(maxsize=4)
def _load(name: str, device: str, placement: str | None):
    from .models import load_model

    return load_model(name, device=device, device_map=_PLACEMENT.get(name))


def get_model(name: str, device: str = "cpu"):
    """:func:`kvtheory.models.load_model`, loaded once per (name, device, placement) in this
    process (placement: :func:`set_placement`)."""
    import json

    return _load(name, device, json.dumps(_PLACEMENT.get(name), sort_keys=True))


@functools.lru_cache(maxsize=8)
def wikitext_ids(tokenizer_name: str, data_dir: str | None = None) -> Int[Tensor, " token"]:
    """The whole WikiText-2 test text tokenized once, shape (token,), by the tokenizer of the
    model ``tokenizer_name`` (a registry name or path)."""
    from .data import load_wikitext2
    from .evaluate import tokenize

    tok = get_model(tokenizer_name).tokenizer
    return tokenize(tok, load_wikitext2(data_dir))


def eval_windows(model_name: str, seq_len: int, n_windows: int, calib_windows: int,
                 data_dir=None) -> tuple[Tensor, Tensor]:
    """``(eval (W, L), calibration (c, L))`` WikiText-2 ids of ``model_name``'s tokenizer:
    W windows from the start of the test split, c from its end (disjoint); each starts with BOS
    where the tokenizer adds one (:func:`kvtheory.evaluate.bos_id`: Gemma yes, SmolLM2 and Qwen
    no)."""
    from .evaluate import bos_id, split_windows

    ids = wikitext_ids(model_name, str(data_dir) if data_dir is not None else None)
    bos = bos_id(get_model(model_name).tokenizer)
    return split_windows(ids, seq_len, n_windows, calib_windows, bos=bos)


def clear_memo() -> None:
    """Forget every memoised perplexity and fitted basis of this process (the disk cache
    stays)."""
    from .patch import clear_fit_cache

    _MEMO.clear()
    clear_fit_cache()
    CALLS.clear()


def _ids_hash(ids: Tensor | None) -> str | None:
    if ids is None:
        return None
    data = ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()[:16]


def _unwrap(model: Any) -> torch.nn.Module:
    return model.model if hasattr(model, "info") and hasattr(model, "tokenizer") else model


def fitted_plan(model: Any, model_key: str, k_spec: str, v_spec: str, *, rope: str = "post",
                calibration: Int[Tensor, "calib calib_token"] | None = None,
                ) -> dict[int, tuple[Any, Any]]:
    r"""Per-layer ``(keys, values)`` compressors for ``k_spec``/``v_spec``, their data-dependent
    bases fitted once per (model, basis, rope, calibration) and shared by every spec in that basis
    (the basis is fitted with a rank-1 spec: the fitted basis is the full d×d rotation).

    Values are never fitted with ``qaware`` (it needs queries): that raises KVTheoryError.
    ``model_key`` names the model in memo keys (the fit cache itself is per model object).
    """
    from .compress import make_compressor, parse_method
    from .patch import attention_modules, fit_compressors

    inner = _unwrap(model)
    rope = check_choice("rope", rope, ("post", "pre"))
    n = len(attention_modules(inner))
    comps = {"k": make_compressor(k_spec, "k"), "v": make_compressor(v_spec, "v")}
    plan = {layer: [comps["k"], comps["v"]] for layer in range(n)}
    for i, (role, spec) in enumerate((("k", k_spec), ("v", v_spec))):
        if not comps[role].needs_fit:
            continue
        if calibration is None:
            raise bad_argument("calibration", None, f"calibration ids to fit the basis of {spec!r}")
        basis = parse_method(spec).basis
        if role == "v" and basis == "qaware":
            raise bad_argument("values", spec,
                               "a value spec without the qaware basis (it needs queries)")
        vspec = "fp" if basis == "qaware" else f"rank1-{basis}"
        fits = fit_compressors(inner, f"rank1-{basis}", vspec, calibration, rope)
        for layer in range(n):
            plan[layer][i] = replace(comps[role], fitted=fits[layer][i].fitted)
    return {layer: (ck, cv) for layer, (ck, cv) in plan.items()}


def target_specs(spec: str, target: str) -> tuple[str, str]:
    """``(key spec, value spec)`` of ``spec`` applied to ``target``.

    >>> target_specs("int4", "k"), target_specs("int4", "kv")
    (('int4', 'fp'), ('int4', 'int4'))
    """
    check_choice("target", target, TARGETS)
    return (spec if target in ("k", "kv") else "fp", spec if target in ("v", "kv") else "fp")


def ppl_point(model: Any, model_key: str, spec: str, target: str, *,
              windows: Int[Tensor, "batch token"], calibration: Int[Tensor, "calib calib_token"] | None,
              rope: str = "post", n_boot: int = 1000, seed: int = 0,
              root: str | Path | None = None, progress: bool = False) -> dict:
    """Perplexity of ``windows`` with ``spec`` applied to ``target`` (k, v or kv), memoised.

    Returns :class:`kvtheory.evaluate.Score` as a dict (metric, value, ci_low, ci_high,
    n_tokens, n_items). ``spec == "fp"`` runs the bare model. The memo key holds the model key,
    the key and value specs, the RoPE side (``"post"`` whenever the keys are not compressed),
    SHA-256 of the evaluation and calibration ids, n_boot and seed.
    """
    from . import __version__
    from .compress import make_compressor
    from .evaluate import perplexity
    from .io import read_json, write_json
    from .store import config_hash

    ks, vs = target_specs(spec, target)
    rope = check_choice("rope", rope, ("post", "pre")) if ks != "fp" else "post"
    fit = make_compressor(ks, "k").needs_fit or make_compressor(vs, "v").needs_fit
    key = {"kvtheory": __version__, "model": model_key, "k": ks, "v": vs, "rope": rope,
           "windows": _ids_hash(windows),
           "calibration": _ids_hash(calibration) if fit else None,
           "n_boot": int(n_boot), "seed": int(seed)}
    h = config_hash(key)
    if h in _MEMO:
        return dict(_MEMO[h])
    path = Path(root) / "cache" / "ppl" / f"ppl-{h}.json" if root is not None else None
    if path is not None and path.exists():
        saved = read_json(path)
        if isinstance(saved, dict) and saved.get("key") == key:
            _MEMO[h] = saved["score"]
            return dict(saved["score"])
    inner = _unwrap(model)
    if (ks, vs) == ("fp", "fp"):
        score = perplexity(inner, windows, n_boot=n_boot, seed=seed, progress=progress)
    else:
        plan = fitted_plan(inner, model_key, ks, vs, rope=rope, calibration=calibration)
        score = perplexity(inner, windows, keys=ks, values=vs, calibration=plan, rope=rope,
                           n_boot=n_boot, seed=seed, progress=progress)
    CALLS[h] += 1
    # an interval that does not exist (one window) is None, in memory as on disk
    out = {k: (None if isinstance(v, float) and v != v else v)
           for k, v in dataclasses.asdict(score).items()}
    _MEMO[h] = out
    if path is not None:
        write_json(path, {"key": key, "score": out}, arg="root")
    return dict(out)


def storage_bits(spec: str, target: str, d: int, tokens: int) -> float:
    r"""Bits per cached element of ``spec`` on ``target``: the K or V bits, or for ``kv`` their
    mean :math:`\tfrac12(b_k+b_v)`; uncompressed tensors count 16.

    >>> storage_bits("int4-kivi", "kv", 64, 512), storage_bits("int4-kivi", "v", 64, 512)
    (4.375, 4.5)
    """
    from .ledger import bits_per_element

    ks, vs = target_specs(spec, target)
    bk = bits_per_element(ks, d, tokens, role="k")
    bv = bits_per_element(vs, d, tokens, role="v")
    return {"k": bk, "v": bv, "kv": (bk + bv) / 2}[target]
