r"""Streaming attention-fidelity metrics: what compressed keys do to attention routing.

Query :math:`i` (at position :math:`i + T - Q` of the :math:`T` tokens) has logits
:math:`s_{ij} = \tau\,q_i\cdot k_j` and :math:`\hat s_{ij} = \tau\,q_i\cdot\hat k_j`
(:math:`\tau = 1/\sqrt d`) over the tokens it sees (:math:`j \le i + T - Q` when causal, all
otherwise; never padded ones), :math:`p = \mathrm{softmax}(s)`,
:math:`\hat p = \mathrm{softmax}(\hat s)`, :math:`\delta = \hat s - s`. Per query:

.. math::

    \mathrm{flip} = \big[\hat s_{t} < \max_j \hat s_j\big],\ t = \arg\max_j s_j, \quad
    \mathrm{margin} = s_{(1)} - s_{(2)}, \quad
    \mathrm{overlap} = \frac{|\mathrm{top}_k(s) \cap \mathrm{top}_k(\hat s)|}{k},

    \mathrm{KL}(p\,\|\,\hat p) = \log \sum_j p_j e^{x_j},\quad
    D = \tfrac12\delta^\top F(p)\,\delta = \tfrac12 \sum_j p_j x_j^2,\quad
    x = \delta - p\cdot\delta, \qquad
    \epsilon_o = \frac{\|p V - \hat p \hat V\|}{\|p V\|}

(:math:`k` is clipped to the number of visible tokens; the margin is :math:`+\infty` with one).
The flip is "the top-1 token changes" (:math:`t` is the first top token if several tie; a
tie for the top of :math:`\hat s` keeps it). Query head :math:`h`
reads KV head :math:`h // g` (GQA). Queries are streamed in blocks: memory is linear in the
number of tokens, never quadratic; logits are float32 (float64 stays float64).
Sources: arXiv 2604.11501 (flips as the discrete failure of rank reduction); the Fisher
metric as in :mod:`kvtheory.fisher`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import no_type_check

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ._checks import check_group, check_int, check_positive, check_same_d, check_tensor
from .errors import KVTheoryError, bad_argument

__all__ = ["AttentionMetrics", "PerQuery", "attention_metrics", "flip_rate", "MARGIN_BINS",
           "PROB_BINS"]

#: default edges of the top-1 margin strata, ``[0, 0.1), [0.1, 0.5), ..., [2, inf)``
MARGIN_BINS: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 2.0, math.inf)
#: default edges of the top-1 probability strata, ``[0, 0.25), ..., [0.9, 1]``
PROB_BINS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
#: overrides of the bytes of one block of logits, per device type (benchmarks)
_BLOCK_BYTES: dict[str, int] = {}
_HALF = (torch.float16, torch.bfloat16)
_METRICS = ("flip_rate", "topk_overlap", "kl", "fisher", "output_rel_err")


@dataclass(frozen=True)
class PerQuery:
    """Per-query values (``batch q_head query``, on the input device; float32 or float64).

    ``valid`` (``batch query``) marks queries that see a token and are not padding; elsewhere
    the values are NaN and ``flip`` is False. ``margin`` is ``inf`` with one visible token.
    """

    valid: Bool[Tensor, "batch query"]
    flip: Bool[Tensor, "batch q_head query"]
    margin: Float[Tensor, "batch q_head query"]
    top1_prob: Float[Tensor, "batch q_head query"]
    topk_overlap: Float[Tensor, "batch q_head query"]
    kl: Float[Tensor, "batch q_head query"]
    fisher: Float[Tensor, "batch q_head query"]
    output_rel_err: Float[Tensor, "batch q_head query"] | None


@dataclass(frozen=True)
class AttentionMetrics:
    """Per-head means over valid queries (float64, CPU) and strata counts.

    ``margin_counts[h, b]`` queries of head ``h`` have a top-1 margin in
    ``[margin_edges[b], margin_edges[b+1])``, of which ``margin_flips[h, b]`` flip; likewise
    for the top-1 probability (last bin closed). ``n_queries`` queries count for every head
    (means are NaN if none); ``group`` query heads share a KV head. ``per_query`` is set with
    ``return_per_query=True``.

    >>> import torch
    >>> q, k = torch.eye(4).view(1, 2, 2, 4), torch.eye(4)[:2].view(1, 1, 2, 4)
    >>> m = attention_metrics(q, k, k.flip(-2), causal=False)  # swapped keys
    >>> m.flip_rate.tolist(), m.per_kv_head().flip_rate.tolist(), m.per_kv_head().n_queries
    ([1.0, 0.0], [0.5], 4)
    >>> m.summary()["flip_rate|margin[0.5,1)"], m.summary()["n|margin[0.5,1)"]
    (1.0, 2.0)
    """

    flip_rate: Float[Tensor, "head"]
    topk_overlap: Float[Tensor, "head"]
    kl: Float[Tensor, "head"]
    fisher: Float[Tensor, "head"]
    output_rel_err: Float[Tensor, "head"] | None
    margin_edges: tuple[float, ...]
    margin_counts: Int[Tensor, "head margin_bin"]
    margin_flips: Int[Tensor, "head margin_bin"]
    prob_edges: tuple[float, ...]
    prob_counts: Int[Tensor, "head prob_bin"]
    prob_flips: Int[Tensor, "head prob_bin"]
    n_queries: int
    group: int
    topk: int
    per_query: PerQuery | None = None

    def mean(self) -> dict[str, float]:
        """Means over heads, i.e. over all (query, head) pairs, whose number is ``n_queries``."""
        out = {m: float(getattr(self, m).mean()) for m in _METRICS if getattr(self, m) is not None}
        return out | {"n_queries": float(self.n_queries * self.flip_rate.numel())}

    def summary(self) -> dict[str, float]:
        """:meth:`mean` plus flip rate and count per stratum: ``"flip_rate|margin[0.5,1)"``,
        ``"n|p1[0.9,1]"``, ... (pooled over heads; NaN for an empty stratum)."""
        out = self.mean()
        for name, edges, counts, flips in (
            ("margin", self.margin_edges, self.margin_counts, self.margin_flips),
            ("p1", self.prob_edges, self.prob_counts, self.prob_flips),
        ):
            n, f = counts.sum(0).tolist(), flips.sum(0).tolist()
            for b in range(len(n)):
                close = "]" if name == "p1" and b == len(n) - 1 else ")"
                key = f"{name}[{edges[b]:g},{edges[b + 1]:g}{close}"
                out[f"flip_rate|{key}"] = f[b] / n[b] if n[b] else math.nan
                out[f"n|{key}"] = float(n[b])
        return out

    def per_kv_head(self, group: int | None = None) -> AttentionMetrics:
        """Pool each run of ``group`` consecutive heads (default: the GQA group) into one.

        Means are averaged, counts summed; ``n_queries`` becomes ``group`` times larger.
        """
        heads = self.flip_rate.numel()
        g = self.group if group is None else check_int("group", group, 1, heads)
        if heads % g:
            raise bad_argument("group", group, f"a divisor of the number of heads, {heads}")

        def pool(x: Tensor | None, how: str) -> Tensor | None:
            return None if x is None else getattr(x.view(heads // g, g, *x.shape[1:]), how)(1)

        return replace(
            self, **{m: pool(getattr(self, m), "mean") for m in _METRICS},
            **{c: pool(getattr(self, c), "sum") for c in
               ("margin_counts", "margin_flips", "prob_counts", "prob_flips")},
            n_queries=self.n_queries * g, group=1, per_query=None)


@no_type_check
def flip_rate(
    q: Float[Tensor, "batch q_head query d"],
    k: Float[Tensor, "batch kv_head token d"],
    k_hat: Float[Tensor, "batch kv_head token d"],
    causal: bool = True,
    *,
    key_mask: Bool[Tensor, "batch token"] | Bool[Tensor, "batch head token"] | None = None,
    window: int | None = None,
    scale: float | None = None,
    block: int | None = None,
) -> Float[Tensor, "q_head"]:
    r"""Fraction of queries whose top-1 token changes when ``k`` becomes ``k_hat``, per query head.

    :math:`\mathrm{flip}_i = [\hat s_{i t_i} < \max_j \hat s_{ij}]` with
    :math:`t_i = \arg\max_j s_{ij}`, averaged over batch and valid queries (module docstring);
    ``flip_rate(...).mean()`` is the rate over all heads. Arguments as in
    :func:`attention_metrics`, which also stratifies flips by margin; this function only adds
    an argmax and a max to the two matmuls of each block. Returns float64 on the CPU.

    >>> import torch
    >>> q = k = torch.eye(2).view(1, 1, 2, 2)
    >>> flip_rate(q, k, k.flip(-2), causal=False)   # swapping the keys flips both queries
    tensor([1.], dtype=torch.float64)
    """
    with torch.no_grad():
        args = _validate(q, k, k_hat, None, None, causal, key_mask, scale, 1, MARGIN_BINS,
                         PROB_BINS, block, window)
        per, valid, nv = _run(*args[:5], full=False)
        flips = per["flip"].flatten(1, 2)
        w = (valid.unsqueeze(1) & (nv.flatten(1, 2) > 0)).to(torch.float64)
        return ((flips * w).sum((0, 2)) / w.sum((0, 2))).cpu()


@no_type_check
def attention_metrics(
    q: Float[Tensor, "batch q_head query d"],
    k: Float[Tensor, "batch kv_head token d"],
    k_hat: Float[Tensor, "batch kv_head token d"],
    v: Float[Tensor, "batch kv_head token dv"] | None = None,
    v_hat: Float[Tensor, "batch kv_head token dv"] | None = None,
    *,
    causal: bool = True,
    key_mask: Bool[Tensor, "batch token"] | Bool[Tensor, "batch head token"] | None = None,
    window: int | None = None,
    scale: float | None = None,
    topk: int = 5,
    margin_bins: tuple[float, ...] = MARGIN_BINS,
    prob_bins: tuple[float, ...] = PROB_BINS,
    block: int | None = None,
    return_per_query: bool = False,
) -> AttentionMetrics:
    r"""All attention-fidelity metrics of ``k -> k_hat`` (and ``v -> v_hat``), streamed.

    Per query (module docstring): top-1 flip, top-1 margin :math:`s_{(1)} - s_{(2)}` and
    probability :math:`p_{(1)}`, top-``k`` overlap, :math:`\mathrm{KL}(p\|\hat p)`, Fisher damage
    :math:`\tfrac12\delta^\top F\delta`, and with ``v`` the output error
    :math:`\|pV - \hat p\hat V\| / \|pV\|` (``v_hat`` defaults to ``v``: keys-only damage).
    Averaged per query head over batch and valid queries.

    Shapes: ``q`` (batch, q_head, query, d); ``k``, ``k_hat`` (batch, kv_head, token, d) with
    kv_head dividing q_head; ``v``, ``v_hat`` (batch, kv_head, token, dv). Queries are the
    last ``query`` token positions; ``causal`` lets the query at absolute position
    :math:`i` (:math:`= \text{index} + T - Q`) see tokens :math:`j \le i`. ``window`` (causal
    only; sliding-window attention) also hides :math:`j \le i - w`: the query sees
    :math:`i - w < j \le i`, the convention of transformers' ``sliding_window_causal``
    mask (``kv_idx > q_idx - sliding_window`` and ``kv_idx <= q_idx``, transformers 5.x),
    i.e. :math:`w` tokens including itself. ``key_mask`` (True = kept token) is (batch, token),
    shared by the heads, or per head: (batch, kv_head, token) or (batch, q_head, token), as
    eviction keeps different tokens per KV head. A position hidden in every head is padding and
    not counted as a query; a (head, query) pair that sees no token is left out of that head's
    means (and NaN in ``per_query``), so with a per-head mask heads can average over different
    numbers of queries. ``scale`` defaults to :math:`1/\sqrt d`.
    ``margin_bins``/``prob_bins`` are increasing edges from 0 to ``inf``/1. ``block`` (queries
    per block; results do not depend on it) defaults to 2 MiB of logits per CPU thread (at
    least 32 queries) or 256 MiB on an accelerator; peak memory is a few blocks.

    Paths: on CUDA with bf16/fp16 ``q``, ``k``, ``k_hat`` and Triton importable, one fused
    kernel (:mod:`kvtheory._triton_metrics`) streams the key blocks and never builds a block
    of logits (``KVTHEORY_FUSED=never`` forces the torch path; float32/float64 inputs always
    take it). Range safety: if the logits could overflow float32 (Cauchy–Schwarz bound
    :math:`\tau\, d \max|q| \max|k| > 10^{15}`) they are computed in float64, and beyond
    :math:`10^{150}` a :class:`~kvtheory.errors.KVTheoryError` names ``q``. Inputs that require
    grad are fine (no graph is built).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 1, 16, 8, generator=g)
    >>> m = attention_metrics(q, k, k)
    >>> m.mean()["flip_rate"], m.mean()["kl"], m.mean()["topk_overlap"]
    (0.0, 0.0, 1.0)
    """
    with torch.no_grad():
        args = _validate(q, k, k_hat, v, v_hat, causal, key_mask, scale, topk, margin_bins,
                         prob_bins, block, window)
        per, valid, nv = _run(*args[:5], full=True, v=args[5], v_hat=args[6], topk=topk)
        return _aggregate(per, valid, nv, *args[7:], group=q.shape[1] // k.shape[1],
                          topk=topk, keep=bool(return_per_query))


def _edges(name: str, edges: object, last: float) -> tuple[float, ...]:
    try:
        e = tuple(float(x) for x in edges)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        e = ()
    if len(e) < 2 or e[0] != 0.0 or e[-1] != last or any(a >= b for a, b in zip(e, e[1:])):
        raise bad_argument(name, edges, f"increasing bin edges from 0 to {last}")
    return e


def _validate(q, k, k_hat, v, v_hat, causal, key_mask, scale, topk, margin_bins, prob_bins,
              block, window=None):
    check_tensor("q", q, ndim=4, axes="batch q_head query d")
    for name, x in (("k", k), ("k_hat", k_hat)):
        check_tensor(name, x, ndim=4, axes="batch kv_head token d")
        check_same_d("q", q, name, x)
    if k_hat.shape != k.shape:
        raise bad_argument("k_hat", k_hat, f"the shape of k, {tuple(k.shape)}")
    if k.shape[0] != q.shape[0]:
        raise bad_argument("k", k, f"batch size {q.shape[0]}, that of q")
    check_group(q.shape[1], k.shape[1])
    if not isinstance(causal, bool):
        raise bad_argument("causal", causal, "True or False")
    B, T, Q = q.shape[0], k.shape[2], q.shape[2]
    if min(B, T, Q, q.shape[3]) == 0:
        raise bad_argument("q", q, "non-empty batch, query, token and d axes")
    if causal and Q > T:
        raise bad_argument("q", q, f"at most {T} queries when causal (the last of the tokens)")
    if v is None and v_hat is not None:
        raise bad_argument("v", v, "a tensor when v_hat is given")
    if v is not None:
        check_tensor("v", v, ndim=4, axes="batch kv_head token dv")
        v_hat = v if v_hat is None else check_tensor("v_hat", v_hat, ndim=4)
        for name, x in (("v", v), ("v_hat", v_hat)):
            if x.shape[:3] != k.shape[:3] or x.shape != v.shape:
                raise bad_argument(name, x, f"shape ({', '.join(map(str, k.shape[:3]))}, dv)")
    Hq, Hkv = q.shape[1], k.shape[1]
    if key_mask is not None:
        ok = isinstance(key_mask, Tensor) and key_mask.dtype == torch.bool and (
            tuple(key_mask.shape) == (B, T) or (key_mask.ndim == 3 and key_mask.shape[0] == B
                                                and key_mask.shape[2] == T
                                                and key_mask.shape[1] in (1, Hkv, Hq)))
        if not ok:
            raise bad_argument("key_mask", key_mask, f"a boolean tensor of shape ({B}, {T}), "
                               f"({B}, {Hkv}, {T}) (per KV head) or ({B}, {Hq}, {T}) (per "
                               "query head)")
        key_mask = key_mask.unsqueeze(1) if key_mask.ndim == 2 else key_mask
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise bad_argument("window", window, "a positive int (tokens a query sees, itself "
                               "included) or None")
        if not causal:
            raise bad_argument("window", window, "None when causal=False (a sliding window is "
                               "causal)")
    tensors = [x for x in (q, k, k_hat, v, v_hat, key_mask) if x is not None]
    if any(x.is_complex() for x in tensors) or len({x.device for x in tensors}) > 1:
        raise bad_argument("k", k, f"real tensors, all on the device of q ({q.device})")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else check_positive("scale", scale)
    check_int("topk", topk, 1)
    block = None if block is None else check_int("block", block, 1)
    m_edges = _edges("margin_bins", margin_bins, math.inf)
    p_edges = _edges("prob_bins", prob_bins, 1.0)
    dtype = torch.float64 if torch.float64 in {x.dtype for x in tensors} else torch.float32
    bound = scale * q.shape[-1] * _amax(q) * max(_amax(k), _amax(k_hat))
    if bound > _RANGE[torch.float64]:
        raise bad_argument("q", q, f"q and k whose logits fit in float64 (|scale·q·k| may reach "
                           f"{bound:.3g}; rescale them)")
    wide = bound > _RANGE[torch.float32]
    dtype = torch.float64 if wide else dtype      # float32 logits could overflow: float64
    conv = [None if x is None else x.to(dtype) for x in (k, k_hat, v, v_hat)]
    if (q.dtype == k.dtype == k_hat.dtype and q.dtype in _HALF and not wide
            and (_half_matmul(q.device.type) or _fused_available(q.device, q.dtype))):
        conv[:2] = k, k_hat          # logits on tensor cores, float32 accumulation and output
    else:
        q, scale = q.to(dtype) * scale, 1.0
    return (q, *conv[:2], key_mask, (bool(causal), block, scale, window), *conv[2:], m_edges,
            p_edges)


#: logit bound (Cauchy–Schwarz) up to which a dtype is used: squared deltas summed over
#: 2^31 tokens stay finite
_RANGE = {torch.float32: 1e15, torch.float64: 1e150}


def _amax(x: Tensor) -> float:
    """``max |x|`` as a Python float (0 for an empty tensor)."""
    return float(x.detach().abs().amax()) if x.numel() else 0.0


def _fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    from . import _triton_metrics

    return _triton_metrics.available(device, dtype)


@functools.cache
def _half_matmul(device_type: str) -> bool:
    """Whether half-precision products with float32 output exist here (CUDA, torch >= 2.8)."""
    if device_type != "cuda":
        return False
    try:
        x = torch.ones(1, 1, 1, dtype=torch.bfloat16, device=device_type)
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _block_queries(device: torch.device, row_bytes: int) -> int:
    """Queries per block: logits of 256 MiB on accelerators; on the CPU 2 MiB per thread (cache)
    but at least 32 queries (per-call overheads) unless that exceeds 64 MiB."""
    if device.type in _BLOCK_BYTES:
        return max(1, _BLOCK_BYTES[device.type] // row_bytes)
    if device.type != "cpu":
        return max(1, (256 << 20) // row_bytes)
    cache = max(4, 2 * torch.get_num_threads()) << 20
    return max(1, cache // row_bytes, min(32, (64 << 20) // row_bytes))


def _visibility(key_mask: Tensor | None, shape: tuple[int, ...], T: int, causal: bool,
                window: int | None, dev: torch.device) -> tuple[Tensor, Tensor]:
    """``valid`` (batch, query): not padding (kept in some head) and seeing a token in some
    head; ``nv`` (batch, kv_head, g, query): the number of tokens each (head, query) sees."""
    B, Hkv, g, Q = shape
    off = T - Q
    if key_mask is None:
        cum = torch.arange(1, T + 1, device=dev).expand(B, 1, T)
    else:
        cum = key_mask.cumsum(-1)                                   # (batch, mask_head, token)
    if causal:
        pos = torch.arange(off, T, device=dev)
        nv = cum[..., pos]
        if window is not None:
            lo = pos - window
            nv = nv - torch.where(lo >= 0, cum[..., lo.clamp_min(0)], 0)
    else:
        nv = cum[..., -1:].expand(B, cum.shape[1], Q)
    hm = nv.shape[1]
    nv = nv.reshape(B, Hkv, g, Q) if hm == Hkv * g else nv.reshape(B, hm, 1, Q)
    nv = nv.expand(B, Hkv, g, Q)
    real = (torch.ones(B, Q, dtype=torch.bool, device=dev) if key_mask is None or off < 0
            else key_mask[..., off:].any(1))
    return real & (nv > 0).flatten(1, 2).any(1), nv


def _run(q, k, k_hat, key_mask, opts, *, full: bool, v=None, v_hat=None, topk: int = 5):
    """The fused CUDA kernel where it serves the call (:mod:`._triton_metrics`), else
    :func:`_stream`; returns per-query results (batch, kv, g, query), ``valid`` and ``nv``."""
    from . import _triton_metrics as tm

    causal, _, scale, window = opts
    (B, Hq, Q, _), (Hkv, T) = q.shape, k.shape[1:3]
    valid, nv = _visibility(key_mask, (B, Hkv, Hq // Hkv, Q), T, causal, window, q.device)
    if not (q.dtype in _HALF and tm.available(q.device, q.dtype)):
        return _stream(q, k, k_hat, key_mask, opts, full=full, v=v, v_hat=v_hat, topk=topk,
                       nv=nv), valid, nv
    res = tm.fused_metrics(q, k, k_hat, v, v_hat, key_mask, causal=causal, window=window,
                           scale=scale, topk=topk, full=full)
    per = {name: x.view(B, Hkv, Hq // Hkv, Q) for name, x in res.items()}
    if full:
        per["margin"] = torch.where(nv >= 2, per["margin"], math.inf)
        per["topk_overlap"] = per["topk_overlap"] / nv.clamp(1, topk)
    return per, valid, nv


def _stream(
    q: Float[Tensor, "batch q_head query d"],
    k: Float[Tensor, "batch kv_head token d"],
    k_hat: Float[Tensor, "batch kv_head token d"],
    key_mask: Bool[Tensor, "batch mask_head token"] | None,
    opts: tuple[bool, int | None, float, int | None],
    *,
    full: bool,
    v: Float[Tensor, "batch kv_head token dv"] | None = None,
    v_hat: Float[Tensor, "batch kv_head token dv"] | None = None,
    topk: int = 5,
    nv: Tensor | None = None,
) -> dict[str, Tensor]:
    """The blocked loop (``q`` pre-scaled unless half); per-query results (batch, kv, g, query).
    ``nv`` is :func:`_visibility`'s count of visible tokens per (head, query)."""
    causal, block, scale, window = opts
    (B, Hq, Q, d), (Hkv, T), dev = q.shape, k.shape[1:3], q.device
    dt = torch.float32 if q.dtype in _HALF else q.dtype
    g, off, neg = Hq // Hkv, T - Q, torch.finfo(dt).min
    q = q.view(B, Hkv, g, Q, d)
    names = ("margin", "top1_prob", "topk_overlap", "kl", "fisher")
    names += ("output_rel_err",) * (v is not None)
    per = {n: torch.zeros(B, Hkv, g, Q, dtype=dt, device=dev) for n in names if full}
    per["flip"] = torch.zeros(B, Hkv, g, Q, dtype=torch.bool, device=dev)
    pos = torch.arange(off, T, device=dev)
    ws = _Workspace(dev)
    fused = _terms_for(dev, B * Hq * Q * T, v is not None) if full else None
    if nv is None:
        nv = _visibility(key_mask, (B, Hkv, g, Q), T, causal, window, dev)[1]
    if window is not None or (key_mask is not None and key_mask.shape[1] > 1):
        for b in range(B):
            _stream_masked(q[b], [x if x is None else x[b] for x in (k, k_hat, v, v_hat)],
                           None if key_mask is None else key_mask[b], nv[b], per, b, opts,
                           full=full, topk=topk, ws=ws, fused=fused, dt=dt)
        return per
    for b in range(B):
        kv = [x if x is None else x[b] for x in (k, k_hat, v, v_hat)]
        if key_mask is None:
            nvis = pos + 1 if causal else torch.full_like(pos, T)
        else:  # drop padded keys: a causal query then sees a prefix of the kept ones
            keep = key_mask[b, 0]
            idx = keep.nonzero().squeeze(-1)
            kv = [x if x is None else x.index_select(1, idx) for x in kv]
            count = keep.cumsum(0)
            nvis = count[pos] if causal else count[-1].expand(Q)
        kb, khb, vb, vhb = kv
        n_all = kb.shape[1]
        host = nvis.tolist() if causal else None
        n = block or _block_queries(dev, Hq * max(n_all, 1) * dt.itemsize)
        for a in range(0, Q, n):
            e = min(a + n, Q)
            lo, hi = (host[a], host[e - 1]) if causal else (n_all, n_all)
            if hi == 0:
                continue
            qb = q[b, :, :, a:e].reshape(Hkv, g * (e - a), d)
            unit = scale if full else 1.0      # flips do not depend on a positive scale
            shape = (Hkv, qb.shape[1], hi)
            s = _logits(qb, kb[:, :hi], unit, dt, ws.get("s", shape, qb))
            sh = _logits(qb, khb[:, :hi], unit, dt, ws.get("sh", shape, qb))
            if lo < hi:  # columns [lo, hi) are hidden from the earlier queries of the block
                hide = torch.arange(lo, hi, device=dev) >= nvis[a:e, None]
                for x in (s, sh):
                    x.view(Hkv, g, e - a, hi)[..., lo:].masked_fill_(hide, neg)
            top = _top_first(s)[1]                  # the first top token if tied
            if full:
                out = _block_metrics(s, sh, top, nvis[a:e].repeat(g)[None], topk, vb, vhb, hi,
                                     ws, fused)
            else:
                out = {"flip": sh.gather(-1, top) < sh.amax(-1, keepdim=True)}
            for name, x in out.items():
                per[name][b, :, :, a:e] = x.view(Hkv, g, e - a)
    return per


