"""Tidy summaries over cells: KL, geometry, markers, coverage (medians/IQRs via lac.stats)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lac.report._common import (
    _condition_key,
    _grid_key,
    _site_key,
    percentiles,
)
from lac.schema import ATTENTION, ATTENTION_METRICS, DECOMPOSITION, GEOMETRY_METRICS, MARKER_METRICS

# --------------------------------------------------------------------------- tidy summaries


def _summarise(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    cols = [*keys, "n", "n_nan", "median", "p25", "p75"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for k, g in df.groupby(keys, sort=False, dropna=False):
        vals = g["value"].to_numpy(dtype=float)
        med, p25, p75 = percentiles(vals)
        nan = int(np.isnan(vals).sum())
        rows.append((*k, int(vals.size - nan), nan, med, p25, p75))
    return pd.DataFrame(rows, columns=cols)


def kl_summary(df: pd.DataFrame) -> pd.DataFrame:
    """median/p25/p75 of KL per (grid, model, model_id, site, intervention, layers, layer)."""
    keys = ["grid", "model", "model_id", "site", "intervention", "layers", "layer"]
    return _summarise(df[df["metric"] == "kl"], keys)


def geometry_summary(df: pd.DataFrame) -> pd.DataFrame:
    """median/p25/p75 of each geometry metric per (grid, model, model_id, site, layer, metric)."""
    sel = df[(df["intervention"] == DECOMPOSITION) & df["metric"].isin(GEOMETRY_METRICS)]
    return _summarise(sel, ["grid", "model", "model_id", "site", "layer", "metric"])


def attention_summary(df: pd.DataFrame) -> pd.DataFrame:
    """median/p25/p75 of each attention-mass metric (attn_persona ...) per (grid, model, model_id,
    site, layer, metric): the clean XY run's attention on the persona span."""
    sel = df[(df["intervention"] == ATTENTION) & df["metric"].isin(ATTENTION_METRICS)]
    return _summarise(sel, ["grid", "model", "model_id", "site", "layer", "metric"])


def marker_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Table 3 numbers per (model, grid, condition): any-marker rate and cells, mean distinct."""
    keys = ["model", "model_id", "grid", "intervention", "site", "layers"]
    cols = [*keys, "cells", "any_cells", "any_rate", "distinct_mean"]
    sel = df[df["metric"].isin(MARKER_METRICS)]
    rows = []
    for k, g in sel.groupby(keys, sort=False, dropna=False):
        anyv = g.loc[g["metric"] == "marker_any", "value"].to_numpy(dtype=float)
        dist = g.loc[g["metric"] == "marker_distinct", "value"].to_numpy(dtype=float)
        rows.append(
            (
                *k,
                int(anyv.size),
                int(np.nansum(anyv)),
                float(np.nanmean(anyv)) if anyv.size else math.nan,
                float(np.nanmean(dist)) if dist.size else math.nan,
            )
        )
    out = pd.DataFrame(rows, columns=cols)
    if not out.empty:
        out["_k"] = [_condition_key(i) for i in out["intervention"]]
        out = out.sort_values(["model", "grid", "_k", "site", "layers"]).drop(columns="_k")
    return out.reset_index(drop=True)


def marker_label(intervention: str, site: str, layers: str) -> str:
    return f"{intervention} [{site} L{layers}]" if layers else intervention


def persona_marker_counts(df: pd.DataFrame, model: str, model_id: str, grid: str) -> pd.DataFrame:
    """persona x condition: number of cells with marker_any = 1 (one model, one grid)."""
    sel = df[
        (df["metric"] == "marker_any")
        & (df["model"] == model)
        & (df["model_id"] == model_id)
        & (df["grid"] == grid)
    ]
    if sel.empty:
        return pd.DataFrame()
    sel = sel.assign(
        condition=[
            marker_label(*t)
            for t in zip(sel["intervention"], sel["site"], sel["layers"], strict=True)
        ],
        hit=(sel["value"] >= 0.5).astype(int),
    )
    order = sorted(
        dict.fromkeys(zip(sel["intervention"], sel["condition"], strict=True)),
        key=lambda t: (_condition_key(t[0]), t[1]),
    )
    table = sel.pivot_table(
        index="persona", columns="condition", values="hit", aggfunc="sum", fill_value=0
    )
    table = table[[c for _, c in order]].astype(int)
    table.columns = [str(c) for c in table.columns]
    return table.reset_index()


def coverage(df: pd.DataFrame) -> pd.DataFrame:
    """Which (model, grid, site, layer, intervention) combos are present, with cell counts."""
    keys = ["model", "model_id", "grid", "intervention", "site", "layers", "layer"]
    if df.empty:
        return pd.DataFrame(columns=[*keys, "metrics", "cells"])
    g = df.groupby(keys, sort=False, dropna=False)
    out = g.agg(metrics=("metric", lambda s: ",".join(sorted(set(s)))), cells=("cell", "nunique"))
    out = out.reset_index()
    out["_g"] = [_grid_key(x) for x in out["grid"]]
    out["_s"] = [_site_key(x) for x in out["site"]]
    out = out.sort_values(["model", "_g", "intervention", "_s", "layer", "layers"])
    return out.drop(columns=["_g", "_s"]).reset_index(drop=True)


def coverage_compact(df: pd.DataFrame) -> pd.DataFrame:
    """Coverage folded per (model, grid, intervention): sites sharing the same layers and
    cell counts share a row, so a partial sweep stands out as an extra row."""
    cov = coverage(df)
    rows = []
    for (model, grid, iv), g in cov.groupby(["model", "grid", "intervention"], sort=False):
        by_site: dict[str, list[str]] = {}
        for site, h in g.groupby("site", sort=False):
            by_site[str(site)] = [
                f"{'L' + str(r.layers) if r.layers else 'no vector'}:{r.cells}"
                for r in h.itertuples(index=False)
            ]
        folded: dict[tuple[str, ...], list[str]] = {}
        for site, parts in by_site.items():
            folded.setdefault(tuple(parts), []).append(site)
        for parts, sites in folded.items():
            rows.append((model, grid, iv, ",".join(sites), ", ".join(parts)))
    return pd.DataFrame(rows, columns=["model", "grid", "intervention", "sites", "layer:cells"])


def render_coverage(df: pd.DataFrame) -> str:
    """One line per (model, grid, intervention, sites): layers present and cells at each."""
    return "\n".join(
        f"  {r.model} · {r.grid} · {r.intervention} · {r.sites}: {r[4]} cells"
        for r in coverage_compact(df).itertuples(index=False)
    )
