"""Debug (session 7): per-query KL and Fisher of the fused kernel with PAYLOAD on and off on
the local-keys case of gpu_flips_check.py, against the dense float64 reference; for the rows
where they differ, whether the block holding the top of s has a tie or a near-tie there."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from _dense_flips import dense_metrics  # noqa: E402
from kvtheory import _triton_metrics as tm  # noqa: E402
from kvtheory.quantize import quantize  # noqa: E402


def inputs(local, T=2048, B=2, hq=8, hkv=2, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, T, d, generator=g)
    k = torch.randn(B, hkv, T, d, generator=g)
    if local:
        k = torch.cumsum(k, 2) / torch.arange(1, T + 1).view(1, 1, T, 1).sqrt()
        q = q + 2 * k.repeat_interleave(hq // hkv, 1)
    kh = quantize(k, 4)
    return [x.to(torch.bfloat16).cuda() for x in (q, k, kh)]


out = {}
for local in (True, False):
    for causal in (True, False):
        q, k, kh = inputs(local)
        d = q.shape[-1]
        ref = dense_metrics(q.double(), k.double(), kh.double(), causal=causal, topk=5)
        res = {}
        for pay in (True, False):
            tm.TUNE.clear()
            tm.TUNE["PAYLOAD"] = pay
            r = tm.fused_metrics(q, k, kh, None, None, None, causal=causal, window=None,
                                 scale=d ** -0.5, topk=5, full=True)
            res[pay] = {n: r[n].double().cpu() for n in ("kl", "fisher", "margin")}
        tm.TUNE.clear()
        kl_ref = ref["kl"].cpu()
        fi_ref = ref["fisher"].cpu()
        row = {}
        for pay in (True, False):
            e = (res[pay]["kl"] - kl_ref).abs() / kl_ref.abs().clamp_min(1e-6)
            f = (res[pay]["fisher"] - fi_ref).abs() / fi_ref.abs().clamp_min(1e-6)
            row[f"payload={pay}"] = {"kl_max_rel": float(e.max()), "fisher_max_rel": float(f.max()),
                                    "kl_rows_rel_gt_1e-3": int((e > 1e-3).sum())}
        diff = (res[True]["kl"] - res[False]["kl"]).abs() / res[False]["kl"].abs().clamp_min(1e-6)
        row["rows_differ_1e-5"] = int((diff > 1e-5).sum())
        row["rows"] = int(diff.numel())
        # where PAYLOAD's KL is worst: the margin (top-1 gap) there
        i = int(torch.argmax((res[True]["kl"] - kl_ref).abs().flatten()))
        row["worst"] = {"index": i, "kl_pay": float(res[True]["kl"].flatten()[i]),
                        "kl_nopay": float(res[False]["kl"].flatten()[i]),
                        "kl_ref": float(kl_ref.flatten()[i]),
                        "margin_ref": float(ref["margin"].cpu().flatten()[i])}
        out[f"local={local} causal={causal}"] = row
        print(json.dumps({f"local={local} causal={causal}": row}), flush=True)
