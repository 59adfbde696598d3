"""Shared prompt prefixes: every distinct token prefix runs once.

All prompts of a grid begin with the same chat-template header, a persona's XB
and XY prompts share "As {persona}, ", and BB and BY share the baseline
persona. A radix tree over the prompts' token ids splits them into segments;
each level of the tree is one batched forward (`run_rows`) whose rows continue
their parent segment's KV. A prompt's trace is its last segment's trace (KV of
the whole prompt) with the block inputs of its path joined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lac.engine import Row, Trace, run_rows
from lac.models import LoadedModel


@dataclass(frozen=True)
class Want:
    """What a prompt's trace must hold."""

    depth: int  # blocks whose inputs and KV are kept
    first: int  # first position whose block inputs are kept
    logp_last: bool = False  # next-token log-probs at the last position

    def merge(self, other: Want) -> Want:
        return Want(max(self.depth, other.depth), min(self.first, other.first), self.logp_last or other.logp_last)


@dataclass
class _Node:
    start: int
    end: int
    ids: tuple[int, ...]  # the tokens up to `end` (any prompt through the node)
    parent: _Node | None
    depth: int = 0
    logp_last: bool = False
    children: list[_Node] = field(default_factory=list)
    trace: Trace | None = None


def _build(seqs: Sequence[tuple[int, ...]], start: int, parent: _Node | None, out: dict) -> list[_Node]:
    """Radix-tree nodes for `seqs`, which all share ids[:start]; `out` maps a prompt to its last node."""
    groups: dict[int, list[tuple[int, ...]]] = {}
    for s in seqs:
        groups.setdefault(s[start], []).append(s)
    nodes = []
    for group in groups.values():
        end = start + 1
        shortest = min(len(s) for s in group)
        while end < shortest and all(s[end] == group[0][end] for s in group):
            end += 1
        node = _Node(start, end, group[0][:end], parent)
        for s in group:
            if len(s) == end:
                out[s] = node
        node.children = _build([s for s in group if len(s) > end], end, node, out)
        nodes.append(node)
    return nodes


def prefix_traces(
    lm: LoadedModel, wants: Mapping[tuple[int, ...], Want], *, max_tokens: int = 4096
) -> dict[tuple[int, ...], Trace]:
    """Traces of every prompt in `wants` (KV up to its depth, block inputs from `first`),
    computing each shared prefix once. A level's segments go length-sorted into forwards
    of at most `max_tokens` padded positions, so right padding stays small."""
    seqs = [s for s in wants if len(s)]
    if len(seqs) != len(wants):
        raise ValueError("prefix_traces got an empty prompt")
    last: dict[tuple[int, ...], _Node] = {}
    roots = _build(seqs, 0, None, last)
    for s, node in last.items():  # a node serves the deepest prompt through it
        node.logp_last |= wants[s].logp_last
        while node is not None and node.depth < wants[s].depth:
            node.depth = wants[s].depth
            node = node.parent

    level = roots
    while level:
        # one forward per chunk of the level, as deep as its deepest node: a few blocks run past a
        # shallow node's depth, but on CPU a forward of few rows costs mostly its weight reads
        for chunk in _chunks(sorted(level, key=lambda n: n.end - n.start), max_tokens):
            rows = [
                Row(list(n.ids[n.start :]), prefix=n.parent.trace if n.parent else None, start=n.start)
                for n in chunk
            ]
            out = run_rows(
                lm, rows, depth=max(n.depth for n in chunk), capture=True, keep_kv=True,
                logp_at=[[n.end - n.start - 1] if n.logp_last else [] for n in chunk],
            )
            for n, t in zip(chunk, out, strict=True):
                n.trace = t
        level = [c for n in level for c in n.children]

    return {s: _join(last[s], wants[s]) for s in seqs}


def _chunks(nodes: list[_Node], max_tokens: int) -> list[list[_Node]]:
    """Consecutive runs of length-sorted nodes whose padded size stays within max_tokens."""
    out: list[list[_Node]] = []
    for n in nodes:
        if out and (len(out[-1]) + 1) * (n.end - n.start) <= max_tokens:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def _join(node: _Node, want: Want) -> Trace:
    """The prompt's trace: its last node's KV, the block inputs of its path from `want.first` on."""
    parts = []
    n = node
    while n is not None and n.end > want.first:
        lo = max(want.first - n.start, 0)
        parts.append(n.trace.hidden[: want.depth, lo:])
        n = n.parent
    hidden = torch.cat(parts[::-1], dim=1) if parts else None
    t = node.trace
    return Trace(
        ids=list(t.ids), kv=t.kv[: want.depth], hidden=hidden, first=want.first,
        depth=want.depth, logp=dict(t.logp) if want.logp_last else {},
    )
