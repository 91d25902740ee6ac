"""GPU benchmarks for a machine where nothing can be downloaded (see benchmarks/README.md).

The model is a ``LlamaForCausalLM`` of SmolLM2-135M's shape with random weights, the tokens are
random, and the flip engine gets synthetic tensors. Runs, for float32 and bfloat16:

* ``eval``: PPL evaluation under int4-kivi / rank16-pca vs the uncompressed forward
  (4 windows × 1024 and 2 × 4096 tokens; the PCA basis is fitted once on 1 random window);
* ``flips``: ``attention_metrics`` vs the two bare matmuls at T = 8192 and 16384;
* ``memory``: peak ``torch.cuda.max_memory_allocated`` of ``attention_metrics`` at 32,768 tokens;
* ``eval7b``: ``eval`` (int4-kivi and rank32-pca, matched storage at d = 128) at 4 × 4096
  tokens and ``capture`` at 1 × 2048 on a Mistral-7B-shaped model (random weights, bf16);
* ``flips7b``: the fused metrics kernel at a Mistral-7B layer's shape (32 query / 8 KV heads,
  d=128, bf16) at T = 4,096 ... 32,768 against the two bare bf16 matmuls, with TFLOP/s against
  the measured peak, and its peak memory at 32,768 tokens (issue 12);

and a bf16 (and fp32) ``n×n`` matmul to measure the peak the flip engine is held against.
Writes the JSON after every step (partial results survive a time-out) and prints the table.

    PYTHONPATH=. python3 benchmarks/gpu_job.py --out gpu.json --git-sha SHA   # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_job.py --small --device cpu     # plumbing dry run
    # only some steps, keeping the other rows of an earlier file:
    PYTHONPATH=. python3 benchmarks/gpu_job.py --only peak,flips,memory,flips7b \
        --merge benchmarks/gpu.json --out gpu.json --git-sha SHA
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kvtheory import bench  # noqa: E402
from kvtheory.io import write_json  # noqa: E402
from kvtheory.timing import sync  # noqa: E402


def eval_diagnostics(model, windows, calib, reps: int, profile_path: Path | None,
                     methods: tuple[str, str] = ("int4-kivi", "rank16-pca"),
                     shape: str = "") -> dict:
    """Where the compressed-eval time goes: ``methods`` (a quantizer and a PCA rank) with and
    without the compressors' finite-value check (a host sync per call on a GPU), and a
    torch.profiler table of one evaluation of each (written to ``profile_path``)."""
    from kvtheory.methods import compressor as compress  # where Compressor.__call__ reads _check_kv
    from kvtheory.evaluate import window_nll
    from kvtheory.patch import compressed_kv, fit_compressors
    from kvtheory.timing import side_by_side

    plan = fit_compressors(model, methods[1], methods[1], calib)
    check = compress._check_kv

    def evaluation(method: str, checked: bool = True):
        def run():
            compress._check_kv = check if checked else (lambda x: x)
            try:
                if method == "fp":
                    window_nll(model, windows)
                else:
                    with compressed_kv(model, method, method,
                                       calibration=plan if "pca" in method else None):
                        window_nll(model, windows)
            finally:
                compress._check_kv = check
        return run

    fns = {"fp": evaluation("fp")}
    for m in methods:
        fns[m] = evaluation(m)
        fns[f"{m} unchecked"] = evaluation(m, False)
    dev = next(model.parameters()).device
    timing = side_by_side(fns, reps=reps, warmup=1, device=dev)
    dt = str(next(model.parameters()).dtype).removeprefix("torch.")
    w, n = windows.shape
    rows = [bench.ratio_row("eval-diag", f"{lab} PPL eval vs fp forward, {w}×{n} tok{shape}",
                            timing, lab,
                            "fp", device=dev.type, dtype=dt,
                            note="diagnostic: compressors' finite check off" if "unchecked" in lab
                            else "diagnostic: as shipped")
            for lab in fns if lab != "fp"]
    if profile_path is not None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        parts = []
        for lab in ("fp",) + tuple(methods):
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                fns[lab]()
                sync(dev)
            wall = time.perf_counter() - t0
            ka = prof.key_averages()
            parts.append(f"===== {lab}: {wall * 1e3:.1f} ms wall under the profiler")
            for key in (("self_cuda_time_total",) if dev.type == "cuda" else ()) + (
                    "self_cpu_time_total",):
                parts.append(f"===== {lab} ({dt}, {w}x{n}), sorted by {key}\n"
                             + ka.table(sort_by=key, row_limit=22))
        profile_path.write_text("\n\n".join(parts))
    return bench.case_result("eval-diag", timing, rows, windows=[w, n])


def _row_key(row: dict) -> tuple:
    return row.get("case"), row.get("what"), row.get("device"), row.get("dtype")


def merge_kept(old_cases: list[dict], new_cases: list[dict]) -> list[dict]:
    """The cases of an earlier result file that this run did not measure again: those none of
    whose rows (by case, description, device and dtype) this run's rows repeat."""
    new = {_row_key(r) for c in new_cases for r in c["rows"]}
    return [c for c in old_cases if not any(_row_key(r) in new for r in c["rows"])]


