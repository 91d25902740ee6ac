"""The tokenization rule: BOS first exactly where the model's tokenizer adds one (Gemma), in
evaluation and calibration windows, LAMBADA contexts, ``kvtheory capture`` and ``kvtheory eval``
(recorded as provenance ``bos``); tokenizers without BOS (SmolLM2, Qwen, GPT-2) are unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny import WORDS, save_tiny, tiny_tokenizer
from tol import assert_close

import kvtheory.evaluate as ev
from kvtheory.errors import KVTheoryError

BOS = len(WORDS)  # an id of its own, inside the tiny vocabulary of 64


def bos_tokenizer():
    """:func:`tiny_tokenizer` plus a ``<bos>`` token that the tokenizer puts first, as Gemma's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"<bos>": BOS}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<bos>")


def test_bos_id_follows_the_tokenizer():
    assert ev.bos_id(bos_tokenizer()) == BOS
    assert ev.bos_id(tiny_tokenizer()) is None  # no BOS token at all
    plain = tiny_tokenizer()
    plain.bos_token = "the"  # a BOS token the tokenizer does not add: no BOS
    assert plain.bos_token_id == 1 and ev.bos_id(plain) is None
    # text itself is always tokenized without special tokens
    assert ev.tokenize(bos_tokenizer(), "the of and").tolist() == [1, 2, 3]


def test_split_windows_with_bos_by_hand():
    ids = torch.arange(20)
    e, c = ev.split_windows(ids, 5, max_windows=3, calib_windows=2, bos=99)
    # 4 text tokens per window; calibration = the last 2 x 4 tokens, evaluation from the start
    assert e.tolist() == [[99, 0, 1, 2, 3], [99, 4, 5, 6, 7], [99, 8, 9, 10, 11]]
    assert c.tolist() == [[99, 12, 13, 14, 15], [99, 16, 17, 18, 19]]
    e0, c0 = ev.split_windows(ids, 5, max_windows=3, calib_windows=2)  # without BOS: unchanged
    assert e0.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and c0.tolist() == [[10, 11, 12, 13, 14],
                                                                                    [15, 16, 17, 18, 19]]
    with pytest.raises(KVTheoryError, match="seq_len"):
        ev.split_windows(ids, 2, bos=99)  # BOS + 1 token predicts nothing of the text
    with pytest.raises(KVTheoryError, match="bos"):
        ev.split_windows(ids, 5, bos=-1)


def test_lambada_contexts_start_with_bos_only_where_the_tokenizer_adds_it():
    passages = ["the first of the things was not", "he had a thing which it be"]
    with_bos = ev.lambada_items(bos_tokenizer(), passages)
    without = ev.lambada_items(tiny_tokenizer(), passages)
    assert [c for c, _ in with_bos] == [[BOS] + c for c, _ in without]
    assert [t for _, t in with_bos] == [t for _, t in without]


def test_eval_windows_and_provenance_carry_bos(tmp_path):
    from kvtheory.config import EvalConfig
    from kvtheory.models import load_model
    from kvtheory.runs import run_eval

    folder = save_tiny("llama", tmp_path / "m")
    bos_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[1:]) * 6)
    cfg = EvalConfig(model=str(folder), task="wikitext2", methods=("fp",), seq_len=8, max_windows=2,
                     calib_windows=1, text_file=str(text), n_boot=10)
    out = run_eval(cfg, tmp_path / "out.json", progress=False, log=lambda msg: None)
    row = out["records"][0]
    assert row["provenance"]["bos"] == BOS and out["provenance"]["bos"] == BOS
    lm = load_model(str(folder))
    ids = ev.tokenize(lm.tokenizer, text.read_text())
    windows = torch.stack([torch.cat([torch.tensor([BOS]), ids[i * 7:(i + 1) * 7]]) for i in range(2)])
    with torch.no_grad():  # a plain loop over the hand-built windows
        nll = sum(float(torch.nn.functional.cross_entropy(lm.model(w[None]).logits[0, :-1], w[1:],
                                                          reduction="sum")) for w in windows)
    assert_close(torch.tensor(row["value"]), torch.tensor(math.exp(nll / 14)), "cpu_batch")
    assert row["n_tokens"] == 14


def test_cli_capture_starts_with_bos_where_the_tokenizer_adds_it(tmp_path):
    from kvtheory.capture import load_capture
    from kvtheory.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[1:]) * 2)
    for name, tok, first in (("bos", bos_tokenizer(), [BOS]), ("plain", tiny_tokenizer(), [])):
        folder = save_tiny("llama", tmp_path / name)
        tok.save_pretrained(folder)
        out = tmp_path / f"cap-{name}"
        assert main(["capture", "--model", str(folder), "--tokens", "10", "--out", str(out),
                     "--text-file", str(text), "--no-progress"]) == 0
        expected = first + ev.tokenize(tok, text.read_text()).tolist()
        assert load_capture(out).meta.token_ids == (tuple(expected[:10]),)
