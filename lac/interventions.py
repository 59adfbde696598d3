"""The paper's interventions (METHOD.md table): a host prompt and the vector written at a site.

Each is one small class: `host` names the prompt role that runs, `vector`
returns what is written into the residual stream entering block `layer` at the
site (None: nothing is written). `layers` is None for "each of the job's layers
on its own", or a set applied at once (multi-layer injection, each layer with
its own vectors).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lac.capture import CellCapture
from lac.engine import Row, run_rows
from lac.metrics import kl_window
from lac.models import LoadedModel
from lac.sites import WINDOW, window_first_position, window_start


class Intervention:
    name: str = ""
    host: str = "XY"
    writes: bool = True

    def vector(self, cap: CellCapture, site: str, layer: int) -> torch.Tensor | None:
        raise NotImplementedError


def additive_vector(cap: CellCapture, site: str, layer: int) -> torch.Tensor:
    """h_BB + dX + dY: the persona and task directions composed additively."""
    h_bb = cap.h("BB", site, layer)
    delta_x = cap.h("XB", site, layer) - h_bb
    delta_y = cap.h("BY", site, layer) - h_bb
    return h_bb + delta_x + delta_y


class Clean(Intervention):
    name, writes = "clean", False


class Additive(Intervention):
    name = "additive"

    def vector(self, cap, site, layer):
        return additive_vector(cap, site, layer)


class RemoveX(Intervention):
    name = "remove_x"

    def vector(self, cap, site, layer):
        delta_x = cap.h("XB", site, layer) - cap.h("BB", site, layer)
        return cap.h("XY", site, layer) - delta_x


class HostNone(Intervention):
    name, host, writes = "host_none", "BY", False


class HostOracle(Intervention):
    name, host = "host_oracle", "BY"

    def vector(self, cap, site, layer):
        return cap.h("XY", site, layer)


class HostAdditive(Intervention):
    name, host = "host_additive", "BY"

    def vector(self, cap, site, layer):
        return additive_vector(cap, site, layer)


class Bare(Intervention):
    name, host, writes = "bare", "bare", False


INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls for cls in (Clean, Additive, RemoveX, HostNone, HostOracle, HostAdditive, Bare)
}


def get_intervention(name: str) -> Intervention:
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; allowed: {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[name]()


@dataclass(frozen=True)
class Job:
    """One intervention at one site and one layer set (empty for no vector)."""

    intervention: Intervention
    site: str
    layers: tuple[int, ...]


def roles_needed(interventions: Sequence[Intervention]) -> tuple[set[str], set[str], set[str]]:
    """(prompt roles to capture, hosts whose windows KL reads, hosts patched rows continue)."""
    hosts = {iv.host for iv in interventions} | {"XY"}
    trace_hosts = {iv.host for iv in interventions if iv.writes}
    return {"BB", "XB", "BY", "XY"} | hosts, hosts, trace_hosts


def kl_records(
    lm: LoadedModel,
    caps: Sequence[CellCapture],
    jobs: Sequence[Job],
    *,
    max_rows: int = 64,
) -> list[tuple[CellCapture, Job, float]]:
    """Causal KL of every (cell, job): patched rows continue the host's clean prefix.

    Rows sharing first layer, length and window offset (any site) go into one forward; each starts at
    its first patched layer with the clean residual and writes its own vectors.
    """
    out: list[tuple[CellCapture, Job, float]] = []
    groups: dict[tuple, list[tuple[CellCapture, Job, Row]]] = defaultdict(list)
    for job in jobs:
        iv, w0 = job.intervention, window_start(job.site)
        for cap in caps:
            hp = cap.prompts[iv.host]
            if not iv.writes:
                first = window_first_position(job.site, len(hp.ids))
                out.append((cap, job, kl_window(_target(cap, job.site), _window(cap.logp[iv.host], first))))
                continue
            host = cap.traces[iv.host]
            q = cap.pos(iv.host, job.site)
            end = len(hp.ids) + w0 + WINDOW - 1  # last token whose logits the window reads
            patches = [(L, 0, iv.vector(cap, job.site, L)) for L in job.layers]
            row = Row(host.ids[q:end], prefix=host, start=q, patches=patches)
            offset = window_first_position(job.site, len(hp.ids)) - q
            groups[(min(job.layers), end - q, offset)].append((cap, job, row))

    for (start_layer, _n, offset), items in groups.items():
        size = -(-len(items) // -(-len(items) // max_rows))  # even chunks of at most max_rows
        for i in range(0, len(items), size):
            chunk = items[i : i + size]
            traces = run_rows(
                lm, [r for _, _, r in chunk], start_layer=start_layer,
                logp_at=[range(offset, offset + WINDOW)] * len(chunk),
            )
            for (cap, job, row), t in zip(chunk, traces, strict=True):
                out.append((cap, job, kl_window(_target(cap, job.site), _window(t.logp, row.start + offset))))
    return out


def _target(cap: CellCapture, site: str) -> torch.Tensor:
    """Clean XY log-probs over the site's window: the distribution every KL compares to."""
    return _window(cap.logp["XY"], window_first_position(site, len(cap.prompts["XY"].ids)))


def _window(logp: dict[int, torch.Tensor], first: int) -> torch.Tensor:
    return torch.stack([logp[first + j] for j in range(WINDOW)])
