"""Batched forwards over real HF modules: capture, substitute, continue from a clean prefix.

The one primitive is `run_rows`: a batch of rows, each continuing a clean
`Trace` (KV of its first `start` tokens) with new tokens, optionally entering
the stack at block `start_layer` with the clean residual (blocks below it
would recompute what the trace already holds), writing patch vectors into
the residual at chosen (layer, position), capturing block inputs and
returning next-token log-probs only where asked. Prefixes are left-padded
and new tokens right-padded, so each row's real tokens stay contiguous
(sliding-window masks stay exact) whatever its lengths; every row has an
explicit attention mask and position ids.

`decode` continues traces greedily (the clean XY reference and its trace);
`greedy` = one prompt pass (patches apply there only) + `decode` (the marker
generations).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lac.attention import attention_edits, grouped_attention
from lac.models import LoadedModel

# (layer, local position in the row's new tokens, vector [d_model])
Patch = tuple[int, int, torch.Tensor]


# What the engine ran, for the benchmark and for tests that count work instead of seconds:
# forwards, token positions fed, and block-token evaluations (positions x blocks run).
COUNTS = {"forwards": 0, "tokens": 0, "block_tokens": 0}


@functools.cache
def cache_kwarg() -> str:
    """The name a model's forward takes its KV cache by, and its output returns it by.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40, where
    it goes). A forward that no longer knows the name lac passes would take it as an unknown
    kwarg and start an empty cache: every continued row would attend to its new tokens alone."""
    from dataclasses import fields

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


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
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [heads, new tokens]: attention on a probed span

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
    # (layer, first, end): keys at sequence positions first..end-1 get no attention from this row's
    # new tokens at that layer (attention knockout; kept through `greedy`'s generation)
    knockout: list[tuple[int, int, int]] = field(default_factory=list)
    probe: tuple[int, int] | None = None  # key positions whose attention mass is recorded at every layer run


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
        with grouped_attention(lm.model):
            yield
    finally:
        for h in handles:
            h.remove()
        for i, mod in saved.items():
            layers[i] = mod


def _patch_index(patches: Sequence[Sequence[Patch]], device, dtype):
    """Per layer: (row index, column index, vectors) tensors for one batched write."""
    by_layer: dict[int, tuple[list, list, list]] = {}
    for b, row_patches in enumerate(patches):
        for layer, local, vec in row_patches:
            r, c, v = by_layer.setdefault(layer, ([], [], []))
            r.append(b)
            c.append(local)
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
    logp_at: Sequence[Sequence[int]] | None = None,
    keep_kv: bool = False,
    scratch_logp: bool = False,
) -> list[Trace]:
    """Run a batch of rows once; see the module docstring.

    Layout: prefixes left-padded to the longest, new tokens right after them
    (right-padded), so each row's real tokens are contiguous whatever its prefix
    and new lengths. capture: keep inputs of blocks start_layer..depth-1 for new
    tokens from local index `capture_from` on. logp_at: per row, local indices of
    new tokens whose next-token log-probs are returned (the head runs on those
    positions only); asking for any with depth < n_layers, or for an index outside
    a row's new tokens, raises ValueError. scratch_logp: those log-probs may live in a buffer
    the next scratch call overwrites (for callers that read them at once, like KL). start_layer > 0
    needs every row to have a prefix trace holding the clean block input at that layer for the new positions.
    """
    model, device, dtype = lm.model, lm.device, lm.dtype
    n_layers = lm.n_layers
    depth = n_layers if depth is None else depth
    if keep_kv and start_layer > 0:
        raise ValueError("keep_kv needs start_layer=0: skipped blocks add no KV for the new tokens")
    if logp_at is not None:
        _check_logp_at(rows, logp_at, depth, n_layers)
    has_prefix = [r.prefix is not None and r.start > 0 for r in rows]
    lens = [len(r.ids) for r in rows]
    n = max(lens)
    starts = [r.start if hp else 0 for r, hp in zip(rows, has_prefix, strict=True)]
    m = max(starts)
    bsz = len(rows)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((bsz, n), pad_id, dtype=torch.long)
    mask = torch.zeros((bsz, m + n), dtype=torch.long)
    pos = torch.zeros((bsz, n), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : lens[b]] = torch.tensor(r.ids)
        mask[b, m - starts[b] : m + lens[b]] = 1
        pos[b] = torch.arange(starts[b], starts[b] + n)  # pads after the row: never attended to

    from transformers import DynamicCache

    cache = DynamicCache()  # full layers: a sliding-window layer would drop the prefix we keep
    if m:
        # blocks below start_layer never read their cache; layer 0 still tells masks the length
        prefixes = [r.prefix if hp else None for r, hp in zip(rows, has_prefix, strict=True)]
        first = _stack_kv(prefixes, starts, 0, m, device)
        kv_layers = [first] + [
            first if L < start_layer else _stack_kv(prefixes, starts, L, m, device)
            for L in range(1, min(depth, n_layers))
        ]
        cache = DynamicCache(ddp_cache_data=kv_layers)

    captured: dict[int, torch.Tensor] = {}
    patch_idx = _patch_index([r.patches for r in rows], device, dtype)

    def at_layer(L):
        def fn(h):
            if L == start_layer and start_layer > 0:
                h = torch.stack([_clean_input(r, L, starts[b], lens[b], n) for b, r in enumerate(rows)])
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

    kwargs = {"attention_mask": mask.to(device), "position_ids": pos.to(device), cache_kwarg(): cache, "use_cache": True}
    if start_layer > 0:
        kwargs["inputs_embeds"] = torch.zeros((bsz, n, model.config.hidden_size), dtype=dtype, device=device)
    else:
        kwargs["input_ids"] = input_ids.to(device)
    last = None
    _count(sum(lens), depth - start_layer)
    knock: dict[int, list] = {}
    probe: dict[int, list] = {}
    for b, r in enumerate(rows):
        col = m - starts[b]  # column of sequence position 0 in this row's padded KV
        for L, lo, hi in r.knockout:
            knock.setdefault(L, []).append((b, col + lo, col + hi))
        if r.probe is not None:
            for L in range(start_layer, depth):
                probe.setdefault(L, []).append((b, col + r.probe[0], col + r.probe[1]))
    with torch.inference_mode(), attention_edits(knock, probe) as mass, _hooks(lm, fns, skip_below=start_layer):
        try:
            last = getattr(model, model.base_model_prefix)(**kwargs).last_hidden_state
        except StopForward:
            last = None
        logp = _log_probs(lm, last, logp_at, scratch=scratch_logp) if logp_at is not None and depth == n_layers else {}

    traces = []
    for b, r in enumerate(rows):
        k = lens[b]
        ids = (list(r.prefix.ids[: starts[b]]) if has_prefix[b] else []) + list(r.ids)
        kv = []
        if keep_kv:
            for L in range(min(depth, n_layers)):
                layer = cache.layers[L]
                if layer.keys is None or layer.keys.numel() == 0:
                    break
                kv.append((layer.keys[b, :, m - starts[b] : m + k], layer.values[b, :, m - starts[b] : m + k]))
        hidden = None
        if capture:
            hs = [captured[L][b, : max(k - capture_from, 0)] for L in range(start_layer, depth)]
            hidden = torch.stack(hs) if hs else None
            check_finite(hidden, lm, "hidden states")
        t = Trace(ids, kv, hidden, first=starts[b] + capture_from, depth=depth)
        t.logp = {starts[b] + j: v for j, v in logp.get(b, {}).items()}
        t.mass = {L: v[:, : lens[b]] for (L, row), v in mass.items() if row == b}
        traces.append(t)
    return traces


def _check_logp_at(rows: Sequence[Row], logp_at: Sequence[Sequence[int]], depth: int, n_layers: int) -> None:
    """Log-probs asked where none can exist is an error, never an empty answer (empty lists ask nothing)."""
    if depth != n_layers and any(len(cols) for cols in logp_at):
        raise ValueError(
            f"logp_at needs the head, which runs after block {n_layers - 1}; this forward runs "
            f"depth={depth} of {n_layers} blocks: pass depth={n_layers} (or None) or drop logp_at"
        )
    if len(logp_at) != len(rows):
        raise ValueError(f"logp_at gives index lists for {len(logp_at)} rows; the batch has {len(rows)} rows")
    for b, (row, cols) in enumerate(zip(rows, logp_at, strict=True)):
        bad = [j for j in cols if not 0 <= j < len(row.ids)]
        if bad:
            raise ValueError(
                f"logp_at row {b}: local indices {bad} are outside its {len(row.ids)} new tokens "
                f"(possible: 0..{len(row.ids) - 1})"
            )


def log_softmax_fresh(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim of a tensor nobody else holds: on the CPU written over it, since a
    new [positions, vocab] float32 tensor there costs page faults (~0.1 s per 200 MB, measured: 3-4x the
    softmax itself). The same bits as torch.log_softmax (tests/test_engine.py)."""
    if logits.device.type == "cpu":
        return torch.log_softmax(logits, dim=-1, out=logits)
    return torch.log_softmax(logits, dim=-1)


