"""lac.report on designs beyond "As X, Y": dose-response figures, swap table, interaction share.

Model-free: every results set is synthetic, so each median / IQR / rate is checked against numpy
computed here from the same values. Layers 2 and 10 are used throughout: as text "10" < "2", so
a table or legend in text order would fail the order checks.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lac
from lac import report
from lac.report import designs
from lac.report._common import fmt, fmt_iqr
from lac.schema import COLUMNS, SCHEMA_VERSION

MODEL, MODEL_ID = "qwen0.5", "embedded:qwen2.5-coder-0.5b-instruct@sha256:abc"
PERSONAS = ["buffett", "marx", "yoda", "angelou"]
TASKS = ["policy", "haiku", "recommend"]
CELLS = [(p, t) for p in PERSONAS for t in TASKS]  # 12
LAYERS = ("10", "2")  # deliberately out of numeric order
ALPHAS = (4.0, 0.0, 1.0, 0.5, 2.0)  # deliberately out of order
K3 = "persona_task_format"
SUBSETS = ("persona+task", "persona+format", "task+format", "persona+task+format")
PAIRS = ("persona+task", "persona+format", "task+format")


# --------------------------------------------------------------------------- builders


def rows(grid: str, site: str, layers: str, intervention: str, metric: str, values, *,
         factor: str = "", alpha: float = math.nan, partner: str = "", cells=CELLS) -> list[dict]:
    """One row per cell, values in cell order."""
    values = list(values)
    assert len(values) == len(cells)
    return [
        {"model": MODEL, "model_id": MODEL_ID, "grid": grid, "cell": f"{p}__{t}", "persona": p, "task": t,
         "site": site, "layer": int(layers.split(",")[-1]) if layers else -1, "layers": layers,
         "intervention": intervention, "metric": metric, "value": float(v), "factor": factor,
         "alpha": float(alpha), "partner": partner, "schema": SCHEMA_VERSION}
        for (p, t), v in zip(cells, values, strict=True)
    ]


def frame(rs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rs, columns=list(COLUMNS)).astype(COLUMNS)


def values(*key) -> np.ndarray:
    """12 reproducible positive values per key."""
    seed = zlib.crc32(repr(tuple(str(k) for k in key)).encode())
    return np.random.default_rng(seed).lognormal(np.log(0.1), 0.8, len(CELLS))


def hits(n: int) -> np.ndarray:
    """0/1 marker_any over the 12 cells, n of them 1 (spread, not first-n)."""
    v = np.zeros(len(CELLS))
    v[np.random.default_rng(n).permutation(len(CELLS))[:n]] = 1.0
    return v


def marked(layers: str, alpha: float) -> int:
    """Cells with a marker under steer at this dose: rises with alpha, differs by layer."""
    return int(2 * alpha) + (1 if layers == "2" else 3)


def steer_frame(markers: bool = True) -> pd.DataFrame:
    """steer at layers 2 and 10 over five doses (alpha = 1 is clean: KL 0), steer_host over three,
    and, with `markers`, steer's marker_any (`marked(L, alpha)` of 12 cells)."""
    rs: list[dict] = []
    for L in LAYERS:
        for a in ALPHAS:
            v = np.zeros(len(CELLS)) if a == 1.0 else values("steer", L, a)
            rs += rows("short", "p_last", L, "steer", "kl", v, factor="persona", alpha=a)
            if markers:
                rs += rows("short", "p_last", L, "steer", "marker_any", hits(marked(L, a)),
                           factor="persona", alpha=a)
        for a in (0.0, 1.0, 2.0):
            rs += rows("short", "p_last", L, "steer_host", "kl", values("host", L, a), factor="persona", alpha=a)
    return frame(rs)


