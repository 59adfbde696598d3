"""Controls and mechanism (METHOD.md "Beyond the paper"): the controls table, the attention-mass
table, one mechanism figure per model x grid x site, and what each curve would show if the
paper's explanation holds.

Layer sets "from L" (L..n_layers-1 changed at once: the controls sweep's kv_persona and
knockout_persona) are rows labelled ``from L`` and points at x = L, their FIRST layer; the tidy
rows' ``layer`` column holds the deepest (:func:`lac.tracking.from_layer`). clean is KL 0 by
definition, so it is drawn at 0 whether or not clean rows were measured.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from lac.report._common import (
    CONTROL_INTERVENTIONS,
    CONTROL_ORDER,
    DASH,
    _grid_key,
    _site_key,
    fmt_iqr,
    model_labels,
)
from lac.report.summaries import attention_summary, kl_summary
from lac.schema import ATTENTION_METRICS
from lac.tracking import from_layer, layer_list

FROM_FAMILY = ("kv_persona", "knockout_persona")  # the interventions the controls sweep runs "from L"

# left panel: (intervention, layer kind, label, style); kind "from": from-L sets at x = L, "at": single layers
KL_CURVES: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("host_oracle_lm", "at", "host_oracle_lm", {"color": "C0", "marker": "o"}),
    ("host_oracle_span", "at", "host_oracle_span", {"color": "C1", "marker": "s"}),
    ("kv_persona", "from", "kv_persona (from L)", {"color": "C2", "marker": "^"}),
    ("knockout_persona", "from", "knockout_persona (from L)", {"color": "C3", "marker": "v"}),
    ("host_oracle", "at", "host_oracle (BY host)", {"color": "C4", "marker": ".", "linestyle": "--"}),
    ("host_oracle_norm", "at", "host_oracle_norm (BY host)", {"color": "C5", "marker": ".", "linestyle": "--"}),
    ("kv_persona", "at", "kv_persona (at L)", {"color": "C2", "marker": ".", "linestyle": ":"}),
    ("knockout_persona", "at", "knockout_persona (at L)", {"color": "C3", "marker": ".", "linestyle": ":"}),
)
# horizontal references: interventions writing nothing (no layer), and clean at KL 0
KL_REFERENCES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("host_none", "host_none (BY host, nothing written)", {"color": "0.35", "linestyle": "--"}),
    ("host_none_lm", "host_none_lm (LY host, nothing written)", {"color": "0.35", "linestyle": "-."}),
)
CLEAN_LABEL = "clean XY (KL = 0)"
ATTENTION_CURVES: dict[str, tuple[str, dict[str, Any]]] = {
    "attn_persona": ("attn_persona (site, mean over heads)", {"color": "C0", "marker": "o"}),
    "attn_persona_window": ("attn_persona_window (window positions, mean over heads)",
                            {"color": "C1", "marker": "s", "linestyle": "--"}),
    "attn_persona_max": ("attn_persona_max (site, max over heads)",
                         {"color": "C0", "linestyle": ":", "linewidth": 1}),
    "attn_persona_window_max": ("attn_persona_window_max (window, max over heads)",
                                {"color": "C1", "linestyle": ":", "linewidth": 1}),
}
NO_ATTENTION = "no attention rows (run with attn_persona=true)"
LINTHRESH = 1e-2  # symlog y of the KL panel: linear near 0 (clean, kv_persona at L = 0), log above

EXPLANATION = (
    "the persona reaches the scored tokens through attention back to the persona-text positions, "
    "not through the residual at the site alone"
)
# one sentence per curve: what it would show if the paper's explanation holds
EXPECTATIONS: dict[str, str] = {
    CLEAN_LABEL: "is the floor (KL 0 by definition): a curve near it restores clean XY's next-token distributions.",
    "host_none (BY host, nothing written)": "is the ceiling: the persona's whole effect on the paper's "
    "persona-free host; every control is read between this line and 0.",
    "host_none_lm (LY host, nothing written)": "lies close to host_none: a length-matched persona-free "
    "host changes as much as BY, so the gap to 0 is the persona, not prompt length or positions.",
    "host_oracle (BY host)": "stays well above 0 at every layer (the paper's finding): h_XY at the site "
    "does not restore XY, because the later tokens still read the host's persona-free span.",
    "host_oracle_norm (BY host)": "tracks host_oracle: h_XY rescaled to the host's own norm changes "
    "little, so host_oracle's KL is not an artefact of an off-distribution norm.",
    "host_oracle_lm": "stays well above 0 at every layer, closer to host_none_lm than to 0: with the "
    "positions aligned, h_XY at the site alone still does not carry the persona to the window tokens.",
    "host_oracle_span": "equals host_none_lm at layer 0 and falls to near 0 once L passes the layers "
    "where post-persona positions read the span, since all that still differs from XY is the span's "
    "K/V at layers >= L.",
    "kv_persona (from L)": "is 0 at L = 0 (it is clean XY), stays near 0 while L is at or below the "
    "layers where the persona is read from the span, and rises toward host_none_lm once L passes them.",
    "knockout_persona (from L)": "mirrors kv_persona: high (toward host_none_lm) when attention to the "
    "span is blocked from early layers on, falling to near 0 once L passes the reading layers, its fall "
    "at the same layers as kv_persona's rise.",
    "kv_persona (at L)": "stays well above 0 at every single layer if the persona is read at several "
    "layers (no one layer's span K/V restores XY), dipping most at the main reading layer.",
    "knockout_persona (at L)": "is near 0 except at the layers that read the persona, where blocking "
    "that one layer alone raises the KL.",
    "attn_persona": "is substantial at the layers where kv_persona and knockout_persona change (the "
    "site attends to the persona span there) and small where those curves are flat.",
    "attn_persona_window": "is substantial at the same layers: the window positions, whose "
    "distributions the KL scores, read the span directly rather than only through the site.",
    "attn_persona_max": "lies well above attn_persona at those layers if a few heads do the reading.",
    "attn_persona_window_max": "does the same for the window positions: a few persona-reading heads show "
    "as max well above the mean.",
}
AGAINST = (
    "Against the explanation: host_oracle_lm near 0 at some layer (the site's residual alone carries "
    "the persona), kv_persona (from L) far from 0 for small L, or kv / knockout curves that change "
    "where the attention mass on the span is negligible."
)


def has_controls(df: pd.DataFrame) -> bool:
    return bool(df["intervention"].isin(CONTROL_INTERVENTIONS).any())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def figure_name(label: str, grid: str, site: str) -> str:
    """figures/<name>.{png,pdf} of one model x grid x site."""
    return f"mechanism_{_slug(label)}_{_slug(grid)}_{_slug(site)}"


def controls_summary(df: pd.DataFrame, depths: dict[tuple[str, str], int] | None = None) -> pd.DataFrame:
    """KL summary (median/p25/p75 over cells) of the control interventions and their references
    (clean, host_none, host_oracle) in results that hold any control, with `kind` ("none": no
    layer, "at": one layer, "from": a from-L set, "set": another set), `x` (the layer, or L of a
    from-L set; NaN without one) and `label` ("–", "L14", "from 10", "L6,8,10")."""
    cols = ["grid", "model", "model_id", "site", "intervention", "layers", "layer", "n", "n_nan",
            "median", "p25", "p75", "kind", "x", "label"]
    if df.empty or not has_controls(df):
        return pd.DataFrame(columns=cols)
    s = kl_summary(df)
    s = s[s["intervention"].isin(CONTROL_ORDER)].reset_index(drop=True)
    depths = depths or {}
    kinds, xs, labels = [], [], []
    for r in s.itertuples(index=False):
        depth = depths.get((str(r.model), str(r.model_id)))
        start = from_layer(r.layers, depth)
        ls = layer_list(r.layers)
        if not ls:
            kind, x, label = "none", np.nan, DASH
        elif start is not None:
            kind, x, label = "from", float(start), f"from {start}"
        elif len(ls) == 1:
            kind, x, label = "at", float(ls[0]), f"L{ls[0]}"
        else:
            kind, x, label = "set", np.nan, f"L{r.layers}"
        kinds.append(kind)
        xs.append(x)
        labels.append(label)
    s = s.assign(kind=kinds, x=xs, label=labels)
    # a single layer at the model's last layer is also "from n-1" (the same change) where a from-L
    # curve of that intervention exists: labelled and drawn with it
    has_from = {(r.model, r.model_id, r.grid, r.site, r.intervention)
                for r in s.itertuples(index=False) if r.kind == "from"}
    for i, r in s.iterrows():
        depth = depths.get((str(r["model"]), str(r["model_id"])))
        key = (r["model"], r["model_id"], r["grid"], r["site"], r["intervention"])
        if r["kind"] == "at" and depth and int(r["x"]) == depth - 1 and key in has_from:
            s.loc[i, ["kind", "label"]] = ["from", f"from {int(r['x'])}"]
    order = {iv: k for k, iv in enumerate(CONTROL_ORDER)}
    kind_order = {"none": 0, "at": 1, "from": 2, "set": 3}
    keys = [(str(m), str(i), _grid_key(str(g)), _site_key(str(t)), order[iv], kind_order[k], -1.0 if x != x else x, lab)
            for m, i, g, t, iv, k, x, lab in zip(s["model"], s["model_id"], s["grid"], s["site"], s["intervention"],
                                                 s["kind"], s["x"], s["label"], strict=True)]
    s = s.iloc[sorted(range(len(s)), key=keys.__getitem__)]
    return s.reset_index(drop=True)[cols]


def controls_tables(df: pd.DataFrame, depths: dict[tuple[str, str], int] | None = None) -> list[Any]:
    """One table per (model, grid): site, intervention, layer(s) ("from L" for from-L sets), cells,
    KL median [p25, p75]."""
    from lac.report.tables import Table

    s = controls_summary(df, depths)
    if s.empty:
        return []
    labels = model_labels(s)
    out = []
    for (model, model_id, grid), g in s.groupby(["model", "model_id", "grid"], sort=False):
        frame = pd.DataFrame({
            "site": g["site"].astype(str).to_list(),
            "intervention": g["intervention"].astype(str).to_list(),
            "layer": g["label"].to_list(),
            "cells": [str(int(n)) for n in g["n"]],
            "KL": [fmt_iqr(m, a, b) for m, a, b in zip(g["median"], g["p25"], g["p75"], strict=True)],
        })
        notes = ["`from L` = the layers L..n_layers-1 changed at once (its row's x is L, the first layer); "
                 "`–` = nothing written (no layer); clean XY is KL 0 by definition."]
        if g["n_nan"].sum():
            notes.append(f"{int(g['n_nan'].sum())} NaN KL values left out of the medians")
        label = labels[(str(model), str(model_id))]
        key = re.sub(r"\W+", "_", f"controls_{model}_{grid}").strip("_").lower()
        out.append(Table(f"Controls, {label}, grid `{grid}`", frame, notes, key=key))
    return out


def attention_tables(df: pd.DataFrame) -> list[Any]:
    """One table per (model, grid): site x layer rows, median [p25, p75] of each attention metric."""
    from lac.report.tables import Table

    s = attention_summary(df)
    if s.empty:
        return []
    labels = model_labels(s)
    out = []
    for (model, model_id, grid), g in s.groupby(["model", "model_id", "grid"], sort=False):
        metrics = [m for m in ATTENTION_METRICS if (g["metric"] == m).any()]
        rows = []
        for (site, layer), h in sorted(g.groupby(["site", "layer"], sort=False),
                                       key=lambda t: (_site_key(str(t[0][0])), int(t[0][1]))):
            row = {"site": str(site), "layer": str(int(layer))}
            for m in metrics:
                r = h[h["metric"] == m]
                row[m] = DASH if r.empty else fmt_iqr(*(float(r.iloc[0][c]) for c in ("median", "p25", "p75")))
            rows.append(row)
        label = labels[(str(model), str(model_id))]
        key = re.sub(r"\W+", "_", f"attention_{model}_{grid}").strip("_").lower()
        out.append(Table(f"Attention mass on the persona span (clean XY), {label}, grid `{grid}`",
                         pd.DataFrame(rows), ["median [p25, p75] over cells; `_max`: max over heads; "
                                              "`_window`: mean over the site's window positions"], key=key))
    return out


def mechanism_panels(df: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(model, model_id, grid, site) of every mechanism figure: those with control KL or attention rows."""
    sel = df[df["intervention"].isin(CONTROL_INTERVENTIONS) | df["metric"].isin(ATTENTION_METRICS)]
    keys = {(str(m), str(i), str(g), str(t)) for m, i, g, t in
            zip(sel["model"], sel["model_id"], sel["grid"], sel["site"], strict=True)}
    return sorted(keys, key=lambda k: (k[0], k[1], _grid_key(k[2]), _site_key(k[3])))


