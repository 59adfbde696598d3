"""Figures: KL and geometry by layer, models overlaid (x = fraction of depth or layer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lac.report._common import (
    FIGURE1_SITES,
    KL_THRESHOLD,
    _grid_key,
    _site_key,
    is_single_layer,
    model_labels,
)
from lac.report.loading import (
    _atomic,
)
from lac.report.published import load_paper_tables, published_geometry, published_kl
from lac.report.summaries import (
    geometry_summary,
    kl_summary,
)
from lac.schema import GEOMETRY_METRICS

# --------------------------------------------------------------------------- figures

GEOMETRY_LABELS = {
    "cos_xy_sum": "cos(ΔXY, ΔX+ΔY)",
    "cos_x_y": "cos(ΔX, ΔY)",
    "inter_ratio": "|Inter| / |ΔXY|",
}
X_MODES = ("frac", "layer")
THRESHOLD_LABEL = f"KL = {KL_THRESHOLD} (paper's Fig. 1 reference)"


def _new_figure(nrows: int, ncols: int) -> Any:
    from matplotlib.figure import Figure  # the OO API: no pyplot state, no GUI backend

    return Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")


def _suptitle(fig: Any, text: str) -> None:
    """The figure's title, wrapped to its width (a one-panel figure clipped the KL title at both edges)."""
    import textwrap

    width = max(30, int(fig.get_figwidth() * 13))  # ~13 characters per inch at 10 pt
    fig.suptitle(textwrap.fill(text, width), fontsize=10)


def _models(s: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted({(str(m), str(i)) for m, i in zip(s["model"], s["model_id"], strict=True)})


def _xs(layers: Any, depth: int | None, x: str) -> np.ndarray:
    layers = np.asarray(list(layers), dtype=float)
    return layers / depth if x == "frac" and depth else layers


def _x_axis(ax: Any, x: str, layers: set[int], fractions: bool) -> None:
    if x == "frac" and fractions:
        ax.set_xlim(-0.02, 1.02)
        ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xticklabels(["0", "0.25", "0.5", "0.75", "1"])
        ax.set_xlabel("layer / model depth")
    else:
        ax.set_xticks(sorted(layers))
        ax.set_xlabel("layer")


def _check_x(x: str) -> None:
    if x not in X_MODES:
        raise ValueError(f"x={x!r}: choose one of {', '.join(X_MODES)}")


def _layout(panels: list[Any]) -> tuple[int, int]:
    ncols = min(len(panels), 3)
    return math.ceil(len(panels) / ncols), ncols


def kl_by_layer_figure(
    df: pd.DataFrame,
    depths: dict[tuple[str, str], int] | None = None,
    x: str = "frac",
    paper: dict[str, Any] | None = None,
) -> Any | None:
    """The paper's Figure 1 across models: median additive KL against depth, one panel per
    (grid, site), one line per model (band: p25-p75), all panels on one log y scale; the paper's
    published medians as hollow diamonds for its three models; dotted KL = 0.1 in the legend.

    x="frac": layer / n_layers (``depths``, from the jobs' configs), so models of different
    depth line up; x="layer": absolute layers. None when there is no single-layer additive KL.
    """
    _check_x(x)
    depths = depths or {}
    paper = load_paper_tables() if paper is None else paper
    s = kl_summary(df)
    s = s[
        (s["intervention"] == "additive")
        & s["layers"].map(is_single_layer)
        & s["site"].isin(FIGURE1_SITES)
    ]
    if s.empty:
        return None
    panels = sorted({(str(g), str(t)) for g, t in zip(s["grid"], s["site"], strict=True)},
                    key=lambda p: (_grid_key(p[0]), _site_key(p[1])))
    models = _models(s)
    labels = model_labels(s)
    colors = {m: f"C{k}" for k, m in enumerate(models)}
    fractions = all(m in depths for m in models)
    nrows, ncols = _layout(panels)
    fig = _new_figure(nrows, ncols)
    first = None
    for k, (grid, site) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1, sharey=first)
        first = first or ax
        p = s[(s["grid"] == grid) & (s["site"] == site)]
        layers: set[int] = set()
        for model, model_id in models:
            q = p[(p["model"] == model) & (p["model_id"] == model_id)].sort_values("layer")
            if q.empty:
                continue
            depth = depths.get((model, model_id)) if fractions else None
            xs = _xs(q["layer"], depth, x)
            layers |= {int(v) for v in q["layer"]}
            c = colors[(model, model_id)]
            ax.plot(xs, q["median"], marker="o", color=c, label=labels[(model, model_id)])
            ax.fill_between(xs, q["p25"], q["p75"], color=c, alpha=0.15, linewidth=0)
            pub = [(L, published_kl(paper, model_id, grid, site, L)) for L in _paper_layers(paper, model_id, grid, site)]
            pub = [(L, v) for L, v in pub if v is not None]
            if pub:
                ax.plot(_xs([L for L, _ in pub], depth, x), [v[0] for _, v in pub], linestyle="none",
                        marker="D", markerfacecolor="none", color=c,
                        label=f"{labels[(model, model_id)]}, paper median")
        ax.axhline(KL_THRESHOLD, color="k", linestyle=":", linewidth=1, label=THRESHOLD_LABEL)
        ax.set_yscale("log", nonpositive="clip")
        _x_axis(ax, x, layers, fractions)
        ax.set_title(f"{site} · grid {grid}", fontsize=10)
        ax.set_ylabel("additive KL (nats, 10 tokens)")
        ax.legend(fontsize=7)
    _suptitle(fig, "Median causal KL of additive substitution over cells (band: p25–p75)")
    return fig