def kept_names(kept: list[dict]) -> list[str]:
    """Short names of kept cases for the table's heading: the case, with its heads and head
    dimension where it has a shape ("flips (9/3 heads, d=64)")."""
    names = set()
    for c in kept:
        sh = c.get("shape") or {n: c[n] for n in ("q_heads", "kv_heads", "d") if n in c}
        names.add(f"{c['case']} ({sh['q_heads']}/{sh['kv_heads']} heads, d={sh['d']})"
                  if {"q_heads", "kv_heads", "d"} <= set(sh) else str(c.get("case")))
    return sorted(names)


def stamp_source(cases: list[dict], sha: str | None, date: str | None) -> list[dict]:
    """Record on each case that has none the run that measured it (``source``: sha, date)."""
    for c in cases:
        c.setdefault("source", {"sha": sha, "date": date})
    return cases


def kept_sources(kept: list[dict]) -> list[dict]:
    """The kept cases grouped by the run that measured them, oldest first:
    ``[{"cases": names, "sha": ..., "date": ...}]`` (each case's ``source``)."""
    groups: dict[tuple, list[dict]] = {}
    for c in kept:
        src = c.get("source") or {}
        groups.setdefault((src.get("date") or "", src.get("sha")), []).append(c)
    return [{"cases": kept_names(cs), "sha": sha, "date": date or None}
            for (date, sha), cs in sorted(groups.items(), key=lambda kv: kv[0][0])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/gpu.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--small", action="store_true", help="tiny sizes: a dry run of the plumbing")
    p.add_argument("--git-sha", default=None,
                   help="commit of the working tree sent (the GPU machine gets no .git)")
    p.add_argument("--only", default="peak,eval,flips,memory,flips7b,eval7b",
                   help="comma-separated steps: peak, eval, flips, memory, flips7b, eval7b")
    p.add_argument("--kernel-config", default=None, metavar="PATH",
                   help="JSON {full: [BLOCK_M, BLOCK_N, warps, stages], tune: {...}} for the "
                        "fused kernel (block shapes and switches as in gpu_kernel_lab.py)")
    p.add_argument("--merge", default=None, metavar="PATH",
                   help="an earlier result file whose rows of the cases not re-run are kept")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    bad = only - {"peak", "eval", "flips", "memory", "flips7b", "eval7b"}
    if bad:
        p.error(f"--only: unknown steps {sorted(bad)}")
    dev = torch.device(args.device)
    small = args.small
    from kvtheory import _triton_metrics as tm

    if args.kernel_config:
        from kvtheory.io import read_json

        kc = read_json(args.kernel_config, arg="--kernel-config")
        tm.CONFIG["full"] = tuple(kc["full"])
        tm.TUNE.update(kc.get("tune", {}))
    shape = dict(num_hidden_layers=2) if small else {}
    eval_sizes = [(2, 128)] if small else [(4, 1024), (2, 4096)]
    flip_tokens = [256] if small else [8192, 16384]
    mem_tokens = 1024 if small else 32768
    peak_n = 256 if small else 8192
    vocab = bench.SMOLLM2_SHAPE["vocab_size"]

    settings = {"device": str(dev), "reps": args.reps, "small": small, "model":
                "LlamaForCausalLM, SmolLM2-135M shape, random weights (seed 0)",
                "model_shape": {**bench.SMOLLM2_SHAPE, **shape},
                "model_7b": ("MistralForCausalLM, Mistral-7B shape, random weights (seed 0), "
                             "bf16, for eval7b" if "eval7b" in only else None),
                "eval_windows": eval_sizes,
                "calib_windows": 1, "tokens": "random ids (seeded)", "flip_tokens": flip_tokens,
                "memory_tokens": mem_tokens, "matmul_n": peak_n,
                "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "source_git_sha": args.git_sha,
                "fused_kernel": {"config": {k: list(v) for k, v in tm.CONFIG.items()},
                                 "tune": dict(tm.TUNE), "triton": tm.triton is not None}}
    cases: list[dict] = []
    doc = bench.results_document(cases, settings=settings)
    doc["job"] = "benchmarks/gpu_job.py"
    if args.git_sha:    # the GPU machine's copy of the tree may carry a stale .git
        doc["provenance"]["git_sha"] = args.git_sha
    doc["errors"] = []

    old_cases: list[dict] = []
    if args.merge:
        from kvtheory.io import read_json

        old = read_json(args.merge, arg="--merge")
        old_cases = list(old.get("cases", []))
        stamp_source(old_cases, old.get("settings", {}).get("source_git_sha"),
                     old.get("machine", {}).get("date"))
        doc["merged"] = {"from": args.merge, "kept": []}
        if "peak" not in only:
            doc["matmul_peak"] = old.get("matmul_peak")

    def save() -> None:
        kept = merge_kept(old_cases, cases)
        stamp_source(cases, doc["settings"].get("source_git_sha"), doc["machine"].get("date"))
        if args.merge:
            doc["merged"]["kept"] = kept_sources(kept)
        doc["cases"] = kept + cases
        doc["rows"] = [r for c in doc["cases"] for r in c["rows"]]
        write_json(args.out, doc, arg="--out")

    def step(name: str, fn) -> object:
        t0 = time.perf_counter()
        print(f"[gpu_job] {name} ...", flush=True)
        try:
            out = fn()
        except Exception as exc:  # keep going: the other steps' results still count
            traceback.print_exc()
            doc["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]})
            out = None
        print(f"[gpu_job] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
        return out

    peak = doc.get("matmul_peak")
    if "peak" in only:
        peak = step("matmul peak bf16", lambda: bench.matmul_peak(n=peak_n, device=dev,
                                                                 dtype=torch.bfloat16))
        doc["matmul_peak"] = peak
        doc["matmul_peak_fp32"] = step("matmul peak fp32", lambda: bench.matmul_peak(
            n=peak_n, device=dev, dtype=torch.float32))

    def add_peak(res: dict) -> None:
        if peak:
            for row in res["rows"]:
                if row["what"].startswith("attention_metrics vs 2 bare") or row[
                        "what"].startswith("flip_rate vs 2 bare"):
                    lab = "attention_metrics" if row["what"].startswith("att") else "flip_rate"
                    tf = res["tflops"][lab]
                    row["note"] += (f"; {100 * tf / peak['tflops']:.1f}% of the bf16 "
                                    f"matmul peak {peak['tflops']:.0f} TFLOP/s")

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model = (step(f"model {name}", lambda: bench.smollm2_shaped_model(dev, dtype, **shape))
                 if "eval" in only else None)
        if model is not None:
            for w, n in eval_sizes:
                windows = bench.random_ids(n, vocab, batch=w, seed=1)
                calib = bench.random_ids(n, vocab, batch=1, seed=2)
                res = step(f"eval {name} {w}x{n}", lambda: bench.case_eval(
                    model, windows, calib, reps=args.reps))
                if res is not None:
                    cases.append(res)
            w, n = eval_sizes[0]
            windows = bench.random_ids(n, vocab, batch=w, seed=1)
            calib = bench.random_ids(n, vocab, batch=1, seed=2)
            prof = Path(args.out).with_name(f"profile_{name}.txt")
            res = step(f"eval diagnostics {name}", lambda: eval_diagnostics(
                model, windows, calib, args.reps, prof))
            if res is not None:
                cases.append(res)
            del model
        for t in flip_tokens if "flips" in only else ():
            res = step(f"flips {name} T={t}", lambda: bench.case_flips(
                tokens=t, device=dev, dtype=dtype, reps=args.reps))
            if res is not None:
                add_peak(res)
                cases.append(res)
        if "memory" in only:
            res = step(f"memory {name}", lambda: bench.case_memory(
                tokens=mem_tokens, device=dev, dtype=dtype))
            if res is not None:
                cases.append(res)
        save()
    if "flips7b" in only:   # issue 12: a Mistral-7B layer's attention shape, bf16
        big = dict(q_heads=32, kv_heads=8, d=128)
        for t in [512] if small else [4096, 8192, 16384, 32768]:
            res = step(f"flips7b T={t}", lambda: bench.case_flips(
                tokens=t, device=dev, dtype=torch.bfloat16, reps=args.reps, fp32_row=False,
                torch_row=t == (512 if small else 16384), **big))
            if res is not None:
                add_peak(res)
                cases.append(res)
        res = step("memory flips7b", lambda: bench.case_memory(
            tokens=mem_tokens, device=dev, dtype=torch.bfloat16, **big))
        if res is not None:
            cases.append(res)
        save()
    if "eval7b" in only:    # issue 12: a Mistral-7B-shaped model, bf16, random weights
        tiny = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000)
        model = step("model 7b", lambda: bench.mistral7b_shaped_model(
            dev, torch.bfloat16, **(tiny if small else {})))
        if model is not None:
            vocab7 = model.config.vocab_size
            w, n = (2, 128) if small else (4, 4096)
            windows = bench.random_ids(n, vocab7, batch=w, seed=1)
            calib = bench.random_ids(n, vocab7, batch=1, seed=2)
            # matched storage at d = 128: rank 32 of 128 directions against 4 bits
            res = step(f"eval7b {w}x{n}", lambda: bench.case_eval(
                model, windows, calib, methods=("int4-kivi", "rank32-pca"), reps=args.reps,
                shape=", Mistral-7B shape"))
            if res is not None:
                cases.append(res)
            ids = bench.random_ids(128 if small else 2048, vocab7, batch=1, seed=3).to(dev)
            if not small:
                res = step("eval7b diagnostics", lambda: eval_diagnostics(
                    model, windows, calib, args.reps, Path(args.out).with_name("profile_7b.txt"),
                    methods=("int4-kivi", "rank32-pca"), shape=", Mistral-7B shape"))
                if res is not None:
                    cases.append(res)
            res = step("capture7b", lambda: bench.case_capture(model, ids, reps=3,
                                                               shape=", Mistral-7B shape"))
            if res is not None:
                cases.append(res)
            del model
        save()
    print(bench.table_text(doc["rows"]))
    if peak:
        print(f"bf16 matmul peak: {peak['tflops']:.1f} TFLOP/s (n={peak['n']}); "
              f"GPU: {(doc['machine']['gpu'] or {}).get('name')}")
    print(f"errors: {len(doc['errors'])}; wrote {args.out}")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
