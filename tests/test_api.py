"""lac.api, lac from a notebook: jobs by the command line's overrides and the clean captures behind
them, against the plain one-prompt implementation (lac.naive) on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lac import api, runner
from lac.config import ConfigError
from lac.naive import Naive, cell_prompts
from tests.conftest import assert_geometry_close, assert_kl_close

GRID = """baseline: {persona: a thoughtful person, task: Give advice to someone facing a difficult decision.}
personas: {pirate: a pirate captain, yoda: Yoda}
tasks: {poem: Write a short poem about the sea.}
"""


def _grid(tmp_path: Path) -> list[str]:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID, encoding="utf-8")
    return ["grid=custom", f"grid.path={path}", "tracker=none", "model.device=cpu", f"results_root={tmp_path / 'store'}"]


def test_bad_input_raises_before_any_folder_or_model(tmp_path, monkeypatch):
    """The command line's checks and messages, as exceptions; no outputs/DATE/TIME folder, no model."""
    monkeypatch.chdir(tmp_path)
    loaded = dict(runner._MODEL)
    with pytest.raises(ConfigError, match=r"layer 99 is out of range for qwen0.5 \(24 layers\): allowed 0..23"):
        api.job("layer=99", "tracker=none")
    with pytest.raises(ConfigError, match=r"cells \['yoda__haiku'\] are not in grid 'grid'; its cells: "
                                          r"pirate__poem, yoda__poem"):
        api.captures(*_grid(tmp_path), cells=["yoda__haiku"])
    bad = {  # what Hydra cannot compose: one-line ConfigErrors (LacError), not Hydra's exceptions
        ("site=plast",): r"^unknown site 'plast'; allowed: all, g1, g2, p_last, p_user_last, transition$",
        ("layer=range(4,6)",): r"^layer=range\(4,6\) is a sweep: api.sweep runs it",
        ("site=p_last,g1",): r"^site=p_last,g1 is a sweep: api.sweep runs it",
        ("tracker=none", "tracker.mode=x"): r"^no key 'tracker.mode' in this job's config; tracker has: name \(",
        ("layer=[6,10",): r"^cannot use the overrides layer=\[6,10: no viable alternative",
    }
    for overrides, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            api.job(*overrides)
    with pytest.raises(ConfigError, match=r"^unknown model 'qwen05'; allowed: gemma2, local, qwen0.5, qwen1.5, qwen3, smollm2$"):
        api.sweep("model=qwen0.5,qwen05", "tracker=none")
    with pytest.raises(ConfigError, match=r"^no key 'sitee' in this job's config; its top level has: attn_persona, "):
        api.compose_sweep("sitee=4,5")
    assert not (tmp_path / "outputs").exists()
    assert runner._MODEL == loaded


def test_a_sweep_is_checked_whole_before_any_job(tmp_path, monkeypatch):
    """api.sweep refuses a sweep with bad jobs as the command line's -m does: one error naming each,
    before any job folder or model; the depth it planned for the good jobs is not kept."""
    monkeypatch.chdir(tmp_path)
    loaded, depth = dict(runner._MODEL), dict(runner.CAPTURE_DEPTH)
    with pytest.raises(ConfigError) as err:
        api.sweep("layer=range(22,26)", "tracker=none")
    assert str(err.value).splitlines() == [
        "job 2 (layer=24 tracker=none): layer: layer 24 is out of range for qwen0.5 (24 layers): allowed 0..23",
        "job 3 (layer=25 tracker=none): layer: layer 25 is out of range for qwen0.5 (24 layers): allowed 0..23",
        "2 of 4 jobs cannot run; no job was started",
    ]
    with pytest.raises(ConfigError, match=r"hydra/launcher: JoblibLauncher; lac.api runs a sweep's jobs in this "
                                          r"process, one after another"):
        api.sweep("layer=4,5", "tracker=none", "hydra/launcher=joblib")
    with pytest.raises(ConfigError, match=r"^the sweep has no jobs: layer=range\(10,4\) gives no value"):
        api.sweep("layer=range(10,4)", "site=p_last,g1", "tracker=none")
    assert not (tmp_path / "outputs" / "multirun").exists()
    assert runner._MODEL == loaded and runner.CAPTURE_DEPTH == depth


