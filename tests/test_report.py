"""lac.report on synthetic job dirs: numbers, published side by side, figures, CLI, W&B offline.

Fast and model-free: every results set is built here from known values, so each
median / IQR can be checked against numpy directly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lac
from lac import report
from lac.schema import COLUMNS, READABLE_SCHEMAS, SCHEMA_VERSION

GEMMA = "google/gemma-2-2b-it"
QWEN15 = "Qwen/Qwen2.5-1.5B-Instruct"
QWEN3 = "Qwen/Qwen2.5-3B-Instruct"
OTHER = "embedded:qwen2.5-coder-0.5b-instruct@sha256:abc"
PERSONAS = ["buffett", "marx", "yoda", "angelou"]
TASKS = ["policy", "haiku", "recommend"]


# --------------------------------------------------------------------------- builders


def rows(
    model: str,
    model_id: str,
    grid: str,
    site: str,
    layers: str,
    intervention: str,
    metric: str,
    values,
    personas=PERSONAS,
    tasks=TASKS,
) -> list[dict]:
    """One tidy row per cell, cells in persona-major order, values in that order."""
    cells = [(p, t) for p in personas for t in tasks]
    values = list(values)
    assert len(values) == len(cells)
    layer = int(layers.split(",")[-1]) if layers else -1
    return [
        {
            "model": model,
            "model_id": model_id,
            "grid": grid,
            "cell": f"{p}__{t}",
            "persona": p,
            "task": t,
            "site": site,
            "layer": layer,
            "layers": layers,
            "intervention": intervention,
            "metric": metric,
            "value": float(v),
            "schema": SCHEMA_VERSION,
        }
        for (p, t), v in zip(cells, values, strict=True)
    ]


def frame(rs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rs, columns=list(COLUMNS)).astype(COLUMNS)


def write_job(d: Path, df: pd.DataFrame, summary: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / "results.parquet", index=False)
    body = {"lac_version": lac.__version__, "schema": SCHEMA_VERSION, "config": {}, "summary": {}}
    body.update(summary or {})
    (d / "summary.json").write_text(json.dumps(body))
    (d / ".hydra").mkdir(exist_ok=True)
    (d / ".hydra" / "config.yaml").write_text("{}\n")
    return d


def kl_values(seed: int, n: int = 12, scale: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(scale), 0.8, n)


def sweep_frame(model: str, model_id: str, grid: str, layers=(6, 10, 14), seed: int = 0):
    """Additive + remove_x KL and geometry at p_last, g1, g2 over `layers`."""
    rs: list[dict] = []
    k = seed
    for site in ("p_last", "g1", "g2"):
        for L in layers:
            k += 1
            rs += rows(model, model_id, grid, site, str(L), "additive", "kl", kl_values(k))
            rs += rows(model, model_id, grid, site, str(L), "remove_x", "kl", kl_values(k + 100))
            for j, m in enumerate(("cos_xy_sum", "cos_x_y", "inter_ratio")):
                v = np.random.default_rng(k * 10 + j).uniform(0, 1, 12)
                rs += rows(model, model_id, grid, site, str(L), "decomposition", m, v)
        rs += rows(model, model_id, grid, site, "", "clean", "kl", np.zeros(12))
        rs += rows(model, model_id, grid, site, "", "bare", "kl", kl_values(k + 200, scale=3))
    return frame(rs)


def cell_of(t: report.Table, model: str, site: str, col: str) -> str:
    f = t.frame
    sel = f[(f["model"] == model) & (f["site"] == site)]
    assert len(sel) == 1, (model, site, f)
    return str(sel.iloc[0][col])


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    """multirun/DATE/TIME/{0,1,2}: two finished jobs (two grids) and one unfinished."""
    sweep = tmp_path / "results" / "multirun" / "2026-01-02" / "03-04-05"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")
    write_job(sweep / "0", sweep_frame("qwen0.5", OTHER, "short"))
    write_job(sweep / "1", sweep_frame("qwen0.5", OTHER, "long", layers=(6, 13, 17), seed=50))
    (sweep / "2" / "parts").mkdir(parents=True)
    (sweep / "2" / "parts" / "part-0000.parquet").write_bytes(b"")
    return tmp_path / "results"


# --------------------------------------------------------------------------- numbers


def test_kl_summary_equals_numpy_percentiles():
    df = sweep_frame("qwen0.5", OTHER, "short")
    s = report.kl_summary(df)
    checked = 0
    for (grid, site, iv, L), g in df[df.metric == "kl"].groupby(
        ["grid", "site", "intervention", "layer"]
    ):
        p25, med, p75 = np.percentile(g["value"].to_numpy(), [25, 50, 75])
        r = s[(s.grid == grid) & (s.site == site) & (s.intervention == iv) & (s.layer == L)]
        assert len(r) == 1
        assert r.iloc[0]["median"] == pytest.approx(med, rel=1e-12, abs=0)
        assert r.iloc[0]["p25"] == pytest.approx(p25, rel=1e-12, abs=0)
        assert r.iloc[0]["p75"] == pytest.approx(p75, rel=1e-12, abs=0)
        assert r.iloc[0]["n"] == 12
        checked += 1
    assert checked == 3 * 3 * 2 + 3 * 2  # (site x layer x {additive, remove_x}) + clean/bare


def test_kl_table_cells_show_median_and_iqr():
    df = sweep_frame("qwen0.5", OTHER, "short")
    t = report.kl_layer_table(
        report.kl_summary(df), "short", "additive", report.load_paper_tables()
    )
    v = df[(df.site == "g1") & (df.layer == 10) & (df.intervention == "additive")]["value"]
    p25, med, p75 = np.percentile(v.to_numpy(), [25, 50, 75])
    assert cell_of(t, "qwen0.5", "g1", "L10") == f"{med:.3g} [{p25:.3g}, {p75:.3g}]"
    assert list(t.frame.columns) == ["model", "site", "L6", "L10", "L14"]
    assert [str(x) for x in t.frame["site"]] == ["p_last", "g1", "g2"]
    assert t.notes == [f"no published values for {OTHER}"]
    # the markdown carries exactly that string
    md = report.to_markdown(t.frame)
    assert "| qwen0.5 | g1 | " in md and f"{med:.3g} [{p25:.3g}, {p75:.3g}]" in md


def test_percentiles_use_linear_interpolation():
    assert report.percentiles([1.0, 2.0, 3.0, 10.0]) == (2.5, 1.75, 4.75)
    med, p25, p75 = report.percentiles([1.0, float("nan"), 3.0])
    assert (med, p25, p75) == (2.0, 1.5, 2.5)


def test_mixed_grids_are_never_pooled():
    short = frame(rows("m", OTHER, "short", "p_last", "14", "additive", "kl", np.arange(12) + 1.0))
    long = frame(rows("m", OTHER, "long", "p_last", "14", "additive", "kl", np.arange(12) + 100.0))
    df = pd.concat([short, long], ignore_index=True)
    rep = report.build_tables(df)
    titles = [t.title for t in rep.tables() if t.key.startswith("kl_additive_")]
    assert titles == ["Causal KL, additive, grid `short`", "Causal KL, additive, grid `long`"]
    by_key = {t.key: t for t in rep.tables()}
    assert cell_of(by_key["kl_additive_short"], "m", "p_last", "L14") == "6.5 [3.75, 9.25]"
    assert cell_of(by_key["kl_additive_long"], "m", "p_last", "L14") == "106 [103, 108]"
    pooled = np.percentile(np.r_[np.arange(12) + 1.0, np.arange(12) + 100.0], 50)
    md = report.render_markdown(rep)
    assert f"{pooled:.3g} [" not in md
    assert "## Grid `short`" in md and "## Grid `long`" in md


def test_geometry_table_medians_and_published():
    df = sweep_frame("gemma", GEMMA, "short", layers=(6, 10, 14))
    gsum = report.geometry_summary(df)
    t = report.geometry_table(gsum, "short", "cos_xy_sum", report.load_paper_tables())
    v = df[(df.metric == "cos_xy_sum") & (df.site == "g2") & (df.layer == 14)]["value"]
    assert cell_of(t, "gemma", "g2", "L14") == f"{np.percentile(v.to_numpy(), 50):.3g}"
    # published: geometry_medians.gemma.short_L14_cos_xy_sum
    assert cell_of(t, "gemma", "p_last", "L14 paper") == "0.874"
    assert cell_of(t, "gemma", "g1", "L14 paper") == "0.935"
    assert "L6 paper" not in t.frame.columns
    # no short-grid cos_x_y was published
    t2 = report.geometry_table(gsum, "short", "cos_x_y", report.load_paper_tables())
    assert not [c for c in t2.frame.columns if c.endswith("paper")]


# --------------------------------------------------------------------------- published side by side


def _const_frame(model, model_id, grid, cells: dict[tuple[str, int], float]) -> pd.DataFrame:
    rs = []
    for (site, L), v in cells.items():
        rs += rows(model, model_id, grid, site, str(L), "additive", "kl", np.full(12, v))
    return frame(rs)


def test_published_kl_picks_the_paper_numbers():
    paper = report.load_paper_tables()
    assert report.published_kl(paper, GEMMA, "short", "p_last", 14) == (0.371, 0.275, 0.443)
    assert report.published_kl(paper, GEMMA, "long", "p_last", 18) == (0.518, 0.266, 1.17)
    assert report.published_kl(paper, QWEN15, "long", "g2", 20) == (0.279, 0.143, 0.481)
    assert report.published_kl(paper, QWEN15, "short", "g1", 11) == (0.050, 0.032, 0.077)
    assert report.published_kl(paper, QWEN3, "short", "g1", 9) == (0.021, 0.017, 0.035)
    assert report.published_kl(paper, QWEN3, "long", "g1", 9) is None  # no 3B long grid
    assert report.published_kl(paper, GEMMA, "short", "p_last", 14, "remove_x") is None
    assert report.published_kl(paper, OTHER, "short", "p_last", 14) is None
    assert report.published_kl(paper, GEMMA, "markers", "p_last", 14) is None


def test_side_by_side_tables_and_outside_iqr_marks():
    paper = report.load_paper_tables()
    gemma = _const_frame(
        "gemma",
        GEMMA,
        "short",
        {
            ("p_last", 14): 0.30,  # inside [0.275, 0.443]
            ("g1", 14): 0.50,  # outside [0.021, 0.124] -> *
            ("p_last", 6): 0.0005,  # inside [0.000, 0.001]
            ("g2", 10): 0.001,  # outside [0.004, 0.023] -> *
        },
    )
    qwen15 = _const_frame("qwen1.5", QWEN15, "short", {("p_last", 7): 0.022, ("p_last", 15): 0.2})
    qwen3 = _const_frame("qwen3", QWEN3, "short", {("g1", 9): 0.02, ("g1", 14): 0.01})
    other = _const_frame("tiny", OTHER, "short", {("p_last", 14): 99.0})
    df = pd.concat([gemma, qwen15, qwen3, other], ignore_index=True)
    t = report.kl_layer_table(report.kl_summary(df), "short", "additive", paper)

    assert cell_of(t, "gemma", "p_last", "L14 paper") == "0.371 [0.275, 0.443]"
    assert cell_of(t, "gemma", "g1", "L14 paper") == "0.049 [0.021, 0.124]"
    assert cell_of(t, "gemma", "p_last", "L6 paper") == "0.0004 [0, 0.001]"
    assert cell_of(t, "qwen1.5", "p_last", "L7 paper") == "0.022 [0.016, 0.028]"
    assert cell_of(t, "qwen1.5", "p_last", "L15 paper") == "0.065 [0.03, 0.136]"
    assert cell_of(t, "qwen3", "g1", "L9 paper") == "0.021 [0.017, 0.035]"
    assert cell_of(t, "qwen3", "g1", "L14 paper") == "0.045 [0.02, 0.147]"
    assert cell_of(t, "tiny", "p_last", "L14 paper") == report.DASH
    assert cell_of(t, "tiny", "p_last", "L14") == "99 [99, 99]"
    assert t.notes == [f"no published values for {OTHER}"]

    stars = {
        (str(r["model"]), str(r["site"]), c)
        for _, r in t.frame.iterrows()
        for c in t.frame.columns
        if str(r[c]).endswith("*")
    }
    assert stars == {
        ("gemma", "g1", "L14"),
        ("gemma", "g2", "L10"),
        ("qwen1.5", "p_last", "L15"),  # 0.2 > 0.136
        ("qwen3", "g1", "L14"),  # 0.01 < 0.020
    }
    assert "*" not in "".join(t.frame[[c for c in t.frame.columns if c.endswith("paper")]].stack())


def test_long_grid_uses_table2_and_other_models_get_none():
    df = pd.concat(
        [
            _const_frame("gemma", GEMMA, "long", {("p_last", 14): 0.1}),
            _const_frame("tiny", OTHER, "long", {("p_last", 14): 0.1}),
        ],
        ignore_index=True,
    )
    t = report.kl_layer_table(report.kl_summary(df), "long", "additive", report.load_paper_tables())
    assert cell_of(t, "gemma", "p_last", "L14 paper") == "0.229 [0.157, 0.386]"
    assert cell_of(t, "gemma", "p_last", "L14") == "0.1 [0.1, 0.1]*"
    assert cell_of(t, "tiny", "p_last", "L14") == "0.1 [0.1, 0.1]"
    only_other = report.kl_layer_table(
        report.kl_summary(_const_frame("tiny", OTHER, "short", {("p_last", 14): 0.3})),
        "short",
        "additive",
        report.load_paper_tables(),
    )
    assert list(only_other.frame.columns) == ["model", "site", "L14"]
    assert only_other.notes == [f"no published values for {OTHER}"]


def _marker_frame(model: str, model_id: str) -> pd.DataFrame:
    personas = [
        "engineer",
        "counselor",
        "founder",
        "teacher",
        "journalist",
        "doctor",
        "lawyer",
        "chef",
    ]
    tasks = ["arch", "plan", "proposal"]
    n = 24
    hits = {
        "clean": [1] * 16 + [0] * 8,
        "additive": [1] * 14 + [0] * 10,
        "remove_x": [0] * 9 + [1] * 15,
        "bare": [0] * 23 + [1],
    }
    rs = []
    for iv, h in hits.items():
        site, layers = ("p_last", "14") if iv in ("additive", "remove_x") else ("p_last", "")
        distinct = np.array(h) * np.arange(1, n + 1) % 3
        rs += rows(model, model_id, "markers", site, layers, iv, "marker_any", h, personas, tasks)
        rs += rows(
            model,
            model_id,
            "markers",
            site,
            layers,
            iv,
            "marker_distinct",
            distinct,
            personas,
            tasks,
        )
    return frame(rs)


def test_marker_tables_and_per_persona_counts():
    paper = report.load_paper_tables()
    df = pd.concat(
        [_marker_frame("gemma", GEMMA), _marker_frame("qwen1.5", QWEN15)], ignore_index=True
    )
    msum = report.marker_summary(df)
    t = report.marker_table(msum, "gemma", GEMMA, "markers", paper)
    f = t.frame.set_index("condition")
    assert list(f.index) == ["clean", "additive [p_last L14]", "remove_x [p_last L14]", "bare"]
    assert f.loc["clean", "any rate"] == f"{16 / 24:.3g}"
    assert f.loc["clean", "any cells"] == "16" and f.loc["clean", "cells"] == "24"
    assert f.loc["remove_x [p_last L14]", "any cells"] == "15"
    d = df[
        (df.model == "gemma") & (df.intervention == "additive") & (df.metric == "marker_distinct")
    ]
    assert f.loc["additive [p_last L14]", "distinct mean"] == f"{d['value'].mean():.3g}"
    assert f.loc["clean", "any rate paper"] == "0.667"
    assert f.loc["additive [p_last L14]", "any cells paper"] == "14"
    assert f.loc["remove_x [p_last L14]", "distinct mean paper"] == "0.96"
    assert f.loc["bare", "any rate paper"] == "0.042"

    q = report.marker_table(msum, "qwen1.5", QWEN15, "markers", paper)
    assert not [c for c in q.frame.columns if c.endswith("paper")]
    assert q.notes == [f"no published values for {QWEN15}"]

    counts = report.persona_marker_counts(df, "gemma", GEMMA, "markers").set_index("persona")
    # clean: first 16 cells (personas engineer..chef, 3 tasks each) -> 5 personas x3 + teacher? no:
    # cells persona-major: engineer 0-2, counselor 3-5, founder 6-8, teacher 9-11, journalist 12-14,
    # doctor 15-17 ...; 16 hits -> 3,3,3,3,3,1,0,0
    assert counts["clean"].to_dict() == {
        "chef": 0, "counselor": 3, "doctor": 1, "engineer": 3,
        "founder": 3, "journalist": 3, "lawyer": 0, "teacher": 3,
    }  # fmt: skip
    assert counts["bare"].sum() == 1 and counts.loc["chef", "bare"] == 1
    assert counts["remove_x [p_last L14]"].sum() == 15


def _host_frame(model: str, model_id: str) -> pd.DataFrame:
    personas = ["engineer", "counselor", "founder", "teacher"]
    tasks = ["arch", "plan", "proposal"]
    spec = {
        ("host_none", ""): 3.0,
        ("host_oracle", "14"): 2.6,
        ("host_additive", "14"): 2.8,
        ("host_additive", "10,12,14"): 2.9,
        ("host_additive", "6,8,10,12,14,16,18,20,22"): 3.1,
    }
    rs = []
    for (iv, layers), base in spec.items():
        v = base + np.linspace(-0.5, 0.5, 12)
        rs += rows(model, model_id, "markers", "p_last", layers, iv, "kl", v, personas, tasks)
    return frame(rs)


def test_host_table_lists_layer_sets_separately_with_published():
    paper = report.load_paper_tables()
    df = pd.concat([_host_frame("gemma", GEMMA), _host_frame("tiny", OTHER)], ignore_index=True)
    s = report.layer_set_summary(report.kl_summary(df), host=True)
    t = report.host_table(s, "gemma", GEMMA, "markers", paper, "Host injection")
    f = t.frame.set_index("intervention")
    assert list(f.index) == [
        "host_none",
        "host_oracle [14]",
        "host_additive [14]",
        "host_additive [10,12,14]",
        "host_additive [6,8,10,12,14,16,18,20,22]",
    ]
    v = 2.9 + np.linspace(-0.5, 0.5, 12)
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    assert f.loc["host_additive [10,12,14]", "KL"] == f"{med:.3g} [{p25:.3g}, {p75:.3g}]"
    assert f.loc["host_none", "KL paper (median)"] == "3.05"
    assert f.loc["host_oracle [14]", "KL paper (median)"] == "2.64"
    assert f.loc["host_additive [14]", "KL paper (median)"] == "2.84"
    assert f.loc["host_additive [10,12,14]", "KL paper (median)"] == "2.81"
    assert f.loc["host_additive [6,8,10,12,14,16,18,20,22]", "KL paper (median)"] == "3.01"
    o = report.host_table(s, "tiny", OTHER, "markers", paper, "Host injection")
    assert "KL paper (median)" not in o.frame.columns
    assert o.notes == [f"no published values for {OTHER}"]


# --------------------------------------------------------------------------- figures


def _model_lines(ax) -> dict[str, object]:
    """The per-model median lines of a panel (not the band, the paper's markers or KL = 0.1)."""
    return {
        ln.get_label(): ln
        for ln in ax.get_lines()
        if ln.get_linestyle() == "-" and not ln.get_label().startswith("_")
    }


def test_kl_by_layer_figure_overlays_models_per_site():
    """One panel per (grid, site), one line per model on x = layer / depth, one y range, the
    paper's medians as markers for its models, the dotted KL = 0.1 line named in the legend."""
    df = pd.concat(
        [
            sweep_frame("a", OTHER, "short"),
            sweep_frame("a", OTHER, "long", layers=(6, 13, 17)),
            sweep_frame("b", GEMMA, "short", layers=(6, 10, 14), seed=7),
        ],
        ignore_index=True,
    )
    depths = {("a", OTHER): 24, ("b", GEMMA): 26}
    fig = report.kl_by_layer_figure(df, depths=depths)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"{s} · grid {g}" for g in ("short", "long") for s in ("p_last", "g1", "g2")]
    short_p_last = fig.axes[0]
    lines = _model_lines(short_p_last)
    assert sorted(lines) == ["a", "b"]  # both models in one panel
    assert sorted(_model_lines(fig.axes[3])) == ["a"]  # grid long: model a only
    np.testing.assert_allclose(lines["a"].get_xdata(), np.array([6, 10, 14]) / 24)
    np.testing.assert_allclose(lines["b"].get_xdata(), np.array([6, 10, 14]) / 26)
    s = report.kl_summary(df)
    want = s[(s.model == "b") & (s.grid == "short") & (s.site == "p_last") & (s.intervention == "additive")]
    np.testing.assert_allclose(lines["b"].get_ydata(), want.sort_values("layer")["median"].to_numpy())
    ticks = [t.get_text() for t in short_p_last.get_xticklabels()]
    assert ticks == ["0", "0.25", "0.5", "0.75", "1"] and short_p_last.get_xlabel() == "layer / model depth"
    assert all(0 <= v <= 1 for v in short_p_last.get_xticks())
    legend = [t.get_text() for t in short_p_last.get_legend().get_texts()]
    assert report.figures.THRESHOLD_LABEL in legend and "b, paper median" in legend
    assert "a, paper median" not in legend  # not one of the paper's models
    (paper,) = [ln for ln in short_p_last.get_lines() if ln.get_label() == "b, paper median"]
    pub = report.load_paper_tables()["table1_short_grid_additive_kl"][GEMMA]["p_last"]
    assert sorted(paper.get_ydata()) == sorted(float(v[0]) for v in pub.values())
    threshold = [ln for ln in short_p_last.get_lines() if ln.get_linestyle() == ":"]
    assert len(threshold) == 1 and set(threshold[0].get_ydata()) == {0.1}
    assert len({ax.get_ylim() for ax in fig.axes}) == 1  # one y range for every panel
    assert short_p_last.get_yscale() == "log"
    # the switch to absolute layers
    fig = report.kl_by_layer_figure(df, depths=depths, x="layer")
    np.testing.assert_array_equal(_model_lines(fig.axes[0])["b"].get_xdata(), [6, 10, 14])
    assert fig.axes[0].get_xlabel() == "layer"


