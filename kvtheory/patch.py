r"""Compression inside attention: :func:`compressed_kv` routes every attention layer of a
transformers model through an attention function registered with ``AttentionInterface``.

How the routing works (transformers 5.x): each attention module looks its kernel up as
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``
with query/key/value shaped (batch, head, token, d): keys after RoPE (as the cache holds them)
and before GQA expansion. For each original implementation ``X`` (``sdpa``, ``eager``, ...)
we register ``kvtheory_X``, which compresses the key and value states and then calls ``X``
itself (for ``eager``: the modelling file's own ``eager_attention_forward``, or GPT-2's
``_upcast_and_reordered_attn`` when that model would use it), and register ``X``'s mask
builder under the same name with ``AttentionMaskInterface`` — without it transformers
builds no mask for an unknown name, and causal and padding masks silently disappear. The
context manager sets ``config._attn_implementation`` on the model and every sub-config and
restores all of them, and removes every hook, in ``finally``. Contexts nest: compressions
compose, outermost first.

``rope="pre"`` compresses keys just before RoPE instead, in a forward hook on ``k_proj``, or
on the key norm for models with QK-norm (Gemma 3, Qwen3, OLMo 2: ``k_norm`` acts after
``k_proj`` and before RoPE); models without RoPE have pre = post. Compressors whose basis is
learnt from data are fitted per (layer, kv_head) on calibration tokens (:func:`fit_compressors`; cached per model, specs,
RoPE side and calibration ids). Under incremental decoding with a cache the whole cache is
re-compressed at each step; evaluation here runs one forward pass per window.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ._checks import check_choice
from ._hf import (attention_modules, check_fits, check_ids, configs, forward, head_hook, head_view,
                  model_device, pre_rope_site, routes, unwrap)
from .errors import KVTheoryError, bad_argument

__all__ = ["compressed_kv", "fit_compressors", "attention_modules", "clear_fit_cache", "PREFIX"]

PREFIX = "kvtheory_"
ROPE_SIDES = ("post", "pre")

# attention module -> callbacks (q, k, v) -> (k, v), outermost context first
_HANDLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> {cache key: {layer: (ck, cv)}}
_FIT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model access (unwrap, device, forward, id checks, attention modules, configs) lives in _hf
_unwrap, _routes, _configs, _model_device = unwrap, routes, configs, model_device
_check_ids, _check_fits, _forward = check_ids, check_fits, forward


def _delegate(original: str, module: nn.Module) -> Callable:
    """The function ``original`` names for ``module`` (its own eager function for ``eager``)."""
    namespace = vars(sys.modules[type(module).__module__])
    if original == "eager":
        if getattr(module, "reorder_and_upcast_attn", False) and hasattr(
            module, "_upcast_and_reordered_attn"
        ):
            # GPT-2 calls this instead of any interface when eager + reorder_and_upcast_attn
            return lambda m, q, k, v, mask, *args, **kwargs: m._upcast_and_reordered_attn(q, k, v, mask)
        fn = namespace.get("eager_attention_forward")
        if fn is None:
            raise KVTheoryError(
                f"model: got attention class {type(module).__name__} with no eager_attention_forward "
                "in its modelling file; expected standard transformers modelling code"
            )
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = namespace.get("ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    return interface[original]


def _make_attention(original: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        for handler in tuple(_HANDLERS.get(module, ())):
            key, value = (handler(query, key, value, attention_mask) if getattr(
                handler, "wants_mask", False) else handler(query, key, value))
        return _delegate(original, module)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{PREFIX}{original}_attention"
    return attention


def _routed_name(original: str | None) -> str:
    """Register ``kvtheory_<original>`` (attention and mask) once; return the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    original = original or "eager"
    if original.startswith(PREFIX):
        return original  # already routed by an enclosing context
    name = PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(original))
    if name not in AttentionMaskInterface._global_mapping and original in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _layer_set(layers: Any, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    try:
        out = sorted({int(x) if not isinstance(x, bool) else -1 for x in layers})
    except (TypeError, ValueError):
        raise bad_argument("layers", layers, f"None or layer indices in 0..{n - 1}") from None
    if not out or out[0] < 0 or out[-1] >= n:
        raise bad_argument("layers", layers, f"None or layer indices in 0..{n - 1}")
    return out


layer_set = _layer_set  # for capture: layers=None|int|iterable -> sorted layer indices


# where "pre-RoPE" is (the projection, or its QK-norm) and how its output is seen as heads: _hf
_pre_rope_site, _head_view, _head_hook = pre_rope_site, head_view, head_hook


def _pre_rope(model: nn.Module) -> bool:
    """Whether ``rope="pre"`` differs from post, i.e. the model applies RoPE."""
    from .models import model_info

    return model_info(model).rope


@contextlib.contextmanager
def _route(
    model: nn.Module,
    layers: list[int],
    attention: Callable[[int], Callable] | None = None,
    projections: dict[str, Callable[[int], Callable]] | None = None,
) -> Iterator[list[nn.Module]]:
    """Route ``model`` through the kvtheory attention functions while the block runs.

    ``attention(layer)`` gives the handler ``(q, k, v) -> (k, v)`` of a layer;
    ``projections[name](layer)`` a function of that projection's output as heads
    (batch, head, token, d) returning a replacement or None.
    """
    modules = attention_modules(model)
    saved = [(cfg, getattr(cfg, "_attn_implementation_internal", None)) for cfg in _configs(model)]
    handles, added = [], []
    try:
        for cfg, original in saved:
            cfg._attn_implementation_internal = _routed_name(original)
        for layer in layers:
            module = modules[layer]
            if attention is not None:
                handler = attention(layer)
                _HANDLERS.setdefault(module, []).append(handler)
                added.append((module, handler))
            for name, make in (projections or {}).items():
                site, heads, head_dim, where = pre_rope_site(module, name)
                hook = head_hook(make(layer), heads, head_dim, (type(module), where))
                handles.append(site.register_forward_hook(hook))
        yield modules
    finally:
        for handle in handles:
            handle.remove()
        for module, handler in added:
            stack = _HANDLERS.get(module, [])
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is handler:
                    del stack[i]
                    break
            if not stack:
                _HANDLERS.pop(module, None)
        for cfg, original in reversed(saved):
            cfg._attn_implementation_internal = original


def observe(
    model: nn.Module, layers: list[int], rope: str, fn: Callable[[int, Tensor, Tensor, Tensor], None]
) -> contextlib.AbstractContextManager:
    """Call ``fn(layer, q, k, v)`` once per layer and forward, q and k on the ``rope`` side.

    q is (batch, q_head, query, d); k and v are (batch, kv_head, token, d). Pre-RoPE q and k
    are taken just before RoPE: after the QK-norm on models that have one (Gemma 3, Qwen3,
    OLMo 2), else the ``q_proj``/``k_proj`` outputs.
    """
    if rope == "post" or not _pre_rope(model):
        return _route(model, layers, attention=lambda layer: _observer(layer, fn, None))
    stash: dict[int, dict[str, Tensor]] = {}

    def keep(layer, name):
        def f(heads):
            stash.setdefault(layer, {})[name] = heads
        return f

    return _route(
        model, layers,
        attention=lambda layer: _observer(layer, fn, stash),
        projections={"q_proj": lambda layer: keep(layer, "q"), "k_proj": lambda layer: keep(layer, "k")},
    )


_observe = observe  # the former private name


def _observer(layer: int, fn: Callable, stash: dict | None) -> Callable:
    def handler(q, k, v):
        if stash is None:
            fn(layer, q, k, v)
        else:
            pre = stash.pop(layer)
            fn(layer, pre["q"], pre["k"], v)
        return k, v

    return handler


def _resolve(spec: Any, role: str) -> Any:
    """The compressor for ``spec`` (a spec string, parsed once, a parsed Method or a
    compressor object) in ``role``; a query-aware basis for values is refused here, before
    any work."""
    from .methods import Method, parse_method
    from .methods.rotated import check_qaware_role

    if isinstance(spec, (str, Method)):
        m = parse_method(spec)
        check_qaware_role(str(m), m.basis, role)
        return m.compressor(role)
    if callable(spec) and hasattr(spec, "needs_fit") and hasattr(spec, "fit"):
        check_qaware_role(repr(spec), getattr(getattr(spec, "basis", None), "name", None), role)
        return spec
    name = "keys" if role == "k" else "values"
    raise bad_argument(name, spec, "a method spec such as 'int4-kivi' or a kvtheory Compressor")


def _spec_key(spec: Any) -> Any:
    """Cache key of a spec: its canonical string (``int04`` and ``int4`` share a fit)."""
    from .methods import Method, parse_method

    return str(parse_method(spec)) if isinstance(spec, (str, Method)) else ("object", id(spec))


def _ids_hash(ids: Tensor) -> str:
    data = ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


def clear_fit_cache() -> None:
    """Forget every cached fit."""
    _FIT_CACHE.clear()


def fit_compressors(
    model: Any,
    spec_k: Any,
    spec_v: Any,
    calibration_ids: Int[Tensor, "..."],
    rope: str = "post",
    layers: Any = None,
    attention_mask: Int[Tensor, "..."] | None = None,
) -> dict[int, tuple[Any, Any]]:
    """Per-layer ``(keys, values)`` compressors, fitted per kv head on ``calibration_ids``.

    Runs one forward pass over the calibration ids (batch, token), fitting each layer's
    compressors on its keys (on the ``rope`` side, with the queries for query-aware bases)
    and values as they pass; one layer is held in memory at a time. Results are cached per
    model, specs, RoPE side, layers and a hash of the ids. Compressors that need no fit are
    shared by all layers. The ids must be disjoint from the evaluation tokens.
    ``attention_mask`` (batch, token; 1 on real tokens, left or right padding): the bases are
    fitted on the real tokens only (pad positions never enter a second moment).
    """
    model = _unwrap(model)
    rope = check_choice("rope", rope, ROPE_SIDES)
    ck0, cv0 = _resolve(spec_k, "k"), _resolve(spec_v, "v")
    chosen = _layer_set(layers, len(attention_modules(model)))
    if not (ck0.needs_fit or cv0.needs_fit):
        return {layer: (ck0, cv0) for layer in chosen}
    ids = _check_ids(calibration_ids, "calibration")
    _check_fits(model, ids, "calibration")
    from .methods.compressor import calibration_mask, real_tokens

    valid = calibration_mask(attention_mask, ids)
    key = (_spec_key(spec_k), _spec_key(spec_v), rope, tuple(chosen), _ids_hash(ids),
           None if valid is None else _ids_hash(valid))
    per_model = _FIT_CACHE.setdefault(model, {})
    if key in per_model:
        return dict(per_model[key][0])
    fitted: dict[int, tuple[Any, Any]] = {}

    def fit(layer, q, k, v):
        if valid is not None:  # the real tokens of every row, as one sequence
            q, k, v = (real_tokens(t, valid.to(t.device)) for t in (q, k, v))
        ck = ck0.fit(k.float(), q.float()) if ck0.needs_fit else ck0
        cv = cv0.fit(v.float()) if cv0.needs_fit else cv0
        fitted[layer] = (ck, cv)

    device = _model_device(model)
    with torch.no_grad(), _observe(model, chosen, rope, fit):
        if valid is None:
            _forward(model, ids.to(device))
        else:
            _forward_padded(model, ids.to(device), valid.to(device))
    missing = sorted(set(chosen) - set(fitted))
    if missing:
        raise KVTheoryError(
            f"calibration: got no attention call for layers {missing}; expected every layer to run")
    per_model[key] = (dict(fitted), (spec_k, spec_v))  # keep spec objects alive: ids are keys
    return fitted


def _forward_padded(model: nn.Module, ids: Tensor, valid: Tensor) -> Any:
    """A forward pass over padded ids: the mask, and positions counted over the real tokens
    (left padding then gives each passage the positions it has alone)."""
    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": valid.to(torch.int64)}
    if "position_ids" in params:
        kw["position_ids"] = (valid.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
    if "use_cache" in params:
        kw["use_cache"] = False
    return model(**kw)


def _apply(comp: Any, x: Float[Tensor, "batch kv_head token d"], mask: Tensor | None = None
           ) -> Float[Tensor, "batch kv_head token d"]:
    """``comp(x)`` computed in float32 for half-precision states, returned in x's dtype; its
    output checked (shape, dtype, device: a compressor that overrides ``__call__`` is checked
    here too). ``mask`` (batch, token), True on real tokens, reaches token-grouped compressors."""
    from .methods.compressor import check_output

    low = x.dtype in (torch.float16, torch.bfloat16)
    xin = x.float() if low else x
    y = comp(xin, mask) if mask is not None and getattr(comp, "token_grouped", False) else comp(xin)
    y = check_output(comp, xin, y)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _is_fp(comp: Any) -> bool:
    from .methods import FP

    return type(comp) is FP  # a subclass may do more than copy


@contextlib.contextmanager
def compressed_kv(
    model: Any,
    keys: Any = None,
    values: Any = None,
    *,
    calibration: Any = None,
    rope: str = "post",
    layers: Any = None,
) -> Iterator[dict[int, tuple[Any, Any]]]:
    """Run ``model`` with its key and value states compressed inside every attention layer.

    ``keys``/``values``: a method spec (``"int4-kivi"``, ``"rank16-pca"``, ...) or a
    Compressor (None: ``"fp"``, or the plan's); each acts on (batch, kv_head, token, d) states
    after RoPE and before GQA expansion (``rope="pre"``: keys just before RoPE, i.e. ``k_proj``'s
    output, or the key norm's on models with QK-norm). ``calibration``: input ids (batch, token), disjoint from the evaluation tokens, for
    bases fitted on data (or ``{"input_ids": ..., "attention_mask": ...}`` for padded
    calibration), or a ``{layer: (keys, values)}`` plan from :func:`fit_compressors`; with a
    plan, ``keys``/``values`` must be None or name the plan's own methods (a contradiction
    such as ``keys="fp"`` with a fitted rank plan is refused). ``layers``: the layers to
    compress (default all). Yields the per-layer compressors. The model is restored on exit,
    also after an exception.

    Padding: compressors whose statistics span tokens (KIVI keys) group over the real tokens
    only, read from the attention mask the model passes to attention (left or right padding);
    per-token methods do not depend on padding.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20)).eval()
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with torch.no_grad():
    ...     ref = m(ids).logits
    ...     with compressed_kv(m, keys="fp", values="fp"):
    ...         inside = (m(ids).logits, m.config._attn_implementation)
    >>> torch.equal(inside[0], ref), inside[1], m.config._attn_implementation
    (True, 'kvtheory_sdpa', 'sdpa')
    """
    model = _unwrap(model)
    rope = check_choice("rope", rope, ROPE_SIDES)
    n = len(attention_modules(model))
    chosen = _layer_set(layers, n)
    calib_mask = None
    if isinstance(calibration, dict) and "input_ids" in calibration:
        calibration, calib_mask = calibration["input_ids"], calibration.get("attention_mask")
    if isinstance(calibration, dict):
        missing = [layer for layer in chosen if layer not in calibration]
        if missing:
            raise bad_argument("calibration", f"dict of layers {sorted(calibration)}",
                               f"fitted (keys, values) compressors for layers {chosen}")
        plan = {layer: tuple(calibration[layer]) for layer in chosen}
        _check_plan_matches(plan, keys, values)
    else:
        keys, values = ("fp" if keys is None else keys), ("fp" if values is None else values)
        ck0, cv0 = _resolve(keys, "k"), _resolve(values, "v")
        if (ck0.needs_fit or cv0.needs_fit) and calibration is None:
            raise bad_argument(
                "calibration", None,
                f"calibration input ids (disjoint from the evaluation tokens) to fit the basis of "
                f"keys={keys!r}, values={values!r}")
        plan = fit_compressors(model, keys, values, calibration, rope, chosen, calib_mask) if (
            ck0.needs_fit or cv0.needs_fit) else {layer: (ck0, cv0) for layer in chosen}
    pre = rope == "pre" and _pre_rope(model)
    seen: dict[str, Any] = {}  # the 2D attention mask of the running forward (pre-RoPE keys)
    from .methods.compressor import KeyValidityMemo

    validity = KeyValidityMemo()  # one host decision per mask object, not one per layer

    def attention(layer):
        ck, cv = plan[layer]
        ck = None if (pre or _is_fp(ck)) else ck
        cv = None if _is_fp(cv) else cv
        grouped = any(getattr(c, "token_grouped", False) for c in (ck, cv) if c is not None)

        def handler(q, k, v, attention_mask=None):
            mask = validity(attention_mask, k.shape[0], k.shape[-2]) if grouped else None
            return (k if ck is None else _apply(ck, k, mask)), (v if cv is None else _apply(cv, v, mask))

        handler.wants_mask = True
        return handler

    projections = {}
    hooks = [model.register_forward_pre_hook(lambda *_: validity.clear())]
    if pre and not all(_is_fp(plan[layer][0]) for layer in chosen):
        def pre_keys(layer):
            ck = plan[layer][0]
            grouped = getattr(ck, "token_grouped", False)

            def f(heads):
                mask = validity(seen.get("mask"), heads.shape[0], heads.shape[-2]) if grouped else None
                return _apply(ck, heads, mask)
            return f

        projections["k_proj"] = pre_keys

        def stash_mask(module, args, kwargs):
            seen["mask"] = kwargs.get("attention_mask")

        hooks.append(model.register_forward_pre_hook(stash_mask, with_kwargs=True))
    from .methods import deferred_finite_checks

    try:
        with _route(model, chosen, attention=attention, projections=projections), \
                deferred_finite_checks(_model_device(model)):
            yield plan
    finally:
        for h in hooks:
            h.remove()


def _check_plan_matches(plan: dict, keys: Any, values: Any) -> None:
    """Refuse ``keys``/``values`` that contradict a fitted plan (e.g. ``keys="fp"`` with a
    rank plan): None, or the plan's own method (its fitted basis aside), is accepted."""
    for role, spec, i in (("k", keys, 0), ("v", values, 1)):
        if spec is None:
            continue
        want = _resolve(spec, role)
        for layer, comps in plan.items():
            have = comps[i]
            if have is not want and not (type(have) is type(want) and have == want):
                name = "keys" if role == "k" else "values"
                raise KVTheoryError(
                    f"calibration: got a fitted plan whose layer {layer} {name} compressor is "
                    f"{have!r:.80}, contradicting {name}={spec!r}; expected {name}=None (use the "
                    f"plan) or the plan's own method")
