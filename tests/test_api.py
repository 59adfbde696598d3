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
    with pytest.raises(ConfigError, match=r"cells \['yoda__haiku'\] are not in grid 'custom'; its cells: "
                                          r"pirate__poem, yoda__poem"):
        api.captures(*_grid(tmp_path), cells=["yoda__haiku"])
    assert not (tmp_path / "outputs").exists()
    assert runner._MODEL == loaded


def test_compose_is_the_command_lines_config():
    from tests.conftest import compose

    cfg = api.compose("site=p_last", "layer=[6,10]")
    assert cfg == compose(["site=p_last", "layer=[6,10]"])
    assert list(cfg.layer) == [6, 10] and list(cfg.site.sites) == ["p_last"]


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

    monkeypatch.chdir(tmp_path)  # the same job again, default folder: reused, not recomputed
    again = api.job(*common, "site=p_last", "site.sites=[p_last,g2]", "layer=10")
    assert again.dir.parent.parent == Path("outputs") and again.dir.name.endswith("-0")
    pd.testing.assert_frame_equal(again.rows, res.rows)
    assert again.summary == res.summary