def _stream_masked(q: Tensor, kv: list, km: Tensor | None, nv: Tensor, per: dict, b: int,
                   opts: tuple, *, full: bool, topk: int, ws: _Workspace, fused, dt) -> None:
    """:func:`_stream` for one batch row with a sliding window or a per-head key mask: each
    query block multiplies the key columns its queries can reach and hides the rest per head.
    ``q`` (kv, g, query, d), ``kv`` = [k, k_hat, v, v_hat] of this row, ``km`` (mask_head,
    token) or None, ``nv`` (kv, g, query)."""
    causal, block, scale, window = opts
    Hkv, g, Q, d = q.shape
    kb, khb, vb, vhb = kv
    T, dev = kb.shape[1], q.device
    off, neg = T - Q, torch.finfo(dt).min
    pos = torch.arange(off, T, device=dev)
    if km is not None:
        km = km.view(Hkv, g, 1, T) if km.shape[0] == Hkv * g else km.view(-1, 1, 1, T)
    n = block or _block_queries(dev, Hkv * g * max(T, 1) * dt.itemsize)
    for a in range(0, Q, n):
        e = min(a + n, Q)
        c1 = min(T, off + e) if causal else T
        c0 = max(0, off + a - window + 1) if window is not None else 0
        if c1 <= c0:
            continue
        qb = q[:, :, a:e].reshape(Hkv, g * (e - a), d)
        unit = scale if full else 1.0
        shape = (Hkv, qb.shape[1], c1 - c0)
        s = _logits(qb, kb[:, c0:c1], unit, dt, ws.get("s", shape, qb))
        sh = _logits(qb, khb[:, c0:c1], unit, dt, ws.get("sh", shape, qb))
        cols, p = torch.arange(c0, c1, device=dev), pos[a:e, None]
        vis = (cols <= p) if causal else torch.ones(e - a, c1 - c0, dtype=torch.bool, device=dev)
        if window is not None:
            vis = vis & (cols > p - window)
        vis = vis if km is None else vis & km[..., c0:c1]
        for x in (s, sh):
            x.view(Hkv, g, e - a, c1 - c0).masked_fill_(~vis, neg)
        top = _top_first(s)[1]
        if full:
            rows = nv[:, :, a:e].reshape(Hkv, g * (e - a))
            vv = [x if x is None else x[:, c0:c1] for x in (vb, vhb)]
            out = _block_metrics(s, sh, top, rows, topk, *vv, c1 - c0, ws, fused)
        else:
            out = {"flip": sh.gather(-1, top) < sh.amax(-1, keepdim=True)}
        for name, x in out.items():
            per[name][b, :, :, a:e] = x.view(Hkv, g, e - a)


