"""lm-evaluation-harness integration: the ``kvtheory`` model, the offline task, the conventions."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tol import assert_close

lm_eval = pytest.importorskip("lm_eval", reason="optional extra kvtheory[lmeval] not installed")

SIX = (426, 1053, 2881, 3047, 3977, 4351)


def _lambada_lines(data_dir):
    path = data_dir / "lambada_openai" / "lambada_test.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def test_registered_on_import():
    from lm_eval.api.registry import get_model

    from kvtheory.integrations.lmeval import KVTheoryLM

    assert get_model("kvtheory") is KVTheoryLM


def test_convention_differs_on_exactly_six_passages(data_dir):
    """lm-eval splits on single spaces, kvtheory on the last whitespace run: they differ
    only where a newline precedes the last word."""
    from kvtheory.data import split_lambada

    differ = []
    for i, text in enumerate(_lambada_lines(data_dir)):
        ctx_h, tgt_h = " ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1]
        ctx_k, word = split_lambada(text)
        sep = text.rstrip()[len(ctx_k): -len(word)]
        if (ctx_h, tgt_h) != (ctx_k, sep + word):
            differ.append(i)
    assert tuple(differ) == SIX
    assert "\n" in _lambada_lines(data_dir)[426].split(" ")[-1]


def test_task_dir_resolves_the_corpus(data_dir, tmp_path, monkeypatch):
    from kvtheory.integrations.lmeval import TASKS_DIR, task_dir

    monkeypatch.setenv("KVTHEORY_CACHE", str(tmp_path))
    out = task_dir(data_dir)
    text = (out / "lambada_openai.yaml").read_text()
    assert str((data_dir / "lambada_openai" / "lambada_test.jsonl").resolve()) in text
    shipped = (TASKS_DIR / "lambada_openai.yaml").read_text()
    assert "../shared/data/lambada_openai/lambada_test.jsonl" in shipped
    # the rest of the task is lm-eval's own
    own = (lm_eval.__path__[0] + "/tasks/lambada/lambada_openai.yaml")
    for line in open(own).read().splitlines():
        if not line.startswith(("dataset_path", "dataset_name")):
            assert line in shipped, line


def _harness(model, data_dir, limit, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from kvtheory.integrations.lmeval import task_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("KVTHEORY_CACHE", os.environ.get("KVTHEORY_CACHE", str(tmp_path)))
    tm = TaskManager(include_path=str(task_dir(data_dir)))
    out = lm_eval.simple_evaluate(model=model, tasks=["lambada_openai"], limit=limit,
                                  task_manager=tm, bootstrap_iters=0, log_samples=True)
    res = out["results"]["lambada_openai"]
    ll = [s["resps"][0][0][0] for s in sorted(out["samples"]["lambada_openai"],
                                              key=lambda s: s["doc_id"])]
    return res["acc,none"], res["perplexity,none"], torch.tensor(ll, dtype=torch.float64)


@pytest.mark.slow
def test_harness_agrees_with_kvtheory_scorer(data_dir, tmp_path, monkeypatch):
    """fp: the harness's accuracy, perplexity and per-passage log-likelihoods equal kvtheory's
    LAMBADA scorer on the first passages (none of the six divergent ones)."""
    from kvtheory import evaluate as ev
    from kvtheory.data import load_lambada
    from kvtheory.integrations.lmeval import KVTheoryLM

    n = 6
    lm = KVTheoryLM(pretrained="smollm2-135m", batch_size=3)
    acc, ppl, ll = _harness(lm, data_dir, n, tmp_path, monkeypatch)
    items = ev.lambada_items(lm.tokenizer, load_lambada(data_dir, n))
    ours = ev.lambada(lm.model, items, batch_size=1, n_boot=1)
    assert_close(acc, ours["accuracy"].value, "float32")
    assert_close(ppl, ours["target_ppl"].value, "float32")
    # a second route for the per-passage numbers: one plain forward pass per passage
    ref = []
    with torch.no_grad():
        for c, t in items:
            logits = lm.model(torch.tensor([c + t[:-1]])).logits[0, -len(t):].double()
            ref.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(t)[:, None]).sum())
    assert_close(ll, torch.stack(ref), "cpu_batch")  # harness batch 3 vs single passes


@pytest.mark.slow
def test_harness_batch_equals_single_under_kivi(data_dir, tmp_path, monkeypatch):
    """int4-kivi (per-channel groups over tokens): a right-padded batch of 4 passages gives the
    single-passage log-likelihoods. In float64, so that CPU batch noise (about 1e-6 in float32,
    which KIVI's per-channel rounding steps can amplify to percents) cannot hide a padding
    leak (which moved passage 0 by 20% before the padding-correct compressors, issue 14)."""
    from kvtheory.integrations.lmeval import KVTheoryLM

    kw = dict(pretrained="smollm2-135m", keys="int4-kivi", values="int4", dtype="float64")
    _, _, batched = _harness(KVTheoryLM(batch_size=4, **kw), data_dir, 4, tmp_path, monkeypatch)
    _, _, single = _harness(KVTheoryLM(batch_size=1, **kw), data_dir, 4, tmp_path, monkeypatch)
    assert_close(batched, single, "float64_quantized_batch")
    # the check can fail: without the recorded lengths no mask reaches the compressors, and the
    # pad tokens enter KIVI's per-channel statistics
    from lm_eval.models.huggingface import HFLM

    monkeypatch.setattr(KVTheoryLM, "_loglikelihood_tokens", HFLM._loglikelihood_tokens)
    _, _, leaky = _harness(KVTheoryLM(batch_size=4, **kw), data_dir, 4, tmp_path, monkeypatch)
    assert float(((leaky - single).abs() / single.abs()).max()) > 1e-3


@pytest.mark.slow
def test_harness_pads_with_a_mask(data_dir, tmp_path, monkeypatch):
    """The model passes the harness's true lengths as an attention mask: fp batch == single."""
    from kvtheory.integrations.lmeval import KVTheoryLM

    calls = []
    lm = KVTheoryLM(pretrained="smollm2-135m", batch_size=4)
    forward = lm.model.forward

    def spy(*a, **kw):
        calls.append(kw.get("attention_mask"))
        return forward(*a, **kw)

    monkeypatch.setattr(lm.model, "forward", spy)
    _, _, batched = _harness(lm, data_dir, 6, tmp_path, monkeypatch)
    masks = [m for m in calls if m is not None]
    assert masks and all(bool((m.sum(1) <= m.shape[1]).all()) and bool((m[:, 0] == 1).all())
                         for m in masks)
    assert any(bool((m == 0).any()) for m in masks)  # some batch was really padded
    monkeypatch.setattr(lm.model, "forward", forward)
    lm1 = KVTheoryLM(pretrained="smollm2-135m", batch_size=1)
    _, _, single = _harness(lm1, data_dir, 6, tmp_path, monkeypatch)
    assert_close(batched, single, "cpu_batch")


def test_bad_arguments():
    from kvtheory.errors import KVTheoryError
    from kvtheory.integrations.lmeval import KVTheoryLM

    with pytest.raises(KVTheoryError, match="keys/values: got 'int99-nonsense/fp'"):
        KVTheoryLM(pretrained="smollm2-135m", keys="int99-nonsense")
    with pytest.raises(KVTheoryError, match="pretrained"):
        KVTheoryLM(pretrained=3)
