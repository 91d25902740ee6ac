r"""Triton helpers of the fused metrics kernel's top-k: the running lists' insertions and
reductions, the second pass's rounds (:func:`fix_rounds`) and its candidate mode (``CAND`` of
:func:`kvtheory._triton_kernel.metrics_kernel`); imported only where Triton is importable.

A flagged query's first pass left thresholds :math:`\theta_s \le s_{(k)}` and
:math:`\theta_{\hat s} \le \hat s_{(k)}` (its k-th kept values less a margin; k distinct keys
reach them). Its *candidates* are the keys with :math:`s_j > \theta_s` or
:math:`\hat s_j > \theta_{\hat s}`: they hold both top-k sets, the first argmax of :math:`s`
and the largest :math:`\hat s`, and there are only a few (k to 2k plus those within the
margin). Each key block appends a row's candidates, in index order, to that row's slots in
global memory (:func:`collect`: a prefix sum along the row, masked stores; no loop rounds
and no block-wide test), and after the last block :func:`select` takes the exact top-k sets
from the at most ``CAND`` candidates: k rounds of (largest, first index) on a
``[BLOCK_M, CAND]`` array. A row with more candidates than slots goes on to the rounds pass.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def collect(s, sh, cols, thr_s, thr_h, cnt, CI, CS, CH, cbase, CAND: tl.constexpr,
            SKIP: tl.constexpr):
    """Append the block's candidates of each row (index, s, s^) at its slots
    ``cbase + cnt, ...`` (those below ``CAND``); returns the rows' new counts. ``SKIP``: test
    first whether any row has one (a block-wide reduction) and skip the stores if none."""
    c = (s > thr_s[:, None]) | (sh > thr_h[:, None])
    ci = c.to(tl.int32)
    n = tl.sum(ci, 1)
    if SKIP:
        if tl.max(n, 0) > 0:
            _append(c, ci, s, sh, cols, cnt, CI, CS, CH, cbase, CAND)
    else:
        _append(c, ci, s, sh, cols, cnt, CI, CS, CH, cbase, CAND)
    return cnt + n


@triton.jit
def _append(c, ci, s, sh, cols, cnt, CI, CS, CH, cbase, CAND: tl.constexpr):
    slot = cnt[:, None] + tl.cumsum(ci, 1) - 1
    ok = c & (slot < CAND)
    at = cbase[:, None] + slot
    tl.store(CI + at, tl.zeros(s.shape, tl.int32) + cols[None, :], mask=ok)
    tl.store(CS + at, s, mask=ok)
    tl.store(CH + at, sh, mask=ok)


@triton.jit
def select(CI, CS, CH, cbase, cnt, keep, TOPK: tl.constexpr, CAND: tl.constexpr):
    r"""From each row's ``cnt`` candidates (``keep``: rows to read): the flip
    (:math:`\hat s` at the first largest :math:`s` below the largest :math:`\hat s`) and the
    number of shared indices of the two top-k sets (largest first, then lowest index)."""
    NONE: tl.constexpr = -3.0e38
    cc = tl.arange(0, CAND)
    have = keep[:, None] & (cc[None, :] < cnt[:, None])
    at = cbase[:, None] + cc[None, :]
    ci = tl.load(CI + at, mask=have, other=1 << 30)
    cs = tl.load(CS + at, mask=have, other=NONE)
    ch = tl.load(CH + at, mask=have, other=NONE)
    in_s = tl.zeros(cs.shape, tl.int1)
    in_h = tl.zeros(cs.shape, tl.int1)
    ws = cs
    wh = ch
    first = tl.max(ci, 1)
    for r in tl.static_range(TOPK):
        m = tl.max(ws, 1)
        f = tl.min(tl.where(ws == m[:, None], ci, 1 << 30), 1)
        pick = (ci == f[:, None]) & (m > NONE)[:, None]
        in_s = in_s | pick
        ws = tl.where(pick, NONE, ws)
        if r == 0:
            first = f
        mh = tl.max(wh, 1)
        fh = tl.min(tl.where(wh == mh[:, None], ci, 1 << 30), 1)
        pick = (ci == fh[:, None]) & (mh > NONE)[:, None]
        in_h = in_h | pick
        wh = tl.where(pick, NONE, wh)
    overlap = tl.sum((in_s & in_h).to(tl.float32), 1)
    sh_top = tl.max(tl.where(ci == first[:, None], ch, NONE), 1)
    flip = (sh_top < tl.max(ch, 1)).to(tl.float32)
    return flip, overlap


@triton.jit
def insert(ts, ti, kc, cur, cidx):
    """Each row's candidate ``cur`` (at ``cidx``) replaces the row's smallest kept entry
    (its first slot if several) when strictly larger."""
    kth = tl.min(ts, 1)
    mpos = tl.min(tl.where(ts == kth[:, None], kc[None, :], 1 << 20), 1)
    rep = (cur > kth)[:, None] & (kc[None, :] == mpos[:, None])
    return tl.where(rep, cur[:, None], ts), tl.where(rep, cidx[:, None], ti)


@triton.jit
def insert_at(ts, ti, ta, kc, cur, cidx, cura):
    """:func:`insert` carrying a payload (``cura`` into ``ta``)."""
    kth = tl.min(ts, 1)
    mpos = tl.min(tl.where(ts == kth[:, None], kc[None, :], 1 << 20), 1)
    rep = (cur > kth)[:, None] & (kc[None, :] == mpos[:, None])
    return (tl.where(rep, cur[:, None], ts), tl.where(rep, cidx[:, None], ti),
            tl.where(rep, cura[:, None], ta))


@triton.jit
def fix_rounds(ts, ti, tsa, tsh, tih, kc, s, sh, cols):
    r"""The second pass's block: rounds while some row's largest remaining entry of ``s`` or
    ``sh`` beats the smallest kept one, each inserting every row's largest remaining entry (its
    first index) into the lists (``tsa``: :math:`\hat s` at the kept :math:`s` entries). Lists
    that start at the first pass's thresholds make most blocks need no round: the block costs
    its two maxima."""
    NEG: tl.constexpr = -1.2676506002282294e30
    work = s
    workh = sh
    cur = tl.max(s, 1)
    curh = tl.max(sh, 1)
    # (go is defined last: Triton 3.6's layout pass fails on a while loop whose condition
    # variable comes before tensors it carries)
    go = tl.max(((cur > tl.min(ts, 1)) | (curh > tl.min(tsh, 1))).to(tl.int32), 0)
    while go > 0:
        cidx = tl.min(tl.where(work == cur[:, None], cols[None, :], 1 << 30), 1)
        at = cols[None, :] == cidx[:, None]
        ts, ti, tsa = insert_at(ts, ti, tsa, kc, cur, cidx, tl.max(tl.where(at, sh, NEG), 1))
        work = tl.where(at, -3.0e38, work)
        cur = tl.max(work, 1)
        cidh = tl.min(tl.where(workh == curh[:, None], cols[None, :], 1 << 30), 1)
        tsh, tih = insert(tsh, tih, kc, curh, cidh)
        workh = tl.where(cols[None, :] == cidh[:, None], -3.0e38, workh)
        curh = tl.max(workh, 1)
        go = tl.max(((cur > tl.min(ts, 1)) | (curh > tl.min(tsh, 1))).to(tl.int32), 0)
    return ts, ti, tsa, tsh, tih


@triton.jit
def top2(a1, a2, b1, b2):
    """Combine of (largest, second largest) pairs, counting ties (``tl.reduce``). NaN-
    propagating max/min, so that a leaf's second of -inf folds away: three ops an element."""
    nan: tl.constexpr = tl.PropagateNan.ALL
    return (tl.maximum(a1, b1, propagate_nan=nan),
            tl.maximum(tl.maximum(a2, b2, propagate_nan=nan), tl.minimum(a1, b1, propagate_nan=nan),
                       propagate_nan=nan))


@triton.jit
def top2_at(a1, ap, a2, b1, bp, b2):
    """:func:`top2` of the first entries with a payload carried along the largest (``ap``,
    ``bp``: s^ where s is largest; on a tie the left one, which only matters where the row is
    flagged for the second pass anyway): two ops more an element, against the three of a
    separate masked maximum."""
    nan: tl.constexpr = tl.PropagateNan.ALL
    return (tl.maximum(a1, b1, propagate_nan=nan), tl.where(b1 > a1, bp, ap),
            tl.maximum(tl.maximum(a2, b2, propagate_nan=nan), tl.minimum(a1, b1, propagate_nan=nan),
                       propagate_nan=nan))
