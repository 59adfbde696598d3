"""Designs beyond "As X, Y" (METHOD.md): dose-response figures of steer / steer_host, the swap
table, and the interaction-share table of k-factor grids (k >= 3).

Each output exists only when the results hold its rows, so a report of the paper's experiments
looks as before. Medians and IQRs over cells come from :func:`lac.stats.describe`; marker rates
are means of the 0/1 ``marker_any`` over cells, as in table 3. Layers sort as numbers (2 < 10).

steer / steer_host rows carry one dose ``alpha`` each; a median pooled over doses means nothing,
so :func:`without_doses` keeps them out of the paper's tables (they are drawn here instead).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lac.report._common import DASH, _grid_key, _site_key, fmt, fmt_iqr, model_labels
from lac.report.loading import write_text
from lac.report.mechanism import _slug
from lac.report.tables import Table
from lac.schema import DECOMPOSITION, DEFAULT_PARTNER, SWAP
from lac.stats import describe, layers_key

DESIGNS_SECTION = 'Designs beyond "As X, Y"'
DOSE_INTERVENTIONS = ("steer", "steer_host")
K_FACTOR_METRICS = ("cos_all_sum", "cos_pair", "inter_share")  # written only for grids of k >= 3 factors
LINTHRESH = 1e-3  # symlog KL axis: linear near 0 (steer at alpha = 1 is clean), log above
CSV_FILES = {"dose_response": "dose_response.csv", "swap": "swap.csv", "interaction": "interaction_share.csv"}

# what alpha = 0 and alpha = 1 mean, per intervention (METHOD.md "Steering"); {f} is the factor
ALPHA_MEANING = {
    "steer": {0.0: "α = 0: {f} removed (= remove_{f})", 1.0: "α = 1: clean (nothing changed)"},
    "steer_host": {0.0: "α = 0: {f} removed (= host_none)", 1.0: "α = 1: host + D_{f} (the whole {f} direction)"},
}
WRITES = {
    "steer": "steer: h_all + (α − 1)·D_{f} written in the full prompt",
    "steer_host": "steer_host: h_host + α·D_{f} written in the host ({f} at baseline)",
}


# --------------------------------------------------------------------------- helpers


def _prepared(df: pd.DataFrame, mask: pd.Series) -> pd.DataFrame:
    """The selected rows with `factor` as plain text (older frames may hold <NA> there)."""
    sel = df[mask]
    partner = sel["partner"].fillna("").astype(str) if "partner" in sel else ""
    return sel.assign(factor=sel["factor"].fillna("").astype(str), layers=sel["layers"].fillna("").astype(str),
                      partner=partner)


def has_doses(df: pd.DataFrame) -> bool:
    return bool(df["intervention"].isin(DOSE_INTERVENTIONS).any())


def without_doses(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the paper's tables summarise: everything but steer / steer_host (one dose per row)."""
    return df[~df["intervention"].isin(DOSE_INTERVENTIONS)]


def layer_label(layers: str) -> str:
    """`layer 14`, or `layers 10,12,14` for a set written at once."""
    return f"layers {layers}" if "," in layers else f"layer {layers}"


def _stats(values: Iterable[float]) -> dict[str, float]:
    d = describe(np.asarray(list(values), dtype=float))
    return {"n": d["n"], "median": d["median"], "p25": d["p25"], "p75": d["p75"]}


def _rate(values: pd.Series) -> float:
    v = values.to_numpy(dtype=float)
    return float(v.mean()) if v.size else math.nan


def _key(text: str) -> str:
    """A table's stable W&B name, word characters only (as the controls tables')."""
    return re.sub(r"\W+", "_", text).strip("_").lower()


def _model_key(r: Any) -> tuple:
    return (str(r["model"]), str(r["model_id"]), _grid_key(str(r["grid"])), _site_key(str(r["site"])))


def _sorted(frame: pd.DataFrame, key: Any) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    order = sorted(range(len(frame)), key=lambda i: key(frame.iloc[i]))
    return frame.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- dose-response