def test_compose_sweep_expands_as_the_command_line():
    """Each job's config is the one `python -m lac.run` composes from that job's overrides; a preset's
    hydra.sweeper.params expand too."""
    jobs = api.compose_sweep("site=p_last", "layer=range(4,7)", "model=qwen0.5,smollm2")
    assert [o for o, _ in jobs] == [("site=p_last", f"layer={layer}", f"model={m}")
                                    for layer in (4, 5, 6) for m in ("qwen0.5", "smollm2")]
    for overrides, cfg in jobs:
        assert cfg == api.compose(*overrides), overrides
    controls = api.compose_sweep("+sweep=controls")
    assert len(controls) == 8 and controls[0][0] == ("intervention=host_none", "+sweep=controls")
    assert [(cfg.intervention.name, cfg.intervention.layers) for _, cfg in controls][-2:] == [
        ("kv_persona", "from"), ("knockout_persona", "from")]
    assert {cfg.grid.name for _, cfg in controls} == {"long"}


def test_compose_is_the_command_lines_config():
    from tests.conftest import compose

    cfg = api.compose("site=p_last", "layer=[6,10]")
    assert cfg == compose(["site=p_last", "layer=[6,10]"])
    assert list(cfg.layer) == [6, 10] and list(cfg.site.sites) == ["p_last"]


