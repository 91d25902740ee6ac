"""The library eval run (:mod:`kvtheory.runs`): locked, merged, checksummed and validated files.

Issue 11: two runs on one file lose nothing; hostile output paths are refused before any work;
a tampered file is refused on resume; replaced weights are not resumed; a non-finite row is
not saved; one window has no interval; methods are checked against the model first.
"""

from __future__ import annotations

import copy
import errno
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvtheory import io
from kvtheory.config import EvalConfig
from kvtheory.errors import KVTheoryError
from kvtheory.runs import (check_eval_file, check_methods, format_table, run_eval,
                           weights_fingerprint)

REPO = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "KVTHEORY_DEBUG"}
ENV.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama (d = 16) with its tokenizer in a folder, and a small text file."""
    from test_evaluate import TEXT, tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("runs")
    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok), max_pos=128).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return {"root": root, "model": root / "model", "text": root / "text.txt"}


@pytest.fixture
def one_thread():
    """As the CLI process: float32 default and one thread; global torch state restored."""
    det, threads, old = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                         torch.get_default_dtype())
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def cfg(tiny, methods=("fp", "int4"), model=None, **kw) -> EvalConfig:
    base = dict(targets=("kv",), seq_len=32, max_windows=3, calib_windows=1, n_boot=20,
                text_file=str(tiny["text"]))
    return EvalConfig(str(model or tiny["model"]), "wikitext2", methods, **{**base, **kw})


def run(tiny, path, methods=("fp", "int4"), **kw):
    return run_eval(cfg(tiny, methods, **kw), path, progress=False, log=lambda m: None)


def _no_model(monkeypatch):
    """Fail the test if any model is loaded (checks must come first)."""
    from kvtheory import evaljob

    def boom(self):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(evaljob.Job, "load_model", boom)


# ----------------------------------------------------------------------------- concurrency
BARRIER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import kvtheory.runs as runs
    orig, ready = runs.compute_row, Path(os.environ["KVT_BARRIER"])
    def hooked(job, method, target):
        ready.joinpath(str(os.getpid())).touch()  # both runs are past their resume check
        t0 = time.monotonic()
        while len(list(ready.iterdir())) < 2 and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        return orig(job, method, target)
    runs.compute_row = hooked
    from kvtheory.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _cli_args(tiny, out, methods):
    return ["eval", "--model", str(tiny["model"]), "--text-file", str(tiny["text"]), "--methods",
            methods, "--seq-len", "32", "--max-windows", "3", "--calib-windows", "1", "--n-boot",
            "20", "--no-progress", "--json", str(out)]


def test_two_runs_on_one_file_lose_nothing(tiny, tmp_path):
    """Both runs read the (absent) file, then compute and write side by side: every row of
    both survives, each run is logged once and the file passes its integrity check."""
    driver, barrier, out = tmp_path / "driver.py", tmp_path / "barrier", tmp_path / "same.json"
    driver.write_text(BARRIER)
    barrier.mkdir()
    env = {**ENV, "KVT_BARRIER": str(barrier)}
    procs = [subprocess.Popen([sys.executable, str(driver), *_cli_args(tiny, out, m)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in ("fp,int4", "int8,rank8-pca")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    data = json.loads(out.read_text())
    check_eval_file(data, out)
    got = sorted((r["method"], r["target"]) for r in data["records"])
    assert got == sorted([("fp", "kv"), ("int4", "kv"), ("int8", "kv"), ("rank8-pca", "kv")])
    assert sorted(r["pid"] for r in data["runs"]) == sorted(p.pid for p in procs)
    assert sorted(m for r in data["runs"] for m, _ in r["computed"]) == ["fp", "int4", "int8",
                                                                         "rank8-pca"]
    assert not list(tmp_path.glob(".same.json*"))  # no lock or temp file left behind


STALL_IN_LOCK = textwrap.dedent("""
    import sys, time
    import kvtheory.runs as runs
    def stalled(*args, **kw):
        time.sleep(600)  # holding the lock; the test sends SIGTERM here
    runs.write_json = stalled
    from kvtheory.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_unwinds_and_releases_the_lock(tiny, tmp_path):
    import signal
    import time

    driver, out = tmp_path / "driver.py", tmp_path / "out" / "r.json"
    driver.write_text(STALL_IN_LOCK)
    proc = subprocess.Popen([sys.executable, str(driver), *_cli_args(tiny, out, "fp")], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out.parent / ".r.json.lock"
    try:
        t0 = time.monotonic()
        while not lock.exists() and proc.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.1)
        assert lock.read_text().split() == [str(proc.pid)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines() == [
        "kvtheory eval: terminated; finished rows are saved"]
    assert list(out.parent.iterdir()) == []  # no lock, no temporary file, no half result


def test_lock_waits_names_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    target = tmp_path / "r.json"
    with io.file_lock(target, "json") as lock:
        assert lock.read_text().split() == [str(os.getpid())]
        with pytest.raises(KVTheoryError, match=rf"json: got .*r.json', locked by PID {os.getpid()} "
                                                r"\(still running\) for over 0.2 s"):
            with io.file_lock(target, "json", timeout=0.2):
                pass
    assert not lock.exists()
    # a lock file left by a killed run: its PID is gone and no one holds the flock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid}\n")
    with io.file_lock(target, "json", timeout=0.2) as again:
        assert again.read_text().split() == [str(os.getpid())]
    assert not lock.exists()


def test_lock_without_flock_uses_a_pid_file_and_removes_a_stale_one(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    target = tmp_path / "r.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".r.json.lock").write_text(f"{dead.pid}\n")
    with io.file_lock(target, "json", timeout=0.2) as lock:
        assert lock.read_text().split() == [str(os.getpid())]
        with pytest.raises(KVTheoryError, match=f"locked by PID {os.getpid()} .still running."):
            with io.file_lock(target, "json", timeout=0.2):
                pass
    assert not lock.exists()


# ----------------------------------------------------------------------------- output paths
def test_hostile_json_paths_refused_before_any_work(tiny, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.setattr("kvtheory.evaljob.Job.load_data", lambda self: pytest.fail("data read"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {"/dev/null": "which is a device node", str(fifo): "which is a FIFO",
             str(tmp_path): "which is a folder",
             str(tmp_path / ("x" * 300 + ".json")): "a file name of 305 bytes .*expected at most "
                                                     f"{io._name_max(tmp_path)} bytes"}
    for path, msg in cases.items():
        with pytest.raises(KVTheoryError, match=f"json: got .*{msg}"):
            run(tiny, path)
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()


def test_more_hostile_inputs_named_before_any_work(tiny, tmp_path, monkeypatch):
    """Found by trying more of the same kind: each was a traceback, a hang or data loss."""
    _no_model(monkeypatch)
    model_file = tiny["model"] / "config.json"
    before = model_file.read_bytes(), tiny["text"].read_bytes()
    for path, message in [
        ("", "json: got ''; expected a file path"),
        (str(tmp_path / "a\0b.json"), "expected a file path .non-empty, without NUL characters"),
        (str(tiny["text"]), "expected a result file outside the inputs .it would overwrite"),
        (str(model_file), "expected a result file outside the inputs"),
    ]:
        with pytest.raises(KVTheoryError, match=message):
            run(tiny, path)
    assert (model_file.read_bytes(), tiny["text"].read_bytes()) == before
    with pytest.raises(KVTheoryError, match=r"seed: got 1180591620717411303424; expected an "
                                            r"integer in 0..9223372036854775807"):
        run(tiny, tmp_path / "s.json", seed=2**70)
    with pytest.raises(KVTheoryError, match=r"n_boot: got 10000000000; expected an integer in "
                                            r"1..100000"):  # was an out-of-memory after a row
        run(tiny, tmp_path / "n.json", n_boot=10**10)
    for name, value in (("text_file", "a\0b"), ("data_dir", "c\0d")):
        with pytest.raises(KVTheoryError, match=f"{name}: got .*; expected a name or path without NUL"):
            run(tiny, tmp_path / "z.json", **{name: value})
    with pytest.raises(KVTheoryError, match="batch_size: got 0; expected an integer >= 1"):
        run_eval(cfg(tiny), tmp_path / "b.json", batch_size=0, progress=False)
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for text in ("/dev/zero", str(fifo)):  # would never end / block forever
        # the message shortens long values ('...'): match the start of the path
        with pytest.raises(KVTheoryError, match=f"text_file: got '{re.escape(text[:40])}.*; expected a regular"):
            run(tiny, tmp_path / "t.json", text_file=text)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(KVTheoryError, match="bin.json', which is not a readable kvtheory eval"):
        run(tiny, binary)
    with pytest.raises(KVTheoryError, match="which is not UTF-8 text"):
        io.read_json(binary)
    with pytest.raises(KVTheoryError, match="fifo.txt', which is not a regular file"):
        io.read_json(fifo)
    assert not list(tmp_path.glob("[stbnz].json"))


def test_symlinked_json_updates_its_target(tiny, tmp_path, one_thread):
    real, link = tmp_path / "real" / "r.json", tmp_path / "link.json"
    real.parent.mkdir()
    link.symlink_to(real)  # dangling: the run creates the target
    out = run(tiny, link, ("fp",))
    assert out["path"] == str(real) and link.is_symlink() and real.is_file()
    run(tiny, link, ("fp", "int4"))  # resumes through the link
    assert link.is_symlink() and [r["method"] for r in json.loads(real.read_text())["records"]] == [
        "fp", "int4"]


def test_disk_full_is_named_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    io.write_json(path, {"old": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(KVTheoryError, match=r"json: got .*r.json'; expected a path that can be "
                                            r"written \(No space left on device: the disk or quota"):
        io.write_json(path, {"new": 2}, arg="json")
    monkeypatch.undo()

    def writer(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(KVTheoryError, match="No space left on device: the disk or quota is full"):
        io.atomic_write(path, writer, arg="out")
    assert io.read_json(path) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_long_name_temp_and_lock_files_fit(tmp_path):
    name = "y" * (io._name_max(tmp_path) - 5) + ".json"  # fits, but ".NAME.xxxx.tmp" would not
    path = tmp_path / name
    with io.file_lock(path, "json"):
        io.write_json(path, {"a": 1})
    assert io.read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == [name]


def test_verify_json_folder_and_figures_out_file_refused_first(tmp_path, capsys, monkeypatch):
    from kvtheory import symbolic
    from kvtheory.cli import main

    monkeypatch.delenv("KVTHEORY_DEBUG", raising=False)
    monkeypatch.setattr(symbolic, "derivations", lambda: pytest.fail("verify computed"))
    assert main(["verify", "--json", str(tmp_path)]) == 2
    assert "--json: got" in capsys.readouterr().err
    assert main(["verify", "--json", "/dev/null"]) == 2
    assert "which is a device node" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["figures", "--results", str(tmp_path), "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.strip().endswith("which is a file; expected a folder")


# ----------------------------------------------------------------------------- integrity
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A finished two-row file (computed once for the module)."""
    det, threads, old = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                         torch.get_default_dtype())
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("saved") / "r.json"
        run(tiny, path)
    finally:
        torch.set_default_dtype(old)
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)
    return json.loads(path.read_text())


def _dup(d):
    d["records"].append(copy.deepcopy(d["records"][0]))


def _edit(d):
    d["records"][1]["value"] *= 0.5


def _unknown(d):
    d["records"][1]["method"] = "int4-wat"


@pytest.mark.parametrize("tamper, message", [
    (_edit, r"whose content does not match its result_sha256 [0-9a-f]{12}\.\.\. \(edited by hand\?\)"),
    (_dup, "which holds the row fp/kv twice"),
    (_unknown, "whose record 1 has the unknown method 'int4-wat'"),
    (lambda d: d.pop("provenance"), "whose 'provenance' block is missing"),
    (lambda d: d["provenance"].pop("weights"), "whose provenance block is incomplete"),
    (lambda d: d.pop("result_sha256"), "whose 'result_sha256' block is missing"),
    (lambda d: d.update(format=1), "of format 1"),
    (lambda d: d["records"][0].update(value=None), r"whose record 0 \(fp/kv\) has the non-finite value None"),
    (lambda d: d["records"][0].pop("provenance"), "whose record 0 lacks some of"),
    (lambda d: d.update(config_hash="abc"), "whose config_hash does not match its config"),
])
def test_tampered_file_refused_on_resume(tiny, tmp_path, saved, monkeypatch, tamper, message):
    data = copy.deepcopy(saved)
    check_eval_file(copy.deepcopy(data), "x.json")  # the untouched file passes
    tamper(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    _no_model(monkeypatch)
    with pytest.raises(KVTheoryError, match=rf"json: got '{path}', {message}.*expected an "
                                            "unmodified kvtheory eval result"):
        run(tiny, path, ("fp", "int4", "int8"))


def test_replaced_weights_are_not_resumed(tiny, tmp_path, saved, monkeypatch):
    from test_evaluate import tiny_llama

    folder = tmp_path / "model"
    shutil.copytree(tiny["model"], folder)
    fp0 = weights_fingerprint(str(folder))
    assert fp0 == weights_fingerprint(str(tiny["model"])) and fp0["files"] >= 3
    path = tmp_path / "r.json"
    data = copy.deepcopy(saved)
    data["config"]["model"] = str(folder)  # the same rows, saved for the copy's path
    data["config_hash"] = EvalConfig.from_dict(data["config"]).hash()
    data.pop("result_sha256")
    from kvtheory.store import result_sha256

    data["result_sha256"] = result_sha256(data)
    path.write_text(json.dumps(data))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tiny_llama(vocab=vocab, max_pos=128, seed=1).save_pretrained(folder)  # same shapes, new values
    fp1 = weights_fingerprint(str(folder))
    assert fp1["sha256"] != fp0["sha256"] and fp1["bytes"] == fp0["bytes"]
    _no_model(monkeypatch)
    with pytest.raises(KVTheoryError, match=r"saved for other weights of model .*fingerprint "
                                            rf"{fp0['sha256'][:12]}\.\.\. vs {fp1['sha256'][:12]}"):
        run(tiny, path, model=folder)


def test_fingerprint_samples_large_files(tmp_path):
    big = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(9 << 20))  # above the 8 MiB whole-file limit: sampled
    big.write_bytes(data)
    a = weights_fingerprint(str(tmp_path))
    data[(len(data) - (1 << 16)) // 2 + 10] ^= 0xFF  # a byte inside the middle sample
    big.write_bytes(data)
    b = weights_fingerprint(str(tmp_path))
    assert a["sha256"] != b["sha256"] and a["bytes"] == b["bytes"] == 9 << 20
    (tmp_path / "config.json").write_text("{}")  # configs count too
    assert weights_fingerprint(str(tmp_path))["files"] == 2


# ----------------------------------------------------------------------------- rows
def test_non_finite_row_reported_not_saved(tiny, tmp_path, capsys, one_thread):
    from kvtheory.cli import main

    folder = tmp_path / "nan-model"
    shutil.copytree(tiny["model"], folder)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.lm_head.weight[3] = float("nan")
    m.save_pretrained(folder)
    out = tmp_path / "nan.json"
    args = _cli_args({**tiny, "model": folder}, out, "fp,int4")
    for _ in range(2):  # a rerun computes the rows again instead of crashing on them
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["kvtheory eval: error: 2 rows not saved, their metric is not finite: fp/kv "
                       "(ppl = nan); int4/kv (ppl = nan); expected finite metrics (a rerun "
                       "computes them again)"]
        data = json.loads(out.read_text())
        assert data["records"] == [] and data["runs"][-1]["failed"][0][:2] == ["fp", "kv"]


def test_one_window_has_no_interval(tiny, tmp_path, capsys, one_thread):
    from kvtheory.cli import main
    from kvtheory.evaluate import bootstrap_ci

    with pytest.raises(KVTheoryError, match="num: got .*expected at least two items"):
        bootstrap_ci(torch.tensor([2.0]), torch.ones(1))
    out = tmp_path / "one.json"
    args = _cli_args(tiny, out, "fp")
    args[args.index("--max-windows") + 1] = "1"
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "n/a (1 item)" in table and "needs at least two items" in table
    rec = json.loads(out.read_text())["records"][0]
    assert rec["n_items"] == 1 and rec["ci_low"] is None and rec["ci_high"] is None
    assert rec["ci_note"] == "no interval: a bootstrap interval needs at least two items, got 1"
    assert rec["value"] > 1 and main(args) == 0  # resumes (null interval allowed for one item)
    assert "0 rows computed, 1 resumed" in capsys.readouterr().out


def test_methods_checked_against_the_model_before_loading_it(tiny, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(KVTheoryError, match=r"method: got 'rank17-pca' for the keys of a model "
                                            r"with head dimension d=16; .*rank: got 17"):
        run(tiny, tmp_path / "r.json", ("fp", "rank17-pca"))
    check_methods(("fp", "rank16-pca", "int4-kivi"), ("k", "v", "kv"), 16)  # all fit
    assert not (tmp_path / "r.json").exists()


def test_unavailable_devices_named_before_any_work(tiny, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(KVTheoryError, match="device: got 'mps'; expected an available device "
                                                r"\(this torch has no MPS backend"):
            run(tiny, tmp_path / "r.json", device="mps")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(KVTheoryError, match=f"device: got 'cuda:{n}'; expected"):
        run(tiny, tmp_path / "r.json", device=f"cuda:{n}")


def test_load_model_names_unavailable_devices(tiny):
    from kvtheory.models import load_model

    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(KVTheoryError, match="device: got 'mps'; expected an available device"):
            load_model(str(tiny["model"]), device="mps")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(KVTheoryError, match=f"device: got 'cuda:{n}'; expected"):
        load_model(str(tiny["model"]), device=f"cuda:{n}")


def test_system_errors_print_one_line(monkeypatch, capsys):
    import kvtheory.commands.verify as verify
    from kvtheory.cli import main

    def eio(args):
        raise OSError(errno.EIO, "Input/output error", "/mnt/x.json")

    monkeypatch.delenv("KVTHEORY_DEBUG", raising=False)
    monkeypatch.setattr(verify, "run", eio)
    assert main(["verify"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "kvtheory verify: error: the system refused: Input/output error (/mnt/x.json); nothing "
        "more was written (set KVTHEORY_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("KVTHEORY_DEBUG", "1")
    with pytest.raises(OSError):
        main(["verify"])


def test_values_json_cannot_hold_are_named(tmp_path):
    from kvtheory.store import config_hash, result_sha256

    with pytest.raises(KVTheoryError, match=r"json: got inf at rows\[1\]\.ppl; expected finite"):
        io.write_json(tmp_path / "r.json", {"rows": [{"ppl": 1.0}, {"ppl": float("inf")}]}, "json")
    with pytest.raises(KVTheoryError, match=r"config: got torch.float32 at dtype; expected"):
        config_hash({"dtype": torch.float32})
    with pytest.raises(KVTheoryError, match=r"result: got -inf at x"):
        result_sha256({"x": float("-inf")})
    with pytest.raises(KVTheoryError, match=r"path: got .*, which cannot be read \(Is a directory\)"):
        io.sha256_file(tmp_path)
    assert not list(tmp_path.iterdir())
    # unchanged digests: NaN still saved as null, and the hand-checked canonical form
    import hashlib

    assert result_sha256({"b": float("nan"), "a": [1]}) == hashlib.sha256(
        b'{"a":[1],"b":null}').hexdigest()


def test_figures_name_a_result_they_cannot_draw(tmp_path, capsys, monkeypatch):
    """A checksummed result of another schema (an older kvtheory): named, not a KeyError."""
    from kvtheory.cli import main
    from kvtheory.store import cached

    monkeypatch.delenv("KVTHEORY_DEBUG", raising=False)
    env = cached("routing-smollm2-135m", {"x": 1}, lambda: {"junk": 1}, root=tmp_path / "res",
                 model="smollm2-135m")
    assert main(["figures", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kvtheory figures: error: results: got '{env['path']}', "
                                               "whose routing result cannot be drawn (KeyError")


def test_format_table_handles_missing_intervals():
    rec = {"method": "fp", "target": "kv", "bits_per_element": 16.0, "metric": "ppl", "value": 3.5,
           "ci_low": None, "ci_high": None, "n_tokens": 31, "n_items": 1}
    lines = format_table([rec, {**rec, "ci_low": 3.0, "ci_high": 4.0, "n_items": 2}]).splitlines()
    assert "n/a (1 item)" in lines[2] and "[3, 4]" in lines[3] and len(lines) == 5


def test_lambada_items_validated(tiny):
    from test_evaluate import tiny_llama

    from kvtheory.evaluate import lambada

    model = tiny_llama(vocab=50, max_pos=64)
    cases = [([([1, 2], [])], r"items\[0\]: got .*expected a non-empty target"),
             ([([1, 2], [3]), ([], [4])], r"items\[1\]: got .*expected a non-empty context"),
             ([([1, 99], [3])], r"items\[0\]: .*context ids in 0..49 \(got ids in 1..99\)"),
             ([([1, 2], [-1])], r"target ids in 0..49 \(got ids in -1..-1\)"),
             ([(1, 2, 3)], r"items\[0\]: got \(1, 2, 3\); expected a \(context ids, target ids\)"),
             ([([1, 2.5], [3])], "integer token ids in its context")]
    for items, message in cases:  # as a user calls it: without the test-time type checker
        with pytest.raises(KVTheoryError, match=message):
            inspect.unwrap(lambada)(model, items, n_boot=10)


def test_figures_and_load_result_require_the_checksum(tmp_path, capsys, monkeypatch):
    from kvtheory.cli import main
    from kvtheory.store import cached, load_result

    monkeypatch.delenv("KVTHEORY_DEBUG", raising=False)
    env = cached("routing", {"n": 1}, lambda: {"rows": [1.5, 2.5]}, root=tmp_path / "ok")
    src = Path(env["path"])
    assert load_result(src)["result"] == {"rows": [1.5, 2.5]}  # with its checksum: loads
    data = json.loads(src.read_text())
    data.pop("result_sha256")
    bad = tmp_path / "results" / src.name
    bad.parent.mkdir()
    bad.write_text(json.dumps(data))
    with pytest.raises(KVTheoryError, match="which carries no result_sha256"):
        load_result(bad)
    assert main(["figures", "--results", str(bad.parent), "--out", str(tmp_path / "f")]) == 2
    assert "which carries no result_sha256" in capsys.readouterr().err
    assert not list((tmp_path / "f").glob("*.p*"))  # nothing drawn
    assert main(["figures", "--results", "/dev/null", "--out", str(tmp_path / "f")]) == 2
    assert "--results: got '/dev/null', which is not a folder" in capsys.readouterr().err