def _groups(T: int, k: int) -> int:
    r"""Entries per group for rows of ``T`` entries and ``k`` wanted: the power of two nearest
    :math:`\sqrt{T/k}` (it minimises the :math:`T/c + kc` entries ranked), within [8, 256].

    >>> _groups(2048, 5), _groups(2048, 1), _groups(32768, 5), _groups(16, 5)
    (16, 64, 64, 8)
    """
    return int(min(256, max(8, 2 ** round(math.log2(math.sqrt(T / k))))))


def _group_max(x: Tensor, c: int) -> tuple[Tensor, int]:
    r"""Maxima of the ``n = T // c`` strided groups :math:`G_j = \{j, j + n, \dots, j + (c-1)n\}`
    of the first ``c·n`` entries (``(..., n)``, one vectorised pass), and ``n``."""
    n = x.shape[-1] // c
    return x[..., :c * n].unflatten(-1, (c, n)).amax(-2), n


def _top_first(x: Tensor, c: int | None = None) -> tuple[Tensor, Tensor]:
    """``(max, index of its first occurrence)`` over the last axis, both ``(..., 1)``.

    The same as ``x.max(-1, keepdim=True)`` (whose index is documented as the first maximal
    one), through ``amax`` (vectorised; an indexed ``max`` is not): when one group
    (:func:`_group_max`), or the tail past the last whole group, holds the maximum, its first
    maximal entry is the row's; a block with a row whose maximum is shared by two groups falls
    back to ``x.max``, and so do accelerators (where ``max`` is one kernel and the fallback test
    would cost a host sync).

    >>> x = torch.tensor([[0., 3., 1., 3., 2., 0., 3., 1.], [5., 2., 6., 5., 1., 1., 1., 6.]])
    >>> _top_first(x, c=2)[1].tolist(), x.max(-1, keepdim=True).indices.tolist()
    ([[1], [2]], [[1], [2]])
    """
    T = x.shape[-1]
    c = c or _groups(T, 1)
    if T // c < 2 or x.device.type != "cpu":  # one fused kernel on accelerators
        m = x.max(-1, keepdim=True)
        return m.values, m.indices
    m = x.amax(-1, keepdim=True)
    gm, n = _group_max(x, c)
    hit = gm == m                                                          # (..., n)
    count = hit.sum(-1, keepdim=True)
    if c * n < T:
        in_tail = x[..., c * n:] == m
        count = count + in_tail.any(-1, keepdim=True)
    if bool((count > 1).any()):   # a maximum shared across groups: order matters, use max
        return m, x.max(-1, keepdim=True).indices
    cols = hit.to(torch.uint8).argmax(-1, keepdim=True) + n * torch.arange(c, device=x.device)
    idx = cols.gather(-1, (x.gather(-1, cols) == m).to(torch.uint8).argmax(-1, keepdim=True))
    if c * n < T:
        tail = in_tail.to(torch.uint8).argmax(-1, keepdim=True) + c * n
        idx = torch.where(hit.any(-1, keepdim=True), idx, tail)
    return m, idx


