"""Figures: KL and geometry by layer, models overlaid (x = fraction of depth or layer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
from lac.report.summaries import (
    geometry_summary,
    kl_summary,
)
from lac.schema import GEOMETRY_METRICS

# --------------------------------------------------------------------------- figures


def _panels(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    trip = {
        (str(m), str(i), str(g))
        for m, i, g in zip(df["model"], df["model_id"], df["grid"], strict=True)
    }
    return sorted(trip, key=lambda t: (t[0], t[1], _grid_key(t[2])))


def _new_figure(n: int) -> tuple[Any, int, int]:
    from matplotlib.figure import Figure  # the OO API: no pyplot state, no GUI backend

    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    return Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained"), nrows, ncols


def kl_by_layer_figure(df: pd.DataFrame) -> Any | None:
    """The paper's Figure 1: median additive KL vs layer with a 25-75% band, per (model, grid).

    Each panel holds one line per site (p_last, g1, g2 present) plus the dotted
    KL = 0.1 line; None when there is no single-layer additive KL.
    """
    s = kl_summary(df)
    s = s[
        (s["intervention"] == "additive")
        & s["layers"].map(is_single_layer)
        & s["site"].isin(FIGURE1_SITES)
    ]
    if s.empty:
        return None
    panels = _panels(s)
    fig, nrows, ncols = _new_figure(len(panels))
    labels = model_labels(s)
    colors = {"p_last": "C0", "g1": "C1", "g2": "C2"}
    for k, (model, model_id, grid) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        p = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["grid"] == grid)]
        for site in FIGURE1_SITES:
            q = p[p["site"] == site].sort_values("layer")
            if q.empty:
                continue
            ax.plot(q["layer"], q["median"], marker="o", color=colors[site], label=site)
            ax.fill_between(
                q["layer"], q["p25"], q["p75"], color=colors[site], alpha=0.2, linewidth=0
            )
        ax.axhline(
            KL_THRESHOLD, color="k", linestyle=":", linewidth=1, label=f"KL = {KL_THRESHOLD}"
        )
        ax.set_yscale("log", nonpositive="clip")
        ax.set_xticks(sorted({int(x) for x in p["layer"]}))
        ax.set_title(f"{labels[(model, model_id)]} · {grid}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("additive KL (nats, 10 tokens)")
        ax.legend(fontsize=7)
    return fig


def geometry_by_layer_figure(df: pd.DataFrame) -> Any | None:
    """Median cos(dXY, dX+dY), cos(dX, dY), |Inter|/|dXY| vs layer per site, per (model, grid).

    One line per (site, metric) present; colour = site, line style = metric.
    """
    from matplotlib.lines import Line2D

    s = geometry_summary(df)
    if s.empty:
        return None
    panels = _panels(s)
    fig, nrows, ncols = _new_figure(len(panels))
    labels = model_labels(s)
    styles = {"cos_xy_sum": "-", "cos_x_y": "--", "inter_ratio": "-."}
    sites = sorted(set(s["site"]), key=_site_key)
    colors = {site: f"C{i}" for i, site in enumerate(sites)}
    for k, (model, model_id, grid) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        p = s[(s["model"] == model) & (s["model_id"] == model_id) & (s["grid"] == grid)]
        used_sites, used_metrics = [], []
        for site in sites:
            for metric in GEOMETRY_METRICS:
                q = p[(p["site"] == site) & (p["metric"] == metric)].sort_values("layer")
                if q.empty:
                    continue
                ax.plot(
                    q["layer"],
                    q["median"],
                    linestyle=styles[metric],
                    marker=".",
                    color=colors[site],
                )
                used_sites += [site] if site not in used_sites else []
                used_metrics += [metric] if metric not in used_metrics else []
        handles = [Line2D([], [], color=colors[x], label=x) for x in used_sites]
        handles += [Line2D([], [], color="k", linestyle=styles[m], label=m) for m in used_metrics]
        ax.legend(handles=handles, fontsize=7)
        ax.set_xticks(sorted({int(x) for x in p["layer"]}))
        ax.set_title(f"{labels[(model, model_id)]} · {grid}", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("median")
    return fig


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """PNG and PDF of one figure."""
    return [
        _atomic(stem.with_suffix(f".{ext}"), lambda tmp, e=ext: fig.savefig(tmp, format=e, dpi=150))
        for ext in ("png", "pdf")
    ]
