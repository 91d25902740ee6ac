"""Where the fused metrics kernel's time goes, on the GPU machine: variants of its constexpr
switches (:mod:`kvtheory._triton_kernel`) and block shapes timed one after another with
``triton.testing.do_bench`` (medians) at a Mistral-7B layer's shape (32 query / 8 KV heads,
d=128, bf16, non-causal), beside the two bare bf16 matmuls. Each row also gives the fraction
of queries sent to the exact second pass. Writes JSON after every variant.

    PYTHONPATH=. python3 benchmarks/gpu_kernel_lab.py --out $OUT/lab.json --tokens 16384 \
        --variants default,loop,nosums
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench  # noqa: E402
from kvtheory.io import write_json  # noqa: E402

#: name -> (kernel kind, TUNE switches, block config of that kind, or {kind: config} (the key
#: "second_pass": False times the main kernel alone), or None for the default)
VARIANTS: dict[str, tuple[str, dict, tuple | None]] = {
    "flip": ("flip", {}, None),
    "default": ("full", {}, None),
    "loop": ("full", {"TOPK_MODE": 1}, None),
    "topk2": ("full", {"TOPK_MODE": 2}, None),
    "payload": ("full", {"PAYLOAD": True}, None),
    "loop_phi0": ("full", {"TOPK_MODE": 1, "PHI_MODE": 0}, None),
    "phi_exp": ("full", {"PHI_MODE": 4}, None),
    "phi_none": ("full", {"PHI_MODE": 5}, None),
    "notopk": ("full", {"TOPK_MODE": 0}, None),
    "nosums": ("full", {"SUMS": False}, None),
    "bare": ("full", {"SUMS": False, "TOPK_MODE": 0}, None),
    "cfg64x64w4s2": ("full", {}, (64, 64, 4, 2)),
    "cfg128x64w8s3": ("full", {}, (128, 64, 8, 3)),
    "cfg64x32w4s3": ("full", {}, (64, 32, 4, 3)),
    "cfg64x128w4s2": ("full", {}, (64, 128, 4, 2)),
    "cfg128x32w8s3": ("full", {}, (128, 32, 8, 3)),
    "cfg128x128w8s2": ("full", {}, (128, 128, 8, 2)),
    "cfg64x64w8s3": ("full", {}, (64, 64, 8, 3)),
    "cfg64x64w8s2": ("full", {}, (64, 64, 8, 2)),
    "cfg64x64w4s4": ("full", {}, (64, 64, 4, 4)),
    "cfg64x128w8s2": ("full", {}, (64, 128, 8, 2)),
    "cfg128x128w8s3": ("full", {}, (128, 128, 8, 3)),
    "notma": ("full", {"TMA": False}, None),
    "cfg64x32w4s3r168": ("full", {"maxnreg": 168}, (64, 32, 4, 3)),
    "cfg64x32w4s2r128": ("full", {"maxnreg": 128}, (64, 32, 4, 2)),
    "cfg64x64w4s2r168": ("full", {"maxnreg": 168}, (64, 64, 4, 2)),
    # the second pass's block shape (CONFIG["fix"]), timed with the whole call
    "fix64x32w4s3": ("full", {}, {"fix": (64, 32, 4, 3)}),
    "fix64x64w4s2": ("full", {}, {"fix": (64, 64, 4, 2)}),
    "fix128x64w8s3": ("full", {}, {"fix": (128, 64, 8, 3)}),
    # three programs an SM (shared memory of 2 stages, at most 160 registers a thread)
    "fix64x64w4s2r160": ("full", {}, {"fix": (64, 64, 4, 2, 160)}),
    "fix64x32w4s3r128": ("full", {}, {"fix": (64, 32, 4, 3, 128)}),
    # the second pass in one wave: 128 rows a program at 2 an SM, or 64 rows at 4 an SM
    "fix128x64w8s2r128": ("full", {}, {"fix": (128, 64, 8, 2, 128)}),
    "fix128x32w8s3r128": ("full", {}, {"fix": (128, 32, 8, 3, 128)}),
    "fix128x64w8s2": ("full", {}, {"fix": (128, 64, 8, 2)}),
    "fix64x32w4s2r128": ("full", {}, {"fix": (64, 32, 4, 2, 128)}),
    # the second pass from the first pass's thresholds (session 8): most blocks cost two row
    # maxima, so smaller row blocks (fewer rows, fewer blocks holding some row's top k) may pay
    "fix64x64w4s3r160": ("full", {}, {"fix": (64, 64, 4, 3, 160)}),
    "fix32x64w4s2": ("full", {}, {"fix": (32, 64, 4, 2)}),
    "fix16x64w4s2": ("full", {}, {"fix": (16, 64, 4, 2)}),
    "fix32x128w4s2": ("full", {}, {"fix": (32, 128, 4, 2)}),
    "fix64x128w4s2": ("full", {}, {"fix": (64, 128, 4, 2)}),
    # a candidates' pass before the rounds (slots a row; block shape; skipping empty blocks)
    "cand": ("full", {"CAND": 16}, None),
    "cand32": ("full", {"CAND": 32}, None),
    "candskip": ("full", {"CAND": 16, "CAND_SKIP": True}, None),
    "cand64x32": ("full", {"CAND": 16}, {"cand": (64, 32, 4, 3)}),
    # the main kernel alone (no second pass: flips and overlaps of flagged queries inexact)
    "nofix": ("full", {}, {"second_pass": False}),
    # session 9: flagged queries settled by rescanning their kept blocks or by the rounds over
    # all blocks; the rescan kernel's shapes
    "rounds": ("full", {"RESCAN": False}, None),
    "rescan": ("full", {"RESCAN": True}, None),
    "rescan64w8": ("full", {"RESCAN": True}, {"rescan": (64, 8, 2)}),
    "rescan64s1": ("full", {"RESCAN": True}, {"rescan": (64, 4, 1)}),
    "rescan32": ("full", {"RESCAN": True}, {"rescan": (32, 4, 2)}),
    # session 10: room for keys alike in runs (every query listed, bigger buckets, more
    # candidate slots a query): RESCAN_SIZES
    "rescanL32": ("full", {"RESCAN": True},
                  {"sizes": {"cap": 512, "cand": 32, "entries": 65536, "share": 1.0}}),
    "rescanL64": ("full", {"RESCAN": True},
                  {"sizes": {"cap": 512, "cand": 64, "entries": 65536, "share": 1.0}}),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="lab.json")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--base-tune", default="{}", help="JSON switches added to every variant")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the kernel alone, flips._run and attention_metrics")
    p.add_argument("--local", action="store_true",
                   help="keys alike in runs (a query's top keys come in runs inside one key "
                        "block, as in real attention) instead of independent random keys")
    a = p.parse_args()
    import triton.testing

    T, hq, hkv, d = a.tokens, 32, 8, 128
    q, k, kh = bench.flip_inputs(T, q_heads=hq, kv_heads=hkv, d=d, device="cuda",
                                 dtype=torch.bfloat16)
    if a.local:     # as tests/_kernel_interp.py's local keys, K^ = K + the same noise
        noise = kh - k
        k = (torch.cumsum(k.float(), 2) / torch.arange(1, T + 1, device="cuda").view(
            1, 1, T, 1).sqrt()).to(k.dtype)
        q = (q.float() + 2 * k.float().repeat_interleave(hq // hkv, 1)).to(q.dtype)
        kh = k + noise
    qg = q.reshape(1, hkv, hq // hkv * T, d)
    doc: dict = {"machine": bench.machine(), "tokens": T, "shape": [hq, hkv, d], "rows": {},
                 "local_keys": a.local}
    def matmuls() -> None:   # one after the other: at 32k one logit matrix is 69 GB
        torch.matmul(qg, k.mT)
        torch.matmul(qg, kh.mT)

    doc["matmul_ms"] = triton.testing.do_bench(matmuls, warmup=25, rep=a.rep_ms,
                                               return_mode="median")
    flops = bench.flip_flops(1, hq, T, T, d)
    print(f"T={T}: 2 bare bf16 matmuls {doc['matmul_ms']:.2f} ms", flush=True)
    base_cfg, second_pass, rescan = dict(tm.CONFIG), tm._second_pass, tm._rescan
    base_sizes = dict(tm.RESCAN_SIZES)
    for name in a.variants.split(","):
        kind, tune, cfg = VARIANTS[name]
        tm.TUNE.clear()
        tune = {**json.loads(a.base_tune), **tune}
        tm.TUNE.update(tune)
        tm.CONFIG.update(base_cfg)
        tm._second_pass, tm._rescan = second_pass, rescan
        tm.RESCAN_SIZES.update(base_sizes)
        if cfg:
            cfg = dict(cfg) if isinstance(cfg, dict) else {kind: cfg}
            tm.RESCAN_SIZES.update(cfg.pop("sizes", {}))
            if not cfg.pop("second_pass", True):
                tm._second_pass = tm._rescan = lambda *args: None
            tm.CONFIG.update(cfg)
        fn = (lambda: tm.fused_metrics(q, k, kh, None, None, None, causal=False, window=None,
                                       scale=d ** -0.5, topk=5, full=kind == "full"))
        try:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            comp = time.perf_counter() - t0
            ms = triton.testing.do_bench(fn, warmup=25, rep=a.rep_ms, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a variant may not compile (resources)
            doc["rows"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  {name}: {doc['rows'][name]['error']}", flush=True)
            traceback.print_exc()
            continue
        kern = tm.LAST[0]
        row = {"loads": tm.LOADS[0], "kind": kind, "tune": tune,
               "config": list(tm.CONFIG[kind]), "rescan_sizes": dict(tm.RESCAN_SIZES), "ms": ms,
               "ratio": ms / doc["matmul_ms"], "tflops": flops / ms / 1e9,
               "compile_s": comp, "n_regs": getattr(kern, "n_regs", None),
               "n_spills": getattr(kern, "n_spills", None),
               "second_pass": list(tm.second_pass_queries()) if kind == "full" else None,
               "rounds_pass": tm.rounds_pass_queries() if kind == "full" else None,
               "rescan": tm.rescan_queries() if kind == "full" else None}
        doc["rows"][name] = row
        sp = tm.second_pass_queries()
        print(f"  {name:16s} {ms:7.2f} ms  {row['ratio']:5.2f}x  {row['tflops']:5.0f} TFLOP/s  "
              f"regs {row['n_regs']} spills {row['n_spills']}  compile {comp:4.1f} s  "
              f"second pass {sp[0]}/{sp[1]}, rounds {row['rounds_pass']}, rescan "
              f"{row['rescan']}", flush=True)
        write_json(a.out, doc, arg="--out")
        tm.SECOND_PASS[:] = [None, 0, None, None]
    tm.TUNE.clear()
    tm.CONFIG.update(base_cfg)
    tm.RESCAN_SIZES.update(base_sizes)
    tm._second_pass, tm._rescan = second_pass, rescan
    if a.breakdown:   # where attention_metrics spends its time beyond the kernel
        from kvtheory import flips

        tm.TUNE.update(json.loads(a.base_tune))     # (the variants' shared switches)

        opts = (False, None, d ** -0.5, None)
        fns = {"kernel (fused_metrics, with the second pass)": lambda: tm.fused_metrics(
                   q, k, kh, None, None, None, causal=False, window=None, scale=d ** -0.5,
                   topk=5, full=True),
               "flips._run (+ visibility, clipping)": lambda: flips._run(
                   q, k, kh, None, opts, full=True, topk=5),
               "attention_metrics (+ validation, aggregation)": lambda: flips.attention_metrics(
                   q, k, kh, causal=False)}
        doc["breakdown_ms"] = {n: triton.testing.do_bench(f, warmup=25, rep=a.rep_ms,
                                                         return_mode="median")
                               for n, f in fns.items()}
        for n, ms in doc["breakdown_ms"].items():
            print(f"  {n:48s} {ms:7.2f} ms", flush=True)
    tm.TUNE.clear()
    write_json(a.out, doc, arg="--out")
    print(json.dumps({n: round(r.get("ms", -1), 2) for n, r in doc["rows"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
