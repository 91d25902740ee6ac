"""The fused quantization kernel (``kvtheory/_triton_quant.py``) against the torch path, run by
``tests/test_quant_fused.py`` in a subprocess.

``interp``: Triton's interpreter (``TRITON_INTERPRET`` set before Triton decorates the kernel)
runs every case twice: with ``recip=False`` against :func:`kvtheory.quantize.quantize` on the
CPU (which divides the range by the number of levels exactly), and with ``recip=True`` against
the same formula with the reciprocal multiplied in (what torch's CUDA division by a Python
scalar does). Prints one JSON line: per case label, the elements that differ in value from
each reference, the largest difference in units of the group's step, and whether the kernel
served the call.

``compile``: compiles the kernel for Hopper (sm_90) in each configuration ``quantize_fused``
launches at d = 128 and prints its registers and spills (no GPU needed).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

# only as a script: the tests import CASES and BITS from here and must not inherit the switch
MODE = (sys.argv[1] if len(sys.argv) > 1 else "interp") if __name__ == "__main__" else None
if MODE == "interp":
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtheory import _triton_quant as tq  # noqa: E402
from kvtheory.quantize import _split, quant_steps, quantize, resolve_group  # noqa: E402

#: (shape, axis, group): KIVI keys (128-token groups of each channel, a last partial one),
#: other group sizes (not powers of two), per-token groups of all d or of 8 channels, a head
#: dimension that is not a power of two, bf16 input, a batch of three dimensions
CASES = [
    ((1, 2, 300, 128), "channel", 128, torch.float32),
    ((2, 1, 37, 16), "channel", 16, torch.float32),
    ((1, 3, 40, 24), "channel", 7, torch.float32),
    ((2, 2, 65, 64), "token", None, torch.float32),
    ((1, 2, 33, 32), "token", 8, torch.float32),
    ((1, 1, 50, 24), "token", None, torch.float32),
    ((1, 2, 130, 64), "channel", 128, torch.bfloat16),
    ((2, 1, 2, 9, 16), "token", 4, torch.float32),
]
BITS = (1, 2, 4, 8, 16)


def reciprocal_reference(x, bits, axis, group, symmetric):
    """:func:`quantize`'s torch arithmetic with the range multiplied by the float32
    reciprocal of the number of levels instead of divided by it."""
    work = x.float()
    g = resolve_group(axis, group, x.shape[-2], x.shape[-1])
    xg, dim = _split(work, axis, g)
    levels = 2 ** (bits - 1) - 1 if symmetric else 2 ** bits - 1
    inv = torch.tensor(np.float32(1.0) / np.float32(levels))
    if symmetric:
        step = xg.abs().amax(dim, keepdim=True) * inv
        safe = torch.where(step > 0, step, 1.0)
        y = torch.round(xg / safe).clamp_(-levels, levels) * step
    else:
        lo = xg.amin(dim, keepdim=True)
        step = (xg.amax(dim, keepdim=True) - lo) * inv
        safe = torch.where(step > 0, step, 1.0)
        y = torch.round((xg - lo) / safe).clamp_(0, levels) * step + lo
    if axis == "token":
        return y.reshape(x.shape).to(x.dtype)
    return y.reshape(*x.shape[:-2], -1, x.shape[-1])[..., : x.shape[-2], :].to(x.dtype)


def interp() -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    # small tiles, so that the cases span several channel blocks and row blocks
    tq.CONFIG.update(channel_block=16, token_rows=8)
    for shape, axis, group, dtype in CASES:
        x = torch.randn(*shape, generator=gen) * 3 + 0.5
        x[..., 1, :] = 1.25                       # a token of equal channels
        x[..., :, 0] = -2.0                       # a constant channel
        x = x.to(dtype)
        g = resolve_group(axis, group, shape[-2], shape[-1])
        for sym in (False, True):
            for bits in BITS:
                if sym and bits < 2:
                    continue
                label = f"{tuple(shape)} {axis} g{group} {'sym' if sym else 'asym'} int{bits} " \
                        f"{str(dtype).split('.')[-1]}"
                step = quant_steps(x, bits, axis=axis, group=group, symmetric=sym)
                row = {}
                for recip, ref in ((False, quantize(x, bits, axis=axis, group=group,
                                                     symmetric=sym)),
                                   (True, reciprocal_reference(x, bits, axis, group, sym))):
                    before = tq.CALLS[0]
                    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
                        warnings.simplefilter("ignore")
                        y = tq.quantize_fused(x, bits, axis, g, sym, recip=recip)
                    key = "recip" if recip else "exact"
                    if y is None:
                        row[key] = None
                        continue
                    diff = (y.float() - ref.float()).abs()
                    row[key] = {"differ": int((diff > 0).sum()),
                                "max_steps": float((diff / step.clamp_min(1e-30)).max()),
                                "served": tq.CALLS[0] == before + 1,
                                "same_shape_dtype": y.shape == x.shape and y.dtype == x.dtype}
                out[label] = row
    return out


def compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = tq.quant_kernel
    res = {}
    for label, (chan, sym, bt, bd) in {"kivi keys (channel, 128 tokens)": (True, False, 128, 128),
                                      "per-token values (token, all d)": (False, False, 64, 128),
                                      "symmetric per-token": (False, True, 64, 128)}.items():
        const = {"SYM": sym, "CHANNEL": chan, "RECIP": True, "BT": bt, "BD": bd}
        sig, consts = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in const:
                sig[a], consts[(i,)] = "constexpr", const[a]
            else:
                sig[a] = {"x_ptr": "*fp32", "y_ptr": "*fp32", "inv": "fp32",
                          "levels": "fp32"}.get(a, "i32")
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 8, "enable_fp_fusion": False})
        res[label] = {"shared": ck.metadata.shared, "fp_fusion": ck.metadata.enable_fp_fusion,
                      "ptx_fma": ck.asm["ptx"].count("fma.rn.f32"),
                      "ptx_div_rn": ck.asm["ptx"].count("div.rn.f32")}
    return res


if __name__ == "__main__":
    print(json.dumps(interp() if MODE == "interp" else compile_all()))
