"""Corpora: SHA-256 checks on the shared files, tampered copies, sources, LAMBADA splitting."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pytest

from kvtheory.data import (FILES, SHA256, corpus_sha256, load_corpus, load_lambada,
                           load_wikitext2, resolve_data_dir, split_lambada)
from kvtheory.errors import KVTheoryError

README_SUMS = {  # typed in from ../shared/data/README.md, independently of kvtheory.data
    "wikitext2": "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    "lambada": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
}


def test_constants_match_readme():
    assert SHA256 == README_SUMS


def test_wikitext2_reads_verified(data_dir):
    c = load_corpus("wikitext2", data_dir)
    raw = (data_dir / FILES["wikitext2"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == README_SUMS["wikitext2"] == c.sha256
    assert c.verified and c.text == raw.decode("utf-8")
    assert c.text.startswith(" = Robert Boulter = ")
    assert c.text.count("\n") == 2891  # README: 2,891 lines
    assert load_wikitext2(data_dir) == c.text
    assert corpus_sha256("wikitext2", data_dir) == README_SUMS["wikitext2"]


def test_lambada_reads_verified(data_dir):
    passages = load_lambada(data_dir)
    assert len(passages) == 5153  # README: 5,153 passages
    assert load_lambada(data_dir, limit=7) == passages[:7]
    assert load_corpus("lambada", data_dir).sha256 == README_SUMS["lambada"]


def test_env_var_is_the_second_source(data_dir, monkeypatch):
    monkeypatch.setenv("KVTHEORY_DATA", str(data_dir))
    assert resolve_data_dir(None) == data_dir
    assert load_corpus("lambada", None, limit=1).verified


@pytest.mark.parametrize("name", ["wikitext2", "lambada"])
def test_tampered_copy_fails_with_both_sums(data_dir, tmp_path, name):
    for key, rel in FILES.items():  # copies live in tmp_path only, never in the repository
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, tmp_path / rel)
    target = tmp_path / FILES[name]
    raw = bytearray(target.read_bytes())
    raw[100] ^= 1  # one flipped bit
    target.write_bytes(bytes(raw))
    bad = hashlib.sha256(bytes(raw)).hexdigest()
    with pytest.raises(KVTheoryError) as err:
        load_corpus(name, tmp_path)
    msg = str(err.value)
    assert str(target) in msg and bad in msg and README_SUMS[name] in msg
    assert "\n" not in msg
    other = "lambada" if name == "wikitext2" else "wikitext2"
    assert load_corpus(other, tmp_path, limit=1).sha256 == README_SUMS[other]  # untouched file


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(KVTheoryError, match="no wikitext-2-raw-v1/wiki.test.raw"):
        load_corpus("wikitext2", tmp_path)
    with pytest.raises(KVTheoryError, match="data_dir: got .*expected an existing folder"):
        load_corpus("wikitext2", tmp_path / "nope")
    with pytest.raises(KVTheoryError, match="corpus: got 'ptb'"):
        load_corpus("ptb", tmp_path)
    with pytest.raises(KVTheoryError, match="limit: got 0"):
        load_corpus("lambada", tmp_path, limit=0)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None,
                    reason="datasets installed: the Hub path would need network")
def test_hub_fallback_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.delenv("KVTHEORY_DATA", raising=False)
    with pytest.raises(KVTheoryError, match="pip install datasets.*network"):
        load_corpus("wikitext2", None)


@pytest.mark.parametrize(
    "passage, context, target",
    [
        ("the cat sat on the mat", "the cat sat on the", "mat"),
        ("she said , `` go home '' and left\n", "she said , `` go home '' and", "left"),
        ("one two  three", "one two", "three"),
        ("line one\nlast", "line one", "last"),
    ],
)
def test_split_lambada(passage, context, target):
    assert split_lambada(passage) == (context, target)


@pytest.mark.parametrize("passage", ["", "   ", "word", " word"])
def test_split_lambada_rejects_passages_without_context(passage):
    with pytest.raises(KVTheoryError, match="passage"):
        split_lambada(passage)


def test_every_lambada_passage_splits(data_dir):
    for p in load_lambada(data_dir):
        ctx, word = split_lambada(p)
        sep = p.rstrip()[len(ctx): -len(word)]
        assert ctx and word and not any(ch.isspace() for ch in word)
        assert sep and sep.isspace() and ctx + sep + word == p.rstrip()