def _log_probs(
    lm: LoadedModel, last: torch.Tensor, logp_at: Sequence[Sequence[int]], chunk: int = 512, scratch: bool = False,
) -> dict:
    """Next-token log-probs at (row, local index) pairs: the head runs on those positions only.
    scratch: written into the model's reused buffer where it has one (`LoadedModel.scratch_logits`)."""
    where = [(b, j) for b, cols in enumerate(logp_at) for j in cols]
    out: dict[int, dict[int, torch.Tensor]] = {}
    buf = lm.scratch_logits(len(where)) if scratch and where else None
    for i in range(0, len(where), chunk):
        part = where[i : i + chunk]
        h = last[torch.tensor([b for b, _ in part]), torch.tensor([j for _, j in part])]
        lp = log_softmax_fresh(lm.logits(h, into=None if buf is None else buf[i : i + len(part)]))
        check_finite(lp.sum(-1), lm, "logits")  # float32 sums of values in [-1e4, 0]: NaN/inf survive, cheaply
        for (b, j), v in zip(part, lp, strict=True):
            out.setdefault(b, {})[j] = v
    return out


def _stack_kv(traces: Sequence[Trace | None], lens: Sequence[int], layer: int, m: int, device):
    """Left-padded [batch, kv_heads, m, head_dim] keys and values of each trace's first lens[b] tokens."""
    ref = next(t.kv[layer] for t in traces if t is not None and layer < len(t.kv))
    ks = ref[0].new_zeros((len(traces), ref[0].shape[0], m, ref[0].shape[-1]))
    vs = ref[1].new_zeros((len(traces), ref[1].shape[0], m, ref[1].shape[-1]))
    for b, t in enumerate(traces):
        if t is not None and layer < len(t.kv) and lens[b]:
            ks[b, :, m - lens[b] :] = t.kv[layer][0][:, : lens[b]]
            vs[b, :, m - lens[b] :] = t.kv[layer][1][:, : lens[b]]
    return ks.to(device), vs.to(device)


