r"""Fused attention-fidelity metrics on CUDA (Triton): one kernel, FlashAttention-style.

Each program takes ``BLOCK_M`` queries of one query head and streams the key blocks its
queries can see (causal, sliding window, key mask), computing both logit tiles
:math:`S = \tau QK^\top` and :math:`\hat S = \tau Q\hat K^\top` on tensor cores (bf16/fp16
inputs, float32 accumulation). Nothing of size ``query × token`` is written: per query it
keeps, online,

* the first argmax of :math:`s`, :math:`\hat s` at it and :math:`\max \hat s` (flip);
* the ``topk`` largest entries of :math:`s` and of :math:`\hat s` with their indices (top-k
  overlap; the two largest of :math:`s` give the margin, or a running second maximum when
  ``topk = 1``): each key block inserts its row maxima (the argmax above), then further rounds
  run while some row's next largest beats its smallest kept entry (a data-dependent loop);
* :math:`m = \max s` and :math:`W = \sum_j w_j`, :math:`w_j = e^{s_j - m}` (one ``exp2`` per
  logit, the scale folded in), and about a reference :math:`c` the sums
  :math:`S_1 = \sum_j w_j u_j`, :math:`S_2 = \sum_j w_j u_j^2` and
  :math:`\Phi_c = \sum_j w_j\varphi(u_j)`, :math:`u_j = \delta_j - c`,
  :math:`\delta = \hat s - s`, :math:`\varphi(u) = e^u - 1 - u \ge 0` (series to :math:`u^{10}`
  for :math:`|u| < 1`, else :math:`e^{\ln w_j + u_j} - w_j(1 + u_j)`, no :math:`0\cdot\infty`).
  :math:`c` is the :math:`\delta` of the running top token, moved with it: when it moves by
  :math:`e`, :math:`S_2 \mathrel{+}= 2eS_1 + We^2`, :math:`S_1 \mathrel{+}= We` and
  :math:`\Phi_c \to e^{e}\Phi_c + W\varphi(e) + S_1(e^{e} - 1)` (from
  :math:`\varphi(u + e) = e^{e}\varphi(u) + \varphi(e) + u(e^{e} - 1)`), so :math:`c` stays
  near :math:`\mu = p\cdot\delta` where :math:`p` is concentrated;
* with values, :math:`\hat m`, :math:`\hat W` (online log-sum-exp of :math:`\hat s`) and
  :math:`\sum_j w_j v_j`, :math:`\sum_j \hat w_j \hat v_j` (float32 products, 3×tf32).

Then, with :math:`h = c - \mu = -S_1/W`: :math:`\mathrm{Fisher} = \tfrac12(S_2/W - h^2)`
(:math:`= \tfrac12(\sum_j p_j\delta_j^2 - (\sum_j p_j\delta_j)^2)`, shift-invariant) and
:math:`\mathrm{KL}(p\|\hat p) = \log(1 + \Phi_\mu/W)`, :math:`\Phi_\mu = e^{h}\Phi_c +
W(e^{h}(1 - h) - 1)` (exact: :math:`\sum_j p_j e^{x_j} = 1 + \sum_j p_j\varphi(x_j)` for
:math:`x = \delta - \mu`, since :math:`\sum_j p_j x_j = 0`). Where that sum is not finite
(deltas beyond ~88) the kernel runs again with :math:`\hat m, \hat W` and takes
:math:`\mathrm{lse}(\hat s) - \mathrm{lse}(s) - \mu`. ``tests/test_flips_masks.py`` and
``benchmarks/gpu_flips_check.py`` check the results against a dense float64 reference.

This module imports without Triton or CUDA; :func:`available` says whether the kernel can run.
Float32/float64 inputs are not sent here (they stay on the engine's float32/float64 path).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["available", "fused_metrics", "ENV"]

#: environment switch: ``auto`` (default: fused kernel on CUDA for bf16/fp16 when Triton is
#: importable) or ``never`` (always the torch path)
ENV = "KVTHEORY_FUSED"
_NEG = -1.0e30          # hidden logits: exp(_NEG - m) == 0, and hidden deltas are exactly 0
#: calls served by the kernel (tests and benchmarks check that it ran)
CALLS = [0]
#: the last compiled kernel launched (its ``n_regs``, ``n_spills`` for the benchmarks)
LAST: list = [None]
#: which parts of the full kernel run (1: softmax sums, 2: top-k; timing variants only)
PARTS = [3]
#: extra constexpr switches of the kernel (timing variants only)
TUNE: dict = {}

try:  # pragma: no cover - exercised on a CUDA machine only
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means: no kernel here
    triton = None
    tl = None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves a call on ``device`` with ``dtype`` inputs."""
    mode = os.environ.get(ENV, "auto")
    if mode not in ("auto", "never"):
        from .errors import bad_argument

        raise bad_argument(ENV, mode, "auto or never")
    return (mode == "auto" and triton is not None and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16))


