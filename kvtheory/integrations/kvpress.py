r"""kvpress presses on transformers 5.x, measured with kvtheory.

**Compatibility.** kvpress 0.5.5 declares ``transformers<5.3``; kvtheory pins transformers
5.24, where attention modules receive the cache as ``cache`` (not ``past_key_values``) and no
``cache_position``, so every press fails with ``KeyError: 'past_key_values'``. Install it with
``pip install --no-deps 'kvpress>=0.5.5,<0.6'`` (its other dependencies come with
``kvtheory[kvpress]``); :func:`press_context` wraps the press's forward hook so that it sees
``past_key_values`` (the cache) and ``cache_position`` (the last ``q_len`` positions of the
layer's cache, :math:`[L - q, L)`, exactly what transformers < 5.3 passed). Nothing of kvpress
is copied. Tested range: :data:`KVPRESS_RANGE` on transformers 5.24.

**What a press keeps.** A press prunes the cache of each attention layer after the prefill
(its forward hook; the prefill's own output is uncompressed). :func:`press_context` records,
per layer, the post-RoPE keys before and after the press; :func:`keep_mask` finds each kept
row among the original ones (exact equality: presses gather, they do not alter rows), giving
a per-(batch, KV head, token) keep mask. A press that changes keys without removing tokens
(ThinK) is recorded as ``k_hat`` instead.

**Eviction metrics** (:func:`eviction_metrics`). For query :math:`i`, logits
:math:`s_j = \tau q_i\cdot k_j` over the visible tokens, :math:`p = \mathrm{softmax}(s)`,
:math:`E` the evicted set (of the query's KV head), :math:`m = \sum_{j\in E} p_j` the evicted
mass and :math:`\hat p_j = p_j/(1-m)` for :math:`j\notin E` (0 on :math:`E`): attention
renormalised over the kept tokens. Then

.. math:: \mathrm{flip} = [t \in E],\ t = \arg\max_j s_j, \qquad
          \mathrm{KL}(\hat p\,\|\,p) = \sum_{j\notin E}\hat p_j\log\frac{\hat p_j}{p_j}
          = -\log(1-m),

while :math:`\mathrm{KL}(p\|\hat p) = \infty` whenever :math:`m>0` and the Fisher damage
:math:`\tfrac12\delta^\top F\delta` is undefined (an evicted token's logit shift is
:math:`-\infty`). The flip identity holds because the kept logits are unchanged: the old top
token stays the maximum unless it was evicted. The output error is
:math:`\|pV - \hat p V\|/\|pV\|` (values of kept tokens are unchanged).

**Perplexity under eviction** (:func:`eviction_perplexity`): a window of ``n_context +
n_score`` tokens; the context is prefilled under the press into a ``DynamicCache``, then the
continuation is run on the pruned cache with ``position_ids`` ``n_context..`` (RoPE positions
of the original text; the cache holds fewer rows). Scored: the ``n_score`` continuation
tokens, the first predicted by the prefill's last logits.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .._checks import check_group, check_int, check_tensor
from .._hf import cache_kwargs
from ..errors import KVTheoryError, bad_argument

__all__ = ["KVPRESS_RANGE", "KVPRESS_TESTED", "ARCHS_TESTED", "supports", "require_kvpress", "make_press", "PRESSES",
           "press_context", "PressRecord", "keep_mask", "eviction_metrics", "EvictionMetrics",
           "eviction_perplexity", "score_window", "compat_kwargs"]

#: the kvpress versions this adapter is tested with (on transformers 5.24)
KVPRESS_RANGE = ">=0.5.5,<0.6"
KVPRESS_TESTED = ("0.5.5",)
#: model architectures (``ModelInfo.arch``) the adapter is tested on (tests/test_kvpress.py)
ARCHS_TESTED = ("llama",)


def supports(info: Any) -> bool:
    """Whether the adapter is tested on a model of this :class:`kvtheory.models.ModelInfo`
    (a causal LM of an architecture in :data:`ARCHS_TESTED`) and kvpress is installed."""
    import importlib.util

    return (bool(getattr(info, "causal", False)) and getattr(info, "arch", None) in ARCHS_TESTED
            and importlib.util.find_spec("kvpress") is not None)
#: short names of the eviction presses the analysis uses -> kvpress class names
PRESSES = {"knorm": "KnormPress", "snapkv": "SnapKVPress", "streaming": "StreamingLLMPress",
           "expected": "ExpectedAttentionPress", "random": "RandomPress", "tova": "TOVAPress"}


def require_kvpress():
    """Import kvpress, or raise :class:`KVTheoryError` saying how to install it."""
    try:
        return importlib.import_module("kvpress")
    except ImportError as exc:
        raise KVTheoryError(
            f"kvpress: got no importable package ({type(exc).__name__}: {exc}); expected it "
            "installed: pip install 'kvtheory[kvpress]' && pip install --no-deps "
            f"'kvpress{KVPRESS_RANGE}'") from None


def make_press(name: str, compression_ratio: float, **kwargs: Any):
    """A kvpress press from a short name (:data:`PRESSES`) or a class name, e.g.
    ``make_press("knorm", 0.5)`` is ``KnormPress(compression_ratio=0.5)``."""
    kvpress = require_kvpress()
    cls_name = PRESSES.get(name, name)
    cls = getattr(kvpress, cls_name, None)
    if not isinstance(cls, type):
        raise bad_argument("press", name, "one of " + ", ".join(PRESSES) + " or a kvpress class name")
    if not isinstance(compression_ratio, (int, float)) or not 0 <= compression_ratio < 1:
        raise bad_argument("compression_ratio", compression_ratio, "a fraction in [0, 1)")
    return cls(compression_ratio=float(compression_ratio), **kwargs)


def compat_kwargs(module: Any, kwargs: dict) -> dict:
    r"""The attention kwargs a kvpress 0.5 hook expects, from those of transformers 5.x.

    Adds ``past_key_values`` (= ``cache``) and ``cache_position`` = :math:`[L-q, L)` with
    :math:`L` the layer's cache length after the update and :math:`q` the query length; leaves
    kwargs that already have them unchanged (transformers < 5.3).

    >>> compat_kwargs(None, {"past_key_values": 1, "cache_position": 2})
    {'past_key_values': 1, 'cache_position': 2}
    """
    if "past_key_values" in kwargs and "cache_position" in kwargs:
        return kwargs
    out = dict(kwargs)
    cache = out.get("past_key_values", out.get("cache"))
    if cache is None:
        raise KVTheoryError("kvpress: got an attention call without a cache; expected the model to "
                            "run with use_cache=True and a Cache object (past_key_values=...)")
    out["past_key_values"] = cache
    if "cache_position" not in out:
        q_len = out["hidden_states"].shape[1]
        total = int(cache.layers[module.layer_idx].get_seq_length())
        out["cache_position"] = torch.arange(total - q_len, total, device=out["hidden_states"].device)
    return out


@dataclass
class PressRecord:
    """What a press did in each layer it changed during the prefill: ``keys_before`` (the full
    post-RoPE keys, batch kv_head token d), ``keep`` (batch kv_head token, True = kept; None
    when the press changed keys without removing tokens, e.g. ThinK) and ``k_hat`` (the changed
    keys, set instead of a keep mask). Layers the press left unchanged are absent."""

    keys_before: dict[int, Tensor]
    keep: dict[int, Tensor | None]
    k_hat: dict[int, Tensor]

    def kept_fraction(self) -> float:
        """Mean fraction of (layer, batch, KV head, token) entries kept."""
        fr = [1.0 if m is None else float(m.double().mean()) for m in self.keep.values()]
        return sum(fr) / len(fr) if fr else 1.0


@contextlib.contextmanager
def press_context(press: Any, model: Any, *, record: bool = True) -> Iterator[PressRecord]:
    """Apply ``press`` to ``model`` (kvpress's own context manager) through the transformers-5
    adapter (:func:`compat_kwargs`), recording each layer's keep decisions (:class:`PressRecord`).

    The press object is restored on exit. ``model`` is a transformers model or a kvtheory
    ``LoadedModel``.
    """
    require_kvpress()
    from .._hf import unwrap as _unwrap

    model = _unwrap(model)
    original = press.forward_hook  # bound method of the press (or of a wrapper press)
    rec = PressRecord({}, {}, {})

    def hook(module, inputs, kwargs, output):
        kwargs = compat_kwargs(module, kwargs)
        layer = module.layer_idx
        cache_layer = kwargs["past_key_values"].layers[layer]
        before = cache_layer.keys
        # a copy: some presses (ThinK) change the cached keys in place
        snap = before.detach().clone() if record and isinstance(before, Tensor) else None
        out = original(module, inputs, kwargs, output)
        after = cache_layer.keys
        if snap is not None and snap.numel():
            if after.shape != snap.shape:
                rec.keys_before[layer], rec.keep[layer] = snap, keep_mask(snap, after)
            elif not torch.equal(after, snap):
                rec.keys_before[layer], rec.keep[layer] = snap, None
                rec.k_hat[layer] = after.detach().clone()
        return out

    press.forward_hook = hook
    try:
        with press(model):
            yield rec
    finally:
        try:
            del press.forward_hook
        except AttributeError:  # pragma: no cover - a press defining forward_hook as attribute
            press.forward_hook = original


def keep_mask(
    before: Float[Tensor, "batch kv_head token d"], after: Float[Tensor, "batch kv_head kept d"]
) -> Bool[Tensor, "batch kv_head token"]:
    """Which rows of ``before`` survive in ``after`` (in any order), per batch and KV head.

    Each row of ``after`` must equal exactly one row of ``before`` (a token-selecting press);
    otherwise :class:`KVTheoryError`.

    >>> import torch
    >>> b = torch.arange(12.0).view(1, 1, 4, 3)
    >>> keep_mask(b, b[:, :, [3, 1]]).tolist()
    [[[False, True, False, True]]]
    """
    check_tensor("before", before, ndim=4, axes="batch kv_head token d")
    check_tensor("after", after, ndim=4, axes="batch kv_head kept d")
    if after.shape[:2] != before.shape[:2] or after.shape[3] != before.shape[3]:
        raise bad_argument("after", after, f"shape ({before.shape[0]}, {before.shape[1]}, kept, "
                           f"{before.shape[3]})")
    B, H, T, _ = before.shape
    keep = torch.zeros(B, H, T, dtype=torch.bool, device=before.device)
    for b in range(B):
        for h in range(H):
            eq = (after[b, h, :, None, :] == before[b, h, None, :, :]).all(-1)  # (kept, token)
            hits = eq.sum(-1)
            if bool((hits != 1).any()):
                raise KVTheoryError(
                    f"kvpress: got a press whose kept keys (batch {b}, KV head {h}) are not rows of "
                    "the original keys; expected a token-evicting press (presses that merge or "
                    "rotate keys are measured through k_hat)")
            keep[b, h] = eq.any(0)
            if int(keep[b, h].sum()) != after.shape[2]:
                raise KVTheoryError(f"kvpress: got duplicate kept keys in KV head {h}; expected "
                                    "each kept token once")
    return keep


@dataclass(frozen=True)
class EvictionMetrics:
    """Per-query eviction measures (``batch q_head query``, float64 CPU) and their means.

    ``flip``: the top token was evicted; ``top_evicted``: the same, counted directly;
    ``evicted_mass`` :math:`m`; ``kl_kept`` :math:`\\mathrm{KL}(\\hat p\\|p)` summed over the
    kept support; ``margin`` the fp top-1 minus runner-up logit; ``output_rel_err`` with values.
    """

    flip: Bool[Tensor, "batch q_head query"]
    top_evicted: Bool[Tensor, "batch q_head query"]
    evicted_mass: Float[Tensor, "batch q_head query"]
    kl_kept: Float[Tensor, "batch q_head query"]
    margin: Float[Tensor, "batch q_head query"]
    output_rel_err: Float[Tensor, "batch q_head query"] | None

    def summary(self, margin_bins: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 2.0, math.inf)) -> dict:
        """Means over (batch, head, query) and flip rate per margin stratum ``flip_rate|margin[a,b)``."""
        out = {"flip_rate": float(self.flip.double().mean()),
               "top_evicted_rate": float(self.top_evicted.double().mean()),
               "evicted_mass": float(self.evicted_mass.mean()),
               "kl_kept": float(self.kl_kept.mean()),
               "kl_theory": float((-torch.log1p(-self.evicted_mass)).mean()),
               "n_queries": float(self.flip.numel())}
        if self.output_rel_err is not None:
            out["output_rel_err"] = float(self.output_rel_err.mean())
        for a, b in zip(margin_bins, margin_bins[1:]):
            sel = (self.margin >= a) & (self.margin < b)
            n = int(sel.sum())
            out[f"flip_rate|margin[{a:g},{b:g})"] = float(self.flip[sel].double().mean()) if n else math.nan
            out[f"n|margin[{a:g},{b:g})"] = float(n)
        return out


def eviction_metrics(
    q: Float[Tensor, "batch q_head query d"],
    k: Float[Tensor, "batch kv_head token d"],
    keep: Bool[Tensor, "batch head token"],
    v: Float[Tensor, "batch kv_head token dv"] | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> EvictionMetrics:
    r"""Routing damage of evicting the tokens where ``keep`` is False (module docstring).

    ``keep`` is per KV head (batch, kv_head, token) or per query head (batch, q_head, token);
    queries are the last ``query`` of the ``token`` positions (query :math:`i` sees tokens
    :math:`\le i + T - Q` when ``causal``). Computed densely in float64, one query head at a time.
    A query whose every visible token is evicted is an error.

    >>> import torch
    >>> q = torch.tensor([[[[1.0, 0.0]]]]); k = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    >>> m = eviction_metrics(q, k, torch.tensor([[[False, True]]]), causal=False)
    >>> bool(m.flip[0, 0, 0]), round(float(m.evicted_mass[0, 0, 0]), 4), round(float(m.kl_kept[0, 0, 0]), 4)
    (True, 0.8044, 1.6318)

    (logits :math:`\sqrt2` and 0: :math:`m = \sigma(\sqrt2) = 0.8044`, :math:`-\log(1-m) = 1.6318`.)
    """
    check_tensor("q", q, ndim=4, axes="batch q_head query d")
    check_tensor("k", k, ndim=4, axes="batch kv_head token d")
    B, Hq, Q, d = q.shape
    _, Hk, T, _ = k.shape
    g = check_group(Hq, Hk)
    if k.shape[0] != B or k.shape[3] != d:
        raise bad_argument("k", k, f"shape ({B}, kv_head, token, {d})")
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.ndim != 3 or \
            keep.shape[0] != B or keep.shape[2] != T or keep.shape[1] not in (Hk, Hq):
        raise bad_argument("keep", keep, f"a boolean tensor ({B}, {Hk} or {Hq}, {T})")
    if causal and Q > T:
        raise bad_argument("q", q, f"at most {T} queries when causal")
    if v is not None and (v.ndim != 4 or v.shape[:3] != k.shape[:3]):
        raise bad_argument("v", v, f"shape ({B}, {Hk}, {T}, dv)")
    tau = 1 / math.sqrt(d) if scale is None else float(scale)
    vis = torch.ones(Q, T, dtype=torch.bool, device=q.device)
    if causal:
        vis = torch.arange(T, device=q.device)[None, :] <= torch.arange(T - Q, T, device=q.device)[:, None]
    outs: dict[str, list[Tensor]] = {n: [] for n in ("flip", "top", "m", "kl", "margin", "err")}
    for h in range(Hq):
        kv = h // g
        kh = keep[:, kv if keep.shape[1] == Hk else h]  # (B, T)
        s = (q[:, h].double() @ k[:, kv].double().transpose(-1, -2)) * tau  # (B, Q, T)
        s = s.masked_fill(~vis, -math.inf)
        top2 = s.topk(min(2, T), -1)
        t = s.argmax(-1)  # first maximum
        margin = (top2.values[..., 0] - top2.values[..., 1]) if T > 1 else torch.full_like(s[..., 0], math.inf)
        margin = torch.nan_to_num(margin, posinf=math.inf)
        p = torch.softmax(s, -1)
        kept = kh[:, None, :] & vis
        if bool((~kept.any(-1)).any()):
            raise bad_argument("keep", keep, "at least one kept visible token for every query")
        sh = s.masked_fill(~kept, -math.inf)
        ph = torch.softmax(sh, -1)
        m = (p * (~kh[:, None, :])).sum(-1)
        kl = torch.where(ph > 0, ph * (torch.log(ph.clamp_min(1e-300)) - torch.log(p.clamp_min(1e-300))),
                         torch.zeros_like(ph)).sum(-1)
        flip = sh.gather(-1, t[..., None])[..., 0] < sh.amax(-1)
        top = ~kh.gather(-1, t)
        outs["flip"].append(flip)
        outs["top"].append(top)
        outs["m"].append(m)
        outs["kl"].append(kl)
        outs["margin"].append(margin)
        if v is not None:
            o, oh = p @ v[:, kv].double(), ph @ v[:, kv].double()
            outs["err"].append((o - oh).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-300))
    st = {n: torch.stack(x, 1).cpu() for n, x in outs.items() if x}
    return EvictionMetrics(st["flip"], st["top"], st["m"], st["kl"], st["margin"], st.get("err"))


@torch.inference_mode()
def score_window(model: Any, w: Int[Tensor, " token"], n_context: int, press: Any = None, *,
                 record: bool = False) -> tuple[Tensor, PressRecord | None]:
    """Summed NLL (float64 scalar) of ``w[n_context:]`` after prefilling ``w[:n_context]``
    under ``press`` (None: no press), and with ``record`` the press's :class:`PressRecord`."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    w = w.to(dev)
    ctx, cont = w[None, :n_context], w[None, n_context:]
    cache = DynamicCache(config=model.config)
    kw = cache_kwargs(model, cache)
    rec = None
    if press is not None:
        with press_context(press, model, record=record) as rec:
            first = model(input_ids=ctx, use_cache=True, **kw).logits[:, -1:]
    else:
        first = model(input_ids=ctx, use_cache=True, **kw).logits[:, -1:]
    m = cont.shape[1]
    logits = first
    if m > 1:
        pos = torch.arange(n_context, n_context + m - 1, device=dev)[None]
        rest = model(input_ids=cont[:, :-1], use_cache=True, position_ids=pos, **kw).logits
        logits = torch.cat([first, rest], 1)
    ce = torch.nn.functional.cross_entropy(logits[0].float(), cont[0], reduction="none")
    return ce.double().sum().cpu(), (rec if record else None)


def eviction_perplexity(
    model: Any, windows: Int[Tensor, "batch token"], n_context: int, *, press: Any = None,
    keys: Any = None, values: Any = None, calibration: Any = None, n_boot: int = 1000, seed: int = 0,
):
    """Continuation perplexity after a compressed prefill (module docstring), as a
    :class:`kvtheory.evaluate.Score` over ``windows`` (W, n_context + n_score).

    ``press``: a kvpress press applied to the prefill; ``keys``/``values``: kvtheory method
    specs applied inside attention to the whole cache (prefill and continuation) via
    :func:`kvtheory.patch.compressed_kv`; both may be combined; neither is the fp reference.
    """
    from ..evaluate import _compressed, _score, check_seq_len
    from .._hf import unwrap as _unwrap

    model = _unwrap(model)
    if not isinstance(windows, Tensor) or windows.ndim != 2 or windows.is_floating_point():
        raise bad_argument("windows", windows, "integer token ids shaped (windows, tokens)")
    n_context = check_int("n_context", n_context, 1, windows.shape[1] - 1)
    check_seq_len(model, windows.shape[1], "windows")
    nll = []
    with _compressed(model, keys, values, calibration, "post"):
        for w in windows:
            nll.append(score_window(model, w, n_context, press)[0])
    n = windows.shape[1] - n_context
    cnt = torch.full((windows.shape[0],), float(n), dtype=torch.float64)
    return _score("ppl", torch.stack(nll), cnt, torch.exp, n * windows.shape[0], n_boot, seed)
