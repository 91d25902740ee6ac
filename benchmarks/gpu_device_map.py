"""A 7B-shaped model (Mistral-7B geometry, random weights, bf16) split across the GPU and the
CPU with an accelerate device map, run through kvtheory's code paths: fp inside
``compressed_kv`` equals the plain forward, INT4-KIVI and a fitted rank-32 PCA basis run with
each layer's compressors on that layer's device, capture collects layers from both devices, and
the flip engine measures a GPU layer and a CPU layer. Writes ``$OUT/gpu_device_map.json``.

Run on a GPU machine: ``python benchmarks/gpu_device_map.py`` (see benchmarks/README.md)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM, MistralConfig

    from kvtheory.capture import capture
    from kvtheory.flips import attention_metrics
    from kvtheory.patch import compressed_kv, fit_compressors

    out: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        vocab_size=32000, max_position_embeddings=4096)
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    cpu_layers = list(range(24, 32))            # the last 8 layers on the CPU
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    dmap |= {f"model.layers.{i}": ("cpu" if i in cpu_layers else 0) for i in range(32)}
    model = dispatch_model(model, device_map=dmap)
    out["build_s"] = time.perf_counter() - t
    out["device_map"] = {"cuda:0": 32 - len(cpu_layers), "cpu": len(cpu_layers)}
    T = int(os.environ.get("TOKENS", "512"))
    ids = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(1)).to("cuda")
    calib = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(2)).to("cuda")

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    with torch.no_grad():
        plain, out["fp_forward_s"] = timed(lambda: model(ids).logits.float())
        with compressed_kv(model, keys="fp", values="fp"):
            same, out["fp_in_compressed_kv_s"] = timed(lambda: model(ids).logits.float())
        out["fp_identical"] = bool(torch.equal(plain, same))
        with compressed_kv(model, keys="int4-kivi", values="int4"):
            kivi, out["int4_kivi_s"] = timed(lambda: model(ids).logits.float())
        plan, out["rank32_fit_s"] = timed(lambda: fit_compressors(model, "rank32-pca", "rank32-pca", calib))
        devs = {str(plan[i][0].fitted.rotation.device) for i in (0, 31)}
        out["fitted_basis_devices_layers_0_31"] = sorted(devs)
        with compressed_kv(model, calibration=plan):
            rank, out["rank32_pca_s"] = timed(lambda: model(ids).logits.float())
        ref = torch.log_softmax(plain[0, :-1], -1).gather(-1, ids[0, 1:, None].to(plain.device))
        for name, lg in (("int4_kivi", kivi), ("rank32_pca", rank)):
            lp = torch.log_softmax(lg[0, :-1], -1).gather(-1, ids[0, 1:, None].to(lg.device))
            out[f"{name}_mean_abs_dlogprob"] = float((lp - ref).abs().mean())
            out[f"{name}_finite"] = bool(torch.isfinite(lg).all())
        cap, out["capture_s"] = timed(lambda: capture(model, ids, layers=[0, 31], device="cpu"))
        from kvtheory.compress import make_compressor

        kivi_k = make_compressor("int4-kivi", "k")
        for layer in (0, 31):   # layer 0 ran on the GPU, layer 31 on the CPU
            q, k = cap[layer]["q"].to(torch.float32), cap[layer]["k"].to(torch.float32)
            m = attention_metrics(q, k, kivi_k(k), causal=True)
            out[f"layer{layer}_int4_kivi_flip_rate"] = float(m.flip_rate.mean())
            out[f"layer{layer}_q_shape"] = list(q.shape)
    out["ok"] = out["fp_identical"] and out["int4_kivi_finite"] and out["rank32_pca_finite"]
    path = os.path.join(os.environ.get("OUT", "."), "gpu_device_map.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
