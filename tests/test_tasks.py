"""Other tasks: LAMBADA numbers against direct evaluate.lambada calls and a plain greedy loop,
encoder fidelity against a hand-written mean-pool/cosine, fp as the identity, plots from a
JSON round-tripped result."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import save_tiny
from tol import assert_close

from kvtheory import engine
from kvtheory.analysis import budget, tasks
from kvtheory.errors import KVTheoryError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return (save_tiny("llama", root / "tiny-llama", tokenizer=True, max_position_embeddings=512),
            save_tiny("bert", root / "tiny-bert", tokenizer=True))


@pytest.fixture(scope="module")
def result(folders, data_dir, tmp_path_factory):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    engine.clear_memo()
    try:
        cfg = tasks.TasksConfig(lm_model=str(folders[0]), encoder=str(folders[1]), lambada_limit=6,
                                calib_len=32, sentences=8, encoder_calib_len=32, encoder_tokens=32,
                                n_boot=50)
        return cfg, tasks.run(cfg, data_dir=data_dir, root=tmp_path_factory.mktemp("root"),
                              progress=False)
    finally:
        torch.set_default_dtype(old)


def test_lambada_equals_direct_and_greedy_loop(result, folders, data_dir):
    from kvtheory.analysis.common import get_model
    from kvtheory.data import load_lambada
    from kvtheory.evaluate import lambada, lambada_items

    cfg, res = result
    lam = res["lambada"]
    assert list(lam["methods"]) == list(tasks.lm_methods(8)) and lam["n_passages"] == 6
    lm = get_model(str(folders[0]))
    items = lambada_items(lm.tokenizer, load_lambada(data_dir, 6))
    direct = lambada(lm.model, items, keys="int4", values="int4", n_boot=50)
    assert_close(lam["methods"]["int4"]["accuracy"]["value"], direct["accuracy"].value, "exact64")
    assert_close(lam["methods"]["int4"]["target_ppl"]["value"], direct["target_ppl"].value, "float32")
    correct, nll = [], 0.0
    with torch.no_grad():
        for c, t in items:  # one passage at a time, no batching
            ids = torch.tensor([list(c) + list(t)[:-1]])
            lp = torch.log_softmax(lm.model(input_ids=ids).logits[0, -len(t):].double(), -1)
            correct.append(bool((lp.argmax(-1) == torch.tensor(t)).all()))
            nll -= float(lp.gather(-1, torch.tensor(t)[:, None]).sum())
    fp = lam["methods"]["fp"]
    assert_close(fp["accuracy"]["value"], sum(correct) / len(correct), "exact64")
    assert_close(fp["target_ppl"]["value"], float(torch.tensor(nll / len(items)).exp()), "float32")


def test_encoder_fidelity_by_hand(result, folders, data_dir):
    from kvtheory.analysis.common import get_model
    from kvtheory.data import load_wikitext2
    from kvtheory.evaluate import wiki_sentences
    from kvtheory.patch import compressed_kv

    _, res = result
    enc = res["encoder"]["methods"]
    assert list(enc) == list(tasks.encoder_methods(8))
    assert_close(enc["fp"]["cosine"]["value"], 1.0, "exact64")
    assert enc["fp"]["hidden_rel_err"]["value"] == 0.0 and enc["fp"]["attn_output_rel_err"] == 0.0
    model = get_model(str(folders[1]))
    sents = wiki_sentences(load_wikitext2(data_dir), 8)
    cos = []
    with torch.no_grad():
        for s in sents:
            ids = torch.tensor([model.tokenizer(s)["input_ids"][:64]])
            ref = model.model(input_ids=ids).last_hidden_state[0].double().mean(0)
            with compressed_kv(model.model, keys="int4", values="int4"):
                out = model.model(input_ids=ids).last_hidden_state[0].double().mean(0)
            cos.append(float(torch.nn.functional.cosine_similarity(out, ref, dim=0)))
    assert_close(enc["int4"]["cosine"]["value"], sum(cos) / len(cos), "float32")
    assert 0 < enc["rank2-pca"]["attn_output_rel_err"]


def test_summary_and_plot_from_json(result, tmp_path):
    _, res = result
    again = json.loads(json.dumps(res))
    s = tasks.summary(again)
    fp = res["lambada"]["methods"]["fp"]["accuracy"]["value"]
    assert_close(s["lambada_int4_dacc"], res["lambada"]["methods"]["int4"]["accuracy"]["value"] - fp,
                 "exact64")
    assert "encoder_rank2-pca_cosine" in s
    paths = tasks.plot(again, tmp_path)
    assert [p.name for p in paths] == ["tasks.png", "tasks.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_config():
    with pytest.raises(KVTheoryError):
        tasks.TasksConfig(lambada_limit=0)
    with pytest.raises(KVTheoryError):
        tasks.TasksConfig(lm_methods=("int4-bad",))
    assert tasks.TasksConfig(lm_methods=("int4",)).lm_methods == ("fp", "int4")
    assert tasks.TasksConfig.for_size("small").lambada_limit == 20
