r"""One evaluation job: data, model and windows; :meth:`Job.row` computes one (method, target).

Used by :func:`kvtheory.runs.run_eval` (which ``kvtheory eval`` calls).

Tasks: ``wikitext2`` (perplexity; metric ``ppl``), ``lambada`` (metric ``accuracy``; the
record also carries ``target_ppl`` under ``metrics``), ``embed`` (encoders such as
``minilm-l6``: metric ``cosine`` of mean-pooled embeddings to the uncompressed model; also
``hidden_rel_err`` under ``metrics``).

Each record: ``method, target, keys, values, bits_per_element`` (mean over the compressed
tensors), ``bits_k, bits_v, cache_bits_per_element`` (mean over K and V, fp16 = 16), all from
:func:`kvtheory.ledger.bits_per_element` with a fitted basis amortised over ``bits_tokens`` =
``seq_len`` tokens (the same convention for every task),
``metric, value, ci_low, ci_high, n_tokens, n_items, metrics`` (every metric of the task),
``calibration``, ``elapsed_s`` and ``provenance`` (versions, git sha, seed, data SHA-256, model, weights
fingerprint).
``ci_low``/``ci_high`` are null, with a ``ci_note``, when there is a single item (one
window): a bootstrap interval needs at least two. The file (see :mod:`kvtheory.runs`) is
rewritten atomically, under a lock, after every finished row.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .errors import bad_argument

__all__ = ["Job", "compute_row", "roles"]


def roles(method: str, target: str) -> tuple[str, str]:
    """``(keys, values)`` specs of a row: ``method`` on the tensors ``target`` names, else fp.

    >>> roles("int4", "k")
    ('int4', 'fp')
    """
    return (method if "k" in target else "fp", method if "v" in target else "fp")


class Job:
    """Data, model and windows of one eval run; :meth:`row` computes one (method, target)."""

    def __init__(self, cfg, *, progress: bool = True, batch_size: int | None = 16) -> None:
        self.cfg, self.progress = cfg, progress
        self.batch_size = 16 if batch_size is None else batch_size
        self.data: dict[str, Any] = {}
        self.weights: dict[str, Any] | None = None  # set by run_eval (weights_fingerprint)
        self._reference = None

    # ---------------------------------------------------------------- data
    def load_data(self) -> None:
        """Read (and SHA-check) the corpora; empty text is an error here, before any model."""
        from .data import load_corpus
        from .io import sha256_bytes

        cfg = self.cfg
        if cfg.text_file is not None:
            if Path(cfg.text_file).exists() and not Path(cfg.text_file).is_file():
                raise bad_argument("text_file", cfg.text_file, "a regular UTF-8 text file (not a "
                                   "folder, FIFO or device, which could block or never end)")
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
                "bos": getattr(self, "bos", None),  # BOS id starting each window/context, or None
                "data_sha256": {k: v["sha256"] for k, v in self.data.items()}, "data": self.data,
                "weights": self.weights}

    # ---------------------------------------------------------------- model
    def load_model(self) -> None:
        from . import evaluate as ev
        from .models import load_model

        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass
        cfg = self.cfg
        from .placement import parse_device_map

        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype,
                        device_map=parse_device_map(cfg.device_map))
        self.model, self.tok, self.info = lm.model, lm.tokenizer, lm.info
        if self.tok is None:
            raise bad_argument("model", cfg.model, "a model folder that includes its tokenizer")
        if cfg.task in ("wikitext2", "lambada") and not self.info.has_lm_head:
            raise bad_argument("task", cfg.task, f"embed for model {cfg.model!r}, which has no LM "
                               "head (wikitext2 and lambada need a causal LM)")
        ev.check_seq_len(self.model, cfg.seq_len)
        ids = ev.tokenize(self.tok, self.text)
        max_w = cfg.max_windows if cfg.task == "wikitext2" else None
        self.bos = ev.bos_id(self.tok) if cfg.task != "embed" else None  # the tokenization rule
        self.windows, self.calib = ev.split_windows(ids, cfg.seq_len, max_w, cfg.calib_windows,
                                                    bos=self.bos)
        span = cfg.seq_len - (self.bos is not None)  # text tokens per window
        n, tail = int(ids.numel()), cfg.calib_windows * span
        self._calib_info = {
            "source": next(iter(self.data)), "sha256": next(iter(self.data.values()))["sha256"],
            "windows": cfg.calib_windows, "seq_len": cfg.seq_len, "token_range": [n - tail, n],
            "corpus_tokens": n, "disjoint": True,
            "note": "the last calib_windows*seq_len tokens of the text; used only by bases that "
                    "need fitting (pca, pcac, qaware, identity)"}
        if cfg.task == "wikitext2":
            self._calib_info["eval_token_range"] = [0, int(self.windows.shape[0]) * span]
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
        from . import evaluate as ev
        from .io import provenance
        from .ledger import bits_per_element

        cfg, t0 = self.cfg, time.perf_counter()
        ev.seed_everything(cfg.seed)  # every row starts from the same RNG state (resume-safe)
        keys, values = roles(method, target)
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
            **({"ci_note": f"no interval: a bootstrap interval needs at least two items, got "
                           f"{main.n_items}"} if main.n_items < 2 else {}),
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


