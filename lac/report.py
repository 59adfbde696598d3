"""`python -m lac.report PATH... [--out DIR] [--wandb]`: tables and figures from lac jobs.

Reads every job directory (a directory holding `results.parquet`) under the given
paths, checks the tidy schema, pools the rows into one table and writes, under
`--out` (default `<first PATH>/report`):

    results.parquet        all rows, exactly the columns of `lac.schema.COLUMNS`
    tables.md              tables 1-4 of the paper, lac next to the published numbers
    figures/kl_by_layer.{png,pdf}        the paper's Figure 1
    figures/geometry_by_layer.{png,pdf}
    report.json            what was read and written (also marks this dir as a report,
                           so a later run over the same root does not read it back)

Every median / IQR is computed within one grid (never pooled across grids) with
numpy's default (linear) percentiles, as in the paper. This module never loads a
model: it imports neither torch nor transformers, so it runs anywhere the
results can be copied to.

A results.parquet that cannot be read at all (truncated, empty, not parquet) is
skipped with a warning naming it, and the report is built from the others; one
that reads but carries another schema is refused (exit 3), as before: its rows
mean something else, so a report without them would be silently partial.

Exit codes: 0 done; 2 no results under the paths (or none of them readable);
3 results refused (schema).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

import lac
from lac.schema import COLUMNS, DECOMPOSITION, GEOMETRY_METRICS, MARKER_METRICS, SCHEMA_VERSION

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
REPORT_MARKER = "report.json"
REPORT_KIND = "lac-report"

EXIT_OK, EXIT_NO_RESULTS, EXIT_REFUSED = 0, 2, 3

SITE_ORDER = ("p_user_last", "p_last", "g1", "g2")
GRID_ORDER = ("short", "long", "markers")
MARKER_CONDITIONS = ("clean", "additive", "remove_x", "bare")
HOST_ORDER = ("host_none", "host_oracle", "host_additive")
FIGURE1_SITES = ("p_last", "g1", "g2")
KL_THRESHOLD = 0.1  # the dotted line of the paper's Figure 1
PAPER_KL_TABLES = {"short": "table1_short_grid_additive_kl", "long": "table2_long_grid_additive_kl"}
PAPER_GEMMA = "google/gemma-2-2b-it"
PAPER_SITE_T34 = "p_last"  # tables 3 and 4 are p_last only
PAPER_LAYER_T3 = "14"  # table 3 additive / remove_x are at L14
DASH = "–"

LEGEND = (
    "Cells: `median [p25, p75]` over cells (numpy linear percentiles), computed within one grid. "
    "`Lk` = lac at layer k, `Lk paper` = published value (arXiv 2605.23147). "
    "`*` = lac's median lies outside the published [p25, p75]. "
    "Tables 3, 4 and the geometry medians were published without an IQR, so they carry no `*`."
)


class SchemaError(ValueError):
    """Results written under a schema this report does not read."""


class UnreadableResultsWarning(UserWarning):
    """A results.parquet that could not be read was left out of the report."""


class NoReadableResults(RuntimeError):
    """Every results.parquet found was unreadable: nothing to build a report from."""

    def __init__(self, unreadable: Sequence[tuple[Path, str]]):
        self.unreadable = list(unreadable)
        listed = "; ".join(f"{f} ({why})" for f, why in self.unreadable)
        super().__init__(
            f"none of the {len(self.unreadable)} results file(s) found is readable: {listed}"
        )


# what reading a file that is not (or no longer) a whole parquet file raises: ArrowInvalid
# (a ValueError) for a missing footer or an empty file, OSError for corrupt pages or no access
UNREADABLE_ERRORS = (OSError, ValueError, pa.ArrowException)


# --------------------------------------------------------------------------- discovery


@dataclass
class Found:
    """What a search of the paths turned up (kept together so messages can list it)."""

    searched: list[Path]
    jobs: list[Path] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)


def _is_report_dir(d: Path) -> bool:
    """A previous report's output also holds results.parquet; it must not be read back."""
    marker = d / REPORT_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("kind") == REPORT_KIND
    except (OSError, ValueError, AttributeError):
        return False


