"""One ``attention_metrics`` call on the GPU cut by CUDA events (no profiler): the device's
time from the call's start to each kernel of the fused path, each kernel's own time, and the
time from the last kernel to the call's return, medians over ``--reps`` calls at T = 16,384
(32/8 heads, d = 128, bf16, non-causal). Events are recorded on the current stream right
before and after each Triton launch (main kernel, second pass, aggregation) and around the
call, so each gap is what the GPU spent on other work or waiting for the host. Each way of
waiting for the results (``flips.WAIT``: polling an event after a pinned copy, or ``.cpu()``)
is timed in turn, interleaved.

    PYTHONPATH=. python3 benchmarks/gpu_call_timeline.py --out $OUT/timeline.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory import bench, flips  # noqa: E402
from kvtheory.io import write_json  # noqa: E402


class _Marked:
    """A Triton kernel whose launches are bracketed by CUDA events (appended to ``log``)."""

    def __init__(self, kernel, name: str, log: list) -> None:
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch(*args, **kw):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            res = run(*args, **kw)
            b.record()
            name = self.name + (" (second pass)" if kw.get("FIX") else "")
            self.log.append((name, a, b))
            return res
        return launch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="timeline.json")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--waits", default="poll,cpu",
                   help="how the host waits for the results (flips.WAIT), each timed in turn")
    p.add_argument("--rescan", default="",
                   help="comma list of off,on: time the second pass's rescan of kept blocks "
                        "(TUNE['RESCAN']) off and on in turn (default: the library's default)")
    a = p.parse_args()
    q, k, kh = bench.flip_inputs(a.tokens, q_heads=32, kv_heads=8, d=128, device="cuda",
                                 dtype=torch.bfloat16)
    log: list = []
    saved = (tm.metrics_kernel, tm.aggregate_kernel, flips._to_host, flips.WAIT[0],
             tm.rescan_kernel, tm.pick_kernel)
    tm.metrics_kernel = _Marked(saved[0], "metrics_kernel", log)
    tm.aggregate_kernel = _Marked(saved[1], "aggregate_kernel", log)
    tm.rescan_kernel = _Marked(saved[4], "rescan_kernel", log)
    tm.pick_kernel = _Marked(saved[5], "pick_kernel", log)
    rows: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, dict[str, int]] = {}     # the last call's queries by second-pass route

    def marked_to_host(x):     # the transfer: events before it and after it
        ea = torch.cuda.Event(enable_timing=True)
        eb = torch.cuda.Event(enable_timing=True)
        ea.record()
        res = saved[2](x)
        eb.record()
        log.append(("transfer to the host (the host waits)", ea, eb))
        return res

    flips._to_host = marked_to_host
    waits = [(w, r) for w in a.waits.split(",") for r in (a.rescan.split(",") if a.rescan
                                                          else [None])]
    try:
        for i in range(a.reps + 3):
            for wait, resc in waits:      # interleaved: all see the same machine state
                flips.WAIT[0] = wait
                tm.TUNE.pop("RESCAN", None)
                if resc is not None:
                    tm.TUNE["RESCAN"] = resc == "on"
                label = wait if resc is None else f"{wait}, rescan {resc}"
                row = rows.setdefault(label, {})
                torch.cuda.synchronize()
                log.clear()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                flips.attention_metrics(q, k, kh, causal=False)
                end.record()
                torch.cuda.synchronize()
                flagged, total = tm.second_pass_queries()
                counts[label] = {
                    "queries": total, "flagged": flagged, "rescan": tm.rescan_queries(),
                    "rounds": tm.rounds_pass_queries()}
                if i < 3:
                    continue
                prev = start
                for name, ea, eb in log:
                    row.setdefault(f"gap before {name}", []).append(prev.elapsed_time(ea))
                    row.setdefault(name, []).append(ea.elapsed_time(eb))
                    prev = eb
                row.setdefault("after the last mark to the return", []).append(
                    prev.elapsed_time(end))
                row.setdefault("whole call", []).append(start.elapsed_time(end))
    finally:
        tm.metrics_kernel, tm.aggregate_kernel, flips._to_host = saved[:3]
        flips.WAIT[0] = saved[3]
        tm.rescan_kernel, tm.pick_kernel = saved[4:]
        tm.TUNE.pop("RESCAN", None)
    doc = {"machine": bench.machine(), "tokens": a.tokens, "reps": a.reps,
           "median_ms": {w: {n: statistics.median(v) for n, v in r.items()}
                         for w, r in rows.items()},
           "second_pass_queries": counts}
    for w, r in doc["median_ms"].items():
        print(f"wait: {w}")
        for n, ms in r.items():
            print(f"  {n:48s} {ms:8.3f} ms")
    write_json(a.out, doc, arg="--out")
    print(json.dumps(doc["median_ms"]))
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
