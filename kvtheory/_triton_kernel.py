r"""Triton source of the fused attention-metrics kernel (:mod:`kvtheory._triton_metrics` imports
it only where Triton is importable; the docstring there states what it computes).

Per key block of ``BLOCK_N`` tokens and ``BLOCK_M`` queries the kernel multiplies both logit
tiles on tensor cores and, per query row, updates:

* the running first argmax of :math:`s` and :math:`\hat s` there (flip), the running second
  largest :math:`s` (margin: the larger of the second of the block maxima and each block's own
  second);
* the softmax sums about the reference :math:`c` (``SUMS``), with
  :math:`\Phi = \sum_j w_j\varphi(u_j)` per block by ``PHI_MODE``: ``3`` (default) chooses per
  block from :math:`U = \max|u|` the series :math:`u^2\sum_{n\le N} u^n/(n+2)!` (Horner, one
  FMA a term) with :math:`N = 3, 6, 8` for :math:`U < 1/16, 1/2, 1` (relative error in
  :math:`\varphi` under :math:`6.3\cdot 10^{-8}`, about half a float32 unit), and beyond
  that, per logit, the series where :math:`|u| < 1` and :math:`w e^u - w - wu` elsewhere;
  ``0``: the
  kernel before (the series to :math:`N = 8` whenever :math:`U < 1`); ``4``: always
  :math:`\sum_j w_j e^{u_j} - \sum_j w_j - \sum_j w_j u_j` (one more ``exp2`` a logit and no
  series, but absolute error a few float32 units of :math:`\sum_j w_j`: relative error
  :math:`\sim 10^{-7}/\mathrm{Var}_p(u)`, large for small deltas; timing only); ``5``: none
  (timing only);
* the top-k (``TOPK_MODE``): ``3`` (default) takes each block's largest and second largest of
  :math:`s` and of :math:`\hat s` in one reduction each (ties counted; three max/min an element)
  and :math:`\hat s` where :math:`s` is largest by a separate masked maximum (``PAYLOAD``
  carries it along the largest :math:`s` through the same reduction instead: 1,075 against 1,105
  SASS instructions a block, but on the H200 no faster once the kernel lists its flagged
  queries, and 3 of 32,768 KLs off by up to 2.5e-3 on local keys, which the interpreter does not
  show; a variant), inserts the block maximum of :math:`s` with :math:`\hat s` there into a
  running top-k list of :math:`s` and the block maximum of :math:`\hat s` into a value list of
  :math:`\hat s`, and keeps the largest *second* entry of any block; the overlap is the number
  of kept :math:`s` entries whose :math:`\hat s` reaches the k-th largest :math:`\hat s` (the
  shared indices when that value is not tied). An entry replaces the slot equal to the smallest
  kept value (empty slots hold distinct values below every logit), so no slot search. The lists
  are exact unless a block's second entry reaches the k-th kept value or two kept values are
  equal, and :math:`\hat s` at the running top of :math:`s` is at its first index unless that
  top is tied within its block: the kernel flags such queries for an exact second pass
  (``COUNT``, ``ROWS``: below). ``2``: the block maxima with their first indices in both lists
  (an index search a block for each; the kernel before); ``1``: exact in one pass, each block
  inserting entries while some row's next largest beats its k-th (a data-dependent loop; the
  second pass); ``0``: none.
* loads of the key tiles by tensor descriptors (``TMA``, Hopper's tensor memory accelerator)
  or by pointers.

Where it flags queries, program :math:`(i, bh)` adds their number to ``COUNT[bh]`` (an atomic
add that returns where they go) and lists their indices in ``ROWS[bh·NQ + …]``: each head's
flagged queries, in an order that depends on the programs' timing (the results of a query do
not depend on the others it is grouped with). ``FIX`` runs the kernel on those rows and writes
only the flip and the top-k overlap: the second pass. The first pass leaves in a flagged row's
flip and overlap slots the k-th kept :math:`\hat s` and :math:`s` less a margin of
:math:`2^{-12}` of the logits' size (−2¹⁰⁰ where kept values are alike and may stand for fewer
than k keys): k distinct keys reach the kept value, so the exact k-th does too, and the second
pass's lists start there. A key block then costs its two row maxima unless one holds an entry
above some row's k-th (:func:`fix_rounds`); the flip comes from the exact lists (:math:`\hat s`
at the first largest :math:`s`, against the largest :math:`\hat s`). Program
:math:`p = j\,n_{bh} + bh` takes entries :math:`j\,` ``BLOCK_M`` to
:math:`(j+1)\,` ``BLOCK_M`` :math:`- 1` of head :math:`bh`'s list (those below ``COUNT[bh]``);
one without rows skips every key block. ``CAND`` > 0 (a variant, off: 2.2 ms slower on an
H100, ``benchmarks/KERNEL_NOTES.md``) makes a second pass that collects each row's keys above
either threshold into ``CAND`` slots (``CI``, ``CS``, ``CH``) and takes the top-k sets from
them (:mod:`kvtheory._triton_select`), listing rows with more in ``COUNT2``, ``ROWS2`` for
the rounds.

``RESCAN`` (mode 3; the default on the host) records the key block of every kept entry
(``tb``, ``tbh``) and lists a flagged query for the rescan of those blocks alone instead,
unless a list holds one block twice, a key lost (:mod:`kvtheory._triton_rescan`, which states
why that is exact; ``COUNT2``, ``ROWS2`` are then its list, ``BC``, ``BK`` the buckets of
(head, key block), ``CC`` the candidate counts, ``LB`` and ``CAP`` their sizes); only the others
go to the rounds.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_phi import _block_phi, _log1p, _phi, _psi
from ._triton_rescan import enlist
from ._triton_select import collect, fix_rounds, insert, select, top2, top2_at
from ._triton_tiles import key_tiles, mask_row, visible


@triton.jit
def metrics_kernel(
    Q, K, KH, V, VH, KM, OUT, COUNT, ROWS, CI, CS, CH, COUNT2, ROWS2, BC, BK, CC, KD, KHD,
    NQ, T, OFF, HQ, HKV, G, HM, KM_DIV, WINDOW, scale, N_OUT, LB, CAP,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KM: tl.constexpr,
    HAS_V: tl.constexpr, FULL: tl.constexpr, WITH_ZH: tl.constexpr, FIX: tl.constexpr,
    SUMS: tl.constexpr = True, TOPK_MODE: tl.constexpr = 3, PHI_MODE: tl.constexpr = 3,
    TMA: tl.constexpr = False, PAYLOAD: tl.constexpr = False, CAND: tl.constexpr = 0,
    CAND_SKIP: tl.constexpr = False, RESCAN: tl.constexpr = False,
):
    # logits stay unscaled (raw q.k) in the loop; weights are exp2(s a2 - m a2), a2 = scale log2 e.
    # Hidden logits are NEG = -2^100: a power of two, so NEG a2 is exact and a row that sees
    # nothing in a block gets exp2(NEG a2 - NEG a2) = 1 from the fused multiply-add (weights
    # its later blocks multiply by 0), never exp2 of a rounding error of 10^22
    NEG: tl.constexpr = -1.2676506002282294e30
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    ar = tl.arange(0, BLOCK_M)
    if FIX:     # entries j BLOCK_M ... of the list of (batch, head) bh's flagged queries
        nbh = N_OUT // NQ
        bh = pid_m % nbh
        idx = (pid_m // nbh) * BLOCK_M + ar
        rmask = idx < tl.load(COUNT + bh)
        rows = tl.load(ROWS + bh.to(tl.int64) * NQ + idx, mask=rmask, other=0)
        pos = rows + OFF
        pos_lo = tl.min(tl.where(rmask, pos, 1 << 30), 0)
        pos_hi = tl.max(tl.where(rmask, pos, 0), 0)
    else:
        bh = tl.program_id(1)
        rows = pid_m * BLOCK_M + ar
        rmask = rows < NQ
        pos = rows + OFF
        pos_lo = pid_m * BLOCK_M + OFF
        pos_hi = pid_m * BLOCK_M + BLOCK_M - 1 + OFF    # may pass the last query: then > T - 1
    b = bh // HQ
    h = bh % HQ
    hk = h // G
    dd = tl.arange(0, BD)
    q = tl.load(Q + (bh * NQ + rows[:, None]).to(tl.int64) * D + dd[None, :],
                mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
    kbase = (b * HKV + hk).to(tl.int64) * T
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(pos_hi + 1, T)
    if HAS_WINDOW:
        lo = tl.maximum((pos_lo - WINDOW + 1) // BLOCK_N * BLOCK_N, 0)
    if FIX:     # a program without listed rows: no key block
        hi = tl.where(tl.max(rmask.to(tl.int32), 0) > 0, hi, lo)
    a2 = scale * LOG2E
    m1 = tl.full([BLOCK_M], NEG, tl.float32)       # running max of s
    m2 = tl.full([BLOCK_M], NEG, tl.float32)       # running second of s
    sh_at = tl.full([BLOCK_M], NEG, tl.float32)    # s^ at the first argmax of s
    mh = tl.full([BLOCK_M], NEG, tl.float32)       # running max of s^
    sec_s = tl.full([BLOCK_M], -3.0e38, tl.float32)   # largest second entry of a block (s)
    sec_h = tl.full([BLOCK_M], -3.0e38, tl.float32)   # ... of s^
    tie_top = tl.zeros([BLOCK_M], tl.int1)            # the running top of s is tied (mode 3)
    c = tl.zeros([BLOCK_M], tl.float32)            # reference delta (scaled)
    W = tl.zeros([BLOCK_M], tl.float32)
    S1 = tl.zeros([BLOCK_M], tl.float32)
    S2 = tl.zeros([BLOCK_M], tl.float32)
    PH = tl.zeros([BLOCK_M], tl.float32)
    ZH = tl.zeros([BLOCK_M], tl.float32)
    kc = tl.arange(0, KP)
    if TOPK_MODE == 3:   # distinct empty slots below NEG: each insertion fills exactly one
        pad = tl.where(kc < TOPK, NEG * (1.0 + kc.to(tl.float32) / 64.0), 3.0e38)
    else:
        pad = tl.where(kc < TOPK, NEG, 3.0e38)      # padding slots are never the minimum
    ts = tl.zeros([BLOCK_M, KP], tl.float32) + pad[None, :]
    tsh = tl.zeros([BLOCK_M, KP], tl.float32) + pad[None, :]
    ti = tl.full([BLOCK_M, KP], -1, tl.int32)
    tih = tl.full([BLOCK_M, KP], -2, tl.int32)
    tsa = tl.full([BLOCK_M, KP], -3.0e38, tl.float32)   # s^ at the kept s entries (mode 3)
    tb = tl.full([BLOCK_M, KP], -1, tl.int32)       # key block of the kept entries (RESCAN)
    tbh = tl.full([BLOCK_M, KP], -1, tl.int32)
    if FIX:     # the first pass's thresholds (in the flip, overlap slots)
        at_s = OUT + bh.to(tl.int64) * NQ + rows
        raw_s = tl.load(at_s + 3 * N_OUT, mask=rmask, other=NEG)
        raw_h = tl.load(at_s, mask=rmask, other=NEG)
        thr_s = tl.maximum(raw_s, NEG)
        thr_h = tl.maximum(raw_h, NEG)
        if CAND > 0:    # candidates above both thresholds; below NEG: none, to the rounds
            bad = (raw_s < NEG) | (raw_h < NEG)
            thr_s = tl.where(bad, 3.0e38, thr_s)
            thr_h = tl.where(bad, 3.0e38, thr_h)
            cnt = tl.zeros([BLOCK_M], tl.int32)
            cbase = (bh * NQ + idx) * CAND      # int32: the host keeps it below 2^31
        else:           # the rounds' lists start there
            tsa = tl.full([BLOCK_M, KP], NEG, tl.float32)
            ts = tl.where(kc[None, :] < TOPK, thr_s[:, None], 3.0e38)
            tsh = tl.where(kc[None, :] < TOPK, thr_h[:, None], 3.0e38)
    dv = tl.arange(0, BDV)
    o = tl.zeros([BLOCK_M, BDV], tl.float32)
    oh = tl.zeros([BLOCK_M, BDV], tl.float32)
    kmbase = mask_row(b, h, HM, KM_DIV, T)             # the key mask's row (HAS_KM)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = (cols < T) & (cols >= 0)
        k, kh = key_tiles(K, KH, KD, KHD, kbase, start, cols, cmask, dd, D, TMA)
        s = tl.dot(q, tl.trans(k))
        sh = tl.dot(q, tl.trans(kh))
        need = (start + BLOCK_N > T) | (start < 0)
        if CAUSAL:
            need = need | (start + BLOCK_N - 1 > pos_lo)
        if HAS_WINDOW:
            need = need | (start <= pos_hi - WINDOW)
        if HAS_KM:      # (the second pass's rows bound pos_lo, pos_hi like a block's)
            need = True
        if need:
            vis = visible(cmask[None, :] & rmask[:, None], cols, pos, WINDOW, KM, kmbase, cmask,
                          CAUSAL, HAS_WINDOW, HAS_KM)
            s = tl.where(vis, s, NEG)
            sh = tl.where(vis, sh, NEG)
        if FIX:
            if CAND > 0:
                cnt = collect(s, sh, cols, thr_s, thr_h, cnt, CI, CS, CH, cbase, CAND,
                              CAND_SKIP)
            else:
                ts, ti, tsa, tsh, tih = fix_rounds(ts, ti, tsa, tsh, tih, kc, s, sh, cols)
        else:
            if TOPK_MODE == 3 and FULL:
                # each block's largest and second largest at once (ties counted), and s^ where s
                # is largest: at its first index unless the largest is tied, which the row's
                # flag sends to the exact second pass if it is the running top
                ninf = tl.full(sh.shape, float("-inf"), tl.float32)
                if PAYLOAD:     # s^ at the largest s carried through the same reduction
                    bm, sh_b, sec = tl.reduce((s, sh, ninf), 1, top2_at)
                else:
                    bm, sec = tl.reduce((s, ninf), 1, top2)
                    sh_b = tl.max(tl.where(s == bm[:, None], sh, NEG), 1)
                bmh, sech = tl.reduce((sh, ninf), 1, top2)
                tie_top = tl.where(bm > m1, sec == bm, tie_top)
            else:
                bm = tl.max(s, 1)
                bmh = tl.max(sh, 1)
                bi = tl.min(tl.where(s == bm[:, None], cols[None, :], 1 << 30), 1)
                at_bi = cols[None, :] == bi[:, None]
                sh_b = tl.max(tl.where(at_bi, sh, NEG), 1)
            sh_at = tl.where(bm > m1, sh_b, sh_at)
            if FULL:
                if TOPK_MODE != 3:
                    work = tl.where(at_bi, -3.0e38, s)
                    sec = tl.max(work, 1)                   # the block's second largest s
                m2 = tl.maximum(tl.maximum(m2, sec), tl.minimum(m1, bm))
                if SUMS:
                    # sums are about a reference delta c: the delta at the running top token
                    # (moved with it, so c stays near the mean where p is concentrated)
                    cn = tl.where(bm > m1, (sh_b - bm) * scale, c)
                    e = c - cn
                    c = cn
                    m1n = tl.maximum(m1, bm)
                    bma = bm * a2
                    w = tl.exp2(s * a2 - bma[:, None])      # block-local weights, 1 at the top
                    u = (sh - s) * scale - c[:, None]
                    Wb = tl.sum(w, 1)
                    t = w * u
                    S1b = tl.sum(t, 1)
                    tu = t * u
                    S2b = tl.sum(tu, 1)
                    PHb = _block_phi(u, w, t, tu, sh, Wb, S1b, bma, c, a2, PHI_MODE)
                    alpha = tl.exp2((m1 - m1n) * a2)
                    beta = tl.exp2(bma - m1n * a2)
                    Wa = W * alpha
                    S1a = S1 * alpha
                    # the old sums about the new reference: u -> u + e
                    ee = tl.exp(e)
                    PHa = tl.where(Wa > 0, ee * (PH * alpha) + Wa * _phi(e) + S1a * (ee - 1.0), 0.0)
                    S2 = S2 * alpha + e * (2.0 * S1a + Wa * e) + S2b * beta
                    S1 = S1a + Wa * e + S1b * beta
                    PH = PHa + PHb * beta
                    W = Wa + Wb * beta
                    if WITH_ZH:
                        mhn = tl.maximum(mh, bmh)
                        ah = tl.exp2((mh - mhn) * a2)
                        wh = tl.exp2(sh * a2 - (mhn * a2)[:, None])
                        ZH = ZH * ah + tl.sum(wh, 1)
                        if HAS_V:
                            vp = (kbase + cols[:, None]) * DV + dv[None, :]
                            vmk = cmask[:, None] & (dv[None, :] < DV)
                            vt = tl.load(V + vp, mask=vmk, other=0.0).to(tl.float32)
                            vht = tl.load(VH + vp, mask=vmk, other=0.0).to(tl.float32)
                            o = o * alpha[:, None] + tl.dot(w * beta[:, None], vt,
                                                            input_precision="tf32x3")
                            oh = oh * ah[:, None] + tl.dot(wh, vht, input_precision="tf32x3")
                if TOPK_MODE == 3:
                    # the s list keeps s^ at its entries, the s^ list values only: the overlap is
                    # the number of kept s entries whose s^ reaches the k-th largest s^, and the
                    # s^ list needs no index search, only the block's second largest s^ (exact
                    # while no block holds two of the top k, as for s). An entry replaces the
                    # slots equal to the smallest kept one: one slot while kept values are
                    # distinct (empty slots are); equal kept values are flagged at the end
                    kth = tl.min(ts, 1)
                    rep = (ts == kth[:, None]) & ((bm > kth) & (bm > NEG))[:, None]
                    ts = tl.where(rep, bm[:, None], ts)
                    tsa = tl.where(rep, sh_b[:, None], tsa)
                    kth = tl.min(tsh, 1)
                    reph = (tsh == kth[:, None]) & ((bmh > kth) & (bmh > NEG))[:, None]
                    tsh = tl.where(reph, bmh[:, None], tsh)
                    if RESCAN:
                        tb = tl.where(rep, start // BLOCK_N, tb)
                        tbh = tl.where(reph, start // BLOCK_N, tbh)
                    sec_s = tl.maximum(sec_s, sec)
                    sec_h = tl.maximum(sec_h, sech)
                elif TOPK_MODE == 1:     # exact: the second pass's rounds, from empty lists
                    ts, ti, tsa, tsh, tih = fix_rounds(ts, ti, tsa, tsh, tih, kc, s, sh, cols)
                elif TOPK_MODE == 2:
                    # the block maximum of s (its first index) and of s^ enter the running top-k
                    ts, ti = insert(ts, ti, kc, bm, bi)
                    bih = tl.min(tl.where(sh == bmh[:, None], cols[None, :], 1 << 30), 1)
                    tsh, tih = insert(tsh, tih, kc, bmh, bih)
                    workh = tl.where(cols[None, :] == bih[:, None], -3.0e38, sh)
                    sec_s = tl.maximum(sec_s, sec)
                    sec_h = tl.maximum(sec_h, tl.max(workh, 1))
            m1 = tl.maximum(m1, bm)
            mh = tl.maximum(mh, bmh)
    base = OUT + bh.to(tl.int64) * NQ + rows
    if TOPK_MODE == 3 and not FIX:
        tau = tl.min(tsh, 1)                     # the k-th largest s^ (NEG if fewer seen)
        overlap = tl.sum(((tsa >= tau[:, None]) & (kc[None, :] < TOPK)).to(tl.float32), 1)
    else:
        overlap = tl.sum(tl.sum((ti[:, :, None] == tih[:, None, :]).to(tl.float32), 2), 1)
    if FIX and CAND > 0:    # rows with too many candidates go on to the rounds pass
        tl.debug_barrier()      # the block's candidate stores, visible to all its threads
        over = (bad | (cnt > CAND)) & rmask
        flip, overlap = select(CI, CS, CH, cbase, cnt, rmask & ~over, TOPK, CAND)
        tl.store(base, flip, mask=rmask & ~over)
        tl.store(base + 3 * N_OUT, overlap, mask=rmask & ~over)
        ov = over.to(tl.int32)
        n_ov = tl.sum(ov, 0)
        if n_ov > 0:
            at = tl.atomic_add(COUNT2 + bh, n_ov) + tl.cumsum(ov, 0) - 1
            tl.store(ROWS2 + bh.to(tl.int64) * NQ + at, rows, mask=ov > 0)
    elif FIX:   # the flip from the exact lists: s^ at the first argmax of s, max s^
        kept = kc[None, :] < TOPK
        top = tl.max(tl.where(kept, ts, -3.0e38), 1)
        first = tl.min(tl.where(kept & (ts == top[:, None]), ti, 1 << 30), 1)
        sh_top = tl.max(tl.where(kept & (ti == first[:, None]), tsa, NEG), 1)
        mh = tl.max(tl.where(kept, tsh, -3.0e38), 1)
        tl.store(base, (sh_top < mh).to(tl.float32), mask=rmask)
        tl.store(base + 3 * N_OUT, overlap, mask=rmask)
    else:
        flip = (sh_at < mh).to(tl.float32)
        if FULL:
            d1 = S1 / W                                  # mu - c
            fisher = tl.maximum(0.5 * (S2 / W - d1 * d1), 0.0)
            hh = -d1
            raw = tl.exp(hh) * PH + W * _psi(hh)     # sum_j w_j phi(delta_j - mu)
            # an overflowed sum (inf, or NaN from 0 inf or inf - inf) gives KL = inf: the
            # GPU's maximum would turn a NaN into 0, a finite and wrong KL
            kl = tl.where(tl.abs(raw) < float("inf"), _log1p(tl.maximum(raw, 0.0) / W),
                          float("inf"))
            if WITH_ZH:   # lse(s^) - lse(s) - mu where the series sum is not finite
                big = (mh - m1) * scale - (c + d1) + tl.log(ZH / W)
                kl = tl.where(kl < float("inf"), kl, tl.maximum(big, 0.0))
            if TOPK_MODE == 3 or (TOPK_MODE == 2 and TOPK > 1):
                # exact unless a block's second entry reaches the k-th kept value (top-1 is
                # always a block maximum), or, mode 3, two kept entries are alike (tied
                # logits, or one insertion that filled two slots) or the top of s is tied
                thr_s = tl.min(ts, 1)
                thr_h = tl.min(tsh, 1)
                spill = tie_top
                alike = tie_top & False
                if TOPK > 1:
                    spill = (sec_s >= thr_s) | (sec_h >= thr_h)
                    if TOPK_MODE == 3:
                        pair = ((kc[:, None] < kc[None, :]) & (kc[None, :] < TOPK))[None, :, :]
                        eq_s = (ts[:, :, None] == ts[:, None, :]) & pair
                        eq_h = (tsh[:, :, None] == tsh[:, None, :]) & pair
                        alike_s = tl.max(tl.max(eq_s, 2), 1) > 0
                        alike_h = tl.max(tl.max(eq_h, 2), 1) > 0
                        spill = spill | alike_s | alike_h | tie_top
                        if RESCAN:  # only one insertion into two slots (a block twice) loses
                            # a key; alike values of distinct blocks are k distinct keys
                            alike_s = tl.max(tl.max(eq_s & (tb[:, :, None] == tb[:, None, :]),
                                                    2), 1) > 0
                            alike_h = tl.max(tl.max(eq_h & (tbh[:, :, None] == tbh[:, None, :]),
                                                    2), 1) > 0
                        alike = alike_s | alike_h
                        # alike kept values may stand for fewer than k keys: no threshold
                        thr_s = tl.where(alike_s, NEG, thr_s)
                        thr_h = tl.where(alike_h, NEG, thr_h)
                spill = spill & rmask
                # the second pass's thresholds, in the two slots it overwrites: below the
                # k-th kept value (k distinct keys reach it, so the exact k-th does too), by
                # a margin of 2^-12 of the logits' size (the second pass computes the same
                # logits; the margin only guards against a different rounding there)
                flip = tl.where(spill, thr_h - (tl.abs(thr_h) + tl.abs(mh)) * 2.44140625e-4,
                                flip)
                overlap = tl.where(spill, thr_s - (tl.abs(thr_s) + tl.abs(m1)) * 2.44140625e-4,
                                   overlap)
                if RESCAN and TOPK_MODE == 3:
                    # the rows whose kept values are distinct go to the rescan of their kept
                    # blocks (_triton_rescan), the rest (and those it cannot list) to the rounds
                    n_all = tl.sum(spill.to(tl.int32), 0)
                    if n_all > 0:
                        tl.atomic_add(COUNT2 + 1, n_all)
                    spill = enlist(spill & ~alike, spill & alike, tb, tbh, kc, bh * NQ + rows,
                                   bh, COUNT2, ROWS2, BC, BK, CC, LB, CAP,
                                   (T + BLOCK_N - 1) // BLOCK_N, TOPK)
                spill = spill.to(tl.int32)
                n_spill = tl.sum(spill, 0)
                if n_spill > 0:     # listed for the second pass, after the head's others
                    at = tl.atomic_add(COUNT + bh, n_spill) + tl.cumsum(spill, 0) - 1
                    tl.store(ROWS + bh.to(tl.int64) * NQ + at, rows, mask=spill > 0)
            tl.store(base + N_OUT, (m1 - m2) * scale, mask=rmask)
            tl.store(base + 2 * N_OUT, 1.0 / W, mask=rmask)
            tl.store(base + 3 * N_OUT, overlap, mask=rmask)
            tl.store(base + 4 * N_OUT, kl, mask=rmask)
            tl.store(base + 5 * N_OUT, fisher, mask=rmask)
            if HAS_V:
                ov = o / W[:, None]
                ohv = oh / ZH[:, None]
                num = tl.sqrt(tl.sum((ov - ohv) * (ov - ohv), 1))
                den = tl.sqrt(tl.sum(ov * ov, 1))
                tl.store(base + 6 * N_OUT, tl.where(num == 0, 0.0, num / den), mask=rmask)
        tl.store(base, flip, mask=rmask)