def test_a_one_panel_figure_keeps_its_whole_title():
    """One site, two models: one panel 4.6 in wide, whose title was clipped at both edges (walk finding)."""
    df = pd.concat([sweep_frame("a", OTHER, "short"), sweep_frame("b", GEMMA, "short", seed=3)], ignore_index=True)
    df = df[df.site == "p_last"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in (report.kl_by_layer_figure(df, depths={}), report.geometry_by_layer_figure(df, depths={})):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        box = fig._suptitle.get_window_extent(canvas.get_renderer())
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)


def test_geometry_figure_overlays_models_and_names_the_metric():
    df = pd.concat(
        [sweep_frame("a", OTHER, "short"), sweep_frame("b", GEMMA, "short", seed=3)], ignore_index=True
    )
    fig = report.geometry_by_layer_figure(df, depths={("a", OTHER): 24, ("b", GEMMA): 26})
    assert len(fig.axes) == 9  # 3 metrics x 3 sites
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == [
        "median cos(ΔXY, ΔX+ΔY)", "median cos(ΔX, ΔY)", "median |Inter| / |ΔXY|"
    ]
    assert all(sorted(_model_lines(ax)) == ["a", "b"] for ax in fig.axes)
    assert report.geometry_by_layer_figure(df[df.intervention != "decomposition"]) is None


