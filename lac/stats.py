"""Summary statistics over cells, in one place: every median and IQR lac prints, logs or reports.

Torch-free (numpy only), so the report and the dashboard use it without loading a model.
Percentiles are numpy's default (linear interpolation), as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

QUARTILES = (25, 50, 75)


def quartiles(values: Iterable[float], *, dropna: bool = True) -> tuple[float, float, float]:
    """(median, p25, p75) with numpy's linear interpolation; NaNs dropped unless dropna=False.
    All NaN (or empty): three NaNs."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if dropna:
        v = v[~np.isnan(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    p25, med, p75 = np.percentile(v, QUARTILES)
    return (float(med), float(p25), float(p75))


def describe(values: Iterable[float]) -> dict[str, Any]:
    """median, p25, p75, min, max, n over cells (NaNs kept: a NaN cell makes the stats NaN)."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    med, p25, p75 = quartiles(v, dropna=False)
    empty = v.size == 0
    return {"median": med, "p25": p25, "p75": p75,
            "min": math.nan if empty else float(v.min()), "max": math.nan if empty else float(v.max()),
            "n": int(v.size)}


def layers_key(layers: Any) -> tuple[int, tuple[int, ...]]:
    """Sort key for a layer or a layer set ("6", "10,12,14", 13, ""): by number, never as text.
    No layer ("") first, then single layers by value, then sets by size and layers."""
    if layers is None or (isinstance(layers, float) and math.isnan(layers)):
        return (0, ())
    if isinstance(layers, (int, np.integer)):
        return (1, (int(layers),))
    parts = tuple(int(p) for p in str(layers).split(",") if p.strip())
    return (0 if not parts else 1 if len(parts) == 1 else 2, parts)


__all__ = ["QUARTILES", "describe", "layers_key", "quartiles"]
