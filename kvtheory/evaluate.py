r"""Model-level evaluation under KV compression: perplexity, LAMBADA, encoder fidelity.

Every function runs the model inside :func:`kvtheory.patch.compressed_kv` (unless both
``keys`` and ``values`` are None, which runs the bare model) and returns :class:`Score`
values with a seeded bootstrap 95% interval.

**Perplexity** over non-overlapping windows :math:`w` of :math:`L` tokens, each scored on its
own (no carried context), :math:`L-1` predicted tokens per window:

.. math:: \mathrm{PPL} = \exp\Big(\frac{\sum_w \sum_{t=1}^{L-1} -\log p(x_{w,t+1}\mid x_{w,\le t})}
          {\sum_w (L-1)}\Big).

**Bootstrap.** The resampling unit is the independent item: the window (PPL), the passage
(LAMBADA), the sentence (embeddings). Each of ``n_boot`` resamples draws items with
replacement and recomputes the ratio statistic :math:`f(\sum \text{num} / \sum \text{den})`;
the interval is the 2.5% and 97.5% percentiles (torch generator seeded with ``seed``).

**LAMBADA** (OpenAI version): target = last whitespace-separated word; a passage is correct
iff every target token is the greedy argmax given the context and the earlier target tokens;
target-word perplexity :math:`\exp(\frac1N \sum_n -\log p(\text{word}_n\mid\text{context}_n))`
(per word, as lm-eval-harness reports it). Passages are batched only with passages of the
same token length, so no padding can leak into compression statistics.

**Encoders** (``minilm-l6``, no LM head): relative error of the last hidden states
:math:`\sqrt{\sum\|H-H_0\|^2/\sum\|H_0\|^2}` and the mean cosine similarity of mean-pooled
sentence embeddings to the uncompressed model's.

>>> bootstrap_ci(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), n_boot=200)[0] <= 2.0
True
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import random
import weakref
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import check_int
from ._hf import check_fits, context_length, model_device
from .data import split_lambada
from .errors import KVTheoryError, bad_argument

__all__ = [
    "Score", "seed_everything", "tokenize", "bos_id", "max_positions", "check_seq_len", "split_windows",
    "bootstrap_ci", "window_nll", "perplexity", "lambada_items", "lambada", "wiki_sentences",
    "embed_batches", "embed_hidden", "embed_fidelity",
]


@dataclass(frozen=True)
class Score:
    """One metric with its bootstrap 95% interval; ``n_tokens`` scored, ``n_items`` resampled.

    With a single item there is no interval: ``ci_low`` and ``ci_high`` are NaN."""

    metric: str
    value: float
    ci_low: float
    ci_high: float
    n_tokens: int
    n_items: int


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic algorithms."""
    seed = check_int("seed", seed, 0, 2**63 - 1)  # torch seeds are signed 64-bit
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------- tokens
_TOKEN_CACHE: "weakref.WeakKeyDictionary[Any, dict[tuple[int, str], Tensor]]" = (
    weakref.WeakKeyDictionary()
)


def _need_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise bad_argument("tokenizer", tokenizer, "the model's tokenizer (this model folder was saved "
                           "without one: save it with tokenizer.save_pretrained(folder))")


