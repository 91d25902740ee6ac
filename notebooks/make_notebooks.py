"""Build the kvtheory notebooks from their cell sources, and execute them to store outputs.

The notebooks are generated, never edited by hand: change a cell here and run

    .venv/bin/python notebooks/make_notebooks.py            # build + execute all, normal size
    .venv/bin/python notebooks/make_notebooks.py 01_theory  # just one
    .venv/bin/python notebooks/make_notebooks.py --small    # execute at the test size
    .venv/bin/python notebooks/make_notebooks.py --no-execute

Execution uses nbclient with the ``python3`` kernel, cwd = ``notebooks/``, and sets
``KVTHEORY_DATA`` (default ``../shared/data``), ``KVTHEORY_RESULTS`` and ``MPLBACKEND=Agg``;
``--small`` sets ``KVTHEORY_SMALL=1`` as the test suite (tests/test_notebooks.py) does.
``KVTHEORY_RESULTS`` is ``--results`` if given, else a temporary folder, except for
``03_figures`` at the normal size, which reads (never writes) the repository's ``results/``
written by ``make report``: run ``make report`` first, then

    .venv/bin/python notebooks/make_notebooks.py 03_figures

Volatile metadata (execution times) is stripped so that a rebuild only changes what the cells
print.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip("\n"))


# ============================================================================ 01 theory
THEORY = [
    md(r"""
    # 1 · The theory: why quantization dominates rank reduction

    At a fixed storage budget a KV cache can keep **r of d directions** per head in fp16
    (rank reduction) or **all d directions at b bits** (quantization); they match when
    $r = d\,b/16$. Attention reads keys through a softmax, so the damage of a logit
    perturbation $\delta$ is measured by the softmax Fisher metric
    $F(p) = \mathrm{diag}(p) - pp^\top$:

    $$\mathrm{KL}\big(\mathrm{softmax}(s)\,\|\,\mathrm{softmax}(s+\delta)\big)
      = \tfrac12\,\delta^\top F\,\delta + O(\|\delta\|^3).$$

    Removing a key direction $u$ shifts every logit coherently ($\delta_j = -\alpha c_j$,
    $\alpha = q\cdot u/\sqrt d$, $c_j = k_j\cdot u$); quantizing the coordinate $c$ with $2^b$
    cells adds small independent errors of variance $\Delta^2/12$. Per direction the ratio of
    the two damages is $3\cdot 2^{2b}$ (768 at INT4).

    This notebook walks through the derivations (`kvtheory.symbolic`), checks each one
    symbolically and numerically, and then exercises the numeric library
    (`kvtheory.fisher`, `kvtheory.bounds`, `kvtheory.ledger`) on synthetic data.
    Every number below is computed by a library function; the notebook only arranges them.
    """),
    code(r"""
    import io
    import math
    import time

    import matplotlib.pyplot as plt
    import pandas as pd
    import sympy as sp
    import torch
    from IPython.display import Image, Markdown, Math, display

    from kvtheory import bounds, fisher, ledger, symbolic
    from kvtheory.analysis.common import small
    from kvtheory.plotstyle import COLORS, new_figure, style

    torch.set_default_dtype(torch.float64)   # theory checks in float64
    SMALL = small()                          # KVTHEORY_SMALL=1: the test-suite size
    MC_SAMPLES = 4_000 if SMALL else 40_000
    T0 = time.perf_counter()


    def show(fig):
        # render into the notebook output as PNG (works under any backend), then close
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150)
        plt.close(fig)
        display(Image(buf.getvalue()))


    print("small size" if SMALL else "normal size", "| Monte-Carlo samples:", MC_SAMPLES)
    """),
    md(r"""
    ## 1. The four derivations, proved with sympy

    `symbolic.derivations()` returns four `Derivation` objects: (a) the Hessian of the KL is
    the Fisher metric, (b) uniform rounding errors have variance $\Delta^2/12$ and an expected
    Fisher damage $\tfrac12\alpha^2\frac{\Delta^2}{12}(1-\|p\|^2)$, (c) the damage ratio
    $3\cdot 2^{2b}$ and its exact finite-$b$ form, (d) matched storage. For each one we show
    the statement, the derivation steps as sympy computed them, `verify()` (every derived
    expression minus its claimed closed form simplifies to exactly zero) and `numeric_check()`
    (largest |sympy − torch| over random points).
    """),
    code(r"""
    def show_derivation(der):
        display(Markdown(f"### `{der.name}`\n\n{der.statement}"))
        for rel in (der.expr if isinstance(der.expr, tuple) else (der.expr,)):
            display(Math(sp.latex(rel)))
        for i, (text, expr) in enumerate(der.steps, 1):
            if isinstance(expr, sp.MatrixBase):
                n = expr.shape[0]
                if n > 2:   # the 3x3 and 4x4 Hessians are long; verify() proves them equal to F
                    display(Markdown(f"{i}. {text}: a {n}×{n} matrix (proved equal to F below)"))
                    continue
                expr = sp.simplify(expr)
            display(Markdown(f"{i}. {text}"), Math(sp.latex(expr)))

    DERIVATIONS = symbolic.derivations()
    show_derivation(DERIVATIONS[0])
    """),
    code(r"""
    for der in DERIVATIONS[1:]:
        show_derivation(der)
    """),
    code(r"""
    rows = [symbolic.verification_row(der, n_points=5 if SMALL else 20) for der in DERIVATIONS]
    checks = pd.DataFrame(rows)[["name", "symbolic", "numeric_max_abs_err"]]
    display(checks)
    assert checks["symbolic"].all() and (checks["numeric_max_abs_err"] < 1e-9).all()
    """),
    md(r"""
    ## 2. The softmax Fisher metric

    `fisher.softmax_fisher(p)` forms $F = \mathrm{diag}(p) - pp^\top$: symmetric, positive
    semi-definite, with $F\mathbf 1 = 0$ (adding a constant to every logit changes nothing).
    `fisher.fisher_damage(p, δ)` is $\tfrac12\delta^\top F\delta$ without forming $F$, and
    `fisher.softmax_kl(s, δ)` the exact KL. Scaling a random perturbation by $t\to 0$, the
    relative gap between the two shrinks linearly in $t$ (the cubic remainder).
    """),
    code(r"""
    g = torch.Generator().manual_seed(0)
    s = 2.0 * torch.randn(16, generator=g)           # 16 logits
    p = torch.softmax(s, -1)
    F = fisher.softmax_fisher(p)
    eig = torch.linalg.eigvalsh(F)
    print(f"|F - F^T| = {float((F - F.T).abs().max()):.1e},  |F 1| = {float((F @ torch.ones(16)).abs().max()):.1e}")
    print(f"eigenvalues of F: min {float(eig.min()):.2e} (one zero, along 1), max {float(eig.max()):.3f}")

    delta = torch.randn(16, generator=g)
    ts = torch.logspace(0, -4, 9)
    rows = []
    for t in ts.tolist():
        D = float(fisher.fisher_damage(p, t * delta))
        KL = float(fisher.softmax_kl(s, t * delta))
        quad = 0.5 * float((t * delta) @ F @ (t * delta))   # the matrix form, for comparison
        rows.append({"t": t, "fisher_damage": D, "1/2 δᵀFδ (matrix)": quad, "exact KL": KL,
                     "|KL - D| / KL": abs(KL - D) / KL})
    fk = pd.DataFrame(rows)
    display(fk.style.format({c: "{:.3e}" for c in fk.columns}))
    """),
    code(r"""
    with style():
        fig, ax = new_figure(aspect=0.7)
        ax.loglog(fk["t"], fk["|KL - D| / KL"], "o-", color=COLORS["quant"], label="measured")
        ax.loglog(fk["t"], fk["|KL - D| / KL"].iloc[-1] * fk["t"] / fk["t"].iloc[-1], "--",
                  color=COLORS["theory"], label="slope 1 (cubic remainder)")
        ax.set_xlabel("perturbation scale t")
        ax.set_ylabel("|KL − ½δᵀFδ| / KL")
        ax.set_title("Fisher damage → exact KL as δ → 0")
        ax.legend()
        show(fig)
    slope = math.log(fk["|KL - D| / KL"].iloc[-1] / fk["|KL - D| / KL"].iloc[-3]) / math.log(
        fk["t"].iloc[-1] / fk["t"].iloc[-3])
    print(f"fitted log-log slope at small t: {slope:.3f}")
    """),
    md(r"""
    ## 3. The headline ratio $3\cdot 4^b$ against the exact finite-$b$ ratio

    `bounds.headline_ratio(b)` is $3\cdot 4^b$: removing a coordinate of size $a$ costs $a^2$,
    quantizing it with $2^b$ cells (step $2a/2^b$) costs $a^2/(3\cdot 4^b)$.
    `bounds.exact_ratio(q, k, u, b)` is the data-dependent version with the real grid
    (step $(c_{\max}-c_{\min})/(2^b-1)$) and the real attention $p$:

    $$\frac{D_\text{proj}}{\mathbb E[D_\text{quant}]} =
      \frac{12\,(2^b-1)^2\,\mathrm{Var}_p(c)}{(c_{\max}-c_{\min})^2\,(1-\|p\|^2)} .$$

    On the symmetric case ($c_j=\pm a$, uniform attention over $n$ tokens) it equals
    $3(2^b-1)^2\,n/(n-1)$ (derivation (c)); on Gaussian keys the range is wider than the
    spread, so the ratio is smaller than the headline but still grows as $4^b$.
    """),
    code(r"""
    d, n = 64, 256
    g = torch.Generator().manual_seed(1)
    u = torch.zeros(d); u[0] = 1.0

    # (i) the balanced case: c = ±a, and q ⟂ u's complement arranged so that p is uniform
    q_bal = torch.zeros(1, d); q_bal[0, 1] = 1.0          # alpha = 0 but the ratio is defined
    k_bal = torch.zeros(n, d); k_bal[:, 0] = torch.tensor([1.0, -1.0]).repeat(n // 2)
    # (ii) Gaussian keys and queries
    q_g, k_g = torch.randn(32, d, generator=g), torch.randn(n, d, generator=g)

    rows = []
    for b in (1, 2, 3, 4, 6, 8):
        r_bal = float(bounds.exact_ratio(q_bal, k_bal, u, b)[0])
        r_g = bounds.exact_ratio(q_g, k_g, u, b)
        rows.append({"b": b, "3·4^b": bounds.headline_ratio(b),
                     "exact, ±a uniform": r_bal, "3(2^b−1)² n/(n−1)": 3 * (2**b - 1) ** 2 * n / (n - 1),
                     "exact, Gaussian (median)": float(r_g.median()),
                     "Gaussian / 3·4^b": float(r_g.median()) / bounds.headline_ratio(b)})
    ratios = pd.DataFrame(rows).set_index("b")
    display(ratios.style.format("{:.4g}"))
    assert abs(ratios.loc[4, "exact, ±a uniform"] / ratios.loc[4, "3(2^b−1)² n/(n−1)"] - 1) < 1e-9
    print("headline ratio at INT4:", bounds.headline_ratio(4))
    """),
    code(r"""
    with style():
        fig, ax = new_figure(aspect=0.7)
        bs = ratios.index.to_numpy()
        ax.semilogy(bs, ratios["3·4^b"], "-", color=COLORS["theory"], label="$3\\cdot4^b$ (headline)")
        ax.semilogy(bs, ratios["exact, ±a uniform"], "o", color=COLORS["quant"], label="exact, c = ±a")
        ax.semilogy(bs, ratios["exact, Gaussian (median)"], "s", color=COLORS["rank"],
                    label="exact, Gaussian keys (median)")
        ax.set_xlabel("bits b")
        ax.set_ylabel("projection / quantization damage")
        ax.set_title("Damage ratio per direction")
        ax.legend()
        show(fig)
    """),
    md(r"""
    ## 4. Monte-Carlo against analytic quantization damage

    `bounds.expected_quant_damage` is the closed form $\tfrac12\alpha^2\frac{\Delta^2}{12}(1-\|p\|^2)$;
    `bounds.mc_quant_damage` averages the Fisher damage (or, with `metric="kl"`, the exact KL)
    over independent uniform errors; `bounds.rounded_quant_damage` is the damage of the one
    deterministic rounding of $c$ to the grid. `bounds.projection_damage` / `projection_kl`
    are the Fisher and exact costs of removing $u$ altogether.
    """),
    code(r"""
    g = torch.Generator().manual_seed(2)
    d, n = 64, 128
    q = torch.randn(8, d, generator=g)
    k = torch.randn(n, d, generator=g)
    u = torch.randn(d, generator=g)
    q = q + 3.0 * u / u.norm()          # queries that read u, so that alpha is not tiny

    proj = bounds.projection_damage(q, k, u)
    rows = []
    for b in (2, 3, 4, 8):
        gen = torch.Generator().manual_seed(10 + b)
        analytic = bounds.expected_quant_damage(q, k, u, b)
        mc = bounds.mc_quant_damage(q, k, u, b, samples=MC_SAMPLES, generator=gen)
        mc_kl = bounds.mc_quant_damage(q, k, u, b, samples=MC_SAMPLES // 4, generator=gen, metric="kl")
        rounded = bounds.rounded_quant_damage(q, k, u, b)
        rows.append({"b": b, "E[D_quant] analytic": float(analytic.mean()),
                     "MC Fisher": float(mc.mean()), "MC / analytic": float((mc / analytic).mean()),
                     "MC exact KL": float(mc_kl.mean()), "one rounding": float(rounded.mean()),
                     "D_proj / E[D_quant]": float((proj / analytic).median()),
                     "3·4^b": bounds.headline_ratio(b)})
    mc_table = pd.DataFrame(rows).set_index("b")
    display(mc_table.style.format("{:.4g}"))
    print(f"removing u: Fisher {float(proj.mean()):.4g}, exact KL {float(bounds.projection_kl(q, k, u).mean()):.4g}")
    """),
    md(r"""
    ## 5. The margin certificate

    Rounding each key coordinate to a grid of step $\Delta_i$ moves every logit by at most
    $B = \frac{1}{2\sqrt d}\sum_i |q_i|\Delta_i$ (`bounds.logit_bound`). If the top-1 margin
    $m = s_{(1)} - s_{(2)}$ exceeds $2B$ the attended token cannot change
    (`bounds.margin_certificate`). We quantize Gaussian keys per token
    (`quantize.quantize_with_steps`), certify, and check with `flips.attention_metrics`
    that no certified query flips. No such certificate exists for rank reduction: removing a
    direction moves logits by $|\alpha c_j|$, unbounded by any grid.
    """),
    code(r"""
    from kvtheory.flips import attention_metrics
    from kvtheory.quantize import quantize_with_steps

    g = torch.Generator().manual_seed(3)
    d, n = 64, 256
    q = 2.0 * torch.randn(1, 1, n, d, generator=g)
    k = torch.randn(1, 1, n, d, generator=g)
    rows = []
    for b in (2, 3, 4, 8):
        k_hat, steps = quantize_with_steps(k, b)                 # per token, all d channels
        cert = bounds.margin_certificate(q[0, 0], k[0, 0], steps[0, 0], per_token=True)
        m = attention_metrics(q, k, k_hat, causal=False, return_per_query=True)
        flips = m.per_query.flip[0, 0]
        rows.append({"b": b, "certified": cert.fraction, "flip rate": float(flips.double().mean()),
                     "certified but flipped": int((cert.certified & flips).sum()),
                     "median bound B": float(cert.bound.median()),
                     "median margin": float(cert.margin.median())})
    certs = pd.DataFrame(rows).set_index("b")
    display(certs.style.format({"certified": "{:.1%}", "flip rate": "{:.1%}",
                                "median bound B": "{:.3f}", "median margin": "{:.3f}"}))
    assert (certs["certified but flipped"] == 0).all()
    """),
    md(r"""
    ## 6. The storage ledger

    Matched storage has to count everything that is stored: per-group fp16 **scales and
    zero-points** for quantization ($b + 32/g$ bits per element for an asymmetric grid, KIVI keys
    $b + 32/128$) and the **d×r basis** of a fitted rank reduction, amortised over the $T$
    tokens it serves ($16\,r/T$ per element). `ledger.breakdown` / `ledger_table` split the
    total into payload, scales and basis; `ledger.matched` finds, for a budget, the largest
    setting of each family that fits.
    """),
    code(r"""
    from dataclasses import asdict

    d, T = 64, 256
    specs = ["fp", "int8", "int4", "int4-g32", "int4-kivi", "int2-kivi", "int4-sym",
             "rank16-pca", "rank16-hadamard", "rank16-identity", "rank32x8-pca", "rank48x4-pca"]
    table = pd.DataFrame([asdict(r) | {"total": r.total, "compression ×": r.compression}
                          for r in ledger.ledger_table(specs, d, T)]).set_index("spec")
    display(Markdown(f"Bits per key element at d = {d}, basis amortised over T = {T} tokens:"))
    display(table.style.format("{:.4g}"))
    """),
    code(r"""
    budget = ledger.bits_per_element("int4-kivi", d, T)
    display(Markdown(f"Settings matching the INT4-KIVI key budget, **{budget:.4g} bits/element** "
                     f"(d = {d}, T = {T}):"))
    display(pd.DataFrame([asdict(s) for s in ledger.matched(budget, d, T)]))
    naive = f"rank{d * 4 // 16}-pca"
    print(f"the naive match r = d·b/16 gives {naive}, which really costs "
          f"{ledger.bits_per_element(naive, d, T):.4g} bits/element once its basis is counted; the ledger "
          f"picks {[s.spec for s in ledger.matched(budget, d, T) if s.family == 'rank'][0]}")
    """),
    code(r"""
    Ts = [64, 128, 256, 512, 1024, 4096, 16384]
    with style():
        fig, ax = new_figure(aspect=0.7)
        for spec, fam in (("rank16-pca", "rank"), ("rank16-hadamard", "other"), ("int4", "quant"),
                          ("int4-kivi", "kivi")):
            ax.semilogx(Ts, [ledger.bits_per_element(spec, d, t) for t in Ts], "o-",
                        color=COLORS[fam], label=spec)
        ax.axhline(4, color=COLORS["theory"], ls=":", label="4 bits (no overhead)")
        ax.set_xlabel("tokens T the basis/scales are amortised over")
        ax.set_ylabel("bits per element")
        ax.set_title(f"Scale overhead and basis amortisation (d = {d})")
        ax.legend(loc="upper right")
        show(fig)
    """),
    md(r"""
    ## Summary

    The last cell gathers the numbers this notebook computed and asserts the facts they
    establish, so that a silent change in the library fails the test suite.
    """),
    code(r"""
    summary = {
        "derivations verified": int(checks["symbolic"].sum()),
        "max |sympy - torch|": f"{checks['numeric_max_abs_err'].max():.1e}",
        "KL vs Fisher slope": round(slope, 4),
        "headline ratio INT4": bounds.headline_ratio(4),
        "exact ratio INT4 (±a, n=256)": round(float(ratios.loc[4, "exact, ±a uniform"]), 3),
        "MC / analytic (INT4)": round(float(mc_table.loc[4, "MC / analytic"]), 4),
        "certified fraction INT8": f"{certs.loc[8, 'certified']:.1%}",
        "rank matching INT4-KIVI": [s.spec for s in ledger.matched(budget, d, T) if s.family == "rank"][0],
        "runtime (s)": round(time.perf_counter() - T0, 1),
        "kernel CPU time (s)": round(time.process_time(), 1),
    }
    display(pd.Series(summary, dtype=object).to_frame("value"))
    assert summary["derivations verified"] == 4
    assert bounds.headline_ratio(4) == 768
    assert 0.9 < slope < 1.1
    assert checks["numeric_max_abs_err"].max() < 1e-9
    assert abs(mc_table.loc[4, "MC / analytic"] - 1) < (0.1 if SMALL else 0.03)
    assert abs(ratios.loc[4, "exact, ±a uniform"] - 3 * 15**2 * 256 / 255) < 1e-6
    assert certs.loc[8, "certified"] > 0.3 and (certs["certified but flipped"] == 0).all()
    """),
]

# ============================================================================ 02 captured activations
CAPTURED = [
    md(r"""
    # 2 · Captured activations: the theory on a real model

    We capture the post-RoPE queries, keys and values of **SmolLM2-135M** (30 layers, 9 query
    heads sharing 3 KV heads, head dimension d = 64) on WikiText-2 and look at what the two
    compressions do to them at matched storage:

    1. shapes and metadata of a capture (`kvtheory.analysis.common.load_or_capture`, cached
       on disk under `KVTHEORY_RESULTS`);
    2. the key spectrum per layer and KV head (`bases.PCABasis`), fitted on a *disjoint*
       calibration window;
    3. INT4-KIVI keys against the PCA rank at the same storage (`ledger.matched`), compared with
       `flips.attention_metrics`: top-1 flip rate (also stratified by the top-1 margin), KL,
       Fisher damage, top-5 overlap, output error;
    4. projection against quantization damage on the top PCA direction (`kvtheory.bounds`);
    5. a save/load round trip of a capture (`capture.save_capture` / `load_capture`).

    Normal size: 1024 tokens, layers 0, 4, 8, …, 24, 29, the last 512 positions as queries.
    With `KVTHEORY_SMALL=1` (the test suite): 256 tokens, layers 0, 15 and 29, every position.
    """),
    code(r"""
    import io
    import os
    import tempfile
    import time
    import warnings
    from pathlib import Path

    warnings.filterwarnings("ignore", message="IProgress not found")   # no widgets: plain progress

    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import torch
    import transformers
    from IPython.display import Image, Markdown, display

    from kvtheory import bounds, fisher, ledger
    from kvtheory.analysis.common import get_model, load_or_capture, small
    from kvtheory.bases import PCABasis
    from kvtheory.capture import capture_size, load_capture, save_capture
    from kvtheory.compress import make_compressor
    from kvtheory.flips import attention_metrics
    from kvtheory.plotstyle import COLORS, FULL_WIDTH, family, new_figure, style

    transformers.utils.logging.disable_progress_bar()
    SMALL = small()
    MODEL = "smollm2-135m"
    N_TOKENS = 256 if SMALL else 1024
    LAYERS = (0, 15, 29) if SMALL else (0, 4, 8, 12, 16, 20, 24, 29)
    N_QUERIES = N_TOKENS if SMALL else 512      # the last N_QUERIES positions are the queries
    N_BOUND_QUERIES = N_TOKENS if SMALL else 256  # the same for the per-direction damages (§4)
    DATA = os.environ.get("KVTHEORY_DATA")       # None: the library's default data folder
    RESULTS = Path(os.environ.get("KVTHEORY_RESULTS") or tempfile.mkdtemp(prefix="kvtheory-nb02-"))
    T0 = time.perf_counter()


    def show(fig):
        # render into the notebook output as PNG (works under any backend), then close
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150)
        plt.close(fig)
        display(Image(buf.getvalue()))


    print(f"{'small' if SMALL else 'normal'} size: {N_TOKENS} tokens, layers {LAYERS}, last {N_QUERIES} "
          f"positions as queries (§4: last {N_BOUND_QUERIES}); results under {RESULTS}")
    """),
    md(r"""
    ## 1. Capture

    Two windows of WikiText-2 (test split): the analysed window (tokens $[0, T)$) and a
    calibration window right after it ($[T, 2T)$) on which bases are fitted, so that rank
    reduction is never evaluated on the data its basis was fitted to.
    """),
    code(r"""
    cap = load_or_capture(MODEL, N_TOKENS, layers=LAYERS, data_dir=DATA, root=RESULTS)
    calib = load_or_capture(MODEL, N_TOKENS, offset=N_TOKENS, layers=LAYERS, data_dir=DATA, root=RESULTS)
    meta = cap.meta
    D, G = meta.d, meta.group
    display(pd.Series({"model": meta.model, "layers": meta.layers, "query heads": meta.q_heads,
                       "KV heads": meta.kv_heads, "GQA group": meta.group, "head dim d": meta.d,
                       "tokens": len(meta.positions), "RoPE side": meta.rope, "dtype": meta.dtype,
                       "MB held": round(capture_size(cap) / 2**20, 1)}, dtype=object).to_frame("capture"))
    display(pd.DataFrame({layer: {w: tuple(t.shape) for w, t in cap[layer].items()} for layer in LAYERS}).T
            .rename_axis("layer"))
    tok = get_model(MODEL).tokenizer
    print("first tokens:", repr(tok.decode(list(meta.token_ids[0][:60]))))
    """),
    md(r"""
    ## 2. Key spectrum

    PCA of the (uncentred) keys per KV head: the eigenvalues of $E[kk^\top]$, normalised to sum
    to one. A rank-r reduction keeps the first r of them; the rest is what it throws away. Keys
    are strongly low-rank (a few directions hold most of the energy) — the intuition behind
    rank reduction — but what matters for attention is not energy but routing.
    """),
    code(r"""
    fits = {layer: PCABasis().fit(calib[layer]["k"]) for layer in LAYERS}
    spec = {layer: (f.spectrum / f.spectrum.sum(-1, keepdim=True)).numpy() for layer, f in fits.items()}
    energy = pd.DataFrame([{"layer": layer, "kv head": h, **{f"energy in top {r}": float(spec[layer][h, :r].sum())
                                                          for r in (1, 4, 16, 32)}}
                           for layer in LAYERS for h in range(meta.kv_heads)]).set_index(["layer", "kv head"])
    display(energy.style.format("{:.1%}"))
    with style():
        fig, axes = new_figure(FULL_WIDTH, 0.3, 1, 2)
        cmap = plt.get_cmap("viridis")
        for i, layer in enumerate(LAYERS):
            col = cmap(i / max(1, len(LAYERS) - 1))
            for h in range(meta.kv_heads):
                lab = f"layer {layer}" if h == 0 else None
                axes[0].semilogy(np.arange(1, D + 1), spec[layer][h], color=col, alpha=0.8, label=lab)
                axes[1].plot(np.arange(1, D + 1), np.cumsum(spec[layer][h]), color=col, alpha=0.8)
        axes[0].set_xlabel("PCA direction (by eigenvalue)")
        axes[0].set_ylabel("share of key energy")
        axes[0].legend(ncol=2)
        axes[1].set_xlabel("rank r")
        axes[1].set_ylabel("cumulative energy kept")
        axes[1].axvline(D // 4, color=COLORS["rank"], ls=":", label=f"r = d/4 = {D // 4}")
        axes[1].legend()
        fig.suptitle(f"{MODEL}: post-RoPE key spectrum per KV head (calibration window)")
        show(fig)
    """),
    md(r"""
    ## 3. INT4-KIVI against the rank at the same storage

    KIVI quantizes keys per channel in groups of 128 tokens (fp16 scale and zero-point per
    group). `ledger.matched` finds the largest PCA rank whose coefficients *and* stored basis fit
    in the same number of bits per element. Both compressors are fitted on the calibration
    window (`make_compressor(...).fit`) and applied to the analysed keys; INT8 and per-token
    INT4 are shown for reference.
    """),
    code(r"""
    BUDGET = ledger.bits_per_element("int4-kivi", D, N_TOKENS)
    RANK = [s.spec for s in ledger.matched(BUDGET, D, N_TOKENS) if s.family == "rank"][0]
    METHODS = ["int8", "int4", "int4-kivi", RANK]
    display(Markdown(f"INT4-KIVI keys cost **{BUDGET:.4g} bits/element** at d = {D}, T = {N_TOKENS}; "
                     f"the matched rank is **{RANK}**."))
    display(pd.DataFrame([{"spec": r.spec, "payload": r.payload, "scales": r.scales, "basis": r.basis,
                           "total": r.total} for r in ledger.ledger_table(METHODS, D, N_TOKENS)]).set_index("spec"))

    metrics = {}          # (method, layer) -> AttentionMetrics
    t = time.perf_counter()
    for layer in LAYERS:
        q, k, v = (cap[layer][w] for w in "qkv")
        q = q[:, :, -N_QUERIES:]
        for spec_ in METHODS:
            comp = make_compressor(spec_, "k")
            if comp.needs_fit:
                comp = comp.fit(calib[layer]["k"], calib[layer]["q"])
            metrics[spec_, layer] = attention_metrics(q, k, comp(k), v, causal=True, return_per_query=True)
    print(f"{len(metrics)} (method, layer) pairs in {time.perf_counter() - t:.0f} s")
    """),
    code(r"""
    rows = []
    hi = metrics[METHODS[0], LAYERS[0]].margin_edges.index(1.0)   # strata with margin >= 1 logit
    for (spec_, layer), m in metrics.items():
        s = m.summary()
        rows.append({"method": spec_, "layer": layer, "bits": ledger.bits_per_element(spec_, D, N_TOKENS),
                     "flip rate": s["flip_rate"],
                     "flip rate | margin ≥ 1": float(m.margin_flips[:, hi:].sum() / m.margin_counts[:, hi:].sum()),
                     "top-5 overlap": s["topk_overlap"], "KL": s["kl"], "Fisher": s["fisher"],
                     "output rel. err": s["output_rel_err"]})
    per_layer = pd.DataFrame(rows)
    overall = per_layer.groupby("method", sort=False).mean(numeric_only=True).drop(columns="layer")
    display(Markdown("**Mean over layers and query heads** (keys compressed, values exact):"))
    display(overall.style.format({"bits": "{:.3g}", "flip rate": "{:.1%}", "flip rate | margin ≥ 1": "{:.2%}",
                                  "top-5 overlap": "{:.3f}", "KL": "{:.2e}", "Fisher": "{:.2e}",
                                  "output rel. err": "{:.3f}"}))
    display(Markdown("**Per layer:**"))
    display(per_layer.pivot(index="layer", columns="method", values="flip rate")[METHODS].style.format("{:.1%}"))
    """),
    md(r"""
    ### Flips stratified by the top-1 margin

    Most unstratified flips are near-ties (margin < 0.1 logit), where any perturbation swaps two
    tokens of nearly equal weight and little is lost. The real difference appears at large
    margins: quantization noise is bounded (it can only flip a query whose margin is below twice
    its logit error bound), while removing directions moves logits coherently and flips queries
    that were decisively routed.
    """),
    code(r"""
    edges = metrics[METHODS[0], LAYERS[0]].margin_edges
    labels = [f"[{a:g}, {b:g})" for a, b in zip(edges[:-1], edges[1:])]
    strata = {}
    for spec_ in METHODS:
        n = sum(metrics[spec_, layer].margin_counts.sum(0) for layer in LAYERS)
        f = sum(metrics[spec_, layer].margin_flips.sum(0) for layer in LAYERS)
        strata[spec_] = (f / n.clamp_min(1)).numpy()
    strata_df = pd.DataFrame(strata, index=labels).rename_axis("top-1 margin (logits)")
    strata_df["share of queries"] = (n / n.sum()).numpy()
    display(strata_df.style.format("{:.2%}"))
    with style():
        fig, ax = new_figure(aspect=0.7)
        w = 0.8 / len(METHODS)
        x = np.arange(len(labels))
        for i, spec_ in enumerate(METHODS):
            color = COLORS[family(spec_)] if spec_ != "int8" else COLORS["other"]
            ax.bar(x + (i - (len(METHODS) - 1) / 2) * w, strata[spec_], w, color=color, label=spec_)
        ax.set_xticks(x, labels, rotation=30)
        ax.set_xlabel("top-1 margin $s_{(1)} - s_{(2)}$ (logits)")
        ax.set_ylabel("top-1 flip rate")
        ax.set_title(f"{MODEL}: flips by margin, layers {LAYERS[0]}–{LAYERS[-1]}")
        ax.set_ylim(0, 1)
        ax.legend(ncol=2, loc="upper right")
        show(fig)
    """),
    code(r"""
    # flip rate per layer and query head, INT4-KIVI against the matched rank
    with style():
        fig, axes = new_figure(FULL_WIDTH, 0.3, 1, 2, sharey=True)
        for ax, spec_ in zip(axes, ("int4-kivi", RANK)):
            grid = np.stack([metrics[spec_, layer].flip_rate.numpy() for layer in LAYERS])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_xticks(range(meta.q_heads), [f"{h}\nkv{h // G}" for h in range(meta.q_heads)])
            ax.set_yticks(range(len(LAYERS)), LAYERS)
            ax.set_xlabel("query head (its KV head)")
            ax.set_title(f"{spec_}: mean flip rate {grid.mean():.1%}")
            ax.grid(False)
        axes[0].set_ylabel("layer")
        fig.colorbar(im, ax=axes, label="top-1 flip rate")
        show(fig)
    """),
    md(r"""
    ## 4. Projection against quantization damage on the top PCA direction

    For each layer and KV head take the top PCA direction $u$ of the calibration keys and the
    query heads that read this KV head, with the causal mask. Removing $u$ costs
    `bounds.projection_damage` (Fisher) / `projection_kl` (exact); quantizing the coordinate
    $c = Ku$ to $2^b$ levels costs `bounds.expected_quant_damage` in expectation and
    `bounds.rounded_quant_damage(metric="kl")` for the actual rounding. The measured ratio
    (exact KL of removal over exact KL of rounding, summed over queries) is set against the
    data-dependent prediction (Fisher forms, the same sums) and against $3\cdot4^b$.
    """),
    code(r"""
    BITS = (2, 3, 4, 8)
    mask = fisher.causal_mask(N_BOUND_QUERIES, N_TOKENS)
    rows = []
    t = time.perf_counter()
    for layer in LAYERS:
        q, k = cap[layer]["q"][0, :, -N_BOUND_QUERIES:].double(), cap[layer]["k"][0].double()
        for h in range(meta.kv_heads):
            u = fits[layer].rotation[h][:, 0]
            qh, kh = q[h * G:(h + 1) * G], k[h]
            d_proj = bounds.projection_damage(qh, kh, u, mask)
            kl_proj = bounds.projection_kl(qh, kh, u, mask)
            for b in BITS:
                e_quant = bounds.expected_quant_damage(qh, kh, u, b, mask)
                kl_round = bounds.rounded_quant_damage(qh, kh, u, b, mask, metric="kl")
                rows.append({"layer": layer, "kv head": h, "b": b,
                             "measured": float(kl_proj.sum() / kl_round.sum()),
                             "predicted": float(d_proj.sum() / e_quant.sum()),
                             "exact_ratio median": float(bounds.exact_ratio(qh, kh, u, b, mask).nanmedian()),
                             "3·4^b": bounds.headline_ratio(b),
                             "Fisher/KL (removal)": float(d_proj.sum() / kl_proj.sum())})
    damage = pd.DataFrame(rows)
    damage["measured / predicted"] = damage["measured"] / damage["predicted"]
    print(f"{len(damage)} (layer, head, b) in {time.perf_counter() - t:.0f} s")
    display(Markdown("**Per bit width**, over layers and KV heads:"))
    by_b = damage.groupby("b").agg(**{
        "3·4^b": ("3·4^b", "first"), "predicted (median)": ("predicted", "median"),
        "measured (median)": ("measured", "median"), "measured 5%": ("measured", lambda x: x.quantile(0.05)),
        "measured 95%": ("measured", lambda x: x.quantile(0.95)),
        "within 10% of prediction": ("measured / predicted", lambda x: float(((x - 1).abs() < 0.1).mean())),
        "within 25% of prediction": ("measured / predicted", lambda x: float(((x - 1).abs() < 0.25).mean()))})
    display(by_b.style.format("{:.3g}"))
    display(Markdown("Removal: the second-order Fisher form against the exact KL, "
                     f"median ratio {damage['Fisher/KL (removal)'].median():.3f} "
                     f"(5–95%: {damage['Fisher/KL (removal)'].quantile(0.05):.3f}–"
                     f"{damage['Fisher/KL (removal)'].quantile(0.95):.3f})."))
    """),
    code(r"""
    with style():
        fig, ax = new_figure(aspect=0.8)
        markers = dict(zip(BITS, "os^D"))
        for b in BITS:
            sub = damage[damage["b"] == b]
            ax.loglog(sub["predicted"], sub["measured"], markers[b], ms=3, alpha=0.8, label=f"b = {b}")
            ax.axhline(bounds.headline_ratio(b), color=COLORS["theory"], lw=0.6, ls=":")
        lim = [damage[["predicted", "measured"]].min().min() / 2, damage[["predicted", "measured"]].max().max() * 2]
        ax.plot(lim, lim, "k-", lw=0.6, label="measured = predicted")
        ax.set_xlabel("predicted ratio  $D_{proj} / E[D_{quant}]$")
        ax.set_ylabel("measured ratio  KL(removal) / KL(rounding)")
        ax.set_title("Top PCA direction, per layer and KV head\n(dotted: $3\\cdot4^b$)")
        ax.legend()
        show(fig)
    """),
    md(r"""
    Read the table and the scatter together: the data-dependent prediction should track the
    measurement within a small factor, and both should grow by about 4× per bit, as the theory
    says. Their *level* is set by the data rather than by $3\cdot4^b$: where the coordinate's
    range $c_{\max}-c_{\min}$ is wide compared with its attention-weighted spread (heavy-tailed
    keys: the grid has to cover outliers) the ratio falls below the headline, which is the
    factor `bounds.exact_ratio` accounts for; where the measurement exceeds the prediction, the
    rounding errors of that coordinate are not the independent uniform errors the expectation
    assumes.

    ## 5. Save / load round trip

    `capture.save_capture` writes `capture.safetensors` and a `manifest.json` (with the SHA-256
    of the tensor file); `load_capture` verifies the hash and returns the same tensors and
    metadata bit for bit.
    """),
    code(r"""
    folder = save_capture(cap, RESULTS / "notebook02" / "capture")
    back = load_capture(folder)
    same_tensors = all(torch.equal(cap[layer][w], back[layer][w]) for layer in LAYERS for w in meta.what)
    print("files:", sorted(p.name for p in folder.iterdir()))
    print("same metadata:", back.meta == meta, "| same tensors:", same_tensors)
    """),
    md("## Summary"),
    code(r"""
    kivi_flip, rank_flip = overall.loc["int4-kivi", "flip rate"], overall.loc[RANK, "flip rate"]
    kivi_hi, rank_hi = overall.loc["int4-kivi", "flip rate | margin ≥ 1"], overall.loc[RANK, "flip rate | margin ≥ 1"]
    summary = {
        "matched rank for INT4-KIVI": RANK,
        "flip rate INT4-KIVI / rank": f"{kivi_flip:.1%} / {rank_flip:.1%}",
        "flip rate, margin ≥ 1: INT4-KIVI / rank": f"{kivi_hi:.2%} / {rank_hi:.2%}",
        "KL INT4-KIVI / rank": f"{overall.loc['int4-kivi', 'KL']:.2e} / {overall.loc[RANK, 'KL']:.2e}",
        "median measured ratio at INT4 (top PCA dir.)": round(float(by_b.loc[4, "measured (median)"]), 1),
        "capture round trip exact": bool(same_tensors and back.meta == meta),
        "runtime (s)": round(time.perf_counter() - T0, 1),
        "kernel CPU time (s)": round(time.process_time(), 1),
    }
    display(pd.Series(summary, dtype=object).to_frame("value"))
    assert summary["capture round trip exact"]
    assert rank_flip > 2 * kivi_flip and rank_hi > kivi_hi
    assert overall.loc[RANK, "KL"] > 5 * overall.loc["int4-kivi", "KL"]
    assert (damage.groupby("b")["measured"].median().diff().dropna() > 0).all()   # grows with b
    """),
]

# ============================================================================ 03 figures
FIGURES = [
    md(r"""
    # 3 · The figures, reproduced from saved results

    `kvtheory report` (`make report`) runs every registered analysis stage
    (`kvtheory.stages`) on every model of the report, saves each (stage, model) result as JSON
    with its config and provenance (`kvtheory.store.cached`), and draws the figures from those
    files only. This notebook does the same, stage by stage: it loads the saved results
    (`kvtheory.report.load_stages`), calls each stage's own `plot(results, out_dir)` over the
    models and `summary(result)` per model, and shows the PNGs and the headline numbers.

    * **Normal size**: `KVTHEORY_RESULTS` points at the results of `make report` (by default
      `../results`); nothing is recomputed.
    * **Small size** (`KVTHEORY_SMALL=1`, the test suite): the cheap stages — the bound check,
      the routing example and the flip study — are first run at the small size on SmolLM2
      (`kvtheory.report.run_stages`) into `KVTHEORY_RESULTS`; the perplexity stages (budget
      curves, basis ablation, downstream tasks, the damage predictor) are left to the report.

    Figures are written to a temporary folder, never into the repository.
    """),
    code(r"""
    import os
    import tempfile
    import time
    import warnings
    from pathlib import Path

    warnings.filterwarnings("ignore", message="IProgress not found")   # no widgets: plain progress

    import pandas as pd
    import transformers
    from IPython.display import Image, Markdown, display

    from kvtheory import report
    from kvtheory.analysis.common import small
    from kvtheory.stages import stages

    transformers.utils.logging.disable_progress_bar()
    SMALL = small()
    DATA = os.environ.get("KVTHEORY_DATA")       # None: the library's default data folder
    RESULTS = Path(os.environ.get("KVTHEORY_RESULTS") or "../results")
    FIGURES = Path(tempfile.mkdtemp(prefix="kvtheory-figures-"))
    T0 = time.perf_counter()
    STAGES = {st.name: st for st in stages()}

    display(pd.DataFrame([{"stage": name, "title": st.title, "figures": ", ".join(st.figures),
                           "claims": ", ".join(st.claims) or "–", "needs": ", ".join(st.needs) or "–"}
                          for name, st in STAGES.items()]).set_index("stage"))
    where = os.path.relpath(RESULTS.resolve(), Path.cwd().parent) if not SMALL else "a temporary folder"
    print(f"{'small' if SMALL else 'normal'} size; results from {where}")
    """),
    code(r"""
    # small size: run the cheap stages on SmolLM2 at the small size, as the report would
    SMALL_STAGES = ("bound_check", "routing", "flip_study")
    if SMALL:
        cfg = report.ReportConfig(size="small", models=("smollm2-135m",), stages=SMALL_STAGES,
                                  results=str(RESULTS), data_dir=DATA, progress=False)
        saved = report.run_stages(cfg, log=print)
    else:
        saved = report.load_stages(report.ReportConfig(results=str(RESULTS)))
    display(pd.DataFrame([{"stage": name, "model": model, "file": Path(env["path"]).name,
                           "git sha": str(env.get("provenance", {}).get("git_sha"))[:10],
                           "created": env.get("provenance", {}).get("created")}
                          for name, per in saved.by_stage.items() for model, env in per.items()])
            .set_index(["stage", "model"]))
    """),
    code(r"""
    import io

    from PIL import Image as PILImage

    from kvtheory.stages import model_slug

    SUMMARIES = {}


    def small_png(path, width=900):
        # the figure downscaled for the notebook (the full-resolution files are in figures/)
        img = PILImage.open(path)
        if img.width > width:
            img = img.resize((width, round(img.height * width / img.width)))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


    def show_stage(name):
        # draw one stage's figures from its saved results with its own plot(), show them and the
        # summary of every model side by side
        stage, results = STAGES[name], saved.results(name)
        if not results:
            display(Markdown(f"*`{name}`: not shown — no saved result in {RESULTS}"
                             + (" (the small size skips this stage)*" if SMALL and name not in SMALL_STAGES else "*")))
            return None
        paths = [Path(p) for p in stage.plot(results, FIGURES / name)]
        first = model_slug(next(iter(results)))
        shown, other = [], []
        for p in (p for p in paths if p.suffix == ".png"):
            # figures over all models, and the per-model ones of the first model; the rest are listed
            per_model = any(p.stem.endswith("-" + model_slug(m)) for m in results)
            (shown if not per_model or p.stem.endswith("-" + first) else other).append(p)
        for p in shown:
            display(Markdown(f"**`{p.stem}`**"), Image(data=small_png(p)))
        if other:
            display(Markdown("Also drawn (see REPORT.md): " + ", ".join(f"`{p.stem}`" for p in other)))
        summ = {model: stage.summary(res) for model, res in results.items()}
        SUMMARIES[name] = summ
        display(pd.DataFrame(summ, dtype=object))
        return summ
    """),
    md(r"""
    ## 1. The bound on real activations — `bound_check`

    For each layer, KV head and direction (top PCA and random), the measured ratio of
    projection to quantization damage (exact KL of removing the direction over exact KL of
    actually rounding its coordinate) against the data-dependent prediction
    (`bounds.exact_ratio`) and the headline $3\cdot4^b$; and the second-order Fisher form
    against the true KL for every perturbation.
    """),
    code(r"""
    bound = show_stage("bound_check")
    """),
    md(r"""
    ## 2. A discrete routing failure — `routing`

    One real query, its attention logits over the top keys before and after removing a single
    key direction, and after INT4 quantization of the same keys: removal overturns a decisive
    top-1 choice, quantization leaves it in place.
    """),
    code(r"""
    routing = show_stage("routing")
    """),
    md(r"""
    ## 3. Flip rates — `flip_study`

    Top-1 flip rate against storage (all queries and queries with margin ≥ 1 logit), the flip
    heatmap per layer and query head, the fraction of queries certified flip-free by the
    margin certificate, and the GQA co-flip analysis (how one removed direction misroutes
    several query heads of a KV group at once).
    """),
    code(r"""
    flips = show_stage("flip_study")
    """),
    md(r"""
    ## 4. Perplexity against storage — `budget`

    WikiText-2 perplexity against bits per element (scales and bases counted) for
    quantization, rank reduction and hybrids, keys only, values only and both.
    """),
    code(r"""
    budget = show_stage("budget")
    """),
    md(r"""
    ## 5. Basis ablation — `ablation`

    Rank reduction and quantization in each basis (identity, PCA, Haar-random, Hadamard,
    query-aware), before and after RoPE: does any coordinate system rescue rank reduction?
    """),
    code(r"""
    ablation = show_stage("ablation")
    """),
    md(r"""
    ## 6. Downstream tasks — `tasks`

    LAMBADA accuracy and perplexity of the decoder and the attention-output fidelity of the
    encoder under INT4 and the rank at the same storage.
    """),
    code(r"""
    tasks = show_stage("tasks")
    """),
    md(r"""
    ## 7. The damage predictor — `predictor`

    Mean Fisher damage on captured tensors against measured ΔPPL for every method, with
    Spearman ρ and its bootstrap interval.
    """),
    code(r"""
    predictor = show_stage("predictor")
    """),
    md(r"""
    ## Checks

    The last cell asserts what the shown results must say, for every stage that was shown, so
    that a silent break in an analysis or a plot fails the test suite.
    """),
    code(r"""
    checks = {}
    if bound is not None:
        for model, summ in bound.items():
            checks[f"bound_check, {model}: removal costs more than INT4 rounding (median ratio > 1)"] = \
                summ["b4.ratio_median"] > 1
            checks[f"bound_check, {model}: KL / Fisher median within [0.5, 2]"] = \
                0.5 < summ["kl_over_fisher.median"] < 2
    if routing is not None:
        for model, res in saved.results("routing").items():
            arg = res["argmax"]
            checks[f"routing, {model}: removal flips the top-1 token, INT4 does not"] = (
                arg["removed"] != arg["fp"] and arg["int4"] == arg["fp"])
    if flips is not None:
        for model, res in saved.results("flip_study").items():
            rank4 = res["matched_rank"]["int4"]
            means = {s: m["mean"] for s, m in res["methods"].items()}
            checks[f"flip_study, {model}: {rank4} flips more than int4 at the same storage"] = (
                means[rank4]["flip_rate"] > means["int4"]["flip_rate"])
            checks[f"flip_study, {model}: no certified query flipped"] = \
                flips[model]["certificate_violations"] == 0
    display(pd.Series(checks, dtype=object).to_frame("holds"))
    print(f"{len(SUMMARIES)} stages shown, {sum(1 for p in FIGURES.rglob('*.png'))} PNG figures, "
          f"{time.perf_counter() - T0:.0f} s (kernel CPU {time.process_time():.0f} s)")
    assert len(checks) >= (5 if SMALL else 1) and all(checks.values()), checks
    """),
]


NOTEBOOKS: dict[str, list] = {
    "01_theory": THEORY,
    "02_captured_activations": CAPTURED,
    "03_figures": FIGURES,
}


# ============================================================================ build / execute
def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[c.copy() for c in NOTEBOOKS[name]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["kvtheory"] = {"generated_by": "notebooks/make_notebooks.py"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name.split('_')[0]}-{i:02d}"
    return nb


def _strip(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)


def execute(nb: nbformat.NotebookNode, env: dict[str, str], timeout: int = 1800) -> float:
    from nbclient import NotebookClient

    before = dict(os.environ)
    os.environ.update(env)
    try:
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
        return time.perf_counter() - t0
    finally:
        os.environ.clear()
        os.environ.update(before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"notebooks to build (default all: {', '.join(NOTEBOOKS)})")
    ap.add_argument("--small", action="store_true", help="execute with KVTHEORY_SMALL=1")
    ap.add_argument("--no-execute", action="store_true", help="write the notebooks without outputs")
    ap.add_argument("--data-dir", default=os.environ.get("KVTHEORY_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--results", default=None, help="KVTHEORY_RESULTS (default: a temporary folder; 03_figures at normal size: ../results, read only)")
    ap.add_argument("--out", default=str(HERE), help="where to write the .ipynb files")
    args = ap.parse_args(argv)
    names = args.names or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebooks {unknown}; expected some of {list(NOTEBOOKS)}")
    with tempfile.TemporaryDirectory(prefix="kvtheory-nb-") as tmp:
        env = {"KVTHEORY_DATA": str(Path(args.data_dir).resolve()),
               "KVTHEORY_RESULTS": str(Path(args.results).resolve()) if args.results else str(Path(tmp) / "results"),
               "MPLBACKEND": "Agg", "KVTHEORY_SMALL": "1" if args.small else "0"}
        failed = []
        for name in names:
            nb = build(name)
            run_env = dict(env)
            if name == "03_figures" and not args.small and not args.results:
                run_env["KVTHEORY_RESULTS"] = str(ROOT / "results")   # the saved report, read only
            if not args.no_execute:
                from nbclient.exceptions import CellExecutionError

                try:
                    secs = execute(nb, run_env)
                    print(f"{name}: executed in {secs:.0f} s", file=sys.stderr)
                except CellExecutionError as exc:  # keep the notebook with its error output
                    failed.append(name)
                    print(f"{name}: FAILED\n{str(exc)[-3000:]}", file=sys.stderr)
            _strip(nb)
            nbformat.validate(nb)
            path = Path(args.out) / f"{name}.ipynb"
            nbformat.write(nb, str(path))
            print(path)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
