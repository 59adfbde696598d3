"""Bad input: a clear error naming the value and what is allowed, before any model loads."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from lac.config import ConfigError, build_spec, job_key
from lac.grid import GridError, load_grid
from lac.markers import check_markers
from lac.models import resolve_dtype
from tests.conftest import compose


def spec(*ov):
    return build_spec(compose(["tracker=none", *ov]))


@pytest.mark.parametrize("group,bad", [("model", "llama9"), ("grid", "huge"), ("site", "p_first"),
                                       ("intervention", "swap"), ("tracker", "mlflow")])
def test_unknown_group_option_lists_the_allowed(group, bad):
    with pytest.raises(ConfigCompositionException) as e:
        compose([f"{group}={bad}"])
    msg = str(e.value)
    assert bad in msg and "Available options" in msg


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
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*float32"):
        spec("model.dtype=float8")
    with pytest.raises(ValueError, match="unknown dtype 'tensor'"):
        resolve_dtype("tensor")  # an attribute of torch, but not a dtype
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        spec("model.device=tpu")


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
    ("- just\n- a list\n", "must be a mapping"),
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
    with pytest.raises(ConfigError, match="max_new_tokens must be > 0, got 0"):
        spec("experiment=markers", "markers.max_new_tokens=0")
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