DOSE_KEYS = ["model", "model_id", "grid", "site", "intervention", "factor", "layers", "alpha"]


def dose_summary(df: pd.DataFrame) -> pd.DataFrame:
    """steer / steer_host per (model, grid, site, intervention, factor, layers, alpha, metric):
    KL to the clean XY target (median, p25, p75 over cells) and, for marker_any, its `rate` (mean over
    cells; NaN on KL rows)."""
    cols = [*DOSE_KEYS, "metric", "n", "median", "p25", "p75", "rate"]
    sel = _prepared(df, df["intervention"].isin(DOSE_INTERVENTIONS) & df["metric"].isin(("kl", "marker_any")))
    rows = [
        {**dict(zip([*DOSE_KEYS, "metric"], key, strict=True)), **_stats(g["value"]),
         "rate": _rate(g["value"]) if key[-1] == "marker_any" else math.nan}
        for key, g in sel.groupby([*DOSE_KEYS, "metric"], sort=False, dropna=False)
    ]
    out = pd.DataFrame(rows, columns=cols)
    return _sorted(out, lambda r: (*_model_key(r), r["intervention"], r["factor"], r["metric"],
                                   layers_key(r["layers"]), float(r["alpha"])))


def dose_panels(df: pd.DataFrame) -> list[tuple[str, str, str, str, str, str]]:
    """(model, model_id, grid, site, intervention, factor) of every dose-response figure."""
    s = dose_summary(df)
    keys = ["model", "model_id", "grid", "site", "intervention", "factor"]
    return list(dict.fromkeys(tuple(str(v) for v in r) for r in s[keys].itertuples(index=False)))