def mechanism_figure(
    df: pd.DataFrame, model: str, model_id: str, grid: str, site: str, depth: int | None = None,
) -> Any:
    """Left: median KL over cells by layer of host_oracle_lm, host_oracle_span, kv_persona (from L)
    and knockout_persona (from L) at x = L (plus host_oracle / host_oracle_norm on the BY host and
    single-layer kv / knockout when present; bands p25-p75), with host_none, host_none_lm and clean
    (KL = 0) as horizontal lines; right: the attention mass on the persona span by layer (median over
    cells of attn_persona, attn_persona_window and their max over heads)."""
    from matplotlib.figure import Figure  # the OO API: no pyplot state, no GUI backend

    sel = df[(df["model"] == model) & (df["model_id"] == model_id) & (df["grid"] == grid) & (df["site"] == site)]
    depths = {(model, model_id): depth} if depth else {}
    s = controls_summary(sel, depths)
    fig = Figure(figsize=(11, 5.6), layout="constrained")
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2, sharex=None)
    layers: set[int] = set()
    for iv, kind, label, style in KL_CURVES:
        q = s[(s["intervention"] == iv) & (s["kind"] == kind)].sort_values("x")
        if q.empty:
            continue
        xs = q["x"].to_numpy(dtype=float)
        layers |= {int(v) for v in xs}
        ax.plot(xs, q["median"], label=label, **style)
        ax.fill_between(xs, q["p25"], q["p75"], color=style["color"], alpha=0.12, linewidth=0)
    for iv, label, style in KL_REFERENCES:
        q = s[(s["intervention"] == iv) & (s["kind"] == "none")]
        if q.empty:
            continue
        r = q.iloc[0]
        ax.axhline(float(r["median"]), label=label, linewidth=1.2, **style)
        ax.axhspan(float(r["p25"]), float(r["p75"]), color=style["color"], alpha=0.07, linewidth=0)
    ax.axhline(0.0, color="k", linestyle=":", linewidth=1, label=CLEAN_LABEL)
    ax.set_yscale("symlog", linthresh=LINTHRESH)
    ax.set_ylim(bottom=-0.3 * LINTHRESH)  # the clean line at 0 just above the axis
    ax.set_ylabel("KL vs clean XY (nats, 10 tokens)")
    ax.set_title("KL by layer (from-L sets at x = L)", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)

    a = attention_summary(sel)
    if a.empty:
        ax2.text(0.5, 0.5, NO_ATTENTION, ha="center", va="center", fontsize=8, transform=ax2.transAxes)
    else:
        for metric in ATTENTION_METRICS:
            q = a[a["metric"] == metric].sort_values("layer")
            if q.empty:
                continue
            label, style = ATTENTION_CURVES[metric]
            xs = q["layer"].to_numpy(dtype=float)
            layers |= {int(v) for v in xs}
            ax2.plot(xs, q["median"], label=label, **style)
            if metric in ("attn_persona", "attn_persona_window"):
                ax2.fill_between(xs, q["p25"], q["p75"], color=style["color"], alpha=0.12, linewidth=0)
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    ax2.set_ylabel("attention mass on the persona span")
    ax2.set_title("attention to the persona span, clean XY (median over cells)", fontsize=9)
    for axis in (ax, ax2):
        axis.set_xlabel("layer L")
        if depth:
            axis.set_xlim(-0.5, depth - 0.5)
        elif layers:
            axis.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
        if layers:
            step = max(1, int(np.ceil(len(layers) / 14)))
            axis.set_xticks(sorted(layers)[::step])
    label = model_labels(sel).get((model, model_id), model) if not sel.empty else model
    fig.suptitle(f"Controls and mechanism · {label} · grid {grid} · {site}", fontsize=10)
    return fig


