"""``benchmarks/gpu_job.py --small --device cpu``: the GPU job's plumbing on the CPU at tiny
sizes, so a refactor that breaks a path only the GPU run takes (the torch-path row, the
7B-shaped cases) fails here and not on a lent GPU. No timing is asserted: each row's ratio is
checked against the medians of the timings it comes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tol import assert_close

ROOT = Path(__file__).resolve().parent.parent


def _job(out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_job.py"), "--small",
                           "--device", "cpu", "--reps", "2", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_job") / "gpu.json"
    return _job(out, "--only", "peak,flips7b,eval7b", "--git-sha", "aaaaaaa")


def test_no_step_failed_and_every_case_ran(dry):
    assert dry["errors"] == []
    assert [c["case"] for c in dry["cases"]] == ["flips", "memory", "eval", "capture"]
    assert dry["matmul_peak"]["tflops"] > 0


def test_rows_are_the_ratios_of_their_timings(dry):
    med = {}
    for c in dry["cases"]:
        for label, t in c["timings"].items():
            med[(c["case"], label)] = t["median_s"]
    flips = next(c for c in dry["cases"] if c["case"] == "flips")
    assert flips["shape"] == {"batch": 1, "q_heads": 32, "kv_heads": 8, "queries": 512,
                              "tokens": 512, "d": 128}
    by = {r["measured"].split()[0]: r for r in flips["rows"]}
    for label in ("attention_metrics", "flip_rate", "attention_metrics_torch"):
        assert_close(by[label]["ratio"], med[("flips", label)] / med[("flips", "matmul")])
    assert flips["timings"]["attention_metrics_torch"]["reps"] == 1
    ev = next(c for c in dry["cases"] if c["case"] == "eval")
    assert ev["methods"] == ["int4-kivi", "rank32-pca"]
    for r in ev["rows"][:2]:
        m = r["measured"].split()[0]
        assert "Mistral-7B shape" in r["what"]
        assert_close(r["ratio"], med[("eval", m)] / med[("eval", "fp")])


def test_a_merged_run_keeps_the_other_cases_with_their_source(dry, tmp_path):
    # a second run of the flip rows alone, merged into the first file: the eval, capture and
    # memory cases stay, each stamped with the first run, and the heading's groups say so
    first = tmp_path / "first.json"
    first.write_text(json.dumps(dry))
    doc = _job(tmp_path / "second.json", "--only", "flips7b", "--git-sha", "bbbbbbb",
               "--merge", str(first))
    assert doc["errors"] == []
    sources = [(c["case"], c["source"]["sha"]) for c in doc["cases"]]
    assert sources == [("eval", "aaaaaaa"), ("capture", "aaaaaaa"), ("flips", "bbbbbbb"),
                       ("memory", "bbbbbbb")]
    assert doc["merged"] == {"from": str(first), "kept": [
        {"cases": ["capture", "eval"], "sha": "aaaaaaa", "date": dry["machine"]["date"]}]}
    assert doc["matmul_peak"] == dry["matmul_peak"]       # "peak" was not run again