def dose_response_figure(
    df: pd.DataFrame, model: str, model_id: str, grid: str, site: str, intervention: str, factor: str,
) -> Any:
    """KL to XY against alpha, one line per layer (median over cells, band p25-p75); beside it the
    marker_any rate against alpha when markers were generated. Light vertical lines at alpha = 0 and 1."""
    from matplotlib.figure import Figure  # the OO API: no pyplot state, no GUI backend

    s = dose_summary(df[(df["model"] == model) & (df["model_id"] == model_id) & (df["grid"] == grid)
                        & (df["site"] == site) & (df["intervention"] == intervention)])
    s = s[s["factor"] == factor]
    kl, markers = s[s["metric"] == "kl"], s[s["metric"] == "marker_any"]
    layers = sorted(set(s["layers"]), key=layers_key)
    colors = {L: f"C{k % 10}" for k, L in enumerate(layers)}
    fig = Figure(figsize=(11 if not markers.empty else 7.5, 4.8), layout="constrained")
    ax = fig.add_subplot(1, 2 if not markers.empty else 1, 1)
    _dose_lines(ax, kl, colors, "median")
    ax.set_yscale("symlog", linthresh=LINTHRESH)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("KL vs clean XY (nats, 10 tokens)")
    ax.set_title("KL to the XY target, median over cells (band p25–p75)", fontsize=9)
    if kl.empty:
        ax.text(0.5, 0.5, "no KL rows", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    axes = [ax]
    if not markers.empty:
        ax2 = fig.add_subplot(1, 2, 2)
        _dose_lines(ax2, markers, colors, "rate")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("marker_any rate (share of cells)")
        ax2.set_title(f"markers of the cell's {factor} in generations", fontsize=9)
        axes.append(ax2)
    alphas = sorted({float(a) for a in s["alpha"]})
    for axis in axes:
        _mark_alphas(axis, intervention, factor)
        axis.set_xlabel("α (dose)")
        axis.set_xticks(alphas)
        axis.legend(fontsize=7)
    label = model_labels(s).get((model, model_id), model) if not s.empty else model
    fig.suptitle(f"Dose-response of {intervention} · {label} · grid {grid} · {site}\n"
                 f"{WRITES.get(intervention, intervention).format(f=factor)}", fontsize=10)
    return fig


def _dose_lines(ax: Any, s: pd.DataFrame, colors: dict[str, str], y: str) -> None:
    """One line per layer (set), alphas in order; IQR band for KL."""
    for layers, color in colors.items():
        q = s[s["layers"] == layers].sort_values("alpha")
        if q.empty:
            continue
        xs = q["alpha"].to_numpy(dtype=float)
        ax.plot(xs, q[y].to_numpy(dtype=float), marker="o", color=color, label=layer_label(layers))
        if y == "median":
            ax.fill_between(xs, q["p25"].to_numpy(dtype=float), q["p75"].to_numpy(dtype=float),
                            color=color, alpha=0.15, linewidth=0)


def _mark_alphas(ax: Any, intervention: str, factor: str) -> None:
    meaning = ALPHA_MEANING.get(intervention, {})
    for alpha, style in ((1.0, "--"), (0.0, ":")):
        if alpha in meaning:
            ax.axvline(alpha, color="0.7", linestyle=style, linewidth=1, label=meaning[alpha].format(f=factor))


def dose_figure_name(label: str, grid: str, site: str, intervention: str, factor: str) -> str:
    """figures/<name>.{png,pdf} of one model x grid x site x intervention x factor."""
    return "_".join(_slug(p) for p in ("dose", intervention, factor, label, grid, site))


def dose_response_figures(df: pd.DataFrame) -> list[tuple[str, str, Any]]:
    """(figure name, title, figure) for every panel with steer / steer_host rows."""
    if df.empty or not has_doses(df):
        return []
    labels = model_labels(df)
    out = []
    for model, model_id, grid, site, iv, factor in dose_panels(df):
        label = labels[(model, model_id)]
        fig = dose_response_figure(df, model, model_id, grid, site, iv, factor)
        title = f"{iv} ({factor}) · {label} · grid `{grid}` · {site}"
        out.append((dose_figure_name(label, grid, site, iv, factor), title, fig))
    return out


# --------------------------------------------------------------------------- swap


SWAP_KEYS = ["model", "model_id", "grid", "site", "factor", "partner", "layers"]
SWAP_METRICS = ("kl", "kl_partner")
SWAP_MARKERS = {"marker_any": "X", "marker_any_partner": "X'"}


def swap_summary(df: pd.DataFrame) -> pd.DataFrame:
    """swap per (model, grid, site, factor, partner rule, layers): cells; KL to XY (`kl_*`) and to X'Y
    (`kl_partner_*`), median / p25 / p75 over cells; marker_any rates of X and of X' (NaN without
    markers rows) with the cells they were counted over."""
    cols = [*SWAP_KEYS, "cells"]
    cols += [f"{m}_{s}" for m in SWAP_METRICS for s in ("n", "median", "p25", "p75")]
    cols += ["marker_cells", *(f"{m}_{s}" for m in SWAP_MARKERS for s in ("rate", "hits"))]
    sel = _prepared(df, is_swap(df["intervention"]) & df["metric"].isin((*SWAP_METRICS, *SWAP_MARKERS)))
    rows = []
    for key, g in sel.groupby(SWAP_KEYS, sort=False, dropna=False):
        row: dict[str, Any] = {**dict(zip(SWAP_KEYS, key, strict=True)), "cells": int(g["cell"].nunique())}
        for m in SWAP_METRICS:
            row |= {f"{m}_{k}": v for k, v in _stats(g.loc[g["metric"] == m, "value"]).items()}
        row["marker_cells"] = int(g.loc[g["metric"] == "marker_any", "cell"].nunique())
        for m in SWAP_MARKERS:
            v = g.loc[g["metric"] == m, "value"]
            row[f"{m}_rate"], row[f"{m}_hits"] = _rate(v), int((v >= 0.5).sum()) if len(v) else pd.NA
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols).astype({f"{m}_hits": "Int64" for m in SWAP_MARKERS})
    return _sorted(out, lambda r: (*_model_key(r), r["factor"], r["partner"] != DEFAULT_PARTNER, r["partner"],
                                   layers_key(r["layers"])))


