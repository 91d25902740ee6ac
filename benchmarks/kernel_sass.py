"""Instructions of the fused metrics kernel's key loop, counted in its SASS for Hopper (sm_90),
compiled on any machine with Triton (no GPU needed: Triton ships ptxas and nvdisasm).

For each variant of the kernel's switches (:mod:`kvtheory._triton_kernel`) at a Mistral-7B
layer's shape (d = 128, bf16, non-causal, topk 5, 64×64 blocks, 4 warps, 3 stages, the
arguments divisible by 16 as at T = 16,384), prints the registers, the stack, and the
instructions a thread issues for one key block along the loop's straight path (no masking,
the first series branch, every mbarrier wait passing at once), by opcode, and per (query, key)
pair of the thread's share (32 of a 64×64 block's 4,096 with 4 warps).

    PYTHONPATH=. python3 benchmarks/kernel_sass.py                      # the default kernel
    PYTHONPATH=. python3 benchmarks/kernel_sass.py '{"TOPK_MODE": 2}' '{"TMA": false}'
    PYTHONPATH=. python3 benchmarks/kernel_sass.py '{"KERNEL": "rescan"}' '{"KERNEL": "pick"}'

``KERNEL`` names another kernel of the second pass (:mod:`kvtheory._triton_rescan`): ``rescan``
(its loop is over a bucket's queries, one key block each) or ``pick`` (no loop: its whole
body is counted).

Counts are a guide, not a time: ``benchmarks/gpu_kernel_lab.py`` times the variants on the
GPU (KERNEL_NOTES.md compares both).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_sass(tune: dict) -> tuple[str, str]:
    """The kernel's SASS and its resource line (``cuobjdump``) for ``tune``'s switches."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kvtheory import _triton_kernel, _triton_rescan

    tune = dict(tune)
    which = tune.pop("KERNEL", "metrics")
    fn = {"metrics": _triton_kernel.metrics_kernel, "rescan": _triton_rescan.rescan_kernel,
          "pick": _triton_rescan.pick_kernel}[which]
    opts = {"num_warps": tune.pop("num_warps", 4), "num_stages": tune.pop("num_stages", 3)}
    if "maxnreg" in tune:
        opts["maxnreg"] = tune.pop("maxnreg")
    const = dict(D=128, DV=16, BD=128, BDV=16, BLOCK_M=64, BLOCK_N=64, KP=8, TOPK=5,
                 CAUSAL=False, HAS_WINDOW=False, HAS_KM=False, HAS_V=False, FULL=True,
                 WITH_ZH=False, FIX=False, SUMS=True, TOPK_MODE=3, PHI_MODE=3, TMA=True,
                 PAYLOAD=False, CAND=0, CAND_SKIP=False, RESCAN=False)
    if which != "metrics":
        const = {"D": 128, "BD": 128, "BLOCK_M": 64, "BLOCK_N": 64, "CAND": 16, "TOPK": 5,
                 "CAUSAL": False, "HAS_WINDOW": False, "HAS_KM": False, "TMA": True}
        const = {n: v for n, v in const.items() if n in fn.arg_names}
    const.update(tune)
    # a constexpr left out would be compiled as a run-time int: both branches, a wrong count
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in const
               and p.name not in ("KD", "KHD")]
    if missing:
        raise SystemExit(f"kernel_sass.py: give a value for the constexpr switches {missing}")
    types = {"Q": "*bf16", "K": "*bf16", "KH": "*bf16", "V": "*bf16", "VH": "*bf16",
             "KM": "*i8", "OUT": "*fp32", "COUNT": "*i32", "ROWS": "*i32", "CI": "*i32",
             "CS": "*fp32", "CH": "*fp32", "COUNT2": "*i32", "ROWS2": "*i32", "BC": "*i32",
             "BK": "*i32", "CC": "*i32", "scale": "fp32"}
    sig, consts = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in const:
            sig[a], consts[(i,)] = "constexpr", const[a]
        elif a in ("KD", "KHD"):
            if const["TMA"]:
                sig[a] = f"tensordesc<bf16[{const['BLOCK_N']}, {const['BD']}]>"
            else:
                sig[a], consts[(i,)] = "constexpr", None
        else:
            sig[a] = types.get(a, "i32")
    div16 = ["Q", "K", "KH", "V", "VH", "KM", "OUT", "COUNT", "ROWS", "CI", "CS", "CH",
             "COUNT2", "ROWS2", "BC", "BK", "CC", "NQ", "T",
             "OFF", "HQ", "WINDOW", "N_OUT"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16
             if a in fn.arg_names}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=opts)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(ck.asm["cubin"])
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
        res = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin],
                             capture_output=True, text=True, check=True).stdout
    return sass, res.strip().splitlines()[-1].strip()


def loop_counts(sass: str) -> collections.Counter:
    """Opcodes issued by one thread in one trip of the longest loop, on the straight path."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ins.append((m.group(1) or "", m.group(2), m.group(3)))

    def target(rest: str) -> int:
        return labels[re.search(r"\((\.L_x_\d+)\)", rest).group(1)]

    lo = hi = best = 0
    for i, (pred, op, rest) in enumerate(ins):
        if op == "BRA" and pred and target(rest) < i and i - target(rest) > best:
            lo, hi, best = target(rest), i, i - target(rest)
    if not best:        # no loop: every instruction once
        return collections.Counter(op.split(".")[0] for _, op, _ in ins)
    counts: collections.Counter = collections.Counter()
    i, mask_skipped = lo, False
    while i <= hi:
        pred, op, rest = ins[i]
        counts[op.split(".")[0]] += 1
        if op == "BRA" and i != hi:
            before = " ".join(x[1] for x in ins[max(lo, i - 40):i])
            if "SYNCS" in " ".join(x[1] for x in ins[max(lo, i - 3):i]):
                i += 1          # an mbarrier wait's retry: not taken
                continue
            if not pred:
                i = target(rest)
                continue
            if not mask_skipped and "HGMMA" in before:
                mask_skipped = True     # the masking of a block that needs none
                i = target(rest)
                continue
        i += 1
    return counts


def main() -> int:
    variants = [json.loads(a) for a in sys.argv[1:]] or [{}]
    for tune in variants:
        sass, res = compile_sass(tune)
        c = loop_counts(sass)
        n = sum(c.values())
        pairs = (tune.get("BLOCK_M", 64) * tune.get("BLOCK_N", 64)
                 / (32 * tune.get("num_warps", 4)))      # a thread's share of a block
        print(f"{json.dumps(tune)}: {n} instructions a thread a key block "
              f"({n / pairs:.1f} a (query, key) pair); {res}")
        print("   ", ", ".join(f"{k} {v}" for k, v in c.most_common(16)))
        print(f"    wgmma instructions in the kernel: {sass.count('HGMMA')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
