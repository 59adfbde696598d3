"""Eager attention without materialised KV-head repeats, for lac's own forwards.

HF's eager attention copies every key and value head `num_key_value_groups`
times (`repeat_kv`) at every layer and step; with a batch of 96 decode rows
that copy cost more than the matmuls. `grouped_eager` computes the same
softmax(QK^T * scale [softcapped] + mask) V by grouping the query heads that
share a KV head, so nothing is copied. Same math as eager (results agree to
float rounding; tests compare with plain HF eager forwards). The engine swaps
it in only while it runs a model configured as "eager".
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

NAME = "lac_grouped_eager"

# Attention edits of the forward that is running (set by `attention_edits`), per layer index:
# "knock": [(row, first key column, end column)]: those keys get -inf logits for every query;
# "probe": [(row, first key column, end column)]: the softmax mass of those keys is recorded
# into "mass" as [heads, queries] per (layer, row). Only lac's grouped eager attention reads them.
_EDITS: dict[str, dict] = {}


@contextmanager
def attention_edits(knock: dict | None = None, probe: dict | None = None):
    """Knock out keys / record attention mass in the forwards run inside this block."""
    _EDITS.update(knock=knock or {}, probe=probe or {}, mass={})
    try:
        yield _EDITS["mass"]
    finally:
        _EDITS.clear()


def grouped_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, q, d = query.shape
    kvh, n = key.shape[1], key.shape[2]
    g = h // kvh
    if scaling is None:
        scaling = module.head_dim**-0.5
    # query head i uses KV head i // g (repeat_kv's layout): [b, kvh, g*q, d]
    w = torch.matmul(query.reshape(b, kvh, g * q, d), key.transpose(2, 3)) * scaling
    w = w.view(b, h, q, n)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    layer = getattr(module, "layer_idx", None)
    if _EDITS and layer in _EDITS["knock"]:
        w = w.clone()
        for row, lo, hi in _EDITS["knock"][layer]:
            w[row, :, :, lo:hi] = float("-inf")
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    if _EDITS and layer in _EDITS["probe"]:
        for row, lo, hi in _EDITS["probe"][layer]:
            _EDITS["mass"][(layer, row)] = w[row, :, :, lo:hi].sum(-1).float().cpu()
    out = torch.matmul(w.view(b, kvh, g * q, n), value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), w


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, grouped_eager)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def supports_edits(model: nn.Module) -> bool:
    """Knockout and attention mass need lac's grouped eager attention: eager-configured models only."""
    return getattr(model.config, "_attn_implementation", None) in ("eager", NAME)


@contextmanager
def grouped_attention(model: nn.Module):
    """Run `model` with grouped eager attention if it is configured as eager (else unchanged)."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "eager":
        if _EDITS and (_EDITS["knock"] or _EDITS["probe"]):
            raise ValueError(f"attention knockout / attention mass need eager attention; this model runs "
                             f"{cfg._attn_implementation!r}: set model.attn_implementation=eager")
        yield
        return
    _register()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    try:
        for c in configs.values():
            c._attn_implementation = NAME
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = "eager"
