"""Display tables (paper tables 1-4 beside the published numbers), markdown rendering."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lac.report._common import (
    CONTROL_INTERVENTIONS,
    DASH,
    LEGEND,
    _condition_key,
    _grid_key,
    _host_key,
    _site_key,
    fmt,
    fmt_iqr,
    is_single_layer,
    label_conditions,
    layer_set_label,
    model_labels,
)
from lac.report.published import (
    load_paper_tables,
    published_geometry,
    published_host,
    published_kl,
    published_markers,
)
from lac.report.summaries import (
    coverage_compact,
    geometry_summary,
    kl_summary,
    marker_label,
    marker_summary,
    persona_marker_counts,
)
from lac.schema import GEOMETRY_METRICS

# --------------------------------------------------------------------------- display tables


@dataclass
class Table:
    """A titled markdown table with notes under it."""

    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    key: str = ""  # stable name, for W&B


def _rows_in_order(s: pd.DataFrame) -> list[tuple[str, str, str]]:
    trip = {
        (str(m), str(i), str(t))
        for m, i, t in zip(s["model"], s["model_id"], s["site"], strict=True)
    }
    return sorted(trip, key=lambda r: (r[0], r[1], _site_key(r[2])))


def kl_layer_table(
    summary: pd.DataFrame,
    grid: str,
    intervention: str,
    paper: dict[str, Any] | None = None,
    iqr: bool = True,
) -> Table:
    """Table 1/2 style: rows (model, site), columns layers, one grid, one intervention.

    With `paper`, a `Lk paper` column follows each layer that has a published
    value, and `*` marks lac medians outside the published [p25, p75].
    """
    s = summary[
        (summary["grid"] == grid)
        & (summary["intervention"] == intervention)
        & summary["layers"].map(is_single_layer)
    ]
    layers = sorted({int(x) for x in s["layer"]})
    labels = model_labels(s) if not s.empty else {}
    rows: list[dict[str, str]] = []
    with_paper: set[int] = set()
    has_published: dict[str, bool] = {}
    for model, model_id, site in _rows_in_order(s):
        g = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["site"] == site)]
        row = {"model": labels[(model, model_id)], "site": site}
        has_published.setdefault(model_id, False)
        for L in layers:
            r = g[g["layer"] == L]
            pub = published_kl(paper, model_id, grid, site, L, intervention) if paper else None
            if pub is not None:
                with_paper.add(L)
                has_published[model_id] = True
                row[f"L{L} paper"] = fmt_iqr(*pub) if iqr else fmt(pub[0])
            if r.empty:
                continue
            med, p25, p75 = (float(r.iloc[0][c]) for c in ("median", "p25", "p75"))
            mark = "*" if pub is not None and (med < pub[1] or med > pub[2]) else ""
            row[f"L{L}"] = (fmt_iqr(med, p25, p75) if iqr else fmt(med)) + mark
        rows.append(row)
    cols = ["model", "site"]
    for L in layers:
        cols += [f"L{L}"] + ([f"L{L} paper"] if L in with_paper else [])
    frame = pd.DataFrame(rows, columns=cols).fillna(DASH) if rows else pd.DataFrame(columns=cols)
    notes = [f"no published values for {m}" for m, has in has_published.items() if not has]
    if not s.empty and s["n_nan"].sum():
        notes.append(f"{int(s['n_nan'].sum())} NaN KL values left out of the medians")
    title = f"Causal KL, {intervention}, grid `{grid}`"
    return Table(title, frame, notes, key=f"kl_{intervention}_{grid}")


DEPTH_STEP = 0.05  # columns of the depth-aligned table: relative depth to 5% (the paper's layers sit at .25 .40 .55 .70 .85)


def depth_table(
    summary: pd.DataFrame, grid: str, intervention: str, depths: dict[tuple[str, str], int],
) -> Table | None:
    """Models of different depth side by side: columns are relative depths (layer / n_layers to 5%),
    each cell the median at the model's layer nearest that depth, named. None unless two or more
    models with a known depth were measured at one layer at a time."""
    s = summary[
        (summary["grid"] == grid)
        & (summary["intervention"] == intervention)
        & summary["layers"].map(is_single_layer)
    ]
    models = sorted({(str(m), str(i)) for m, i in zip(s["model"], s["model_id"], strict=True)})
    known = [m for m in models if depths.get(m)]
    if len(known) < 2:
        return None
    labels = model_labels(s)
    chosen: dict[tuple[str, str], dict[int, int]] = {}  # model -> {column: layer}
    for m in known:
        by_col: dict[int, int] = {}
        for L in sorted({int(x) for x in s.loc[(s["model"] == m[0]) & (s["model_id"] == m[1]), "layer"]}):
            frac = L / depths[m]
            col = round(frac / DEPTH_STEP)
            if col not in by_col or abs(frac - col * DEPTH_STEP) < abs(by_col[col] / depths[m] - col * DEPTH_STEP):
                by_col[col] = L
        chosen[m] = by_col
    cols = sorted({c for by_col in chosen.values() for c in by_col})
    names = {c: f"{c * DEPTH_STEP:.0%}" for c in cols}
    rows: list[dict[str, str]] = []
    by_site = sorted((r for r in _rows_in_order(s) if (r[0], r[1]) in chosen), key=lambda r: _site_key(r[2]))
    for model, model_id, site in by_site:  # site-major: the models to compare sit on adjacent rows
        g = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["site"] == site)]
        row = {"model": labels[(model, model_id)], "site": site}
        for c, L in chosen[(model, model_id)].items():
            r = g[g["layer"] == L]
            if not r.empty:
                row[names[c]] = f"{fmt(float(r.iloc[0]['median']))} (L{L})"
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["model", "site", *names.values()]).fillna(DASH)
    notes = [
        "depth = layer / n_layers to 5%; each cell: the median at the model's layer nearest that depth (named); "
        "the table above has every layer",
    ]
    missing = [labels[m] for m in models if m not in known]
    if missing:
        notes.append(f"left out, depth unknown: {', '.join(missing)}")
    title = f"Median causal KL by relative depth, {intervention}, grid `{grid}`"
    return Table(title, frame, notes, key=f"kl_depth_{intervention}_{grid}")


def no_vector_table(summary: pd.DataFrame, grid: str) -> Table | None:
    """KL of interventions writing no vector (clean ceiling, bare floor), per (model, site)."""
    s = summary[
        (summary["grid"] == grid)
        & (summary["layers"] == "")
        & ~summary["intervention"].str.startswith("host_")
    ]
    if s.empty:
        return None
    ivs = sorted(set(s["intervention"]), key=_condition_key)
    labels = model_labels(s)
    rows = []
    for model, model_id, site in _rows_in_order(s):
        g = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["site"] == site)]
        row = {"model": labels[(model, model_id)], "site": site}
        for iv in ivs:
            r = g[g["intervention"] == iv]
            row[iv] = (
                DASH
                if r.empty
                else fmt_iqr(*(float(r.iloc[0][c]) for c in ("median", "p25", "p75")))
            )
        rows.append(row)
    return Table(
        f"Causal KL, no vector written, grid `{grid}`",
        pd.DataFrame(rows),
        key=f"kl_novector_{grid}",
    )


def geometry_table(
    gsum: pd.DataFrame, grid: str, metric: str, paper: dict[str, Any] | None = None
) -> Table:
    """Median of one geometry metric: rows (model, site), columns layers, one grid."""
    s = gsum[(gsum["grid"] == grid) & (gsum["metric"] == metric)]
    layers = sorted({int(x) for x in s["layer"]})
    labels = model_labels(s) if not s.empty else {}
    rows = []
    with_paper: set[int] = set()
    has_published: dict[str, bool] = {}
    for model, model_id, site in _rows_in_order(s):
        g = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["site"] == site)]
        row = {"model": labels[(model, model_id)], "site": site}
        has_published.setdefault(model_id, False)
        for L in layers:
            r = g[g["layer"] == L]
            pub = published_geometry(paper, model_id, grid, site, L, metric) if paper else None
            if pub is not None:
                with_paper.add(L)
                has_published[model_id] = True
                row[f"L{L} paper"] = fmt(pub)
            if not r.empty:
                row[f"L{L}"] = fmt(float(r.iloc[0]["median"]))
        rows.append(row)
    cols = ["model", "site"]
    for L in layers:
        cols += [f"L{L}"] + ([f"L{L} paper"] if L in with_paper else [])
    frame = pd.DataFrame(rows, columns=cols).fillna(DASH) if rows else pd.DataFrame(columns=cols)
    notes = [f"no published values for {m}" for m, has in has_published.items() if not has]
    return Table(
        f"Geometry, median {metric}, grid `{grid}`", frame, notes, key=f"geometry_{metric}_{grid}"
    )


def marker_table(
    msum: pd.DataFrame, model: str, model_id: str, grid: str, paper: dict[str, Any] | None
) -> Table:
    """Table 3 style for one model x grid, with the published row next to lac's (Gemma)."""
    s = msum[(msum["model"] == model) & (msum["model_id"] == model_id) & (msum["grid"] == grid)]
    rows = []
    any_pub = False
    for r in s.itertuples(index=False):
        pub = (
            published_markers(paper, model_id, r.intervention, r.site, r.layers) if paper else None
        )
        any_pub = any_pub or pub is not None
        rows.append(
            {
                "condition": marker_label(r.intervention, r.site, r.layers),
                "any rate": fmt(r.any_rate),
                "any rate paper": fmt(pub["any_rate"]) if pub else DASH,
                "any cells": str(r.any_cells),
                "any cells paper": str(int(pub["any_cells"])) if pub else DASH,
                "cells": str(r.cells),
                "distinct mean": fmt(r.distinct_mean),
                "distinct mean paper": fmt(pub["distinct_mean"]) if pub else DASH,
            }
        )
    frame = pd.DataFrame(rows)
    notes = []
    if not any_pub:
        frame = frame.drop(columns=[c for c in frame.columns if c.endswith(" paper")])
        notes.append(f"no published values for {model_id}")
    return Table(f"Markers, {model}, grid `{grid}`", frame, notes, key=f"markers_{model}_{grid}")