def bos_id(tokenizer: Any) -> int | None:
    r"""The BOS id the tokenizer adds by default, else None: **the one tokenization rule**.

    Text is tokenized without special tokens (:func:`tokenize`); then every evaluation and
    calibration window (:func:`split_windows`) and every LAMBADA context
    (:func:`lambada_items`) starts with BOS exactly when ``tokenizer(text)`` itself would put
    one first (Gemma: yes; SmolLM2, Qwen2.5, GPT-2: no), as lm-eval-harness does. BERT-style
    ``[CLS]`` is not a BOS (``bos_token_id`` is None).

    >>> from transformers import PreTrainedTokenizerFast
    >>> from tokenizers import Tokenizer, models, pre_tokenizers, processors
    >>> t = Tokenizer(models.WordLevel({"<s>": 0, "a": 1}, unk_token="<s>"))
    >>> t.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> plain = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>")
    >>> bos_id(plain)  # adds nothing
    >>> t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    >>> bos_id(PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>"))
    0
    """
    _need_tokenizer(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return None
    with_special = list(tokenizer("a", verbose=False)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def tokenize(tokenizer: Any, text: str) -> Int[Tensor, " token"]:
    """Token ids of ``text`` without special tokens, cached in memory per tokenizer."""
    _need_tokenizer(tokenizer)
    if not isinstance(text, str) or not text.strip():
        raise bad_argument("text", text if isinstance(text, str) else type(text).__name__,
                           "a non-empty text")
    key = (len(text), hashlib.sha256(text.encode("utf-8")).hexdigest())
    try:
        cache = _TOKEN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # tokenizer not weak-referenceable: no cache
        cache = {}
    if key not in cache:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) == 0:
            raise bad_argument("text", text, "a text that yields at least one token")
        cache[key] = torch.tensor(ids, dtype=torch.long)
    return cache[key]


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length from its config (None when it has no limit)."""
    return context_length(model)


def check_seq_len(model: torch.nn.Module, seq_len: int, name: str = "seq_len") -> int:
    """``seq_len`` must be in 2..context length of ``model``."""
    limit = max_positions(model)
    seq_len = check_int(name, seq_len, 2)
    if limit is not None and seq_len > limit:
        raise KVTheoryError(f"{name}: got {seq_len}; expected at most {limit} tokens, the "
                            "context length of the model (max_position_embeddings)")
    return seq_len


def split_windows(
    ids: Int[Tensor, " token"], seq_len: int, max_windows: int | None = None, calib_windows: int = 0,
    bos: int | None = None,
) -> tuple[Int[Tensor, "_batch _token"], Int[Tensor, "_batch _token"]]:
    r"""Evaluation windows from the START and calibration windows from the END of ``ids``.

    Each window holds :math:`s = L` text tokens, or BOS followed by :math:`s = L - 1` text
    tokens when ``bos`` is an id (:func:`bos_id` of the tokenizer), so every window is ``L``
    tokens long and predicts :math:`L - 1` text tokens. With :math:`n` tokens and :math:`c`
    calibration windows, calibration takes ``ids[n - c s:]`` and evaluation the first
    :math:`\min(N, \lfloor (n - cs)/s \rfloor)` windows, so the two never share a token.
    Returns ``(eval (W, L), calib (c, L))``.

    >>> e, c = split_windows(torch.arange(10), 3, calib_windows=1)
    >>> e.tolist(), c.tolist()
    ([[0, 1, 2], [3, 4, 5]], [[7, 8, 9]])
    >>> e, c = split_windows(torch.arange(10), 3, calib_windows=1, bos=99)
    >>> e.tolist(), c.tolist()
    ([[99, 0, 1], [99, 2, 3], [99, 4, 5], [99, 6, 7]], [[99, 8, 9]])
    """
    if not isinstance(ids, Tensor) or ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
        raise bad_argument("ids", ids, "integer token ids shaped (token,)")
    seq_len = check_int("seq_len", seq_len, 2 if bos is None else 3)
    calib_windows = check_int("calib_windows", calib_windows, 0)
    if bos is not None:
        bos = check_int("bos", bos, 0)
    span = seq_len - (bos is not None)
    n, tail = int(ids.numel()), calib_windows * span
    if n < tail + span:
        raise KVTheoryError(
            f"text: got {n} tokens; expected at least {tail + span} ({calib_windows} "
            f"calibration + 1 evaluation window of seq_len={seq_len}); use a longer text or a "
            "smaller --seq-len / --calib-windows")
    avail = (n - tail) // span
    k = avail if max_windows is None else min(avail, check_int("max_windows", max_windows, 1))
    ev, cal = ids[: k * span].view(k, span), ids[n - tail:].view(calib_windows, span)
    if bos is None:
        return ev, cal
    return (torch.cat([ev.new_full((k, 1), bos), ev], 1),
            torch.cat([cal.new_full((calib_windows, 1), bos), cal], 1))


def bootstrap_ci(
    num: Float[Tensor, " item"], den: Float[Tensor, " item"], *,
    transform: Callable[[Tensor], Tensor] = lambda r: r, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    r"""Percentile bootstrap of :math:`f(\sum_i \text{num}_i / \sum_i \text{den}_i)` over items."""
    n_boot = check_int("n_boot", n_boot, 1)
    num, den = num.detach().double().cpu(), den.detach().double().cpu()
    if num.numel() < 2:
        raise bad_argument("num", num, "at least two items (a bootstrap interval resamples items; "
                           "one item gives an interval of zero width)")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, num.numel(), (n_boot, num.numel()), generator=gen)
    stats = transform(num[idx].sum(1) / den[idx].sum(1))
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(stats, q).tolist()
    return float(lo), float(hi)


def _score(metric: str, num: Tensor, den: Tensor, f: Callable[[Tensor], Tensor], n_tokens: int,
           n_boot: int, seed: int) -> Score:
    value = float(f(num.double().sum() / den.double().sum()))
    if num.numel() < 2:  # no interval from one item: NaN, saved as null with a note
        lo = hi = float("nan")
    else:
        lo, hi = bootstrap_ci(num, den, transform=f, n_boot=n_boot, seed=seed)
    return Score(metric, value, lo, hi, int(n_tokens), int(num.numel()))


@contextlib.contextmanager
def _compressed(model, keys, values, calibration, rope):
    if keys is None and values is None and not isinstance(calibration, dict):
        yield  # nothing to compress (a fitted plan alone is applied, not ignored)
        return
    from .patch import compressed_kv

    with compressed_kv(model, keys=keys, values=values,
                       calibration=calibration, rope=rope):
        yield


def _device(model: torch.nn.Module) -> torch.device:
    return model_device(model)


# ----------------------------------------------------------------------------- perplexity
def _check_windows(windows: Any) -> None:
    if (not isinstance(windows, Tensor) or windows.ndim != 2 or windows.shape[0] < 1
            or windows.shape[1] < 2 or windows.is_floating_point() or windows.is_complex()):
        raise bad_argument("windows", windows, "integer token ids shaped (windows, seq_len), "
                           "seq_len >= 2")


@torch.inference_mode()
def window_nll(
    model: torch.nn.Module, windows: Int[Tensor, "batch token"], *, progress: bool = False
) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Summed next-token NLL (float64) and predicted-token count of each window, one by one."""
    _check_windows(windows)
    check_seq_len(model, windows.shape[-1], "windows")
    check_fits(model, windows, "windows")
    dev, nll = _device(model), []
    for w in tqdm(windows, desc="windows", leave=False, disable=not progress):
        logits = model(input_ids=w[None].to(dev), use_cache=False).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits.float(), w[1:].to(dev), reduction="none")
        nll.append(ce.double().sum().cpu())
    counts = torch.full((windows.shape[0],), windows.shape[1] - 1, dtype=torch.long)
    return torch.stack(nll), counts


