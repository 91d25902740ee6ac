"""``benchmarks/gpu_job.py --merge``: a run keeps the earlier file's cases whose rows it did
not measure again (by case, description, device and dtype), so a run of the 7B-shaped flip
rows alone keeps the smaller flip rows and the memory row of the run before."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _job():
    spec = importlib.util.spec_from_file_location("gpu_job", ROOT / "benchmarks" / "gpu_job.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case(case, what, dtype, shape=None):
    row = {"case": case, "what": what, "device": "cuda", "dtype": dtype, "ratio": 1.0}
    return {"case": case, "shape": shape, "rows": [row]}


def test_merge_keeps_only_cases_the_run_did_not_measure_again():
    job = _job()
    small = {"q_heads": 9, "kv_heads": 3, "d": 64}
    big = {"q_heads": 32, "kv_heads": 8, "d": 128}
    old = [_case("flips", "attention_metrics (T=8192, 9/3 heads)", "bfloat16", small),
           _case("flips", "attention_metrics (T=16384, 32/8 heads)", "bfloat16", big),
           _case("flips", "attention_metrics (T=16384, 32/8 heads)", "float32", big),
           _case("memory", "peak memory, 9 q heads", "bfloat16")]
    new = [_case("flips", "attention_metrics (T=16384, 32/8 heads)", "bfloat16", big)]
    kept = job.merge_kept(old, new)
    assert kept == [old[0], old[2], old[3]]     # the same row in another dtype is another row
    assert job.kept_names(kept) == ["flips (32/8 heads, d=128)", "flips (9/3 heads, d=64)",
                                    "memory"]
    assert job.merge_kept(old, old) == [] and job.merge_kept(old, []) == old


def test_each_kept_case_names_the_run_that_measured_it():
    job = _job()
    small = {"q_heads": 9, "kv_heads": 3, "d": 64}
    a = _case("flips", "attention_metrics (T=8192, 9/3 heads)", "bfloat16", small)
    b = _case("flips", "attention_metrics (T=16384, 32/8 heads)", "bfloat16",
              {"q_heads": 32, "kv_heads": 8, "d": 128})
    mem = {"case": "memory", "q_heads": 32, "kv_heads": 8, "d": 128,
           "rows": [{"case": "memory", "what": "m", "device": "cuda", "dtype": "bfloat16"}]}
    job.stamp_source([a], "aaaaaaa", "2026-12-01T00:00:00")
    job.stamp_source([b, mem, a], "bbbbbbb", "2026-12-02T00:00:00")   # a keeps its source
    assert a["source"]["sha"] == "aaaaaaa" and mem["source"]["sha"] == "bbbbbbb"
    groups = job.kept_sources([b, mem, a])
    assert [g["sha"] for g in groups] == ["aaaaaaa", "bbbbbbb"]        # oldest first
    assert groups[0]["cases"] == ["flips (9/3 heads, d=64)"]
    assert groups[1]["cases"] == ["flips (32/8 heads, d=128)", "memory (32/8 heads, d=128)"]


def test_gpu_heading_names_every_source(tmp_path):
    import json

    from kvtheory.commands.bench import gpu_section

    row = {"case": "flips", "what": "w", "device": "cuda", "dtype": "bfloat16", "baseline": "-",
           "measured": "-", "ratio": 1.0, "target": "—", "met": None, "note": ""}
    doc = {"rows": [row], "machine": {"date": "D"}, "settings": {"source_git_sha": "c" * 40},
           "merged": {"kept": [{"cases": ["x"], "sha": "a" * 40, "date": "D1"},
                               {"cases": ["y", "z"], "sha": "b" * 40, "date": "D2"}]}}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    head = gpu_section(path).splitlines()[0]
    assert "(source ccccccc)" in head
    assert "rows of x kept from the run of D1 (source aaaaaaa)" in head
    assert "rows of y, z kept from the run of D2 (source bbbbbbb)" in head
