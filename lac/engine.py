"""Batched forwards over real HF modules: capture, substitute, continue from a clean prefix.

The one primitive is `run_rows`: a batch of rows, each continuing a clean
`Trace` (KV of its first `start` tokens) with new tokens, optionally entering
the stack at block `start_layer` with the clean residual (blocks below it
would recompute what the trace already holds), writing patch vectors into
the residual at chosen (layer, position), capturing block inputs and
returning next-token log-probs only where asked. Rows are left-padded so that
real tokens stay contiguous (sliding-window masks stay exact) and every row
has explicit attention mask and position ids.

`greedy` is the decode loop on the same hooks: it produces the clean XY
reference, its traces, and (with prefill patches) the marker generations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lac.models import LoadedModel

# (layer, local position in the row's new tokens, vector [d_model])
Patch = tuple[int, int, torch.Tensor]


# What the engine ran, for the benchmark and for tests that count work instead of seconds:
# forwards, token positions fed, and block-token evaluations (positions x blocks run).
COUNTS = {"forwards": 0, "tokens": 0, "block_tokens": 0}


def _count(tokens: int, blocks: int) -> None:
    COUNTS["forwards"] += 1
    COUNTS["tokens"] += tokens
    COUNTS["block_tokens"] += tokens * blocks


class StopForward(Exception):
    """Raised inside the stack once the deepest block of interest has its input."""


class _Skip(nn.Module):
    """Stands in for a block below the start layer: its output is replaced anyway."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@dataclass