def perplexity(
    model: torch.nn.Module, windows: Int[Tensor, "batch token"], *, keys: Any = None,
    values: Any = None, calibration: Any = None, rope: str = "post", n_boot: int = 1000,
    seed: int = 0, progress: bool = False,
) -> Score:
    """Perplexity of ``windows`` (W, L) under ``compressed_kv(model, keys, values, ...)``.

    ``calibration``: input ids (c, L) or fitted compressors for data-dependent bases; they
    must be disjoint from ``windows`` (see :func:`split_windows`).

    A model whose logits are all zero predicts uniformly, so its PPL is the vocabulary size:

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20)).eval()
    >>> _ = m.lm_head.weight.data.zero_()
    >>> s = perplexity(m, torch.randint(0, 20, (2, 8)), n_boot=10)
    >>> round(s.value, 4), round(s.ci_low, 4), s.n_tokens
    (20.0, 20.0, 14)
    """
    _check_windows(windows)
    with _compressed(model, keys, values, calibration, rope):
        nll, cnt = window_nll(model, windows, progress=progress)
    return _score("ppl", nll, cnt.double(), torch.exp, int(cnt.sum()), n_boot, seed)


# ----------------------------------------------------------------------------- LAMBADA
def lambada_items(tokenizer: Any, passages: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) per passage, tokenized without special tokens.

    With ``sep`` the whitespace before the last word (normally ``" "``), the target ids are
    the tail of ``tok(context + sep + word)`` after ``tok(context)`` when that is a prefix (so
    the context is scored exactly as tokenized alone), else ``tok(sep + word)``. The context
    starts with BOS when the tokenizer adds one (:func:`bos_id`, e.g. Gemma).
    """
    _need_tokenizer(tokenizer)
    if len(passages) == 0:
        raise bad_argument("passages", passages, "at least one LAMBADA passage")
    bos = bos_id(tokenizer)

    def enc(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"])

    items = []
    for p in passages:
        ctx, word = split_lambada(p)
        sep = p.rstrip()[len(ctx): -len(word)]
        c, whole = enc(ctx), enc(ctx + sep + word)
        t = whole[len(c):] if whole[: len(c)] == c and len(whole) > len(c) else enc(sep + word)
        if not c or not t:
            raise bad_argument("passage", p, "a context and a target word that both tokenize")
        items.append(([bos] + c if bos is not None else c, t))
    return items


@torch.inference_mode()
def _last_logits(model, ids: Tensor, keep: int) -> Tensor:
    try:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, -keep:]
    except TypeError:  # models without logits_to_keep
        return model(input_ids=ids, use_cache=False).logits[:, -keep:]


def _check_items(model: torch.nn.Module, items: Any) -> None:
    """Each item a (context, target) pair of non-empty integer id lists inside the vocabulary."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None),
                                                           "vocab_size", None)
    for i, item in enumerate(items):
        try:
            c, t = item
            c, t = list(c), list(t)
        except (TypeError, ValueError):
            raise bad_argument(f"items[{i}]", item, "a (context ids, target ids) pair") from None
        for name, ids in (("context", c), ("target", t)):
            if not ids:
                raise bad_argument(f"items[{i}]", item, f"a non-empty {name} (at least one token id)")
            if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in ids):
                raise bad_argument(f"items[{i}]", item, f"integer token ids in its {name}")
            lo, hi = min(ids), max(ids)
            if lo < 0 or (isinstance(vocab, int) and hi >= vocab):
                raise bad_argument(f"items[{i}]", item, f"{name} ids in 0..{vocab - 1 if vocab else 'vocab'}"
                                   f" (got ids in {lo}..{hi}), the vocabulary of the model")


