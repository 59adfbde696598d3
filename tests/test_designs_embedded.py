"""Designs on the embedded Qwen2.5-Coder-0.5B: a 3-factor grid through lac against plain HF forwards of
the rendered prompts, and steer / swap jobs (KL and markers mode) through the CLI."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
import torch

from lac.config import build_spec
from lac.metrics import cosine, interactions, main_effects
from lac.prompts import PromptBook
from lac.runner import compute_cells
from lac.sites import site_position
from tests.conftest import compose
from tests.test_trust import cli

pytestmark = pytest.mark.slow

THREE = """messages: [{role: user, content: "As {persona}, {task} {format}"}]
factors:
  persona: {baseline: a thoughtful person, levels: {yoda: Yoda, chef: a head chef trained in classical French technique}}
  task: {baseline: Give advice to someone facing a difficult decision., levels: {haiku: Write a haiku about Monday mornings.}}
  format: {letter: F, baseline: Answer in a short paragraph., levels: {bullets: Answer as a bulleted list.}}
markers: {yoda: [Hmm, young one, Force], chef: [seasonal, ingredient, flavor, French]}
"""


def test_three_factor_grid_equals_plain_forwards(qwen, tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(THREE)
    spec = build_spec(compose(["tracker=none", "grid=custom", f"grid.path={path}", "site=p_last", "layer=[6,13]"]))
    grid = spec.grid
    assert grid.roles() == ["BBB", "XBB", "BYB", "BBF", "XYB", "XBF", "BYF", "XYF"] and len(grid.cells()) == 2
    book = PromptBook(qwen.tokenizer, grid)
    rows, _ = compute_cells(qwen, spec, grid.cells(), book=book, cache=None, max_rows=64, batch_cells=12,
                            ctx={"model": "q", "model_id": "q", "grid": grid.name})
    df = pd.DataFrame(rows)
    geo = df[df.intervention == "decomposition"]
    assert set(geo.metric) == {"cos_all_sum", "inter_ratio", "cos_pair", "inter_share"}
    assert set(geo[geo.metric == "inter_share"].factor) == {"persona+task", "persona+format", "task+format",
                                                           "persona+task+format"}
    names = grid.factor_names
    for cell in grid.cells():
        ids = {s: list(book.get(cell, grid.role(s)).ids) for s in grid.subsets()}
        with torch.no_grad():
            full = ids[names]
            ref = qwen.model.generate(torch.tensor([full]), attention_mask=torch.ones(1, len(full), dtype=torch.long),
                                      max_new_tokens=12, do_sample=False)[0, len(full):].tolist()
        for L in (6, 13):
            h = {}
            for s, p in ids.items():
                prompt = book.get(cell, grid.role(s))
                pos = site_position("p_last", len(p), prompt.p_user_last)
                with torch.no_grad():
                    out = qwen.model(torch.tensor([p + ref[:3]]), output_hidden_states=True)
                h[s] = out.hidden_states[L][0, pos].float()
            d, inter = main_effects(h, names), interactions(h, names)
            got = geo[(geo.cell == cell.key) & (geo.layer == L)].set_index(["metric", "factor"]).value
            for f, g in itertools.combinations(names, 2):
                assert got[("cos_pair", f"{f}+{g}")] == pytest.approx(cosine(d[f], d[g]), abs=1e-3)
            total = h[names] - h[()]
            for s, term in inter.items():
                assert got[("inter_share", "+".join(s))] == pytest.approx(float(term.norm() / total.norm()),
                                                                          rel=1e-2, abs=1e-3)
    kl = df[df.metric == "kl"]
    assert len(kl) == 2 * 2 and (kl.value > 0).all() and set(kl.factor) == {""}


def test_steer_and_swap_jobs_through_the_cli(tmp_path):
    out = cli(tmp_path, "-m", "tracker=none", "intervention=steer", "intervention.alpha=0,1,2", "layer=13")
    assert out.returncode == 0, out.log[-3000:]
    kl = {}
    for num in range(3):
        df = pd.read_parquet(tmp_path / "multirun" / str(num) / "results.parquet")
        row = df[df.metric == "kl"]
        assert len(row) == 1 and set(row.intervention) == {"steer"}
        kl[float(row.alpha.item())] = row.value.item()
    assert kl[1.0] == 0.0 and kl[0.0] > 0 and kl[2.0] > 0
    # markers mode: the job's swap joins the conditions; X' = the partner persona's markers too
    path = tmp_path / "three.yaml"
    path.write_text(THREE)
    out = cli(tmp_path, "tracker=none", "experiment=markers", "grid=custom", f"grid.path={path}", "site=p_last",
              "layer=13", "intervention=swap", "markers.max_new_tokens=8", "markers.conditions=[clean,bare]")
    assert out.returncode == 0, out.log[-3000:]
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    swap = df[df.intervention == "swap"]
    assert set(swap.metric) == {"marker_any", "marker_distinct", "marker_any_partner", "marker_distinct_partner"}
    assert set(swap.factor) == {"persona"} and len(swap) == 4 * 2
    assert set(swap.partner) == {"next"} and set(df[df.intervention != "swap"].partner) == {""}
    gens = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert sorted({g["condition"] for g in gens}) == ["bare", "clean", "swap"]
    from lac.markers import score

    markers = {"yoda": ["Hmm", "young one", "Force"], "chef": ["seasonal", "ingredient", "flavor", "French"]}
    partner = {"yoda": "chef", "chef": "yoda"}  # partner=next, two personas
    for g in (g for g in gens if g["condition"] == "swap"):
        assert g["partner"] == partner[g["persona"]]  # the record says whose markers _partner scored
        rows = swap[swap.cell == g["cell"]].set_index("metric").value
        assert rows["marker_any"] == score(g["text"], markers[g["persona"]])["marker_any"]
        assert rows["marker_any_partner"] == score(g["text"], markers[partner[g["persona"]]])["marker_any"]