if triton is not None:  # pragma: no cover - compiled and run on a CUDA machine only

    @triton.jit
    def _phi_poly(u):
        """e^u - 1 - u for |u| < 1: the series to u^10/10! (relative remainder < 6e-8)."""
        p = 1.0 + u * 0.1
        p = 1.0 + u * (1.0 / 9.0) * p
        p = 1.0 + u * 0.125 * p
        p = 1.0 + u * (1.0 / 7.0) * p
        p = 1.0 + u * (1.0 / 6.0) * p
        p = 1.0 + u * 0.2 * p
        p = 1.0 + u * 0.25 * p
        p = 1.0 + u * (1.0 / 3.0) * p
        return 0.5 * u * u * p

    @triton.jit
    def _phi(u):
        """e^u - 1 - u."""
        return tl.where(tl.abs(u) < 1.0, _phi_poly(u), tl.exp(u) - 1.0 - u)

    @triton.jit
    def _psi(h):
        """e^h (1 - h) - 1 (<= 0), accurate near 0 (series for |h| < 1/2)."""
        p = -1.0 / 5760.0
        p = -1.0 / 840.0 + h * p
        p = -1.0 / 144.0 + h * p
        p = -1.0 / 30.0 + h * p
        p = -0.125 + h * p
        p = -1.0 / 3.0 + h * p
        p = -0.5 + h * p
        return tl.where(tl.abs(h) < 0.5, h * h * p, tl.exp(h) * (1.0 - h) - 1.0)

    @triton.jit
    def _log1p(x):
        return tl.where(x < 1e-3, x * (1.0 - x * (0.5 - x * (1.0 / 3.0))), tl.log(1.0 + x))

    @triton.jit
    def _insert(ts, ti, kc, cur, cidx):
        """Each row's candidate ``cur`` (at ``cidx``) replaces the row's smallest kept entry
        (its first slot if several) when strictly larger."""
        kth = tl.min(ts, 1)
        mpos = tl.min(tl.where(ts == kth[:, None], kc[None, :], 1 << 20), 1)
        rep = (cur > kth)[:, None] & (kc[None, :] == mpos[:, None])
        return tl.where(rep, cur[:, None], ts), tl.where(rep, cidx[:, None], ti)

    @triton.jit
    def _topk_rest(ts, ti, kc, work, cur, cols):
        """Further rounds of the running top-k while some row's largest remaining entry
        ``cur`` of ``work`` beats its smallest kept one (after the block's first round)."""
        go = tl.max((cur > tl.min(ts, 1)).to(tl.int32), 0)
        while go > 0:
            cidx = tl.min(tl.where(work == cur[:, None], cols[None, :], 1 << 30), 1)
            ts, ti = _insert(ts, ti, kc, cur, cidx)
            work = tl.where(cols[None, :] == cidx[:, None], -3.0e38, work)
            cur = tl.max(work, 1)
            go = tl.max((cur > tl.min(ts, 1)).to(tl.int32), 0)
        return ts, ti

    @triton.jit
    def _topk_rest2(ts, ti, tsh, tih, kc, work, cur, workh, curh, cols):
        """:func:`_topk_rest` for the two running top-k at once (one loop, one test a round)."""
        go = tl.max(((cur > tl.min(ts, 1)) | (curh > tl.min(tsh, 1))).to(tl.int32), 0)
        while go > 0:
            cidx = tl.min(tl.where(work == cur[:, None], cols[None, :], 1 << 30), 1)
            ts, ti = _insert(ts, ti, kc, cur, cidx)
            work = tl.where(cols[None, :] == cidx[:, None], -3.0e38, work)
            cur = tl.max(work, 1)
            cidh = tl.min(tl.where(workh == curh[:, None], cols[None, :], 1 << 30), 1)
            tsh, tih = _insert(tsh, tih, kc, curh, cidh)
            workh = tl.where(cols[None, :] == cidh[:, None], -3.0e38, workh)
            curh = tl.max(workh, 1)
            go = tl.max(((cur > tl.min(ts, 1)) | (curh > tl.min(tsh, 1))).to(tl.int32), 0)
        return ts, ti, tsh, tih

    @triton.jit
    def _metrics_kernel(
        Q, K, KH, V, VH, KM, OUT,
        NQ, T, OFF, HQ, HKV, G, HM, KM_DIV, WINDOW, scale, N_OUT,
        D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KM: tl.constexpr,
        HAS_V: tl.constexpr, FULL: tl.constexpr, WITH_ZH: tl.constexpr,
        PARTS: tl.constexpr = 3, PHI_MODE: tl.constexpr = 0, REST: tl.constexpr = 2,
    ):
        # logits stay unscaled (raw q.k) in the loop; weights are exp2((s - m) * scale * log2 e)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        hk = h // G
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < NQ
        pos = rows + OFF
        dd = tl.arange(0, BD)
        q = tl.load(Q + (bh * NQ + rows[:, None]).to(tl.int64) * D + dd[None, :],
                    mask=rmask[:, None] & (dd[None, :] < D), other=0.0)
        kbase = (b * HKV + hk).to(tl.int64) * T
        pos_lo = pid_m * BLOCK_M + OFF
        pos_hi = pid_m * BLOCK_M + BLOCK_M - 1 + OFF    # may pass the last query: then > T - 1
        lo = 0
        hi = T
        if CAUSAL:
            hi = pos_hi + 1                             # columns >= T are masked
        if HAS_WINDOW:
            lo = (pos_lo - WINDOW + 1) // BLOCK_N * BLOCK_N   # columns < 0 are masked
        NEG: tl.constexpr = -1.0e30
        LOG2E: tl.constexpr = 1.4426950408889634
        a2 = scale * LOG2E
        m1 = tl.full([BLOCK_M], NEG, tl.float32)       # running max of s
        m2 = tl.full([BLOCK_M], NEG, tl.float32)       # running second of s (topk == 1 only)
        sh_at = tl.full([BLOCK_M], NEG, tl.float32)    # s^ at the first argmax of s
        mh = tl.full([BLOCK_M], NEG, tl.float32)       # running max of s^
        c = tl.zeros([BLOCK_M], tl.float32)            # reference delta (scaled)
        W = tl.zeros([BLOCK_M], tl.float32)
        S1 = tl.zeros([BLOCK_M], tl.float32)
        S2 = tl.zeros([BLOCK_M], tl.float32)
        PH = tl.zeros([BLOCK_M], tl.float32)
        ZH = tl.zeros([BLOCK_M], tl.float32)
        kc = tl.arange(0, KP)
        pad = tl.where(kc < TOPK, NEG, 3.0e38)          # padding slots are never the minimum
        ts = tl.zeros([BLOCK_M, KP], tl.float32) + pad[None, :]
        tsh = tl.zeros([BLOCK_M, KP], tl.float32) + pad[None, :]
        ti = tl.full([BLOCK_M, KP], -1, tl.int32)
        tih = tl.full([BLOCK_M, KP], -2, tl.int32)
        dv = tl.arange(0, BDV)
        o = tl.zeros([BLOCK_M, BDV], tl.float32)
        oh = tl.zeros([BLOCK_M, BDV], tl.float32)
        if HAS_KM:
            hm = h // KM_DIV
            kmbase = (b * HM + hm).to(tl.int64) * T
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = (cols < T) & (cols >= 0)
            kp = (kbase + cols[:, None]) * D + dd[None, :]
            kmk = cmask[:, None] & (dd[None, :] < D)
            k = tl.load(K + kp, mask=kmk, other=0.0)
            kh = tl.load(KH + kp, mask=kmk, other=0.0)
            s = tl.dot(q, tl.trans(k))
            sh = tl.dot(q, tl.trans(kh))
            need = (start + BLOCK_N > T) | (start < 0)
            if CAUSAL:
                need = need | (start + BLOCK_N - 1 > pos_lo)
            if HAS_WINDOW:
                need = need | (start <= pos_hi - WINDOW)
            if HAS_KM:
                need = True
            if need:
                vis = cmask[None, :] & rmask[:, None]
                if CAUSAL:
                    vis = vis & (cols[None, :] <= pos[:, None])
                if HAS_WINDOW:
                    vis = vis & (cols[None, :] > pos[:, None] - WINDOW)
                if HAS_KM:
                    km = tl.load(KM + kmbase + cols, mask=cmask, other=0)
                    vis = vis & (km[None, :] != 0)
                s = tl.where(vis, s, NEG)
                sh = tl.where(vis, sh, NEG)
            bm = tl.max(s, 1)
            bmh = tl.max(sh, 1)
            bi = tl.min(tl.where(s == bm[:, None], cols[None, :], 1 << 30), 1)
            at_bi = cols[None, :] == bi[:, None]
            sh_b = tl.max(tl.where(at_bi, sh, NEG), 1)
            sh_at = tl.where(bm > m1, sh_b, sh_at)
            if FULL and (PARTS & 1):
                # sums are about a reference delta c: the delta at the running top token
                # (moved with it, so c stays near the mean where p is concentrated)
                cn = tl.where(bm > m1, (sh_b - bm) * scale, c)
                e = c - cn
                c = cn
                m1n = tl.maximum(m1, bm)
                ls = (s - bm[:, None]) * a2
                w = tl.exp2(ls)                         # block-local weights, 1 at the top
                u = (sh - s) * scale - c[:, None]
                Wb = tl.sum(w, 1)
                t = w * u
                S1b = tl.sum(t, 1)
                S2b = tl.sum(t * u, 1)
                if PHI_MODE == 0:
                    if tl.max(tl.max(tl.abs(u), 1), 0) < 1.0:
                        PHb = tl.sum(w * _phi_poly(u), 1)
                    else:   # w (e^u - 1 - u) = e^(ls + u) - w (1 + u): no inf * 0
                        PHb = tl.sum(tl.where(tl.abs(u) < 1.0, w * _phi_poly(u),
                                              tl.exp2(ls + u * LOG2E) - w * (1.0 + u)), 1)
                elif PHI_MODE == 1:
                    PHb = tl.sum(tl.where(tl.abs(u) < 1.0, w * _phi_poly(u),
                                          tl.exp2(ls + u * LOG2E) - w * (1.0 + u)), 1)
                else:
                    PHb = tl.sum(w * _phi_poly(u), 1)
                alpha = tl.exp2((m1 - m1n) * a2)
                beta = tl.exp2((bm - m1n) * a2)
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
                    wh = tl.exp2((sh - mhn[:, None]) * a2)
                    ZH = ZH * ah + tl.sum(wh, 1)
                    if HAS_V:
                        vp = (kbase + cols[:, None]) * DV + dv[None, :]
                        vmk = cmask[:, None] & (dv[None, :] < DV)
                        vt = tl.load(V + vp, mask=vmk, other=0.0).to(tl.float32)
                        vht = tl.load(VH + vp, mask=vmk, other=0.0).to(tl.float32)
                        o = o * alpha[:, None] + tl.dot(w * beta[:, None], vt,
                                                        input_precision="tf32x3")
                        oh = oh * ah[:, None] + tl.dot(wh, vht, input_precision="tf32x3")
            if FULL and (PARTS & 2):
                if TOPK == 1:
                    s2 = tl.max(tl.where(at_bi, NEG, s), 1)
                    m2 = tl.maximum(tl.maximum(m2, s2), tl.minimum(m1, bm))
                # top-k of s (first round shares the argmax above) and of s^
                ts, ti = _insert(ts, ti, kc, bm, bi)
                work = tl.where(at_bi, -3.0e38, s)
                bih = tl.min(tl.where(sh == bmh[:, None], cols[None, :], 1 << 30), 1)
                tsh, tih = _insert(tsh, tih, kc, bmh, bih)
                workh = tl.where(cols[None, :] == bih[:, None], -3.0e38, sh)
                if REST == 1:
                    ts, ti = _topk_rest(ts, ti, kc, work, tl.max(work, 1), cols)
                    tsh, tih = _topk_rest(tsh, tih, kc, workh, tl.max(workh, 1), cols)
                elif REST == 2:
                    ts, ti, tsh, tih = _topk_rest2(ts, ti, tsh, tih, kc, work, tl.max(work, 1),
                                                   workh, tl.max(workh, 1), cols)
            m1 = tl.maximum(m1, bm)
            mh = tl.maximum(mh, bmh)
        base = OUT + bh.to(tl.int64) * NQ + rows
        tl.store(base, (sh_at < mh).to(tl.float32), mask=rmask)
        if FULL:
            d1 = S1 / W                                  # mu - c
            fisher = tl.maximum(0.5 * (S2 / W - d1 * d1), 0.0)
            hh = -d1
            php = tl.maximum(tl.exp(hh) * PH + W * _psi(hh), 0.0)   # sum_j w_j phi(delta_j - mu)
            kl = _log1p(php / W)
            if WITH_ZH:   # lse(s^) - lse(s) - mu where the series sum is not finite
                big = (mh - m1) * scale - (c + d1) + tl.log(ZH / W)
                kl = tl.where(kl < float("inf"), kl, tl.maximum(big, 0.0))
            if TOPK == 1:
                second = m2
            else:
                real = tl.where(kc[None, :] < TOPK, ts, NEG)
                top = tl.max(real, 1)
                slot = tl.min(tl.where(real == top[:, None], kc[None, :], 1 << 20), 1)
                second = tl.max(tl.where(kc[None, :] == slot[:, None], NEG, real), 1)
            hit = (ti[:, :, None] == tih[:, None, :]).to(tl.float32)
            overlap = tl.sum(tl.sum(hit, 2), 1)
            tl.store(base + N_OUT, (m1 - second) * scale, mask=rmask)
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


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel variant; benchmarks may override
CONFIG: dict[str, tuple[int, int, int, int]] = {
    "flip": (128, 64, 8, 3), "full": (64, 64, 4, 3), "values": (64, 32, 4, 2)}


