r"""``kvtheory eval``: a model under KV compression, one resumable JSON record per (method, target).

The command only parses arguments; the run (resume, lock, checksum, validation) is
:func:`kvtheory.runs.run_eval`, and one row is :class:`kvtheory.evaljob.Job`. Tasks:
``wikitext2`` (metric ``ppl``), ``lambada`` (``accuracy``; ``target_ppl`` under ``metrics``),
``embed`` (encoders such as ``minilm-l6``: ``cosine``; ``hidden_rel_err`` under ``metrics``).
The result file (``--json``, else ``results/eval/<model>/<task>/...json``) is described in
:mod:`kvtheory.runs`. Exit status: 0, 2 for a user error, 1 when a row's metric was not finite
(that row is not saved).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import bad_argument

NAME = "eval"
HELP = "perplexity / LAMBADA / encoder fidelity of a model under KV compression (resumable JSON)"
#: the scoring convention ``--task lambada`` follows (printed with its table; see README)
LAMBADA_CONVENTION = (
    "LAMBADA scoring: target = the last whitespace-separated word with the whitespace before it "
    "(newlines in passages 426, 1053, 2881, 3047, 3977, 4351, else a space), target tokens = "
    "tok(context + sep + word) minus tok(context), the context starting with BOS only when the "
    "tokenizer adds one (Gemma; not SmolLM2, Qwen2.5); accuracy = every target token greedy; "
    "target_ppl = exp(mean target NLL per passage). lm-eval's lambada_openai splits on spaces and "
    "differs on those 6 passages only; passages are batched by equal length (no padding).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2-135m, minilm-l6, a HF id or a folder")
    p.add_argument("--task", default="wikitext2", help="wikitext2 | lambada | embed")
    p.add_argument("--methods", default="fp", help="comma-separated method specs, e.g. fp,int4-kivi")
    p.add_argument("--targets", default="kv", help="comma-separated subset of k,v,kv")
    p.add_argument("--seq-len", default=None, help="window tokens (default 1024; embed 128)")
    p.add_argument("--max-windows", default="4", help="first N windows, or 'all' (wikitext2)")
    p.add_argument("--limit", default=None, help="first N passages (lambada) / sentences (embed)")
    p.add_argument("--calib-windows", default="2",
                   help="windows from the corpus END to fit pca/qaware bases (disjoint)")
    p.add_argument("--rope", default="post", help="compress keys post- or pre-RoPE")
    p.add_argument("--seed", default="0", help="seeds torch before every row and the bootstrap")
    p.add_argument("--n-boot", default="1000", help="bootstrap resamples for the 95%% interval")
    p.add_argument("--data-dir", default=None, help="corpora folder (else $KVTHEORY_DATA, else Hub)")
    p.add_argument("--text-file", default=None, help="score this UTF-8 text instead of WikiText-2")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--device-map", default=None,
                   help="place layers with accelerate: auto, balanced, sequential or JSON "
                        "{module: device} (for models beyond one device)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--batch-size", default="16", help="LAMBADA / embed batch (same-length only)")
    p.add_argument("--threads", default=None,
                   help="torch CPU threads (default: torch's; 1 is far faster on a busy machine)")
    p.add_argument("--json", default=None, help="result file (default: derived from the config)")
    p.add_argument("--results-dir", default="results", help="root of derived result paths")
    p.add_argument("--overwrite", action="store_true", help="replace a file of another config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _int(name: str, text: Any, allow_all: bool = False) -> int | None:
    if text is None or (allow_all and str(text).lower() == "all"):
        return None
    try:
        return int(str(text))
    except ValueError:
        raise bad_argument(name, text, "an integer" + (" or 'all'" if allow_all else "")) from None


def config_from_args(args: argparse.Namespace):
    """The validated :class:`~kvtheory.config.EvalConfig` of the command line."""
    from ..config import EvalConfig

    return EvalConfig(
        model=args.model, task=args.task, methods=args.methods, targets=args.targets,
        seq_len=_int("seq_len", args.seq_len), max_windows=_int("max_windows", args.max_windows, True),
        limit=_int("limit", args.limit), calib_windows=_int("calib_windows", args.calib_windows),
        rope=args.rope, seed=_int("seed", args.seed), data_dir=args.data_dir,
        text_file=args.text_file, device=args.device, device_map=args.device_map, dtype=args.dtype,
        n_boot=_int("n_boot", args.n_boot),
    )


def run(args: argparse.Namespace) -> int:
    from ..runs import format_table, run_eval

    cfg = config_from_args(args)
    threads = _int("threads", args.threads)
    batch_size = _int("batch_size", args.batch_size)
    if threads is not None:
        if not 1 <= threads <= 4096:
            raise bad_argument("threads", threads, "an integer in 1..4096")
        import torch

        torch.set_num_threads(threads)
    out = run_eval(cfg, args.json, results_dir=args.results_dir, overwrite=args.overwrite,
                   progress=not args.no_progress, batch_size=batch_size, log=lambda m: None)
    print(format_table(out["records"]))
    if cfg.task == "lambada":
        print(LAMBADA_CONVENTION)
    print(f"({len(out['computed'])} rows computed, {len(out['skipped'])} resumed) -> {out['path']}")
    if out["failed"]:
        rows = "; ".join(f"{m}/{t} ({why})" for m, t, why in out["failed"])
        print(f"kvtheory eval: error: {len(out['failed'])} rows not saved, their metric is not "
              f"finite: {rows[:300]}; expected finite metrics (a rerun computes them again)",
              file=sys.stderr)
        return 1
    return 0
