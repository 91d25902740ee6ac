"""Errors, input checks, atomic IO, result store, timing harness, CLI framework."""

from __future__ import annotations

import json
from pathlib import Path
import stat

import pytest
import torch

from kvtheory import _checks as C
from kvtheory.errors import KVTheoryError, bad_argument
from kvtheory.io import atomic_write, provenance, read_json, sha256_bytes, sha256_file, write_json
from kvtheory.store import cached, config_hash, load_result, result_path
from kvtheory.timing import side_by_side


def test_error_is_value_error_and_names_everything():
    err = bad_argument("rank", 80, "an integer in 1..64")
    assert isinstance(err, ValueError)
    assert str(err) == "rank: got 80; expected an integer in 1..64"


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: C.check_bits(0), "bits: got 0; expected an integer in 1..16"),
        (lambda: C.check_bits(17), "bits: got 17; expected an integer in 1..16"),
        (lambda: C.check_bits(2.5), "bits: got 2.5"),
        (lambda: C.check_rank(0, 64), "rank: got 0; expected an integer in 1..64"),
        (lambda: C.check_rank(65, 64), "rank: got 65; expected an integer in 1..64"),
        (lambda: C.check_tensor("k", torch.zeros(2, 3), ndim=4, axes="batch kv_head token d"),
         "k: got a tensor with 2 dimensions, shape (2, 3); expected 4 dimensions (batch kv_head token d)"),
        (lambda: C.check_tensor("q", torch.tensor([1.0, float("nan"), float("inf")])),
         "q: got 1 NaN and 1 Inf values"),
        (lambda: C.check_tensor("q", torch.zeros(2, dtype=torch.int64)), "q: got dtype torch.int64"),
        (lambda: C.check_tensor("q", [1.0]), "q: got [1.0]; expected a torch.Tensor"),
        (lambda: C.check_same_d("q", torch.zeros(1, 8), "k", torch.zeros(1, 4)),
         "k: got head dimension d=4; expected d=8"),
        (lambda: C.check_group(9, 4), "kv_heads: got 4 KV heads for 9 query heads"),
        (lambda: C.check_choice("rope", "mid", ["pre", "post"]), "rope: got 'mid'; expected one of pre, post"),
        (lambda: C.check_positive("scale", -1), "scale: got -1"),
    ],
)
def test_checks_raise_named_errors(call, fragment):
    with pytest.raises(KVTheoryError) as info:
        call()
    assert fragment in str(info.value)


def test_checks_pass_good_input():
    assert C.check_bits(4) == 4
    assert C.check_rank(64, 64) == 64
    assert C.check_group(9, 3) == 3
    x = torch.ones(1, 2, 3, 4)
    assert C.check_tensor("k", x, ndim=4) is x


def test_atomic_write_and_sha(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    atomic_write(p, b"hello")
    assert p.read_bytes() == b"hello"
    assert sha256_file(p) == sha256_bytes(b"hello")
    # hand-checked digest of b"hello"
    assert sha256_bytes(b"hello") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert [f.name for f in p.parent.iterdir()] == ["a.bin"]  # no temp file left


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write(p, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, broken)
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_read_only_dir_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IREAD | stat.S_IEXEC)
    try:
        with pytest.raises(KVTheoryError, match=r"json: got .*ro/x.json'; expected a path in a writable folder"):
            write_json(ro / "x.json", {"a": 1})
    finally:
        ro.chmod(stat.S_IRWXU)
    assert list(ro.iterdir()) == []


def test_unwritable_path_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KVTheoryError, match=r"json: got .*file/sub/x.json"):
        write_json(blocker / "sub" / "x.json", {"a": 1})


def test_json_roundtrip_and_nan_to_null(tmp_path):
    p = write_json(tmp_path / "r.json", {"t": torch.tensor([1.5, 2.0]), "nan": float("nan")})
    assert read_json(p) == {"t": [1.5, 2.0], "nan": None}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KVTheoryError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_provenance_fields():
    prov = provenance(seed=7, data_sha256="abc")
    assert prov["seed"] == 7 and prov["data_sha256"] == "abc"
    assert prov["torch_version"] == torch.__version__
    for key in ("kvtheory_version", "git_sha", "transformers_version", "created"):
        assert key in prov


