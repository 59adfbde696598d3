"""Tiny randomly initialised models (Gemma-2, Qwen2, Llama) built from configs: no downloads."""

from __future__ import annotations

import os

import torch

from lac import kernels
from lac.models import LoadedModel, check_head


class StubTokenizer:
    """Enough of a tokenizer for engine tests on random models."""

    pad_token_id = 0
    eos_token_id = 1


# LAC_TEST_DEVICE=cuda runs the tiny-model tests on a GPU (lac's device handling; CI has none)
DEVICE = torch.device(os.environ.get("LAC_TEST_DEVICE", "cpu"))
# the CPU Linear kernels the engine tests run with (oneDNN where this torch and CPU have it)
LINEARS = ["torch"] + (["onednn"] if kernels.onednn_missing(torch.float32, DEVICE) is None else [])


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, linear: str = "torch") -> LoadedModel:
    """linear="onednn": its Linears run oneDNN's kernel, as `load_model` sets up a CPU float32 model."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    if arch == "gemma2":
        cfg = Gemma2Config(**common, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        model = Gemma2ForCausalLM(cfg)
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "eager"
    model.to(device=DEVICE, dtype=dtype).eval()
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    if linear == "onednn":
        kernels.use_onednn(model)
    lm = LoadedModel(f"tiny-{arch}", f"tiny-{arch}", model, StubTokenizer(), dtype, DEVICE, linear=linear)
    check_head(lm)
    return lm
