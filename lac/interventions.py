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
from lac.grid import Factor, Grid

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


_PAPER_SHAPE = Grid("paper", (Factor("persona", "X", "-", {}), Factor("task", "Y", "-", {})))


class Intervention:
    """What one cell's host run changes. Roles come from the grid's design (paper: BB, XB, BY,
    XY); `factor` is the factor the intervention is about (persona by default)."""

    name: str = ""
    host_kind: str = "full"  # full (XY) | without (the factor at baseline: BY) | lm (length-matched: LY) | bare
    writes: bool = True  # False: the host runs clean (KL from the clean capture)
    reads_xy_trace: bool = False  # needs clean XY's trace (residuals after the span, K/V)
    from_span: bool = False  # re-runs the host from the persona span's end
    attention: bool = False  # edits attention: eager attention only
    partner: str = ""  # swap: its partner rule, as its rows record it (lac.schema.partner_label)

    def __init__(self, grid: Grid | None = None, factor: str = "persona", alpha: float | None = None):
        self.grid = grid or _PAPER_SHAPE
        self.factor = factor
        self.alpha = alpha
        if factor not in self.grid.factor_names:
            raise ValueError(f"intervention {self.name}: factor {factor!r} is not a factor of grid "
                             f"{self.grid.name!r}; allowed: {', '.join(self.grid.factor_names)}")
        g = self.grid
        self.full, self.empty = g.full, g.empty
        self.single = g.role((factor,))  # paper: XB
        self.host = {"full": g.full, "without": g.host(factor), "bare": "bare",
                     "lm": g.role(g.factor_names, mark={factor: "L"})}[self.host_kind]

    def targets(self) -> dict[str, str]:
        """metric -> the role whose clean window the KL compares to (paper: kl vs XY)."""
        return {"kl": self.full}

    def roles(self) -> set[str]:
        """Prompt roles whose site residuals the vectors read."""
        return set(self.grid.roles())

    def vector(self, cap: CellCapture, site: str, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def change(self, cap: CellCapture, site: str, layers: Sequence[int]) -> Change:
        """Default: this intervention's vector written at the site, at each layer of the set."""
        q = cap.pos(self.host, site)
        return Change(self.host, q, min(layers), writes=[(L, q, self.vector(cap, site, L)) for L in layers])

    def delta(self, cap: CellCapture, site: str, layer: int, role: str | None = None) -> torch.Tensor:
        """D_f = h_{f} - h_{} (paper: delta_x = h_XB - h_BB)."""
        return cap.h(role or self.single, site, layer) - cap.h(self.empty, site, layer)


def additive_vector(cap: CellCapture, site: str, layer: int, grid: Grid | None = None) -> torch.Tensor:
    """h_{} + sum_f D_f (paper: h_BB + dX + dY): the factors' directions composed additively."""
    g = grid or _PAPER_SHAPE
    h_bb = cap.h(g.empty, site, layer)
    out = h_bb
    for f in g.factor_names:
        out = out + (cap.h(g.role((f,)), site, layer) - h_bb)
    return out


class Clean(Intervention):
    name, writes = "clean", False


class Additive(Intervention):
    name = "additive"

    def vector(self, cap, site, layer):
        return additive_vector(cap, site, layer, self.grid)


class RemoveX(Intervention):
    """h_all - D_f (paper: h_XY - delta_x); remove_<factor> for any factor of the grid."""

    name = "remove_x"

    def vector(self, cap, site, layer):
        return cap.h(self.full, site, layer) - self.delta(cap, site, layer)


class Remove(RemoveX):
    name = "remove"

    def __init__(self, grid=None, factor="persona", alpha=None):
        super().__init__(grid, factor, alpha)
        self.name = f"remove_{factor}"  # its rows name the factor


class HostNone(Intervention):
    name, host_kind, writes = "host_none", "without", False


class HostOracle(Intervention):
    name, host_kind = "host_oracle", "without"

    def vector(self, cap, site, layer):
        return cap.h(self.full, site, layer)


class HostAdditive(Intervention):
    name, host_kind = "host_additive", "without"

    def vector(self, cap, site, layer):
        return additive_vector(cap, site, layer, self.grid)


class Bare(Intervention):
    name, host_kind, writes = "bare", "bare", False


# --------------------------------------------------------------------------- steering and swap


class Steer(Intervention):
    """h_all + (alpha - 1) D_f in P_all: alpha 1 is clean, 0 is remove_f, 2 doubles the factor."""

    name = "steer"
    identity_alpha = 1.0  # the dose at which the write is the host's own clean residual

    def change(self, cap, site, layers):
        if self.alpha == self.identity_alpha:  # writes back what is there: exactly the clean host run
            return Change(self.host, cap.pos(self.host, site), min(layers))
        return super().change(cap, site, layers)

    def vector(self, cap, site, layer):
        return cap.h(self.full, site, layer) + (self.alpha - 1.0) * self.delta(cap, site, layer)


class SteerHost(Steer):
    """h_host + alpha D_f in the host with f at baseline (paper: BY): alpha 0 is host_none."""

    name, host_kind, identity_alpha = "steer_host", "without", 0.0

    def vector(self, cap, site, layer):
        return cap.h(self.host, site, layer) + self.alpha * self.delta(cap, site, layer)


class Swap(Intervention):
    """h_all - D_f + D_f' (f' = the partner level of f, the cell's other levels kept); KL against
    clean XY and against the clean partner prompt X'Y, teacher-forced on the same reference."""

    name = "swap"

    def __init__(self, grid=None, factor="persona", alpha=None):
        super().__init__(grid, factor, alpha)
        g = self.grid
        self.partner_single = g.role((), mark={factor: "S"})  # paper: X'B
        self.partner_full = g.role(g.factor_names, mark={factor: "S"})  # paper: X'Y

    def targets(self):
        return {"kl": self.full, "kl_partner": self.partner_full}

    def roles(self):
        return {self.full, self.single, self.empty, self.partner_single}

    def change(self, cap, site, layers):
        level = cap.cell.level(self.factor)
        if self.grid.partners[self.factor][level] == level:  # X' = X: the same prompt, exactly clean
            return Change(self.host, cap.pos(self.host, site), min(layers))
        return super().change(cap, site, layers)

    def vector(self, cap, site, layer):
        d, d_partner = self.delta(cap, site, layer), self.delta(cap, site, layer, self.partner_single)
        return cap.h(self.full, site, layer) - d + d_partner


# --------------------------------------------------------------------------- controls and mechanism


class HostNoneLm(Intervention):
    """Prompt-length control: the length-matched baseline LY, nothing written."""

    name, host_kind, writes = "host_none_lm", "lm", False


class HostOracleLm(Intervention):
    """h_XY written at the site of LY, whose post-persona positions align with XY's."""

    name, host_kind = "host_oracle_lm", "lm"

    def vector(self, cap, site, layer):
        return cap.h(self.full, site, layer)


class HostOracleNorm(Intervention):
    """Norm control: h_XY rescaled to the host's own norm at the site (BY)."""

    name, host_kind = "host_oracle_norm", "without"

    def vector(self, cap, site, layer):
        h_xy, h_by = cap.h(self.full, site, layer), cap.h(self.host, site, layer)
        return h_xy * (h_by.norm() / h_xy.norm())


class HostOracleSpan(Intervention):
    """Injection-site control: h_XY at every post-persona position up to the site, in LY."""

    name, host_kind, reads_xy_trace, from_span = "host_oracle_span", "lm", True, True

    def change(self, cap, site, layers):
        end = cap.prompts[self.host].slot_span(self.factor)[1]
        xy = cap.traces[self.full]
        where = range(end, cap.pos(self.host, site) + 1)
        return Change(self.host, end, min(layers), writes=[(L, p, xy.h(L, p).float()) for L in layers for p in where])


class KvPersona(Intervention):
    """LY with the persona span's K/V at the job's layers taken from clean XY."""

    name, host_kind, reads_xy_trace, from_span = "kv_persona", "lm", True, True

    def change(self, cap, site, layers):
        s, e = cap.prompts[self.host].slot_span(self.factor)
        return Change(self.host, e, min(layers), kv_from_xy=[(L, s, e) for L in layers])


class KnockoutPersona(Intervention):
    """XY with attention from post-persona queries to the persona span's keys blocked."""

    name, from_span, attention = "knockout_persona", True, True

    def change(self, cap, site, layers):
        s, e = cap.prompts[self.full].slot_span(self.factor)
        return Change(self.full, e, min(layers), knockout=[(L, s, e) for L in layers])


INTERVENTIONS: dict[str, type[Intervention]] = {
    cls.name: cls
    for cls in (Clean, Additive, RemoveX, HostNone, HostOracle, HostAdditive, Bare,
                HostNoneLm, HostOracleLm, HostOracleNorm, HostOracleSpan, KvPersona, KnockoutPersona,
                Remove, Steer, SteerHost, Swap)
}
NEEDS_ALPHA = ("steer", "steer_host")
WHOLE_DESIGN = ("clean", "additive", "bare")  # about every factor at once: their rows name none


def get_intervention(name: str, grid: Grid | None = None, factor: str | None = None,
                     alpha: float | None = None) -> Intervention:
    """An intervention by name; remove_<factor> names remove for that factor of the grid."""
    if name not in INTERVENTIONS and name.startswith("remove_"):
        name, factor = "remove", name[len("remove_"):]
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r}; allowed: {', '.join(INTERVENTIONS)}, remove_<factor>")
    cls = INTERVENTIONS[name]
    if name in NEEDS_ALPHA and alpha is None:
        alpha = 1.0
    return cls(grid, factor or "persona", alpha)


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


def roles_needed(interventions: Sequence[Intervention], grid: Grid | None = None) -> Needs:
    g = grid or (interventions[0].grid if interventions else _PAPER_SHAPE)
    hosts = {iv.host for iv in interventions} | {t for iv in interventions for t in iv.targets().values()} | {g.full}
    trace = {iv.host for iv in interventions if iv.writes} | {g.full for iv in interventions if iv.reads_xy_trace}
    span = {iv.host for iv in interventions if iv.from_span} | {g.full for iv in interventions if iv.reads_xy_trace}
    roles = set(g.roles()).union(*(iv.roles() for iv in interventions))
    return Needs(frozenset(roles | hosts), frozenset(hosts), frozenset(trace), frozenset(span))
