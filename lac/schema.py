"""The tidy results schema every job writes and every report reads.

One row per (cell, site, layer(s), intervention, metric). Kept in one place so
the runner, the tracker and the report cannot drift apart.
"""

from __future__ import annotations

# 2 added `factor` and `alpha` (designs beyond "As X, Y"), 3 `partner` (swap's partner rule); files of
# older schemas read with the defaults of the columns they lack (OLDER_DEFAULTS)
SCHEMA_VERSION = 3
READABLE_SCHEMAS = (1, 2, 3)

# column -> pandas dtype
COLUMNS: dict[str, str] = {
    "model": "string",  # config name, e.g. "qwen0.5"
    "model_id": "string",  # HF id or embedded identity, e.g. "google/gemma-2-2b-it"
    "grid": "string",  # grid name: short | long | markers | custom name
    "cell": "string",  # "{persona_key}__{task_key}"
    "persona": "string",  # persona key
    "task": "string",  # task key
    "site": "string",  # p_user_last | p_last | g1 | g2
    "layer": "int64",  # the layer (deepest layer of a multi-layer set; -1: no vector written)
    "layers": "string",  # "14" or "10,12,14"; "" when no vector is written
    "intervention": "string",  # additive | remove_x | ... | "decomposition" for geometry rows
    "metric": "string",  # kl | kl_partner | cos_xy_sum | cos_x_y | inter_ratio | cos_all_sum | cos_pair | inter_share
    #                      | marker_any | marker_distinct | marker_any_partner | attn_persona...
    "value": "float64",
    "factor": "string",  # the factor or subset ("persona+format") a row is about; "" for the whole design
    "alpha": "float64",  # steer / steer_host dose; NaN for every other intervention
    "partner": "string",  # swap's partner rule: next | same | "a>b,b>a" (a mapping); "" for every other
    "schema": "int64",  # SCHEMA_VERSION
}

OLDER_DEFAULTS = {"factor": "", "alpha": float("nan"), "partner": ""}  # what a row of an older schema lacks
SWAP = "swap"
DEFAULT_PARTNER = "next"

GEOMETRY_METRICS = ("cos_xy_sum", "cos_x_y", "inter_ratio")  # 2 factors (the paper)
DESIGN_METRICS = ("cos_all_sum", "inter_ratio", "cos_pair", "inter_share")  # k >= 3 factors
MARKER_METRICS = ("marker_any", "marker_distinct")
DECOMPOSITION = "decomposition"
# attention mass on the persona span in the clean XY run (schema 1 rows, intervention = "attention"):
# at the site (mean / max over heads) and averaged over the site's 10 window positions
ATTENTION = "attention"
ATTENTION_METRICS = ("attn_persona", "attn_persona_max", "attn_persona_window", "attn_persona_window_max")


def condition_label(intervention: str, factor: str | None, partner: str | None = None) -> str:
    """The name an intervention's rows are shown and summarised under: with the factor it acted on when
    that is not the persona (remove_x[task], knockout_persona[format]), and for swap with a partner rule
    other than `next` (swap(partner=same)), so jobs on different factors or rules are never pooled or read
    as the paper's persona interventions. Idempotent; rows keep their own columns."""
    f = factor if isinstance(factor, str) else ""
    p = partner if isinstance(partner, str) else ""
    label = intervention
    if not (not f or f == "persona" or intervention in (DECOMPOSITION, ATTENTION)
            or intervention.endswith((f"_{f}", f"[{f}]")) or f"[{f}](" in intervention):
        label = f"{intervention}[{f}]"
    if p and p != DEFAULT_PARTNER and intervention.split("[")[0] == SWAP and not label.endswith(")"):
        label = f"{label}(partner={p})"
    return label


def partner_label(rule: object) -> str:
    """swap's partner rule as one string for its rows: next | same | a mapping as "a>b,b>a" (sorted)."""
    if isinstance(rule, dict):
        return ",".join(f"{k}>{v}" for k, v in sorted((str(k), str(v)) for k, v in rule.items()))
    return str(rule)
