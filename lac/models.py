"""Loading models (hub id or embedded GGUF) and finding their decoder blocks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger("lac.models")

DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class LoadedModel:
    name: str  # config name, e.g. "qwen0.5"
    model_id: str  # HF id or embedded identity
    model: Any  # a transformers causal LM, eval mode
    tokenizer: Any
    dtype: torch.dtype
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits from final (normed) hidden states: the output head, softcapped on Gemma-2."""
        out = self.model.get_output_embeddings()(h)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out.float()


def check_head(lm: LoadedModel) -> None:
    """The engine computes logits itself (only where a window reads them): refuse a model where
    base model + `lm.logits` differs from the model's own forward (an unknown logit scaling)."""
    ids = torch.tensor([[1, 2, 3, 4]], device=lm.device)
    with torch.inference_mode():
        own = lm.model(input_ids=ids).logits[0].float()
        ours = lm.logits(getattr(lm.model, lm.model.base_model_prefix)(input_ids=ids).last_hidden_state[0])
    err = (own - ours).abs().max().item()
    if not err <= 1e-3 * max(1.0, own.abs().max().item()):
        raise ValueError(
            f"{lm.name}: {type(lm.model).__name__} post-processes its logits in a way lac does not know "
            f"(max |diff| {err:.3g} between its forward and output head); supported: plain heads and "
            "final_logit_softcapping (Llama, Qwen2, Gemma-2 and alike)"
        )


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype from its name, refusing names torch lacks."""
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return dt


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but torch sees no CUDA device")
    return torch.device(name)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks: `model.model.layers` on Llama/Qwen2/Gemma-2."""
    n = model.config.num_hidden_layers
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def model_source(cfg) -> str:
    """Where the weights come from: an embedded key's cached folder or a hub id / local path."""
    if cfg.source == "embedded":
        from lac.embedded import embedded_path

        return str(embedded_path(cfg.embedded))
    if cfg.source == "hub":
        return cfg.id
    raise ValueError(f"unknown model.source {cfg.source!r}; allowed: hub, embedded")


def load_model(cfg) -> LoadedModel:
    """Load a model config (conf/model/*.yaml) in eval mode on its device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        log.warning(
            "%s runs in %s on CPU as configured (about 4x slower than float32); "
            "override with model.dtype=float32 if you accept the numerical change",
            cfg.name, cfg.dtype,
        )
    src = model_source(cfg)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=dtype, attn_implementation=cfg.attn_implementation
    )
    model.to(device).eval()
    model.requires_grad_(False)
    lm = LoadedModel(cfg.name, str(cfg.id), model, tok, dtype, device)
    check_head(lm)
    return lm
