"""The tidy results schema every job writes and every report reads.

One row per (cell, site, layer(s), intervention, metric). Kept in one place so
the runner, the tracker and the report cannot drift apart.
"""

from __future__ import annotations

SCHEMA_VERSION = 2  # 2 added `factor` and `alpha` (designs beyond "As X, Y"); schema-1 files read with "" / NaN
READABLE_SCHEMAS = (1, 2)

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
    "schema": "int64",  # SCHEMA_VERSION
}

GEOMETRY_METRICS = ("cos_xy_sum", "cos_x_y", "inter_ratio")  # 2 factors (the paper)
DESIGN_METRICS = ("cos_all_sum", "inter_ratio", "cos_pair", "inter_share")  # k >= 3 factors
MARKER_METRICS = ("marker_any", "marker_distinct")
DECOMPOSITION = "decomposition"
# attention mass on the persona span in the clean XY run (schema 1 rows, intervention = "attention"):
# at the site (mean / max over heads) and averaged over the site's 10 window positions
ATTENTION = "attention"
ATTENTION_METRICS = ("attn_persona", "attn_persona_max", "attn_persona_window", "attn_persona_window_max")


def condition_label(intervention: str, factor: str | None) -> str:
    """The name an intervention's rows are shown and summarised under: with the factor it acted on when
    that is not the persona (remove_x[task], knockout_persona[format]), so jobs on different factors are
    never pooled or read as the paper's persona interventions. Idempotent; rows keep their own columns."""
    f = factor if isinstance(factor, str) else ""
    if (not f or f == "persona" or intervention in (DECOMPOSITION, ATTENTION)
            or intervention.endswith((f"_{f}", f"[{f}]"))):
        return intervention
    return f"{intervention}[{f}]"
