"""Constants and small helpers shared by the report's modules (orders, formats, labels)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from lac.schema import condition_label
from lac.stats import quartiles

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
REPORT_MARKER = "report.json"
REPORT_KIND = "lac-report"

EXIT_OK, EXIT_NO_RESULTS, EXIT_REFUSED = 0, 2, 3

SITE_ORDER = ("p_user_last", "p_last", "g1", "g2")
GRID_ORDER = ("short", "long", "markers")
MARKER_CONDITIONS = ("clean", "additive", "remove_x", "bare")
HOST_ORDER = ("host_none", "host_oracle", "host_additive")
# METHOD.md "Controls and mechanism interventions": their own table and figure (not tables 1-4)
CONTROL_INTERVENTIONS = (
    "host_none_lm", "host_oracle_lm", "host_oracle_norm", "host_oracle_span", "kv_persona", "knockout_persona",
)
# the controls table's rows: the controls and their references, in this order
CONTROL_ORDER = (
    "clean", "host_none", "host_none_lm", "host_oracle", "host_oracle_norm", "host_oracle_lm",
    "host_oracle_span", "kv_persona", "knockout_persona",
)
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


# --------------------------------------------------------------------------- helpers


def _norm_layers(s: Any) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)) or s is pd.NA:
        return ""
    return ",".join(p.strip() for p in str(s).split(",") if p.strip())


def _site_key(site: str) -> tuple[int, str]:
    return (SITE_ORDER.index(site), "") if site in SITE_ORDER else (len(SITE_ORDER), site)


def _grid_key(grid: str) -> tuple[int, str]:
    return (GRID_ORDER.index(grid), "") if grid in GRID_ORDER else (len(GRID_ORDER), grid)


def _host_key(intervention: str, layers: str) -> tuple:
    """Paper order of host interventions, then single layers before sets, layers as numbers (2 < 10)."""
    from lac.stats import layers_key

    i = HOST_ORDER.index(intervention) if intervention in HOST_ORDER else len(HOST_ORDER)
    n = len(layers.split(",")) if layers else 0
    return (i, intervention, n, layers_key(layers))


BY_FACTOR = ("steer", "steer_host")  # the designs section splits these by factor itself (no other table has them)


def label_conditions(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose intervention acted on a factor other than the persona renamed remove_x[task] and so on,
    and swap rows of a partner rule other than `next` swap(partner=same) (lac.schema.condition_label), so
    no table pools them with the persona's (or the default rule's) or sets them beside the paper's."""
    if df.empty or "factor" not in df:
        return df
    partners = df["partner"] if "partner" in df else [""] * len(df)
    labels = [i if i in BY_FACTOR else condition_label(str(i), f if isinstance(f, str) else "", p)
              for i, f, p in zip(df["intervention"], df["factor"], partners, strict=True)]
    return df.assign(intervention=pd.Series(labels, index=df.index, dtype=df["intervention"].dtype))


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
    """(median, p25, p75) with numpy's default linear interpolation, NaNs dropped (lac.stats)."""
    return quartiles(values)


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
