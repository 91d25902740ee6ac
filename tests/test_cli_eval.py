"""``kvtheory eval``: config validation, one-line CLI errors, resumable and deterministic results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvtheory.config import EvalConfig
from kvtheory.errors import KVTheoryError

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {k: v for k, v in os.environ.items() if k != "KVTHEORY_DEBUG"}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1")  # one thread: tiny ops stall on thread barriers on a busy machine
METHODS = "fp,int4,rank8-pca"


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_windows": 0}, "max_windows: got 0; expected an integer >= 1"),
        ({"targets": ("kv", "q")}, "targets: got 'q'; expected one of k, v, kv"),
        ({"targets": ("kv", "kv")}, "targets: got .*without repeated names"),
        ({"methods": ("int4", "int99-wat")}, "int99-wat"),
        ({"methods": ()}, "methods: got .*non-empty list"),
        ({"seq_len": 1}, "seq_len: got 1; expected an integer >= 2"),
        ({"task": "mmlu"}, "task: got 'mmlu'; expected one of wikitext2, lambada, embed"),
        ({"rope": "mid"}, "rope: got 'mid'"),
        ({"dtype": "int8"}, "dtype: got 'int8'"),
        ({"device": "tpu"}, "device: got 'tpu'"),
        ({"limit": 0}, "limit: got 0"),
        ({"calib_windows": 0}, "calib_windows: got 0"),
        ({"seed": -1}, "seed: got -1"),
        ({"model": " "}, "model: got ' '"),
        ({"task": "lambada", "text_file": "x.txt"}, "text_file: got 'x.txt'"),
    ],
)
def test_config_validation(kwargs, message):
    base = dict(model="m", task="wikitext2", methods=("fp",))
    with pytest.raises(KVTheoryError, match=message):
        EvalConfig(**{**base, **kwargs})


def test_config_defaults_paths_and_identity():
    a = EvalConfig("smollm2-135m", "wikitext2", "fp,int4", "k,kv")
    assert a.methods == ("fp", "int4") and a.targets == ("k", "kv") and a.seq_len == 1024
    assert EvalConfig("minilm-l6", "embed", ("fp",)).seq_len == 128
    b = EvalConfig("smollm2-135m", "wikitext2", ("rank16-pca",), data_dir="/elsewhere")
    assert a.hash() == b.hash()  # grid and data folder are not part of the identity
    c = EvalConfig("smollm2-135m", "wikitext2", ("fp",), seq_len=512)
    assert c.hash() != a.hash() and c.result_path() != a.result_path()
    assert a.result_path("r") == Path("r/eval/smollm2-135m/wikitext2") / f"L1024-W4-post-s0-{a.hash()}.json"
    assert EvalConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    lam = EvalConfig("smollm2-135m", "lambada", ("fp",), limit=500)
    assert lam.hash() == EvalConfig("smollm2-135m", "lambada", ("fp",), limit=500, max_windows=9).hash()
    assert lam.hash() != EvalConfig("smollm2-135m", "lambada", ("fp",), limit=50).hash()
    assert a.hash() == EvalConfig("smollm2-135m", "wikitext2", ("fp",), limit=3).hash()


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama with its tokenizer, saved as a folder, and a small text file."""
    from test_evaluate import TEXT, tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok), max_pos=128)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    long = tiny_llama(vocab=len(tok), max_pos=512)  # LAMBADA passages reach ~300 tokens here
    long.save_pretrained(root / "model512")
    tok.save_pretrained(root / "model512")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return {"model": root / "model", "model512": root / "model512", "text": root / "text.txt",
            "empty": root / "empty.txt"}


@pytest.fixture
def as_cli():
    """In-process runs behave like the CLI process: float32 default; global torch state restored."""
    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): identical numbers
    try:
        yield
    finally:
        torch.set_default_dtype(old)
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def _args(tiny, out, *extra, methods=METHODS):
    return ["eval", "--model", str(tiny["model"]), "--text-file", str(tiny["text"]),
            "--methods", methods, "--targets", "kv", "--seq-len", "32", "--max-windows", "3",
            "--calib-windows", "1", "--n-boot", "50", "--no-progress", "--json", str(out), *extra]