def swap_frame(markers: bool = True) -> pd.DataFrame:
    """swap at p_last, layers 2 and 10: KL to XY and to X'Y; with `markers`, marker_any of X (3 of
    12 cells) and of X' (9 of 12) at layer 10."""
    rs: list[dict] = []
    for L in LAYERS:
        rs += rows("short", "p_last", L, "swap", "kl", values("swap", L), factor="persona")
        rs += rows("short", "p_last", L, "swap", "kl_partner", values("partner", L) / 10, factor="persona")
    if markers:
        rs += rows("short", "p_last", "10", "swap", "marker_any", hits(3), factor="persona")
        rs += rows("short", "p_last", "10", "swap", "marker_any_partner", hits(9), factor="persona")
    return frame(rs)


def k3_frame() -> pd.DataFrame:
    """Decomposition rows of a 3-factor grid at p_last, layers 2 and 10."""
    rs: list[dict] = []
    for L in LAYERS:
        rs += rows(K3, "p_last", L, "decomposition", "cos_all_sum", 1 - values("all", L) / 10)
        rs += rows(K3, "p_last", L, "decomposition", "inter_ratio", values("ratio", L))
        for s in SUBSETS:
            rs += rows(K3, "p_last", L, "decomposition", "inter_share", values("share", L, s), factor=s)
        for s in PAIRS:
            rs += rows(K3, "p_last", L, "decomposition", "cos_pair", values("pair", L, s) - 0.1, factor=s)
    return frame(rs)


def paper_frame() -> pd.DataFrame:
    """The paper's experiment only: additive and clean KL, 2x2 geometry, markers of clean/additive."""
    rs: list[dict] = []
    for L in LAYERS:
        rs += rows("short", "p_last", L, "additive", "kl", values("additive", L))
        for m in ("cos_xy_sum", "cos_x_y", "inter_ratio"):
            rs += rows("short", "p_last", L, "decomposition", m, values(m, L) / 10)
    rs += rows("short", "p_last", "", "clean", "kl", np.zeros(len(CELLS)))
    rs += rows("markers", "p_last", "", "clean", "marker_any", hits(7))
    rs += rows("markers", "p_last", "14", "additive", "marker_any", hits(4))
    return frame(rs)


def write_job(d: Path, df: pd.DataFrame, schema: int = SCHEMA_VERSION) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / "results.parquet", index=False)
    body = {"lac_version": lac.__version__, "schema": schema, "config": {}, "summary": {}}
    (d / "summary.json").write_text(json.dumps(body))
    return d


def quartiles(v) -> tuple[float, float, float]:
    p25, med, p75 = np.percentile(np.asarray(v, dtype=float), [25, 50, 75])
    return float(med), float(p25), float(p75)


# --------------------------------------------------------------------------- dose-response


def test_dose_summary_medians_rates_and_numeric_order():
    df = steer_frame()
    s = designs.dose_summary(df)
    kl = s[(s.intervention == "steer") & (s.metric == "kl")]
    assert len(kl) == len(LAYERS) * len(ALPHAS)
    for r in kl.itertuples(index=False):
        v = values("steer", r.layers, r.alpha) if r.alpha != 1.0 else np.zeros(12)
        med, p25, p75 = quartiles(v)
        assert (r.median, r.p25, r.p75, r.n) == (pytest.approx(med, rel=1e-12), pytest.approx(p25, rel=1e-12),
                                                 pytest.approx(p75, rel=1e-12), 12)
    # layers as numbers, then alphas ascending
    assert list(zip(kl.layers, kl.alpha, strict=True)) == [(L, a) for L in ("2", "10") for a in sorted(ALPHAS)]
    clean = kl[kl.alpha == 1.0]
    assert (clean["median"] == 0).all() and (clean["p75"] == 0).all()
    marks = s[(s.intervention == "steer") & (s.metric == "marker_any")]
    for r in marks.itertuples(index=False):
        assert r.rate == pytest.approx(marked(r.layers, r.alpha) / 12)
    assert kl["rate"].isna().all()
    host = s[s.intervention == "steer_host"]
    assert set(host.metric) == {"kl"} and sorted(set(host.alpha)) == [0.0, 1.0, 2.0]