def find_job_dirs(paths: Sequence[Path | str], exclude: Iterable[Path | str] = ()) -> Found:
    """Every job dir under `paths` (recursively), plus unfinished ones (parts/ only).

    A PATH may also be a results.parquet file. Report output dirs are skipped.
    """
    excluded = {Path(p).resolve() for p in exclude}
    found = Found(searched=[Path(p) for p in paths])
    jobs: dict[Path, None] = {}
    incomplete: dict[Path, None] = {}
    for p in found.searched:
        if p.is_file() and p.name == RESULTS_FILE:
            candidates = [p]
            roots: list[Path] = []
        elif p.is_dir():
            candidates = sorted(p.rglob(RESULTS_FILE))
            roots = [p, *sorted(d for d in p.rglob("*") if d.is_dir())]
        else:
            found.missing.append(p)
            continue
        for f in candidates:
            d = f.parent.resolve()
            if d in excluded or _is_report_dir(d):
                continue
            jobs[d] = None
        for d in roots:
            rd = d.resolve()
            if (d / "parts").is_dir() and not (d / RESULTS_FILE).exists() and rd not in excluded:
                incomplete[rd] = None
    found.jobs = list(jobs)
    found.incomplete = list(incomplete)
    return found


def read_summary(job_dir: Path) -> dict[str, Any] | None:
    """summary.json of a job, or None when absent or unreadable."""
    f = Path(job_dir) / SUMMARY_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def load_results(
    job_dirs: Sequence[Path],
    on_unreadable: Callable[[Path, str], None] | None = None,
) -> pd.DataFrame:
    """One tidy table from all jobs; refuses any job not written under SCHEMA_VERSION.

    Refusing (rather than coercing) is the point: a schema change means the rows
    mean something else, and a silently mixed report would be wrong.

    A results.parquet that cannot be read (truncated, empty, garbage) is skipped:
    `on_unreadable(path, reason)` is called for it (default: an
    UnreadableResultsWarning naming it). If every file is unreadable,
    NoReadableResults is raised.
    """
    frames = []
    unreadable: list[tuple[Path, str]] = []
    for d in job_dirs:
        f = Path(d) / RESULTS_FILE
        summary = read_summary(Path(d)) or {}
        written_by = (
            f" (written by lac {summary['lac_version']})" if "lac_version" in summary else ""
        )
        if "schema" in summary and summary["schema"] != SCHEMA_VERSION:
            raise SchemaError(
                f"{Path(d) / SUMMARY_FILE}: schema {summary['schema']!r}{written_by}; "
                f"this lac {lac.__version__} reads schema {SCHEMA_VERSION} only"
            )
        try:
            df = pd.read_parquet(f)
        except UNREADABLE_ERRORS as e:
            why = f"{type(e).__name__}: {e}"
            unreadable.append((f, why))
            if on_unreadable is None:
                warnings.warn(
                    f"skipped unreadable results file {f} ({why})",
                    UnreadableResultsWarning,
                    stacklevel=2,
                )
            else:
                on_unreadable(f, why)
            continue
        if "schema" not in df.columns:
            raise SchemaError(
                f"{f}: no 'schema' column{written_by}; "
                f"this lac {lac.__version__} reads schema {SCHEMA_VERSION} only"
            )
        col = df["schema"]
        if col.isna().any() or (col.dropna() != SCHEMA_VERSION).any():
            shown = ", ".join(str(v) for v in sorted(set(col.dropna().tolist()))) or "missing"
            raise SchemaError(
                f"{f}: schema {shown}{written_by}; "
                f"this lac {lac.__version__} reads schema {SCHEMA_VERSION} only"
            )
        missing = [c for c in COLUMNS if c not in df.columns]
        if missing:
            raise SchemaError(f"{f}: schema {SCHEMA_VERSION} but columns missing: {missing}")
        frames.append(df[list(COLUMNS)])
    if unreadable and not frames:
        raise NoReadableResults(unreadable)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})
    out = pd.concat(frames, ignore_index=True).astype(COLUMNS)
    out["layers"] = out["layers"].map(_norm_layers).astype("string")
    return out


