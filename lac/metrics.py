"""KL over the teacher-forced window, decomposition geometry, and summary statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-9  # in every denominator, as the paper


def kl_window(logp_clean: torch.Tensor, logp_int: torch.Tensor) -> float:
    """Sum over window positions of KL(P_clean || P_intervened), nats; inputs [window, vocab]."""
    lc, li = logp_clean.float(), logp_int.float()
    return float((lc.exp() * (lc - li)).sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm() + EPS))


def geometry(h_bb: torch.Tensor, h_xb: torch.Tensor, h_by: torch.Tensor, h_xy: torch.Tensor) -> dict[str, float]:
    """cos(dXY, dX+dY), cos(dX, dY), |Inter|/|dXY| of the 2x2 at one site and layer (float32)."""
    delta_x, delta_y, delta_xy = h_xb - h_bb, h_by - h_bb, h_xy - h_bb
    inter = delta_xy - delta_x - delta_y
    return {
        "cos_xy_sum": cosine(delta_xy, delta_x + delta_y),
        "cos_x_y": cosine(delta_x, delta_y),
        "inter_ratio": float(inter.norm() / (delta_xy.norm() + EPS)),
    }


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, 25th/75th percentile (numpy's default interpolation), min, max over cells
    (lac.stats.describe: the one place medians and IQRs are computed)."""
    from lac.stats import describe

    return describe(values)