def test_dose_figure_one_line_per_layer_with_band_and_alpha_marks():
    fig = designs.dose_response_figure(steer_frame(), MODEL, MODEL_ID, "short", "p_last", "steer", "persona")
    kl_ax, marker_ax = fig.axes
    lines = [ln for ln in kl_ax.get_lines() if ln.get_label().startswith("layer")]
    assert [ln.get_label() for ln in lines] == ["layer 2", "layer 10"]
    np.testing.assert_allclose(lines[0].get_xdata(), sorted(ALPHAS))
    want = [quartiles(values("steer", "2", a))[0] if a != 1.0 else 0.0 for a in sorted(ALPHAS)]
    np.testing.assert_allclose(lines[0].get_ydata(), want, rtol=1e-12)
    assert len(kl_ax.collections) == 2  # one IQR band per layer
    legend = [t.get_text() for t in kl_ax.get_legend().get_texts()]
    assert "α = 1: clean (nothing changed)" in legend
    assert "α = 0: persona removed (= remove_persona)" in legend
    vlines = sorted(float(ln.get_xdata()[0]) for ln in kl_ax.get_lines() if ln.get_label().startswith("α"))
    assert vlines == [0.0, 1.0]
    rate = [ln for ln in marker_ax.get_lines() if ln.get_label() == "layer 10"][0]
    np.testing.assert_allclose(rate.get_ydata(), [marked("10", a) / 12 for a in sorted(ALPHAS)])
    assert "marker_any rate" in marker_ax.get_ylabel()
    assert "steer: h_all + (α − 1)·D_persona" in fig.get_suptitle()

    host = designs.dose_response_figure(steer_frame(), MODEL, MODEL_ID, "short", "p_last", "steer_host", "persona")
    assert len(host.axes) == 1  # no marker rows for steer_host: no second panel
    assert "steer_host" in host.get_suptitle()
    assert "α = 0: persona removed (= host_none)" in [t.get_text() for t in host.axes[0].get_legend().get_texts()]
    no_markers = designs.dose_response_figure(steer_frame(markers=False), MODEL, MODEL_ID, "short", "p_last",
                                              "steer", "persona")
    assert len(no_markers.axes) == 1


def test_dose_figures_separate_steer_and_steer_host():
    names = [name for name, _, _ in designs.dose_response_figures(steer_frame())]
    assert names == ["dose_steer_persona_qwen0.5_short_p_last", "dose_steer_host_persona_qwen0.5_short_p_last"]
    assert designs.dose_response_figures(paper_frame()) == []


# --------------------------------------------------------------------------- swap


def test_swap_summary_medians_and_marker_rates():
    s = designs.swap_summary(swap_frame())
    assert s["layers"].tolist() == ["2", "10"]
    for r in s.itertuples(index=False):
        assert r.cells == 12
        assert (r.kl_median, r.kl_p25, r.kl_p75) == pytest.approx(quartiles(values("swap", r.layers)), rel=1e-12)
        assert (r.kl_partner_median, r.kl_partner_p25, r.kl_partner_p75) == pytest.approx(
            quartiles(values("partner", r.layers) / 10), rel=1e-12)
    at10 = s[s.layers == "10"].iloc[0]
    assert at10.marker_any_rate == pytest.approx(3 / 12) and at10.marker_any_partner_rate == pytest.approx(9 / 12)
    assert (at10.marker_any_hits, at10.marker_any_partner_hits, at10.marker_cells) == (3, 9, 12)
    at2 = s[s.layers == "2"].iloc[0]
    assert math.isnan(at2.marker_any_rate) and at2.marker_any_hits is pd.NA and at2.marker_cells == 0


def test_swap_table_columns_and_cells():
    (t,) = designs.swap_tables(swap_frame())
    assert t.title == f"Swap (persona), {MODEL}, grid `short`"
    assert t.key == "swap_persona_qwen0_5_short"  # W&B table name: no dots
    assert list(t.frame.columns) == ["site", "layers", "cells", "KL to XY", "KL to X'Y", "markers of X", "markers of X'"]
    assert t.frame["layers"].tolist() == ["2", "10"]
    row10 = t.frame[t.frame.layers == "10"].iloc[0]
    assert row10["KL to XY"] == fmt_iqr(*quartiles(values("swap", "10")))
    assert row10["KL to X'Y"] == fmt_iqr(*quartiles(values("partner", "10") / 10))
    assert (row10["markers of X"], row10["markers of X'"]) == ("0.25 (3/12)", "0.75 (9/12)")
    assert t.frame[t.frame.layers == "2"].iloc[0]["markers of X"] == "–"
    (plain,) = designs.swap_tables(swap_frame(markers=False))
    assert "markers of X" not in plain.frame.columns


