"""Benchmark cases ``flips`` (the flip engine against its two bare matmuls) and ``memory`` (peak
memory of one ``attention_metrics`` call), and the measured matmul peak; part of
:mod:`kvtheory.bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ..errors import KVTheoryError, bad_argument
from ..timing import Timing, side_by_side, sync
from .rows import (
    _GIB,
    TARGETS,
    _as_dtype,
    _dtype_name,
    _met,
    _target_text,
    case_result,
    flip_flops,
    make_row,
    ratio_row,
)


def flip_inputs(tokens: int, *, q_heads: int = 9, kv_heads: int = 3, d: int = 64, batch: int = 1,
                device: Any = "cpu", dtype: Any = torch.float32, seed: int = 0
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic ``q`` (batch, q_head, token, d), ``k`` and ``k_hat`` (batch, kv_head, token, d):
    Gaussian q and k, ``k_hat`` = k quantized to int4 per token
    (:func:`kvtheory.quantize.quantize`)."""
    from ..quantize import quantize

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, tokens, d, generator=g, dtype=torch.float32)
    k = torch.randn(batch, kv_heads, tokens, d, generator=g, dtype=torch.float32)
    kh = quantize(k, 4)
    dt = _as_dtype(dtype)
    return tuple(x.to(device=device, dtype=dt) for x in (q, k, kh))  # type: ignore[return-value]


def case_flips(*, tokens: int = 2048, q_heads: int = 9, kv_heads: int = 3, d: int = 64,
               device: Any = "cpu", dtype: Any = torch.float32, reps: int = 5, warmup: int = 1,
               causal_row: bool = True, seed: int = 0, fp32_row: bool = True,
               torch_row: bool = False) -> dict[str, Any]:
    r"""``attention_metrics(q, k, k_hat)`` (keys only, no values) vs the two bare matmuls
    :math:`QK^\top`, :math:`Q\hat K^\top` (``torch.matmul`` of the shapes the engine multiplies,
    ``(kv_head, g·Q, d) @ (kv_head, d, T)``, in the inputs' dtype), all queries over all tokens.

    The target row is non-causal (the engine does the same matmul flops as the baseline); with
    ``causal_row`` a second row times the causal engine, which skips the hidden key blocks,
    against the same full matmuls. Also ``flip_rate`` (the lightweight flip-only engine).
    TFLOP/s count :func:`flip_flops` (2 matmuls; softmax etc. not counted). On CUDA the targets
    are those of issue 12 (``attention_metrics`` ≤ 2×, ``flip_rate`` ≤ 1.3×); ``fp32_row``
    adds the bf16 inputs' matmuls upcast to fp32 (their output is twice the bytes: leave it out
    where that does not fit), ``torch_row`` times ``attention_metrics`` with the fused kernel
    switched off (``KVTHEORY_FUSED=never``), once.
    """
    from ..flips import attention_metrics, flip_rate

    dev = torch.device(device)
    q, k, kh = flip_inputs(tokens, q_heads=q_heads, kv_heads=kv_heads, d=d, device=dev,
                           dtype=dtype, seed=seed)
    g = q_heads // kv_heads
    qg = q.reshape(1, kv_heads, g * tokens, d)

    def matmuls():
        torch.matmul(qg, k.mT)
        torch.matmul(qg, kh.mT)

    fns: dict[str, Callable[[], Any]] = {
        "matmul": matmuls,
        "attention_metrics": lambda: attention_metrics(q, k, kh, causal=False),
        "flip_rate": lambda: flip_rate(q, k, kh, causal=False),
    }
    if causal_row:
        fns["attention_metrics_causal"] = lambda: attention_metrics(q, k, kh, causal=True)
    if q.dtype in (torch.bfloat16, torch.float16) and fp32_row:
        qf, kf, khf = q.float().reshape(1, kv_heads, g * tokens, d), k.float(), kh.float()

        def matmuls_fp32():
            torch.matmul(qf, kf.mT)
            torch.matmul(qf, khf.mT)

        fns["matmul_fp32"] = matmuls_fp32
    timing = side_by_side(fns, reps=reps, warmup=warmup, device=dev)
    if torch_row:
        from .._triton_metrics import torch_path

        with torch_path():
            slow = side_by_side({"attention_metrics_torch": fns["attention_metrics"]}, reps=1,
                                warmup=1, device=dev)
        timing = Timing({**timing.times, **slow.times})
    flops = flip_flops(1, q_heads, tokens, tokens, d)
    tflops = {lab: flops / timing.median(lab) / 1e12 for lab in timing.times}
    dt = _dtype_name(q.dtype)
    shape = f"T={tokens}, {q_heads}/{kv_heads} heads, d={d}"
    kw = dict(device=dev.type, dtype=dt)
    gpu = dev.type == "cuda"
    rows = [
        ratio_row("flips", f"attention_metrics vs 2 bare matmuls ({shape}, non-causal)", timing,
                  "attention_metrics", "matmul",
                  target=TARGETS["attention_metrics_gpu" if gpu else "attention_metrics"],
                  note=f"{tflops['attention_metrics']:.3g} TFLOP/s vs matmul "
                       f"{tflops['matmul']:.3g} (2·2BHQTd flops)", **kw),
        ratio_row("flips", f"flip_rate vs 2 bare matmuls ({shape}, non-causal)", timing,
                  "flip_rate", "matmul", target=TARGETS["flip_rate_gpu"] if gpu else None,
                  note=f"{tflops['flip_rate']:.3g} TFLOP/s", **kw),
    ]
    if torch_row:
        rows.append(ratio_row(
            "flips", f"attention_metrics, torch path (KVTHEORY_FUSED=never), vs 2 bare matmuls "
            f"({shape}, non-causal)", timing, "attention_metrics_torch", "matmul",
            note=f"one timed call; {tflops['attention_metrics_torch']:.3g} TFLOP/s", **kw))
    if causal_row:
        rows.append(ratio_row(
            "flips", f"causal attention_metrics vs the same 2 full matmuls ({shape})", timing,
            "attention_metrics_causal", "matmul",
            note="causal skips hidden key blocks: fewer flops than the baseline", **kw))
    if "matmul_fp32" in fns:
        rows.append(ratio_row(
            "flips", f"attention_metrics vs 2 matmuls upcast to fp32 ({shape}, non-causal)",
            timing, "attention_metrics", "matmul_fp32",
            note=f"the engine computes logits in fp32; fp32 matmuls "
                 f"{tflops['matmul_fp32']:.3g} TFLOP/s", **kw))
    return case_result("flips", timing, rows, shape={"batch": 1, "q_heads": q_heads,
                 "kv_heads": kv_heads, "queries": tokens, "tokens": tokens, "d": d},
                 flops_per_call=flops, flop_count="2 matmuls x 2*B*H*Q*T*d (softmax, top-k, "
                 "metric reductions not counted)", tflops=tflops)


