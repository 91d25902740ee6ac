"""The public extension API (issue 10): Compressor.from_fn, register_method, plugins through
the ``kvtheory.methods`` entry point group, output validation, and a registered ``topk{n}``
family through compressed_kv, EvalConfig / kvtheory eval, the ledger, matched() and the
budget helpers; issue 11: qaware values and contradicting plans refused before any work."""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _tiny import tiny_ids, tiny_model

from kvtheory.config import EvalConfig
from kvtheory.errors import KVTheoryError, bad_argument
from kvtheory.ledger import LedgerRow, Setting, bits_per_element, breakdown, ledger_table, matched
from kvtheory.methods import (
    Compressor, check_methods, make_compressor, parse_method, register_method, registered_methods,
    unregister_method,
)
from kvtheory.methods import registry
from kvtheory.patch import compressed_kv, fit_compressors

REPO = Path(__file__).resolve().parent.parent


def _topk(n: int) -> Compressor:
    def keep_top(x):
        idx = x.abs().topk(n, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
    return Compressor.from_fn(keep_top, bits_per_element=lambda d, tokens: n * (16 + (d - 1).bit_length()) / d,
                              name=f"topk{n}")


def _topk_by_sorting(n: int):
    """A second implementation: sort |x| per token, keep the first n positions."""
    def f(x):
        order = x.abs().argsort(dim=-1, descending=True)
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep.scatter_(-1, order[..., :n], True)
        return torch.where(keep, x, torch.zeros_like(x))
    return f


def _fits(d, n):
    if n > d:
        raise bad_argument("n", n, f"at most the head dimension d={d}")


@pytest.fixture
def topk():
    fam = register_method("topk{n}", _topk, label="top-n |x|", validate=_fits, replace=True)
    yield fam
    unregister_method("topk")


# ----------------------------------------------------------------------------- from_fn
def test_from_fn_wraps_a_function_and_states_its_storage():
    c = Compressor.from_fn(lambda x: x * 0.5, bits_per_element=8)
    x = torch.randn(2, 3, 4, 8)
    assert torch.equal(c(x), x * 0.5) and c.bits_per_element(8) == 8.0 and not c.needs_fit
    assert c.fit(x) is c
    calls = Compressor.from_fn(lambda x: x, bits_per_element=lambda d, tokens: d / (tokens or 1))
    assert calls.bits_per_element(64, 16) == 4.0
    with pytest.raises(KVTheoryError, match="bits_per_element: got -1"):
        Compressor.from_fn(lambda x: x, bits_per_element=lambda d, tokens: -1).bits_per_element(8)


@pytest.mark.parametrize("fn, what", [
    (lambda x: x[..., :-1], r"shape \(1, 2, 3, 3\)"),
    (lambda x: x.double(), "dtype torch.float64"),
    (lambda x: (x,), "tuple"),
])
def test_a_wrong_output_is_a_named_error(fn, what):
    c = Compressor.from_fn(fn, bits_per_element=16, name="bad")
    with pytest.raises(KVTheoryError, match=rf"compressor: got FnCompressor\(name='bad'\) returning .*{what}"):
        c(torch.zeros(1, 2, 3, 4, dtype=torch.float32))


@dataclass(frozen=True)
class SkipsValidation(Compressor):
    """Overrides __call__ (no validation) and returns half the tokens."""

    def __call__(self, x, mask=None):
        return x[:, :, ::2]

    def bits_per_element(self, d, tokens=None):
        return 8.0


def test_compressed_kv_checks_outputs_of_compressors_that_skip_validation():
    model = tiny_model("llama")
    with pytest.raises(KVTheoryError, match=r"compressor: got SkipsValidation\(\) returning a tensor of shape"):
        with torch.no_grad(), compressed_kv(model, keys=SkipsValidation()):
            model(tiny_ids())
    wrong_dtype = Compressor.from_fn(lambda x: x.double(), bits_per_element=16)
    with pytest.raises(KVTheoryError, match="dtype torch.float64"):
        with torch.no_grad(), compressed_kv(model, values=wrong_dtype):
            model(tiny_ids())


# ----------------------------------------------------------------------------- register_method
def test_registered_family_parses_once_and_lists_in_the_grammar(topk):
    assert str(parse_method("topk08")) == "topk8" and parse_method("topk8") is parse_method("topk8")
    assert parse_method("topk8").family is topk and registered_methods()["topk"] == "topk{n}"
    assert make_compressor("topk8", "k") is make_compressor("topk08", "k")  # built once, cached
    with pytest.raises(KVTheoryError, match=r"spec: got 'topq8'; expected a method spec: fp .*"
                                            r"or a registered method: topk\{n\}"):
        parse_method("topq8")
    with pytest.raises(KVTheoryError, match="pattern: got 'int{b}'"):
        register_method("int{b}", _topk)  # a built-in spec
    with pytest.raises(KVTheoryError, match="name: got 'topk'"):
        register_method("topk{n}", _topk)  # taken, and replace=False


def test_topk_through_the_ledger_matched_and_geometry_checks(topk):
    # hand-worked: n fp16 values + n indices of ceil(log2 64) = 6 bits over d = 64 elements
    assert bits_per_element("topk8", 64) == 8 * 22 / 64 == 2.75
    assert breakdown("topk8", 64, 256, role="v") == LedgerRow("topk8", 2.75, 0.0, 0.0)
    assert [r.total for r in ledger_table(["fp", "topk8"], 64)] == [16.0, 2.75]
    # 13 · 22 / 64 = 4.46875 <= 4.5 < 14 · 22 / 64 = 4.8125
    assert matched(4.5, 64, extra=["topk"])[-1] == Setting("topk13", "topk", 4.46875)
    assert [s.family for s in matched(4.5, 64)] == ["int", "kivi", "rank", "hybrid", "hybrid", "hybrid"]
    with pytest.raises(KVTheoryError, match="extra: got 'nope'"):
        matched(4.5, 64, extra=["nope"])
    assert [str(m) for m in check_methods(["fp", "topk8"], 64)] == ["fp", "topk8"]
    with pytest.raises(KVTheoryError, match=r"method: got 'topk65' .* d=64; .*n: got 65; expected at most"):
        check_methods(["topk65"], 64)


def test_topk_through_compressed_kv_against_a_second_implementation(topk):
    model = tiny_model("llama")  # head dimension 8
    ids = tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        with compressed_kv(model, keys="topk8", values="topk8"):  # keeps all 8 coordinates
            assert torch.equal(model(ids).logits, ref)
        with compressed_kv(model, keys="topk3", values="topk5"):
            got = model(ids).logits
        mine = Compressor.from_fn(_topk_by_sorting(3), bits_per_element=1)
        theirs = Compressor.from_fn(_topk_by_sorting(5), bits_per_element=1)
        with compressed_kv(model, keys=mine, values=theirs):
            assert torch.equal(model(ids).logits, got)
    assert not torch.allclose(got, ref)


def test_topk_through_the_budget_helpers(topk):
    from kvtheory.analysis.budget import BudgetConfig, matched_gaps
    from kvtheory.engine import clear_memo, ppl_point, storage_bits
    from kvtheory.evaluate import perplexity
    from kvtheory.plotstyle import family, series_label

    assert storage_bits("topk8", "kv", 64, 512) == 2.75 and storage_bits("topk8", "k", 64, 512) == 2.75
    assert BudgetConfig(methods=("int4", "topk08")).methods == ("int4", "topk8")
    assert family("topk8") == "other" and series_label("topk8") == "top-n |x|"
    pts = [{"spec": "topk8", "family": family("topk8"), "target": "kv", "bits": 2.75, "ppl": 9.0},
           {"spec": "int4", "family": "quant", "target": "kv", "bits": 4.5, "ppl": 10.0}]
    assert matched_gaps(pts, "kv", 4.5)["quant"]["spec"] == "int4"
    model = tiny_model("llama")
    windows = tiny_ids(2, 16, seed=4)
    clear_memo()
    point = ppl_point(model, "tiny-llama", "topk4", "kv", windows=windows, calibration=None, n_boot=20)
    direct = perplexity(model, windows, keys=_topk(4), values=_topk(4), n_boot=20)
    assert point["value"] == direct.value and point["n_tokens"] == direct.n_tokens


def test_eval_config_and_cli_accept_registered_methods(topk, tmp_path, capsys):
    cfg = EvalConfig("m", "wikitext2", "fp,topk8")
    assert cfg.methods == ("fp", "topk8")
    unregister_method("topk")
    with pytest.raises(KVTheoryError, match="spec: got 'topk8'"):
        EvalConfig("m", "wikitext2", "fp,topk8")
    register_method("topk{n}", _topk, validate=_fits)
    from test_evaluate import TEXT, tiny_llama, tiny_tokenizer
    from kvtheory.cli import main

    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok), max_pos=128).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out.json"
    args = ["eval", "--model", str(tmp_path / "model"), "--text-file", str(tmp_path / "text.txt"),
            "--targets", "kv", "--seq-len", "32", "--max-windows", "2", "--calib-windows", "1",
            "--n-boot", "20", "--no-progress", "--json", str(out)]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        assert main([*args, "--methods", "fp,topk16,topk8"]) == 0, capsys.readouterr().err
        rows = {r["method"]: r for r in json.loads(out.read_text())["records"]}
        # d = 16: topk16 keeps every coordinate, so it is fp exactly; topk8 is not
        assert rows["topk16"]["value"] == rows["fp"]["value"] != rows["topk8"]["value"]
        assert rows["topk8"]["bits_per_element"] == 8 * (16 + 4) / 16
        assert main([*args, "--methods", "fp,topk17"]) != 0  # refused: n > d
        assert "topk17" in capsys.readouterr().err
    finally:
        torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- plugins
