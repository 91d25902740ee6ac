"""A 7B-shaped model (Mistral-7B geometry, random weights, bf16) placed on the GPU and the CPU
with an accelerate device map, run through kvtheory's code paths: fp inside ``compressed_kv``
equals the plain forward, INT4-KIVI and a fitted rank-32 PCA basis run with each layer's
compressors on the device its attention runs on, capture collects layers from both parts, and
the flip engine measures a layer of each part.

``MODE=offload`` (default; what ``--device-map auto`` gives when a model does not fit the GPU):
the last 8 layers' weights live in CPU memory and accelerate moves them to the GPU for each
forward, so every layer computes on the GPU. Writes ``$OUT/gpu_device_map.json``.

``MODE=split``: the same map with ``main_device="cpu"``, so the last 8 layers compute on the CPU
and activations cross devices twice a forward, as layers on two GPUs do (the path an N-GPU
map takes, with one GPU lent). Writes ``$OUT/gpu_device_map_split.json``.

``TINY=1`` builds a 4-layer model of small width (a dry run of the plumbing; on a machine
without CUDA every module is on the CPU).

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
    from kvtheory.compress import make_compressor
    from kvtheory.flips import attention_metrics
    from kvtheory.patch import compressed_kv, fit_compressors

    mode = os.environ.get("MODE", "offload")
    if mode not in ("offload", "split"):
        raise SystemExit(f"MODE: got {mode!r}; expected offload or split")
    tiny = os.environ.get("TINY") == "1"
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict = {"mode": mode, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if gpu == "cuda" else None,
                 "git_sha": os.environ.get("GIT_SHA")}
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = MistralConfig(**shape, vocab_size=32000, max_position_embeddings=4096)
    n = cfg.num_hidden_layers
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(gpu):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    cpu_layers = list(range(n - max(1, n // 4), n))   # the last quarter (8 of 32) on the CPU
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    dmap |= {f"model.layers.{i}": ("cpu" if i in cpu_layers else 0) for i in range(n)}
    if gpu == "cpu":
        dmap = {k: "cpu" for k in dmap}
    model = dispatch_model(model, device_map=dmap,
                           main_device="cpu" if mode == "split" or gpu == "cpu" else None)
    out["build_s"] = time.perf_counter() - t
    placed = [str(dmap[f"model.layers.{i}"]) for i in range(n)]
    out["device_map"] = {d: placed.count(d) for d in sorted(set(placed))}   # layers per place
    first, last = 0, n - 1
    T = int(os.environ.get("TOKENS", "512"))
    where = "cpu" if mode == "split" else gpu        # inputs go where the first hook wants them
    ids = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(1)).to(where)
    calib = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(2)).to(where)
    seen: dict[int, str] = {}                 # the device each layer's attention computes on

    def spy(i):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i] = str(h.device)
        return hook

    attn = [model.model.layers[i].self_attn for i in range(n)]
    handles = [a.register_forward_pre_hook(spy(i), with_kwargs=True) for i, a in enumerate(attn)]

    def timed(fn):
        if gpu == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if gpu == "cuda":
            torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    with torch.no_grad():
        plain, out["fp_forward_s"] = timed(lambda: model(ids).logits.float())
        for h in handles:
            h.remove()
        out["attention_device_layers"] = {d: sorted(i for i in seen if seen[i] == d)
                                          for d in sorted(set(seen.values()))}
        with compressed_kv(model, keys="fp", values="fp"):
            same, out["fp_in_compressed_kv_s"] = timed(lambda: model(ids).logits.float())
        out["fp_identical"] = bool(torch.equal(plain, same))
        with compressed_kv(model, keys="int4-kivi", values="int4"):
            kivi, out["int4_kivi_s"] = timed(lambda: model(ids).logits.float())
        pca = out["pca"] = "rank4-pca" if tiny else "rank32-pca"    # matched storage at d
        plan, out["rank32_fit_s"] = timed(lambda: fit_compressors(model, pca, pca, calib))
        out["fitted_basis_device"] = {str(i): str(plan[i][0].fitted.rotation.device)
                                      for i in (first, last)}
        with compressed_kv(model, calibration=plan):
            rank, out["rank32_pca_s"] = timed(lambda: model(ids).logits.float())
        ref = torch.log_softmax(plain[0, :-1], -1).gather(-1, ids[0, 1:, None].to(plain.device))
        for name, lg in (("int4_kivi", kivi), ("rank32_pca", rank)):
            lp = torch.log_softmax(lg[0, :-1], -1).gather(-1, ids[0, 1:, None].to(lg.device))
            out[f"{name}_mean_abs_dlogprob"] = float((lp - ref).abs().mean())
            out[f"{name}_finite"] = bool(torch.isfinite(lg).all())
        cap, out["capture_s"] = timed(lambda: capture(model, ids, layers=[first, last],
                                                      device="cpu"))
        kivi_k = make_compressor("int4-kivi", "k")
        for layer in (first, last):
            q, k = cap[layer]["q"].to(torch.float32), cap[layer]["k"].to(torch.float32)
            m = attention_metrics(q, k, kivi_k(k), causal=True)
            out[f"layer{layer}_int4_kivi_flip_rate"] = float(m.flip_rate.mean())
            out[f"layer{layer}_q_shape"] = list(q.shape)
    want = {str(first): seen[first], str(last): seen[last]}
    out["basis_on_attention_device"] = out["fitted_basis_device"] == want
    out["ok"] = (out["fp_identical"] and out["int4_kivi_finite"] and out["rank32_pca_finite"]
                 and out["basis_on_attention_device"])
    name = "gpu_device_map.json" if mode == "offload" else "gpu_device_map_split.json"
    path = os.path.join(os.environ.get("OUT", "."), name)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