def _clean_input(row: Row, layer: int, start: int, k: int, n: int) -> torch.Tensor:
    """Clean input of block `layer` at the row's new positions (zeros over its right padding)."""
    tr = row.prefix
    if tr is None or tr.hidden is None:
        raise ValueError("start_layer > 0 needs a prefix trace with captured block inputs")
    lo = start - tr.first
    if lo < 0 or layer >= tr.depth or lo + k > tr.hidden.shape[1]:
        raise ValueError(f"prefix trace lacks block {layer} input at positions {start}..{start + k - 1}")
    h = tr.hidden[layer, lo : lo + k]
    return h if k == n else torch.cat([h, h.new_zeros((n - k, h.shape[-1]))])


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
    lm: LoadedModel, rows: Sequence[Row], n_new: int, *, capture: bool = False, keep_logp: bool = False
) -> tuple[list[list[int]], list[Trace]]:
    """Greedy decoding as `generate(do_sample=False)` does it: one prompt pass, then `decode`.

    Rows may continue clean prefix traces (the prompt pass then runs only their
    new tokens); row patches apply in the prompt pass only, generated tokens
    run unpatched. capture: keep block inputs of the prompt pass and every step.
    """
    if n_new <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {n_new}")
    prompts = run_rows(lm, rows, capture=capture, keep_kv=True, logp_at=[[len(r.ids) - 1] for r in rows])
    return decode(lm, prompts, n_new, capture=capture, keep_logp=keep_logp, knockout=[r.knockout for r in rows])