def _job_summary(model: str, model_id: str, n_layers: int) -> dict:
    return {"config": {"model": {"name": model, "id": model_id, "n_layers": n_layers}}}


def test_same_figure_from_one_multi_layer_job_and_the_equivalent_sweep(tmp_path: Path):
    """`layer=[6,10,14]` in one job per model, or `-m layer=6,10,14`: the same lines."""
    frames = {"a": sweep_frame("a", OTHER, "short"), "b": sweep_frame("b", GEMMA, "short", seed=5)}
    depth = {"a": 24, "b": 26}
    ids = {"a": OTHER, "b": GEMMA}
    for m, f in frames.items():
        write_job(tmp_path / "multi" / m, f, _job_summary(m, ids[m], depth[m]))
        for k, L in enumerate((6, 10, 14)):
            part = f[(f.layer == L) | (f.layers == "")] if k == 0 else f[f.layer == L]
            write_job(tmp_path / "sweep" / f"{m}{k}", part, _job_summary(m, ids[m], depth[m]))
    figs = {}
    for name in ("multi", "sweep"):
        jobs = report.find_job_dirs([tmp_path / name]).jobs
        df = report.load_results(jobs)
        depths = report.model_depths(jobs, df)
        assert depths == {("a", OTHER): 24, ("b", GEMMA): 26}
        figs[name] = [report.kl_by_layer_figure(df, depths), report.geometry_by_layer_figure(df, depths)]
    for f_multi, f_sweep in zip(figs["multi"], figs["sweep"], strict=True):
        assert len(f_multi.axes) == len(f_sweep.axes)
        for a, b in zip(f_multi.axes, f_sweep.axes, strict=True):
            la, lb = _model_lines(a), _model_lines(b)
            assert sorted(la) == sorted(lb) == ["a", "b"]
            for m in la:
                np.testing.assert_array_equal(la[m].get_xydata(), lb[m].get_xydata())