def _topk(x: Tensor, k: int, c: int | None = None) -> tuple[Tensor, Tensor]:
    """``x.topk(k, -1)`` (values in descending order, their indices), through group maxima.

    The ``k`` largest entries of a row lie in the ``k`` groups (:func:`_group_max`) with the
    largest maxima (each of those maxima is at least as large as any entry outside them) or in
    the tail past the last whole group, so only those ``k·c + tail`` entries are ranked.
    Values are those of ``x.topk``; among tied values the indices may differ, as they may
    between two topk calls.

    >>> x = torch.tensor([[0., 7., 1., 3., 9., 2., 8., 4., 6., 5., 0., 1., 2.]])
    >>> _topk(x, 2, c=2)
    (tensor([[9., 8.]]), tensor([[4, 6]]))
    """
    T = x.shape[-1]
    c = c or _groups(T, k)
    if T // c <= 2 * k:
        return x.topk(k, -1)
    gm, n = _group_max(x, c)
    top = gm.topk(k, -1).indices                                           # (..., k)
    cols = (top.unsqueeze(-1) + n * torch.arange(c, device=x.device)).flatten(-2)  # (..., k·c)
    if c * n < T:
        tail = torch.arange(c * n, T, device=x.device)
        cols = torch.cat([cols, tail.expand(*cols.shape[:-1], T - c * n)], -1)
    v, j = x.gather(-1, cols).topk(k, -1)
    return v, cols.gather(-1, j)


