"""The plumbing of ``kvtheory bench`` on tiny models and tensors (no timing assertions)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _tiny import tiny_ids, tiny_model
from tol import assert_close

from kvtheory import bench
from kvtheory.cli import main
from kvtheory.errors import KVTheoryError
from kvtheory.timing import Timing

needs_quanto = pytest.mark.skipif(not bench.quanto_available(), reason="optimum-quanto missing")


def _tiny16():
    """Tiny Llama with head_dim 16 (rank16-pca fits), 2 layers, GQA 4/2."""
    return tiny_model("llama", head_dim=16)


def _check_rows(res: dict) -> None:
    for row in res["rows"]:
        assert tuple(row) == bench.ROW_KEYS


def _median(res: dict, label: str) -> float:
    return res["timings"][label]["median_s"]


# ----------------------------------------------------------------------------- formulas
def test_flip_flops_by_hand():
    # 2 matmuls x 2 flops (multiply, add) x B H Q T d
    assert bench.flip_flops(2, 3, 5, 7, 11) == 2 * 2 * (2 * 3 * 5 * 7 * 11)
    # the engine's matmul (kv, g*Q, d) @ (kv, d, T) per batch row: 2 (g Q) d T flops per kv head
    B, Hq, Hkv, Q, T, d = 2, 9, 3, 5, 7, 4
    per_matmul = B * Hkv * 2 * (Hq // Hkv * Q) * d * T
    assert bench.flip_flops(B, Hq, Q, T, d) == 2 * per_matmul
    assert bench.flip_flops(1, 1, 1, 1, 1, matmuls=1) == 2


def test_flip_flops_rejects_zero():
    with pytest.raises(KVTheoryError, match="tokens"):
        bench.flip_flops(1, 9, 4, 0, 64)


def test_ratio_row_from_timings():
    t = Timing({"a": [1.0, 3.0, 2.0], "b": [4.0, 5.0, 6.0]})
    row = bench.ratio_row("c", "b vs a", t, "b", "a", device="cpu", dtype="float32",
                          target=("<=", 3.0))
    assert tuple(row) == bench.ROW_KEYS
    assert row["ratio"] == 5.0 / 2.0 and row["baseline_s"] == 2.0 and row["measured_s"] == 5.0
    assert row["met"] is True and row["target"] == "≤ 3×"
    inv = bench.ratio_row("c", "speed-up", t, "a", "b", device="cpu", dtype="float32",
                          target=(">=", 50.0), invert=True)
    assert inv["ratio"] == 5.0 / 2.0 and inv["met"] is False
    assert bench.ratio_row("c", "x", t, "b", "a", device="cpu", dtype="float32")["met"] is None


def test_quanto_spec():
    assert [bench.quanto_spec(d) for d in (64, 128, 32)] == ["int4-g64", "int4-g64", "int4"]
    assert bench.quanto_spec(8, nbits=2, q_group_size=8) == "int2-g8"


# ----------------------------------------------------------------------------- cases
def test_case_flips_keys_and_ratios():
    res = bench.case_flips(tokens=24, q_heads=4, kv_heads=2, d=8, reps=2, warmup=0)
    _check_rows(res)
    assert set(res["timings"]) == {"matmul", "attention_metrics", "flip_rate",
                                   "attention_metrics_causal"}
    assert all(v["reps"] == 2 for v in res["timings"].values())
    row = res["rows"][0]
    assert row["ratio"] == _median(res, "attention_metrics") / _median(res, "matmul")
    assert row["target"] == "≤ 1.5×" and row["met"] == (row["ratio"] <= 1.5)
    flops = 2 * 2 * 1 * 4 * 24 * 24 * 8
    assert res["flops_per_call"] == flops
    assert res["tflops"]["matmul"] == flops / _median(res, "matmul") / 1e12


def test_case_flips_torch_row_times_the_torch_path_once(monkeypatch):
    # the row of attention_metrics with the fused kernel off: one timed call, inside
    # torch_path() (KVTHEORY_FUSED=never while it runs, restored after)
    from kvtheory import _triton_metrics as tm
    from kvtheory import flips

    seen = []
    real = flips.attention_metrics

    def spy(*a, **k):
        seen.append(os.environ.get(tm.ENV))
        return real(*a, **k)

    monkeypatch.setattr(flips, "attention_metrics", spy)
    monkeypatch.delenv(tm.ENV, raising=False)
    res = bench.case_flips(tokens=16, q_heads=2, kv_heads=1, d=8, reps=2, warmup=0,
                           causal_row=False, torch_row=True)
    assert res["timings"]["attention_metrics_torch"]["reps"] == 1
    row = next(r for r in res["rows"] if "torch path" in r["what"])
    assert row["ratio"] == _median(res, "attention_metrics_torch") / _median(res, "matmul")
    assert seen.count("never") == 2 and seen.count(None) == 2    # warm-up + 1 rep; 2 reps
    assert tm.ENV not in os.environ


def test_case_flips_bf16_adds_fp32_baseline():
    res = bench.case_flips(tokens=16, q_heads=2, kv_heads=1, d=8, reps=1, warmup=0,
                           dtype=torch.bfloat16, causal_row=False)
    assert set(res["timings"]) == {"matmul", "attention_metrics", "flip_rate", "matmul_fp32"}
    last = res["rows"][-1]
    assert last["ratio"] == _median(res, "attention_metrics") / _median(res, "matmul_fp32")
    assert last["dtype"] == "bfloat16"


def test_flip_inputs_are_quantized_keys():
    q, k, kh = bench.flip_inputs(8, q_heads=4, kv_heads=2, d=8, dtype=torch.float32)
    from kvtheory.quantize import quantize

    assert q.shape == (1, 4, 8, 8) and k.shape == kh.shape == (1, 2, 8, 8)
    assert_close(kh, quantize(k, 4), "exact64")


def test_case_eval_tiny():
    from kvtheory.evaluate import perplexity

    model = _tiny16()
    ids = tiny_ids(batch=3, tokens=16)
    res = bench.case_eval(model, ids[:2], ids[2:], reps=1, warmup=0)
    _check_rows(res)
    assert set(res["timings"]) == {"fp", "int4-kivi", "rank16-pca"}
    kivi, pca, fit = res["rows"]
    assert kivi["ratio"] == _median(res, "int4-kivi") / _median(res, "fp")
    assert pca["ratio"] == _median(res, "rank16-pca") / _median(res, "fp")
    assert kivi["target"] == "≤ 1.1×" and pca["target"] == "≤ 1.25×"
    assert fit["measured_s"] == res["fit_s"]["rank16-pca"] and fit["met"] is None
    assert list(res["fit_s"]) == ["rank16-pca"]  # int4-kivi needs no fit
    for m in ("int4-kivi", "rank16-pca"):
        share = res["compressor_s"][m]
        assert 0 < share["inside_s"] <= share["total_s"]
    # the PPLs the case reports are those of the evaluation API
    assert_close(res["ppl"]["fp"], perplexity(model, ids[:2], n_boot=1).value, "float32")
    ref = perplexity(model, ids[:2], keys="int4-kivi", values="int4-kivi", n_boot=1).value
    assert_close(res["ppl"]["int4-kivi"], ref, "float32")


def test_compressor_share_counts_compressor_calls():
    from kvtheory.evaluate import window_nll
    from kvtheory.patch import compressed_kv

    model = tiny_model("llama")
    ids = tiny_ids(batch=1, tokens=8)
    calls = []

    def run():
        with compressed_kv(model, "int4", "fp"):
            window_nll(model, ids)

    from kvtheory import patch

    inner = patch._apply
    patch._apply = lambda comp, x, *mask: calls.append(x.shape) or inner(comp, x, *mask)
    try:
        inside, total = bench.compressor_share(run, "cpu")
    finally:
        patch._apply = inner
    assert len(calls) == 2  # keys of the 2 layers; values are fp (no call)
    assert 0 < inside <= total
    assert bench.compressor_share(lambda: window_nll(model, ids), "cpu")[0] == 0.0


def test_case_capture_tiny(tmp_path):
    model = tiny_model("llama")
    ids = tiny_ids(batch=1, tokens=12)
    res = bench.case_capture(model, ids, reps=2, warmup=0, out_dir=tmp_path)
    _check_rows(res)
    row = res["rows"][0]
    assert row["ratio"] == _median(res, "capture+save") / _median(res, "forward")
    # q (4 heads) + k, v (2 heads) of 2 layers, 12 tokens, d 8, float32
    assert res["bytes"] == 2 * (4 + 2 + 2) * 12 * 8 * 4
    assert list(tmp_path.iterdir()) == []  # the temporary capture is removed


def test_case_capture_breakdown_rows(tmp_path):
    # the rows a GPU run adds (here on the CPU): capture alone and kept as computed, the
    # save's time by difference, and no CPU target on the disk-bound row
    model = tiny_model("llama")
    res = bench.case_capture(model, tiny_ids(batch=1, tokens=12), reps=2, warmup=0,
                             out_dir=tmp_path, breakdown=True)
    _check_rows(res)
    full, alone, kept = res["rows"]
    assert full["target"] == "—" and full["met"] is None
    save = _median(res, "capture+save") - _median(res, "capture")
    assert f"saving {save:.2f} s" in full["note"]
    assert alone["ratio"] == _median(res, "capture") / _median(res, "forward")
    assert kept["ratio"] == _median(res, "capture_on_device") / _median(res, "forward")
    assert kept["target"] == "≤ 1.3×" and kept["met"] == (kept["ratio"] <= 1.3)


def test_mistral7b_shape_and_shape_label_in_rows(tmp_path):
    # the real shape's parameter count by hand (no weights made): embeddings and head, per
    # layer q, o (4096²), k, v (4096·1024), the MLP's three 4096·14336, two norms; final norm
    sh = bench.MISTRAL7B_SHAPE
    h, f, v, kv = sh["hidden_size"], sh["intermediate_size"], sh["vocab_size"], 8 * 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    assert 2 * v * h + sh["num_hidden_layers"] * per_layer + h == 7_241_732_096
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=50)
    model = bench.mistral7b_shaped_model("cpu", "bfloat16", **tiny)
    assert type(model).__name__ == "MistralForCausalLM" and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    n = sum(p.numel() for p in model.parameters())
    assert n == 2 * 50 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    ids = bench.random_ids(8, 50, batch=1, seed=1)
    res = bench.case_capture(model, ids, reps=1, warmup=0, out_dir=tmp_path, shape=", 7B")
    assert res["rows"][0]["what"].endswith("all layers, 7B")


def test_case_memory_cpu_subprocess():
    res = bench.case_memory(tokens=64, queries=16, q_heads=2, kv_heads=1, d=8)
    _check_rows(res)
    if res["peak_hwm"] is not None:  # Linux: VmHWM, reset before the call
        assert res["peak_bytes"] == res["peak_hwm"] - res["baseline_rss"]
    else:
        assert res["peak_bytes"] == res["peak_maxrss"] - res["baseline_maxrss"]
    assert res["input_bytes"] == 4 * (2 * 16 * 8 + 3 * 64 * 8)  # q + k, k_hat, v in float32
    row = res["rows"][0]
    assert row["target"] == "< 2 GiB" and row["met"] == (res["peak_bytes"] < 2 * 2**30)
    assert 0.0 <= res["flip_rate"] <= 1.0


# ----------------------------------------------------------------------------- quanto
def test_decode_loop_matches_one_pass_uncompressed():
    model = tiny_model("llama")
    ids = tiny_ids(batch=1, tokens=10)[0]
    nll_dec, n_dec = bench.quanto_decode_nll(model, ids, cache=None)
    nll_one, n_one = bench.onepass_nll(model, ids, None)
    assert n_dec == n_one == 9
    assert_close(nll_dec, nll_one, "float32")


@needs_quanto
def test_quanto_grid_is_int4_per_token_group():
    from transformers.cache_utils import QuantoQuantizedLayer

    from kvtheory.quantize import quantize

    x = torch.randn(1, 3, 10, 64, generator=torch.Generator().manual_seed(0)).float()
    layer = QuantoQuantizedLayer(nbits=4, q_group_size=64)
    ref = layer._dequantize(layer._quantize(x.contiguous(), axis=0))
    assert_close(quantize(x, 4, group=64), ref, "float32")


@needs_quanto
def test_quanto_ppl_agrees_with_one_pass():
    model = tiny_model("llama")
    ids = tiny_ids(batch=1, tokens=12)[0]
    # residual_length=1: every past token quantized at each step (only the newest is fp)
    nll_q, n = bench.quanto_decode_nll(model, ids, q_group_size=8, residual_length=1)
    nll_1, m = bench.onepass_nll(model, ids, bench.quanto_spec(8, q_group_size=8))
    assert n == m == 11
    assert_close(math.exp(nll_q / n), math.exp(nll_1 / m), "int8_model")


@needs_quanto
def test_case_quanto_tiny():
    model = tiny_model("llama")
    ids = tiny_ids(batch=1, tokens=8)[0]
    res = bench.case_quanto(model, ids, reps=2, q_group_size=8)
    _check_rows(res)
    assert res["spec"] == "int4-g8"
    assert res["timings"]["quanto"]["reps"] == 1 and res["timings"]["onepass"]["reps"] == 2
    row = res["rows"][0]
    assert row["ratio"] == _median(res, "quanto") / _median(res, "onepass")
    assert row["met"] == (row["ratio"] >= 50)
    assert set(res["ppl"]) == {"quanto", "onepass", "fp", "fp_decode"}
    assert_close(res["ppl"]["fp_decode"], res["ppl"]["fp"], "float32")


# ----------------------------------------------------------------------------- output
def test_table_text_shows_rows():
    t = Timing({"a": [2.0], "b": [5.0]})
    rows = [bench.ratio_row("c", "b vs a", t, "b", "a", device="cpu", dtype="float32",
                            target=("<=", 1.5))]
    text = bench.table_text(rows)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[0].split("|")[1].strip() == "case"
    assert "2.5×" in text and "≤ 1.5×" in text and "NO" in text


def test_cli_bench_flips(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", "--only", "flips", "--flip-tokens", "16", "--reps", "1",
                 "--json", str(out), "--gpu-json", "none"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "kvtheory.bench" and doc["provenance"]["torch_version"]
    assert doc["machine"]["cpu"] and doc["machine"]["cores"] >= 1
    assert [c["case"] for c in doc["cases"]] == ["flips"]
    assert doc["rows"] == doc["cases"][0]["rows"]
    printed = capsys.readouterr().out
    assert "attention_metrics vs 2 bare matmuls" in printed and "targets met" in printed


def test_cli_prints_gpu_rows(tmp_path, capsys):
    t = Timing({"a": [1.0], "b": [1.2]})
    rows = [bench.ratio_row("flips", "gpu row", t, "b", "a", device="cuda", dtype="bfloat16")]
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"rows": rows, "machine": {"gpu": {"name": "Test GPU"},
                                                         "date": "2026-01-01"},
                               "matmul_peak": {"tflops": 700.0, "n": 8192}}))
    code = main(["bench", "--only", "flips", "--flip-tokens", "8", "--reps", "1",
                 "--json", str(tmp_path / "r.json"), "--gpu-json", str(gpu)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Test GPU" in printed and "gpu row" in printed and "700 TFLOP/s" in printed


def test_cli_records_the_printed_table_in_readmes(tmp_path, capsys):
    from kvtheory.commands.bench import README_END, README_START

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    code = main(["bench", "--only", "flips", "--flip-tokens", "16", "--reps", "1",
                 "--json", str(tmp_path / "r.json"), "--gpu-json", "none",
                 "--readme", str(readme)])
    assert code == 0
    printed = capsys.readouterr().out
    text = readme.read_text()
    head, rest = text.split(README_START)
    body, tail = rest.split(README_END)
    assert head == "# title\n\n" and tail == "\n\nafter\n" and "old table" not in body
    # the section is what the command printed, line for line
    table = [ln for ln in body.strip().splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 3 and all(ln in printed for ln in table)   # header, rule, 3 rows
    assert body.strip().splitlines()[0] in printed and "targets met" in body


def test_cli_readme_without_markers_fails_before_the_work(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    out = tmp_path / "r.json"
    code = main(["bench", "--only", "flips", "--flip-tokens", "16", "--reps", "1",
                 "--json", str(out), "--readme", str(readme)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and readme.read_text() == "# no markers\n"
    assert len(err) == 1 and "--readme" in err[0] and "kvtheory bench: results start" in err[0]


@pytest.mark.parametrize("argv, word", [
    (["--only", "nope"], "--only"),
    (["--device", "tpu"], "--device"),
    (["--reps", "0"], "--reps"),
    (["--dtype", "int8"], "--dtype"),
    (["--eval-windows", "2by512"], "--eval-windows"),
    (["--memory-tokens", "8", "--memory-queries", "9"], "--memory-queries"),
])
def test_cli_bench_bad_input(argv, word, capsys):
    assert main(["bench", *argv, "--json", "/tmp/unused-kvtheory-bench.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0] and err[0].startswith("kvtheory bench: error:")
