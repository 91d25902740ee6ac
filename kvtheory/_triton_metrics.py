r"""Fused attention-fidelity metrics on CUDA (Triton): one kernel, FlashAttention-style.

Each program takes ``BLOCK_M`` queries of one query head and streams the key blocks its
queries can see (causal, sliding window, key mask), computing both logit tiles
:math:`S = \tau QK^\top` and :math:`\hat S = \tau Q\hat K^\top` on tensor cores (bf16/fp16
inputs, float32 accumulation). Nothing of size ``query × token`` is written: per query it
keeps, online,

* the first argmax of :math:`s`, :math:`\hat s` at it and :math:`\max \hat s` (flip);
* each key block's largest and second largest :math:`s` and :math:`\hat s` (one reduction,
  ties counted): the running second largest :math:`s` (margin), a running top-k list of
  :math:`s` holding :math:`\hat s` at its entries and a list of the ``topk`` largest
  :math:`\hat s`, in one pass: each block contributes its row maxima, and the largest
  *second* entry of any block is kept. The lists are the exact top-k unless that second entry
  reaches the k-th kept value (two of a query's top k in one block of 64 keys); the overlap is
  the number of kept :math:`s` entries whose :math:`\hat s` reaches the k-th largest
  :math:`\hat s`, the number of shared indices when that value is not tied. Such queries (5%
  at T = 16,384 on random logits, all of them when neighbouring keys are alike), and those
  whose top :math:`s` is tied within its block (:math:`\hat s` is then taken at the first
  index), are flagged and get their flip and overlap from a second, exact pass over those
  queries alone (:func:`_second_pass`: index lists, each block inserting entries while some
  row's next largest beats its k-th, a data-dependent loop; the lists start just below the
  k-th values the first pass kept, which k distinct keys reach, so most blocks insert
  nothing);
* :math:`m = \max s` and :math:`W = \sum_j w_j`, :math:`w_j = e^{s_j - m}` (one ``exp2`` per
  logit, the scale folded in), and about a reference :math:`c` the sums
  :math:`S_1 = \sum_j w_j u_j`, :math:`S_2 = \sum_j w_j u_j^2` and
  :math:`\Phi_c = \sum_j w_j\varphi(u_j)`, :math:`u_j = \delta_j - c`,
  :math:`\delta = \hat s - s`, :math:`\varphi(u) = e^u - 1 - u \ge 0` (per key block by
  :math:`U = \max|u|`: the series :math:`u^2\sum_{n \le N} u^n/(n+2)!` in Horner form with
  :math:`N` = 3, 6 or 8 for :math:`U` < 1/16, 1/2 or 1, each with a relative
  error in :math:`\varphi` under :math:`6.3\cdot 10^{-8}`, about half a float32 unit; beyond,
  per logit the series where :math:`|u| < 1` and :math:`e^{\ln w_j + u_j} - w_j(1 + u_j)`
  elsewhere, no :math:`0\cdot\infty`).
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
The kernel's source is :mod:`kvtheory._triton_kernel`; ``tests/test_triton_interpreter.py`` runs
it on the CPU in Triton's interpreter against the dense reference, and
``benchmarks/KERNEL_NOTES.md`` records how it was made fast and what is left.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["available", "fused_mode", "torch_path", "fused_metrics", "aggregate",
           "second_pass_queries", "ENV"]

#: environment switch: ``auto`` (default: fused kernel on CUDA for bf16/fp16 when Triton is
#: importable; :mod:`kvtheory._triton_quant` reads it too) or ``never`` (always the torch path)
ENV = "KVTHEORY_FUSED"
#: calls served by the kernel (tests and benchmarks check that it ran)
CALLS = [0]
#: the last compiled kernel launched (its ``n_regs``, ``n_spills`` for the benchmarks)
LAST: list = [None]
#: extra constexpr switches of the kernel (``SUMS``, ``TOPK_MODE``, ``PHI_MODE``: timing and
#: accuracy variants, see :mod:`kvtheory._triton_kernel`)
TUNE: dict = {}
#: how the last call loaded its key tiles: ``"tma"`` (tensor descriptors) or ``"pointers"``
LOADS = ["pointers"]
#: the last call's per-head numbers of queries listed for the rounds over all key blocks (or
#: None), its number of queries, with ``TUNE["CAND"]`` the per-head numbers left to the
#: rounds after the candidates' pass (or None), and with the rescan the counts of its list
#: (entries, all flagged queries; or None): :func:`second_pass_queries` and
#: :func:`rounds_pass_queries` read them
SECOND_PASS: list = [None, 0, None, None]

try:  # pragma: no cover - exercised on a CUDA machine (or Triton's interpreter) only
    import triton

    from ._triton_aggregate import aggregate_kernel
    from ._triton_kernel import metrics_kernel
    from ._triton_rescan import pick_kernel, rescan_kernel
except Exception:  # noqa: BLE001 - any import failure means: no kernel here
    triton = None
    metrics_kernel = aggregate_kernel = pick_kernel = rescan_kernel = None
try:  # pragma: no cover - Triton >= 3.3: tiles of K and K^ by the tensor memory accelerator
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # noqa: BLE001
    TensorDescriptor = None


def fused_mode() -> str:
    """The switch :data:`ENV` of every Triton kernel here (metrics and :mod:`kvtheory.quantize`'s):
    ``"auto"`` (unset) or ``"never"``; any other value is refused."""
    mode = os.environ.get(ENV, "auto")
    if mode not in ("auto", "never"):
        from .errors import bad_argument

        raise bad_argument(ENV, mode, "auto or never")
    return mode


@contextlib.contextmanager
def torch_path():
    """Inside the block the torch paths serve every call (``KVTHEORY_FUSED=never``); the
    variable is restored as it was after it (benchmarks time both paths side by side)."""
    old = os.environ.get(ENV)
    os.environ[ENV] = "never"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves a call on ``device`` with ``dtype`` inputs."""
    mode = fused_mode()
    return (mode == "auto" and triton is not None and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16))