def _paper_layers(paper: dict[str, Any], model_id: str, grid: str, site: str) -> list[int]:
    from lac.report._common import PAPER_KL_TABLES

    table = paper.get(PAPER_KL_TABLES.get(grid, ""), {}) if grid in PAPER_KL_TABLES else {}
    return sorted(int(L) for L in (table.get(model_id, {}).get(site, {}) or {}))


def geometry_by_layer_figure(
    df: pd.DataFrame,
    depths: dict[tuple[str, str], int] | None = None,
    x: str = "frac",
    paper: dict[str, Any] | None = None,
) -> Any | None:
    """Median cos(ΔXY, ΔX+ΔY), cos(ΔX, ΔY), |Inter|/|ΔXY| against depth: one row of panels per
    metric (its y label names it), one column per (grid, site), one line per model; the paper's
    quoted medians as hollow diamonds. None without geometry rows."""
    _check_x(x)
    depths = depths or {}
    paper = load_paper_tables() if paper is None else paper
    s = geometry_summary(df)
    if s.empty:
        return None
    metrics = [m for m in GEOMETRY_METRICS if (s["metric"] == m).any()]
    cols = sorted({(str(g), str(t)) for g, t in zip(s["grid"], s["site"], strict=True)},
                  key=lambda p: (_grid_key(p[0]), _site_key(p[1])))
    models = _models(s)
    labels = model_labels(s)
    colors = {m: f"C{k}" for k, m in enumerate(models)}
    fractions = all(m in depths for m in models)
    fig = _new_figure(len(metrics), len(cols))
    for r, metric in enumerate(metrics):
        first = None
        for c, (grid, site) in enumerate(cols):
            ax = fig.add_subplot(len(metrics), len(cols), r * len(cols) + c + 1, sharey=first)
            first = first or ax
            p = s[(s["grid"] == grid) & (s["site"] == site) & (s["metric"] == metric)]
            layers: set[int] = set()
            for model, model_id in models:
                q = p[(p["model"] == model) & (p["model_id"] == model_id)].sort_values("layer")
                if q.empty:
                    continue
                depth = depths.get((model, model_id)) if fractions else None
                layers |= {int(v) for v in q["layer"]}
                color = colors[(model, model_id)]
                ax.plot(_xs(q["layer"], depth, x), q["median"], marker=".", color=color,
                        label=labels[(model, model_id)])
                pub = [(int(L), published_geometry(paper, model_id, grid, site, int(L), metric))
                       for L in sorted(set(q["layer"]))]
                pub = [(L, v) for L, v in pub if v is not None]
                if pub:
                    ax.plot(_xs([L for L, _ in pub], depth, x), [v for _, v in pub], linestyle="none",
                            marker="D", markerfacecolor="none", color=color,
                            label=f"{labels[(model, model_id)]}, paper median")
            _x_axis(ax, x, layers, fractions)
            ax.set_title(f"{site} · grid {grid}", fontsize=10)
            ax.set_ylabel(f"median {GEOMETRY_LABELS.get(metric, metric)}")
            if layers:
                ax.legend(fontsize=7)
    _suptitle(fig, "Geometry of the 2x2 decomposition: median over cells")
    return fig


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """PNG and PDF of one figure."""
    return [
        _atomic(stem.with_name(f"{stem.name}.{ext}"), lambda tmp, e=ext: fig.savefig(tmp, format=e, dpi=150))
        for ext in ("png", "pdf")
    ]
