"""KL over the teacher-forced window, decomposition geometry, and summary statistics."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

EPS = 1e-9  # in every denominator, as the paper


def kl_window(logp_clean: torch.Tensor, logp_int: torch.Tensor) -> float:
    """Sum over window positions of KL(P_clean || P_intervened), nats; inputs [window, vocab]."""
    return float(kl_window_tensor(logp_clean, logp_int))


def kl_window_tensor(logp_clean: torch.Tensor, logp_int: torch.Tensor) -> torch.Tensor:
    """kl_window as a 0-d tensor on the intervened side's device (clean captures are kept on the CPU)."""
    li = logp_int.float()
    lc = logp_clean.to(device=li.device, dtype=torch.float32)
    return (lc.exp() * (lc - li)).sum()


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


def main_effects(h: dict[tuple[str, ...], torch.Tensor], factors: Sequence[str]) -> dict[str, torch.Tensor]:
    """D_f = h_{f} - h_{} for each factor; h maps a subset of factors (in factor order) to its residual."""
    return {f: h[(f,)] - h[()] for f in factors}


def interactions(h: dict[tuple[str, ...], torch.Tensor], factors: Sequence[str]) -> dict[tuple[str, ...], torch.Tensor]:
    """Moebius terms I_S = sum over T in S of (-1)^{|S|-|T|} h_T for |S| >= 2, so that
    h_all = h_{} + sum_f D_f + sum_S I_S exactly (METHOD.md, "Designs beyond")."""
    out = {}
    for k in range(2, len(factors) + 1):
        for s in itertools.combinations(factors, k):
            terms = [(-1) ** (k - j) * h[t] for j in range(k + 1) for t in itertools.combinations(s, j)]
            out[s] = torch.stack(terms).sum(0)
    return out


def design_geometry(h: dict[tuple[str, ...], torch.Tensor], factors: Sequence[str]) -> list[tuple[str, str, float]]:
    """(metric, factor subset, value) rows of the decomposition at one site and layer.

    Two factors: the paper's cos_xy_sum, cos_x_y, inter_ratio (same numbers as `geometry`).
    k >= 3: cos_all_sum = cos(h_all - h_{}, sum_f D_f); inter_ratio = |h_all - h_{} - sum_f D_f|
    / |h_all - h_{}|; cos_pair per pair of factors ("f+g"); inter_share = |I_S| / |h_all - h_{}|
    per subset S of >= 2 factors.
    """
    factors = list(factors)
    if len(factors) == 2:
        a, b = factors
        return [(m, "", v) for m, v in geometry(h[()], h[(a,)], h[(b,)], h[(a, b)]).items()]
    d = main_effects(h, factors)
    total = h[tuple(factors)] - h[()]
    summed = torch.stack(list(d.values())).sum(0)
    denom = total.norm() + EPS
    rows = [("cos_all_sum", "", cosine(total, summed)),
            ("inter_ratio", "", float((total - summed).norm() / denom))]
    rows += [("cos_pair", f"{f}+{g}", cosine(d[f], d[g])) for f, g in itertools.combinations(factors, 2)]
    rows += [("inter_share", "+".join(s), float(i.norm() / denom)) for s, i in interactions(h, factors).items()]
    return rows


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, 25th/75th percentile (numpy's default interpolation), min, max over cells
    (lac.stats.describe: the one place medians and IQRs are computed)."""
    from lac.stats import describe

    return describe(values)