def layer_set_summary(summary: pd.DataFrame, host: bool) -> pd.DataFrame:
    """KL rows of table 4 (host_* interventions) or of other multi-layer injections; the controls
    (CONTROL_INTERVENTIONS, host_*_lm included) have their own table."""
    summary = summary[~summary["intervention"].isin(CONTROL_INTERVENTIONS)]
    is_host = summary["intervention"].str.startswith("host_")
    if host:
        return summary[is_host]
    return summary[~is_host & summary["layers"].str.contains(",", regex=False)]


def host_table(
    s: pd.DataFrame, model: str, model_id: str, grid: str, paper: dict[str, Any] | None, title: str
) -> Table:
    """Table 4 style: median KL per intervention and layer set (sets listed separately)."""
    g = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["grid"] == grid)]
    g = g.assign(_k=[_host_key(i, L) for i, L in zip(g["intervention"], g["layers"], strict=True)])
    g = g.assign(_s=[_site_key(x) for x in g["site"]]).sort_values(["_s", "_k"])
    rows = []
    any_pub = False
    for r in g.itertuples(index=False):
        pub = published_host(paper, model_id, r.intervention, r.site, r.layers) if paper else None
        any_pub = any_pub or pub is not None
        rows.append(
            {
                "site": r.site,
                "intervention": layer_set_label(r.intervention, r.layers),
                "cells": str(r.n),
                "KL": fmt_iqr(r.median, r.p25, r.p75),
                "KL paper (median)": fmt(pub) if pub is not None else DASH,
            }
        )
    frame = pd.DataFrame(rows)
    notes = []
    if not any_pub:
        frame = frame.drop(columns=["KL paper (median)"])
        notes.append(f"no published values for {model_id}")
    key = re.sub(r"\W+", "_", f"{title}_{model}_{grid}").strip("_").lower()
    return Table(f"{title}, {model}, grid `{grid}`", frame, notes, key=key)