def test_swap_jobs_of_other_factors_or_partner_rules_are_never_pooled():
    """swap on the persona (rule next), on the persona (rule same) and on the task: the main KL tables,
    the coverage and the designs section keep three conditions, each with its own cells' median; the
    report's duplicate check sees no row measured twice (the rule is part of a row)."""
    from lac.report.loading import drop_duplicate_rows
    from lac.report.tables import build_tables

    jobs = {("persona", "next"): 1.0, ("persona", "same"): 0.0, ("task", "next"): 100.0}
    df = frame([r for (f, p), v in jobs.items() for m in ("kl", "kl_partner")
                for r in rows("short", "p_last", "6", "swap", m, [v] * len(CELLS), factor=f, partner=p)])
    kept, n_dup, n_differ = drop_duplicate_rows(df)
    assert (len(kept), n_dup, n_differ) == (len(df), 0, 0)
    rep = build_tables(df, depths={})
    tables = {t.title: t for _, ts in rep.sections for t in ts}
    for label, v in (("swap", 1.0), ("swap(partner=same)", 0.0), ("swap[task]", 100.0)):
        kl = tables[f"Causal KL, {label}, grid `short`"].frame
        assert kl["L6"].tolist() == [fmt_iqr(v, v, v)]
    assert sorted(tables["Present combos (cells per layer)"].frame["intervention"]) == [
        "swap", "swap(partner=same)", "swap[task]"]
    for title, v in ((f"Swap (persona), {MODEL}, grid `short`", 1.0),
                     (f"Swap (persona, partner=same), {MODEL}, grid `short`", 0.0),
                     (f"Swap (task), {MODEL}, grid `short`", 100.0)):
        assert tables[title].frame["KL to XY"].tolist() == [fmt_iqr(v, v, v)]


# --------------------------------------------------------------------------- k-factor grids


def test_interaction_table_columns_medians_and_layer_order():
    (t,) = designs.interaction_tables(k3_frame())
    assert t.title == f"Interaction share by layer, {MODEL}, grid `{K3}`, p_last"
    assert list(t.frame.columns) == [
        "layer", "cells", "inter_ratio", "cos_all_sum",
        "persona+task", "persona+format", "task+format", "persona+task+format",
        "cos(D_persona, D_task)", "cos(D_persona, D_format)", "cos(D_task, D_format)",
    ]
    assert t.frame["layer"].tolist() == ["2", "10"] and set(t.frame["cells"]) == {"12"}
    r = t.frame[t.frame.layer == "10"].iloc[0]
    assert r["inter_ratio"] == fmt(float(np.median(values("ratio", "10"))))
    assert r["cos_all_sum"] == fmt(float(np.median(1 - values("all", "10") / 10)))
    assert r["persona+task+format"] == fmt(float(np.median(values("share", "10", "persona+task+format"))))
    assert r["cos(D_task, D_format)"] == fmt(float(np.median(values("pair", "10", "task+format") - 0.1)))


def test_interaction_summary_iqr_and_two_factor_grids_get_none():
    s = designs.interaction_summary(k3_frame())
    r = s[(s.layer == 2) & (s.metric == "inter_share") & (s.factor == "persona+format")].iloc[0]
    assert r["column"] == "persona+format"
    assert (r["median"], r["p25"], r["p75"]) == pytest.approx(quartiles(values("share", "2", "persona+format")))
    assert designs.interaction_summary(paper_frame()).empty
    assert designs.interaction_tables(paper_frame()) == []


# --------------------------------------------------------------------------- the paper's tables