def lambada(
    model: torch.nn.Module, items: Sequence[tuple[Sequence[int], Sequence[int]]], *,
    keys: Any = None, values: Any = None, calibration: Any = None, rope: str = "post",
    batch_size: int = 16, n_boot: int = 1000, seed: int = 0, progress: bool = False,
) -> dict[str, Score]:
    """LAMBADA accuracy and target-word perplexity of ``items`` (see :func:`lambada_items`).

    Returns ``{"accuracy": Score, "target_ppl": Score}``.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    if len(items) == 0:
        raise bad_argument("items", items, "at least one (context, target) pair")
    _check_items(model, items)
    limit = max_positions(model)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (c, t) in enumerate(items):
        n = len(c) + len(t) - 1
        if limit is not None and n > limit:
            raise KVTheoryError(f"passage {i}: got {n} tokens; expected at most {limit}, "
                                "the context length of the model")
        groups.setdefault((n, len(t)), []).append(i)
    batches = [(k, g[s:s + batch_size]) for k, g in sorted(groups.items())
               for s in range(0, len(g), batch_size)]
    correct = torch.zeros(len(items), dtype=torch.float64)
    nll = torch.zeros(len(items), dtype=torch.float64)
    dev = _device(model)
    with _compressed(model, keys, values, calibration, rope):
        for (_, keep), idx in tqdm(batches, desc="passages", leave=False, disable=not progress):
            ids = torch.tensor([list(items[i][0]) + list(items[i][1])[:-1] for i in idx])
            tgt = torch.tensor([list(items[i][1]) for i in idx]).to(dev)
            logits = _last_logits(model, ids.to(dev), keep).float()
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
            correct[idx] = (logits.argmax(-1) == tgt).all(-1).double().cpu()
            nll[idx] = -lp.double().sum(-1).cpu()
    ones = torch.ones(len(items), dtype=torch.float64)
    n_tgt = sum(len(t) for _, t in items)
    return {
        "accuracy": _score("accuracy", correct, ones, lambda r: r, n_tgt, n_boot, seed),
        "target_ppl": _score("target_ppl", nll, ones, torch.exp, n_tgt, n_boot, seed),
    }


# ----------------------------------------------------------------------------- encoders
def wiki_sentences(text: str, limit: int | None = None, min_words: int = 5) -> list[str]:
    """Sentences of raw WikiText (headings dropped; split at ``" . "``), the first ``limit``."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in line.split(" . "):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s if s.endswith(".") else s + " .")
                if limit is not None and len(out) >= limit:
                    return out
    if not out:
        raise bad_argument("text", text[:40], f"text with sentences of at least {min_words} words")
    return out


