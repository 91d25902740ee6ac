"""`kvtheory verify`: table, --json rows, exit status."""

import json

import kvtheory.bounds
import kvtheory.ledger
from kvtheory.cli import main

NAMES = ["kl_hessian_is_fisher", "uniform_error_variance", "damage_ratio", "matched_storage"]


def test_verify_writes_json_and_exits_0(tmp_path, capsys):
    out = tmp_path / "sub" / "verify.json"
    assert main(["verify", "--json", str(out), "--points", "5"]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and [r["name"] for r in rows] == NAMES
    for r in rows:
        assert set(r) == {"name", "statement", "symbolic", "numeric_max_abs_err"}
        assert r["symbolic"] is True and r["numeric_max_abs_err"] < 1e-9
        assert isinstance(r["statement"], str) and r["statement"]
    printed = capsys.readouterr().out
    assert printed.count("PASS") == 4 and "FAIL" not in printed
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no leftovers


def test_verify_exits_1_when_a_derivation_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kvtheory.bounds, "headline_ratio", lambda bits: 3 * 4**bits + 1)

    def broken(*args, **kwargs):
        raise RuntimeError("ledger unavailable")

    monkeypatch.setattr(kvtheory.ledger, "rank_bits_per_element", broken)
    out = tmp_path / "verify.json"
    assert main(["verify", "--json", str(out), "--points", "2"]) == 1
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["damage_ratio"]["numeric_max_abs_err"] >= 1  # 3*4^b + 1 vs 3*4^b
    assert rows["matched_storage"]["numeric_max_abs_err"] is None  # NaN is written as null
    assert rows["kl_hessian_is_fisher"]["numeric_max_abs_err"] < 1e-9
    captured = capsys.readouterr()
    assert "matched_storage: RuntimeError: ledger unavailable" in captured.err
    assert "FAILED: damage_ratio, matched_storage" in captured.err
    assert captured.out.count("FAIL") == 2


def test_verify_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["verify", "--points", "0"]) == 2
    assert "--points: got 0; expected an integer >= 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["verify", "--points", "1", "--json", str(blocker / "out.json")]) == 2
    assert "--json: got" in capsys.readouterr().err
