r"""A dense float64 reference for the flip engine: the whole softmax with the mask, each metric
straight from its definition (no streaming, no blocks, no shift tricks). Used by the tests and
by ``benchmarks/gpu_flips_check.py`` (on a GPU, in float64 there).

Visibility: query ``i`` (absolute position :math:`t = i + T - Q`) sees key :math:`j` iff
``causal`` → :math:`j \le t`; ``window`` → :math:`j > t - w`; ``key_mask`` (batch, token),
(batch, kv_head, token) or (batch, q_head, token) → the key is kept for that head.
"""

from __future__ import annotations

import math

import torch


def dense_visibility(B, Hq, Hkv, Q, T, causal, window, key_mask, device):
    """``vis`` (batch, q_head, query, token) and ``valid`` (batch, q_head, query)."""
    pos = torch.arange(T - Q, T, device=device)[:, None]
    cols = torch.arange(T, device=device)[None, :]
    vis = torch.ones(Q, T, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (cols <= pos)
    if window is not None:
        vis = vis & (cols > pos - window)
    vis = vis.expand(B, Hq, Q, T)
    real = torch.ones(B, Q, dtype=torch.bool, device=device)
    if key_mask is not None:
        km = key_mask if key_mask.ndim == 3 else key_mask[:, None]
        if km.shape[1] == Hkv and Hkv != Hq:
            km = km.repeat_interleave(Hq // Hkv, 1)
        vis = vis & km[:, :, None, :]
        if T >= Q:
            real = km[:, :, T - Q:].any(1)
    valid = real[:, None, :] & vis.any(-1)
    return vis, valid


def dense_metrics(q, k, k_hat, v=None, v_hat=None, *, causal=True, window=None, key_mask=None,
                  topk=5, scale=None):
    """Per-query metrics (batch, q_head, query), float64, NaN / False where not valid; also
    ``gap_s`` (top-1 minus top-2 of :math:`s`), ``gap_flip`` (:math:`\\max\\hat s - \\hat s_t`)
    and ``gap_sh`` (top-1 minus top-2 of :math:`\\hat s`) to find near-ties, and ``gap_ks``,
    ``gap_ksh`` (the k-th minus the (k+1)-th of :math:`s`, :math:`\\hat s`) for the top-k
    overlap's."""
    q, k, k_hat = (x.double() for x in (q, k, k_hat))
    B, Hq, Q, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    g = Hq // Hkv
    tau = 1 / math.sqrt(d) if scale is None else scale
    kx, khx = (x.repeat_interleave(g, 1) for x in (k, k_hat))
    s = tau * q @ kx.mT
    sh = tau * q @ khx.mT
    vis, valid = dense_visibility(B, Hq, Hkv, Q, T, causal, window, key_mask, q.device)
    nv = vis.sum(-1)
    ninf = torch.tensor(-math.inf, dtype=torch.float64, device=q.device)
    sm, shm = torch.where(vis, s, ninf), torch.where(vis, sh, ninf)
    logp, logph = torch.log_softmax(sm, -1), torch.log_softmax(shm, -1)
    p, ph = logp.exp(), logph.exp()
    top = sm.argmax(-1, keepdim=True)                 # first maximal index
    flip = (shm.gather(-1, top) < shm.amax(-1, keepdim=True)).squeeze(-1)
    srt = sm.sort(-1, descending=True).values
    srth = shm.sort(-1, descending=True).values
    two = nv >= 2
    margin = torch.where(two, srt[..., 0] - torch.where(two, srt[..., 1], 0), math.inf)
    top1 = p.amax(-1)
    kl = torch.where(vis, p * (logp - torch.where(vis, logph, 0)), 0).sum(-1)
    delta = torch.where(vis, sh - s, 0)
    mu = (p * delta).sum(-1, keepdim=True)
    fisher = 0.5 * (torch.where(vis, p, 0) * (delta - mu) ** 2).sum(-1)
    kk = min(topk, T)
    js = sm.topk(kk, -1).indices
    jh = shm.topk(kk, -1).indices
    keff = nv.clamp(1, topk)
    rank = torch.arange(kk, device=q.device) < keff[..., None]
    hit = (js[..., :, None] == jh[..., None, :]) & rank[..., :, None] & rank[..., None, :]
    overlap = hit.sum((-1, -2)) / keff
    out = {"flip": flip & valid, "margin": margin, "top1_prob": top1, "topk_overlap":
           overlap.double(), "kl": kl, "fisher": fisher}
    if v is not None:
        v = v.double()
        v_hat = v if v_hat is None else v_hat.double()
        o = p @ v.repeat_interleave(g, 1)
        oh = ph @ v_hat.repeat_interleave(g, 1)
        num, den = (o - oh).norm(dim=-1), o.norm(dim=-1)
        out["output_rel_err"] = torch.where(num == 0, 0.0, num / den)
    for name in list(out):
        if name != "flip":
            out[name] = torch.where(valid, out[name], math.nan)
    out["valid"] = valid
    out["gap_s"] = torch.where(two, srt[..., 0] - torch.where(two, srt[..., 1], 0), math.inf)
    out["gap_flip"] = (shm.amax(-1, keepdim=True) - shm.gather(-1, top)).squeeze(-1)
    out["gap_sh"] = torch.where(two, srth[..., 0] - torch.where(two, srth[..., 1], 0), math.inf)
    # the k-th minus the (k+1)-th of s and of s^: a top-k set (and so the overlap) may differ
    # at a near-tie there
    more = nv > kk
    if kk < T:
        out["gap_ks"] = torch.where(more, srt[..., kk - 1] - srt[..., kk], math.inf)
        out["gap_ksh"] = torch.where(more, srth[..., kk - 1] - srth[..., kk], math.inf)
    else:
        out["gap_ks"] = out["gap_ksh"] = torch.full_like(margin, math.inf)
    return out
