"""What each intervention changes, as data (METHOD.md tables, the paper's and "Beyond the paper").

An intervention names the host prompt that runs and, for one cell at one site
and layer set, returns a `Change`: residual writes at (layer, position), K/V
taken from the clean XY run at (layer, positions), and keys knocked out of
attention at (layer, positions). The executor (`lac.patching`) turns any Change
into a batched engine row; a new kind of change is one class here + one yaml.
`layers` is None for "each of the job's layers on its own", or a set applied at
once (a multi-layer injection, or "from:L" = L..n_layers-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lac.capture import CellCapture

Write = tuple[int, int, torch.Tensor]  # (layer, sequence position, vector)
Where = tuple[int, int, int]  # (layer, first position, end position)


@dataclass
class Change:
    """One cell's host run under an intervention: everything from `start` on runs again."""

    host: str
    start: int  # first sequence position whose residual can differ from the clean host run
    first_layer: int  # first block whose input can differ
    writes: list[Write] = field(default_factory=list)
    kv_from_xy: list[Where] = field(default_factory=list)  # K/V replaced by clean XY's at these positions
    knockout: list[Where] = field(default_factory=list)  # keys no later position attends to


class Intervention:
    name: str = ""
    host: str = "XY"
    writes: bool = True  # False: the host runs clean (KL from the clean capture)
    reads_xy_trace: bool = False  # needs clean XY's trace (residuals after the span, K/V)
    from_span: bool = False  # re-runs the host from the persona span's end
    attention: bool = False  # edits attention: eager attention only

    def vector(self, cap: CellCapture, site: str, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def change(self, cap: CellCapture, site: str, layers: Sequence[int]) -> Change:
        """Default: this intervention's vector written at the site, at each layer of the set."""
        q = cap.pos(self.host, site)
        return Change(self.host, q, min(layers), writes=[(L, q, self.vector(cap, site, L)) for L in layers])


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


# --------------------------------------------------------------------------- controls and mechanism


class HostNoneLm(Intervention):
    """Prompt-length control: the length-matched baseline LY, nothing written."""

    name, host, writes = "host_none_lm", "LY", False


class HostOracleLm(Intervention):
    """h_XY written at the site of LY, whose post-persona positions align with XY's."""

    name, host = "host_oracle_lm", "LY"

    def vector(self, cap, site, layer):
        return cap.h("XY", site, layer)


class HostOracleNorm(Intervention):
    """Norm control: h_XY rescaled to the host's own norm at the site (BY)."""

    name, host = "host_oracle_norm", "BY"

    def vector(self, cap, site, layer):
        h_xy, h_by = cap.h("XY", site, layer), cap.h("BY", site, layer)
        return h_xy * (h_by.norm() / h_xy.norm())


class HostOracleSpan(Intervention):
    """Injection-site control: h_XY at every post-persona position up to the site, in LY."""

    name, host, reads_xy_trace, from_span = "host_oracle_span", "LY", True, True

    def change(self, cap, site, layers):
        end = cap.prompts["LY"].span[1]
        xy = cap.traces["XY"]
        where = range(end, cap.pos("LY", site) + 1)
        return Change("LY", end, min(layers), writes=[(L, p, xy.h(L, p).float()) for L in layers for p in where])


class KvPersona(Intervention):
    """LY with the persona span's K/V at the job's layers taken from clean XY."""

    name, host, reads_xy_trace, from_span = "kv_persona", "LY", True, True

    def change(self, cap, site, layers):
        s, e = cap.prompts["LY"].span
        return Change("LY", e, min(layers), kv_from_xy=[(L, s, e) for L in layers])


class KnockoutPersona(Intervention):
    """XY with attention from post-persona queries to the persona span's keys blocked."""

    name, from_span, attention = "knockout_persona", True, True

    def change(self, cap, site, layers):
        s, e = cap.prompts["XY"].span
        return Change("XY", e, min(layers), knockout=[(L, s, e) for L in layers])


INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls
    for cls in (Clean, Additive, RemoveX, HostNone, HostOracle, HostAdditive, Bare,
                HostNoneLm, HostOracleLm, HostOracleNorm, HostOracleSpan, KvPersona, KnockoutPersona)
}


def get_intervention(name: str) -> Intervention:
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; allowed: {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[name]()


@dataclass(frozen=True)
class Job:
    """One intervention at one site and one layer set (empty for no change)."""

    intervention: Intervention
    site: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Needs:
    """What the clean captures must hold for a set of interventions."""

    roles: frozenset[str]  # prompt roles whose site residuals are kept
    hosts: frozenset[str]  # roles whose clean window log-probs KL reads
    trace_hosts: frozenset[str]  # roles whose traces patched rows continue (or read)
    span_hosts: frozenset[str]  # trace hosts whose residuals are kept from the persona span's end


def roles_needed(interventions: Sequence[Intervention]) -> Needs:
    hosts = {iv.host for iv in interventions} | {"XY"}
    trace = {iv.host for iv in interventions if iv.writes} | {"XY" for iv in interventions if iv.reads_xy_trace}
    span = {iv.host for iv in interventions if iv.from_span} | {"XY" for iv in interventions if iv.reads_xy_trace}
    return Needs(frozenset({"BB", "XB", "BY", "XY"} | hosts), frozenset(hosts), frozenset(trace), frozenset(span))
