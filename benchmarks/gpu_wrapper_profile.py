"""Where ``attention_metrics`` spends its time beyond the fused kernel, on the GPU machine:
``do_bench`` medians of its steps (validation, the kernel with its second pass, ``flips._run``,
aggregation) at a Mistral-7B layer's shape, then a torch profiler table of one call (CUDA
kernels and the host-side operators that wait on the device).

    PYTHONPATH=. python3 benchmarks/gpu_wrapper_profile.py --out $OUT/wrapper.txt --tokens 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench, flips  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="wrapper.txt")
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    import triton.testing

    T, hq, hkv, d = a.tokens, 32, 8, 128
    q, k, kh = bench.flip_inputs(T, q_heads=hq, kv_heads=hkv, d=d, device="cuda",
                                 dtype=torch.bfloat16)
    steps = {
        "validate": lambda: _validate(q, k, kh),
        "fused_metrics (kernel + second pass)": lambda: tm.fused_metrics(
            q, k, kh, None, None, None, causal=False, window=None, scale=d ** -0.5, topk=5,
            full=True),
        "flips._run": lambda: flips._run(q, k, kh, None, (False, None, d ** -0.5, None),
                                         full=True, topk=5),
        "attention_metrics": lambda: flips.attention_metrics(q, k, kh, causal=False),
    }
    lines = [f"T={T}, 32/8 heads, d=128, bf16, non-causal; do_bench medians (ms)"]
    for name, fn in steps.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median")
        lines.append(f"  {name:40s} {ms:8.3f}")
        print(lines[-1], flush=True)
    lines += ["", *host_split(q, k, kh)]
    print("\n".join(lines[-8:]), flush=True)
    from torch.profiler import ProfilerActivity, profile

    flips.attention_metrics(q, k, kh, causal=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flips.attention_metrics(q, k, kh, causal=False)
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "cpu_time_total"):
        lines += ["", f"profile of 3 calls, by {key}:",
                  prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)]
    lines += ["", *steps_timeline(q, k, kh, Path(a.out).with_suffix(".trace.json"))]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-4:]))
    return 0


def steps_timeline(q, k, kh, trace: Path) -> list[str]:
    """One ``attention_metrics`` call in a profiler trace, its steps marked: for each step its
    host time, the device time of the kernels that ran inside it, and the device's idle time
    there (host work the GPU waited for)."""
    import json

    from torch.profiler import ProfilerActivity, profile, record_function

    from kvtheory import _triton_metrics as tm

    names = {(flips, "_validate"): "validate", (flips, "_visibility"): "visibility",
             (tm, "fused_metrics"): "fused_metrics", (tm, "_second_pass"): "second pass",
             (flips, "_aggregate"): "aggregate"}
    saved = {key: getattr(*key) for key in names}

    def marked(fn, label):
        def run(*args, **kw):
            with record_function("step:" + label):
                return fn(*args, **kw)
        return run

    try:
        for (mod, attr), label in names.items():
            setattr(mod, attr, marked(saved[(mod, attr)], label))
        sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
        flips.attention_metrics(q, k, kh, causal=False)
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
        with profile(activities=acts) as prof:
            with record_function("step:attention_metrics"):
                flips.attention_metrics(q, k, kh, causal=False)
            sync()
    finally:
        for key, fn in saved.items():
            setattr(*key, fn)
    prof.export_chrome_trace(str(trace))
    ev = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
                     if e.get("cat") == "kernel" and "dur" in e)
    steps = [(e["name"][5:], e["ts"], e["ts"] + e["dur"]) for e in ev
             if str(e.get("name", "")).startswith("step:") and e.get("ph") == "X"]
    out = ["one call, steps (host microseconds; device busy inside; device idle inside):"]
    for name, t0, t1 in sorted(steps, key=lambda x: x[1]):
        busy = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b, _ in kernels)
        out.append(f"  {name:20s} host {t1 - t0:9.1f}  device busy {busy:9.1f}  "
                   f"idle {t1 - t0 - busy:9.1f}")
    out.append("kernels of the call (start relative to the call, microseconds):")
    call = [s for s in steps if s[0] == "attention_metrics"]
    t_call = call[0][1] if call else 0.0
    for a, b, name in kernels:
        out.append(f"  {a - t_call:9.1f} +{b - a:8.1f}  {name[:70]}")
    return out


def host_split(q, k, kh, reps: int = 30) -> list[str]:
    """``attention_metrics``'s three parts, timed on the host (``perf_counter``) and on the
    device (CUDA events recorded between them), medians over ``reps`` calls: validation (ends
    with a sync), ``flips._run`` (queues the kernels, no sync) and aggregation (one transfer,
    so it waits for the kernels); the whole call from the first event to the last."""
    import statistics
    import time

    d = q.shape[-1]
    rows: dict[str, list[float]] = {}
    for _ in range(reps):
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        t = [time.perf_counter()]
        ev[0].record()
        args, _ = _validate(q, k, kh, defer=False)
        t.append(time.perf_counter())
        ev[1].record()
        per, valid, nv = flips._run(*args[:5], full=True, topk=5)
        t.append(time.perf_counter())
        ev[2].record()
        flips._aggregate(per, valid, nv, *args[7:], group=q.shape[1] // k.shape[1], topk=5,
                         keep=False, fused=flips._on_kernel(args[0]))
        t.append(time.perf_counter())
        ev[3].record()
        torch.cuda.synchronize()
        for i, name in enumerate(("validate", "_run (queue)", "aggregate (waits)")):
            rows.setdefault(name, []).append((1e3 * (t[i + 1] - t[i]),
                                              ev[i].elapsed_time(ev[i + 1])))
        rows.setdefault("whole call", []).append((1e3 * (t[3] - t[0]), ev[0].elapsed_time(ev[3])))
    out = [f"attention_metrics split, medians of {reps} calls (ms; host perf_counter, device "
           f"events between the parts; d={d})"]
    for name, v in rows.items():
        out.append(f"  {name:20s} host {statistics.median(x for x, _ in v):8.3f}  device "
                   f"{statistics.median(y for _, y in v):8.3f}")
    return out


def _validate(q, k, kh, defer=True):
    return flips._validate(q, k, kh, None, None, False, None, None, 5, flips.MARGIN_BINS,
                           flips.PROB_BINS, None, defer=defer)


if __name__ == "__main__":
    sys.exit(main())