def matmul_peak(*, n: int = 8192, device: Any = "cuda", dtype: Any = torch.bfloat16,
                reps: int = 10, warmup: int = 3) -> dict[str, Any]:
    """TFLOP/s of one ``n×n @ n×n`` ``torch.matmul`` on random data (median of ``reps``)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, generator=g).to(_as_dtype(dtype))
    b = torch.randn(n, n, device=dev, generator=g).to(_as_dtype(dtype))
    t = side_by_side({"matmul": lambda: torch.matmul(a, b)}, reps=reps, warmup=warmup, device=dev)
    return {"n": n, "dtype": _dtype_name(a.dtype), "median_s": t.median("matmul"),
            "tflops": 2 * n**3 / t.median("matmul") / 1e12, "reps": reps}


# ----------------------------------------------------------------------------- memory
def _proc_status(key: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_child(tokens: int, q_heads: int, kv_heads: int, d: int, dtype: str, causal: bool,
                  queries: int) -> None:  # pragma: no cover - runs in a subprocess
    """Print the peak resident memory of one ``attention_metrics`` call (JSON on stdout).

    ``ru_maxrss`` survives ``fork`` + ``exec`` (Linux keeps the parent's high-water mark, here a
    process holding a model), so the peak is read from ``VmHWM``, the high-water mark of this
    process image, after resetting it to the current RSS (``/proc/self/clear_refs``); the
    ``ru_maxrss`` readings are kept for reference.
    """
    import resource

    from kvtheory.flips import attention_metrics

    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    qs, ks, khs = flip_inputs(32, q_heads=q_heads, kv_heads=kv_heads, d=d, dtype=dtype)
    attention_metrics(qs, ks, khs, ks, causal=causal)  # warm-up: lazily loaded kernels
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        pass
    base_rss, base_max = _proc_status("VmRSS"), maxrss()
    q, k, kh = flip_inputs(tokens, q_heads=q_heads, kv_heads=kv_heads, d=d, dtype=dtype)
    v = k.clone()
    q = q[:, :, tokens - queries:].contiguous()
    inputs = sum(x.numel() * x.element_size() for x in (q, k, kh, v))
    t0 = time.perf_counter()
    m = attention_metrics(q, k, kh, v, causal=causal)
    elapsed = time.perf_counter() - t0
    hwm = _proc_status("VmHWM")
    if reset and hwm is not None and base_rss is not None:
        peak, method = hwm - base_rss, ("peak RSS (VmHWM, reset after imports and a warm-up) "
                                        "minus the RSS then, in a subprocess")
    else:
        peak, method = maxrss() - base_max, "ru_maxrss minus its value after imports and a warm-up"
    print(json.dumps({"baseline_rss": base_rss, "peak_hwm": hwm, "baseline_maxrss": base_max,
                      "peak_maxrss": maxrss(), "peak_bytes": peak, "method": method,
                      "input_bytes": inputs, "elapsed_s": elapsed,
                      "flip_rate": m.mean()["flip_rate"]}))


def _memory_cpu(tokens, q_heads, kv_heads, d, dtype, causal, queries, timeout) -> dict[str, Any]:
    code = ("import sys; from kvtheory.bench.flips import _memory_child; "
            f"_memory_child({tokens}, {q_heads}, {kv_heads}, {d}, {dtype!r}, {causal}, {queries})")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise KVTheoryError(f"memory: got no result within {timeout} s; expected the "
                            "attention_metrics subprocess to finish (use fewer --memory-queries)"
                            ) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KVTheoryError(f"memory: the attention_metrics subprocess failed ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_cuda(tokens, q_heads, kv_heads, d, dtype, causal, queries, device) -> dict[str, Any]:
    from ..flips import attention_metrics

    dev = torch.device(device)
    qs, ks, khs = flip_inputs(32, q_heads=q_heads, kv_heads=kv_heads, d=d, device=dev, dtype=dtype)
    attention_metrics(qs, ks, khs, ks, causal=causal)
    del qs, ks, khs
    sync(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    q, k, kh = flip_inputs(tokens, q_heads=q_heads, kv_heads=kv_heads, d=d, device=dev, dtype=dtype)
    v = k.clone()
    q = q[:, :, tokens - queries:].contiguous()
    inputs = sum(x.numel() * x.element_size() for x in (q, k, kh, v))
    t0 = time.perf_counter()
    m = attention_metrics(q, k, kh, v, causal=causal)
    sync(dev)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev)
    return {"baseline_bytes": base, "peak_allocated": peak, "peak_bytes": peak - base,
            "input_bytes": inputs, "elapsed_s": elapsed, "flip_rate": m.mean()["flip_rate"],
            "method": "torch.cuda.max_memory_allocated minus memory_allocated before the inputs"}


def case_memory(*, tokens: int = 32768, q_heads: int = 9, kv_heads: int = 3, d: int = 64,
                device: Any = "cpu", dtype: Any = torch.float32, causal: bool = True,
                queries: int | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Peak memory of one ``attention_metrics(q, k, k_hat, v, causal=causal)`` call at ``tokens``
    keys and ``queries`` (default all) queries, the inputs included."""
    tokens = check_int("tokens", tokens, 1)
    queries = tokens if queries is None else check_int("queries", queries, 1, tokens)
    dev = torch.device(device)
    dt = _dtype_name(_as_dtype(dtype))
    if dev.type == "cpu":
        out = _memory_cpu(tokens, q_heads, kv_heads, d, dt, causal, queries, timeout)
    elif dev.type == "cuda":
        out = _memory_cuda(tokens, q_heads, kv_heads, d, dt, causal, queries, dev)
    else:
        raise bad_argument("device", str(device), "cpu or cuda")
    peak = out["peak_bytes"]
    target = TARGETS["memory"]
    row = make_row(
        "memory", f"attention_metrics peak memory, {tokens} tok × {q_heads} q heads × d={d}"
        f"{'' if queries == tokens else f' ({queries} queries)'}, {'causal' if causal else 'full'}",
        device=dev.type, dtype=dt, measured=f"{peak / _GIB:.3f} GiB", measured_s=None,
        target_text=_target_text(target, "GiB"), met=_met(float(peak), target),
        note=f"inputs {out['input_bytes'] / _GIB:.3f} GiB included; {out['elapsed_s']:.1f} s; "
             + ("peak RSS − RSS before, subprocess" if dev.type == "cpu" else
                "cuda max_memory_allocated − before"))
    return case_result("memory", None, [row], tokens=tokens, queries=queries, q_heads=q_heads,
                 kv_heads=kv_heads, d=d, causal=causal, **out)

