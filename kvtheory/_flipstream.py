r"""The torch path of the flip engine (:mod:`kvtheory.flips`): query blocks of logits on the CPU
(and on CUDA where the fused kernel does not serve a call), with their top-k, softmax terms and
per-query metrics. Private: :mod:`kvtheory.flips` validates the arguments and aggregates."""

from __future__ import annotations

import functools
import math
import warnings

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .errors import bad_argument

#: overrides of the bytes of one block of logits, per device type (benchmarks)
_BLOCK_BYTES: dict[str, int] = {}
_HALF = (torch.float16, torch.bfloat16)


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
