"""Clean captures of a batch of cells: the XY reference and a trace per prompt role.

Every prompt the cells need (BB, XB, BY, XY, host prompts; for a k-factor grid
every subset of factors) runs once, as one prefix tree (`lac.prefix`): the
chat-template header and each persona's "As X, " are computed once for all
prompts that start with them. Then ref = 12 greedy tokens of XY (P_all),
decoded on from its prompt's trace (keeping its KV, block inputs and clean
log-probs), and the other roles teacher-force their prompt + the same ref. Roles used only for the decomposition stop at
the deepest layer asked for.

What decomposition and KL read (ref, block inputs at the sites, clean
log-probs over the windows) is small and goes to the activation cache; the KV
and window residuals that patched rows continue (`traces`) are rebuilt by one
teacher-forced pass on the stored ref when a cell comes from the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lac.engine import Row, Trace, decode, run_rows
from lac.grid import Cell
from lac.models import LoadedModel
from lac.prefix import Want, prefix_traces
from lac.prompts import Prompt, PromptBook
from lac.sites import REF_TOKENS, SITES, site_position


@dataclass
class CellCapture:
    """Everything clean about one cell that decomposition, vectors and KL read."""

    cell: Cell
    ref: list[int]
    prompts: dict[str, Prompt]  # role -> prompt
    site_h: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> [len(SITES), depth, d]
    logp: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # host -> pos -> [vocab]
    traces: dict[str, Trace] = field(default_factory=dict)  # host -> prompt + ref[:11], with KV
    full: str = "XY"  # the role of P_all (every factor at the cell's level), whose continuation is the ref

    def pos(self, role: str, site: str) -> int:
        p = self.prompts[role]
        return site_position(site, len(p.ids), p.p_user_last)

    def h(self, role: str, site: str, layer: int) -> torch.Tensor:
        """h_{role} at a site and layer, float32 (the paper's h_BB, h_XB, h_BY, h_XY)."""
        return self.site_h[role][SITES.index(site), layer].float()

    def depth(self, role: str) -> int:
        return self.site_h[role].shape[1] if role in self.site_h else 0

    def _keep(self, role: str, trace: Trace, host: bool, keep_trace: bool) -> None:
        self.site_h[role] = torch.stack(
            [torch.stack([trace.h(L, self.pos(role, s)) for L in range(trace.depth)]) for s in SITES]
        ).cpu()
        if host:
            self.logp[role] = {p: v.cpu() for p, v in trace.logp.items()}
        if keep_trace:
            self.traces[role] = trace


def _merge(prefix: Trace, suffix: Trace) -> Trace:
    """One trace over prompt + ref from the prompt's trace and the ref rows continuing it."""
    hidden = suffix.hidden
    if prefix.hidden is not None and suffix.hidden is not None:
        hidden = torch.cat([prefix.hidden[: suffix.hidden.shape[0]], suffix.hidden], dim=1)
    return Trace(
        ids=suffix.ids,
        kv=suffix.kv,
        hidden=hidden,
        first=prefix.first,
        depth=min(prefix.depth, suffix.depth),
        logp={**prefix.logp, **suffix.logp},
    )


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _teacher_forced(
    lm: LoadedModel, jobs: Sequence[tuple[CellCapture, str]], prompt_traces: dict, *, host: bool, depth: int,
    batch_size: int,
) -> list[Trace]:
    """Traces of role prompt + ref (11 tokens for a host, 2 otherwise), continuing the prompts' traces;
    `jobs` are (capture, role) pairs, of any roles that share `host` and `depth`: one forward for all."""
    k = REF_TOKENS - 1 if host else 2  # hosts carry every KL window; others reach g2
    traces = []
    for chunk in _batches(jobs, batch_size):
        rows = [
            Row(c.ref[:k], prefix=prompt_traces[c.prompts[role].ids], start=len(c.prompts[role].ids))
            for c, role in chunk
        ]
        out = run_rows(
            lm, rows, depth=depth, capture=True, keep_kv=host,
            logp_at=[range(k)] * len(rows) if host else None,
        )
        traces += [_merge(r.prefix, t) for r, t in zip(rows, out, strict=True)]
    return traces


def capture_cells(
    lm: LoadedModel,
    book: PromptBook,
    cells: Sequence[Cell],
    *,
    roles: Iterable[str] | None = None,
    hosts: Iterable[str] = (),
    trace_hosts: Iterable[str] = (),
    span_hosts: Iterable[str] = (),
    depth: int | None = None,
    batch_size: int = 16,
    known: dict[str, CellCapture] | None = None,
) -> list[CellCapture]:
    """Clean captures of `cells`.

    roles: prompt roles whose site residuals are kept (down to `depth` blocks); default: every
    subset of the grid's factors (paper: BB, XB, BY, XY).
    hosts: roles whose clean window log-probs are kept (full depth); always the full prompt.
    trace_hosts: hosts whose traces patched rows will continue.
    span_hosts: trace hosts whose block inputs are kept from the persona span's end (rows that
    re-run every post-persona position start there).
    known: captures already at hand (memory or disk) by cell key; only what
    they lack is computed. A known cell's XY trace is teacher-forced on its
    stored reference (never decoded again).
    """
    n_layers = lm.n_layers
    depth = n_layers if depth is None else depth
    grid = getattr(book, "grid", None)  # a hand-made book (ids only) is the paper's 2x2
    full = grid.full if grid else "XY"  # P_all, whose greedy continuation is the reference
    roles = (grid.roles() if grid else ("BB", "XB", "BY", "XY")) if roles is None else roles
    hosts = set(hosts) | {full}
    trace_hosts = set(trace_hosts) | set(span_hosts)
    span_hosts = set(span_hosts)
    roles = list(dict.fromkeys([*roles, *sorted(hosts)]))

    def first(c: CellCapture, role: str) -> int:
        p = c.prompts[role]
        return min(p.p_user_last, p.span[1]) if role in span_hosts and p.span else p.p_user_last
    known = known or {}
    caps = []
    for c in cells:
        cap = known.get(c.key) or CellCapture(c, [], {}, full=full)
        cap.prompts.update({r: book.get(c, r) for r in roles if r not in cap.prompts})
        caps.append(cap)

    def need(c: CellCapture, role: str) -> bool:
        host = role in hosts
        return not c.ref or (
            c.depth(role) < (n_layers if host else depth) or (host and role not in c.logp)
            or (role in trace_hosts and role not in c.traces)
            or (role in c.traces and c.traces[role].first > first(c, role))
        )

    # the prompts every role still needs run as one prefix tree
    todo = {role: [c for c in caps if need(c, role)] for role in roles}
    wants: dict[tuple[int, ...], Want] = {}
    for role, cs in todo.items():
        for c in cs:
            p = c.prompts[role]
            w = Want(n_layers if role in hosts else depth, first(c, role), logp_last=role in hosts)
            wants[p.ids] = wants[p.ids].merge(w) if p.ids in wants else w
    prompt_traces = prefix_traces(lm, wants) if wants else {}

    # P_all (XY): the reference, decoded greedily on from the prompt's trace (KV, block inputs, log-probs)
    fresh = [c for c in caps if not c.ref]
    for chunk in _batches(fresh, batch_size):
        toks, traces = decode(
            lm, [prompt_traces[c.prompts[full].ids] for c in chunk], REF_TOKENS, capture=True, keep_logp=True
        )
        for c, t, tr in zip(chunk, toks, traces, strict=True):
            c.ref = t
            c._keep(full, tr, host=True, keep_trace=full in trace_hosts)
    decoded = {id(c) for c in fresh}
    todo[full] = [c for c in todo[full] if id(c) not in decoded]

    # the other roles teacher-force the ref: hosts (11 tokens, full depth) in one set of forwards, the rest
    # (2 tokens) in another, every role's rows together (forwards this small cost mostly weight reads)
    for host in (True, False):
        d = n_layers if host else depth
        group = [role for role in roles if (role in hosts) == host]
        jobs = [(c, role) for role in group for c in todo[role]]
        if not jobs:
            continue
        traces = _teacher_forced(lm, jobs, prompt_traces, host=host, depth=d, batch_size=batch_size * len(group))
        for (c, role), t in zip(jobs, traces, strict=True):
            if c.depth(role) >= d and role in c.logp:
                c.traces[role] = t  # only the trace was missing: keep the stored residuals
            else:
                c._keep(role, t, host=host, keep_trace=role in trace_hosts)
    return caps