def test_store_caches_by_config(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    cfg = {"model": "m", "bits": 4}
    first = cached("stage", cfg, compute, tmp_path, seed=0)
    second = cached("stage", cfg, compute, tmp_path, seed=0)
    assert first["result"] == second["result"] == {"value": 1}
    assert len(calls) == 1
    third = cached("stage", {"model": "m", "bits": 3}, compute, tmp_path)
    assert third["result"] == {"value": 2}
    assert result_path("stage", cfg, tmp_path).name == f"stage-{config_hash(cfg)}.json"
    assert load_result(first["path"])["config"] == cfg
    (tmp_path / "junk.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(KVTheoryError, match="expected a kvtheory result file"):
        load_result(tmp_path / "junk.json")


def test_store_detects_an_edited_result(tmp_path):
    import hashlib

    saved = cached("stage", {"n": 1}, lambda: {"ppl": 23.5, "rows": [1.0, float("nan")]}, tmp_path)
    path = Path(saved["path"])
    data = json.loads(path.read_text())
    # the checksum is the SHA-256 of the canonical JSON of the result (NaN stored as null)
    canon = json.dumps({"ppl": 23.5, "rows": [1.0, None]}, sort_keys=True, separators=(",", ":"))
    assert data["result_sha256"] == hashlib.sha256(canon.encode()).hexdigest()
    assert load_result(path)["result"] == {"ppl": 23.5, "rows": [1.0, None]}
    path.write_text(path.read_text().replace("23.5", "21.5"))   # a hand edit
    with pytest.raises(KVTheoryError, match="does not match its result_sha256"):
        load_result(path)


def test_side_by_side_interleaves_and_counts():
    order = []
    t = side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=4, warmup=1)
    assert order[:2] == ["a", "b"]  # warm-up
    assert order[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotating rounds
    assert len(t.times["a"]) == len(t.times["b"]) == 4
    assert t.ratio("a", "a") == 1.0
    with pytest.raises(KVTheoryError, match="reps: got 0"):
        side_by_side({"a": lambda: None}, reps=0)


def test_cli_help_and_unknown_command(capsys):
    from kvtheory.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "kvtheory 0.1.0" in capsys.readouterr().out
    assert main([]) == 2


def test_save_figure_redraws_byte_identical_files(tmp_path):
    """The same figure saved twice gives the same PNG and PDF bytes (no creation date), so
    rerunning `kvtheory figures` on unchanged results leaves the committed figures unchanged."""
    from kvtheory.io import sha256_file
    from kvtheory.plotstyle import new_figure, save_figure, style

    import time

    digests = []
    for run in range(2):
        time.sleep(1.1 * run)   # a later second: a stored creation date would differ
        with style():
            fig, ax = new_figure()
            ax.plot([1, 2, 3], [3, 1, 2], label="x")
            ax.set_xlabel("bits per element")
            paths = save_figure(fig, tmp_path / str(run), "f")
        assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
        digests.append({p.suffix: sha256_file(p) for p in paths})
    assert digests[0] == digests[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_one_pass_finite_test_equals_isfinite_all(dtype):
    """``_checks.finite_absmax`` (min and max of the tensor, one pass) against the definitions:
    it raises exactly when ``isfinite(x).all()`` is false, and else returns ``x.abs().max()``;
    NaN, +Inf and -Inf at random places, several at once, and none."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
           bad=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                        max_size=3))
    def check(n, seed, bad):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(n, generator=g) * 1e3).to(dtype)
        for v in bad:
            x[int(torch.randint(n, (1,), generator=g))] = v
        if bool(torch.isfinite(x).all()):
            assert C.finite_absmax("x", x) == float(x.abs().max())
        else:
            with pytest.raises(KVTheoryError, match="x: got .* NaN and .* Inf"):
                C.finite_absmax("x", x)

    check()


def test_several_finite_checks_in_one_transfer_name_the_first_bad_tensor():
    """``_checks.finite_absmaxes`` equals ``finite_absmax`` tensor by tensor (mixed dtypes, an
    empty tensor) and, given several non-finite tensors, names the first one in order."""
    g = torch.Generator().manual_seed(3)
    xs = [("a", torch.randn(50, generator=g).to(torch.bfloat16)),
          ("e", torch.empty(0)), ("b", torch.randn(7, 3, generator=g, dtype=torch.float64))]
    assert C.finite_absmaxes(*xs) == [C.finite_absmax(n, x) for n, x in xs]
    assert C.finite_absmaxes(*xs)[1] == 0.0
    bad1, bad2 = xs[0][1].clone(), xs[2][1].clone()
    bad1[4], bad2[0, 1] = float("nan"), float("inf")
    with pytest.raises(KVTheoryError, match="^b: got 0 NaN and 1 Inf"):
        C.finite_absmaxes(xs[0], ("b", bad2), ("c", bad1))
    with pytest.raises(KVTheoryError, match="^a: got 1 NaN and 0 Inf"):
        C.finite_absmaxes(("a", bad1), ("b", bad2))