class _Workspace:
    """Reused buffers for the per-block temporaries on the CPU.

    A fresh tensor of a few MiB comes from ``mmap`` and is page-faulted in on first touch, at a
    cost comparable to the arithmetic done on it; reusing one buffer per name avoids that.
    On accelerators (caching allocators) :meth:`get` returns ``None`` and ops allocate.
    """

    def __init__(self, device: torch.device):
        self.on = device.type == "cpu"
        self.bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        if not self.on:
            return None
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = self.bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def _logits(q: Tensor, k: Tensor, scale: float, dtype: torch.dtype, out: Tensor | None = None
            ) -> Tensor:
    """``scale * q k^T`` in ``dtype``; half inputs stay half only on the tensor-core path."""
    if q.dtype == dtype:
        return torch.matmul(q, k.mT, out=out) if out is not None else torch.matmul(q, k.mT)
    s = torch.bmm(q, k.mT, out_dtype=dtype)
    return s if scale == 1.0 else s.mul_(scale)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product over the last axis (no temporary of the rows' size)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)


def _softmax_terms(s, sh, m, mh):  # unannotated: torch.compile traces it as it is
    r""":math:`z = \sum_j e^{s_j - m}`, :math:`\hat z`, :math:`\mu = p\cdot\delta`, Fisher
    :math:`\tfrac12\sum_j p_j (\delta_j - \mu)^2` and :math:`\log(1 + \sum_j p_j
    (e^{\delta_j - \mu} - 1))` of one block, written for :func:`torch.compile` (each
    reduction one fused pass, nothing of the block's size kept); the eager path of
    :func:`_block_metrics` computes the same in place."""
    x = sh - s
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    zh = torch.exp(sh - mh).sum(-1, keepdim=True)
    mu = (e * x).sum(-1, keepdim=True) / z
    xc = x - mu
    fisher = 0.5 * (e * xc * xc).sum(-1, keepdim=True) / z
    small = torch.log1p((e * torch.expm1(xc)).sum(-1, keepdim=True) / z)
    return z, zh, mu, fisher, small


#: logits per call (batch · q_head · query · token) from which a device uses the compiled
#: softmax terms with ``KVTHEORY_COMPILE=auto``: compiling costs about 20 s on a 2-core CPU
#: once per process (inductor's cache shortens later ones), so small calls stay eager there
_COMPILE_MIN_LOGITS = {"cpu": 1 << 24, "cuda": 0}
#: calls that went through the compiled path (tests check it ran)
_COMPILED_CALLS = [0]
#: why compiling failed on this machine, if it did (the eager path is used from then on)
_COMPILE_BROKEN: list[str] = []


@functools.cache
def _compiled_terms(device_type: str):
    """:func:`_softmax_terms` compiled by inductor (C++ on the CPU, Triton on CUDA), or ``None``
    where that cannot work (no Triton for CUDA, another device type)."""
    import importlib.util

    if device_type not in _COMPILE_MIN_LOGITS or (
            device_type == "cuda" and importlib.util.find_spec("triton") is None):
        return None
    return torch.compile(_softmax_terms, dynamic=True, fullgraph=True)


def _terms_for(device: torch.device, n_logits: int, has_values: bool):
    """The compiled softmax-terms function for a call of ``n_logits`` logits, or ``None`` for the
    eager path: ``KVTHEORY_COMPILE`` = ``auto`` (default: from :data:`_COMPILE_MIN_LOGITS`
    logits, without values), ``always`` (without values) or ``never``."""
    import os

    mode = os.environ.get("KVTHEORY_COMPILE", "auto")
    if mode not in ("auto", "always", "never"):
        raise bad_argument("KVTHEORY_COMPILE", mode, "auto, always or never")
    if has_values or mode == "never" or _COMPILE_BROKEN or (
            mode == "auto" and n_logits < _COMPILE_MIN_LOGITS.get(device.type, 1 << 62)):
        return None
    return _compiled_terms(device.type)


def _block_metrics(s: Tensor, sh: Tensor, top: Tensor, rows: Tensor, topk: int,
                   v: Tensor | None, v_hat: Tensor | None, hi: int,
                   ws: _Workspace | None = None, fused=None) -> dict[str, Tensor]:
    """Metrics of one block of logits (kv, rows, tokens); ``s`` and ``sh`` are overwritten
    (eager path) or left as they are (``fused``, from :func:`_terms_for`)."""
    kk = min(max(topk, 2), hi)
    vs, js = _topk(s, kk)
    vh, jh = _topk(sh, kk)
    m, mh = vs[..., :1], vh[..., :1]
    flip = sh.gather(-1, top) < mh
    second = vs[..., 1:2] if kk >= 2 else torch.full_like(m, -math.inf)
    margin = torch.where(rows[..., None] >= 2, m - second, math.inf)
    keff = rows.clamp(1, topk)                                # (1 or kv, rows)
    rank = torch.arange(kk, device=s.device) < keff[..., None]  # (1 or kv, rows, kk)
    hit = (js.unsqueeze(-1) == jh.unsqueeze(-2)) & rank[..., :, None] & rank[..., None, :]
    overlap = hit.sum((-1, -2)).unsqueeze(-1) / keff[..., None]
    if fused is not None:
        try:
            z, zh, mu, fisher, small = fused(s, sh, m, mh)
            _COMPILED_CALLS[0] += 1
        except Exception as exc:  # noqa: BLE001 - inductor cannot build here (no compiler, ...)
            _COMPILE_BROKEN.append(f"{type(exc).__name__}: {exc}"[:300])
            warnings.warn("kvtheory.flips: torch.compile failed, using the eager path from now "
                          f"on ({_COMPILE_BROKEN[-1]})", RuntimeWarning, stacklevel=2)
            fused = None
    if fused is None:
        ws = ws or _Workspace(s.device)
        x = torch.sub(sh, s, out=ws.get("x", s.shape, s)) if ws.on else sh - s  # delta; 0 if hidden
        e, eh = s.sub_(m).exp_(), sh.sub_(mh).exp_()  # unnormalised p, p^ (1 at the top token)
        z, zh = e.sum(-1, keepdim=True), eh.sum(-1, keepdim=True)
        mu = _dot(e, x) / z
        x -= mu                                   # centred delta
        sq = torch.mul(x, x, out=ws.get("sq", x.shape, x)) if ws.on else x.square()
        fisher = 0.5 * _dot(e, sq) / z
        small = torch.log1p(_dot(e, x.expm1_()) / z)  # sum_j p_j e^{x_j} - 1, all terms kept
    # lse(s^) - lse(s) - p.delta: neither under- nor overflows, but cancels when small
    big = (mh - m - mu) + torch.log(zh / z)
    slack = 64 * torch.finfo(s.dtype).eps * (m.abs() + mh.abs() + mu.abs() + torch.log(z * zh) + 1)
    kl = torch.where((big - small).abs() <= slack, small, big).clamp_min(0)
    res = {"flip": flip, "margin": margin, "top1_prob": 1 / z, "topk_overlap": overlap.to(s.dtype),
           "kl": kl, "fisher": fisher}
    if v is not None:
        o, oh = torch.matmul(e, v[:, :hi]) / z, torch.matmul(eh, v_hat[:, :hi]) / zh
        num, den = (o - oh).norm(dim=-1, keepdim=True), o.norm(dim=-1, keepdim=True)
        res["output_rel_err"] = torch.where(num == 0, 0.0, num / den)
    return res


def _aggregate(per: dict, valid: Tensor, nv: Tensor, m_edges: tuple[float, ...],
               p_edges: tuple[float, ...], *, group: int, topk: int, keep: bool
               ) -> AttentionMetrics:
    """Means per head over valid (head, query) pairs, strata counts, per-query tensors."""
    B, Hkv, g, Q = per["flip"].shape
    H = Hkv * g
    per = {name: x.reshape(B, H, Q) for name, x in per.items()}
    vmask = valid.unsqueeze(1) & (nv.reshape(B, H, Q) > 0)
    n = int(valid.sum())
    w = vmask.to(torch.float64)

    def head_mean(x: Tensor) -> Tensor:
        return (torch.where(vmask, x.to(torch.float64), 0).sum((0, 2)) / w.sum((0, 2))).cpu()

    head = torch.arange(H, device=valid.device).view(1, H, 1)
    strata = {}
    for name, key, edges in (("margin", "margin", m_edges), ("prob", "top1_prob", p_edges)):
        inner = torch.tensor(edges[1:-1], dtype=per[key].dtype, device=valid.device)
        nb = len(edges) - 1
        flat = head * nb + torch.bucketize(per[key], inner, right=True)  # inf, 1 -> last bin
        for what, sel in (("counts", vmask), ("flips", vmask & per["flip"])):
            counts = torch.bincount(flat[sel], minlength=H * nb)
            strata[f"{name}_{what}"] = counts.view(H, nb).cpu()
    per_query = None
    if keep:
        nan = {k: torch.where(vmask, x, math.nan) for k, x in per.items() if k != "flip"}
        per_query = PerQuery(valid=valid, flip=per["flip"] & vmask,
                             output_rel_err=nan.pop("output_rel_err", None), **nan)
    err = per.get("output_rel_err")
    return AttentionMetrics(
        flip_rate=head_mean(per["flip"]), topk_overlap=head_mean(per["topk_overlap"]),
        kl=head_mean(per["kl"]), fisher=head_mean(per["fisher"]),
        output_rel_err=None if err is None else head_mean(err),
        margin_edges=m_edges, prob_edges=p_edges, n_queries=n, group=group, topk=topk,
        per_query=per_query, **strata)
