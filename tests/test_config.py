"""Bad input: a clear error naming the value and what is allowed, before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lac.config import ConfigError, build_spec, job_key
from lac.grid import GridError, load_grid
from lac.markers import check_markers
from lac.models import resolve_dtype
from tests.conftest import compose


def spec(*ov):
    return build_spec(compose(["tracker=none", *ov]))


@pytest.mark.parametrize("group,bad", [("model", "llama9"), ("grid", "huge"), ("site", "p_first"),
                                       ("intervention", "swapp"), ("tracker", "mlflow")])
def test_unknown_group_option_lists_the_allowed(group, bad):
    from lac.paths import conf_dir

    with pytest.raises(ConfigError) as e:
        compose([f"{group}={bad}"])
    allowed = sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml"))
    assert len(allowed) >= 2 and str(e.value) == f"unknown {group} '{bad}'; allowed: {', '.join(allowed)}"


@pytest.mark.parametrize("layer,match", [("24", "layer 24 is out of range for qwen0.5 \\(24 layers\\): allowed 0..23"),
                                         ("-1", "layer -1 is out of range"),
                                         ("[]", "empty list"),
                                         ("[3,99]", "layer 99 is out of range"),
                                         ("middle", "'middle'.*allowed names.*paper, long")])
def test_layer_errors(layer, match):
    with pytest.raises(ConfigError, match=match):
        spec(f"layer={layer}")


def test_layer_names_resolve_to_the_models_grids():
    assert spec("layer=paper").layers == (6, 10, 13, 17, 20)
    assert spec("model=gemma2", "layer=paper").layers == (6, 10, 14, 18, 22)
    assert spec("model=qwen3", "layer=long").layers == (14, 20, 25)
    s = spec("intervention=host_additive", "intervention.layers=m3", "site=p_last")
    assert [j.layers for j in s.jobs] == [(9, 11, 13)]


def test_intervention_layer_set_out_of_range():
    with pytest.raises(ConfigError, match="intervention.layers: layer 30 is out of range"):
        spec("intervention=host_additive", "intervention.layers=[10,30]")


def test_unknown_dtype_and_device():
    with pytest.raises(ValueError, match="model.dtype='float8' is not a float type.*float32"):
        spec("model.dtype=float8")
    with pytest.raises(ValueError, match="model.dtype='int8' is not a float type"):
        spec("model.dtype=int8")
    with pytest.raises(ValueError, match="model.dtype='tensor'"):
        resolve_dtype("tensor")  # an attribute of torch, but not a dtype
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        spec("model.device=tpu")
    if not torch.backends.mps.is_available():  # refused in preflight, not by torch after the load
        with pytest.raises(ValueError, match="device 'mps' asked for but torch sees no MPS device"):
            spec("model.device=mps")


def test_geometry_layer_names_include_all():
    assert spec("geometry_layers=all").geometry_layers == tuple(range(24))
    with pytest.raises(ConfigError, match="geometry_layers='al'.*allowed names for qwen0.5: all, paper, long"):
        spec("geometry_layers=al")


def test_unknown_site_and_mode():
    with pytest.raises(ValueError, match="unknown site 'g3'.*p_user_last, p_last, g1, g2"):
        spec("site.sites=[p_last,g3]")
    with pytest.raises(ConfigError, match="unknown mode 'train'"):
        spec("mode=train")


def _grid(tmp_path, text):
    p = tmp_path / "g.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


GOOD = """baseline: {persona: a thoughtful person, task: Give advice.}
personas: {pirate: a pirate}
tasks: {poem: Write a poem.}
"""


def test_custom_grid_loads(tmp_path):
    s = spec("grid=custom", f"grid.path={_grid(tmp_path, GOOD)}")
    assert [c.key for c in s.grid.cells()] == ["pirate__poem"]
    with pytest.raises(ConfigError, match="grid.path"):
        spec("grid=custom")


@pytest.mark.parametrize("text,match", [
    ("baseline: [1, 2\n", "not valid YAML"),
    ("personas: {a: b}\ntasks: {c: d}\n", "missing 'baseline'"),
    (GOOD.replace("a pirate", "''"), "persona 'pirate' is empty"),
    (GOOD.replace("Write a poem.", '"  "'), "task 'poem' is empty"),
    (GOOD + "tasks: {other: x}\n", "duplicate key 'tasks'"),
    (GOOD.replace("{pirate: a pirate}", "{pirate: a pirate, pirate: a parrot}"), "duplicate key 'pirate'"),
    (GOOD.replace("{pirate: a pirate}", "{pirate: a pirate, corsair: ' a pirate'}"),
     "personas 'pirate' and 'corsair' have the same text 'a pirate'; each must differ"),
    ("- just\n- a list\n", "must be a mapping"),
    (GOOD.replace("personas:", "persona:"), r"unknown keys \['persona'\]; allowed: .*personas"),  # not "personas missing"
])
def test_bad_grid_files(tmp_path, text, match):
    with pytest.raises(GridError, match=match):
        load_grid(_grid(tmp_path, text))


def test_missing_and_unreadable_grid_file(tmp_path):
    with pytest.raises(GridError, match="grid file not found: '.*nope.yaml'"):
        spec("grid=custom", f"grid.path={tmp_path / 'nope.yaml'}")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GridError, match="unreadable"):
        load_grid(bad)


def test_markers_mode_needs_markers(tmp_path):
    with pytest.raises(ConfigError, match="grid 'short' has none"):
        spec("experiment=markers", "grid=short")
    with pytest.raises(GridError, match="empty marker"):
        load_grid(_grid(tmp_path, GOOD + "markers: {pirate: [arr, '']}\n"))
    with pytest.raises(ValueError, match="pirate"):
        check_markers({"pirate": ["arr", ""]}, "g")
    with pytest.raises(ConfigError, match=r"markers.max_new_tokens=0; allowed: an integer > 0"):
        spec("experiment=markers", "markers.max_new_tokens=0")
    with pytest.raises(ConfigError, match=r"markers.max_new_tokens=2.5; allowed: an integer > 0"):
        spec("experiment=markers", "markers.max_new_tokens=2.5")
    with pytest.raises(ConfigError, match="patches one layer"):
        spec("experiment=markers", "layer=[10,14]")


def test_job_key_ignores_where_and_how_but_not_what():
    base = compose(["tracker=none"])
    assert job_key(base) == job_key(compose(["tracker=wandb", "results_root=/elsewhere", "engine.batch_cells=3"]))
    assert job_key(base) != job_key(compose(["tracker=none", "layer=11"]))
    # a layer set cannot change what a vector-free intervention computes
    a = compose(["tracker=none", "intervention=host_none", "intervention.layers=[9,11]"])
    b = compose(["tracker=none", "intervention=host_none"])
    assert job_key(a) == job_key(b)
    # a dose typed 2.0 is the dose 2: one job, not a recompute; 2.5 is another
    steer = ["tracker=none", "intervention=steer"]
    assert job_key(compose([*steer, "intervention.alpha=2.0"])) == job_key(compose([*steer, "intervention.alpha=2"]))
    assert job_key(compose([*steer, "intervention.alpha=2.5"])) != job_key(compose([*steer, "intervention.alpha=2"]))
    # layer lists in another order are the same job (they were computed and stored twice)
    for key, a, b in (("layer", "[10,6]", "[6,10]"), ("geometry_layers", "[10,6]", "[6,10]"),
                      ("intervention.layers", "[12,10]", "[10,12]")):
        assert job_key(compose([f"{key}={a}"])) == job_key(compose([f"{key}={b}"]))
    assert job_key(compose(["layer=[6,10]"])) != job_key(compose(["layer=[6,11]"]))


def test_every_shipped_config_composes_and_validates():
    for model in ("qwen0.5", "smollm2", "gemma2", "qwen1.5", "qwen3"):
        for grid in ("short", "long", "markers"):
            s = spec(f"model={model}", f"grid={grid}", "layer=paper", "site=all")
            assert len(s.grid.cells()) == {"short": 12, "long": 48, "markers": 24}[grid]
            assert all(0 < L < s.n_layers for L in s.layers)
    assert spec("experiment=markers").grid.markers["chef"][-1] == "French"


@pytest.mark.parametrize("name", ["batch_cells", "capture_cells", "max_rows"])
@pytest.mark.parametrize("bad", [0, -3])
def test_engine_sizes_must_be_positive(name, bad):
    with pytest.raises(ConfigError, match=rf"engine\.{name}={bad}.*integer >= 1"):
        build_spec(compose([f"engine.{name}={bad}"]))


def test_cache_traces_is_auto_true_or_false():
    for ok in ("auto", "true", "false"):
        build_spec(compose([f"engine.cache_traces={ok}"]))
    with pytest.raises(ConfigError, match=r"engine\.cache_traces='cpu'; allowed: auto \(on where the model runs "
                                          r"on the CPU\), true, false"):
        build_spec(compose(["engine.cache_traces=cpu"]))


@pytest.mark.parametrize("ov,match", [
    ("layer=[3,3]", r"layer=\[3, 3\]: layer 3 is given twice"),
    ("intervention.layers=[9,11,9]", r"intervention.layers=\[9, 11, 9\]: layer 9 is given twice"),
    ("rerun=maybe", "rerun='maybe'; allowed: true or false"),
])
def test_more_bad_values(ov, match):
    with pytest.raises(ConfigError, match=match):
        spec("intervention=host_additive", ov)


@pytest.mark.parametrize("text,match", [
    ("personas: {1: a pirate, '1': a parrot}", "keys 1 and '1' collide"),
    ("personas: {pirate: a thoughtful person}", "persona 'pirate' has the baseline persona's text"),
    ("tasks: {advice: Give advice.}", "task 'advice' has the baseline task's text"),
])
def test_grid_keys_and_zero_deltas_refused(tmp_path, text, match):
    key = text.split(":")[0]
    body = GOOD.replace(next(line for line in GOOD.splitlines() if line.startswith(key)), text)
    with pytest.raises(GridError, match=match):
        load_grid(_grid(tmp_path, body))


def test_grid_path_that_is_a_directory(tmp_path):
    with pytest.raises(GridError, match="is a directory"):
        spec("grid=custom", f"grid.path={tmp_path}")


def test_results_root_checked(tmp_path, monkeypatch):
    from lac.config import check_results_root

    with pytest.raises(ConfigError, match="results_root is empty"):
        check_results_root("")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_results_root(str(f))
    with pytest.raises(ConfigError, match="is not writable"):
        check_results_root(str(f / "sub"))  # a folder cannot be made under a file
    new = tmp_path / "new" / "root"
    assert check_results_root(str(new)) == new and not (tmp_path / "new").exists()  # checked, not made
    import lac.io

    calls = []

    def refuse(dir, prefix):  # as a read-only tmp (root passes os.access, so lac probes with a folder)
        calls.append(Path(dir))
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lac.io.tempfile, "mkdtemp", refuse)
    with pytest.raises(ConfigError, match=r"is not writable \(Permission denied\)"):
        check_results_root(str(tmp_path / "new" / "a" / "b"))
    assert calls == [tmp_path.absolute()]  # the nearest folder that exists: where it would be made


def test_model_id_neither_hub_id_nor_folder(tmp_path, monkeypatch):
    from lac.config import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="model.id='/no/such/folder' is neither an existing folder nor a hub id"):
        preflight(compose(["tracker=none", "model=gemma2", "model.id=/no/such/folder", f"results_root={tmp_path}"]))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="google/gemma-2-2b-it is not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        preflight(compose(["tracker=none", "model=gemma2", f"results_root={tmp_path}"]))


def test_controls_bad_input():
    with pytest.raises(ConfigError, match="edits attention, which needs eager attention.*model.attn_implementation=eager"):
        spec("intervention=knockout_persona", "model.attn_implementation=sdpa")
    with pytest.raises(ConfigError, match="attn_persona reads attention weights.*eager"):
        spec("attn_persona=true", "model.attn_implementation=sdpa")
    with pytest.raises(ConfigError, match=r"intervention.layers='from:24': 'from:L' needs an integer L in 0..23"):
        spec("intervention=kv_persona", "intervention.layers=from:24")
    with pytest.raises(ConfigError, match=r"'from:L' needs an integer"):
        spec("intervention=kv_persona", "intervention.layers=from:x")
    s = spec("intervention=kv_persona", "intervention.layers=from:20", "site=p_last")
    assert [j.layers for j in s.jobs] == [(20, 21, 22, 23)]
    s = spec("intervention=knockout_persona_from", "layer=[10,22]", "site=p_last")
    assert [j.layers for j in s.jobs] == [tuple(range(10, 24)), (22, 23)]
    with pytest.raises(ConfigError, match="marker condition: unknown intervention 'steerz'; allowed: clean"):
        spec("experiment=markers", "markers.conditions=[clean,steerz]")
    m = spec("experiment=markers", "markers.conditions=[clean,kv_persona]", "intervention.layers=from:18")
    assert m.marker_layers == (18, 19, 20, 21, 22, 23)


def test_two_hydra_modes_are_one_line_not_hydras_traceback():
    from lac.errors import LacError
    from lac.run import check_command_line

    with pytest.raises(LacError, match=r"-m/--multirun and --cfg cannot be given together .* drop -m"):
        check_command_line(["-m", "layer=4,5", "--cfg", "hydra"])
    check_command_line(["--cfg", "job", "layer=4"])  # one mode: Hydra's to run
    check_command_line(["-m", "layer=4,5"])


@pytest.mark.parametrize("override", ["site=[p_last,g1]", "intervention=[additive,remove_x]", "model=[qwen0.5,smollm2]",
                                      "grid=[short,long]"])
def test_a_list_for_a_config_group_is_refused_not_merged(override):
    """Hydra merges a list of a group's options and the job runs only the last (site=[p_last,g1] ran g1
    alone, exit 0); lac refuses it before composing, naming the sweep form."""
    from lac.api import compose as api_compose
    from lac.errors import LacError
    from lac.run import check_command_line

    group = override.split("=")[0]
    with pytest.raises(LacError, match=rf"{re.escape(override)}: a config group takes one option, not a list .* "
                                       rf"-m {group}=a,b"):
        check_command_line([override])
    with pytest.raises(LacError, match="takes one option, not a list"):
        api_compose(override)


def test_walk_findings_in_markers_and_controls_are_one_line_before_any_load(tmp_path):
    """Each ran (or failed in Hydra) before: attn_persona in markers mode wrote no attention rows (exit 0);
    grid=short grid.path=F ran F's cells labelled 'short'; intervention.factor on additive was Hydra's
    struct error; markers 'the' and 'The' counted twice in marker_distinct."""
    with pytest.raises(ConfigError, match=r"attn_persona=true writes its rows in mode=kl jobs .* without "
                                          r"experiment=markers"):
        spec("experiment=markers", "model.attn_implementation=eager", "attn_persona=true")
    path = _grid(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=rf"grid.path={re.escape(str(path))} with grid=short: a grid file goes "
                                          r"with grid=custom"):
        spec("grid=short", f"grid.path={path}")
    for iv in ("additive", "clean", "bare"):
        with pytest.raises(ConfigError, match=rf"intervention.factor='task': {iv} is about the whole design, no one "
                                              r"factor; a factor applies to .*remove.*steer.*swap"):
            spec(f"intervention={iv}", "intervention.factor=task")
    with pytest.raises(GridError, match=r"persona 'pirate' has markers 'arr' and 'Arr', one marker to scoring"):
        load_grid(_grid(tmp_path, GOOD + "markers: {pirate: [arr, matey, Arr]}\n"))
    load_grid(_grid(tmp_path, GOOD + "markers: {pirate: [arr, matey, arr]}\n"))  # the same string twice: merged
    # the whole-design interventions' new `factor: null` leaves their job keys as they were
    assert job_key(compose(["tracker=none"])) == job_key(compose(["tracker=none", "intervention.factor=null"]))
