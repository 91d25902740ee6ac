r"""Triton source of the flip engine's aggregation on CUDA (:func:`kvtheory.flips._aggregate`
calls it through :func:`kvtheory._triton_metrics.aggregate` where the fused kernel served the
call): one launch instead of some forty small torch operations after the metrics kernel.

Program :math:`(h, s)` takes query head :math:`h` and part :math:`s` of the (batch, query)
pairs (``CHUNK`` of them, in blocks of ``BLOCK``) and writes row :math:`h` of table :math:`s`
(float64; the caller adds the tables up)

.. math::

    \big[\,n_h,\ \textstyle\sum m_1, \dots, \sum m_M,\ (c_b, f_b)_{b < B_m},\
    (c_b, f_b)_{b < B_p}\,\big]

over the pairs :math:`(b, i)` that count (``valid[b, i]`` and ``nv[b, h, i] > 0``):
:math:`n_h` of them, the sums of the ``M`` metrics (``flip`` as 0/1), and per bin of the
margin (then of the top-1 probability) the pairs in it, :math:`c_b`, and the flipped ones,
:math:`f_b`. A value's bin is the number of inner edges at or below it (``torch.bucketize``
with ``right=True``). Program :math:`(0, s)` also writes its part's number of valid queries
after the table. Sums are float64 in a fixed order (no atomics); counts are exact.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bins(x, EDGES, NE: tl.constexpr, NEP: tl.constexpr):
    """Bin of each ``x``: the number of the ``NE`` inner edges at or below it."""
    # padding lanes hold NaN: no value is at or above them (inf included)
    e = tl.load(EDGES + tl.arange(0, NEP), mask=tl.arange(0, NEP) < NE, other=float("nan"))
    return tl.sum((x[:, None] >= e[None, :]).to(tl.int32), 1)


@triton.jit
def _counts(bins, cnt, flp, NBP: tl.constexpr):
    """Per bin, the pairs that count (``cnt``, 0/1) and those flipped (``flp``)."""
    onehot = (bins[:, None] == tl.arange(0, NBP)[None, :]).to(tl.int32)
    return tl.sum(onehot * cnt[:, None], 0), tl.sum(onehot * flp[:, None], 0)


@triton.jit
def aggregate_kernel(
    FLIP, OV, KL, FI, OE, MG, PR, VALID, NV, MEDGES, PEDGES, TABLE,
    B, HQ, Q, G, snb, snk, sng, snq, CHUNK,
    HAS_OE: tl.constexpr, NEM: tl.constexpr, NEP_M: tl.constexpr, NEPR: tl.constexpr,
    NEP_P: tl.constexpr, BLOCK: tl.constexpr,
):
    h = tl.program_id(0)
    part = tl.program_id(1)
    hk = h // G
    gi = h % G
    M: tl.constexpr = 5 if HAS_OE else 4
    WIDTH: tl.constexpr = 1 + M + 2 * (NEM + 1) + 2 * (NEPR + 1)
    n = tl.zeros([BLOCK], tl.int32)
    nvalid = tl.zeros([BLOCK], tl.int32)
    s_flip = tl.zeros([BLOCK], tl.float64)
    s_ov = tl.zeros([BLOCK], tl.float64)
    s_kl = tl.zeros([BLOCK], tl.float64)
    s_fi = tl.zeros([BLOCK], tl.float64)
    s_oe = tl.zeros([BLOCK], tl.float64)
    mc = tl.zeros([NEP_M], tl.int32)
    mf = tl.zeros([NEP_M], tl.int32)
    pc = tl.zeros([NEP_P], tl.int32)
    pf = tl.zeros([NEP_P], tl.int32)
    lo = part * CHUNK
    hi = tl.minimum(lo + CHUNK, B * Q)
    for f0 in range(lo, hi, BLOCK):
        f = f0 + tl.arange(0, BLOCK)
        inq = f < hi
        b = f // Q
        qi = f % Q
        val = tl.load(VALID + f, mask=inq, other=0) != 0
        nv = tl.load(NV + b * snb + hk * snk + gi * sng + qi * snq, mask=inq, other=0)
        cm = val & (nv > 0)
        off = (b * HQ + h).to(tl.int64) * Q + qi
        fl = tl.load(FLIP + off, mask=cm, other=0) != 0
        cnt = cm.to(tl.int32)
        flp = (cm & fl).to(tl.int32)
        n += cnt
        nvalid += val.to(tl.int32)
        s_flip += flp.to(tl.float64)
        s_ov += tl.load(OV + off, mask=cm, other=0.0).to(tl.float64)
        s_kl += tl.load(KL + off, mask=cm, other=0.0).to(tl.float64)
        s_fi += tl.load(FI + off, mask=cm, other=0.0).to(tl.float64)
        if HAS_OE:
            s_oe += tl.load(OE + off, mask=cm, other=0.0).to(tl.float64)
        a, fb = _counts(_bins(tl.load(MG + off, mask=cm, other=0.0), MEDGES, NEM, NEP_M),
                       cnt, flp, NEP_M)
        mc += a
        mf += fb
        a, fb = _counts(_bins(tl.load(PR + off, mask=cm, other=0.0), PEDGES, NEPR, NEP_P),
                       cnt, flp, NEP_P)
        pc += a
        pf += fb
    table = TABLE + part * (HQ * WIDTH + 1)
    row = table + h * WIDTH
    tl.store(row, tl.sum(n, 0).to(tl.float64))
    tl.store(row + 1, tl.sum(s_flip, 0))
    tl.store(row + 2, tl.sum(s_ov, 0))
    tl.store(row + 3, tl.sum(s_kl, 0))
    tl.store(row + 4, tl.sum(s_fi, 0))
    if HAS_OE:
        tl.store(row + 5, tl.sum(s_oe, 0))
    jm = tl.arange(0, NEP_M)
    base = row + 1 + M
    tl.store(base + 2 * jm, mc.to(tl.float64), mask=jm <= NEM)
    tl.store(base + 2 * jm + 1, mf.to(tl.float64), mask=jm <= NEM)
    jp = tl.arange(0, NEP_P)
    base = base + 2 * (NEM + 1)
    tl.store(base + 2 * jp, pc.to(tl.float64), mask=jp <= NEPR)
    tl.store(base + 2 * jp + 1, pf.to(tl.float64), mask=jp <= NEPR)
    if h == 0:
        tl.store(table + HQ * WIDTH, tl.sum(nvalid, 0).to(tl.float64))
