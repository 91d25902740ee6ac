r"""A ``kvtheory`` model for lm-evaluation-harness: the harness's own tasks with kvtheory's
compressors inside attention.

Usage (the harness discovers models only through its registry, which this module fills on
import; lm-eval 0.4 has no entry-point discovery of models, so run the harness through this
module, which registers ``kvtheory`` and then hands the command line to lm-eval's CLI)::

    HF_DATASETS_OFFLINE=1 python -m kvtheory.integrations.lmeval --model kvtheory \
        --model_args pretrained=smollm2-135m,keys=int4-kivi,values=int4,calibration_windows=2 \
        --tasks lambada_openai --include_path kvtheory/integrations/tasks --device cpu

(``kvtheory-lm-eval`` is the same as a console script.) In Python: ``import
kvtheory.integrations.lmeval`` then ``lm_eval.simple_evaluate(model="kvtheory", ...)``.

Model arguments: ``pretrained`` (a kvtheory registry name such as ``smollm2-135m``, a local
folder or a Hub id, through :func:`kvtheory.models.load_model`), ``keys``/``values`` (method
specs, default ``fp``), ``rope`` (``post``/``pre``), ``calibration_windows`` (windows of
``calibration_len`` tokens from the END of WikiText-2, for bases fitted on data; the corpus
comes from ``data_dir`` or ``$KVTHEORY_DATA``; default 2 x 1024, as ``kvtheory eval``), ``dtype``;
the rest (``batch_size``, ``device``, ``max_length``, ...) goes to lm-eval's ``HFLM``.

**Padding.** For causal models ``HFLM`` pads a batch on the right and calls the model without
an attention mask. Compression statistics that span tokens (KIVI's per-channel groups, fitted
bases) would then see the pad tokens. This model records the true lengths of the batch (it
wraps the harness's ``pad_and_concat`` while a log-likelihood batch is built) and passes the
matching attention mask, so the padded positions are hidden exactly as the model's own mask
hides them, and token-grouped compressors take their statistics over the real tokens only. In
float32, batched CPU passes still differ from single ones by batch noise (about 1e-6 in the
keys), which KIVI's per-channel rounding can amplify; ``batch_size=1`` or ``dtype=float64``
gives exact scores.

**Scoring conventions** of the offline ``lambada_openai`` task (``tasks/lambada_openai.yaml``):
the harness's own: context = the passage split on single spaces without the last piece,
target = ``" " +`` the last piece, tokenized as ``tok(context + target)`` minus
``tok(context)`` (a BOS only when the tokenizer adds one, as kvtheory's scorer does; none
for SmolLM2); accuracy = all target tokens
greedy; perplexity = exp of the mean target log-likelihood per passage. kvtheory's own scorer
(:func:`kvtheory.evaluate.lambada`) splits at the last whitespace run instead; the two differ
on 6 of the 5,153 passages (426, 1053, 2881, 3047, 3977, 4351, where a newline precedes the
last word) and agree on all others.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import KVTheoryError, bad_argument

__all__ = ["KVTheoryLM", "TASKS_DIR", "LMEVAL_RANGE", "main", "task_dir"]

#: lm-eval versions this model is tested with
LMEVAL_RANGE = ">=0.4.13,<0.5"
#: the offline task configs shipped with kvtheory
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise KVTheoryError(
        f"lm-eval: got no importable package ({type(_exc).__name__}); expected it installed: "
        "pip install 'kvtheory[lmeval]'") from None


def task_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """A folder of task configs whose ``data_files`` point at the local LAMBADA file.

    The shipped YAML reads ``../shared/data`` relative to the working directory (the
    repository root); this writes a copy whose ``data_files`` is the absolute path of the
    corpus in ``data_dir`` (else ``$KVTHEORY_DATA``) under the kvtheory cache and returns its
    folder, to pass as ``--include_path``. Raises when the corpus is missing.
    """
    from ..data import FILES, resolve_data_dir
    from ..io import atomic_write
    from ..models import cache_root

    folder = resolve_data_dir(data_dir)
    if folder is None:
        raise bad_argument("data_dir", data_dir, "a corpora folder (or $KVTHEORY_DATA) holding "
                           f"{FILES['lambada']}")
    path = (folder / FILES["lambada"]).resolve()
    if not path.is_file():
        raise bad_argument("data_dir", str(folder), f"a folder holding {FILES['lambada']}")
    text = (TASKS_DIR / "lambada_openai.yaml").read_text().replace(
        "../shared/data/" + FILES["lambada"], str(path))
    out = cache_root() / "lmeval-tasks"
    atomic_write(out / "lambada_openai.yaml", text)
    return out


@register_model("kvtheory")
class KVTheoryLM(HFLM):
    """lm-eval's ``HFLM`` with the model loaded by kvtheory and run inside
    :func:`kvtheory.patch.compressed_kv` (module docstring)."""

    def __init__(self, pretrained: Any = "smollm2-135m", keys: Any = "fp", values: Any = "fp",
                 rope: str = "post", calibration_windows: Any = 2, calibration_len: Any = 1024,
                 data_dir: Any = None, dtype: str = "float32", device: str = "cpu",
                 **kwargs: Any) -> None:
        from ..compress import make_compressor
        from ..models import load_model

        if not isinstance(pretrained, str):
            raise bad_argument("pretrained", pretrained, "a kvtheory registry name, a folder or a Hub id")
        from ..errors import KVTheoryError as _Err

        try:
            ck, cv = make_compressor(str(keys), "k"), make_compressor(str(values), "v")
        except _Err as exc:
            raise bad_argument("keys/values", f"{keys}/{values}", str(exc).split("expected ")[-1]) from None
        loaded = load_model(pretrained, device=device, dtype=dtype)
        if loaded.tokenizer is None or not loaded.info.has_lm_head:
            raise bad_argument("pretrained", pretrained, "a causal LM with its tokenizer")
        self.kv_keys, self.kv_values, self.kv_rope = str(keys), str(values), rope
        self.calibration = None
        if ck.needs_fit or cv.needs_fit:
            self.calibration = _calibration(loaded, int(calibration_windows), int(calibration_len), data_dir)
        self._pad_lengths: list[int] | None = None
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal",
                         device=device, **kwargs)

    @contextlib.contextmanager
    def compressed(self):
        """The model's attention under this model's compressors while the block runs."""
        from ..patch import compressed_kv

        if self.kv_keys == "fp" and self.kv_values == "fp":
            yield
            return
        with compressed_kv(self.model, keys=self.kv_keys, values=self.kv_values,
                           calibration=self.calibration, rope=self.kv_rope):
            yield

    def _loglikelihood_tokens(self, *args: Any, **kwargs: Any):
        hf = sys.modules[HFLM.__module__]
        original = hf.pad_and_concat

        def recording(max_length, tensors, padding_side="right"):
            self._pad_lengths = [int(t.shape[-1]) for t in tensors] if padding_side == "right" else None
            return original(max_length, tensors, padding_side=padding_side)

        hf.pad_and_concat = recording
        try:
            return super()._loglikelihood_tokens(*args, **kwargs)
        finally:
            hf.pad_and_concat = original
            self._pad_lengths = None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        lengths, self._pad_lengths = self._pad_lengths, None
        mask = None
        if (lengths is not None and len(lengths) == inps.shape[0] and max(lengths) == inps.shape[1]
                and min(lengths) < inps.shape[1]):
            pos = torch.arange(inps.shape[1], device=inps.device)
            mask = (pos[None, :] < torch.tensor(lengths, device=inps.device)[:, None]).long()
        with torch.no_grad(), self.compressed():
            if attn_mask is not None or labels is not None:  # pragma: no cover - seq2seq only
                return super()._model_call(inps, attn_mask, labels)
            return self.model(input_ids=inps, attention_mask=mask).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self.compressed():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def _calibration(loaded, windows: int, length: int, data_dir) -> torch.Tensor:
    """The last ``windows`` x ``length`` tokens of WikiText-2 (disjoint from any harness task)."""
    from ..data import load_wikitext2
    from ..evaluate import split_windows, tokenize

    if windows < 1:
        raise bad_argument("calibration_windows", windows, "at least 1 for a basis fitted on data")
    ids = tokenize(loaded.tokenizer, load_wikitext2(data_dir))
    return split_windows(ids, length, 1, windows)[1]


def main(argv: list[str] | None = None) -> None:
    """Register ``kvtheory`` and run lm-eval's command line (``lm_eval ...`` arguments)."""
    cli = importlib.import_module("lm_eval.__main__")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli.cli_evaluate()


if __name__ == "__main__":
    main()