def fused_metrics(q: Tensor, k: Tensor, k_hat: Tensor, v: Tensor | None, v_hat: Tensor | None,
                  key_mask: Tensor | None, *, causal: bool, window: int | None, scale: float,
                  topk: int, full: bool) -> dict[str, Tensor]:
    """Per-query metrics (``batch q_head query`` each, float32; ``flip`` bool) from the kernel.

    ``key_mask`` is ``None`` or (batch, mask_head, token) with mask_head 1, kv_head or q_head.
    Raw values: ``margin`` is :math:`s_{(1)} - s_{(2)}` and ``topk_overlap`` the number of
    shared indices; the caller clips them with the number of visible tokens.
    """
    if triton is None:  # pragma: no cover - guarded by available()
        raise RuntimeError("kvtheory._triton_metrics: Triton is not importable")
    B, Hq, Q, d = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    g = Hq // Hkv
    q, k, k_hat = (x.contiguous() for x in (q, k, k_hat))
    if k_hat.dtype != q.dtype or k.dtype != q.dtype:
        k, k_hat = k.to(q.dtype), k_hat.to(q.dtype)
    has_v = full and v is not None
    if has_v:
        v = v.contiguous()
        v_hat = v if v_hat is None else v_hat.contiguous()
        dvn = v.shape[-1]
    else:
        v = v_hat = q
        dvn = 16
    if key_mask is not None:
        km = key_mask.to(torch.int8).contiguous()
        hm = km.shape[1]
        km_div = Hq if hm == 1 else (1 if hm == Hq else g)
    else:
        km, hm, km_div = q, 1, 1
    n_out = 7 if has_v else (6 if full else 1)
    out = torch.empty(n_out, B * Hq * Q, dtype=torch.float32, device=q.device)
    name = "values" if has_v else ("full" if full else "flip")
    bm, bn, warps, stages = CONFIG[name]
    bd = max(16, triton.next_power_of_2(d))
    bdv = max(16, triton.next_power_of_2(dvn))
    kp = triton.next_power_of_2(max(topk, 2))
    grid = (triton.cdiv(Q, bm), B * Hq)

    def launch(with_zh: bool) -> None:
        LAST[0] = _metrics_kernel[grid](
            q, k, k_hat, v, v_hat, km, out,
            Q, T, T - Q, Hq, Hkv, g, hm, km_div, int(window or 0), float(scale), B * Hq * Q,
            D=d, DV=dvn, BD=bd, BDV=bdv, BLOCK_M=bm, BLOCK_N=bn, KP=kp, TOPK=topk,
            CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_KM=key_mask is not None,
            HAS_V=has_v, FULL=bool(full), WITH_ZH=bool(with_zh), num_warps=warps,
            num_stages=stages, **TUNE)

    launch(has_v)
    if full and not has_v and bool((~torch.isfinite(out[4]) & torch.isfinite(out[2])).any()):
        launch(True)    # a series sum overflowed (deltas beyond ~88): add lse(s^) for KL
    CALLS[0] += 1
    out = out.view(n_out, B, Hq, Q)
    res = {"flip": out[0] > 0.5}
    if full:
        res.update(margin=out[1], top1_prob=out[2], topk_overlap=out[3], kl=out[4],
                   fisher=out[5])
        if has_v:
            res["output_rel_err"] = out[6]
    return res

