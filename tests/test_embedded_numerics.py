"""lac on the embedded Qwen2.5-Coder-0.5B against the plain one-prompt implementation and the paper's scripts.

The naive side (lac.naive) renders its own prompts and places its own sites and
windows; only the loaded model is shared. lac against naive runs on the same
machine and must agree to KL_RTOL/KL_ATOL; against the paper scripts' JSON
(made on another CPU) to REF_KL_RTOL/REF_KL_ATOL (see tests/conftest.py).
tests/test_mutations.py runs `compare_kls` on broken lac paths and shows it fails.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lac import naive, sites
from lac.config import build_spec
from lac.engine import Row, run_rows
from lac.naive import Naive, cell_prompts, render
from lac.prompts import PromptBook
from lac.runner import compute_cells
from tests.conftest import (
    DATA,
    KL_ATOL,
    KL_RTOL,
    REF_KL_ATOL,
    REF_KL_RTOL,
    assert_geometry_close,
    assert_kl_close,
    compose,
    ref_geometry_atol,
)

slow = pytest.mark.slow  # runs the embedded model

CTX = {"model": "qwen0.5", "model_id": "embedded", "grid": "short"}
SITES = ("p_user_last", "p_last", "g1", "g2")
CELLS = ["buffett__policy", "yoda__haiku", "angelou__recommend"]
GEOMETRY = {"cos_xy_sum": "cos_xy_sum", "cos_x_y": "cos_x_y", "inter_ratio": "inter_over_xy"}  # lac -> JSON


def reference(version: int) -> dict:
    return json.loads((DATA / f"embedded-qwen0.5-v{version}.json").read_text())


# --------------------------------------------------------------------------- the two sides


def lac_rows(qwen, overrides, cells=None):
    """lac's rows for `cells` (keys; None: the whole grid), the way a job computes them."""
    spec = build_spec(compose(["tracker=none", *overrides]))
    grid_cells = [c for c in spec.grid.cells() if cells is None or c.key in cells]
    rows, _ = compute_cells(qwen, spec, grid_cells, book=PromptBook(qwen.tokenizer, spec.grid),
                            cache=None, max_rows=64, batch_cells=12, ctx=CTX)
    return spec, pd.DataFrame(rows)


def lac_kls(df: pd.DataFrame, name: str) -> dict[tuple[str, str, str], float]:
    """(cell, site, layers) -> KL of intervention `name` in lac's rows."""
    kls = df[(df.metric == "kl") & (df.intervention == name)]
    return {(r.cell, r.site, r.layers): float(r.value) for r in kls.itertuples()}


def naive_prompts(tokenizer, grid, cell):
    """The cell's prompts rendered by lac.naive from the grid's texts (never lac's PromptBook)."""
    return cell_prompts(tokenizer, grid.personas[cell.persona], grid.tasks[cell.task],
                        grid.baseline_persona, grid.baseline_task)


_NAIVE: dict[tuple, tuple[dict, dict]] = {}


def naive_values(qwen, grid_name: str, cells, sites, layer_sets, name: str = "additive"):
    """Naive KLs {(cell, site, layers): kl} and geometry {(cell, site, layer, metric): v}, computed
    once per process (tests/test_mutations.py compares broken lac paths with the same numbers)."""
    key = (id(qwen.model), grid_name, tuple(cells), tuple(sites), tuple(map(tuple, layer_sets)), name)
    if key not in _NAIVE:
        grid = build_spec(compose(["tracker=none", f"grid={grid_name}"])).grid
        by_key = {c.key: c for c in grid.cells()}
        kls, geo = {}, {}
        for cell in cells:
            nv = Naive(qwen.model, qwen.tokenizer)
            prompts = naive_prompts(qwen.tokenizer, grid, by_key[cell])
            for site in sites:
                for layers in layer_sets:
                    kls[(cell, site, ",".join(map(str, layers)))] = nv.intervention_kl(prompts, name, site, layers)
                    if len(layers) == 1:
                        for metric, v in nv.geometry(prompts, site, layers[0]).items():
                            geo[(cell, site, layers[0], metric)] = v
        _NAIVE[key] = (kls, geo)
    return _NAIVE[key]