def embed_batches(tokenizer: Any, sentences: Sequence[str], max_len: int | None = None,
                  batch_size: int = 32) -> list[tuple[list[int], Tensor]]:
    """Sentences tokenized WITH special tokens, grouped by equal length (no padding)."""
    if len(sentences) == 0:
        raise bad_argument("sentences", sentences, "at least one sentence")
    kw = {"truncation": True, "max_length": max_len} if max_len else {}
    ids = [tokenizer(s, verbose=False, **kw)["input_ids"] for s in sentences]
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        groups.setdefault(len(x), []).append(i)
    return [(g[s:s + batch_size], torch.tensor([ids[i] for i in g[s:s + batch_size]]))
            for _, g in sorted(groups.items()) for s in range(0, len(g), batch_size)]


@torch.inference_mode()
def embed_hidden(model: torch.nn.Module, batches: Sequence[tuple[list[int], Tensor]], *,
                 keys: Any = None, values: Any = None, calibration: Any = None,
                 rope: str = "post", progress: bool = False) -> list[Tensor]:
    """Last hidden states (token, hidden) per sentence, in sentence order (float64, CPU)."""
    n = sum(len(idx) for idx, _ in batches)
    out: list[Tensor | None] = [None] * n
    dev = _device(model)
    with _compressed(model, keys, values, calibration, rope):
        for idx, ids in tqdm(batches, desc="sentences", leave=False, disable=not progress):
            res = model(input_ids=ids.to(dev), output_hidden_states=True)
            h = res.hidden_states[-1].double().cpu()
            for j, i in enumerate(idx):
                out[i] = h[j]
    return out  # type: ignore[return-value]


def embed_fidelity(reference: Sequence[Tensor], compressed: Sequence[Tensor], *,
                   n_boot: int = 1000, seed: int = 0) -> dict[str, Score]:
    """``{"cosine": mean cos of mean-pooled embeddings, "hidden_rel_err": ...}`` vs reference."""
    if len(reference) != len(compressed) or not reference:
        raise bad_argument("compressed", len(compressed), f"{len(reference)} hidden-state tensors")
    e0 = torch.stack([h.mean(0) for h in reference])
    e1 = torch.stack([h.mean(0) for h in compressed])
    cos = torch.nn.functional.cosine_similarity(e1, e0, dim=-1)
    err = torch.stack([(a - b).pow(2).sum() for a, b in zip(compressed, reference)])
    ref = torch.stack([b.pow(2).sum() for b in reference])
    n_tok = sum(int(h.shape[0]) for h in reference)
    ones = torch.ones_like(cos)
    return {
        "cosine": _score("cosine", cos, ones, lambda r: r, n_tok, n_boot, seed),
        "hidden_rel_err": _score("hidden_rel_err", err, ref, torch.sqrt, n_tok, n_boot, seed),
    }
