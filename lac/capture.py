"""Clean captures of a batch of cells: the XY reference and a trace per prompt role.

For each cell: ref = 12 greedy tokens of XY (one batched decode that also keeps
XY's KV, block inputs and clean log-probs), then BB/XB/BY/bare teacher-forced
on the same ref. Each distinct prompt text runs once (BB is shared by every
cell, XB by a persona's tasks, BY by a task's personas) and each cell only adds
its ref tokens on top of the shared prompt's KV. Roles used only for the
decomposition stop at the deepest layer asked for.

What decomposition and KL read (ref, block inputs at the sites, clean
log-probs over the windows) is small and goes to the activation cache; the KV
and window residuals that patched rows continue (`traces`) are rebuilt by one
teacher-forced pass when a cell comes from the cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lac.engine import Row, Trace, greedy, run_rows
from lac.grid import Cell
from lac.models import LoadedModel
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
    lm: LoadedModel, caps: Sequence[CellCapture], role: str, *, host: bool, depth: int, batch_size: int
) -> list[Trace]:
    """Traces of role prompt + ref (11 tokens for a host, 2 otherwise), shared prompts run once."""
    distinct = list({c.prompts[role].ids: c.prompts[role] for c in caps}.values())
    prompt_traces: dict[tuple[int, ...], Trace] = {}
    for chunk in _batches(distinct, batch_size):
        n = max(len(p.ids) for p in chunk)
        col = min(n - len(p.ids) + p.p_user_last for p in chunk)
        out = run_rows(
            lm, [Row(list(p.ids)) for p in chunk], depth=depth, capture=True,
            capture_from=col, keep_kv=True, logp_cols=[n - 1] if host else None,
        )
        prompt_traces.update({p.ids: t for p, t in zip(chunk, out, strict=True)})
    k = REF_TOKENS - 1 if host else 2  # hosts carry every KL window; others reach g2
    traces = []
    for chunk in _batches(caps, batch_size):
        rows = [
            Row(c.ref[:k], prefix=prompt_traces[c.prompts[role].ids], start=len(c.prompts[role].ids))
            for c in chunk
        ]
        out = run_rows(
            lm, rows, depth=depth, capture=True, keep_kv=host,
            logp_cols=list(range(k)) if host else None,
        )
        traces += [_merge(r.prefix, t) for r, t in zip(rows, out, strict=True)]
    return traces


def capture_cells(
    lm: LoadedModel,
    book: PromptBook,
    cells: Sequence[Cell],
    *,
    roles: Iterable[str] = ("BB", "XB", "BY", "XY"),
    hosts: Iterable[str] = ("XY",),
    trace_hosts: Iterable[str] = (),
    depth: int | None = None,
    batch_size: int = 16,
    known: dict[str, CellCapture] | None = None,
) -> list[CellCapture]:
    """Clean captures of `cells`.

    roles: prompt roles whose site residuals are kept (down to `depth` blocks).
    hosts: roles whose clean window log-probs are kept (full depth).
    trace_hosts: hosts whose traces patched rows will continue.
    known: captures already at hand (memory or disk) by cell key; only what
    they lack is computed.
    """
    n_layers = lm.n_layers
    depth = n_layers if depth is None else depth
    hosts = set(hosts) | {"XY"}
    trace_hosts = set(trace_hosts)
    roles = list(dict.fromkeys([*roles, *sorted(hosts)]))
    known = known or {}
    caps = []
    for c in cells:
        cap = known.get(c.key) or CellCapture(c, [], {})
        cap.prompts.update({r: book.get(c, r) for r in roles if r not in cap.prompts})
        caps.append(cap)

    # XY: the reference, decoded with its own trace. A cell from the cache that patched rows
    # will continue is decoded again: the same batch gives the same tokens and KV, so results
    # do not depend on whether a cell came from the cache.
    redo = [c for c in caps if not c.ref or ("XY" in trace_hosts and "XY" not in c.traces)]
    for chunk in _batches(redo, batch_size):
        prompts = [c.prompts["XY"] for c in chunk]
        toks, traces = greedy(
            lm, [p.ids for p in prompts], REF_TOKENS,
            capture_from=[p.p_user_last for p in prompts], keep_logp=True,
        )
        for c, t, tr in zip(chunk, toks, traces, strict=True):
            if not c.ref:
                c.ref = t
                c._keep("XY", tr, host=True, keep_trace="XY" in trace_hosts)
            else:
                if t != c.ref:
                    raise RuntimeError(f"cell {c.cell.key}: decoding again gave another reference than the cached one")
                c.traces["XY"] = tr

    for role in roles:
        host = role in hosts
        d = n_layers if host else depth
        todo = [
            c for c in caps
            if c.depth(role) < d or (host and role not in c.logp)
            or (role in trace_hosts and role not in c.traces)
        ]
        if not todo:
            continue
        traces = _teacher_forced(lm, todo, role, host=host, depth=d, batch_size=batch_size)
        for c, t in zip(todo, traces, strict=True):
            if c.depth(role) >= d and role in c.logp:
                c.traces[role] = t  # only the trace was missing: keep the stored residuals
            else:
                c._keep(role, t, host=host, keep_trace=role in trace_hosts)
    return caps