def drop_duplicate_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the last copy of a row measured twice (e.g. a sweep run again).

    Two copies of one cell would count it twice in every median.
    """
    key = [c for c in COLUMNS if c not in ("value", "schema")]
    dup = df.duplicated(subset=key, keep="last")
    return df[~dup].reset_index(drop=True), int(dup.sum())


# --------------------------------------------------------------------------- helpers


def _norm_layers(s: Any) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)) or s is pd.NA:
        return ""
    return ",".join(p.strip() for p in str(s).split(",") if p.strip())


def _site_key(site: str) -> tuple[int, str]:
    return (SITE_ORDER.index(site), "") if site in SITE_ORDER else (len(SITE_ORDER), site)


def _grid_key(grid: str) -> tuple[int, str]:
    return (GRID_ORDER.index(grid), "") if grid in GRID_ORDER else (len(GRID_ORDER), grid)


def _host_key(intervention: str, layers: str) -> tuple[int, str, int, str]:
    i = HOST_ORDER.index(intervention) if intervention in HOST_ORDER else len(HOST_ORDER)
    n = len(layers.split(",")) if layers else 0
    return (i, intervention, n, layers)


def _condition_key(intervention: str) -> tuple[int, str]:
    if intervention in MARKER_CONDITIONS:
        return (MARKER_CONDITIONS.index(intervention), "")
    return (len(MARKER_CONDITIONS), intervention)


def fmt(v: float | None) -> str:
    """3 significant digits, the paper's precision; dash for absent."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    return f"{v:.3g}"


def fmt_iqr(med: float, p25: float, p75: float) -> str:
    return f"{fmt(med)} [{fmt(p25)}, {fmt(p75)}]"


def percentiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, p25, p75) with numpy's default linear interpolation, NaNs dropped."""
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    p25, med, p75 = np.percentile(v, [25, 50, 75])
    return (float(med), float(p25), float(p75))


def is_single_layer(layers: str) -> bool:
    return bool(layers) and "," not in layers


def layer_set_label(intervention: str, layers: str) -> str:
    """`host_additive [10,12,14]`; no bracket when no vector is written."""
    return f"{intervention} [{layers}]" if layers else intervention