def test_console_legend_only_with_published_values():
    other = report.build_tables(sweep_frame("m", OTHER, "short"))
    assert "outside the published" not in report.render_short(other)
    gemma = report.build_tables(sweep_frame("g", GEMMA, "short"))
    assert "* = lac median outside the published [p25, p75]" in report.render_short(gemma)


def test_cli_writes_figures_tables_and_parquet(multirun: Path, capsys):
    import matplotlib.image as mpimg

    assert report.main([str(multirun)]) == 0
    out = multirun / "report"
    stdout = capsys.readouterr().out
    for name in ("kl_by_layer", "geometry_by_layer"):
        png = out / "figures" / f"{name}.png"
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and float(np.var(img)) > 0
        assert (out / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
        assert str(png.name) in stdout
    pooled = pd.read_parquet(out / "results.parquet")
    assert list(pooled.columns) == list(COLUMNS)
    n_expected = sum(
        len(pd.read_parquet(p)) for p in multirun.rglob("results.parquet") if p.parent != out
    )
    assert len(pooled) == n_expected
    assert set(pooled["grid"]) == {"short", "long"}
    md = (out / "tables.md").read_text()
    assert "### Causal KL, additive, grid `short`" in md
    assert "### Causal KL, remove_x, grid `long`" in md
    assert f"_no published values for {OTHER}_" in md
    assert "`*` = lac's median lies outside the published [p25, p75]" in md
    # partial sweep: the unfinished job and the combos present are reported
    assert "incomplete" in stdout and str((multirun / "multirun").resolve()) in stdout
    assert "qwen0.5 · short · additive · p_last,g1,g2: L6:12, L10:12, L14:12 cells" in stdout
    assert "qwen0.5 · long · remove_x · p_last,g1,g2: L6:12, L13:12, L17:12 cells" in stdout
    assert "1 incomplete" in stdout
    manifest = json.loads((out / "report.json").read_text())
    assert manifest["kind"] == "lac-report" and len(manifest["job_dirs"]) == 2
    assert len(manifest["incomplete"]) == 1 and manifest["incomplete"][0].endswith("/2")
    assert not list(out.rglob("*.tmp"))

    # a second run over the same root must not read the first report back
    assert report.main([str(multirun)]) == 0
    assert len(pd.read_parquet(out / "results.parquet")) == n_expected


def test_coverage_shows_what_a_partial_sweep_lacks():
    df = sweep_frame("m", OTHER, "short")
    gone = (df.site == "g2") & (df.layer == 14) & df.cell.str.startswith("yoda")
    cov = report.coverage_compact(df[~gone])
    add = cov[cov.intervention == "additive"].set_index("sites")["layer:cells"].to_dict()
    assert add == {"p_last,g1": "L6:12, L10:12, L14:12", "g2": "L6:12, L10:12, L14:9"}
    clean = cov[cov.intervention == "clean"]
    assert clean["sites"].tolist() == ["p_last,g1,g2"]
    assert clean["layer:cells"].tolist() == ["no vector:12"]


def test_cli_out_option_and_duplicate_rows(tmp_path: Path, capsys):
    df = sweep_frame("m", OTHER, "short")
    write_job(tmp_path / "a" / "0", df)
    write_job(tmp_path / "b" / "0", df)  # the same sweep run twice
    out = tmp_path / "elsewhere"
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{len(df)} duplicated row(s) with equal values" in said and "with different values" not in said
    assert len(pd.read_parquet(out / "results.parquet")) == len(df)
    assert not (tmp_path / "a" / "report").exists()

    changed = df.assign(value=df.value.where(df.metric != "kl", df.value + 1.0))  # re-measured KLs differ
    write_job(tmp_path / "c" / "0", changed)
    assert report.main([str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    n_kl = int((df.metric == "kl").sum())
    assert f"warning: {n_kl} duplicated row(s) with different values" in said
    assert f"{len(df) - n_kl} duplicated row(s) with equal values" in said
    kept = pd.read_parquet(out / "results.parquet")
    assert len(kept) == len(df) and kept[kept.metric == "kl"].value.sum() == pytest.approx(changed[changed.metric == "kl"].value.sum())
    assert "intervention.partner" not in said  # no swap rows: that cause is not named

    swap = frame([dict(r, factor="persona", partner="next")
                  for r in rows("m", OTHER, "short", "p_last", "10", "swap", "kl", kl_values(7))])
    write_job(tmp_path / "s1" / "0", swap)
    write_job(tmp_path / "s2" / "0", swap.assign(value=swap.value * 2, partner="same"))  # another partner rule
    assert report.main([str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "rs")]) == 0
    said = capsys.readouterr().out
    assert "duplicated" not in said  # schema 3 rows record the rule: two conditions, nothing dropped
    assert len(pd.read_parquet(tmp_path / "rs" / "results.parquet")) == 2 * len(swap)
    old = swap.drop(columns="partner").assign(schema=2)  # written before lac recorded the rule
    write_job(tmp_path / "o1" / "0", old, {"schema": 2})
    write_job(tmp_path / "o2" / "0", old.assign(value=old.value * 2), {"schema": 2})
    assert report.main([str(tmp_path / "o1"), str(tmp_path / "o2"), "--out", str(tmp_path / "ro")]) == 0
    assert "swap jobs with different intervention.partner rules written before lac recorded the rule" in (
        capsys.readouterr().out)


def test_report_out_never_overwrites_a_job_and_leaves_nothing_stale(tmp_path: Path, capsys):
    job = write_job(tmp_path / "a" / "0", sweep_frame("m", OTHER, "short"))
    before = (job / "results.parquet").read_bytes()
    assert report.main([str(tmp_path / "a"), "--out", str(job)]) == 2
    assert "is a job's folder (it holds its results); a report there would overwrite them" in capsys.readouterr().err
    assert (job / "results.parquet").read_bytes() == before and not (job / "report.json").exists()
    (tmp_path / "afile").write_text("x")
    assert report.main([str(tmp_path / "a"), "--out", str(tmp_path / "afile")]) == 2
    assert "--out " + str(tmp_path / "afile") + " is a file" in capsys.readouterr().err

    out = tmp_path / "rep"
    assert report.main([str(tmp_path / "a"), "--out", str(out)]) == 0
    (out / "dose_response.csv").write_text("from an earlier report of steer jobs")
    (out / "figures" / "dose_steer_old.png").write_bytes(b"png")
    (out / "wandb").mkdir()
    (out / "wandb" / "offline-run-1").write_text("an earlier --wandb run: kept")
    assert report.main([str(tmp_path / "a"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert not (out / "dose_response.csv").exists() and not (out / "figures" / "dose_steer_old.png").exists()
    assert (out / "wandb" / "offline-run-1").is_file() and (out / "figures" / "kl_by_layer.png").is_file()
    manifest = json.loads((out / "report.json").read_text())
    assert manifest["kind"] == "lac-report" and "complete" not in manifest and manifest["written"]["tables"]
    assert report.main([str(tmp_path / "a")]) == 0 and (tmp_path / "a" / "report" / "tables.md").is_file()
    assert report.main([str(tmp_path / "a")]) == 0  # its own default folder again: a previous report, replaced
    assert "1 job dir(s)" in capsys.readouterr().out  # neither report folder is read as a job


def test_an_interrupted_multirun_job_and_a_model_without_depth_are_named(tmp_path: Path, capsys):
    sweep = tmp_path / "multirun" / "2026-01-02" / "03-04-05"
    write_job(sweep / "0", sweep_frame("m", OTHER, "short"), _job_summary("m", OTHER, 24))
    write_job(sweep / "1", sweep_frame("mine", "/my/model", "short", seed=7))  # summary without n_layers
    killed = sweep / "2" / ".hydra"  # Hydra's dir of a job killed before its results were written
    killed.mkdir(parents=True)
    (killed / "overrides.yaml").write_text("- model=qwen0.5\n- layer=6\n")
    assert report.main([str(tmp_path / "multirun"), "--out", str(tmp_path / "rep")]) == 0
    said = capsys.readouterr().out
    assert "2 job dir(s)" in said and "1 incomplete" in said
    assert f"incomplete: {(sweep / '2').resolve()} (job model=qwen0.5 layer=6: no results: interrupted or failed" in said
    assert "warning: no depth (n_layers) known for mine (/my/model): the figures use absolute layers" in said
    assert "model=qwen0.5 layer=6" in (tmp_path / "rep" / "tables.md").read_text()
    assert report.main([str(tmp_path / "multirun"), "--out", str(tmp_path / "rep2"), "--x", "layer"]) == 0
    assert "no depth" not in capsys.readouterr().out


# --------------------------------------------------------------------------- refusals


def test_no_results_exit_2_lists_searched_paths(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    unfinished = tmp_path / "unfinished" / "0"
    (unfinished / "parts").mkdir(parents=True)
    ghost = tmp_path / "ghost"
    assert report.main([str(empty), str(tmp_path / "unfinished"), str(ghost)]) == 2
    err = capsys.readouterr().err
    assert "no results found" in err
    assert str(empty) in err and str(tmp_path / "unfinished") in err
    assert f"{ghost}  (does not exist)" in err
    assert f"incomplete: {unfinished.resolve()} (parts/ without results.parquet: interrupted" in err
    assert not (empty / "report").exists()


def test_wrong_schema_is_refused_naming_the_version(tmp_path: Path, capsys):
    df = sweep_frame("m", OTHER, "short")
    write_job(tmp_path / "ok" / "0", df)
    write_job(tmp_path / "new" / "0", df.assign(schema=SCHEMA_VERSION + 1), {"lac_version": "9.9"})
    assert report.main([str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert f"schema {SCHEMA_VERSION + 1}" in err
    assert f"reads schemas {READABLE_SCHEMAS} only" in err
    assert "lac 9.9" in err and "refused" in err
    assert not (tmp_path / "report" / "results.parquet").exists()


def test_missing_schema_column_is_refused(tmp_path: Path):
    d = tmp_path / "old"
    write_job(d, sweep_frame("m", OTHER, "short").drop(columns="schema"))
    (d / "summary.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(report.SchemaError, match="no 'schema' column"):
        report.load_results([d])
    assert report.main([str(tmp_path)]) == 3


def test_summary_schema_mismatch_is_refused(tmp_path: Path):
    d = write_job(tmp_path / "j", sweep_frame("m", OTHER, "short"), {"schema": 7})
    with pytest.raises(report.SchemaError, match=r"schema 7.*reads schemas \(1, 2, 3\) only"):
        report.load_results([d])


# --------------------------------------------------------------------------- unreadable files


def spoil(f: Path, how: str) -> Path:
    """Make a results.parquet unreadable the way a crash, a full disk or a bad copy does."""
    if how == "garbage":
        f.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty":
        f.write_bytes(b"")
    return f


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_unreadable_results_file_is_skipped_with_a_warning(tmp_path: Path, capsys, how: str):
    root = tmp_path / "results"
    good = sweep_frame("m", OTHER, "short")
    write_job(root / "0", good)
    write_job(root / "1", sweep_frame("m", OTHER, "long", layers=(6, 13, 17), seed=50))
    bad = spoil(
        write_job(root / "2", sweep_frame("m", OTHER, "short", seed=9)) / "results.parquet", how
    )
    long_rows = len(pd.read_parquet(root / "1" / "results.parquet"))

    assert report.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipped unreadable results file {bad.resolve()}" in err
    assert "2 job dir(s)" in out and "1 unreadable results file(s) skipped" in out
    pooled = pd.read_parquet(root / "report" / "results.parquet")
    assert len(pooled) == len(good) + long_rows  # the good jobs, all of them, nothing else
    assert set(pooled["grid"]) == {"short", "long"}
    manifest = json.loads((root / "report" / "report.json").read_text())
    assert manifest["unreadable"] == [str(bad.resolve())]
    assert sorted(Path(d).name for d in manifest["job_dirs"]) == ["0", "1"]
    assert f"Skipped (unreadable): `{bad.resolve()}`" in (root / "report" / "tables.md").read_text()

    # the library call warns with the path too, and still returns the good rows
    with pytest.warns(report.UnreadableResultsWarning, match=re.escape(str(bad))):
        df = report.load_results([root / "0", root / "2", root / "1"])
    assert len(df) == len(good) + long_rows


def test_no_readable_results_file_is_a_clear_error(tmp_path: Path, capsys):
    bad = [
        spoil(
            write_job(tmp_path / str(k), sweep_frame("m", OTHER, "short")) / "results.parquet", how
        )
        for k, how in enumerate(["garbage", "truncated", "empty"])
    ]
    assert report.main([str(tmp_path)]) == report.EXIT_NO_RESULTS
    err = capsys.readouterr().err
    assert "no readable results: none of the 3 results file(s) found is readable" in err
    for f in bad:
        assert f"skipped unreadable results file {f.resolve()}" in err
    assert not (tmp_path / "report").exists()
    with (
        pytest.raises(report.NoReadableResults) as e,
        pytest.warns(report.UnreadableResultsWarning),
    ):
        report.load_results([f.parent for f in bad])
    assert [f for f, _ in e.value.unreadable] == bad


def test_readable_file_with_a_wrong_schema_is_still_refused_beside_an_unreadable_one(
    tmp_path: Path, capsys
):
    """Unreadable means not parquet at all; a file that reads but means something else is
    refused (exit 3) as before, whatever else is skipped."""
    df = sweep_frame("m", OTHER, "short")
    write_job(tmp_path / "ok" / "0", df)
    spoil(write_job(tmp_path / "bad" / "0", df) / "results.parquet", "truncated")
    write_job(tmp_path / "new" / "0", df.assign(schema=SCHEMA_VERSION + 1))
    assert report.main([str(tmp_path)]) == report.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "skipped unreadable results file" in err and "refused" in err
    assert not (tmp_path / "report" / "results.parquet").exists()


def test_report_never_imports_torch_or_transformers():
    code = (
        "import sys, lac.report\n"
        "bad = [m for m in ('torch', 'transformers', 'wandb') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- controls and mechanism

DEPTH = 8  # the controls frames' model depth: from-L sets are L..7
ATTN = ("attn_persona", "attn_persona_max", "attn_persona_window", "attn_persona_window_max")


def from_set(L: int, n: int = DEPTH) -> str:
    return ",".join(map(str, range(L, n)))


def controls_frame(model: str = "m", model_id: str = OTHER, grid: str = "long", site: str = "p_last",
                   layers=(0, 2, 4, 6), attention: bool = True) -> pd.DataFrame:
    """The controls sweep of one model at one site: host_none / host_none_lm (no layer), host_oracle,
    host_oracle_norm, host_oracle_lm, host_oracle_span (single layers), kv_persona / knockout_persona
    "from L" sets (layers L..DEPTH-1, `layer` the deepest), and attention rows at every layer.
    Cell values 0..11 (+ offsets), so the percentiles are easy to compute by hand."""
    base = np.arange(12.0)  # median 5.5, p25 2.75, p75 8.25 (numpy linear)
    m = (model, model_id, grid, site)
    rs = rows(*m, "", "host_none", "kl", base + 10) + rows(*m, "", "host_none_lm", "kl", base + 9)
    for L in layers:
        rs += rows(*m, str(L), "host_oracle", "kl", base + 8)
        rs += rows(*m, str(L), "host_oracle_norm", "kl", base + 7)
        rs += rows(*m, str(L), "host_oracle_lm", "kl", base + 6)
        rs += rows(*m, str(L), "host_oracle_span", "kl", base * (DEPTH - L) / DEPTH)
        rs += rows(*m, from_set(L), "kv_persona", "kl", base * L / 100)
        rs += rows(*m, from_set(L), "knockout_persona", "kl", base * (DEPTH - L) / 10)
    if attention:
        for L in range(DEPTH):
            for j, metric in enumerate(ATTN):
                rs += rows(*m, str(L), "attention", metric, (base + 1) / 100 * (j + 1) + (L == 3) * 0.3)
    return frame(rs)


def test_controls_table_hand_computed_percentiles_and_from_labels():
    df = controls_frame()
    rep = report.build_tables(df, depths={("m", OTHER): DEPTH})
    sections = dict(rep.sections)
    (t,) = [t for t in sections["Controls and mechanism"] if t.title.startswith("Controls")]
    assert t.title == "Controls, m, grid `long`" and list(t.frame.columns) == [
        "site", "intervention", "layer", "cells", "KL"]
    f = t.frame.set_index(["intervention", "layer"])["KL"]
    # 0..11: median 5.5, p25 2.75, p75 8.25; + 10: 15.5 [12.8, 18.2] (3 significant digits)
    assert f[("host_none", report.DASH)] == "15.5 [12.8, 18.2]"
    assert f[("host_none_lm", report.DASH)] == "14.5 [11.8, 17.2]"
    assert f[("host_oracle_lm", "L4")] == "11.5 [8.75, 14.2]"
    assert f[("host_oracle_span", "L4")] == "2.75 [1.38, 4.12]"  # x (8-4)/8
    assert f[("kv_persona", "from 4")] == "0.22 [0.11, 0.33]"  # x 4/100
    assert f[("kv_persona", "from 0")] == "0 [0, 0]"
    assert f[("knockout_persona", "from 2")] == "3.3 [1.65, 4.95]"  # x (8-2)/10
    # rows: references first, then the controls, each by layer; from-L sets labelled by their first layer
    order = list(dict.fromkeys(t.frame["intervention"]))
    assert order == ["host_none", "host_none_lm", "host_oracle", "host_oracle_norm", "host_oracle_lm",
                     "host_oracle_span", "kv_persona", "knockout_persona"]
    assert list(t.frame[t.frame.intervention == "kv_persona"]["layer"]) == ["from 0", "from 2", "from 4", "from 6"]
    assert set(t.frame["cells"]) == {"12"}
    # the same labels without depths (a run of consecutive layers is a from-L set)
    t2 = report.controls_tables(df)[0]
    assert list(t2.frame[t2.frame.intervention == "knockout_persona"]["layer"]) == [
        "from 0", "from 2", "from 4", "from 6"]
    # the controls are not repeated in the paper's tables
    titles = [tt.title for tt in rep.tables()]
    assert not any("kv_persona" in x or "host_oracle_lm" in x for x in titles)
    host = [tt for tt in rep.tables() if tt.title.startswith("Host injection")]
    assert all(not tt.frame["intervention"].str.contains("_lm|_span|_norm").any() for tt in host)
    assert not any(x.startswith("Multi-layer injection") for x in titles)
    # attention table: median [p25, p75] per site x layer
    (a,) = [t for t in sections["Controls and mechanism"] if t.title.startswith("Attention")]
    assert list(a.frame.columns) == ["site", "layer", *ATTN]
    f = a.frame.set_index("layer")
    assert f.loc["0", "attn_persona"] == "0.065 [0.0375, 0.0925]"  # (1..12) / 100
    assert f.loc["0", "attn_persona_max"] == "0.13 [0.075, 0.185]"  # x 2
    assert list(f.index) == [str(L) for L in range(DEPTH)]
    # markdown: the section, one sentence per curve present
    md = report.render_markdown(rep)
    assert "## Controls and mechanism" in md and "| p_last | kv_persona | from 4 | 12 | 0.22 [0.11, 0.33] |" in md
    assert "If the paper's explanation holds" in md
    for curve in ("host_oracle_lm", "host_oracle_span", "kv_persona (from L)", "knockout_persona (from L)",
                  "host_none (BY host, nothing written)", "host_none_lm (LY host, nothing written)",
                  "clean XY (KL = 0)", "attn_persona", "attn_persona_window"):
        assert f"- **{curve}** " in md, curve
    assert "kv_persona (at L)" not in md  # no single-layer kv rows: no sentence for them
    # no controls, no attention: no section
    plain = report.build_tables(sweep_frame("m", OTHER, "short"))
    assert "Controls and mechanism" not in dict(plain.sections)
    assert "Controls and mechanism" not in report.render_markdown(plain)


def test_controls_table_single_last_layer_joins_the_from_curve():
    """A one-layer kv_persona at L = n-1 is the same change as "from n-1": labelled and drawn so."""
    df = pd.concat([controls_frame(attention=False),
                    frame(rows("m", OTHER, "long", "p_last", str(DEPTH - 1), "kv_persona", "kl", np.arange(12.0)))],
                   ignore_index=True)
    s = report.controls_summary(df, {("m", OTHER): DEPTH})
    kv = s[s.intervention == "kv_persona"]
    assert list(kv["label"]) == ["from 0", "from 2", "from 4", "from 6", f"from {DEPTH - 1}"]
    assert list(kv["x"]) == [0, 2, 4, 6, DEPTH - 1]


def _labelled(ax) -> dict[str, object]:
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def test_mechanism_figure_curves_references_from_x_and_attention_panel():
    df = controls_frame()
    fig = report.mechanism_figure(df, "m", OTHER, "long", "p_last", depth=DEPTH)
    assert len(fig.axes) == 2
    kl_ax, att_ax = fig.axes
    lines = _labelled(kl_ax)
    curves = ["host_oracle_lm", "host_oracle_span", "kv_persona (from L)", "knockout_persona (from L)",
              "host_oracle (BY host)", "host_oracle_norm (BY host)"]
    refs = ["host_none (BY host, nothing written)", "host_none_lm (LY host, nothing written)", "clean XY (KL = 0)"]
    assert sorted(lines) == sorted(curves + refs) and len(kl_ax.get_lines()) == len(curves) + len(refs)
    # from-L sets at x = their FIRST layer (the rows' `layer` is the deepest, DEPTH - 1)
    np.testing.assert_array_equal(lines["kv_persona (from L)"].get_xdata(), [0, 2, 4, 6])
    np.testing.assert_array_equal(lines["knockout_persona (from L)"].get_xdata(), [0, 2, 4, 6])
    np.testing.assert_allclose(lines["kv_persona (from L)"].get_ydata(), 5.5 * np.array([0, 2, 4, 6]) / 100)
    np.testing.assert_array_equal(lines["host_oracle_span"].get_xdata(), [0, 2, 4, 6])
    np.testing.assert_allclose(lines["host_oracle_lm"].get_ydata(), [11.5] * 4)
    # horizontal references: host_none / host_none_lm medians, clean at 0, spanning the axes
    for label, y in zip(refs, (15.5, 14.5, 0.0), strict=True):
        ln = lines[label]
        assert set(ln.get_ydata()) == {y} and list(ln.get_xdata()) == [0, 1], label
    assert kl_ax.get_yscale() == "symlog" and kl_ax.get_xlabel() == "layer L"
    legend = [t.get_text() for t in kl_ax.get_legend().get_texts()]
    assert sorted(legend) == sorted(curves + refs)
    # attention panel: the medians over cells by layer, every layer
    att = _labelled(att_ax)
    assert sorted(att) == sorted(report.mechanism.ATTENTION_CURVES[m][0] for m in ATTN)
    a = att[report.mechanism.ATTENTION_CURVES["attn_persona"][0]]
    np.testing.assert_array_equal(a.get_xdata(), range(DEPTH))
    np.testing.assert_allclose(a.get_ydata()[3], 0.065 + 0.3)
    assert att_ax.get_ylabel() == "attention mass on the persona span"
    # without attention rows the panel is there and says why it is empty
    fig = report.mechanism_figure(controls_frame(attention=False), "m", OTHER, "long", "p_last", depth=DEPTH)
    assert not fig.axes[1].get_lines() and report.mechanism.NO_ATTENTION in [t.get_text() for t in fig.axes[1].texts]
    # one figure per model x grid x site
    two = pd.concat([controls_frame(), controls_frame("n", GEMMA), controls_frame(site="g1", attention=False)],
                    ignore_index=True)
    names = [name for name, _, _ in report.mechanism_figures(two, {("m", OTHER): DEPTH})]
    assert names == ["mechanism_m_long_p_last", "mechanism_m_long_g1", "mechanism_n_long_p_last"]


def test_cli_writes_the_mechanism_figure_and_links_it(tmp_path: Path, capsys):
    write_job(tmp_path / "res" / "controls", controls_frame(), _job_summary("m", OTHER, DEPTH))
    assert report.main([str(tmp_path / "res"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    name = "mechanism_m_long_p_last"
    assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    assert (out / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
    md = (out / "tables.md").read_text()
    assert f"![m · grid `long` · p_last](figures/{name}.png)" in md
    assert md.index("### Controls, m, grid `long`") < md.index(f"figures/{name}.png") < md.index(
        "If the paper's explanation holds")
    assert f"figures/{name}.png" in capsys.readouterr().out
    assert "figure_" + name in json.loads((out / "report.json").read_text())["written"]


# --------------------------------------------------------------------------- W&B


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch) -> Path:
    """W&B confined to tmp_path and unable to reach any server."""
    wdir = tmp_path / "wandb-dir"
    wdir.mkdir()
    for k in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return wdir


def test_wandb_mode_offline_without_credentials(wandb_env: Path, monkeypatch):
    assert report.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert report.wandb_mode() is None  # respected, left to wandb


def test_wandb_group_from_tracker_or_multirun_dir(multirun: Path, tmp_path: Path):
    jobs = report.find_job_dirs([multirun]).jobs
    assert report.wandb_group(jobs) == "2026-01-02_03-04-05"
    d = write_job(
        tmp_path / "x" / "0",
        sweep_frame("m", OTHER, "short"),
        {"config": {"tracker": {"group": "paper-table1", "project": "lac"}}},
    )
    assert report.wandb_group([d, *jobs]) == "paper-table1"


def test_cli_wandb_offline_writes_a_run(multirun: Path, wandb_env: Path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert report.main([str(multirun), "--wandb"]) == 0
    runs = list(wandb_env.rglob("*.wandb"))
    assert len(runs) == 1
    assert runs[0].stat().st_size > 0
    stdout = capsys.readouterr().out
    assert "group '2026-01-02_03-04-05'" in stdout
    manifest = json.loads((multirun / "report" / "report.json").read_text())
    assert Path(manifest["written"]["wandb_run_dir"]) == runs[0].parent
    media = list(runs[0].parent.rglob("*.table.json")) + list(runs[0].parent.rglob("*.png"))
    assert any(p.suffix == ".png" for p in media) and any(
        p.name.endswith(".table.json") for p in media
    )


def test_cli_wandb_after_an_earlier_run_in_the_process_still_honours_wandb_dir(
        multirun: Path, wandb_env: Path, tmp_path: Path, monkeypatch):
    """wandb reads WANDB_DIR once per process: a notebook that ran a job's run in-process first
    (here without WANDB_DIR) must still get its report run under the WANDB_DIR it sets now."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR")
    first = tmp_path / "first"
    wandb.init(project="lac-test", dir=str(first), mode="offline", reinit="create_new").finish()
    monkeypatch.setenv("WANDB_DIR", str(wandb_env))
    monkeypatch.chdir(tmp_path)
    assert report.main([str(multirun), "--wandb"]) == 0
    assert len(list(wandb_env.rglob("*.wandb"))) == 1
    assert len(list(first.rglob("*.wandb"))) == 1 and not (tmp_path / "wandb").exists()


def test_figure_names_keep_dots_in_model_names(tmp_path):
    """qwen0.5: the stem's '.5_...' must not be taken for a file suffix."""
    import matplotlib.pyplot as plt

    from lac.report.figures import save_figure

    fig = plt.figure()
    paths = save_figure(fig, tmp_path / "mechanism_qwen0.5_long_p_last")
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mechanism_qwen0.5_long_p_last.pdf",
                                                         "mechanism_qwen0.5_long_p_last.png"]
    assert all(p.is_file() for p in paths)


def test_depth_table_lines_up_models_of_different_depth():
    """qwen0.5 (24 layers) at 6, 10, 13 and a 26-layer model at 6, 10, 14: columns 25%, 40%, 55%,
    each cell the median at that model's layer (named), equal to the per-layer table's median."""
    df = pd.concat([
        sweep_frame("qwen0.5", OTHER, "short", layers=(6, 10, 13)),
        sweep_frame("deep", "org/deep", "short", layers=(6, 10, 14, 15), seed=30),
        sweep_frame("nodepth", "org/nodepth", "short", layers=(6,), seed=60),
    ])
    ksum = report.kl_summary(df)
    depths = {("qwen0.5", OTHER): 24, ("deep", "org/deep"): 26}
    t = report.depth_table(ksum, "short", "additive", depths)
    assert t is not None
    assert list(t.frame.columns) == ["model", "site", "25%", "40%", "55%", "60%"]
    for model, L, col in (("qwen0.5", 13, "55%"), ("deep", 14, "55%"), ("deep", 10, "40%"), ("deep", 15, "60%")):
        v = df[(df.model == model) & (df.site == "g1") & (df.layer == L) & (df.metric == "kl") & (df.intervention == "additive")]
        assert cell_of(t, model, "g1", col) == f"{np.median(v['value'].to_numpy()):.3g} (L{L})"
    assert cell_of(t, "qwen0.5", "p_last", "60%") == report.DASH
    assert "nodepth" not in set(t.frame["model"]) and any("nodepth" in n for n in t.notes)
    # one model with a known depth: nothing to line up
    assert report.depth_table(ksum, "short", "additive", {("deep", "org/deep"): 26}) is None
    # two layers nearest one depth: the nearer one is shown (10/24 = .417 beats 9/24 = .375 for 40%)
    two = sweep_frame("qwen0.5", OTHER, "short", layers=(9, 10))
    t2 = report.depth_table(report.kl_summary(pd.concat([two, df[df.model == "deep"]])), "short", "additive", depths)
    assert cell_of(t2, "qwen0.5", "g1", "40%").endswith("(L10)")
    # and build_tables puts it under the per-layer table
    titles = [x.title for x in report.build_tables(df, depths=depths).tables()]
    i = titles.index("Causal KL, additive, grid `short`")
    assert titles[i + 1] == "Median causal KL by relative depth, additive, grid `short`"
    # site-major rows: the models to compare are adjacent
    assert [(str(m), str(s)) for m, s in zip(t.frame["model"], t.frame["site"], strict=True)][:2] == [
        ("deep", "p_last"), ("qwen0.5", "p_last")]


def test_interventions_on_other_factors_are_never_pooled_with_the_persona():
    """remove_x / host_none with intervention.factor=task are other experiments: their own rows and tables,
    named remove_x[task], never pooled with the persona's nor set beside the paper's remove_x."""
    from lac.results import summarize

    persona = kl_values(1, scale=0.01)
    task = kl_values(2, scale=10.0)
    df = frame(
        [dict(r, factor="persona") for r in rows("qwen0.5", OTHER, "short", "p_last", "10", "remove_x", "kl", persona)]
        + [dict(r, factor="task") for r in rows("qwen0.5", OTHER, "short", "p_last", "10", "remove_x", "kl", task)]
        + [dict(r, factor="persona") for r in rows("qwen0.5", OTHER, "short", "p_last", "", "host_none", "kl", persona)]
        + [dict(r, factor="task") for r in rows("qwen0.5", OTHER, "short", "p_last", "", "host_none", "kl", task)]
    )
    rep = report.build_tables(df)
    by_title = {t.title: t for t in rep.tables()}
    for name, v in (("remove_x", persona), ("remove_x[task]", task)):
        t = by_title[f"Causal KL, {name}, grid `short`"]
        assert cell_of(t, "qwen0.5", "p_last", "L10").startswith(f"{np.median(v):.3g} [")
    host = next(t for t in rep.tables() if t.title.startswith("Host injection"))
    shown = dict(zip(host.frame.iloc[:, 1].astype(str), host.frame.iloc[:, 3].astype(str), strict=False))
    assert shown["host_none"].startswith(f"{np.median(persona):.3g}")
    assert shown["host_none[task]"].startswith(f"{np.median(task):.3g}")
    # the job's own summary (console, summary.json, W&B keys) names the factor the same way
    s = summarize(df)
    assert {r["intervention"] for r in s["kl"]} == {"remove_x", "remove_x[task]", "host_none", "host_none[task]"}


def test_two_grids_of_one_name_are_reported_apart_and_duplicates_keep_the_newest(tmp_path: Path, capsys):
    """Two grid files both called g.yaml (and a file edited between jobs) were pooled in one median
    under grid `g`, silently (walk finding); and of a row measured twice the report kept the one of the
    job dir listed last, not the newest."""
    from lac.report.loading import grid_identity

    df = sweep_frame("m", OTHER, "g", layers=(6,))
    write_job(tmp_path / "r" / "a", df, {"grid_hash": "1111", "finished": 100.0})
    write_job(tmp_path / "r" / "b", df.assign(value=df.value * 10), {"grid_hash": "2222", "finished": 50.0})
    out = tmp_path / "rep"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    kept = pd.read_parquet(out / "results.parquet")
    names = sorted(set(kept.grid))
    assert len(names) == 2 and all(n.startswith("g@") for n in names) and len(kept) == 2 * len(df)
    assert "grid name 'g' belongs to 2 different grids (files or contents); reported apart as" in said
    assert "duplicated" not in said
    manifest = json.loads((out / "report.json").read_text())
    assert sorted(manifest["grids_renamed"]["g"]) == names
    assert "Grid name `g` belongs to 2 different grids" in (out / "tables.md").read_text()
    by_grid = kept[kept.metric == "kl"].groupby("grid").value.sum()
    assert sorted(by_grid.round(9)) == sorted([round(df[df.metric == "kl"].value.sum(), 9),
                                               round(df[df.metric == "kl"].value.sum() * 10, 9)])

    # the same grid (same hash): one grid; the row measured twice keeps the job that finished last,
    # whatever the order of the folders
    write_job(tmp_path / "s" / "a", df.assign(value=df.value * 3), {"grid_hash": "1111", "finished": 200.0})
    write_job(tmp_path / "s" / "b", df, {"grid_hash": "1111", "finished": 100.0})
    assert report.main([str(tmp_path / "s"), "--out", str(tmp_path / "rs")]) == 0
    said = capsys.readouterr().out
    assert "kept the newest (the job that finished last)" in said
    kept = pd.read_parquet(tmp_path / "rs" / "results.parquet")
    assert set(kept.grid) == {"g"} and kept.value.sum() == pytest.approx(3 * df.value.sum())
    assert json.loads((tmp_path / "rs" / "report.json").read_text())["duplicates"]["with_other_values"] == (df.value != 0).sum()

    # jobs from before lac recorded the hash: a grid file by its path; an inline grid by its content
    assert grid_identity({"config": {"grid": {"name": "g", "path": "/x/g.yaml"}}}) == ("path", "/x/g.yaml")
    inline = {"name": "short", "path": None, "baseline": {"persona": "p", "task": "t"},
              "personas": {"a": "A"}, "tasks": {"x": "X"}}
    from lac.grid import grid_from_mapping

    assert grid_identity({"config": {"grid": inline}}) == ("hash", grid_from_mapping(inline, "short").content_hash())
    assert grid_identity({"config": {}}) is None