class Trace:
    """A clean sequence: token ids, KV (layers < depth), block inputs from position `first`."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [kv_heads, len, head_dim]
    hidden: torch.Tensor | None  # [depth, len - first, d_model]: input of block L at each position
    first: int
    depth: int
    logp: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> [vocab] log-probs

    def h(self, layer: int, pos: int) -> torch.Tensor:
        """Input of block `layer` at sequence position `pos` (the paper's h_L at a site)."""
        if self.hidden is None or not (self.first <= pos < len(self.ids)) or layer >= self.depth:
            raise KeyError(f"trace holds layers < {self.depth}, positions {self.first}..{len(self.ids) - 1}; asked L{layer} @ {pos}")
        return self.hidden[layer, pos - self.first]


@dataclass
class Row:
    """One sequence of a batch: `ids` continue `prefix.ids[:start]` (or start from nothing)."""

    ids: list[int]
    prefix: Trace | None = None
    start: int = 0
    patches: list[Patch] = field(default_factory=list)


@contextmanager
def _hooks(lm: LoadedModel, fns: dict[int, Callable], skip_below: int = 0):
    """Pre-hooks on decoder blocks (fn(hidden) -> hidden or None) and skipped low blocks."""
    layers = lm.layers
    handles, saved = [], {}

    def make(fn):
        def hook(module, args, kwargs):
            if args:
                out = fn(args[0])
                return None if out is None else ((out, *args[1:]), kwargs)
            out = fn(kwargs["hidden_states"])
            if out is None:
                return None
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = out
            return args, kwargs

        return hook

    try:
        for i in range(skip_below):
            saved[i] = layers[i]
            layers[i] = _Skip()
        for layer, fn in fns.items():
            if layer < len(layers):
                handles.append(layers[layer].register_forward_pre_hook(make(fn), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for i, mod in saved.items():
            layers[i] = mod


def _patch_index(patches: Sequence[Sequence[Patch]], cols: Sequence[int], device, dtype):
    """Per layer: (row index, column index, vectors) tensors for one batched write."""
    by_layer: dict[int, tuple[list, list, list]] = {}
    for b, row_patches in enumerate(patches):
        for layer, local, vec in row_patches:
            r, c, v = by_layer.setdefault(layer, ([], [], []))
            r.append(b)
            c.append(cols[b] + local)
            v.append(vec)
    return {
        L: (
            torch.tensor(r, device=device),
            torch.tensor(c, device=device),
            torch.stack(v).to(device=device, dtype=dtype),
        )
        for L, (r, c, v) in by_layer.items()
    }


def run_rows(
    lm: LoadedModel,
    rows: Sequence[Row],
    *,
    start_layer: int = 0,
    depth: int | None = None,
    capture: bool = False,
    capture_from: int = 0,
    logp_cols: Sequence[int] | None = None,
    keep_kv: bool = False,
) -> list[Trace]:
    """Run a batch of rows once; see the module docstring.

    capture: keep inputs of blocks start_layer..depth-1 for new tokens from local
    index `capture_from` on. logp_cols: local indices (same for every row, counted
    from the first new token of the longest row) whose next-token log-probs are
    returned. start_layer > 0 needs every row to have a prefix trace holding the
    clean block input at that layer for the new positions.
    """
    model, device, dtype = lm.model, lm.device, lm.dtype
    n_layers = lm.n_layers
    depth = n_layers if depth is None else depth
    has_prefix = [r.prefix is not None and r.start > 0 for r in rows]
    n = max(len(r.ids) for r in rows)
    if any(has_prefix) and any(len(r.ids) != n for r in rows):
        raise ValueError("rows continuing a prefix must all add the same number of tokens")
    starts = [r.start if hp else 0 for r, hp in zip(rows, has_prefix, strict=True)]
    m = max(starts)
    total = m + n
    bsz = len(rows)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((bsz, n), pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, total), dtype=torch.long)
    pos = torch.zeros((bsz, n), dtype=torch.long)
    lead = []  # column (in the new block) of each row's first new token
    for b, r in enumerate(rows):
        k = len(r.ids)
        input_ids[b, n - k :] = torch.tensor(r.ids)
        mask[b, total - (starts[b] + k) :] = 1
        pos[b, n - k :] = torch.arange(starts[b], starts[b] + k)
        lead.append(n - k)

    from transformers import DynamicCache

    cache = DynamicCache()  # full layers: a sliding-window layer would drop the prefix we keep
    if m:
        # blocks below start_layer never read their cache; layer 0 still tells masks the length
        first = _stack_prefix_kv(rows, has_prefix, starts, 0, m, device)
        kv_layers = [first] + [
            first if L < start_layer else _stack_prefix_kv(rows, has_prefix, starts, L, m, device)
            for L in range(1, min(depth, n_layers))
        ]
        cache = DynamicCache(ddp_cache_data=kv_layers)

    captured: dict[int, torch.Tensor] = {}
    patch_idx = _patch_index([r.patches for r in rows], lead, device, dtype)

    def at_layer(L):
        def fn(h):
            if L == start_layer and start_layer > 0:
                h = torch.stack([_clean_input(r, L, starts[b], n) for b, r in enumerate(rows)])
                h = h.to(device=device, dtype=dtype)
            elif L in patch_idx:
                h = h.clone()
            if L in patch_idx:
                ri, ci, vec = patch_idx[L]
                h[ri, ci] = vec
            if capture and L < depth:
                captured[L] = h[:, capture_from:]
            if L == depth:
                raise StopForward
            return h

        return fn

    watched = set(patch_idx) | ({start_layer} if start_layer > 0 else set())
    if capture:
        watched |= set(range(start_layer, depth))
    if depth < n_layers:
        watched.add(depth)
    fns = {L: at_layer(L) for L in watched}

    want_logits = bool(logp_cols) and depth == n_layers
    kwargs = dict(
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        past_key_values=cache,
        use_cache=True,
    )
    if start_layer > 0:
        kwargs["inputs_embeds"] = torch.zeros((bsz, n, model.config.hidden_size), dtype=dtype, device=device)
    else:
        kwargs["input_ids"] = input_ids.to(device)
    out = None
    _count(int(mask[:, m:].sum()), depth - start_layer)
    with torch.inference_mode(), _hooks(lm, fns, skip_below=start_layer):
        try:
            if want_logits:
                kwargs["logits_to_keep"] = torch.tensor(list(logp_cols), device=device)
                out = model(**kwargs)
            else:
                out = getattr(model, model.base_model_prefix)(**kwargs)
        except StopForward:
            out = None

    logits = out.logits.float() if want_logits and out is not None else None
    if logits is not None:
        check_finite(logits, lm, "logits")
    traces = []
    for b, r in enumerate(rows):
        k = len(r.ids)
        ids = (list(r.prefix.ids[: starts[b]]) if has_prefix[b] else []) + list(r.ids)
        kv = []
        if keep_kv and cache is not None:
            for L in range(min(depth, n_layers)):
                layer = cache.layers[L]
                if layer.keys is None or layer.keys.numel() == 0:
                    break
                kv.append((layer.keys[b, :, -(starts[b] + k) :], layer.values[b, :, -(starts[b] + k) :]))
        hidden = None
        skip = max(lead[b] - capture_from, 0)  # left-pad columns before the row's first token
        if capture:
            hs = [captured[L][b, skip:] for L in range(start_layer, depth)]
            hidden = torch.stack(hs) if hs else None
            check_finite(hidden, lm, "hidden states")
        t = Trace(ids, kv, hidden, first=starts[b] + capture_from + skip - lead[b], depth=depth)
        if logits is not None:
            lp = torch.log_softmax(logits[b], dim=-1)
            for j, c in enumerate(logp_cols):
                t.logp[starts[b] + c - lead[b]] = lp[j]
        traces.append(t)
    return traces


def _stack_prefix_kv(rows, has_prefix, starts, layer, m, device):
    """Left-padded [batch, kv_heads, m, head_dim] keys and values of the rows' prefixes."""
    ref = next(r.prefix.kv[layer] for r, hp in zip(rows, has_prefix, strict=True) if hp and layer < len(r.prefix.kv))
    ks = ref[0].new_zeros((len(rows), ref[0].shape[0], m, ref[0].shape[-1]))
    vs = ref[1].new_zeros((len(rows), ref[1].shape[0], m, ref[1].shape[-1]))
    for b, r in enumerate(rows):
        if has_prefix[b] and layer < len(r.prefix.kv):
            ks[b, :, m - starts[b] :] = r.prefix.kv[layer][0][:, : starts[b]]
            vs[b, :, m - starts[b] :] = r.prefix.kv[layer][1][:, : starts[b]]
    return ks.to(device), vs.to(device)


def _clean_input(row: Row, layer: int, start: int, n: int) -> torch.Tensor:
    """Clean input of block `layer` at the row's new positions, from its prefix trace."""
    tr = row.prefix
    if tr is None or tr.hidden is None:
        raise ValueError("start_layer > 0 needs a prefix trace with captured block inputs")
    lo = start - tr.first
    if lo < 0 or layer >= tr.depth or lo + n > tr.hidden.shape[1]:
        raise ValueError(f"prefix trace lacks block {layer} input at positions {start}..{start + n - 1}")
    return tr.hidden[layer, lo : lo + n]


def check_finite(t: torch.Tensor | None, lm: LoadedModel, what: str, where: str = "") -> None:
    """NaN/inf stops the run with the model and dtype named (float16 Qwen gives NaN residuals)."""
    if t is None or torch.isfinite(t).all():
        return
    bad = (~torch.isfinite(t)).nonzero()[0].tolist()
    raise FloatingPointError(
        f"non-finite {what} in {lm.name} ({lm.model_id}) at dtype {str(lm.dtype).replace('torch.', '')} "
        f"{where} (first bad index {bad}); the paper saw NaN residuals with float16 Qwen: use bfloat16 or float32"
    )


def greedy(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    n_new: int,
    *,
    patches: Sequence[Sequence[Patch]] | None = None,
    capture_from: Sequence[int] | None = None,
    keep_logp: bool = False,
) -> tuple[list[list[int]], list[Trace]]:
    """Greedy decoding of a left-padded batch, as `generate(do_sample=False)` does it.

    patches: per prompt, (layer, position in the prompt, vector), applied in the
    prompt pass only; generated tokens run unpatched. capture_from: per prompt,
    the first position whose block inputs (all layers) are kept, for traces that
    later rows continue. keep_logp: keep log-probs of every generated step.
    Rows that emit EOS continue with the pad token, like `generate`.
    """
    if n_new <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {n_new}")
    from transformers import DynamicCache

    model, device, dtype = lm.model, lm.device, lm.dtype
    n_layers = lm.n_layers
    bsz = len(prompts)
    n = max(len(p) for p in prompts)
    lead = [n - len(p) for p in prompts]
    tok = lm.tokenizer
    eos = eos_ids(lm)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
    ids = torch.full((bsz, n), pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, n), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, lead[b] :] = torch.tensor(list(p))
        mask[b, lead[b] :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    capture = capture_from is not None
    col0 = min(lead[b] + capture_from[b] for b in range(bsz)) if capture else 0
    steps: dict[int, list[torch.Tensor]] = {L: [] for L in range(n_layers)}
    patch_idx = _patch_index(patches or [[] for _ in prompts], lead, device, dtype)
    prefill = {"on": True}

    def at_layer(L):
        def fn(h):
            if prefill["on"] and L in patch_idx:
                h = h.clone()
                ri, ci, vec = patch_idx[L]
                h[ri, ci] = vec
            if capture:
                steps[L].append(h[:, col0:] if prefill["on"] else h)
            return h

        return fn

    fns = {L: at_layer(L) for L in (range(n_layers) if capture else patch_idx)}
    cache = DynamicCache()
    out_tokens: list[list[int]] = [[] for _ in prompts]
    logps: list[torch.Tensor] = []
    done = torch.zeros(bsz, dtype=torch.bool)
    with torch.inference_mode(), _hooks(lm, fns):
        cur_ids, cur_pos = ids, pos
        for step in range(n_new):
            _count(int(mask[:, -cur_ids.shape[1] :].sum()), n_layers)
            out = model(
                input_ids=cur_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=cur_pos.to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            prefill["on"] = False
            logits = out.logits[:, -1].float()
            check_finite(logits, lm, "logits", f"(generation step {step})")
            if keep_logp:
                logps.append(torch.log_softmax(logits, dim=-1).cpu())
            nxt = logits.argmax(-1).cpu()
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            for b in range(bsz):
                out_tokens[b].append(int(nxt[b]))
            done |= torch.isin(nxt, torch.tensor(sorted(eos) or [-1]))
            cache = out.past_key_values
            cur_ids = nxt[:, None]
            cur_pos = cur_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=torch.long)], dim=1)

    traces = []
    total = n + n_new - 1  # the last token was chosen but never fed
    for b in range(bsz):
        seq = list(prompts[b]) + out_tokens[b]
        kv = [
            (layer.keys[b, :, lead[b] :], layer.values[b, :, lead[b] :])
            for layer in cache.layers[:n_layers]
        ]
        hidden, first = None, 0
        if capture:
            skip = max(lead[b] - col0, 0)
            hidden = torch.stack([torch.cat([s[b] for s in steps[L]], dim=0)[skip:] for L in range(n_layers)])
            check_finite(hidden, lm, "hidden states")
            first = col0 + skip - lead[b]
        t = Trace(seq[: total - lead[b]], kv, hidden, first=first, depth=n_layers)
        for j, lp in enumerate(logps):
            t.logp[len(prompts[b]) - 1 + j] = lp[b]
        traces.append(t)
    return out_tokens, traces


def eos_ids(lm: LoadedModel) -> set[int]:
    gc = getattr(lm.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