#: (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) per kernel variant; benchmarks may
#: override
CONFIG: dict[str, tuple[int, ...]] = {
    "flip": (128, 64, 8, 3), "full": (64, 64, 4, 3), "values": (64, 32, 4, 2),
    "fix": (64, 64, 4, 2, 160),     # three programs an SM (2 stages of shared memory)
    "cand": (64, 64, 4, 3), "rescan": (64, 4, 2), "pick": (64, 4)}
#: whether flagged queries go to the rescan of their kept blocks by default (``TUNE["RESCAN"]``
#: overrides; off: the rounds over all key blocks): on since session 9, 19.50 against 20.15 ms
#: on an H100 at T = 16,384 (68b5f28; benchmarks/KERNEL_NOTES.md)
RESCAN_DEFAULT = True
#: the rescan's sizes (:mod:`kvtheory._triton_rescan`): queries a bucket (``cap``), candidate
#: slots a query (``cand``), and its list's entries: ``entries`` or an ``share`` of all queries,
#: whichever is more (queries beyond go to the rounds); tests shrink them
RESCAN_SIZES: dict[str, float] = {"cap": 128, "cand": 16, "entries": 1 << 16, "share": 0.125}


def fused_metrics(q: Tensor, k: Tensor, k_hat: Tensor, v: Tensor | None, v_hat: Tensor | None,
                  key_mask: Tensor | None, *, causal: bool, window: int | None, scale: float,
                  topk: int, full: bool, zh: bool = False,
                  while_running: Callable[[], list[Tensor]] | None = None
                  ) -> dict[str, Tensor]:
    r"""Per-query metrics (``batch q_head query`` each, float32; ``flip`` bool) from the kernel.

    ``key_mask`` is ``None`` or (batch, mask_head, token) with mask_head 1, kv_head or q_head.
    Raw values: ``margin`` is :math:`s_{(1)} - s_{(2)}` and ``topk_overlap`` the number of
    shared indices; the caller clips them with the number of visible tokens. Queries whose
    one-pass top-k the kernel cannot vouch for (a key block holding two of the top k, or a
    tied top logit) get their overlap and flip from a second, exact pass over those queries
    alone. Nothing waits for the GPU: the work is queued and the host returns, so the
    caller's own work overlaps the kernel. Where a series sum overflowed (deltas beyond ~88)
    the KL of that query is not finite: call again with ``zh=True`` (the kernel then also sums
    :math:`e^{\hat s}` and takes the KL from the log-sum-exps there). ``while_running`` is
    called right after the main kernel's launch (``flips._run``: the visibility tensors and
    the range check); on CUDA its launches go to a side stream that runs beside the kernel,
    and the tensors it returns are then used on this stream.
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
    tune = dict(TUNE)
    mode = tune.get("TOPK_MODE", 3)
    # the kernel lists each head's flagged queries: count (atomic adds) and rows
    count = rows = None
    if full and (mode == 3 or (mode == 2 and topk > 1)):
        count = torch.zeros(B * Hq, dtype=torch.int32, device=q.device)
        rows = torch.empty(B * Hq * Q, dtype=torch.int32, device=q.device)
    name = "values" if has_v else ("full" if full else "flip")
    bm, bn, warps, stages, *nreg = CONFIG[name]
    resc = _rescan_buffers(B * Hq, Q, T, bn, q.device) if (
        count is not None and mode == 3 and tune.setdefault("RESCAN", RESCAN_DEFAULT)) else None
    tune["RESCAN"] = resc is not None
    SECOND_PASS[:] = [count, B * Hq * Q, None, None if resc is None else resc["count2"]]
    common = dict(D=d, DV=dvn, BD=max(16, triton.next_power_of_2(d)),
                  BDV=max(16, triton.next_power_of_2(dvn)), BLOCK_N=bn,
                  KP=triton.next_power_of_2(max(topk, 2)), TOPK=topk, CAUSAL=bool(causal),
                  HAS_WINDOW=window is not None, HAS_KM=key_mask is not None,
                  num_warps=warps, num_stages=stages)
    args = (Q, T, T - Q, Hq, Hkv, g, hm, km_div, int(window or 0), float(scale), B * Hq * Q,
            *((resc["entries"], resc["cap"]) if resc else (1, 1)))
    r = resc or {}
    lists = [r.get(n, out) for n in ("ci", "cs", "ch", "count2", "rows2", "bc", "bk", "cc")]

    descs = _descriptors(k, k_hat, bn, common["BD"], tune)
    tune["TMA"] = descs[0] is not None
    LOADS[0] = "tma" if tune["TMA"] else "pointers"
    with_zh = has_v or zh     # with values the kernel needs the sums of e^(s^) anyway
    ready = torch.cuda.current_stream(q.device).record_event() if q.is_cuda else None
    LAST[0] = metrics_kernel[(triton.cdiv(Q, bm), B * Hq)](
        q, k, k_hat, v, v_hat, km, out, out if count is None else count,
        out if rows is None else rows, *lists, *descs, *args,
        BLOCK_M=bm, HAS_V=has_v, FULL=bool(full), WITH_ZH=with_zh, FIX=False,
        **{**common, **dict(zip(["maxnreg"], nreg)), **tune})
    if while_running is not None:   # work queued beside the kernel
        with _beside(ready) as made:
            made.extend(while_running())
    if resc is not None:
        _rescan(resc, (count, rows), (q, k, k_hat, km, out), args, common, B * Hq, descs)
    if count is not None:
        _second_pass((count, rows), (q, k, k_hat, km, out), args, common, B * Hq, Q, descs)
    CALLS[0] += 1
    out = out.view(n_out, B, Hq, Q)
    res = {"flip": out[0] > 0.5}
    if full:
        res.update(margin=out[1], top1_prob=out[2], topk_overlap=out[3], kl=out[4],
                   fisher=out[5])
        if has_v:
            res["output_rel_err"] = out[6]
    return res


def aggregate(per: dict[str, Tensor], valid: Tensor, nv: Tensor, m_inner: Tensor,
              p_inner: Tensor) -> Tensor:
    r"""The flip engine's aggregation table in one launch (:mod:`kvtheory._triton_aggregate`
    states its layout; :func:`kvtheory.flips._table` makes the same by torch operations).

    ``per``: (batch, q_head, query) tensors ``flip`` (bool), ``topk_overlap``, ``kl``,
    ``fisher``, ``margin``, ``top1_prob`` and optionally ``output_rel_err``; ``valid``
    (batch, query) bool; ``nv`` (batch, kv_head, g, query) visible tokens (any strides);
    ``m_inner``, ``p_inner`` the inner bin edges in the dtype of the binned metrics.
    Returns the tables of the parts of the (batch, query) pairs, (part, head·width + 1)
    float64 on the device, without waiting for them; their sum over parts is the table.
    """
    flip = per["flip"]
    B, H, Q = flip.shape
    has_oe = "output_rel_err" in per
    nem, nep = m_inner.numel(), p_inner.numel()
    width = 1 + (5 if has_oe else 4) + 2 * (nem + 1) + 2 * (nep + 1)
    block = 512
    parts = max(1, min(32, triton.cdiv(B * Q, 4 * block)))    # a few blocks a program
    chunk = triton.cdiv(triton.cdiv(B * Q, parts), block) * block
    parts = triton.cdiv(B * Q, chunk)
    table = torch.empty(parts, H * width + 1, dtype=torch.float64, device=flip.device)
    x = {n: per[n].contiguous() for n in ("topk_overlap", "kl", "fisher", "margin",
                                            "top1_prob")}
    aggregate_kernel[(H, parts)](
        flip.contiguous(), x["topk_overlap"], x["kl"], x["fisher"],
        per["output_rel_err"].contiguous() if has_oe else x["kl"], x["margin"],
        x["top1_prob"], valid.contiguous(), nv, m_inner, p_inner, table, B, H, Q,
        H // nv.shape[1], *nv.stride(), chunk, HAS_OE=has_oe, NEM=nem,
        NEP_M=triton.next_power_of_2(nem + 1), NEPR=nep, NEP_P=triton.next_power_of_2(nep + 1),
        BLOCK=block, num_warps=4)
    return table


def rounds_pass_queries() -> int:
    """Queries of the last call that went on to the rounds over all key blocks (waits for the
    GPU)."""
    count, _, count2, _ = SECOND_PASS
    rounds = count2 if count2 is not None else count
    return 0 if rounds is None else int(rounds.sum())


def rescan_queries() -> int:
    """Queries of the last call settled by the rescan of their kept blocks (waits for the
    GPU): the flagged queries less those listed for the rounds."""
    count, _, _, resc = SECOND_PASS
    if resc is None:
        return 0
    return second_pass_queries()[0] - int(count.sum())


def second_pass_queries() -> tuple[int, int]:
    """Queries of the last call sent to the exact second pass (the rescan or the rounds), and
    all its queries (waits for the GPU; for tests and benchmarks)."""
    count, total, _, resc = SECOND_PASS
    if resc is not None:
        return int(resc[1]), int(total)
    return (0 if count is None else int(count.sum())), int(total)


@contextlib.contextmanager
def _beside(ready):
    """Yields a list for the tensors made inside. On CUDA (``ready``: an event of the current
    stream, recorded before the kernel's launch) the launches inside go to a side stream that
    starts at ``ready``, so they run beside the kernel instead of after it; the current stream
    then waits for them, and the tensors in the list are marked as used by it (the caching
    allocator must not hand their memory to the side stream again before that)."""
    made: list = []
    if ready is None:
        yield made
        return
    cur = torch.cuda.current_stream()
    side = _side_stream(cur.device)
    side.wait_event(ready)
    with torch.cuda.stream(side):
        yield made
    cur.wait_stream(side)
    for t in made:
        if isinstance(t, Tensor) and t.is_cuda:
            t.record_stream(cur)


@functools.cache
def _side_stream(device: torch.device):
    """One side stream a device, made once."""
    return torch.cuda.Stream(device)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, asked once."""
    return torch.cuda.get_device_capability(device)


def _descriptors(k: Tensor, k_hat: Tensor, bn: int, bd: int, tune: dict) -> tuple:
    """Tensor descriptors of ``k`` and ``k_hat`` as (batch·kv_head·token, d) matrices with
    (``bn``, ``bd``) tiles, for loads by the tensor memory accelerator (Hopper on; the
    interpreter emulates them), or ``(None, None)`` where they do not apply: no descriptor
    class in this Triton, ``TUNE["TMA"]`` false, rows not 16-byte multiples, a base not
    16-byte aligned, a pre-Hopper GPU."""
    if TensorDescriptor is None or not tune.get("TMA", True):
        return None, None
    if k.is_cuda and _capability(k.device)[0] < 9:
        return None, None
    d = k.shape[-1]
    if (d * k.element_size()) % 16 or k.data_ptr() % 16 or k_hat.data_ptr() % 16:
        return None, None
    return tuple(TensorDescriptor(x, [x.numel() // d, d], [d, 1], [bn, bd]) for x in (k, k_hat))


def _second_pass(lists: tuple[Tensor, Tensor], tensors: tuple, args: tuple, common: dict,
                 n_bh: int, Q: int, descs: tuple) -> None:
    r"""The exact flip and top-k overlap (one-pass loop, first indices) of the flagged queries,
    written into ``out``: program :math:`j\,n_{bh} + bh` takes entries :math:`j\,` ``BLOCK_M``
    onwards of head :math:`bh`'s list (``lists``: the counts and rows the main kernel wrote);
    the grid is fixed (no host sync), the programs past a head's count skip every key block,
    and the busy ones (small :math:`j`) come first in launch order. ``descs``: the main
    kernel's tensor descriptors where its key tiles have this pass's shape."""
    q, k, k_hat, km, out = tensors
    count, rows = lists

    def tiles(bn: int) -> tuple:     # the main kernel's descriptors where the tiles match
        if bn == common["BLOCK_N"]:
            return descs
        return _descriptors(k, k_hat, bn, common["BD"], dict(TUNE))

    grid = (triton.cdiv(Q, CONFIG["fix"][0]) * n_bh,)
    fixed = dict(HAS_V=False, FULL=True, WITH_ZH=False, FIX=True, SUMS=False, TOPK_MODE=1)
    # TUNE["CAND"] (a variant, off: 22.3 ms against 20.1 on an H100, benchmarks/KERNEL_NOTES.md):
    # a candidates' pass with that many slots a row first, the rounds only for rows with more
    cap = TUNE.get("CAND", 0)
    cap = cap if n_bh * Q * cap < 2 ** 31 else 0     # the kernel's slot offsets are int32
    if cap:     # the candidates' pass; rows with more candidates than slots: list 2
        bm, bn, warps, stages, *nreg = CONFIG["cand"]
        ci = torch.empty(n_bh * Q * cap, dtype=torch.int32, device=q.device)
        cs, ch = (torch.empty(n_bh * Q * cap, dtype=torch.float32, device=q.device)
                  for _ in range(2))
        count2 = torch.zeros_like(count)
        rows2 = torch.empty_like(rows)
        SECOND_PASS[2] = count2
        cd = tiles(bn)
        metrics_kernel[(triton.cdiv(Q, bm) * n_bh,)](
            q, k, k_hat, q, q, km, out, count, rows, ci, cs, ch, count2, rows2, out, out, out,
            *cd, *args,
            BLOCK_M=bm, CAND=cap, CAND_SKIP=TUNE.get("CAND_SKIP", False),
            TMA=cd[0] is not None, **fixed,
            **{**common, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages,
               **dict(zip(["maxnreg"], nreg))})
        count, rows = count2, rows2
    bm, bn, warps, stages, *nreg = CONFIG["fix"]
    descs = tiles(bn)
    metrics_kernel[grid](
        q, k, k_hat, q, q, km, out, count, rows, out, out, out, out, out, out, out, out,
        *descs, *args,
        BLOCK_M=bm, TMA=descs[0] is not None, **fixed,
        **{**common, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages,
           **dict(zip(["maxnreg"], nreg))})


def _rescan_buffers(n_bh: int, Q: int, T: int, bn: int, device: torch.device) -> dict:
    """The rescan's buffers (:mod:`kvtheory._triton_rescan`) for ``n_bh`` heads of ``Q``
    queries over ``T`` tokens in blocks of ``bn``: the counters zeroed in one launch."""
    sizes = RESCAN_SIZES
    cap, cand = int(sizes["cap"]), int(sizes["cand"])
    entries = min(n_bh * Q, max(int(sizes["entries"]), int(n_bh * Q * sizes["share"])),
                  (2 ** 31 - 1) // cand)
    nb = triton.cdiv(T, bn)
    zeros = torch.zeros(2 + n_bh * nb + entries, dtype=torch.int32, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return {"count2": zeros[:2], "bc": zeros[2:2 + n_bh * nb], "cc": zeros[2 + n_bh * nb:],
            "rows2": torch.empty(entries, **i32), "bk": torch.empty(n_bh * nb * cap, **i32),
            "ci": torch.empty(entries * cand, **i32),
            "cs": torch.empty(entries * cand, dtype=torch.float32, device=device),
            "ch": torch.empty(entries * cand, dtype=torch.float32, device=device),
            "entries": entries, "cap": cap, "cand": cand, "nb": nb}


def _rescan(resc: dict, lists: tuple[Tensor, Tensor], tensors: tuple, args: tuple,
            common: dict, n_bh: int, descs: tuple) -> None:
    """The rescan of the flagged queries' kept blocks (:mod:`kvtheory._triton_rescan`): one
    program a (head, key block) appends candidates, one a ``BLOCK_M`` entries picks the flip and
    overlap; entries it cannot settle join the rounds' ``lists``. Fixed grids, no host sync."""
    q, k, k_hat, km, out = tensors
    count, rows = lists
    NQ, T, OFF, HQ, HKV, G, HM, KM_DIV, WINDOW, _, N_OUT, LB, CAP = args
    bm, warps, stages = CONFIG["rescan"]
    rescan_kernel[(resc["nb"] * n_bh,)](
        q, k, k_hat, km, out, resc["rows2"], resc["bc"], resc["bk"], resc["cc"], resc["ci"],
        resc["cs"], resc["ch"], *descs, NQ, T, OFF, HQ, HKV, G, HM, KM_DIV, WINDOW, N_OUT, CAP,
        D=common["D"], BD=common["BD"], BLOCK_M=bm, BLOCK_N=common["BLOCK_N"],
        CAND=resc["cand"], CAUSAL=common["CAUSAL"], HAS_WINDOW=common["HAS_WINDOW"],
        HAS_KM=common["HAS_KM"], TMA=descs[0] is not None, num_warps=warps, num_stages=stages)
    bm, warps = CONFIG["pick"]
    pick_kernel[(triton.cdiv(LB, bm),)](
        out, count, rows, resc["count2"], resc["rows2"], resc["cc"], resc["ci"], resc["cs"],
        resc["ch"], NQ, N_OUT, LB, TOPK=common["TOPK"], CAND=resc["cand"], BLOCK_M=bm,
        num_warps=warps)