def decode(
    lm: LoadedModel, traces: Sequence[Trace], n_new: int, *, capture: bool = False, keep_logp: bool = False,
    knockout: Sequence[Sequence[tuple[int, int, int]]] | None = None,
) -> tuple[list[list[int]], list[Trace]]:
    """Continue full-depth traces (KV of every layer, log-probs at their last position) greedily.

    The KV is laid out left-padded (real tokens contiguous) and grows one column
    per step. Returns the n_new tokens per row and traces over trace + tokens[:-1]
    (the last token is chosen, never fed). Rows that emit EOS continue with the
    pad token, like `generate`.
    """
    if n_new <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {n_new}")
    from transformers import DynamicCache

    model, device = lm.model, lm.device
    n_layers = lm.n_layers
    bsz = len(traces)
    lens = [len(t.ids) for t in traces]
    m = max(lens)
    eos = eos_ids(lm)
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
    eos_t = torch.tensor(sorted(eos) or [-1])
    for t in traces:
        if len(t.kv) < n_layers or len(t.ids) - 1 not in t.logp:
            raise ValueError("decode needs traces with KV at every layer and log-probs at their last position")
    cache = DynamicCache(ddp_cache_data=[_stack_kv(traces, lens, L, m, device) for L in range(n_layers)])
    mask = torch.zeros((bsz, m), dtype=torch.long)
    for b in range(bsz):
        mask[b, m - lens[b] :] = 1
    steps: dict[int, list[torch.Tensor]] = {L: [] for L in range(n_layers)}

    def at_layer(L):
        def fn(h):
            steps[L].append(h)
            return h

        return fn

    logps = [torch.stack([t.logp[len(t.ids) - 1] for t in traces])]
    nxt = logps[0].argmax(-1).cpu()
    out_tokens = [[int(x)] for x in nxt]
    done = torch.isin(nxt, eos_t)
    knock: dict[int, list] = {}
    for b, row_knock in enumerate(knockout or []):
        for L, lo, hi in row_knock:  # prompt keys keep their columns as the cache grows to the right
            knock.setdefault(L, []).append((b, m - lens[b] + lo, m - lens[b] + hi))
    with (torch.inference_mode(), attention_edits(knock),
          _hooks(lm, {L: at_layer(L) for L in range(n_layers)} if capture else {})):
        for step in range(1, n_new):
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=torch.long)], dim=1)
            _count(bsz, n_layers)
            out = model(
                input_ids=nxt[:, None].to(device),
                attention_mask=mask.to(device),
                position_ids=torch.tensor([[n + step - 1] for n in lens], device=device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_kwarg(): cache},
            )
            logits = out.logits[:, -1].float()
            check_finite(logits.sum(-1), lm, "logits", f"(generation step {step})")
            if keep_logp:
                logps.append(torch.log_softmax(logits, dim=-1))
            nxt = logits.argmax(-1).cpu()
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            for b in range(bsz):
                out_tokens[b].append(int(nxt[b]))
            done |= torch.isin(nxt, eos_t)
            cache = getattr(out, cache_kwarg())

    result = []
    for b, t in enumerate(traces):
        kv = [(layer.keys[b, :, m - lens[b] :], layer.values[b, :, m - lens[b] :]) for layer in cache.layers[:n_layers]]
        hidden, first = t.hidden, t.first
        if capture and n_new > 1:
            new = torch.stack([torch.cat([s[b] for s in steps[L]], dim=0) for L in range(n_layers)])
            check_finite(new, lm, "hidden states")
            if hidden is None or hidden.shape[0] < n_layers:
                hidden, first = new, lens[b]
            else:
                hidden = torch.cat([hidden[:n_layers], new], dim=1)
        tr = Trace(list(t.ids) + out_tokens[b][:-1], kv, hidden, first=first, depth=n_layers, logp=dict(t.logp))
        if keep_logp:
            for j, lp in enumerate(logps):
                tr.logp[lens[b] - 1 + j] = lp[b]
        result.append(tr)
    return out_tokens, result


def eos_ids(lm: LoadedModel) -> set[int]:
    gc = getattr(lm.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
