r"""Streaming attention-fidelity metrics: what compressed keys do to attention routing.

Query :math:`i` (at position :math:`i + T - Q` of the :math:`T` tokens) has logits
:math:`s_{ij} = \tau\,q_i\cdot k_j` and :math:`\hat s_{ij} = \tau\,q_i\cdot\hat k_j`
(:math:`\tau = 1/\sqrt d`) over the tokens it sees (:math:`j \le i + T - Q` when causal, all
otherwise; with a sliding window :math:`w` also :math:`j > i + T - Q - w`; never masked ones,
the key mask being shared by the heads or per head), :math:`p = \mathrm{softmax}(s)`,
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
number of tokens, never quadratic; logits are float32 (float64 stays float64, and float64 is
used where float32 logits could overflow). On CUDA, bf16/fp16 inputs go through one fused Triton
kernel (:mod:`kvtheory._triton_metrics`) that never materialises the logits.
Sources: arXiv 2604.11501 (flips as the discrete failure of rank reduction); the Fisher
metric as in :mod:`kvtheory.fisher`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import no_type_check

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ._checks import check_int
from ._flipargs import _validate
from ._flipstream import (  # noqa: F401 - _top_first, _topk, _COMPILED_CALLS: tests use them
    _BLOCK_BYTES, _COMPILED_CALLS, _HALF, _stream, _top_first, _topk, _visibility)
from .errors import bad_argument

__all__ = ["AttentionMetrics", "PerQuery", "attention_metrics", "flip_rate", "MARGIN_BINS",
           "PROB_BINS"]

#: default edges of the top-1 margin strata, ``[0, 0.1), [0.1, 0.5), ..., [2, inf)``
MARGIN_BINS: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 2.0, math.inf)
#: default edges of the top-1 probability strata, ``[0, 0.25), ..., [0.9, 1]``
PROB_BINS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
_METRICS = ("flip_rate", "topk_overlap", "kl", "fisher", "output_rel_err")


@dataclass(frozen=True)
class PerQuery:
    """Per-query values (``batch q_head query``, on the input device; float32 or float64).

    ``valid`` (``batch query``) marks queries that see a token and are not padding (a position
    kept in some head); elsewhere, and for a (head, query) pair that sees no token under a
    per-head key mask, the values are NaN and ``flip`` is False. ``margin`` is ``inf`` with one visible token.
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

    def flip_rate_above(self, margin: float) -> float:
        r"""Flip rate among queries whose top-1 margin :math:`s_{(1)} - s_{(2)}` is at least
        ``margin`` logits, pooled over heads: :math:`\sum_h F_h / \sum_h N_h` over the strata
        from ``margin`` up. ``margin`` must be one of :attr:`margin_edges` (the strata are
        counted, not the margins), so pass ``margin_bins`` to :func:`attention_metrics` to get
        other thresholds. NaN when no query has such a margin.

        >>> import torch
        >>> q, k = torch.eye(4).view(1, 2, 2, 4), torch.eye(4)[:2].view(1, 1, 2, 4)
        >>> attention_metrics(q, k, k.flip(-2), causal=False).flip_rate_above(0.5)
        1.0
        """
        edges = [float(e) for e in self.margin_edges]
        if not isinstance(margin, (int, float)) or float(margin) not in edges[:-1]:
            raise bad_argument("margin", margin, f"one of the margin bin edges {edges[:-1]} (pass "
                               "margin_bins=... to attention_metrics for other thresholds)")
        b = edges.index(float(margin))
        n, f = int(self.margin_counts[:, b:].sum()), int(self.margin_flips[:, b:].sum())
        return f / n if n else math.nan

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
        for defer in (True, False):
            args, pending = _validate(q, k, k_hat, None, None, causal, key_mask, scale, 1,
                                      MARGIN_BINS, PROB_BINS, block, window, defer=defer)
            per, valid, nv = _run(*args[:5], full=False, after_launch=pending and pending.start)
            flips = per["flip"].flatten(1, 2)
            w = (valid.unsqueeze(1) & (nv.flatten(1, 2) > 0)).to(torch.float64)
            rates = (flips * w).sum((0, 2)) / w.sum((0, 2))
            if pending is None:
                return rates.cpu()
            # one transfer: the rates and the range check's extremes
            host = torch.from_numpy(_to_host(torch.cat([rates, pending.ext.flatten()])))
            if not pending.wide(host[rates.numel():].view(-1, 2).tolist()):
                return host[:rates.numel()]
        raise AssertionError("unreachable: the second round validates eagerly")


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
    agg = dict(group=q.shape[1] // k.shape[1], topk=topk, keep=bool(return_per_query))
    with torch.no_grad():
        for defer in (True, False):
            args, pending = _validate(q, k, k_hat, v, v_hat, causal, key_mask, scale, topk,
                                      margin_bins, prob_bins, block, window, defer=defer)
            run = dict(full=True, v=args[5], v_hat=args[6], topk=topk)
            per, valid, nv = _run(*args[:5], **run, after_launch=pending and pending.start)
            also = {"extremes": None if pending is None else pending.ext}
            fused = _on_kernel(args[0])
            out, host = _aggregate(per, valid, nv, *args[7:], **agg, also=also, fused=fused)
            if pending is not None and pending.wide(host["extremes"].view(-1, 2).tolist()):
                continue    # float32 logits could overflow: again, validated before the run
            seen = out.margin_counts.sum(1).tolist()     # queries of each head
            if fused and args[5] is None and not all(
                    math.isfinite(x) or not c for x, c in zip(out.kl.tolist(), seen)):
                # a series sum of the fused kernel overflowed (its KL is not finite):
                # again, with the log-sum-exp of s^ for the KL
                per, valid, nv = _run(*args[:5], **run, zh=True)
                out, _ = _aggregate(per, valid, nv, *args[7:], **agg, fused=True)
            return out
        raise AssertionError("unreachable: the second round validates eagerly")


def _on_kernel(q: Tensor) -> bool:
    """Whether :func:`_run` serves validated arguments with this ``q`` by the fused kernel."""
    from . import _triton_metrics as tm

    return q.dtype in _HALF and tm.available(q.device, q.dtype)


def _run(q, k, k_hat, key_mask, opts, *, full: bool, v=None, v_hat=None, topk: int = 5,
         zh: bool = False, after_launch: Callable[[], object] | None = None):
    """The fused CUDA kernel where it serves the call (:mod:`._triton_metrics`), else
    :func:`_stream`; returns per-query results (batch, kv, g, query), ``valid`` and ``nv``.
    The kernel's results come unsynchronised; where a series sum of the kernel overflowed
    the KL is not finite, and a second run with ``zh`` computes it from log-sum-exps.
    ``after_launch`` is called once the kernel is queued (before the stream path runs)."""
    from . import _triton_metrics as tm

    causal, _, scale, window = opts
    (B, Hq, Q, _), (Hkv, T) = q.shape, k.shape[1:3]

    def visibility() -> tuple[Tensor, Tensor]:
        return _visibility(key_mask, (B, Hkv, Hq // Hkv, Q), T, causal, window, q.device)

    if not _on_kernel(q):
        if after_launch is not None:
            after_launch()
        valid, nv = visibility()
        return _stream(q, k, k_hat, key_mask, opts, full=full, v=v, v_hat=v_hat, topk=topk,
                       nv=nv), valid, nv
    vis: list = []     # built while the kernel runs (the GPU would otherwise wait for it)

    def beside() -> list[Tensor]:
        vis.extend(visibility())
        return [*vis, *([] if after_launch is None else [after_launch()])]

    res = tm.fused_metrics(q, k, k_hat, v, v_hat, key_mask, causal=causal, window=window,
                           scale=scale, topk=topk, full=full, zh=zh, while_running=beside)
    valid, nv = vis
    per = {name: x.view(B, Hkv, Hq // Hkv, Q) for name, x in res.items()}
    if full:
        per["margin"] = torch.where(nv >= 2, per["margin"], math.inf)
        per["topk_overlap"] = per["topk_overlap"] / nv.clamp(1, topk)
    return per, valid, nv


def _aggregate(per: dict, valid: Tensor, nv: Tensor, m_edges: tuple[float, ...],
               p_edges: tuple[float, ...], *, group: int, topk: int, keep: bool,
               also: dict[str, Tensor | None] | None = None, fused: bool = False
               ) -> tuple[AttentionMetrics, dict[str, Tensor]]:
    """Means per head over valid (head, query) pairs, strata counts, per-query tensors; and
    the tensors of ``also`` (those not ``None``) on the host, brought in the same transfer.
    ``fused``: the table by one Triton launch (:func:`kvtheory._triton_metrics.aggregate`,
    where the fused kernel served the call) instead of the torch operations here."""
    B, Hkv, g, Q = per["flip"].shape
    H = Hkv * g
    per = {name: x.reshape(B, H, Q) for name, x in per.items()}
    names = [m for m in ("flip", "topk_overlap", "kl", "fisher", "output_rel_err") if m in per]
    inner = [_inner_edges(e, per[key].dtype, valid.device)
             for e, key in ((m_edges, "margin"), (p_edges, "top1_prob"))]
    vmask = None if fused and not keep else valid.unsqueeze(1) & (nv.reshape(B, H, Q) > 0)
    if fused:
        from . import _triton_metrics

        table = _triton_metrics.aggregate(per, valid, nv, *inner)
    else:
        table = _table(per, valid, vmask, names, inner)
    extra = {n: x.to(torch.float64).flatten() for n, x in (also or {}).items() if x is not None}
    flat = [table.flatten(), *extra.values()]
    # one transfer; the host's part in NumPy (a torch op on the host costs several times more,
    # and the GPU waits for this part of the call)
    arr = _to_host(torch.cat(flat))
    M = len(names)
    tabs = arr[:table.numel()].reshape(table.shape).sum(0)     # the parts added up
    tab, n = tabs[:-1].reshape(H, -1), int(round(tabs[-1]))
    with np.errstate(invalid="ignore", divide="ignore"):     # a head without queries: NaN
        mean = (tab[:, 1:1 + M] / tab[:, :1]).T
    means = {name: torch.from_numpy(np.ascontiguousarray(mean[i])) for i, name in enumerate(names)}
    strata, at = {}, 1 + M
    for name, edges in (("margin", m_edges), ("prob", p_edges)):
        nb = len(edges) - 1
        c = np.rint(tab[:, at:at + 2 * nb]).astype(np.int64).reshape(H, nb, 2)
        for i, what in enumerate(("counts", "flips")):
            strata[f"{name}_{what}"] = torch.from_numpy(np.ascontiguousarray(c[..., i]))
        at += 2 * nb
    ends = np.cumsum([x.numel() for x in flat])
    got_extra = {name: torch.from_numpy(arr[a:b].copy())
                 for name, a, b in zip(extra, ends[:-1], ends[1:])}
    per_query = None
    if keep:
        nan = {k: torch.where(vmask, x, math.nan) for k, x in per.items() if k != "flip"}
        per_query = PerQuery(valid=valid, flip=per["flip"] & vmask,
                             output_rel_err=nan.pop("output_rel_err", None), **nan)
    return AttentionMetrics(
        flip_rate=means["flip"], topk_overlap=means["topk_overlap"], kl=means["kl"],
        fisher=means["fisher"], output_rel_err=means.get("output_rel_err"),
        margin_edges=m_edges, prob_edges=p_edges, n_queries=n, group=group, topk=topk,
        per_query=per_query, **strata), got_extra


def _table(per: dict, valid: Tensor, vmask: Tensor, names: list[str],
           inner: list[Tensor]) -> Tensor:
    """The aggregation table by torch operations, (1, head·width + 1) (layout of
    :mod:`kvtheory._triton_aggregate`, one part): per head the pairs that count, the metric
    sums, and per margin bin then per probability bin the pairs and the flipped ones; then
    the number of valid queries. Few launches and no host sync on an accelerator (no boolean
    indexing, no bincount, no atomics: ``index_add_`` into a few bins took 0.17 ms a call on
    the H200)."""
    B, H, Q = vmask.shape
    dt = per["kl"].dtype      # float32 or float64: exact, then one cast (fewer launches)
    stack = torch.stack([per[m].to(dt) for m in names]).to(torch.float64)
    cols = [vmask.sum((0, 2)).to(torch.float64).unsqueeze(1),
            torch.where(vmask, stack, 0).sum((1, 3)).T]
    sel = torch.stack([vmask, vmask & per["flip"]], -1)                 # (B, H, Q, 2)
    for key, edges in (("margin", inner[0]), ("top1_prob", inner[1])):
        bins = torch.bucketize(per[key], edges, right=True)              # inf, 1: last bin
        onehot = bins.unsqueeze(-1) == torch.arange(edges.numel() + 1, device=vmask.device)
        # counts[h, b, what] = sum over batch and query of [bin = b] sel[what] (exact int64)
        cols.append((onehot.unsqueeze(-1) & sel.unsqueeze(-2)).sum((0, 2)).to(
            torch.float64).view(H, -1))
    return torch.cat([torch.cat(cols, 1).flatten(),
                      valid.sum().to(torch.float64).view(1)]).unsqueeze(0)


#: how :func:`_to_host` waits for the GPU: ``"cpu"`` (default: ``.cpu()``, the driver's wait) or
#: ``"poll"`` (a variant the benchmarks compare)
WAIT = ["cpu"]


def _to_host(x: Tensor) -> np.ndarray:
    """``x`` (a small result) as a host array. ``WAIT[0] == "poll"``: on CUDA by a copy into
    pinned memory queued behind the work, then polling an event until it is done, so that the
    host keeps running through the wait (after a blocking ``.cpu()`` of some 20 ms the Python
    after it took twice as long on the H200's host; on an H100 polling gained nothing,
    ``benchmarks/KERNEL_NOTES.md``, so it is not the default: it keeps a core busy).
    """
    if x.device.type != "cuda" or WAIT[0] == "cpu":
        return x.cpu().numpy()
    with torch.cuda.device(x.device):   # layers on several GPUs: the stream of x's device
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x, non_blocking=True)
        done = torch.cuda.current_stream().record_event()
        while not done.query():
            pass
    return buf.numpy()


@functools.lru_cache(maxsize=64)
def _inner_edges(edges: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The inner bin edges on ``device``, made once: ``torch.tensor(..., device=cuda)`` copies
    from the host and waits for the GPU (a blocking copy), which would stall the queued work
    of :func:`_aggregate` behind the kernel."""
    return torch.tensor(edges[1:-1], dtype=dtype, device=device)
