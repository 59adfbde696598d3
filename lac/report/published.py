"""The paper's published values (arXiv 2605.23147), shipped in lac/data/paper-tables.yaml."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

import lac
from lac.report._common import (
    PAPER_GEMMA,
    PAPER_KL_TABLES,
    PAPER_LAYER_T3,
    PAPER_SITE_T34,
    is_single_layer,
)


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