def test_api_calls_hide_the_weight_loading_bar_and_give_the_setting_back():
    """transformers' "Loading weights" bar is off inside an api call (as on the command line), and the
    notebook's own setting, on or off, is what it was after, also when the call raises."""
    from transformers.utils import logging as hf_logging

    given = hf_logging.is_progress_bar_enabled()  # other tests' jobs may have switched it off
    try:
        for before in (True, False):
            (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
            with api._quiet():
                assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.is_progress_bar_enabled() is before
            with pytest.raises(RuntimeError), api._quiet():
                raise RuntimeError("a job failed")
            assert hf_logging.is_progress_bar_enabled() is before
    finally:
        (hf_logging.enable_progress_bar if given else hf_logging.disable_progress_bar)()


@pytest.mark.slow
def test_job_and_captures_equal_the_plain_implementation(qwen, tmp_path, monkeypatch):
    """api.job's rows (KL, geometry) and api.captures' vectors against lac.naive's own forwards
    (output_hidden_states, hooks) on the same loaded model; a second call reuses the job."""
    common = _grid(tmp_path)
    (tmp_path / "job").mkdir()  # a folder an earlier markers job used: its generations are not this job's
    (tmp_path / "job" / "generations.jsonl").write_text('{"text": "stale"}\n')
    res = api.job(*common, "site=p_last", "site.sites=[p_last,g2]", "layer=10", job_dir=tmp_path / "job")
    assert res.dir == tmp_path / "job" and (res.dir / "results.parquet").is_file()
    assert res.generations == []
    assert runner._MODEL[runner._model_key(api.compose(*common).model)] is qwen  # the loaded model, shared

    nv = Naive(qwen.model, qwen.tokenizer)
    base = ("a thoughtful person", "Give advice to someone facing a difficult decision.")
    prompts = {"pirate__poem": cell_prompts(qwen.tokenizer, "a pirate captain", "Write a short poem about the sea.", *base),
               "yoda__poem": cell_prompts(qwen.tokenizer, "Yoda", "Write a short poem about the sea.", *base)}
    kl = res.rows[res.rows.metric == "kl"]
    assert set(kl.intervention) == {"additive"} and len(kl) == 2 * 2
    for r in kl.itertuples():
        assert_kl_close(r.value, nv.intervention_kl(prompts[r.cell], "additive", r.site, [10]), (r.cell, r.site))
    geo = res.rows[res.rows.intervention == "decomposition"]
    assert len(geo) == 2 * 2 * 3
    for r in geo.itertuples():
        assert_geometry_close(r.value, nv.geometry(prompts[r.cell], r.site, 10)[r.metric], (r.cell, r.site, r.metric))

    caps = api.captures(*common, "site=p_last", "site.sites=[p_last,g2]", "layer=10", "geometry_layers=all", cells=["yoda__poem"])
    assert list(caps) == ["yoda__poem"]
    c, p = caps["yoda__poem"], prompts["yoda__poem"]
    assert c.layers == range(24)
    assert c.ref == nv.ref(p["XY"].ids)
    for site, layer in (("p_last", 10), ("g2", 23), ("p_user_last", 1)):
        h = {role: nv.hidden(p[role].ids, p[role].p_user_last, c.ref, site, layer) for role in ("BB", "XB", "BY", "XY")}
        want = {"h_bb": h["BB"], "h_xy": h["XY"], "delta_x": h["XB"] - h["BB"], "delta_y": h["BY"] - h["BB"],
                "inter": h["XY"] - h["XB"] - h["BY"] + h["BB"]}
        for name, vec in want.items():
            got = getattr(c, name)(site, layer)
            assert got.dtype == torch.float32 and got.shape == (qwen.model.config.hidden_size,)
            err = float(torch.linalg.vector_norm(got - vec) / torch.linalg.vector_norm(vec))
            assert err < 1e-4, (site, layer, name, err)  # bitwise equal here; float32 noise of other batch shapes at most
    assert torch.equal(c.delta("persona", "p_last", 10), c.delta_x("p_last", 10))
    with pytest.raises(ConfigError, match="layer 24 was not captured"):
        c.h_bb("p_last", 24)
    with pytest.raises(ConfigError, match=r"layer='ten': an int in 0..23"):
        c.delta_x("p_last", "ten")

    monkeypatch.chdir(tmp_path)  # the same job again, default folder: reused, not recomputed
    again = api.job(*common, "site=p_last", "site.sites=[p_last,g2]", "layer=10")
    assert again.dir.parent.parent == Path("outputs") and again.dir.name.endswith("-0")
    pd.testing.assert_frame_equal(again.rows, res.rows)
    assert again.summary == res.summary


@pytest.mark.slow
def test_sweep_captures_once_and_equals_one_job(qwen, tmp_path, monkeypatch):
    """api.sweep over layers 6 and 10 captures once, as deep as layer 10 needs (the command line's
    multirun plan), and its rows equal one job over both layers."""
    from lac.config import preflight

    common = [*_grid(tmp_path), "site=p_last"]
    depths = []
    capture_cells = runner.capture_cells

    def recording(*args, **kwargs):
        depths.append(kwargs["depth"])
        return capture_cells(*args, **kwargs)

    monkeypatch.setattr(runner, "capture_cells", recording)
    planned = dict(runner.CAPTURE_DEPTH)
    runs = api.sweep(*common, "layer=6,10", sweep_dir=tmp_path / "sweep")
    deepest = runner._capture_plan(preflight(api.compose(*common, "layer=10")))[1]
    assert deepest > runner._capture_plan(preflight(api.compose(*common, "layer=6")))[1]
    assert depths and set(depths) == {deepest}, depths  # the layer-6 job captured for both
    assert [r.dir for r in runs] == [tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"]
    assert [r.overrides[-1] for r in runs] == ["layer=6", "layer=10"]

    one = api.job(*common, "layer=[6,10]", job_dir=tmp_path / "one").rows
    for r, layer in zip(runs, (6, 10), strict=True):
        mine = r.rows.drop(columns=["layers"], errors="ignore")
        theirs = one[one.layer == layer].drop(columns=["layers"], errors="ignore")
        assert len(mine) == len(theirs) > 0
        cols = [c for c in mine.columns if c != "value"]
        merged = mine.merge(theirs, on=cols, suffixes=("", "_one"), validate="one_to_one")
        assert len(merged) == len(mine), (layer, len(merged))
        assert (merged.value - merged.value_one).abs().max() <= 1e-6, layer
    assert runner.CAPTURE_DEPTH == planned  # the plan ends with the sweep


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(qwen, tmp_path, monkeypatch):
    """As on the command line, the sweep goes on past a job that fails while it runs; the error at
    the end names it and carries the finished jobs' results."""
    monkeypatch.chdir(tmp_path)
    long = tmp_path / "long.yaml"  # ~36k tokens: more than the 32768 positions of the embedded Qwen
    long.write_text(GRID.replace("yoda: Yoda", "yoda: '" + "Yoda speaks. " * 12000 + "'"), encoding="utf-8")
    common = [*_grid(tmp_path), "site=p_last", "layer=6"]
    good = common[1]
    with pytest.raises(api.SweepFailed) as err:
        api.sweep(*common, f"grid.path={long},{good.split('=', 1)[1]}", sweep_dir=tmp_path / "sweep")
    [(num, overrides, error)] = err.value.failed
    assert num == 0 and f"grid.path={long}" in overrides and "exceed the context" in str(error)
    assert str(err.value).startswith("1 of 2 jobs of the sweep failed")
    assert f"\n  job 0 ({' '.join(overrides)}): " in str(err.value) and err.value.__cause__ is error
    (done,) = err.value.results  # the job after the failed one ran
    assert done.dir == tmp_path / "sweep" / "1" and (done.dir / "results.parquet").is_file()
    assert set(done.rows.cell) == {"pirate__poem", "yoda__poem"} and done.rows.value.notna().all()
