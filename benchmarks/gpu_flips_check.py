"""On a CUDA machine: the fused Triton metrics kernel against the float64 references, then its
block configurations and its speed.

1. **Equality.** ``attention_metrics(..., return_per_query=True)`` with bf16 inputs on CUDA (the
   fused kernel, :mod:`kvtheory._triton_metrics`) against the engine's CPU float64 path on the
   same bf16 values upcast, and against a dense float64 reference (``tests/_dense_flips.py``,
   run on the GPU in float64) that also gives the top-1 gaps: a flip that differs is counted as
   at a near-tie when a gap it depends on is within ``tie_tol`` (float32 rounding of the
   logits). Causal and not, sliding window, key masks shared / per KV head / per query head,
   values, ``topk=1``.
2. **Configurations.** ``triton.testing.do_bench`` medians of the kernel variants' block sizes
   at the 7B shape (32 query / 8 KV heads, d=128, bf16, non-causal) and T=16,384.
3. **Speed.** ``bench.case_flips`` side by side with the two bare bf16 matmuls at the 7B shape.

Variants of the kernel's switches are timed by ``benchmarks/gpu_kernel_lab.py``.

Writes ``--out`` (JSON, after each step) and prints a summary.

    PYTHONPATH=. python3 benchmarks/gpu_flips_check.py --out $OUT/gpu_flips.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from _dense_flips import dense_metrics  # noqa: E402
from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench, flips  # noqa: E402
from kvtheory.io import write_json  # noqa: E402

#: per-query tolerance |fused - ref| <= RTOL |ref| + ATOL max(1, max|q||k|/sqrt(d)): float32
#: rounding of logits of that size (the inputs are bf16 values, exact in both)
RTOL, ATOL = 1e-4, 2e-7
NAMES = ("margin", "top1_prob", "topk_overlap", "kl", "fisher", "output_rel_err")


def compare(label: str, *, T: int = 2048, Q: int | None = None, B: int = 2, hq: int = 8,
            hkv: int = 2, d: int = 128, causal: bool = True, window: int | None = None,
            mask: str | None = None, values: bool = False, topk: int = 5, cpu_ref: bool = True,
            seed: int = 0, dtype: torch.dtype = torch.bfloat16, local: bool = False,
            tune: dict | None = None, pairs: bool = False, huge: float = 0.0,
            sizes: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    Q = T if Q is None else Q
    q = torch.randn(B, hq, Q, d, generator=g)
    k = torch.randn(B, hkv, T, d, generator=g)
    if local:   # neighbouring keys alike: a query's top keys come in runs (real attention)
        k = torch.cumsum(k, 2) / torch.arange(1, T + 1).view(1, 1, T, 1).sqrt()
        q = q + 2 * k[:, :, T - Q:].repeat_interleave(hq // hkv, 1)
    q = q.to(dtype)
    from kvtheory.quantize import quantize

    if pairs:   # tokens 2i and 2i+1 share a key (every block's top s is tied), not K^
        k = k[:, :, : (T + 1) // 2].repeat_interleave(2, dim=2)[:, :, :T]
        kh = (quantize(k, 4) + 0.01 * torch.randn(k.shape, generator=g)).to(dtype)
    else:
        kh = quantize(k, 4).to(dtype)
    if huge:    # deltas of ~huge logits: the series sum overflows, a second run with lse
        kh = (kh.float() + huge * torch.randn(k.shape, generator=g)).to(dtype)
    k = k.to(dtype)
    v = vh = None
    if values:
        v = torch.randn(B, hkv, T, d, generator=g).to(dtype)
        vh = quantize(v.float(), 4).to(dtype)
    km = None
    if mask == "shared":
        km = torch.rand(B, T, generator=g) > 0.2
    elif mask == "kv":
        km = torch.rand(B, hkv, T, generator=g) > 0.4
    elif mask == "q":
        km = torch.rand(B, hq, T, generator=g) > 0.4
    kw = dict(causal=causal, window=window, key_mask=km, topk=topk)
    cuda = [None if x is None else x.cuda() for x in (q, k, kh, v, vh)]
    kmc = None if km is None else km.cuda()
    os.environ.pop("KVTHEORY_FUSED", None)
    calls = tm.CALLS[0]
    tm.TUNE.clear()
    tm.TUNE.update(tune or {})
    saved = dict(tm.RESCAN_SIZES)
    tm.RESCAN_SIZES.update(sizes or {})      # the rescan's room (lists, buckets, slots)
    try:
        m = flips.attention_metrics(*cuda, **{**kw, "key_mask": kmc}, return_per_query=True)
        torch.cuda.synchronize()
    finally:
        tm.RESCAN_SIZES.update(saved)
    second = list(tm.second_pass_queries()) + [tm.rounds_pass_queries(), tm.rescan_queries()]
    tm.TUNE.clear()
    out: dict = {"label": label, "dtype": str(dtype).removeprefix("torch."), "T": T, "Q": Q,
                 "B": B, "heads": f"{hq}/{hkv}", "d": d,
                 "causal": causal, "window": window, "mask": mask, "values": values,
                 "topk": topk, "fused_calls": tm.CALLS[0] - calls, "local_keys": local,
                 "tune": tune or {}, "rescan_sizes": {**saved, **(sizes or {})},
                 "second_pass_queries": second}
    out.update(aggregation_check(m))
    fused = {n: getattr(m.per_query, n) for n in NAMES if getattr(m.per_query, n) is not None}
    fused = {n: x.double().cpu() for n, x in fused.items()}
    fused["flip"] = m.per_query.flip.cpu()
    ref = dense_metrics(*[None if x is None else x.cuda().double() for x in (q, k, kh, v, vh)],
                        causal=causal, window=window, key_mask=kmc, topk=topk)
    ref = {n: x.cpu() for n, x in ref.items()}
    refs = {"dense64": ref}
    if cpu_ref:
        c = flips.attention_metrics(*[None if x is None else x.double() for x in
                                      (q, k, kh, v, vh)], **kw, return_per_query=True)
        refs["cpu64"] = {n: getattr(c.per_query, n) for n in NAMES
                         if getattr(c.per_query, n) is not None}
        refs["cpu64"]["flip"] = c.per_query.flip
    valid = ref["valid"]
    logit_scale = float(ref["margin"][torch.isfinite(ref["margin"])].abs().max()) if valid.any() \
        else 1.0
    smax = float((q.double().norm(dim=-1).max() * k.double().norm(dim=-1).max()) / math.sqrt(d))
    tie_tol = 1e-5 * max(1.0, smax)
    out["tie_tol"] = tie_tol
    out["tolerance"] = {"rtol": RTOL, "atol": ATOL * max(1.0, smax)}
    out["valid_pairs"] = int(valid.sum())
    for rname, r in refs.items():
        res = {}
        for n in NAMES:
            if n not in fused or n not in r:
                continue
            x, y = fused[n][valid], r[n][valid]
            fin = torch.isfinite(y)
            same_inf = bool((torch.isfinite(x) == fin).all())
            err = (x[fin] - y[fin]).abs()
            rel = err / y[fin].abs().clamp_min(1e-6)
            tol = RTOL * y[fin].abs() + ATOL * max(1.0, smax)
            res[n] = {"max_abs": float(err.max()) if err.numel() else 0.0,
                      "max_rel": float(rel.max()) if rel.numel() else 0.0,
                      "out_of_tol": int((err > tol).sum()),
                      "same_infinite": same_inf}
            if n == "topk_overlap":     # a top-k set may differ at a near-tie of its k-th
                far = ((ref["gap_ks"] > tie_tol) & (ref["gap_ksh"] > tie_tol))[valid][fin]
                res[n]["out_of_tol_not_near_tie"] = int(((err > tol) & far).sum())
        diff = (fused["flip"] != r["flip"]) & valid
        near = ((ref["gap_s"] <= tie_tol) | ((ref["gap_flip"] <= tie_tol) & (ref["gap_flip"] > 0))
                | ((ref["gap_flip"] == 0) & (ref["gap_sh"] <= tie_tol)))
        res["flip_differ"] = int(diff.sum())
        res["flip_differ_not_near_tie"] = int((diff & ~near).sum())
        res["near_ties"] = int((near & valid).sum())
        res["flip_rate_fused"] = float(fused["flip"][valid].double().mean())
        res["flip_rate_ref"] = float(r["flip"][valid].double().mean())
        out[rname] = res
    # flip_rate (the flip-only kernel variant) against the dense reference's per-head rates
    calls = tm.CALLS[0]
    fr = flips.flip_rate(*cuda[:3], causal, key_mask=kmc, window=window).double()
    out["flip_rate_fused_calls"] = tm.CALLS[0] - calls
    w = valid.double()
    fr_ref = (ref["flip"].double() * w).sum((0, 2)) / w.sum((0, 2))
    out["flip_rate_fn_max_abs"] = float((fr - fr_ref).abs().max())
    ok = all(out[r]["flip_differ_not_near_tie"] == 0 for r in refs)
    ok &= out["flip_rate_fn_max_abs"] == 0.0 or out["dense64"]["near_ties"] > 0
    ok &= out["flip_rate_fused_calls"] >= 1
    for r in refs:
        for n in ("top1_prob", "topk_overlap", "kl", "fisher", "output_rel_err"):
            if n in out[r]:
                bad = out[r][n].get("out_of_tol_not_near_tie", out[r][n]["out_of_tol"])
                ok &= bad == 0 and out[r][n]["same_infinite"]
        if "margin" in out[r]:
            ok &= out[r]["margin"]["max_abs"] <= 10 * tie_tol and out[r]["margin"]["same_infinite"]
    ok &= out["aggregate_max_rel"] <= 1e-9 and out["strata_differ"] == 0
    out["pass"] = bool(ok and out["fused_calls"] >= 1)
    out["logit_scale"] = logit_scale
    return out


def aggregation_check(m) -> dict:
    """The call's means and strata (aggregated on the GPU, kvtheory/_triton_aggregate.py)
    against the same from its per-query values on the CPU in float64: means over the pairs
    that count (finite KL), strata by ``torch.bucketize``."""
    pq = m.per_query
    counted = torch.isfinite(pq.kl.double().cpu())                   # (batch, head, query)
    n = counted.sum((0, 2)).double()
    rel = 0.0
    for name in ("flip", "topk_overlap", "kl", "fisher", "output_rel_err"):
        x = getattr(pq, name)
        if x is None:
            continue
        x = torch.where(counted, x.double().cpu(), 0.0).sum((0, 2)) / n
        got = getattr(m, "flip_rate" if name == "flip" else name)
        ok = torch.isfinite(x)
        rel = max(rel, float(((got[ok] - x[ok]).abs() / x[ok].abs().clamp_min(1e-300)).max()))
    differ = 0
    flips_ = (pq.flip.cpu() & counted)
    for key, edges, cname, fname in (("margin", m.margin_edges, "margin_counts", "margin_flips"),
                                     ("top1_prob", m.prob_edges, "prob_counts", "prob_flips")):
        x = getattr(pq, key).cpu()
        bins = torch.bucketize(x, torch.tensor(edges[1:-1], dtype=x.dtype), right=True)
        nb = len(edges) - 1
        onehot = (bins.unsqueeze(-1) == torch.arange(nb)) & counted.unsqueeze(-1)
        differ += int((onehot.sum((0, 2)) != getattr(m, cname)).sum())
        differ += int(((onehot & flips_.unsqueeze(-1)).sum((0, 2)) != getattr(m, fname)).sum())
    return {"aggregate_max_rel": rel, "strata_differ": differ}


def sweep(T: int = 16384, hq: int = 32, hkv: int = 8, d: int = 128) -> dict:
    import triton.testing

    q, k, kh = bench.flip_inputs(T, q_heads=hq, kv_heads=hkv, d=d, device="cuda",
                                 dtype=torch.bfloat16)
    grid = {"full": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2),
                     (64, 32, 4, 3), (128, 64, 8, 3)],
            "flip": [(128, 64, 8, 3), (256, 64, 8, 3), (256, 32, 8, 3), (128, 32, 4, 3)]}
    qg = q.reshape(1, hkv, hq // hkv * T, d)
    res: dict = {"T": T, "matmul_ms": triton.testing.do_bench(
        lambda: (torch.matmul(qg, k.mT), torch.matmul(qg, kh.mT)), warmup=50, rep=300,
        return_mode="median")}
    default = dict(tm.CONFIG)
    for name, cfgs in grid.items():
        full = name == "full"
        best = None
        for cfg in cfgs:
            tm.CONFIG[name] = cfg
            t0 = time.perf_counter()
            try:
                fn = (lambda: tm.fused_metrics(q, k, kh, None, None, None, causal=False,
                                               window=None, scale=d ** -0.5, topk=5,
                                               full=full))
                fn()
                torch.cuda.synchronize()
                comp = time.perf_counter() - t0
                ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a config may not compile (resources)
                res[f"{name}{cfg}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            kern = tm.LAST[0]
            res[f"{name}{cfg}"] = {"ms": ms, "compile_s": comp, "ratio": ms / res["matmul_ms"],
                                   "n_regs": getattr(kern, "n_regs", None),
                                   "n_spills": getattr(kern, "n_spills", None)}
            print(f"  {name} {cfg}: {ms:.2f} ms ({ms / res['matmul_ms']:.2f}x), compile "
                  f"{comp:.1f} s, regs {getattr(kern, 'n_regs', '?')}, spills "
                  f"{getattr(kern, 'n_spills', '?')}", flush=True)
            if best is None or ms < best[1]:
                best = (cfg, ms)
        res[f"best_{name}"] = best
        tm.CONFIG[name] = best[0] if best else default[name]
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_flips.json")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip", default="", help="comma-separated steps to skip: check,sweep,speed")
    p.add_argument("--tokens", default="16384,32768")
    p.add_argument("--labels", default="",
                   help="comma-separated words: only the equality cases whose label has one")
    p.add_argument("--no-cpu-ref", action="store_true",
                   help="only the dense float64 reference on the GPU (faster)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    doc: dict = {"machine": bench.machine(), "checks": [], "cases": [], "errors": []}

    def save():
        doc["elapsed_s"] = time.perf_counter() - t0
        doc["config"] = {k: list(v) for k, v in tm.CONFIG.items()}
        doc["tune"] = dict(tm.TUNE)
        write_json(args.out, doc, arg="--out")

    def step(name, fn):
        print(f"[check] {name}", flush=True)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            doc["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        finally:
            torch.cuda.empty_cache()
            save()

    if "check" not in skip:
        cases = [
            dict(label="causal", causal=True),
            dict(label="non-causal", causal=False),
            dict(label="causal, Q<T", Q=1000),
            dict(label="window 300", window=300),
            dict(label="key mask shared", mask="shared"),
            dict(label="key mask per KV head + window", mask="kv", window=500),
            dict(label="key mask per query head", mask="q", causal=False),
            dict(label="values", values=True),
            dict(label="values, per-KV-head mask", values=True, mask="kv"),
            dict(label="topk=1, d=64, 6/1 heads", topk=1, d=64, hq=6, hkv=1),
            dict(label="T=4096 no CPU ref", T=4096, B=1, cpu_ref=False),
            dict(label="local keys (second pass), causal", local=True),
            dict(label="local keys, one-pass loop (TOPK_MODE 1)", local=True,
                 tune={"TOPK_MODE": 1}),
            dict(label="kernel before: PHI_MODE 0", tune={"PHI_MODE": 0}),
            dict(label="index lists: TOPK_MODE 2", tune={"TOPK_MODE": 2}),
            dict(label="keys in equal pairs (tied top of s), topk 4", pairs=True, topk=4,
                 causal=False),
            dict(label="huge deltas (overflow: second run with log-sum-exps)", huge=40.0),
            dict(label="s^ at the top carried by the reduction (PAYLOAD)", tune={"PAYLOAD": True}),
            dict(label="PAYLOAD, keys in equal pairs", pairs=True, topk=4, causal=False,
                 tune={"PAYLOAD": True}),
            dict(label="local keys, rounds for every flagged query (RESCAN off)", local=True,
                 tune={"RESCAN": False}),
            dict(label="rescan of kept blocks, causal", tune={"RESCAN": True}),
            dict(label="rescan, local keys", local=True, tune={"RESCAN": True}),
            dict(label="rescan, values, per-KV-head mask", values=True, mask="kv",
                 tune={"RESCAN": True}),
            dict(label="rescan, keys in equal pairs, topk 4", pairs=True, topk=4, causal=False,
                 tune={"RESCAN": True}),
            dict(label="rescan, T=4096, window 300, per-KV-head mask (no CPU ref)", T=4096,
                 B=1, window=300, mask="kv", cpu_ref=False, tune={"RESCAN": True}),
            dict(label="rescan, T=4096, local keys (no CPU ref)", T=4096, B=1, local=True,
                 cpu_ref=False, tune={"RESCAN": True}),
            dict(label="rescan with room for runs (every query listed, buckets of 512, 32 "
                 "slots), T=4096, local keys (no CPU ref)", T=4096, B=1, local=True,
                 cpu_ref=False, tune={"RESCAN": True},
                 sizes={"cap": 512, "cand": 32, "entries": 65536, "share": 1.0}),
            dict(label="rescan with room for runs, local keys", local=True,
                 tune={"RESCAN": True},
                 sizes={"cap": 512, "cand": 32, "entries": 65536, "share": 1.0}),
        ]
        words = [w for w in args.labels.split(",") if w]
        for c in cases:
            if words and not any(w in c["label"] for w in words):
                continue
            if args.no_cpu_ref:
                c = {**c, "cpu_ref": False}
            r = step(f"equality {c['label']}", lambda c=c: compare(**c))
            if r is not None:
                doc["checks"].append(r)
                print(f"  {r['label']}: pass={r['pass']} second pass "
                      f"{r['second_pass_queries']} flip_rate |diff| "
                      f"{r['flip_rate_fn_max_abs']:.2e} " + "; ".join(
                    f"{ref}: flips differ {r[ref]['flip_differ']} (not near tie "
                    f"{r[ref]['flip_differ_not_near_tie']}), kl rel {r[ref]['kl']['max_rel']:.2e}, "
                    f"fisher rel {r[ref]['fisher']['max_rel']:.2e}" for ref in ("dense64", "cpu64")
                    if ref in r), flush=True)
    if "sweep" not in skip:
        doc["sweep"] = step("config sweep", sweep)
    if "speed" not in skip:
        for T in [int(t) for t in args.tokens.split(",")]:
            res = step(f"speed T={T}", lambda T=T: bench.case_flips(
                tokens=T, q_heads=32, kv_heads=8, d=128, device="cuda", dtype=torch.bfloat16,
                reps=args.reps, fp32_row=False, torch_row=T <= 16384))
            if res is not None:
                doc["cases"].append(res)
                print(bench.table_text(res["rows"]), flush=True)
    save()
    n_pass = sum(c["pass"] for c in doc["checks"])
    print(f"checks passed {n_pass}/{len(doc['checks'])}; errors {len(doc['errors'])}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0 if not doc["errors"] and n_pass == len(doc["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