@dataclass
class Report:
    """All tables of one report, grouped the way tables.md is laid out."""

    sections: list[tuple[str, list[Table]]]
    short: list[Table]  # what is printed to the terminal
    text: dict[str, list[str]] = field(default_factory=dict)  # markdown lines after a section's tables

    def tables(self) -> list[Table]:
        return [t for _, ts in self.sections for t in ts]


CONTROLS_SECTION = "Controls and mechanism"


def build_tables(
    df: pd.DataFrame, paper: dict[str, Any] | None = None, depths: dict[tuple[str, str], int] | None = None,
) -> Report:
    """Every table, one grid at a time (medians are never pooled across grids). `depths` (n_layers per
    (model, model_id)) tells a "from L" layer set (L..n_layers-1) for the controls table; without it
    any run of consecutive layers counts as one."""
    from lac.report.designs import (
        DESIGNS_SECTION,
        design_tables,
        designs_markdown,
        has_doses,
        without_doses,
    )
    from lac.report.mechanism import attention_tables, controls_tables, mechanism_markdown

    paper = load_paper_tables() if paper is None else paper
    df = label_conditions(df)
    no_doses = without_doses(df)  # steer / steer_host: one row per dose, summarised in their own section
    ksum, gsum, msum = kl_summary(no_doses), geometry_summary(df), marker_summary(no_doses)
    sections: list[tuple[str, list[Table]]] = []
    short: list[Table] = []

    cov = Table("Present combos (cells per layer)", coverage_compact(df), key="coverage")
    sections.append(("Coverage", [cov]))

    single = ksum[
        ksum["layers"].map(is_single_layer)
        & ~ksum["intervention"].str.startswith("host_")
        & ~ksum["intervention"].isin(CONTROL_INTERVENTIONS)
    ]
    grids = sorted(set(ksum["grid"]) | set(gsum["grid"]), key=_grid_key)
    for grid in grids:
        ts: list[Table] = []
        ivs = sorted(set(single.loc[single["grid"] == grid, "intervention"]), key=_condition_key)
        for iv in ivs:
            ts.append(kl_layer_table(ksum, grid, iv, paper))
            aligned = depth_table(ksum, grid, iv, depths or {})
            if aligned is not None:
                ts.append(aligned)
            if iv == "additive":
                t = kl_layer_table(ksum, grid, iv, paper, iqr=False)
                t.title = f"Median causal KL, additive, grid `{grid}`"
                short.append(t)
        nv = no_vector_table(ksum, grid)
        if nv is not None:
            ts.append(nv)
        for metric in GEOMETRY_METRICS:
            if ((gsum["grid"] == grid) & (gsum["metric"] == metric)).any():
                ts.append(geometry_table(gsum, grid, metric, paper))
        if ts:
            sections.append((f"Grid `{grid}`", ts))

    mts: list[Table] = []
    for (model, model_id, grid), _ in msum.groupby(["model", "model_id", "grid"], sort=True):
        t = marker_table(msum, model, model_id, grid, paper)
        mts.append(t)
        short.append(t)
        counts = persona_marker_counts(no_doses, model, model_id, grid)
        mts.append(
            Table(
                f"Any-marker cells per persona, {model}, grid `{grid}`",
                counts,
                key=f"markers_persona_{model}_{grid}",
            )
        )
    if mts:
        sections.append(("Markers (table 3)", mts))

    for host, title in ((True, "Host injection (table 4)"), (False, "Multi-layer injection")):
        s = layer_set_summary(ksum, host)
        hts = [
            host_table(s, model, model_id, grid, paper, title.split(" (")[0])
            for (model, model_id, grid), _ in s.groupby(["model", "model_id", "grid"], sort=True)
        ]
        if hts:
            sections.append((title, hts))
            if host:
                short.extend(hts)

    cts = controls_tables(df, depths) + attention_tables(df)
    text: dict[str, list[str]] = {}
    if cts:
        sections.append((CONTROLS_SECTION, cts))
        text[CONTROLS_SECTION] = mechanism_markdown(df, None, depths)
    dts = design_tables(df)
    if dts or has_doses(df):
        sections.append((DESIGNS_SECTION, dts))
        text[DESIGNS_SECTION] = designs_markdown(df, None)
    return Report(sections, short, text)


