r"""``kvtheory eval``: a model under KV compression, one resumable JSON record per (method, target).

Tasks: ``wikitext2`` (perplexity; metric ``ppl``), ``lambada`` (metric ``accuracy``; the
record also carries ``target_ppl`` under ``metrics``), ``embed`` (encoders such as
``minilm-l6``: metric ``cosine`` of mean-pooled embeddings to the uncompressed model; also
``hidden_rel_err`` under ``metrics``).

The result file (``--json``, else ``results/eval/<model>/<task>/...json``) holds::

    {"kind": "kvtheory.eval", "format": 1, "config": {...}, "config_hash": "...",
     "provenance": {...}, "calibration": {...}, "records": [...], "runs": [...]}

Each record: ``method, target, keys, values, bits_per_element`` (mean over the compressed
tensors), ``bits_k, bits_v, cache_bits_per_element`` (mean over K and V, fp16 = 16), all from
:func:`kvtheory.ledger.bits_per_element` with a fitted basis amortised over ``bits_tokens`` =
``seq_len`` tokens (the same convention for every task),
``metric, value, ci_low, ci_high, n_tokens, n_items, metrics`` (every metric of the task),
``calibration``, ``elapsed_s`` and ``provenance`` (versions, git sha, seed, data SHA-256, model).
The file is rewritten atomically after every finished row. A rerun with the same config skips
the rows already there (resume; ``runs`` logs what each run computed); a different config at
the same path is an error unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import KVTheoryError, bad_argument

NAME = "eval"
HELP = "perplexity / LAMBADA / encoder fidelity of a model under KV compression (resumable JSON)"
FORMAT = 1


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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
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
        text_file=args.text_file, device=args.device, dtype=args.dtype,
        n_boot=_int("n_boot", args.n_boot),
    )


def check_writable(path: Path) -> None:
    """Fail now, before any computing, when ``path`` cannot be written."""
    from ..io import _ensure_dir

    folder = path.parent
    _ensure_dir(path, "json")  # checks the nearest existing folder before creating any
    if path.is_dir():
        raise bad_argument("json", str(path), "a file path, not a folder")
    mode_ro = not (folder.stat().st_mode & 0o222)  # no write bit: read-only even for root
    try:
        if mode_ro or not os.access(folder, os.W_OK):
            raise PermissionError
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise KVTheoryError(f"json: got {str(path)!r}; expected a path in a writable folder "
                            f"({str(folder)!r} is read-only)") from None


def load_previous(path: Path, cfg, overwrite: bool) -> dict[str, Any] | None:
    """The saved result to resume, None to start afresh; error for another config."""
    from ..io import read_json

    if overwrite or not path.exists():
        return None
    try:
        data = read_json(path, arg="json")
    except KVTheoryError:
        raise KVTheoryError(f"json: got {str(path)!r}, which is not a readable kvtheory eval "
                            "result; expected a result file to resume, or pass --overwrite") from None
    if not isinstance(data, dict) or data.get("kind") != "kvtheory.eval":
        raise KVTheoryError(f"json: got {str(path)!r}, which is not a kvtheory eval result; "
                            "expected a result file to resume, or pass --overwrite")
    if data.get("config_hash") != cfg.hash():
        old = data.get("config", {}) or {}
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in cfg.identity().items()
                if k != "text_file" and old.get(k) != v] or ["config hash"]
        raise KVTheoryError(f"json: got {str(path)!r}, saved for a different config "
                            f"({'; '.join(diff)[:200]}); expected the same config to resume, "
                            "or pass --overwrite or another --json")
    return data


def _table(records: list[dict[str, Any]]) -> str:
    head = f"{'method':<18} {'target':<6} {'bits':>6} {'metric':<10} {'value':>10}  {'95% CI':<21} {'tokens':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        ci = f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
        lines.append(f"{r['method']:<18} {r['target']:<6} {r['bits_per_element']:>6.3f} "
                     f"{r['metric']:<10} {r['value']:>10.4f}  {ci:<21} {r['n_tokens']:>8d}")
    return "\n".join(lines)


def _roles(method: str, target: str) -> tuple[str, str]:
    return (method if "k" in target else "fp", method if "v" in target else "fp")


class Job:
    """Data, model and windows of one eval run; :meth:`row` computes one (method, target)."""

    def __init__(self, cfg, *, progress: bool = True, batch_size: int | None = 16) -> None:
        self.cfg, self.progress = cfg, progress
        self.batch_size = 16 if batch_size is None else batch_size
        self.data: dict[str, Any] = {}
        self._reference = None

    # ---------------------------------------------------------------- data
    def load_data(self) -> None:
        """Read (and SHA-check) the corpora; empty text is an error here, before any model."""
        from ..data import load_corpus
        from ..io import sha256_bytes

        cfg = self.cfg
        if cfg.text_file is not None:
            try:
                raw = Path(cfg.text_file).read_bytes()
                self.text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise bad_argument("text_file", cfg.text_file,
                                   f"a readable UTF-8 text file ({type(exc).__name__})") from None
            self.data["text"] = {"corpus": "text_file", "source": str(cfg.text_file),
                                 "sha256": sha256_bytes(raw), "verified": False}
        else:
            corpus = load_corpus("wikitext2", cfg.data_dir)
            self.text, self.data["wikitext2"] = corpus.text, corpus.provenance()
        if not self.text.strip():
            raise bad_argument("text", self.text[:20], "a non-empty text "
                               f"({cfg.text_file or 'wikitext2'} is empty)")
        if cfg.task == "lambada":
            lam = load_corpus("lambada", cfg.data_dir, cfg.limit)
            self.passages, self.data["lambada"] = lam.passages, lam.provenance()

    def prov(self) -> dict[str, Any]:
        import torch

        return {"model": self.cfg.model, "task": self.cfg.task, "threads": torch.get_num_threads(),
                "data_sha256": {k: v["sha256"] for k, v in self.data.items()}, "data": self.data}

    # ---------------------------------------------------------------- model
    def load_model(self) -> None:
        from .. import evaluate as ev
        from ..models import load_model

        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass
        cfg = self.cfg
        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        self.model, self.tok, self.info = lm.model, lm.tokenizer, lm.info
        if self.tok is None:
            raise bad_argument("model", cfg.model, "a model folder that includes its tokenizer")
        if cfg.task in ("wikitext2", "lambada") and not self.info.has_lm_head:
            raise bad_argument("task", cfg.task, f"embed for model {cfg.model!r}, which has no LM "
                               "head (wikitext2 and lambada need a causal LM)")
        ev.check_seq_len(self.model, cfg.seq_len)
        ids = ev.tokenize(self.tok, self.text)
        max_w = cfg.max_windows if cfg.task == "wikitext2" else None
        self.windows, self.calib = ev.split_windows(ids, cfg.seq_len, max_w, cfg.calib_windows)
        n, tail = int(ids.numel()), cfg.calib_windows * cfg.seq_len
        self._calib_info = {
            "source": next(iter(self.data)), "sha256": next(iter(self.data.values()))["sha256"],
            "windows": cfg.calib_windows, "seq_len": cfg.seq_len, "token_range": [n - tail, n],
            "corpus_tokens": n, "disjoint": True,
            "note": "the last calib_windows*seq_len tokens of the text; used only by bases that "
                    "need fitting (pca, pcac, qaware, identity)"}
        if cfg.task == "wikitext2":
            self._calib_info["eval_token_range"] = [0, int(self.windows.numel())]
        elif cfg.task == "lambada":
            self.items = ev.lambada_items(self.tok, self.passages)
        else:
            if 2 * tail > n:
                raise bad_argument("calib_windows", cfg.calib_windows, f"calibration tokens "
                                   f"({tail}) at most half of the text ({n} tokens)")
            sentences = ev.wiki_sentences(self.text[: len(self.text) // 2], cfg.limit or 256)
            self.batches = ev.embed_batches(self.tok, sentences, self.info.max_positions,
                                            self.batch_size)
            self._calib_info["eval"] = f"{len(sentences)} sentences from the first half of the text"

    def calibration_info(self) -> dict[str, Any]:
        return self._calib_info

    # ---------------------------------------------------------------- rows
    def row(self, method: str, target: str) -> dict[str, Any]:
        from .. import evaluate as ev
        from ..io import provenance
        from ..ledger import bits_per_element

        cfg, t0 = self.cfg, time.perf_counter()
        ev.seed_everything(cfg.seed)  # every row starts from the same RNG state (resume-safe)
        keys, values = _roles(method, target)
        kw = dict(keys=keys, values=values, calibration=self.calib, rope=cfg.rope)
        if cfg.task == "wikitext2":
            scores = {"ppl": ev.perplexity(self.model, self.windows, n_boot=cfg.n_boot,
                                           seed=cfg.seed, progress=self.progress, **kw)}
        elif cfg.task == "lambada":
            scores = ev.lambada(self.model, self.items, batch_size=self.batch_size,
                                n_boot=cfg.n_boot, seed=cfg.seed, progress=self.progress, **kw)
        else:
            if self._reference is None:
                self._reference = ev.embed_hidden(self.model, self.batches, progress=self.progress)
            hidden = ev.embed_hidden(self.model, self.batches, progress=self.progress, **kw)
            scores = ev.embed_fidelity(self._reference, hidden, n_boot=cfg.n_boot, seed=cfg.seed)
        main = next(iter(scores.values()))
        d, T = self.info.d, cfg.seq_len  # one convention for every task: T = seq_len
        bits_k = bits_per_element(keys, d, T, role="k")
        bits_v = bits_per_element(values, d, T, role="v")
        comp = [b for b, role in ((bits_k, "k"), (bits_v, "v")) if role in target]
        return {
            "method": method, "target": target, "keys": keys, "values": values,
            "bits_per_element": sum(comp) / len(comp), "bits_k": bits_k, "bits_v": bits_v,
            "cache_bits_per_element": (bits_k + bits_v) / 2, "bits_tokens": T,
            "metric": main.metric, "value": main.value, "ci_low": main.ci_low,
            "ci_high": main.ci_high, "n_tokens": main.n_tokens, "n_items": main.n_items,
            "metrics": {k: {"value": s.value, "ci_low": s.ci_low, "ci_high": s.ci_high}
                        for k, s in scores.items()},
            "calibration": "fitted bases: last {windows}x{seq_len} tokens of {source} "
                           "(disjoint from the evaluated tokens)".format(**self._calib_info),
            "elapsed_s": round(time.perf_counter() - t0, 3),
            "provenance": provenance(seed=cfg.seed, config_hash=cfg.hash(), **self.prov()),
        }


def compute_row(job, method: str, target: str) -> dict[str, Any]:
    """Evaluate one (method, target) of ``job`` (tests wrap this to interrupt a run)."""
    return job.row(method, target)


def run(args: argparse.Namespace) -> int:
    from ..io import provenance, to_jsonable, write_json

    cfg = config_from_args(args)
    threads = _int("threads", args.threads)
    if threads is not None:
        if threads < 1:
            raise bad_argument("threads", threads, "an integer >= 1")
        import torch

        torch.set_num_threads(threads)
    path = Path(args.json) if args.json else cfg.result_path(args.results_dir)
    check_writable(path)
    prev = load_previous(path, cfg, args.overwrite)
    done = {(r["method"], r["target"]): r for r in (prev or {}).get("records", [])}
    grid = [(m, t) for m in cfg.methods for t in cfg.targets]
    todo = [mt for mt in grid if mt not in done]
    batch_size = _int("batch_size", args.batch_size)
    job = Job(cfg, progress=not args.no_progress, batch_size=batch_size)
    job.load_data()  # corpus SHA-256 and empty text are checked before the model loads
    run_log = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "computed": [],
               "skipped": [list(mt) for mt in grid if mt in done], "finished": None}
    old_sha = ((prev or {}).get("provenance") or {}).get("data_sha256")
    if old_sha is not None and old_sha != job.prov()["data_sha256"]:
        raise KVTheoryError(f"json: got {str(path)!r}, saved for other data (SHA-256 "
                            f"{old_sha} vs {job.prov()['data_sha256']}); expected the same data to "
                            "resume, or pass --overwrite")
    if todo:
        job.load_model()
    data = {
        "kind": "kvtheory.eval", "format": FORMAT, "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "provenance": (prev or {}).get("provenance") or provenance(seed=cfg.seed, **job.prov()),
        "calibration": job.calibration_info() if todo else (prev or {}).get("calibration"),
        "records": list(done.values()), "runs": list((prev or {}).get("runs", [])) + [run_log],
    }
    from tqdm.auto import tqdm

    for method, target in tqdm(todo, desc="rows", disable=args.no_progress or not todo):
        record = compute_row(job, method, target)
        data["records"].append(record)
        run_log["computed"].append([method, target])
        write_json(path, to_jsonable(data), arg="json")
    order = {mt: i for i, mt in enumerate(grid)}
    data["records"].sort(key=lambda r: order.get((r["method"], r["target"]), len(order)))
    run_log["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(path, to_jsonable(data), arg="json")
    print(_table(data["records"]))
    print(f"({len(run_log['computed'])} rows computed, {len(run_log['skipped'])} resumed) -> {path}")
    return 0