def mechanism_figures(
    df: pd.DataFrame, depths: dict[tuple[str, str], int] | None = None,
) -> list[tuple[str, str, Any]]:
    """(figure name, title, figure) for every model x grid x site with control or attention rows."""
    depths = depths or {}
    labels = model_labels(df) if not df.empty else {}
    out = []
    for model, model_id, grid, site in mechanism_panels(df):
        label = labels[(model, model_id)]
        fig = mechanism_figure(df, model, model_id, grid, site, depths.get((model, model_id)))
        out.append((figure_name(label, grid, site), f"{label} · grid `{grid}` · {site}", fig))
    return out


def curves_present(df: pd.DataFrame, depths: dict[tuple[str, str], int] | None = None) -> list[str]:
    """Labels of the mechanism figures' curves that the results hold, in drawing order."""
    s = controls_summary(df, depths)
    out = []
    for iv, kind, label, _ in KL_CURVES:
        if ((s["intervention"] == iv) & (s["kind"] == kind)).any():
            out.append(label)
    for iv, label, _ in KL_REFERENCES:
        if ((s["intervention"] == iv) & (s["kind"] == "none")).any():
            out.append(label)
    if not s.empty:
        out.append(CLEAN_LABEL)
    att = set(df.loc[df["metric"].isin(ATTENTION_METRICS), "metric"])
    out += [m for m in ATTENTION_METRICS if m in att]
    return out


def mechanism_markdown(
    df: pd.DataFrame,
    figures: list[tuple[str, str]] | None = None,
    depths: dict[tuple[str, str], int] | None = None,
) -> list[str]:
    """Markdown lines for tables.md: the figures (``(name, title)``, images under figures/), then one
    sentence per curve present on what it would show if the paper's explanation holds."""
    curves = curves_present(df, depths)
    if not curves:
        return []
    lines = ["### Mechanism figures", ""]
    for name, title in figures or []:
        lines += [f"![{title}](figures/{name}.png)", "", f"_{title}: `figures/{name}.png`, `.pdf`_", ""]
    lines += [
        "Left panel: median KL over cells against the layer (a from-L set at x = L, its first layer; "
        "band p25–p75), with host_none, host_none_lm and clean (KL = 0) as horizontal lines; right "
        "panel: the attention mass on the persona span in clean XY by layer.",
        "",
        f"If the paper's explanation holds ({EXPLANATION}):",
        "",
    ]
    lines += [f"- **{c}** {EXPECTATIONS[c]}" for c in curves if c in EXPECTATIONS]
    lines += ["", AGAINST, ""]
    return lines
