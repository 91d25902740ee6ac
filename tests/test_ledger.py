"""Storage ledger against hand counts; matched() settings are the largest that fit."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tol import assert_close

from kvtheory.errors import KVTheoryError
from kvtheory.ledger import (
    LedgerRow, Setting, basis_bits_per_element, bits_per_element, breakdown, ledger_table, matched,
    quant_bits_per_element, rank_bits_per_element,
)


# ---------------------------------------------------------------- hand counts, d = 64
@pytest.mark.parametrize("spec, tokens, role, hand", [
    ("fp", None, "k", 16),
    ("int4", None, "k", 4 + 32 / 64),            # scale + zero-point per 64 elements
    ("int4-g32", None, "k", 4 + 32 / 32),
    ("int4-sym", None, "k", 4 + 16 / 64),        # scale only
    ("int2-g16-sym", 256, "k", 2 + 16 / 16),
    ("int4-kivi", None, "k", 4 + 32 / 128),      # keys: 128 tokens per channel group
    ("int4-kivi", 256, "k", 4 + 32 / 128),
    ("int4-kivi", 200, "k", 4 + 2 * 32 / 200),   # 2 groups (128 + 72) over 200 tokens
    ("int4-kivi", 100, "k", 4 + 32 / 100),       # one partial group
    ("int8-kivi-g32", 100, "k", 8 + 4 * 32 / 100),
    ("int4-kivi", 256, "v", 4 + 32 / 64),        # values: per token
    ("int4-hadamard", 256, "k", 4.5),            # regenerated basis: free
    ("int4-identity", 256, "k", 4.5 + 16 * 64 / (64 * 256)),       # 64 channel indices
    ("int4-pca", 256, "k", 4.5 + 16 * 64 * 64 / (64 * 256)),       # a 64×64 basis
    ("rank16-pca", None, "k", 16 * 16 / 64),
    ("rank16-pca", 256, "k", 4 + 16 * 64 * 16 / (64 * 256)),       # 4 + 1
    ("rank16-qaware", 256, "k", 5.0),
    ("rank16-pcac", 256, "k", 4 + 16 * (64 * 16 + 64) / (64 * 256)),  # and the mean
    ("rank16-identity", 256, "k", 4 + 16 * 16 / (64 * 256)),       # 16 channel indices
    ("rank16-hadamard", 256, "k", 4.0),
    ("rank16-random3", 256, "k", 4.0),
    ("rank16x4-pca", None, "k", 16 / 64 * (4 + 32 / 16)),          # 1.5
    ("rank16x4-pca", 256, "k", 1.5 + 1.0),
    ("rank16x2-hadamard-g4", 256, "k", 16 / 64 * (2 + 32 / 4)),    # 2.5
    ("rank16x4-identity-sym", 256, "k", 16 / 64 * (4 + 16 / 16) + 16 * 16 / (64 * 256)),
])
def test_bits_per_element_against_hand_counts(spec, tokens, role, hand):
    assert_close(bits_per_element(spec, 64, tokens, role=role), hand, "exact64")
    assert isinstance(bits_per_element(spec, 64, tokens, role=role), float)


def test_primitives_against_hand_counts():
    assert quant_bits_per_element(4, group=64) == 4.5
    assert quant_bits_per_element(4, group=128) == 4.25
    assert quant_bits_per_element(4, group=64, zero_point=False) == 4.25
    assert quant_bits_per_element(4, group=64, scale_bits=32) == 5.0
    assert quant_bits_per_element(3, group=64.5) == 3 + 32 / 64.5  # an average group size
    assert rank_bits_per_element(16, 64) == 4.0
    assert rank_bits_per_element(16, 64, tokens=256) == 5.0
    assert rank_bits_per_element(16, 64, tokens=256, centered=True) == 5.0625
    assert rank_bits_per_element(16, 64, coef_bits=8) == 2.0
    assert rank_bits_per_element(16, 64, tokens=256, basis_bits=8) == 4.5
    assert basis_bits_per_element("identity", 64, 16, 256) == 16 * 16 / (64 * 256)
    assert basis_bits_per_element("pcac", 64, 16, 256) == 1.0625
    assert basis_bits_per_element("random9", 64, 16, 256) == 0.0
    assert basis_bits_per_element("pca", 64, 16, None) == 0.0


def test_primitive_signatures_are_the_agreed_ones():
    # kvtheory.symbolic checks these exact signatures
    q = inspect.signature(quant_bits_per_element).parameters
    assert list(q) == ["bits", "group", "scale_bits", "zero_point"]
    assert [p.kind.name for p in q.values()][1:] == ["KEYWORD_ONLY"] * 3
    assert (q["scale_bits"].default, q["zero_point"].default) == (16, True)
    r = inspect.signature(rank_bits_per_element).parameters
    assert list(r) == ["rank", "d", "tokens", "coef_bits", "basis_bits", "centered"]
    assert [p.default for p in list(r.values())[2:]] == [None, 16, 16, False]
    assert all(p.kind.name == "KEYWORD_ONLY" for p in list(r.values())[2:])


@pytest.mark.parametrize("bits", range(1, 17))
def test_matched_storage_relation(bits):
    # rank r = d·b/16 at fp16 coefficients stores as much as b bits per element (no overheads)
    assert rank_bits_per_element(64 * bits // 16, 64) == bits
    assert rank_bits_per_element(128 * bits // 16, 128) == bits


@settings(max_examples=60)
@given(rank=st.integers(1, 128), d=st.integers(1, 128), tokens=st.integers(1, 5000), centered=st.booleans())
def test_spec_ledger_equals_the_rank_formula(rank, d, tokens, centered):
    rank = min(rank, d)
    spec = f"rank{rank}-{'pcac' if centered else 'pca'}"
    assert_close(bits_per_element(spec, d, tokens),
                 rank_bits_per_element(rank, d, tokens=tokens, centered=centered), "exact64")
    # qaware stores the same d×r basis as uncentered pca
    assert bits_per_element(f"rank{rank}-qaware", d, tokens) == bits_per_element(f"rank{rank}-pca", d, tokens)


def test_breakdown_and_table():
    row = breakdown("rank16x4-pca", 64, 256)
    assert row == LedgerRow("rank16x4-pca", payload=1.0, scales=0.5, basis=1.0)
    assert row.total == 2.5 and row.compression == 16 / 2.5
    rows = ledger_table(["fp", "int4-kivi", "rank16-pcac"], 64, 256)
    assert [r.spec for r in rows] == ["fp", "int4-kivi", "rank16-pcac"]
    assert [r.total for r in rows] == [16.0, 4.25, 5.0625]
    assert dataclasses.asdict(rows[1]) == {"spec": "int4-kivi", "payload": 4.0, "scales": 0.25, "basis": 0.0}
    assert ledger_table("int4", 64)[0].total == 4.5


# ---------------------------------------------------------------- matched
def test_matched_hand_worked():
    # budget 4.5, d = 64, basis free: int4 = 4.5, int4-kivi = 4.25 (int5-kivi = 5.25),
    # rank 18 = 16·18/64 = 4.5; hybrids (r/64)(b + 32/r) = (b r + 32)/64 <= 4.5 -> r <= 256/b
    assert matched(4.5, 64) == [
        Setting("int4", "int", 4.5), Setting("int4-kivi", "kivi", 4.25),
        Setting("rank18-pca", "rank", 4.5), Setting("rank64x2-pca", "hybrid", 2 + 0.5),
        Setting("rank64x4-pca", "hybrid", 4.5), Setting("rank32x8-pca", "hybrid", 4.5),
    ]
    # basis amortised over 256 tokens: rank r costs r/4 + r/16 (r = 14 -> 4.375); the hybrid
    # (4r + 32)/64 + r/16 = (8r + 32)/64 <= 4.5 -> r = 32
    rows = {s.family: s.spec for s in matched(4.5, 64, 256, hybrid_bits=(4,))}
    assert rows == {"int": "int4", "kivi": "int4-kivi", "rank": "rank14-pca", "hybrid": "rank32x4-pca"}
    assert [s.spec for s in matched(16, 64, basis="random3")][:4] == ["fp", "int15", "int15-kivi", "rank64-random3"]
    assert matched(0.1, 64) == []  # nothing fits


@settings(max_examples=40)
@given(budget=st.floats(0.3, 20), d=st.sampled_from([16, 64, 128]), tokens=st.sampled_from([None, 100, 1024]),
       basis=st.sampled_from(["pca", "pcac", "identity", "hadamard"]))
def test_matched_settings_fit_and_are_the_largest(budget, d, tokens, basis):
    import re

    for s in matched(budget, d, tokens, basis=basis):
        assert s.bits_per_element <= budget
        assert s.bits_per_element == bits_per_element(s.spec, d, tokens)
        # the next larger setting of the family does not fit (or does not exist)
        m = re.fullmatch(r"int(\d+)(-kivi)?|rank(\d+)(?:x(\d+))?-.*", s.spec)
        if s.family in ("int", "kivi") and int(m[1]) < 16:
            assert bits_per_element(f"int{int(m[1]) + 1}{m[2] or ''}", d, tokens) > budget
        if s.family in ("rank", "hybrid") and int(m[3]) < d:
            bigger = s.spec.replace(f"rank{m[3]}", f"rank{int(m[3]) + 1}", 1)
            assert bits_per_element(bigger, d, tokens) > budget


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda: bits_per_element("int4-g5", 64), "group: got 5; expected a divisor of the head dimension d=64"),
    (lambda: bits_per_element("rank65-pca", 64), "rank: got 65; expected an integer in 1..64"),
    (lambda: bits_per_element("rank16x4-pca-g16", 8), "rank: got 16; expected an integer in 1..8"),
    (lambda: bits_per_element("int4", 0), "d: got 0; expected an integer >= 1"),
    (lambda: bits_per_element("rank4-pca", 64, 0), "tokens: got 0; expected an integer >= 1"),
    (lambda: bits_per_element("int4-kivi", 64, role="q"), "role: got 'q'; expected one of k, v"),
    (lambda: bits_per_element("int4x", 64), "spec: got 'int4x'; expected a method spec"),
    (lambda: matched(0, 64), "budget_bits: got 0; expected a positive finite number"),
    (lambda: matched(4, 64, hybrid_bits=(17,)), "hybrid_bits: got 17; expected an integer in 1..16"),
    (lambda: matched(4, 64, basis="svd"), "basis: got 'svd'"),
    (lambda: quant_bits_per_element(4, group=0), "group: got 0; expected a positive finite number"),
    (lambda: rank_bits_per_element(-1, 64), "rank: got -1; expected a positive finite number"),
])
def test_errors_name_argument_value_and_expectation(call, message):
    with pytest.raises(KVTheoryError) as info:
        call()
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------- one implementation (issue 10)
def test_the_ledger_reads_the_compressors_storage(monkeypatch):
    """One implementation: change the compressor's storage and the ledger follows."""
    from fractions import Fraction

    from kvtheory.methods.uniform import Quantize

    assert bits_per_element("int4", 64) == 4.5
    monkeypatch.setattr(Quantize, "storage", lambda self, d, tokens=None: (Fraction(1), Fraction(2), Fraction(0)))
    assert bits_per_element("int4", 64) == Quantize(4).bits_per_element(64) == 3.0
    assert bits_per_element("int4-kivi", 64, 256) == 3.0


def test_no_import_cycle_and_specs_parsed_once():
    import subprocess
    import sys

    code = "import sys, kvtheory.ledger; print('kvtheory.compress' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the ledger needs only kvtheory.methods
    from kvtheory.methods import parse_method, registry

    registry._parse_str.cache_clear()
    first = parse_method("rank12x4-pca-g4")
    for _ in range(5):
        assert parse_method("rank12x4-pca-g4") is first
        bits_per_element("rank12x4-pca-g4", 64, 256)
    info = registry._parse_str.cache_info()
    assert info.misses == 1 and info.hits >= 10
