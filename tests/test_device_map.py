"""``device_map``: the eval config and CLI accept an accelerate placement, and a model loaded
with an explicit per-module map gives the same rows as the model on one device (compressors
and fitted bases follow each layer's device). On this CPU-only machine every module maps to
"cpu"; a split across a GPU and the CPU is run on a GPU machine (benchmarks/README.md)."""

from __future__ import annotations

import json

import pytest
from test_eval_runs import cfg, one_thread, tiny  # noqa: F401  (fixtures)

from kvtheory.errors import KVTheoryError
from kvtheory.placement import parse_device_map
from kvtheory.runs import run_eval


def test_parse_device_map_accepts_strategies_and_json_objects():
    assert parse_device_map(None) is None and parse_device_map("sequential") == "sequential"
    assert parse_device_map('{"model.layers.0": "cpu", "": "cpu"}') == {"model.layers.0": "cpu", "": "cpu"}
    for bad in ("everywhere", "[1, 2]", "{}", "{bad json"):
        with pytest.raises(KVTheoryError, match="device_map"):
            parse_device_map(bad)
    good = {"a": 0, "b": "cuda:1", "c": "cpu", "d": "disk", "": 1}
    assert parse_device_map(json.dumps(good)) == good and parse_device_map(good) == good
    # each bad placement is named with its module: a device torch does not know, a negative
    # or boolean index, a list
    for module, bad in (("model.layers.3", "gpu7"), ("lm_head", -1), ("", True), ("x", [1])):
        with pytest.raises(KVTheoryError, match=rf"device_map\['{module}'\]: got "):
            parse_device_map({module: bad})


def test_load_model_refuses_a_bad_map_before_loading():
    from kvtheory.models import load_model

    with pytest.raises(KVTheoryError, match=r"device_map\['lm_head'\]: got 'gpu'"):
        load_model("no-such-model", device_map={"lm_head": "gpu"})


def test_eval_config_validates_device_map_and_keeps_old_identities(tiny):
    with pytest.raises(KVTheoryError, match="device_map"):
        cfg(tiny, device_map="{bad")
    plain, mapped = cfg(tiny), cfg(tiny, device_map="auto")
    assert "device_map" not in plain.identity()          # files from before keep their hash
    assert mapped.identity()["device_map"] == "auto" and mapped.hash() != plain.hash()


def test_rows_under_an_explicit_per_module_map_equal_the_plain_rows(tiny, tmp_path, one_thread):  # noqa: F811
    modules = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
               "model.rotary_emb", "lm_head"]
    placement = json.dumps({m: "cpu" for m in modules})
    methods = ("fp", "int4-kivi", "rank4-pca")
    plain = run_eval(cfg(tiny, methods), tmp_path / "a.json", progress=False, log=lambda m: None)
    mapped = run_eval(cfg(tiny, methods, device_map=placement), tmp_path / "b.json",
                      progress=False, log=lambda m: None)
    got = {(r["method"], r["target"]): r["value"] for r in mapped["records"]}
    want = {(r["method"], r["target"]): r["value"] for r in plain["records"]}
    assert got == want and len(got) == 3
