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
