r"""The fused metrics kernel's second pass by rescanning kept key blocks (``RESCAN`` of
:func:`kvtheory._triton_kernel.metrics_kernel`); imported only where Triton is importable.

The first pass keeps, per query, the k largest block maxima of :math:`s` and of
:math:`\hat s` and now also their key blocks. Where the k kept values of a list are distinct,
every key of the exact top-k lies in a kept block: a block whose maximum beats the k-th kept
value :math:`\theta` was inserted and never evicted (only values equal to the smallest kept
one are), so the other blocks hold nothing above :math:`\theta`; k distinct keys reach
:math:`\theta`, so the exact k-th value does too (a key at exactly :math:`\theta` in a later
block loses the tie to the kept one, which has the lower index; one in an earlier block was
kept or evicted, and an eviction at a tie keeps one block twice, below). A flagged query (a
kept block holding two of its top k, or a tied top) is then settled by its kept blocks alone,
a few against all of them:

1. :func:`enlist` (end of the first pass): the query gets an entry ``e`` of a global list
   (``ROWS2[e]`` = its (batch, head, query) index ``bh·NQ + row``; ``COUNT2[0]`` counts them,
   ``COUNT2[1]`` all flagged queries), and ``e`` goes into the bucket of each of its kept
   blocks, the two lists' blocks once each: ``BK[(bh·NB + block)·CAP + …]``, ``BC`` counting.
2. :func:`rescan_kernel`, a program a (head, key block): the logits of its bucket's queries
   with the block (the first pass's tile shape, so the same values), and each query's keys
   above either threshold (the first pass's k-th kept values less a margin, in the query's
   flip and overlap slots) appended to its ``CAND`` candidate slots (``CC[e]`` counts them).
3. :func:`pick_kernel`: the exact flip and top-k overlap from the candidates
   (:func:`kvtheory._triton_select.select`: largest first, then lowest index).

Kept values may be alike and still stand for k distinct keys (a tie between two blocks):
only an insertion that replaced two equal slots at once (the same block kept twice) loses a
key, and only such a query, or one beyond the list's ``LB`` entries, a full bucket (``CAP``)
or its ``CAND`` slots, goes on to the rounds over all key blocks
(:func:`kvtheory._triton_select.fix_rounds`), which remain exact for everything.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_select import select
from ._triton_tiles import key_tiles, mask_row, visible

#: added to a query's candidate count where one of its buckets was full: it then goes to the
#: rounds (the count stays above ``CAND``)
_FULL = tl.constexpr(1 << 20)


@triton.jit
def _bucket(ids, ok, e, bh, NB, BC, BK, CC, CAP):
    """List entry ``e`` of each row in the buckets of its blocks ``ids`` (where ``ok``)."""
    slot = bh * NB + ids
    pos = tl.atomic_add(BC + slot, 1, mask=ok)
    fit = ok & (pos < CAP)
    tl.store(BK + slot.to(tl.int64) * CAP + pos, e[:, None] + tl.zeros_like(ids), mask=fit)
    over = tl.sum((ok & (pos >= CAP)).to(tl.int32), 1)
    tl.atomic_add(CC + e, over * _FULL, mask=over > 0)


@triton.jit
def enlist(resc, full, tb, tbh, kc, grow, bh, COUNT2, ROWS2, BC, BK, CC, LB, CAP, NB,
           TOPK: tl.constexpr):
    """Rows ``resc`` (with kept blocks ``tb``, ``tbh``; -1: empty slot) to the rescan's list
    and buckets; returns ``full`` with the rows the list had no room for."""
    ri = resc.to(tl.int32)
    n = tl.sum(ri, 0)
    if n > 0:
        e = tl.atomic_add(COUNT2, n) + tl.cumsum(ri, 0) - 1
        got = resc & (e < LB)
        tl.store(ROWS2 + e, grow, mask=got)
        kept = kc[None, :] < TOPK
        ok_s = kept & (tb >= 0) & got[:, None]
        # a block in both lists is rescanned once (its candidates would count twice)
        dup = tl.max(((tbh[:, :, None] == tb[:, None, :]) & ok_s[:, None, :]).to(tl.int32),
                     2) > 0
        ok_h = kept & (tbh >= 0) & got[:, None] & ~dup
        _bucket(tb, ok_s, e, bh, NB, BC, BK, CC, CAP)
        _bucket(tbh, ok_h, e, bh, NB, BC, BK, CC, CAP)
        full = full | (resc & ~got)
    return full


@triton.jit
def rescan_kernel(
    Q, K, KH, KM, OUT, ROWS2, BC, BK, CC, CI, CS, CH, KD, KHD,
    NQ, T, OFF, HQ, HKV, G, HM, KM_DIV, WINDOW, N_OUT, CAP,
    D: tl.constexpr, BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAND: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KM: tl.constexpr,
    TMA: tl.constexpr,
):
    """Program ``(block·n_bh + bh)``: the queries in bucket (bh, block), ``BLOCK_M`` at a
    time, append their keys of the block above either threshold to their candidates."""
    NEG: tl.constexpr = -1.2676506002282294e30
    nbh = N_OUT // NQ
    pid = tl.program_id(0)
    bh = pid % nbh
    blk = pid // nbh
    nb = (T + BLOCK_N - 1) // BLOCK_N
    slot = (bh * nb + blk).to(tl.int64)
    n = tl.minimum(tl.load(BC + slot), CAP)
    b = bh // HQ
    h = bh % HQ
    kbase = (b * HKV + h // G).to(tl.int64) * T
    start = blk * BLOCK_N
    cols = start + tl.arange(0, BLOCK_N)
    cmask = cols < T
    dd = tl.arange(0, BD)
    ar = tl.arange(0, BLOCK_M)
    for c0 in range(0, n, BLOCK_M):
        live = c0 + ar < n
        e = tl.load(BK + slot * CAP + c0 + ar, mask=live, other=0)
        grow = tl.load(ROWS2 + e, mask=live, other=0)
        pos = grow - bh * NQ + OFF
        q = tl.load(Q + grow[:, None].to(tl.int64) * D + dd[None, :],
                    mask=live[:, None] & (dd[None, :] < D), other=0.0)
        k, kh = key_tiles(K, KH, KD, KHD, kbase, start, cols, cmask, dd, D, TMA)
        s = tl.dot(q, tl.trans(k))
        sh = tl.dot(q, tl.trans(kh))
        vis = visible(cmask[None, :] & live[:, None], cols, pos, WINDOW, KM,
                      mask_row(b, h, HM, KM_DIV, T), cmask, CAUSAL, HAS_WINDOW, HAS_KM)
        thr_h = tl.load(OUT + grow, mask=live, other=-NEG)
        thr_s = tl.load(OUT + 3 * N_OUT + grow, mask=live, other=-NEG)
        c = vis & ((s > thr_s[:, None]) | (sh > thr_h[:, None]))
        ci = c.to(tl.int32)
        nc = tl.sum(ci, 1)
        old = tl.atomic_add(CC + e, nc, mask=live & (nc > 0))
        at = old[:, None] + tl.cumsum(ci, 1) - 1
        ok = c & (at < CAND)
        at = e[:, None].to(tl.int64) * CAND + at
        tl.store(CI + at, tl.zeros(s.shape, tl.int32) + cols[None, :], mask=ok)
        tl.store(CS + at, s, mask=ok)
        tl.store(CH + at, sh, mask=ok)


@triton.jit
def pick_kernel(OUT, COUNT, ROWS, COUNT2, ROWS2, CC, CI, CS, CH, NQ, N_OUT, LB,
                TOPK: tl.constexpr, CAND: tl.constexpr, BLOCK_M: tl.constexpr):
    """Entries ``pid·BLOCK_M …`` of the rescan's list: the flip and the top-k overlap from
    their candidates into ``OUT``; an entry with more candidates than slots (or a full
    bucket) goes to the rounds' list of its head instead (``COUNT``, ``ROWS``)."""
    e = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m = e < tl.minimum(tl.load(COUNT2), LB)
    grow = tl.load(ROWS2 + e, mask=m, other=0)
    cnt = tl.load(CC + e, mask=m, other=0)
    ok = m & (cnt <= CAND)
    flip, overlap = select(CI, CS, CH, e * CAND, cnt, ok, TOPK, CAND)
    tl.store(OUT + grow, flip, mask=ok)
    tl.store(OUT + 3 * N_OUT + grow, overlap, mask=ok)
    bad = m & (cnt > CAND)
    bh = grow // NQ
    at = tl.atomic_add(COUNT + bh, 1, mask=bad)
    tl.store(ROWS + bh.to(tl.int64) * NQ + at, grow - bh * NQ, mask=bad)