def compare_kls(got: dict, want: dict, *, rtol: float = KL_RTOL, atol: float = KL_ATOL) -> None:
    """The numerics comparison: the same (cell, site, layers) keys, every KL within tolerance."""
    assert set(got) == set(want), f"lac rows {sorted(set(got) ^ set(want))} on one side only"
    for k in sorted(want):
        assert_kl_close(got[k], want[k], k, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- lac == naive


@pytest.mark.parametrize("p_len,p_user_last", [(30, 24), (47, 41), (12, 3)])
def test_naive_sites_and_windows_agree_with_lac(p_len, p_user_last):
    """Site positions and KL windows written twice (lac.sites, lac.naive) agree, without a model."""
    for site in SITES:
        assert naive.site_index(site, p_len, p_user_last) == sites.site_position(site, p_len, p_user_last)
        assert naive.WINDOW_FROM[site] == sites.window_start(site)
        assert p_len - 1 + naive.WINDOW_FROM[site] == sites.window_first_position(site, p_len)
    assert (naive.WINDOW, naive.REF_TOKENS) == (sites.WINDOW, sites.REF_TOKENS)
    assert set(naive.INTERVENTIONS) >= {"clean", "additive", "remove_x", "host_none", "host_oracle",
                                        "host_additive", "bare"}


@slow
def test_prompts_render_as_naive_renders_them(qwen):
    """lac's PromptBook and lac.naive's own rendering give the same ids and p_user_last, every grid."""
    n = 0
    for grid_name in ("short", "long", "markers"):
        grid = build_spec(compose(["tracker=none", f"grid={grid_name}"])).grid
        book = PromptBook(qwen.tokenizer, grid)
        for cell in grid.cells():
            for role, want in naive_prompts(qwen.tokenizer, grid, cell).items():
                got = book.get(cell, role)
                assert list(got.ids) == want.ids, (grid_name, cell.key, role)
                assert got.p_user_last == want.p_user_last, (grid_name, cell.key, role)
                n += 1
    assert n == 5 * (12 + 48 + 24)
    p = render(qwen.tokenizer, "Yoda", "Write a haiku.")
    text = qwen.tokenizer.decode(p.ids)
    assert "As Yoda, Write a haiku.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert qwen.tokenizer.decode(p.ids[p.p_user_last]) == "\n"  # the user turn ends "<|im_end|>\n"
    assert qwen.tokenizer.decode(p.ids[p.p_user_last - 1]) == "<|im_end|>"


@slow
def test_kl_and_geometry_equal_plain_implementation(qwen):
    _, df = lac_rows(qwen, ["site=all", "layer=[6,13]", "geometry_layers=[6,13]"], CELLS)
    want_kl, want_geo = naive_values(qwen, "short", CELLS, SITES, [(6,), (13,)])
    compare_kls(lac_kls(df, "additive"), want_kl)
    assert len(want_kl) == 3 * 4 * 2
    assert sum(v < 1e-4 for v in want_kl.values()) >= 3  # small KLs are among those compared
    geo = df[df.intervention == "decomposition"]
    assert len(geo) == len(want_geo)
    for r in geo.itertuples():
        assert_geometry_close(r.value, want_geo[(r.cell, r.site, r.layer, r.metric)], (r.cell, r.site, r.layer, r.metric))


@slow
@pytest.mark.parametrize(
    "name,layers",
    [
        ("remove_x", [13]),
        ("host_oracle", [13]),
        ("host_additive", [13]),
        ("host_additive", [9, 11, 13]),  # multi-layer: all hooks at once
        ("host_none", []),
        ("bare", []),
    ],
)
def test_each_intervention_equals_plain_implementation(qwen, name, layers):
    ov = ["site=p_last", "site.sites=[p_last,g1]", f"intervention={name}", "layer=13"]
    if len(layers) > 1:
        ov.append(f"intervention.layers=[{','.join(map(str, layers))}]")
    cells = CELLS[:2]
    _, df = lac_rows(qwen, ov, cells)
    got = lac_kls(df, name)
    assert set(df[df.metric == "kl"].intervention) == {name}
    want, _ = naive_values(qwen, "short", cells, ("p_last", "g1"), [tuple(layers)], name)
    compare_kls(got, want)


@slow
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


# --------------------------------------------------------------------------- the paper's scripts


def _check_against_script(df: pd.DataFrame, ref: dict, n_kl: int) -> None:
    kls = df[df.metric == "kl"]
    assert len(kls) == n_kl
    for r in kls.itertuples():
        want = ref["causal"][r.site][str(r.layer)]["per_cell"][r.cell]
        assert_kl_close(r.value, want, (r.cell, r.site, r.layer), rtol=REF_KL_RTOL, atol=REF_KL_ATOL)
    geo = df[df.intervention == "decomposition"]
    assert len(geo)
    for (metric, site, layer), g in geo.groupby(["metric", "site", "layer"]):
        want = ref["decomposition"][site][str(layer)][GEOMETRY[metric]]
        v = g.value.to_numpy(float)
        p25, med, p75 = np.percentile(v, [25, 50, 75])
        for stat, got, w in (("median", med, want["median"]), ("p25", p25, want["iqr"][0]), ("p75", p75, want["iqr"][1]),
                             ("min", v.min(), want["min"]), ("max", v.max(), want["max"])):
            assert_geometry_close(got, w, (metric, site, layer, stat), atol=ref_geometry_atol(int(layer)))


@slow
def test_reproduces_the_papers_script_on_the_embedded_model(qwen):
    """embedded-qwen0.5-v15.json: the paper's own section-4 script, run unchanged on this model."""
    _, df = lac_rows(qwen, ["site=all", "layer=[6,17]", "geometry_layers=[1,6,17,23]"])
    _check_against_script(df, reference(15), 12 * 4 * 2)


@slow
def test_naive_reproduces_the_papers_script(qwen):
    """The independent side itself against the script's numbers (KL and per-cell geometry inputs)."""
    ref = reference(15)
    want_kl, _ = naive_values(qwen, "short", CELLS, SITES, [(6,), (13,)])
    for (cell, site, layers), v in want_kl.items():
        assert_kl_close(v, ref["causal"][site][layers]["per_cell"][cell], (cell, site, layers),
                        rtol=REF_KL_RTOL, atol=REF_KL_ATOL)


@slow
def test_reproduces_the_papers_long_grid_script(qwen):
    """embedded-qwen0.5-v16.json: the paper's long-grid script (48 cells, layers 6, 13, 17, transition)."""
    ref = reference(16)
    _, df = lac_rows(qwen, ["grid=long", "site=transition", "layer=[6,13,17]", "geometry_layers=[6,13,17]"])
    _check_against_script(df, ref, 48 * 3 * 3)
