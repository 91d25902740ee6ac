r"""``kvtheory bench``: speed and memory as side-by-side ratios, measured in one run.

Cases (:mod:`kvtheory.bench`): ``eval`` (PPL under int4-kivi / rank16-pca vs the uncompressed
forward), ``quanto`` (transformers' quanto ``QuantizedCache`` decoded token by token vs the
one-pass simulation), ``flips`` (``attention_metrics`` vs the bare matmuls), ``memory`` (peak
memory of ``attention_metrics`` at 32,768 tokens) and ``capture`` (capture + save vs a forward).
Each pair is timed interleaved in this process; the table shows medians, ratios and targets.

Writes ``--json`` (default ``benchmarks/results.json``) after every case, atomically, with
provenance and the machine description. The rows of the ``--gpu-json`` files that exist
(written by ``benchmarks/gpu_job.py`` on a GPU machine: ``benchmarks/gpu.json``, the H200 record,
and ``benchmarks/gpu_h100.json``) are printed too, each under its card, date and source.
Exit status 0 when the cases ran (missed targets show as ``NO`` in the table), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import KVTheoryError, bad_argument

NAME = "bench"
HELP = "benchmarks: side-by-side medians and ratios (eval, quanto, flips, memory, capture)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="corpora folder (else $KVTHEORY_DATA)")
    p.add_argument("--json", default="benchmarks/results.json", metavar="PATH",
                   help="result file (default benchmarks/results.json)")
    p.add_argument("--gpu-json", default="benchmarks/gpu.json,benchmarks/gpu_h100.json",
                   metavar="PATH[,PATH]",
                   help="GPU result files to print beside this run's, each with its card "
                        "(default benchmarks/gpu.json, the H200 record, and "
                        "benchmarks/gpu_h100.json; absent ones are skipped; 'none' to skip)")
    p.add_argument("--readme", default="none", metavar="PATH[,PATH]",
                   help="Markdown files whose results section (between the kvtheory bench "
                        "markers) receives this run's printed table (default none; `make bench` "
                        "records it in README.md and benchmarks/README.md)")
    p.add_argument("--reps", default="5", help="timed repetitions per label (default 5)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (model and tensors)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help="cases to run: eval, quanto, flips, memory, capture (default all)")
    p.add_argument("--model", default="smollm2-135m", help="model of eval/quanto/capture")
    p.add_argument("--quanto-tokens", default="256", metavar="N",
                   help="tokens decoded through the quanto cache (default 256)")
    p.add_argument("--eval-windows", default="2x512", metavar="WxL",
                   help="evaluation windows x tokens (default 2x512), 1 calibration window")
    p.add_argument("--flip-tokens", default="2048", metavar="T",
                   help="tokens (= queries) of the flip-engine timing (default 2048)")
    p.add_argument("--memory-tokens", default="32768", metavar="T",
                   help="tokens of the memory case (default 32768)")
    p.add_argument("--memory-queries", default=None, metavar="Q",
                   help="queries of the memory case (default: all tokens)")
    p.add_argument("--capture-tokens", default="1024", metavar="N",
                   help="tokens captured (default 1024)")


def _pos_int(name: str, text: Any, lo: int = 1) -> int:
    try:
        value = int(str(text))
    except ValueError:
        raise bad_argument(name, text, f"an integer >= {lo}") from None
    if value < lo:
        raise bad_argument(name, text, f"an integer >= {lo}")
    return value


def _windows(text: str) -> tuple[int, int]:
    parts = str(text).lower().split("x")
    if len(parts) != 2:
        raise bad_argument("--eval-windows", text, "WxL such as 2x512")
    return _pos_int("--eval-windows", parts[0]), _pos_int("--eval-windows", parts[1], 2)


def _only(text: str | None) -> tuple[list[str], bool]:
    from ..bench import CASES

    if text is None:
        return list(CASES), False
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if not names or bad:
        raise bad_argument("--only", text, "comma-separated case names from " + ", ".join(CASES))
    return [c for c in CASES if c in names], True


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gpu_section(path: Path) -> str | None:
    """The heading line and table of a GPU result file (written by benchmarks/gpu_job.py), or
    None when the file is absent or holds no rows."""
    from ..bench import table_text
    from ..io import read_json

    if not path.is_file():
        return None
    doc = read_json(path, arg="--gpu-json")
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not rows:
        return None
    mach = doc.get("machine", {}) or {}
    gpu = (mach.get("gpu") or {}).get("name", "GPU")
    peak = doc.get("matmul_peak") or {}
    extra = f"; bf16 matmul peak {peak['tflops']:.0f} TFLOP/s (n={peak['n']})" if peak else ""
    merged = doc.get("merged") or {}
    for g in merged.get("kept") or []:
        extra += (f"; rows of {', '.join(g['cases'])} kept from the run of "
                  f"{g.get('date') or '?'} (source {str(g.get('sha'))[:7]})")
    sha = str((doc.get("settings") or {}).get("source_git_sha")     # the tree that ran
              or (doc.get("provenance") or {}).get("git_sha") or "?")[:7]
    return (f"GPU rows recorded by benchmarks/gpu_job.py on {gpu}, {mach.get('date', '?')}"
            f" (source {sha})"
            f" (random-weight SmolLM2-shaped model where a row names no other shape; flip-engine"
            f" rows on synthetic tensors, "
            f"32/8 heads and d=128 being a Mistral-7B layer's shape; from {path.as_posix()})"
            f"{extra}\n\n" + table_text(rows))


def print_gpu_rows(path: Path, console: Any) -> bool:
    """Print the rows of a GPU result file (written by benchmarks/gpu_job.py); False if absent."""
    text = gpu_section(path)
    if text is None:
        return False
    console.print(text)
    return True


#: the lines between which ``--readme`` files receive the results
README_START = "<!-- kvtheory bench: results start (written by `kvtheory bench`, do not edit) -->"
README_END = "<!-- kvtheory bench: results end -->"


def record_readme(path: Path, text: str) -> Path:
    """Replace what stands between :data:`README_START` and :data:`README_END` in ``path``
    with ``text`` (atomically); a file without both markers is an error, nothing is written."""
    from ..io import atomic_write

    head, tail = _readme_parts(path)
    return atomic_write(path, head + "\n" + text.rstrip("\n") + "\n" + tail, arg="--readme")


def _readme_parts(path: Path) -> tuple[str, str]:
    """``path``'s text up to and including :data:`README_START`, and from :data:`README_END`."""
    try:
        old = path.read_text(encoding="utf-8")
    except OSError:
        raise bad_argument("--readme", str(path), "an existing Markdown file") from None
    a, b = old.find(README_START), old.find(README_END)
    if a < 0 or b < a:
        raise bad_argument("--readme", str(path), f"a file holding the lines {README_START!r} "
                           f"and {README_END!r}")
    return old[:a + len(README_START)], old[b:]


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from .. import bench
    from ..io import _ensure_dir, write_json
    from ..models import _as_dtype

    reps = _pos_int("--reps", args.reps)
    if args.device not in ("cpu", "cuda"):
        raise bad_argument("--device", args.device, "cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KVTheoryError("--device: got 'cuda', but torch sees no CUDA device; expected a "
                            "machine with a GPU, or --device cpu")
    if args.dtype not in ("float32", "bfloat16"):
        raise bad_argument("--dtype", args.dtype, "float32 or bfloat16")
    dtype = _as_dtype(args.dtype)
    cases, explicit = _only(args.only)
    n_quanto = _pos_int("--quanto-tokens", args.quanto_tokens, 2)
    n_win, seq_len = _windows(args.eval_windows)
    flip_tokens = _pos_int("--flip-tokens", args.flip_tokens)
    mem_tokens = _pos_int("--memory-tokens", args.memory_tokens)
    mem_queries = None if args.memory_queries is None else _pos_int("--memory-queries",
                                                                     args.memory_queries)
    if mem_queries is not None and mem_queries > mem_tokens:
        raise bad_argument("--memory-queries", mem_queries, f"at most --memory-tokens {mem_tokens}")
    n_capture = _pos_int("--capture-tokens", args.capture_tokens, 2)
    out = Path(args.json)
    _ensure_dir(out, "--json")  # fail before the work, not after it
    readmes = [] if str(args.readme).lower() == "none" else [
        Path(x.strip()) for x in str(args.readme).split(",") if x.strip()]
    for path in readmes:  # markers checked before the work, not after it
        _readme_parts(path)
    if "quanto" in cases and not bench.quanto_available():
        if explicit:
            bench.require_quanto()
        _say("kvtheory bench: skipping quanto: optimum-quanto is not installed "
             "(pip install 'kvtheory[quanto]')")
        cases.remove("quanto")

    settings = {"cases": cases, "reps": reps, "device": args.device, "dtype": args.dtype,
                "model": args.model, "quanto_tokens": n_quanto, "eval_windows": [n_win, seq_len],
                "calib_windows": 1, "flip_tokens": flip_tokens, "memory_tokens": mem_tokens,
                "memory_queries": mem_queries, "capture_tokens": n_capture,
                "torch_threads": torch.get_num_threads()}
    lm = ids = None
    if {"eval", "quanto", "capture"} & set(cases):
        from ..data import load_corpus
        from ..evaluate import check_seq_len, tokenize
        from ..models import load_model

        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        corpus = load_corpus("wikitext2", args.data_dir)  # corpus errors before the model loads
        settings["data"] = corpus.provenance()
        _say(f"kvtheory bench: loading {args.model} ({args.device}, {args.dtype})")
        lm = load_model(args.model, device=args.device, dtype=dtype)
        if lm.tokenizer is None:
            raise KVTheoryError(f"--model: got {args.model!r}, which has no tokenizer; expected "
                                "a causal LM folder with one")
        for name, n in (("--eval-windows", seq_len), ("--quanto-tokens", n_quanto),
                        ("--capture-tokens", n_capture)):
            check_seq_len(lm.model, n, name)
        ids = tokenize(lm.tokenizer, corpus.text)

    results: list[dict[str, Any]] = []

    def save() -> None:
        write_json(out, bench.results_document(results, settings=settings), arg="--json")

    for case in cases:
        t0 = time.perf_counter()
        _say(f"kvtheory bench: {case} ...")
        if case == "eval":
            from ..evaluate import split_windows

            windows, calib = split_windows(ids, seq_len, max_windows=n_win, calib_windows=1)
            res = bench.case_eval(lm.model, windows, calib, reps=reps)
        elif case == "quanto":
            _say(f"kvtheory bench: quanto decodes {n_quanto} tokens one at a time once (slow: "
                 "about 0.4 s a token for SmolLM2 on a CPU); one-pass timed over "
                 f"{reps} reps around it")
            res = bench.case_quanto(lm.model, ids[:n_quanto], reps=reps)
        elif case == "flips":
            res = bench.case_flips(tokens=flip_tokens, device=args.device, dtype=dtype, reps=reps)
        elif case == "memory":
            res = bench.case_memory(tokens=mem_tokens, queries=mem_queries, device=args.device,
                                    dtype=dtype)
        else:
            res = bench.case_capture(lm, ids[None, :n_capture], reps=reps)
        res["elapsed_s"] = time.perf_counter() - t0
        results.append(res)
        save()
        _say(f"kvtheory bench: {case} done in {res['elapsed_s']:.0f} s")

    console = Console(file=sys.stdout, highlight=False, markup=False, width=bench.WIDTH)
    mach = bench.machine()
    gpu = (mach["gpu"] or {}).get("name")
    rows = [r for c in results for r in c["rows"]]
    met = [r["met"] for r in rows if r["met"] is not None]
    text = (f"kvtheory bench, {mach['date']}: {mach['cpu']}, {mach['cores']} cores"
            f"{f', {gpu}' if gpu else ''}; torch {mach['torch']}, {settings['torch_threads']} "
            f"threads; load average {mach['load_average']}\n\n" + bench.table_text(rows)
            + f"\ntargets met: {sum(met)}/{len(met)}; medians of {reps} interleaved reps "
            "(quanto: 1 rep of the token-by-token decode); ratio = measured / baseline, "
            "for quanto the speed-up baseline / measured\n")
    paths = [] if str(args.gpu_json).lower() == "none" else [
        Path(x) for x in str(args.gpu_json).split(",") if x]
    for gpu_text in (gpu_section(path) for path in paths):
        if gpu_text is not None:
            text += "\n" + gpu_text
    console.print(text)
    for path in readmes:
        record_readme(path, text)
        console.print(f"recorded the table in {path}")
    console.print(f"wrote {out}")
    return 0
