"""The controls on the embedded Qwen2.5-Coder-0.5B: lac's batched rows against plain one-prompt HF
implementations (tests/test_controls.plain_kl), and the whole job through the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lac.config import build_spec
from lac.prompts import PromptBook
from lac.runner import compute_cells
from tests.conftest import compose
from tests.test_controls import NEW, assert_kl_close, plain_kl
from tests.test_trust import GRID, cli

pytestmark = pytest.mark.slow
CELLS = ["yoda__haiku", "angelou__recommend", "marx__policy"]


@pytest.mark.parametrize("name", NEW)
def test_each_control_equals_plain_on_the_embedded_model(qwen, name):
    spec = build_spec(compose(["tracker=none", f"intervention={name}", "site.sites=[p_last,g1]", "layer=[6,13]"]))
    book = PromptBook(qwen.tokenizer, spec.grid)
    cells = [c for c in spec.grid.cells() if c.key in CELLS]
    rows, _ = compute_cells(qwen, spec, cells, book=book, cache=None, max_rows=64, batch_cells=12,
                            ctx={"model": "q", "model_id": "q", "grid": "short"})
    kl = pd.DataFrame(rows).query("metric == 'kl'")
    checked = 0
    for c in cells:
        prompts = {r: book.get(c, r) for r in ("XY", "BY", "LY")}
        assert len(prompts["LY"].ids) == len(prompts["XY"].ids)
        for site, L in (("p_last", 6), ("p_last", 13), ("g1", 6), ("g1", 13)):
            got = kl[(kl.cell == c.key) & (kl.site == site) & (kl.layers == ("" if name == "host_none_lm" else str(L)))]
            want = plain_kl(qwen, prompts, name, site, [L] if name != "host_none_lm" else [])
            assert_kl_close(got.value.item(), want, f"{name} {c.key} {site} L{L}")
            checked += 1
    assert checked == 12


def test_controls_through_the_cli(tmp_path):
    out = cli(tmp_path, "tracker=none", "intervention=knockout_persona", "intervention.layers=from:10",
              "attn_persona=true", "site=transition", "layer=10")
    assert out.returncode == 0, out.log[-3000:]
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    kl = df[df.metric == "kl"]
    assert set(kl.layers) == {",".join(map(str, range(10, 24)))} and (kl.value > 0).all()
    att = df[df.intervention == "attention"]
    assert set(att.metric) == {"attn_persona", "attn_persona_max", "attn_persona_window", "attn_persona_window_max"}
    assert sorted(set(att.layer)) == list(range(24)) and set(att.site) == {"p_last", "g1", "g2"}
    assert ((att.value >= 0) & (att.value <= 1 + 1e-6)).all()
    # from:L given as one override, so a multirun sweeps L; LY's text is recorded
    out = cli(tmp_path, "-m", "tracker=none", "intervention=kv_persona", "intervention.layers=from:4,from:20")
    assert out.returncode == 0, out.log[-3000:]
    for num, first in ((0, 4), (1, 20)):
        df = pd.read_parquet(tmp_path / "multirun" / str(num) / "results.parquet")
        assert set(df[df.metric == "kl"].layers) == {",".join(map(str, range(first, 24)))}
    summary = json.loads((tmp_path / "multirun" / "0" / "summary.json").read_text())
    assert summary["length_matched"]["yoda__haiku"].startswith(" a")  # the baseline persona's first tokens


def test_controls_in_markers_mode(tmp_path):
    grid = tmp_path / "markers.yaml"
    grid.write_text(GRID + "markers: {yoda: [force, young, hmm]}\n")
    out = cli(tmp_path, "tracker=none", "experiment=markers", f"grid.path={grid}", "layer=14",
              "markers.conditions=[clean,knockout_persona,kv_persona,host_oracle_span,host_none_lm]",
              "intervention.layers=from:10", "markers.max_new_tokens=12")
    assert out.returncode == 0, out.log[-3000:]
    gens = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    by = {g["condition"]: g for g in gens}
    # the job's own intervention (additive by default) is a condition too, beside those listed
    assert set(by) == {"clean", "knockout_persona", "kv_persona", "host_oracle_span", "host_none_lm", "additive"}
    assert by["clean"]["layer"] == -1 and by["knockout_persona"]["layer"] == 23
    assert all(len(g["tokens"]) == 12 for g in gens)
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(df.metric) == {"marker_any", "marker_distinct"}
    assert set(df[df.intervention == "kv_persona"].layers) == {",".join(map(str, range(10, 24)))}