def is_swap(intervention: pd.Series) -> pd.Series:
    """swap's rows, whether named `swap` or labelled with their factor / partner rule (swap[task](partner=same))."""
    s = intervention.astype(str)
    return (s == SWAP) | s.str.startswith((f"{SWAP}[", f"{SWAP}("))


def _marker_cell(rate: float, hits: Any, cells: int) -> str:
    return DASH if rate != rate else f"{fmt(rate)} ({hits}/{cells})"


def swap_tables(df: pd.DataFrame) -> list[Table]:
    """One table per (model, grid, factor): a row per (site, layers)."""
    s = swap_summary(df)
    if s.empty:
        return []
    labels = model_labels(s)
    out = []
    for (model, model_id, grid, factor, partner), g in s.groupby(["model", "model_id", "grid", "factor", "partner"],
                                                                  sort=False):
        frame = pd.DataFrame({
            "site": g["site"].astype(str).to_list(),
            "layers": g["layers"].astype(str).to_list(),
            "cells": [str(int(n)) for n in g["cells"]],
            "KL to XY": [fmt_iqr(*(r[f"kl_{k}"] for k in ("median", "p25", "p75"))) for _, r in g.iterrows()],
            "KL to X'Y": [fmt_iqr(*(r[f"kl_partner_{k}"] for k in ("median", "p25", "p75")))
                          for _, r in g.iterrows()],
        })
        notes = [f"swap writes h_XY − D_X + D_X' ({factor}: X' = the partner level, same other factors); "
                 "KL median [p25, p75] over cells, to the clean XY target and to the clean X'Y target."]
        if g["marker_any_rate"].notna().any():
            for m, who in SWAP_MARKERS.items():
                frame[f"markers of {who}"] = [_marker_cell(r[f"{m}_rate"], r[f"{m}_hits"], int(r["marker_cells"]))
                                              for _, r in g.iterrows()]
            notes.append("markers of X / X': marker_any rate over cells (cells with a marker / cells) "
                         "in the swapped generations, scored with the markers of X and with those of X'.")
        label = labels[(str(model), str(model_id))]
        rule = "" if partner in ("", DEFAULT_PARTNER) else f", partner={partner}"
        if rule:
            notes.append(f"partner rule {partner} (intervention.partner); the default is next.")
        out.append(Table(f"Swap ({factor}{rule}), {label}, grid `{grid}`", frame, notes,
                         key=_key(f"swap_{factor}_{model}_{grid}" + (f"_{partner}" if rule else ""))))
    return out


# --------------------------------------------------------------------------- k-factor interaction


TABLE_METRICS = ("inter_ratio", "cos_all_sum", "inter_share", "cos_pair")  # the table's column order


def _factor_order(subsets: Iterable[str]) -> list[str]:
    """Factors in grid order: the runner writes each subset in that order, and the full set is the longest."""
    order: list[str] = []
    for s in sorted(set(subsets), key=lambda s: -len(s.split("+"))):
        order += [f for f in s.split("+") if f and f not in order]
    return order


def _column(metric: str, factor: str) -> str:
    """The table column of a decomposition metric: the subset for inter_share, cos(D_f, D_g) for a pair."""
    if metric == "inter_share":
        return factor
    if metric == "cos_pair":
        f, g = factor.split("+")
        return f"cos(D_{f}, D_{g})"
    return metric


def interaction_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Decomposition of k-factor grids per (model, grid, site, layer, metric, factor): median,
    p25, p75 over cells, and `column`, the interaction table's column for it."""
    cols = ["model", "model_id", "grid", "site", "layer", "metric", "factor", "column", "n", "median", "p25", "p75"]
    dec = _prepared(df, (df["intervention"] == DECOMPOSITION) & df["metric"].isin(TABLE_METRICS))
    place = ["model", "model_id", "grid", "site"]
    sel = dec.merge(dec.loc[dec["metric"].isin(K_FACTOR_METRICS), place].drop_duplicates(), on=place)
    if sel.empty:
        return pd.DataFrame(columns=cols)
    group = ["model", "model_id", "grid", "site", "layer", "metric", "factor"]
    rows = [{**dict(zip(group, key, strict=True)), "column": _column(key[5], key[6]), **_stats(g["value"])}
            for key, g in sel.groupby(group, sort=False, dropna=False)]
    out = pd.DataFrame(rows, columns=cols)
    order = _factor_order(out.loc[out["metric"] == "inter_share", "factor"])

    def subset_key(factor: str) -> tuple:
        parts = factor.split("+") if factor else []
        return (len(parts), [order.index(p) if p in order else len(order) for p in parts], factor)

    return _sorted(out, lambda r: (*_model_key(r), layers_key(int(r["layer"])),
                                   TABLE_METRICS.index(r["metric"]), subset_key(r["factor"])))