def test_doses_stay_out_of_the_paper_tables():
    """One steer row per dose: the paper's KL and marker tables would pool doses into one median."""
    df = pd.concat([paper_frame(), steer_frame(), swap_frame()], ignore_index=True)
    rep = report.build_tables(df)
    titles = [t.title for t in rep.tables()]
    assert "Causal KL, additive, grid `short`" in titles
    assert not any("steer" in t for t in titles if not t.startswith(("Swap", "Interaction")))
    sections = [name for name, _ in rep.sections]
    assert sections[-1] == designs.DESIGNS_SECTION
    assert [t.title for t in dict(rep.sections)[designs.DESIGNS_SECTION]] == [f"Swap (persona), {MODEL}, grid `short`"]
    assert "steer" not in set(report.marker_summary(designs.without_doses(df))["intervention"])
    assert designs.DESIGNS_SECTION not in [n for n, _ in report.build_tables(paper_frame()).sections]


# --------------------------------------------------------------------------- CLI


def test_cli_writes_design_figures_tables_and_csvs(tmp_path: Path, capsys):
    root = tmp_path / "res"
    write_job(root / "steer", steer_frame())
    write_job(root / "swap", swap_frame())
    write_job(root / "k3", k3_frame())
    # a schema-1 job of the paper's experiment beside them: no factor / alpha columns
    write_job(root / "old", paper_frame().drop(columns=["factor", "alpha"]).assign(schema=1), schema=1)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out

    for name in ("dose_steer_persona_qwen0.5_short_p_last", "dose_steer_host_persona_qwen0.5_short_p_last"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
        assert f"figures/{name}.png" in stdout
    md = (out / "tables.md").read_text()
    section = md[md.index(f"## {designs.DESIGNS_SECTION}"):]
    assert "### Swap (persona), qwen0.5, grid `short`" in section
    assert "| site | layers | cells | KL to XY | KL to X'Y | markers of X | markers of X' |" in section
    assert f"### Interaction share by layer, qwen0.5, grid `{K3}`, p_last" in section
    assert "](figures/dose_steer_persona_qwen0.5_short_p_last.png)" in section
    assert "α = 1" in section and "α = 0" in section
    assert "Causal KL, steer" not in md

    dose = pd.read_csv(out / "dose_response.csv")
    r = dose[(dose.intervention == "steer") & (dose.metric == "kl") & (dose.layers == 2) & (dose.alpha == 4.0)]
    assert r["median"].iloc[0] == pytest.approx(quartiles(values("steer", "2", 4.0))[0], rel=1e-9)
    swap = pd.read_csv(out / "swap.csv")
    assert swap["layers"].tolist() == [2, 10] and swap["kl_partner_median"].notna().all()
    inter = pd.read_csv(out / "interaction_share.csv")
    assert set(inter["column"]) >= {"persona+task+format", "cos(D_persona, D_task)", "inter_ratio"}
    assert inter["layer"].drop_duplicates().tolist() == [2, 10]
    for f in ("dose_response.csv", "swap.csv", "interaction_share.csv"):
        assert f in stdout
    written = json.loads((out / "report.json").read_text())["written"]
    assert {"csv_dose_response", "csv_swap", "csv_interaction"} <= set(written)
    assert "figure_dose_steer_persona_qwen0.5_short_p_last" in written


def test_cli_without_design_rows_writes_none_of_them(tmp_path: Path, capsys):
    write_job(tmp_path / "res" / "0", paper_frame())
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "res"), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert (out / "tables.md").exists() and (out / "figures" / "kl_by_layer.png").exists()
    assert not list(out.glob("*.csv"))
    assert not list((out / "figures").glob("dose_*"))
    md = (out / "tables.md").read_text()
    assert designs.DESIGNS_SECTION not in md and "Swap" not in md and "Interaction share" not in md
    assert ".csv" not in stdout and "dose_" not in stdout
    written = json.loads((out / "report.json").read_text())["written"]
    assert not [k for k in written if k.startswith("csv_") or "dose" in k]