def test_entry_point_plugin_registers_lazily(tmp_path, monkeypatch):
    dist = tmp_path / "kv_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kv-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvtheory.methods]\nhalf = kv_fake_plugin:register\n")
    (tmp_path / "kv_fake_plugin.py").write_text(textwrap.dedent("""
        import torch
        from kvtheory.methods import Compressor, register_method

        def register():
            register_method("halfp{n}", lambda n: Compressor.from_fn(
                lambda x: x.half().to(x.dtype), bits_per_element=16), replace=True)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._PLUGINS, "loaded", False)  # as in a fresh process
    try:
        assert "halfp" not in registry.FAMILIES
        spec = parse_method("halfp2")  # not built-in: the entry points load now
        assert str(spec) == "halfp2" and spec.bits_per_element(64) == 16.0
        x = torch.tensor([[[[1 / 3]]]], dtype=torch.float32)
        assert make_compressor("halfp2")(x).item() == torch.tensor(1 / 3).half().float().item()
    finally:
        if "halfp" in registry.FAMILIES:
            unregister_method("halfp")
        registry.load_plugins(force=True)  # forget the fake distribution's state
        monkeypatch.setitem(registry._PLUGINS, "loaded", False)


def test_a_broken_plugin_is_named_not_fatal(tmp_path, monkeypatch):
    dist = tmp_path / "kv_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kv-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvtheory.methods]\nbroken = kv_missing_module:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._PLUGINS, "loaded", False)
    monkeypatch.setitem(registry._PLUGINS, "errors", [])
    assert str(parse_method("int4")) == "int4"  # built-ins never need the plugins
    with pytest.raises(KVTheoryError, match=r"plugins that failed to load: broken \(kv_missing_module"):
        parse_method("zz9")


# ----------------------------------------------------------------------------- issue 11
def test_qaware_values_refused_before_any_work():
    model = tiny_model("llama")
    message = "values: got 'rank4-qaware'; expected a values method without the qaware basis"
    with pytest.raises(KVTheoryError, match=message):
        with compressed_kv(model, keys="rank4-qaware", values="rank4-qaware"):  # no calibration
            raise AssertionError("not reached")
    with pytest.raises(KVTheoryError, match=message):
        fit_compressors(model, "fp", "rank4-qaware", tiny_ids())
    with pytest.raises(KVTheoryError, match=message):
        check_methods(["rank4-qaware"], 8, ["k", "v"])
    with pytest.raises(KVTheoryError, match=message):
        EvalConfig("m", "wikitext2", ("fp", "rank4-qaware"))  # default targets: kv
    assert EvalConfig("m", "wikitext2", ("rank4-qaware",), ("k",)).methods == ("rank4-qaware",)
    assert str(check_methods(["rank4-qaware"], 8, ["k"])[0]) == "rank4-qaware"


def test_a_fitted_plan_contradicted_by_keys_or_values_is_refused():
    model = tiny_model("llama")
    ids, calib = tiny_ids(seed=2), tiny_ids(seed=9)
    plan = fit_compressors(model, "rank2-pca", "rank2-pca", calib)
    with torch.no_grad():
        with compressed_kv(model, calibration=plan):
            planned = model(ids).logits
        with compressed_kv(model, "rank2-pca", "rank2-pca", calibration=plan):  # agrees: fine
            assert torch.equal(model(ids).logits, planned)
        with compressed_kv(model, "rank2-pca", "rank2-pca", calibration=calib):
            assert torch.equal(model(ids).logits, planned)
    assert not torch.equal(planned, tiny_model("llama")(ids).logits)
    for kw in ({"keys": "fp", "values": "fp"}, {"keys": "rank3-pca"}, {"values": "int4"}):
        with pytest.raises(KVTheoryError, match="calibration: got a fitted plan .*contradicting"):
            with compressed_kv(model, calibration=plan, **kw):
                raise AssertionError("not reached")


def test_check_methods_against_the_head_dimension():
    with pytest.raises(KVTheoryError, match=r"method: got 'rank65-pca' for the keys of a model with "
                                            r"head dimension d=64; .*rank: got 65; expected an integer in 1..64"):
        check_methods(["fp", "rank65-pca"], 64)
    with pytest.raises(KVTheoryError, match=r"'int4-g5'.*group: got 5; expected a divisor"):
        check_methods(["int4-g5"], 64)
    with pytest.raises(KVTheoryError, match=r"'rank8-hadamard'.*a power of two"):
        check_methods(["rank8-hadamard"], 48)
    assert [str(m) for m in check_methods("int4-kivi,rank8-pca".split(","), 64, "v")] == [
        "int4-kivi", "rank8-pca"]


# ----------------------------------------------------------------------------- README example
def test_readme_example_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own compressor", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), ns)
        assert ns["topk8_bits"] == 2.75
        assert ns["at_int4"] == Setting("topk13", "topk", 4.46875)
        model = tiny_model("llama")
        with torch.no_grad():
            ref, cut = model(tiny_ids()).logits, None
            with compressed_kv(model, keys="topk8"):  # d = 8: all coordinates kept
                assert torch.equal(model(tiny_ids()).logits, ref)
            with compressed_kv(model, keys="topk2"):
                cut = model(tiny_ids()).logits
        assert not torch.allclose(cut, ref)
    finally:
        if "topk" in registry.FAMILIES:
            unregister_method("topk")


# ----------------------------------------------------------------------------- labels
def _old_family(spec):  # the string matching that plotstyle.family used to do
    if spec == "fp":
        return "fp"
    if spec.startswith("rank"):
        return "hybrid" if "x" in spec.split("-")[0] else "rank"
    if spec.startswith("int"):
        return "kivi" if "kivi" in spec else "quant"
    return "other"


def _old_short(spec):  # tasks._short before the registry
    head = spec.split("-")[0]
    if "kivi" in spec:
        return f"{head}\nKIVI"
    if "x" in head:
        r, b = head.split("x")
        return f"{r}\n×INT{b}"
    return head


def test_labels_from_the_registry_equal_the_old_string_matching():
    from test_compress import CANONICAL

    from kvtheory.plotstyle import family, family_label, series, series_label, tick

    specs = CANONICAL + [s.spec for b in (2, 3, 4, 8) for s in matched(b + 0.5, 64, 512)]
    for spec in specs:
        assert family(spec) == _old_family(spec) and tick(spec) == _old_short(spec), spec
        fam = _old_family(spec)
        if fam == "hybrid":
            b = spec.split("-")[0].split("x")[1]
            assert series(spec) == ("hybrid", f"x{b}") and series_label(spec) == f"rank r + INT{b} coefficients"
        elif fam in ("quant", "kivi"):
            assert series(spec) == (fam, fam)
            assert series_label(spec) == {"quant": "INT-b per token", "kivi": "INT-b KIVI"}[fam]
    assert series_label("rank16-pca") == "rank-r PCA"
    assert [family_label(f) for f in ("quant", "kivi", "rank", "hybrid")] == [
        "INT per token", "INT KIVI", "rank (PCA)", "hybrid"]  # flip_study's legend, as before
    assert family("not-a-spec") == "other" and tick("not-a-spec") == "not-a-spec"


def test_a_factory_taking_a_role_builds_per_role_compressors():
    def scaled(c, role):  # keys scaled by c/10, values untouched; storage per role
        factor = c / 10 if role == "k" else 1.0
        return Compressor.from_fn(lambda x: x * factor, bits_per_element=8 if role == "k" else 16)

    register_method("scale{c}", scaled)
    try:
        assert bits_per_element("scale5", 64, role="k") == 8.0
        assert bits_per_element("scale5", 64, role="v") == 16.0
        x = torch.ones(1, 1, 2, 4)
        assert make_compressor("scale5", "k")(x).unique().item() == 0.5
        assert torch.equal(make_compressor("scale5", "v")(x), x)
    finally:
        unregister_method("scale")


def test_a_family_beside_the_builtin_int_head():
    """The issue's second example: INT-b with stochastic rounding, ``int{b}-sr``."""
    def sr(b):
        def f(x):
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            step = (hi - lo) / (2**b - 1)
            g = torch.Generator().manual_seed(0)
            u = torch.rand(x.shape, generator=g, dtype=x.dtype)
            return torch.floor((x - lo) / step + u).clamp(0, 2**b - 1) * step + lo
        return Compressor.from_fn(f, bits_per_element=lambda d, tokens: b + 32 / d)

    register_method("int{b}-sr", sr)
    try:
        assert parse_method("int3-sr").family.key == "int-sr"
        assert str(parse_method("int3")) == "int3" and parse_method("int3").family.key == "int"
        assert bits_per_element("int3-sr", 64) == bits_per_element("int3", 64) == 3.5
        x = torch.randn(1, 1, 5, 8)
        err = (make_compressor("int3-sr")(x) - x).abs()
        assert bool((err <= (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 7).all())
    finally:
        unregister_method("int-sr")