def _cli(*args, timeout=300):
    return subprocess.run([PY, "-m", "kvtheory", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _main(capsys, *args):
    """``kvtheory ARGS`` in this process: (exit status, stdout, stderr)."""
    from kvtheory.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def _one_line_error(res, pattern):
    err = res.stderr.strip()
    assert res.returncode not in (0, None), res
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
    assert err.startswith("kvtheory eval: error: ") and re.search(pattern, err), err


# ----------------------------------------------------------------------------- CLI errors
def test_cli_errors_one_line_in_a_fresh_process(tiny, tmp_path, data_dir):
    out = tmp_path / "out.json"
    _one_line_error(_cli(*_args(tiny, out, "--max-windows", "0")),
                    "max_windows: got 0; expected an integer >= 1")
    bad = tmp_path / "data"  # a tampered corpus copy (tmp only)
    (bad / "wikitext-2-raw-v1").mkdir(parents=True)
    raw = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_bytes()
    (bad / "wikitext-2-raw-v1" / "wiki.test.raw").write_bytes(raw[:-10])
    res = _cli("eval", "--model", str(tiny["model"]), "--data-dir", str(bad), "--json", str(out))
    _one_line_error(res, "SHA-256 mismatch, got [0-9a-f]{64}; expected bbf94c53")
    assert not out.exists()  # no half result left behind by a failure


def test_cli_errors_one_line(tiny, tmp_path, capsys, as_cli):
    out = tmp_path / "out.json"
    _one_line_error(_main(capsys, *_args(tiny, out, "--seq-len", "256")),
                    "seq_len: got 256; expected at most 128 tokens")
    args = _args(tiny, out)
    args[args.index("--text-file") + 1] = str(tiny["empty"])
    _one_line_error(_main(capsys, *args), "text: got ''; expected a non-empty text")
    _one_line_error(_main(capsys, *_args(tiny, out, methods="fp,rank8-nobasis")), "rank8-nobasis")
    _one_line_error(_main(capsys, *_args(tiny, out, "--limit", "ten")), "limit: got 'ten'")
    _one_line_error(_main(capsys, *_args(tiny, out, "--threads", str(10**12))),
                    "threads: got 1000000000000; expected an integer in 1..4096")
    _one_line_error(_main(capsys, *_args(tiny, out, "--task", "lambada")), "text_file")
    _one_line_error(_main(capsys, *_args(tiny, tmp_path)), "a file path, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)  # no write bit: read-only, for root too
    try:
        _one_line_error(_main(capsys, *_args(tiny, ro / "out.json")),
                        "expected a path in a writable folder .*is read-only")
    finally:
        ro.chmod(0o755)
    assert not out.exists() and not list(ro.iterdir())


# ----------------------------------------------------------------------------- resume
DRIVER = textwrap.dedent("""
    import os, sys, time
    import kvtheory.runs as ev
    orig, calls = ev.compute_row, []
    def hooked(job, method, target):
        calls.append((method, target))
        if len(calls) == int(os.environ["KVT_STALL_AT"]):
            time.sleep(600)  # the test kills or interrupts the process here
        return orig(job, method, target)
    ev.compute_row = hooked
    from kvtheory.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _records_when(path: Path, n: int, proc, timeout=240.0) -> list[dict]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists():
            recs = json.loads(path.read_text())["records"]
            if len(recs) >= n:
                return recs
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {n} records in {path} after {timeout} s")


def _stalled_run(tiny, out, driver, n_records, stop):
    """Run the CLI through ``driver``; stop it once ``n_records`` rows are saved."""
    env = {**ENV, "KVT_STALL_AT": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([PY, str(driver), *_args(tiny, out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        recs = _records_when(out, n_records, proc)
        stop(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return recs, proc.returncode, err


def test_killed_and_interrupted_eval_resumes_without_recomputing(tiny, tmp_path, capsys, as_cli):
    out, driver = tmp_path / "out.json", tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # run 1: SIGKILL while the second row computes (no clean-up at all)
    first, rc, _ = _stalled_run(tiny, out, driver, 1, lambda p: p.kill())
    assert rc == -signal.SIGKILL and [(r["method"], r["target"]) for r in first] == [("fp", "kv")]
    # run 2: resumes, computes int4, then Ctrl-C while the third row computes
    second, rc, err = _stalled_run(tiny, out, driver, 2, lambda p: p.send_signal(signal.SIGINT))
    assert rc == 130 and err.strip().splitlines() == [
        "kvtheory eval: interrupted; finished rows are saved"]
    assert second[0] == first[0]
    # run 3 (in this process): finishes the grid
    res = _main(capsys, *_args(tiny, out))
    assert res.returncode == 0, res.stderr
    assert "1 rows computed, 2 resumed" in res.stdout
    data = json.loads(out.read_text())
    assert [(r["method"], r["target"]) for r in data["records"]] == [
        ("fp", "kv"), ("int4", "kv"), ("rank8-pca", "kv")]
    assert data["records"][:2] == second[:2]  # untouched, timestamps included
    runs = data["runs"]
    assert [r["computed"] for r in runs] == [[["fp", "kv"]], [["int4", "kv"]], [["rank8-pca", "kv"]]]
    assert runs[-1]["skipped"] == [["fp", "kv"], ["int4", "kv"]] and runs[-1]["finished"]
    # run 4 computes nothing
    res = _main(capsys, *_args(tiny, out))
    assert res.returncode == 0 and "0 rows computed, 3 resumed" in res.stdout
    assert json.loads(out.read_text())["records"] == data["records"]
    # an uninterrupted run gives the same numbers (seeded, deterministic)
    fresh = tmp_path / "fresh.json"
    assert _main(capsys, *_args(tiny, fresh)).returncode == 0
    keys = ("method", "target", "value", "ci_low", "ci_high", "n_tokens", "bits_per_element")
    assert [[r[k] for k in keys] for r in json.loads(fresh.read_text())["records"]] == [
        [r[k] for k in keys] for r in data["records"]]


def test_records_and_config_conflicts(tiny, tmp_path, capsys, as_cli):
    a = tmp_path / "a.json"
    res = _main(capsys, *_args(tiny, a))
    assert res.returncode == 0 and "rank8-pca" in res.stdout and "95% CI" in res.stdout
    data = json.loads(a.read_text())
    ra = data["records"]
    rec = ra[0]
    assert rec["metric"] == "ppl" and rec["n_tokens"] == 3 * 31 and rec["bits_per_element"] == 16.0
    assert rec["ci_low"] <= rec["value"] <= rec["ci_high"] and rec["keys"] == rec["values"] == "fp"
    for key in ("kvtheory_version", "git_sha", "torch_version", "transformers_version", "seed",
                "data_sha256", "model"):
        assert key in rec["provenance"] and key in data["provenance"]
    assert ra[1]["bits_per_element"] == 4 + 2 * 16 / 16  # int4, one scale+zero per d=16 token
    assert ra[2]["bits_per_element"] == 16 * 8 / 16 + 16 * 16 * 8 / (16 * 32)  # rank8 + basis/T
    cal = data["calibration"]
    assert cal["token_range"][0] >= 3 * 32 and cal["token_range"][1] == cal["corpus_tokens"]
    assert EvalConfig.from_dict(data["config"]).hash() == data["config_hash"]
    # target k only: values stay fp
    k = tmp_path / "k.json"
    assert _main(capsys, *_args(tiny, k, "--targets", "k", methods="int4")).returncode == 0
    rk = json.loads(k.read_text())["records"][0]
    assert (rk["keys"], rk["values"], rk["bits_per_element"], rk["cache_bits_per_element"]) == (
        "int4", "fp", 6.0, 11.0)
    # a different config at the same path: refused, unless --overwrite
    res = _main(capsys, *_args(tiny, a, "--seq-len", "16"))
    _one_line_error(res, r"saved for a different config \(seq_len 32 -> 16\)")
    res = _main(capsys, *_args(tiny, a, "--seq-len", "16", "--overwrite"))
    assert res.returncode == 0 and json.loads(a.read_text())["config"]["seq_len"] == 16
    # a new method joins the grid of the same config: only that row is computed
    res = _main(capsys, *_args(tiny, a, "--seq-len", "16", methods=METHODS + ",int8"))
    assert res.returncode == 0 and "1 rows computed, 3 resumed" in res.stdout
    a.write_text("{not json")
    _one_line_error(_main(capsys, *_args(tiny, a)), "not a readable kvtheory eval result")


def test_lambada_and_embed_tasks(tiny, tmp_path, capsys, as_cli, data_dir):
    from transformers import BertConfig, BertModel

    out = tmp_path / "lambada.json"
    res = _main(capsys, "eval", "--model", str(tiny["model512"]), "--task", "lambada", "--limit", "5",
                "--methods", "fp,int4", "--seq-len", "64", "--calib-windows", "1", "--n-boot", "20",
                "--data-dir", str(data_dir), "--no-progress", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "LAMBADA scoring: target = the last whitespace-separated word" in res.stdout
    data = json.loads(out.read_text())
    rec = data["records"][0]
    assert rec["metric"] == "accuracy" and set(rec["metrics"]) == {"accuracy", "target_ppl"}
    assert rec["n_items"] == 5 and 0 <= rec["value"] <= 1
    assert set(data["provenance"]["data_sha256"]) == {"wikitext2", "lambada"}
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128))
    bert.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "tokenizer.json").write_bytes((tiny["model"] / "tokenizer.json").read_bytes())
    (tmp_path / "bert" / "tokenizer_config.json").write_bytes(
        (tiny["model"] / "tokenizer_config.json").read_bytes())
    out = tmp_path / "embed.json"
    res = _main(capsys, "eval", "--model", str(tmp_path / "bert"), "--task", "embed", "--limit", "6",
                "--methods", "fp,int8", "--seq-len", "32", "--calib-windows", "1", "--n-boot", "20",
                "--text-file", str(tiny["text"]), "--no-progress", "--json", str(out))
    assert res.returncode == 0, res.stderr
    fp, int8 = json.loads(out.read_text())["records"]
    assert fp["metric"] == "cosine" and fp["value"] == 1.0 and fp["metrics"]["hidden_rel_err"]["value"] == 0
    assert 0.99 < int8["value"] <= 1.0 and fp["n_items"] == 6
    res = _main(capsys, "eval", "--model", str(tmp_path / "bert"), "--task", "wikitext2",
                "--text-file", str(tiny["text"]), "--json", str(tmp_path / "x.json"))
    _one_line_error(res, "task: got 'wikitext2'; expected embed")