def model_labels(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Display name per (model, model_id): the config name, plus the id if ambiguous."""
    pairs = sorted({(str(m), str(i)) for m, i in zip(df["model"], df["model_id"], strict=True)})
    names: dict[str, int] = {}
    for m, _ in pairs:
        names[m] = names.get(m, 0) + 1
    return {(m, i): (m if names[m] == 1 else f"{m} ({i})") for m, i in pairs}


@lru_cache(maxsize=1)
def load_paper_tables() -> dict[str, Any]:
    """The paper's published numbers, shipped with the package."""
    return yaml.safe_load((Path(lac.__file__).parent / "data" / "paper-tables.yaml").read_text())


# --------------------------------------------------------------------------- published values


def published_kl(
    paper: dict[str, Any],
    model_id: str,
    grid: str,
    site: str,
    layer: int,
    intervention: str = "additive",
) -> tuple[float, float, float] | None:
    """(median, p25, p75) from table 1 (grid short) or table 2 (grid long), additive only."""
    if intervention != "additive" or grid not in PAPER_KL_TABLES:
        return None
    cell = paper.get(PAPER_KL_TABLES[grid], {}).get(model_id, {}).get(site, {}).get(int(layer))
    return None if cell is None else (float(cell[0]), float(cell[1]), float(cell[2]))


def published_geometry(
    paper: dict[str, Any], model_id: str, grid: str, site: str, layer: int, metric: str
) -> float | None:
    """A median quoted in the paper's text (sections 4-5), keyed `{grid}_L{layer}_{metric}`."""
    v = (
        paper.get("geometry_medians", {})
        .get(model_id, {})
        .get(f"{grid}_L{int(layer)}_{metric}", {})
    )
    v = v.get(site)
    return None if v is None else float(v)


def published_markers(
    paper: dict[str, Any], model_id: str, intervention: str, site: str, layers: str
) -> dict[str, float] | None:
    """Table 3 row (Gemma; additive/remove_x at p_last L14; clean and bare)."""
    if model_id != PAPER_GEMMA:
        return None
    if layers and (site != PAPER_SITE_T34 or layers != PAPER_LAYER_T3):
        return None
    row = paper.get("table3_markers", {}).get(intervention)
    return None if row is None else {k: float(v) for k, v in row.items()}


def published_host(
    paper: dict[str, Any], model_id: str, intervention: str, site: str, layers: str
) -> float | None:
    """Table 4 median (Gemma, p_last): host_none, host_oracle L14, host_additive layer sets."""
    if model_id != PAPER_GEMMA or site != PAPER_SITE_T34:
        return None
    t4 = paper.get("table4_host_injection_kl", {})
    if intervention == "host_none" and not layers:
        v = t4.get("host_none")
    elif intervention in ("host_oracle", "host_additive") and is_single_layer(layers):
        v = t4.get(f"{intervention}_L{layers}")
    elif intervention == "host_additive":
        v = t4.get("host_additive_layers", {}).get(layers)
    else:
        v = None
    return None if v is None else float(v)


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
    """KL rows of table 4 (host_* interventions) or of other multi-layer injections."""
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

    def tables(self) -> list[Table]:
        return [t for _, ts in self.sections for t in ts]


def build_tables(df: pd.DataFrame, paper: dict[str, Any] | None = None) -> Report:
    """Every table, one grid at a time (medians are never pooled across grids)."""
    paper = load_paper_tables() if paper is None else paper
    ksum, gsum, msum = kl_summary(df), geometry_summary(df), marker_summary(df)
    sections: list[tuple[str, list[Table]]] = []
    short: list[Table] = []

    cov = Table("Present combos (cells per layer)", coverage_compact(df), key="coverage")
    sections.append(("Coverage", [cov]))

    single = ksum[
        ksum["layers"].map(is_single_layer) & ~ksum["intervention"].str.startswith("host_")
    ]
    grids = sorted(set(ksum["grid"]) | set(gsum["grid"]), key=_grid_key)
    for grid in grids:
        ts: list[Table] = []
        ivs = sorted(set(single.loc[single["grid"] == grid, "intervention"]), key=_condition_key)
        for iv in ivs:
            ts.append(kl_layer_table(ksum, grid, iv, paper))
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
        counts = persona_marker_counts(df, model, model_id, grid)
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
    return Report(sections, short)


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
    return "\n".join(parts).rstrip() + "\n"


def render_short(report: Report) -> str:
    """What the terminal gets: additive medians, markers and host tables."""
    parts = []
    for t in report.short:
        parts += [t.title, to_markdown(t.frame), *[f"  ({n})" for n in t.notes], ""]
    if parts:
        parts.append("* = lac median outside the published [p25, p75]")
    return "\n".join(parts)


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


# --------------------------------------------------------------------------- writing


def _atomic(path: Path, write: Any) -> Path:
    """Write via a temp file in the same dir, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    return _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_text(text: str, path: Path) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """PNG and PDF of one figure."""
    return [
        _atomic(stem.with_suffix(f".{ext}"), lambda tmp, e=ext: fig.savefig(tmp, format=e, dpi=150))
        for ext in ("png", "pdf")
    ]


# --------------------------------------------------------------------------- W&B


def wandb_group(job_dirs: Sequence[Path]) -> str:
    """The sweep's group: config.tracker.group of a summary.json, else the multirun dir name."""
    group = _tracker_config(job_dirs).get("group")
    if group:
        return str(group)
    for d in job_dirs:
        d = Path(d)
        sweep = d.parent if d.name.isdigit() else d
        if (sweep / "multirun.yaml").exists() or d.name.isdigit():
            if sweep.parent.parent.name == "multirun":  # multirun/DATE/TIME
                return f"{sweep.parent.name}_{sweep.name}"
            return sweep.name
    return Path(job_dirs[0]).name if job_dirs else "report"


def _tracker_config(job_dirs: Sequence[Path]) -> dict[str, Any]:
    """config.tracker of the first summary.json that has one."""
    for d in job_dirs:
        config = (read_summary(d) or {}).get("config")
        tracker = config.get("tracker") if isinstance(config, dict) else None
        if isinstance(tracker, dict):
            return tracker
    return {}


def wandb_mode() -> str | None:
    """None (let wandb decide) when WANDB_MODE or an API key is configured, else "offline".

    Never prompts for a login and never reaches the network without credentials.
    """
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlparse

    host = (
        urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        or "api.wandb.ai"
    )
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        if rc.authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def upload_to_wandb(
    report: Report,
    figures: dict[str, Path],
    *,
    group: str,
    out_dir: Path,
    tracker: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra_tables: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Tables (wandb.Table) and figures (wandb.Image) in one run, job_type "report"."""
    import wandb  # lazily: only --wandb pays for it

    tracker = tracker or {}
    kwargs: dict[str, Any] = {
        "project": os.environ.get("WANDB_PROJECT") or tracker.get("project") or "lac",
        "group": group,
        "job_type": "report",
        "name": f"report-{group}",
        "config": config or {},
    }
    if tracker.get("entity") and not os.environ.get("WANDB_ENTITY"):
        kwargs["entity"] = tracker["entity"]
    if not os.environ.get("WANDB_DIR"):
        kwargs["dir"] = str(out_dir)
    mode = wandb_mode()
    if mode:
        kwargs["mode"] = mode
    run = wandb.init(**kwargs)
    try:
        payload: dict[str, Any] = {}
        for t in report.tables():
            if not t.frame.empty:
                payload[f"tables/{t.key}"] = wandb.Table(dataframe=t.frame.astype(str))
        for name, df in (extra_tables or {}).items():
            if not df.empty:
                payload[f"data/{name}"] = wandb.Table(dataframe=df)
        for name, png in figures.items():
            payload[f"figures/{name}"] = wandb.Image(str(png))
        run.log(payload)
        run_dir = Path(run.settings.sync_dir)
    finally:
        run.finish()
    return run_dir


# --------------------------------------------------------------------------- CLI


def default_out(first: Path) -> Path:
    first = Path(first)
    return (first if first.is_dir() else first.parent) / "report"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m lac.report",
        description="Tables (paper tables 1-4, side by side with the published numbers) and "
        "figures from lac job dirs.",
    )
    ap.add_argument("paths", nargs="+", type=Path, help="job dirs, multirun dirs or results roots")
    ap.add_argument(
        "--out", type=Path, default=None, help="output dir (default: <first PATH>/report)"
    )
    ap.add_argument("--wandb", action="store_true", help="upload tables and figures to one W&B run")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out if args.out is not None else default_out(args.paths[0])
    found = find_job_dirs(args.paths, exclude=[out])
    err = sys.stderr

    if not found.jobs:
        print(
            "lac.report: no results found (no job dir holding results.parquet). Searched:", file=err
        )
        for p in found.searched:
            print(f"  {p}{'  (does not exist)' if p in found.missing else ''}", file=err)
        for d in found.incomplete:
            print(f"  incomplete job (parts/ only): {d}", file=err)
        return EXIT_NO_RESULTS
    for p in found.missing:
        print(f"lac.report: warning: {p} does not exist", file=err)

    unreadable: list[Path] = []

    def skip(f: Path, why: str) -> None:
        unreadable.append(f)
        print(f"lac.report: warning: skipped unreadable results file {f} ({why})", file=err)

    try:
        df = load_results(found.jobs, on_unreadable=skip)
    except SchemaError as e:
        print(f"lac.report: refused: {e}", file=err)
        return EXIT_REFUSED
    except NoReadableResults as e:
        print(f"lac.report: no readable results: {e}", file=err)
        return EXIT_NO_RESULTS
    jobs = [d for d in found.jobs if Path(d) / RESULTS_FILE not in unreadable]
    df, n_dup = drop_duplicate_rows(df)
    if df.empty:
        print(f"lac.report: {len(jobs)} job dir(s) found but they hold no rows", file=err)
        return EXIT_NO_RESULTS

    print(
        f"lac.report: {len(jobs)} job dir(s), {len(df)} rows, {len(found.incomplete)} incomplete"
        + (f", {len(unreadable)} unreadable results file(s) skipped" if unreadable else "")
    )
    if n_dup:
        print(
            f"lac.report: warning: {n_dup} duplicated row(s) (same cell measured twice); kept the last"
        )
    for d in found.incomplete:
        print(f"  incomplete (parts/ without results.parquet): {d}")
    print("present (model · grid · intervention · site: layer:cells):")
    print(render_coverage(df))

    report = build_tables(df)
    header = [
        f"lac {lac.__version__}, schema {SCHEMA_VERSION}. {len(jobs)} job dir(s), "
        f"{len(df)} rows, {len(found.incomplete)} incomplete job dir(s).",
        "",
        "Searched: " + ", ".join(f"`{p}`" for p in found.searched),
    ]
    if found.incomplete:
        header += ["", "Incomplete: " + ", ".join(f"`{d}`" for d in found.incomplete)]
    if unreadable:
        header += ["", "Skipped (unreadable): " + ", ".join(f"`{f}`" for f in unreadable)]

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    written["results"] = str(write_parquet(df, out / RESULTS_FILE))
    written["tables"] = str(write_text(render_markdown(report, header), out / "tables.md"))

    figures: dict[str, Path] = {}
    for name, make in (
        ("kl_by_layer", kl_by_layer_figure),
        ("geometry_by_layer", geometry_by_layer_figure),
    ):
        fig = make(df)
        if fig is None:
            print(f"lac.report: no data for figure {name}; skipped")
            continue
        paths = save_figure(fig, out / "figures" / name)
        figures[name] = paths[0]
        written[f"figure_{name}"] = [str(p) for p in paths]

    if args.wandb:
        group = wandb_group(found.jobs)
        run_dir = upload_to_wandb(
            report,
            figures,
            group=group,
            out_dir=out,
            tracker=_tracker_config(found.jobs),
            config={
                "paths": [str(p) for p in found.searched],
                "n_jobs": len(jobs),
                "lac_version": lac.__version__,
                "schema": SCHEMA_VERSION,
            },
            extra_tables={
                "kl_summary": kl_summary(df),
                "geometry_summary": geometry_summary(df),
                "marker_summary": marker_summary(df),
                "coverage": coverage(df),
            },
        )
        written["wandb_run_dir"] = str(run_dir)
        print(f"lac.report: W&B run (group {group!r}, job_type 'report'): {run_dir}")

    manifest = {
        "kind": REPORT_KIND,
        "lac_version": lac.__version__,
        "schema": SCHEMA_VERSION,
        "searched": [str(p) for p in found.searched],
        "job_dirs": [str(d) for d in jobs],
        "incomplete": [str(d) for d in found.incomplete],
        "unreadable": [str(f) for f in unreadable],
        "written": written,
    }
    write_text(json.dumps(manifest, indent=2) + "\n", out / REPORT_MARKER)

    print()
    print(render_short(report))
    print()
    print(f"lac.report: wrote {out}/")
    print(f"  {RESULTS_FILE}  tables.md  {REPORT_MARKER}")
    for name in figures:
        print(f"  figures/{name}.png  figures/{name}.pdf")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