def to_markdown(frame: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs `tabulate`, which lac does not depend on)."""
    if frame.empty and len(frame.columns) == 0:
        return "_(empty)_"
    cols = [str(c) for c in frame.columns]
    esc = lambda v: str(v).replace("|", "\\|")  # noqa: E731
    lines = [
        "| " + " | ".join(esc(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(esc(v) for v in row) + " |")
    return "\n".join(lines)


def render_markdown(report: Report, header: Sequence[str] = ()) -> str:
    """tables.md: a legend, then each section's tables with their notes."""
    parts = ["# lac report", "", *header, "", f"Legend: {LEGEND}", ""]
    for name, tables in report.sections:
        parts += [f"## {name}", ""]
        for t in tables:
            parts += [f"### {t.title}", "", to_markdown(t.frame), ""]
            parts += [f"_{n}_" for n in t.notes]
            if t.notes:
                parts.append("")
        parts += report.text.get(name, [])
    return "\n".join(parts).rstrip() + "\n"


def render_short(report: Report) -> str:
    """What the terminal gets: additive medians, markers and host tables."""
    parts = []
    for t in report.short:
        parts += [t.title, to_markdown(t.frame), *[f"  ({n})" for n in t.notes], ""]
    if any(c.endswith("paper") or " paper" in c for t in report.short for c in map(str, t.frame.columns)):
        parts.append("* = lac median outside the published [p25, p75]")
    return "\n".join(parts)
