"""The stage registry and the report orchestrator: a stage is one registered object; the report
runs every (stage, model) task once, caches one file each, renders from them; the Ray executor
lands the same files as the in-process run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from _tiny import save_tiny

from kvtheory.errors import KVTheoryError
from kvtheory.report import ReportConfig, load_stages, run_stages, tasks
from kvtheory.stages import _REGISTRY, Stage, get_stage, model_slug, register_stage, stages


def test_the_report_stages_are_registered_in_run_order():
    names = [s.name for s in stages()]
    assert names[:7] == ["bound_check", "routing", "flip_study", "budget", "ablation", "tasks",
                         "predictor"]
    for s in stages():  # a stage that reads another comes after it
        assert all(names.index(d) < names.index(s.name) for d in s.needs)
    claimed = {c for s in stages() for c in s.claims}
    assert {"C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"} <= claimed


def test_each_stage_configures_one_model_at_each_size():
    for s in stages():
        for size in ("default", "small"):
            cfg = s.config_for(size, "some-model")
            text = json.dumps(cfg.__dict__, default=str)
            assert "some-model" in text, (s.name, size)
        with pytest.raises(KVTheoryError, match="size"):
            s.config_for("huge", "m")


def test_registering_a_second_stage_under_a_taken_name_is_refused():
    budget = get_stage("budget")
    other = Stage("budget", "x", lambda size, model: None, lambda c: {}, lambda r: {},
                  lambda r, o: [], ())
    with pytest.raises(KVTheoryError, match="second stage named 'budget'"):
        register_stage(other)
    assert get_stage("budget") is budget
    with pytest.raises(KVTheoryError, match="run"):
        Stage("x", "x", lambda size, model: None, "not callable", lambda r: {}, lambda r, o: [], ())
    with pytest.raises(KVTheoryError, match="stage"):
        get_stage("nope")


def test_model_slug_keeps_names_and_flattens_paths():
    assert model_slug("qwen2.5-0.5b") == "qwen2.5-0.5b"
    assert model_slug("/a/b c/") == "a_b_c"
    with pytest.raises(KVTheoryError, match="model"):
        model_slug("  ")


def test_report_config_validates_models_stages_and_executor():
    cfg = ReportConfig(models="a, b", stages="budget,tasks")
    assert cfg.models == ("a", "b") and cfg.stages == ("budget", "tasks")
    assert [(s.name, m) for s, m in tasks(cfg)] == [("budget", "a"), ("budget", "b"),
                                                   ("tasks", "a"), ("tasks", "b")]
    for bad in ({"models": "a,a"}, {"stages": "nope"}, {"executor": "dask"},
                {"address": "auto"}, {"size": "huge"}):
        with pytest.raises(KVTheoryError):
            ReportConfig(**bad)


# --------------------------------------------------------------- a stage added by a user
@dataclass(frozen=True)
class CountConfig:
    model: str
    n: int = 3


CALLS: list[str] = []


def _run(cfg: CountConfig, *, data_dir=None, root=None, progress=True) -> dict:
    from kvtheory.engine import get_model

    CALLS.append(cfg.model)
    info = get_model(cfg.model).info
    return {"model": cfg.model, "heads": info.q_heads * cfg.n, "layers": info.n_layers}


def _plot(results: dict, out_dir) -> list[Path]:
    from kvtheory.plotstyle import new_figure, per_model, save_figure, style

    def one(res, out):
        with style():
            fig, ax = new_figure()
            ax.bar([0], [res["heads"]])
            return save_figure(fig, out, "count")
    return per_model(one, results, out_dir)


@pytest.fixture
def count_stage():
    stage = register_stage(Stage(
        name="count_heads", title="Heads, counted", configure=lambda size, model: CountConfig(model),
        run=_run, summary=lambda r: {"heads": r["heads"], "per.layer": r["layers"]}, plot=_plot,
        figures=("count",)))
    CALLS.clear()
    yield stage
    _REGISTRY.pop("count_heads")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "tiny-llama", tokenizer=True,
                     max_position_embeddings=512)


def test_a_user_stage_runs_caches_and_renders(count_stage, tiny_folder, tmp_path):
    from kvtheory.report import draw_figures
    from kvtheory.reportmd import render

    cfg = ReportConfig(models=(str(tiny_folder),), stages=("count_heads",), results=str(tmp_path / "r"),
                       figures=str(tmp_path / "f"), progress=False)
    lines: list[str] = []
    first = run_stages(cfg, lines.append)
    env = first.by_stage["count_heads"][str(tiny_folder)]
    assert env["result"]["heads"] == 3 * 4 and CALLS == [str(tiny_folder)]  # tiny llama: 4 heads
    assert Path(env["path"]).name.startswith(f"count_heads-{model_slug(str(tiny_folder))}-")
    again = run_stages(cfg, lines.append)                      # loaded, not recomputed
    assert CALLS == [str(tiny_folder)] and again.by_stage["count_heads"][str(tiny_folder)]["loaded"]
    assert load_stages(cfg).result("count_heads", str(tiny_folder)) == env["result"]
    figs = draw_figures(again, cfg.figures)
    assert [p.name for p in figs] == [f"count-{model_slug(str(tiny_folder))}.png",
                                      f"count-{model_slug(str(tiny_folder))}.pdf"]
    text = render(again, cfg, figs)
    assert "## Heads, counted" in text and "| heads | 12 |" in text
    assert "| | layer |\n|---|---|\n| per | 2 |" in text       # the dotted key, pivoted


def test_a_stage_that_does_not_apply_is_skipped_without_a_file(tiny_folder, tmp_path):
    folder = save_tiny("bert", tmp_path / "tiny-bert", tokenizer=True)
    cfg = ReportConfig(models=(str(folder),), stages=("budget",), results=str(tmp_path / "r"),
                       progress=False)
    lines: list[str] = []
    out = run_stages(cfg, lines.append)
    assert "budget" not in out.by_stage and any("does not apply" in x for x in lines)
    assert [p.name for p in (tmp_path / "r").glob("budget-*")] == []


_CLOCKS = ("seconds", "cpu_seconds")


def _strip(env: dict) -> dict:
    """An envelope without what differs between two runs of the same computation: provenance
    (time, machine) and the stages' own wall/CPU clocks (so also the result's SHA-256)."""
    def drop(x):
        if isinstance(x, dict):
            return {k: drop(v) for k, v in x.items() if k not in _CLOCKS}
        return [drop(v) for v in x] if isinstance(x, list) else x
    return {k: drop(env[k]) for k in ("stage", "config", "config_hash", "result")}


def test_ray_executor_lands_the_same_results_as_in_process(tiny_folder, tmp_path, data_dir):
    pytest.importorskip("ray")
    kw = dict(models=(str(tiny_folder),), stages=("bound_check", "flip_study"), size="small",
              data_dir=str(data_dir), progress=False)
    local = run_stages(ReportConfig(results=str(tmp_path / "local"), **kw), lambda s: None)
    lines: list[str] = []
    ray = run_stages(ReportConfig(results=str(tmp_path / "ray"), executor="ray", **kw), lines.append)
    assert any("(ray)" in x for x in lines)
    for stage in ("bound_check", "flip_study"):
        a = local.by_stage[stage][str(tiny_folder)]
        b = ray.by_stage[stage][str(tiny_folder)]
        assert _strip(a) == _strip(b), stage
        assert Path(a["path"]).name == Path(b["path"]).name
    assert _strip(local.verify) == _strip(ray.verify)


def test_report_device_map_loads_models_with_that_placement(count_stage, tiny_folder, tmp_path,
                                                            monkeypatch):
    from kvtheory import engine, models

    seen: list = []
    real = models.load_model

    def spy(name, **kw):
        seen.append(kw.get("device_map"))
        return real(name, **kw)

    monkeypatch.setattr(models, "load_model", spy)

    with pytest.raises(KVTheoryError, match="device_map"):
        ReportConfig(device_map="everywhere")
    kw = dict(models=(str(tiny_folder),), stages=("count_heads",), progress=False)
    plain = run_stages(ReportConfig(results=str(tmp_path / "a"), **kw), lambda s: None)
    try:
        mapped = run_stages(ReportConfig(results=str(tmp_path / "b"), device_map='{"": "cpu"}', **kw),
                            lambda s: None)
        assert engine._PLACEMENT[str(tiny_folder)] == {"": "cpu"} and seen[-1] == {"": "cpu"}
    finally:
        engine.set_placement(str(tiny_folder), None)
    a, b = (r.by_stage["count_heads"][str(tiny_folder)] for r in (plain, mapped))
    assert a["result"] == b["result"] and a["config_hash"] == b["config_hash"]
