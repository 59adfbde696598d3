"""The executor: interventions' Changes as batched engine rows, and their causal KL.

A Change says from which position and layer a host run differs from its clean
capture. Its row continues the host's clean trace up to `start` (K/V swapped
where the change says), enters the stack at `first_layer` with the clean
residual, writes its vectors, knocks out its keys, and reads log-probs over the
site's window only. Rows of any cells, sites, layers and interventions that
share a first layer, a length and a window offset go into one forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from lac.capture import CellCapture
from lac.engine import Row, Trace, run_rows
from lac.interventions import Change, Job
from lac.metrics import kl_window
from lac.models import LoadedModel
from lac.sites import WINDOW, window_first_position, window_start


def with_xy_kv(host: Trace, xy: Trace, where: Sequence[tuple[int, int, int]]) -> Trace:
    """The host's trace with K/V at (layer, first, end) positions replaced by clean XY's."""
    kv = list(host.kv)
    for layer, lo, hi in where:
        k, v = kv[layer][0].clone(), kv[layer][1].clone()
        k[:, lo:hi], v[:, lo:hi] = xy.kv[layer][0][:, lo:hi], xy.kv[layer][1][:, lo:hi]
        kv[layer] = (k, v)
    return Trace(host.ids, kv, host.hidden, host.first, host.depth)


def change_row(cap: CellCapture, change: Change, end: int) -> Row:
    """The engine row of a Change: the host's tokens start..end-1 continuing its clean trace."""
    host = cap.traces[change.host]
    if change.kv_from_xy:
        host = with_xy_kv(host, cap.traces[cap.full], change.kv_from_xy)
    start = change.start
    patches = [(L, p - start, vec) for L, p, vec in change.writes]
    return Row(host.ids[start:end], prefix=host, start=start, patches=patches, knockout=list(change.knockout))


def kl_rows(
    lm: LoadedModel, caps: Sequence[CellCapture], jobs: Sequence[Job], *, max_rows: int = 64,
) -> list[tuple[CellCapture, Job, str, float]]:
    """Causal KL of every (cell, job) against each of its intervention's targets (metric "kl":
    the clean XY window; swap adds "kl_partner", the clean X'Y window): (cap, job, metric, kl)."""
    out: list[tuple[CellCapture, Job, str, float]] = []
    groups: dict[tuple, list[tuple[CellCapture, Job, Row, int]]] = defaultdict(list)

    def record(cap: CellCapture, job: Job, window: torch.Tensor) -> None:
        for metric, role in job.intervention.targets().items():
            out.append((cap, job, metric, kl_window(_target(cap, job.site, role), window)))

    for job in jobs:
        iv, w0 = job.intervention, window_start(job.site)
        for cap in caps:
            hp = cap.prompts[iv.host]
            first = window_first_position(job.site, len(hp.ids))
            if not iv.writes or not job.layers:
                record(cap, job, _window(cap.logp[iv.host], first))
                continue
            change = iv.change(cap, job.site, job.layers)
            if not (change.writes or change.kv_from_xy or change.knockout):  # e.g. steer at alpha 1
                record(cap, job, _window(cap.logp[iv.host], first))
                continue
            end = len(hp.ids) + w0 + WINDOW - 1  # last token whose logits the window reads
            row = change_row(cap, change, end)
            groups[(change.first_layer, end - change.start, first - change.start)].append((cap, job, row, first))

    for (start_layer, _n, offset), items in groups.items():
        size = -(-len(items) // -(-len(items) // max_rows))  # even chunks of at most max_rows
        for i in range(0, len(items), size):
            chunk = items[i : i + size]
            traces = run_rows(
                lm, [r for _, _, r, _ in chunk], start_layer=start_layer,
                logp_at=[range(offset, offset + WINDOW)] * len(chunk), scratch_logp=True,  # read at once below
            )
            for (cap, job, _, first), t in zip(chunk, traces, strict=True):
                record(cap, job, _window(t.logp, first))
    return out


def kl_records(
    lm: LoadedModel, caps: Sequence[CellCapture], jobs: Sequence[Job], *, max_rows: int = 64,
) -> list[tuple[CellCapture, Job, float]]:
    """Causal KL of every (cell, job) against the clean XY window."""
    return [(c, j, v) for c, j, m, v in kl_rows(lm, caps, jobs, max_rows=max_rows) if m == "kl"]


def attention_mass(
    lm: LoadedModel, caps: Sequence[CellCapture], sites: Sequence[str], *, max_rows: int = 64,
) -> list[tuple[CellCapture, str, int, dict[str, float]]]:
    """attn_persona(L) of METHOD.md in the clean XY run, every layer: the softmax mass on the
    persona span's keys, mean (and max) over heads, at the site and averaged over its window."""
    out = []
    for i in range(0, len(caps), max_rows):
        chunk = caps[i : i + max_rows]
        rows = []
        for cap in chunk:
            xy, (s, e) = cap.traces[cap.full], cap.prompts[cap.full].span
            rows.append(Row(xy.ids[e:], prefix=xy, start=e, probe=(s, e)))
        for cap, row, t in zip(chunk, rows, run_rows(lm, rows, depth=lm.n_layers), strict=True):
            n = len(cap.prompts[cap.full].ids)
            for site in sites:
                q = cap.pos(cap.full, site) - row.start
                w = window_first_position(site, n) - row.start
                for L, mass in sorted(t.mass.items()):  # [heads, queries]
                    win = mass[:, w : w + WINDOW]
                    out.append((cap, site, L, {
                        "attn_persona": float(mass[:, q].mean()), "attn_persona_max": float(mass[:, q].max()),
                        "attn_persona_window": float(win.mean()),
                        "attn_persona_window_max": float(win.max(0).values.mean()),
                    }))
    return out


def _target(cap: CellCapture, site: str, role: str) -> torch.Tensor:
    """Clean log-probs of `role` (paper: XY) over the site's window: the distribution a KL compares to."""
    return _window(cap.logp[role], window_first_position(site, len(cap.prompts[role].ids)))


def _window(logp: dict[int, torch.Tensor], first: int) -> torch.Tensor:
    return torch.stack([logp[first + j] for j in range(WINDOW)])
