"""lac on the embedded Qwen2.5-Coder-0.5B against the plain one-prompt implementation and the paper's script."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lac.config import build_spec
from lac.engine import Row, run_rows
from lac.metrics import geometry
from lac.naive import Naive, kl
from lac.prompts import PromptBook
from lac.runner import compute_cells
from lac.sites import site_position
from tests.conftest import compose

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CTX = {"model": "qwen0.5", "model_id": "embedded", "grid": "short"}
ROLES = ("BB", "XB", "BY", "XY")


def _rows(qwen, overrides, cells):
    spec = build_spec(compose(["tracker=none", *overrides]))
    grid_cells = [c for c in spec.grid.cells() if c.key in cells] if cells else spec.grid.cells()
    rows, _ = compute_cells(qwen, spec, grid_cells, book=PromptBook(qwen.tokenizer, spec.grid),
                            cache=None, max_rows=64, batch_cells=12, ctx=CTX)
    return spec, pd.DataFrame(rows)


def _naive_cell(qwen, book, cell, site, layers, host="XY", rule="additive", nv=None):
    """KL of one intervention the plain way: every capture and window its own forward."""
    nv = nv or Naive(qwen.model, qwen.tokenizer)
    P = {r: book.get(cell, r) for r in (*ROLES, "bare")}
    ref = nv.ref(list(P["XY"].ids))
    clean = nv.window_logp(list(P["XY"].ids), ref, site)
    patches = []
    for L in layers:
        h = {r: nv.hidden(list(P[r].ids), P[r].p_user_last, ref, site, L) for r in ROLES}
        vec = {"additive": h["BB"] + (h["XB"] - h["BB"]) + (h["BY"] - h["BB"]),
               "remove_x": h["XY"] - (h["XB"] - h["BB"]), "oracle": h["XY"]}[rule]
        hp = P[host]
        patches.append((L, site_position(site, len(hp.ids), hp.p_user_last), vec))
    return kl(clean, nv.window_logp(list(P[host].ids), ref, site, patches or None)), nv, P, ref


CELLS = ["buffett__policy", "yoda__haiku", "angelou__recommend"]


def test_kl_and_geometry_equal_plain_implementation(qwen):
    spec, df = _rows(qwen, ["site=all", "layer=[6,13]"], CELLS)
    book = PromptBook(qwen.tokenizer, spec.grid)
    cells = {c.key: c for c in spec.grid.cells()}
    checked = 0
    for key in CELLS:
        nv = Naive(qwen.model, qwen.tokenizer)
        for site in ("p_last", "g1"):
            for L in (6, 13):
                want, nv, P, ref = _naive_cell(qwen, book, cells[key], site, [L], nv=nv)
                got = df[(df.cell == key) & (df.site == site) & (df.layer == L)]
                assert abs(got[got.metric == "kl"].value.item() - want) <= 1e-4
                h = [nv.hidden(list(P[r].ids), P[r].p_user_last, ref, site, L) for r in ROLES]
                for metric, v in geometry(*h).items():
                    assert abs(got[got.metric == metric].value.item() - v) <= 1e-4, (key, site, L, metric)
                checked += 1
    assert checked == 12


def test_reproduces_the_papers_script_on_the_embedded_model(qwen):
    """embedded-qwen0.5-v15.json: the paper's own section-4 script, run unchanged on this model."""
    ref = json.loads((REFERENCE / "embedded-qwen0.5-v15.json").read_text())
    _, df = _rows(qwen, ["site=all", "layer=[6,17]", "geometry_layers=[1,6,17,23]"], None)
    kls = df[df.metric == "kl"]
    assert len(kls) == 12 * 4 * 2
    for _, r in kls.iterrows():
        assert abs(r.value - ref["causal"][r.site][str(r.layer)]["per_cell"][r.cell]) <= 1e-4, (r.cell, r.site, r.layer)
    names = {"cos_xy_sum": "cos_xy_sum", "cos_x_y": "cos_x_y", "inter_ratio": "inter_over_xy"}
    geo = df[df.intervention == "decomposition"]
    for (metric, site, layer), g in geo.groupby(["metric", "site", "layer"]):
        want = ref["decomposition"][site][str(layer)][names[metric]]
        assert abs(g.value.median() - want["median"]) <= 1e-4, (metric, site, layer)
        assert abs(g.value.min() - want["min"]) <= 1e-4 and abs(g.value.max() - want["max"]) <= 1e-4


@pytest.mark.parametrize(
    "name,host,rule,layers",
    [
        ("remove_x", "XY", "remove_x", [13]),
        ("host_oracle", "BY", "oracle", [13]),
        ("host_additive", "BY", "additive", [13]),
        ("host_additive", "BY", "additive", [9, 11, 13]),  # multi-layer: all hooks at once
        ("host_none", "BY", None, []),
        ("bare", "bare", None, []),
    ],
)
def test_each_intervention_equals_plain_implementation(qwen, name, host, rule, layers):
    ov = ["site=p_last", f"intervention={name}", "layer=13"]
    if len(layers) > 1:
        ov.append(f"intervention.layers=[{','.join(map(str, layers))}]")
    cells = CELLS[:2]
    spec, df = _rows(qwen, ov, cells)
    book = PromptBook(qwen.tokenizer, spec.grid)
    grid_cells = {c.key: c for c in spec.grid.cells()}
    kls = df[df.metric == "kl"]
    assert set(kls.intervention) == {name}
    for key in cells:
        want, *_ = _naive_cell(qwen, book, grid_cells[key], "p_last", layers, host=host, rule=rule or "additive")
        got = kls[kls.cell == key]
        assert len(got) == 1
        assert abs(got.value.item() - want) <= 1e-4, (name, key, got.value.item(), want)
        assert got.layers.item() == ",".join(map(str, layers))


def test_batched_capture_equals_single_prompt_on_embedded(qwen):
    spec = build_spec(compose(["tracker=none"]))
    book = PromptBook(qwen.tokenizer, spec.grid)
    prompts = [book.get(c, "XY") for c in spec.grid.cells()[:4]]
    assert len({len(p.ids) for p in prompts}) > 1  # the batch really is padded
    batched = run_rows(qwen, [Row(list(p.ids)) for p in prompts], capture=True)
    for p, t in zip(prompts, batched, strict=True):
        single = run_rows(qwen, [Row(list(p.ids))], capture=True)[0]
        torch.testing.assert_close(t.hidden, single.hidden, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            hs = qwen.model(torch.tensor([p.ids]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(t.hidden[10], hs[10][0], atol=1e-4, rtol=1e-4)
