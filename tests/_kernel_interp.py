"""The fused Triton metrics kernel (kvtheory/_triton_kernel.py) run by Triton's interpreter on the
CPU, against the dense float64 reference (tests/_dense_flips.py): a subprocess of
``tests/test_triton_interpreter.py`` (``TRITON_INTERPRET`` must be set before Triton decorates
the kernel). Prints one JSON object: per case, the largest error of each metric over its
tolerance, the flips and top-k overlaps that differ, and the queries the kernel sent to its
exact second pass.

fp16 inputs (the interpreter has no bf16); small blocks so that a few tokens span many key blocks.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

if __name__ == "__main__":   # the tests import CASES from here and must not inherit the switch
    os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402
import triton.runtime.interpreter as _interp  # noqa: E402

_patch = _interp._patch_lang_tensor


def _patched(tensor, scope):  # Triton 3.6's interpreter: int() of a 1-element array (NumPy 2)
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interp._patch_lang_tensor = _patched

from _dense_flips import dense_metrics, dense_visibility  # noqa: E402
from tol import tol  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402

NAMES = ("margin", "top1_prob", "kl", "fisher", "output_rel_err")

_RESCAN = {"RESCAN": True}
#: label -> options (eps: size of the key perturbation; local: neighbouring keys alike, so the
#: top keys of a query come in runs inside one key block, as in real attention)
CASES = {
    "causal, int4-like delta": dict(eps=0.05),
    "tiny delta (short series)": dict(eps=0.002),
    "large delta (exponential form)": dict(eps=0.8),
    "huge delta (log-sum-exp fallback)": dict(eps=40.0),
    "local keys (second pass)": dict(local=True),
    "non-causal, values": dict(causal=False, values=True),
    "window + per-KV-head mask, batch 2": dict(window=40, mask="kv", B=2),
    "shared mask, topk 1": dict(mask="shared", topk=1),
    "topk 10 > block maxima": dict(topk=10),
    "one-pass exact top-k (TOPK_MODE 1)": dict(local=True, tune={"TOPK_MODE": 1}),
    "index lists (TOPK_MODE 2), T 256": dict(T=256, tune={"TOPK_MODE": 2}),
    "T 256": dict(T=256),
    "through attention_metrics, window + shared mask": dict(api=True, window=40, mask="shared"),
    "huge delta through attention_metrics (second run)": dict(api=True, eps=40.0),
    "keys in equal pairs (tied top of s), topk 4": dict(pairs=True, topk=4, causal=False),
    "keys in equal pairs, topk 1 (thresholds at the top)": dict(pairs=True, topk=1,
                                                                causal=False),
    "candidates' pass before the rounds (CAND 16)": dict(tune={"CAND": 16}),
    "candidates' pass, local keys, empty blocks skipped": dict(
        local=True, tune={"CAND": 16, "CAND_SKIP": True}),
    "kernel before (PHI_MODE 0)": dict(eps=0.8, tune={"PHI_MODE": 0}),
    "s^ at the top carried by the reduction (PAYLOAD), pairs": dict(
        pairs=True, topk=4, causal=False, tune={"PAYLOAD": True}),
    "PAYLOAD, local keys, window": dict(local=True, window=40, tune={"PAYLOAD": True}),
    "pointer loads (TMA off), causal window": dict(window=40, tune={"TMA": False}),
    "per-query-head mask, values, batch 2": dict(mask="q", values=True, B=2, causal=False),
    # the rescan of kept blocks (topk 2 over 4 key blocks: full lists, real thresholds)
    "rescan, topk 2, T 256, s^ far from s": dict(T=256, topk=2, eps=0.6, tune=_RESCAN),
    "rescan, topk 2, T 256, window + per-KV-head mask, batch 2, local keys": dict(
        T=256, topk=2, window=150, mask="kv", B=2, local=True, tune=_RESCAN),
    "rescan, topk 2, T 256, per-query-head mask, values": dict(
        T=256, topk=2, mask="q", values=True, causal=False, tune=_RESCAN),
    "rescan, local keys (runs: more candidates than slots, most to the rounds)": dict(
        local=True, tune=_RESCAN),
    "rescan, keys in equal pairs (tied top of s), topk 4": dict(
        pairs=True, topk=4, causal=False, tune=_RESCAN),
    "rescan with no room (buckets, slots, list): all to the rounds": dict(
        T=256, topk=2, sizes={"cap": 1, "cand": 2, "entries": 40, "share": 0.0},
        tune=_RESCAN),
    "rounds for every flagged query (RESCAN off)": dict(T=256, topk=2,
                                                        tune={"RESCAN": False}),
    "keys repeated half a sequence later (alike kept values of two blocks), topk 2, T 256":
        dict(T=256, topk=2, repeat=True, causal=False, tune=_RESCAN),
    "a tie then a larger block maximum (one block kept twice: a key lost), topk 3": dict(
        topk=3, collapse=True, causal=False, B=3, tune=_RESCAN),
}


def run_case(eps=0.05, causal=True, window=None, mask=None, values=False, topk=5, local=False,
             tune=None, T=128, B=1, hq=4, hkv=2, d=32, seed=0, pairs=False, api=False,
             sizes=None, repeat=False, collapse=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, T, d, generator=g)
    k = torch.randn(B, hkv, T, d, generator=g)
    if local:
        k = torch.cumsum(k, 2) / torch.arange(1, T + 1).view(1, 1, T, 1).sqrt()
        q = q + 2 * k.repeat_interleave(hq // hkv, 1)
    if pairs:   # tokens 2i and 2i+1 share a key: every block's largest s is tied; not K^
        k = k[:, :, : (T + 1) // 2].repeat_interleave(2, dim=2)[:, :, :T]
    if repeat:  # the second half copies the first: equal block maxima of s in two blocks
        k[:, :, T // 2:] = k[:, :, : T // 2]
    if collapse:    # s_j = k_j0: block maxima 5, 3, 3, 4, 4.5 (16-key blocks), the rest near
        # -1; the top 3 keep 5, 3, 3, then 4 replaces both 3s and 4.5 both 4s: the first pass
        # keeps 5, 4.5, 4.5 and has lost the 4 (no tie left in the exact top 3)
        q = torch.zeros_like(q)
        q[..., 0] = 1.0
        k = k * 0.1
        k[..., 0] -= 1.0
        for j, x in ((0, 5.0), (16, 3.0), (32, 3.0), (48, 4.0), (64, 4.5)):
            k[:, :, j, 0] = x
    kh = k + eps * torch.randn(k.shape, generator=g)
    v = vh = None
    if values:
        v = torch.randn(B, hkv, T, d, generator=g)
        vh = v + 0.1 * torch.randn(v.shape, generator=g)
    km = None
    if mask == "shared":
        km = torch.rand(B, 1, T, generator=g) > 0.2
    elif mask == "kv":
        km = torch.rand(B, hkv, T, generator=g) > 0.4
    elif mask == "q":
        km = torch.rand(B, hq, T, generator=g) > 0.4
    x16 = [None if x is None else x.half() for x in (q, k, kh, v, vh)]
    tm.TUNE.clear()
    tm.TUNE.update(tune or {})
    default_sizes = dict(tm.RESCAN_SIZES)
    tm.RESCAN_SIZES.update(sizes or {})
    kernel_calls = None
    if api:     # the whole attention_metrics call on the kernel (as on CUDA): per query
        from kvtheory import flips

        available, calls = tm.available, tm.CALLS[0]
        tm.available = lambda device, dtype: True
        try:
            per = flips.attention_metrics(*x16[:3], causal=causal, window=window, topk=topk,
                                          key_mask=None if km is None else km.squeeze(1)
                                          if km.shape[1] == 1 else km,
                                          return_per_query=True).per_query
        finally:
            tm.available = available
        assert tm.CALLS[0] > calls, "attention_metrics did not run the kernel"
        kernel_calls = tm.CALLS[0] - calls
        vis, _ = dense_visibility(B, hq, hkv, T, T, causal, window, km, "cpu")
        keff = vis.sum(-1).clamp(1, topk).float()
        res = {"flip": per.flip, "margin": per.margin, "top1_prob": per.top1_prob,
               "kl": per.kl, "fisher": per.fisher,
               "topk_overlap": (per.topk_overlap * keff).round().nan_to_num(0.0)}
    else:
        kw = dict(causal=causal, window=window, scale=d ** -0.5, topk=topk, full=True)
        res = tm.fused_metrics(*x16, km, **kw)
        if bool((~torch.isfinite(res["kl"]) & torch.isfinite(res["top1_prob"])).any()):
            res = tm.fused_metrics(*x16, km, **kw, zh=True)
    tm.TUNE.clear()
    tm.RESCAN_SIZES.update(default_sizes)
    ref = dense_metrics(*[None if x is None else x.double() for x in x16], causal=causal,
                        window=window, key_mask=km, topk=topk)
    valid = ref["valid"]
    smax = float(q.half().double().norm(dim=-1).max() * k.half().double().norm(dim=-1).max()
                 / math.sqrt(d))
    rtol, atol = tol("fused_kernel")
    atol *= max(1.0, smax)
    out = {"second_pass": list(tm.second_pass_queries()), "rounds": tm.rounds_pass_queries(),
           "rescan": tm.rescan_queries(),
           "errors": {}, "loads": tm.LOADS[0],
           "kernel_calls": kernel_calls}
    for n in NAMES:
        if n not in res:
            continue
        a, b = res[n].double(), ref[n]
        sel = valid & torch.isfinite(b) & ((b < 1e20) if n == "margin" else True)
        excess = ((a - b).abs() - (rtol * b.abs() + atol))[sel]
        out["errors"][n] = float(excess.max())    # <= 0: within tolerance
    vis, _ = dense_visibility(B, hq, hkv, T, T, causal, window, km, "cpu")
    keff = vis.sum(-1).clamp(1, topk)
    hits = (ref["topk_overlap"] * keff).round()       # shared indices, as the kernel counts
    out["overlap_differ"] = int((res["topk_overlap"].double() != hits)[valid].sum())
    tie = 1e-5 * max(1.0, smax)
    # a near-tie as in benchmarks/gpu_flips_check.py: the top two of s, a flip by a hair, or an
    # unflipped query whose top two of s^ are that close
    gap_flip = ref["gap_flip"]
    near = ((ref["gap_s"] <= tie) | ((gap_flip <= tie) & (gap_flip > 0))
            | ((gap_flip == 0) & (ref["gap_sh"] <= tie)))
    out["near_ties"] = int((near & valid).sum())
    out["flips_differ"] = int(((res["flip"] != ref["flip"]) & valid).sum())
    out["flips_differ_not_near_tie"] = int(((res["flip"] != ref["flip"]) & valid & ~near).sum())
    out["queries"] = int(valid.sum())
    return out


def aggregate_case(B, Hkv, g, Q, values, seed, empty_head=False, bins=None):
    """The aggregation table of one Triton launch (``tm.aggregate``) against the torch one
    (``flips._table``) on random per-query metrics: infinite margins, invalid queries, rows
    that see no token, optionally a head that sees nothing and other bin edges. Returns the
    largest relative difference of the sums and the counts that differ."""
    from kvtheory import flips

    gen = torch.Generator().manual_seed(seed)
    shape = (B, Hkv, g, Q)
    per = {n: torch.rand(shape, generator=gen) for n in ("topk_overlap", "kl", "fisher",
                                                          "top1_prob")}
    per["top1_prob"][..., ::5] = 1.0                 # on the last edge: the last bin
    per["margin"] = torch.rand(shape, generator=gen) * 3
    per["margin"][..., ::7] = math.inf
    per["flip"] = torch.rand(shape, generator=gen) > 0.7
    if values:
        per["output_rel_err"] = torch.rand(shape, generator=gen)
    valid = torch.rand(B, Q, generator=gen) > 0.1
    nv = (torch.rand(B, Hkv, 1, Q, generator=gen) * 3).long()
    if empty_head:
        nv[:, 0] = 0
    nv = nv.expand(shape)               # strides of 0, as _visibility gives them
    m_edges, p_edges = bins or (flips.MARGIN_BINS, flips.PROB_BINS)
    inner = [flips._inner_edges(e, torch.float32, torch.device("cpu")) for e in (m_edges,
                                                                                p_edges)]
    flat = {n: x.reshape(B, Hkv * g, Q) for n, x in per.items()}
    names = [m for m in ("flip", "topk_overlap", "kl", "fisher", "output_rel_err") if m in per]
    vmask = valid.unsqueeze(1) & (nv.reshape(B, Hkv * g, Q) > 0)
    ref = flips._table(flat, valid, vmask, names, inner).flatten()
    parts = tm.aggregate(flat, valid, nv, *inner)
    got = parts.sum(0)       # the parts' tables added up
    width = (ref.numel() - 1) // (Hkv * g)
    sums = torch.zeros(ref.numel(), dtype=torch.bool)
    sums[:-1].view(-1, width)[:, 1:1 + len(names)] = True
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-300))[sums]
    return {"shape": list(parts.shape[1:]) == list(ref.shape), "parts": parts.shape[0],
            "sums_rel": float(rel.max()),
            "counts_differ": int((got != ref)[~sums].sum()), "counted": int(ref[-1])}


AGGREGATE = {
    "batch 1, 2/2 heads": dict(B=1, Hkv=2, g=2, Q=100, values=False, seed=0),
    "batch 2, 3/2 heads, values, 700 queries (two blocks)": dict(B=2, Hkv=3, g=2, Q=700,
                                                                 values=True, seed=1),
    "a head that sees nothing": dict(B=2, Hkv=2, g=1, Q=64, values=False, seed=2,
                                     empty_head=True),
    "other bins": dict(B=1, Hkv=1, g=4, Q=300, values=True, seed=3,
                       bins=((0.0, 0.25, 1.0, math.inf), (0.0, 0.5, 1.0))),
    "three parts of the (batch, query) pairs, batch 2": dict(B=2, Hkv=2, g=2, Q=3000,
                                                             values=False, seed=4),
}


def main() -> int:
    if sys.argv[1:] == ["--aggregate"]:
        print(json.dumps({label: aggregate_case(**kw) for label, kw in AGGREGATE.items()}))
        return 0
    for name in ("full", "values", "fix", "cand", "flip"):
        tm.CONFIG[name] = (32, 16, 4, 1)
    tm.CONFIG["rescan"], tm.CONFIG["pick"] = (32, 4, 1), (32, 4)
    only = set(sys.argv[1:])
    print(json.dumps({label: run_case(**kw) for label, kw in CASES.items()
                      if not only or label in only}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