def interaction_tables(df: pd.DataFrame) -> list[Table]:
    """One table per (model, grid, site) of a k-factor grid: a row per layer, median over cells of
    inter_ratio, cos_all_sum, inter_share per subset and cos(D_f, D_g) per pair."""
    s = interaction_summary(df)
    if s.empty:
        return []
    labels = model_labels(s)
    out = []
    for (model, model_id, grid, site), g in s.groupby(["model", "model_id", "grid", "site"], sort=False):
        columns = list(dict.fromkeys(g["column"]))  # already in table order (summary's sort)
        rows = []
        for layer, h in g.groupby("layer", sort=False):
            med = dict(zip(h["column"], h["median"], strict=True))
            rows.append({"layer": str(int(layer)), "cells": str(int(h["n"].max())),
                         **{c: fmt(med[c]) if c in med else DASH for c in columns}})
        notes = ["median over cells. inter_ratio = |h_all − h_{} − Σ_f D_f| / |h_all − h_{}|; "
                 "cos_all_sum = cos(h_all − h_{}, Σ_f D_f); a column named by a subset S "
                 "(f+g, f+g+h) = inter_share |I_S| / |h_all − h_{}| (I_S: its Moebius interaction term); "
                 "cos(D_f, D_g) = cosine of two main effects D_f = h_{f} − h_{}."]
        label = labels[(str(model), str(model_id))]
        out.append(Table(f"Interaction share by layer, {label}, grid `{grid}`, {site}",
                         pd.DataFrame(rows, columns=["layer", "cells", *columns]), notes,
                         key=_key(f"interaction_{model}_{grid}_{site}")))
    return out


# --------------------------------------------------------------------------- report wiring


def design_tables(df: pd.DataFrame) -> list[Table]:
    """The swap tables, then the interaction-share tables (empty without such rows)."""
    return swap_tables(df) + interaction_tables(df)


def design_csvs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The numbers behind the designs' tables and figures (full precision), the non-empty ones."""
    frames = {"dose_response": dose_summary(df), "swap": swap_summary(df), "interaction": interaction_summary(df)}
    return {k: f for k, f in frames.items() if not f.empty}


def write_design_csvs(df: pd.DataFrame, out: Path) -> dict[str, Path]:
    """dose_response.csv, swap.csv, interaction_share.csv in `out`, each only if it has rows."""
    return {k: write_text(f.to_csv(index=False), Path(out) / CSV_FILES[k]) for k, f in design_csvs(df).items()}


def designs_markdown(df: pd.DataFrame, figures: list[tuple[str, str]] | None = None) -> list[str]:
    """Markdown lines after the section's tables: the dose-response figures and how to read them."""
    if not has_doses(df):
        return []
    lines = ["### Dose-response", ""]
    for name, title in figures or []:
        lines += [f"![{title}](figures/{name}.png)", "", f"_{title}: `figures/{name}.png`, `.pdf`_", ""]
    lines += [
        "x = α, the dose of the factor's direction D_f; left: median KL over cells to the clean XY target "
        "(band p25–p75), one line per layer; right (when markers were generated): the marker_any rate. "
        "Light vertical lines: α = 1 (steer: clean, nothing changed; steer_host: the host plus the "
        "whole direction) and α = 0 (the factor removed: remove_f for steer, host_none for steer_host).",
        "",
    ]
    return lines
