"""Loading models (hub id or embedded GGUF) and finding their decoder blocks."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from lac import kernels
from lac.errors import LacError

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
    linear: str = "torch"  # the Linears' kernel on the CPU: "torch" (HF's own) or "onednn" (lac.kernels)
    head_out: torch.Tensor | None = field(default=None, repr=False)  # reused logits buffer (`scratch_logits`)
    files: str | None = None  # a folder's content digest, a hub id's commit (lac.fingerprint): never a path

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def logits(self, h: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits from final (normed) hidden states: the output head, softcapped on Gemma-2.
        into: a float32 [rows, vocab] tensor to write them in, where the head is a plain bias-free Linear
        in float32 (torch.mm's out=: the same kernel and bits as the Linear, tests/test_engine.py)."""
        plain = self._plain_head() if into is not None and h.dtype == torch.float32 else None
        if plain is not None:
            out = torch.mm(h, plain.weight.t(), out=into)
        else:
            out = self.model.get_output_embeddings()(h)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:  # in place on the head's fresh output (same bits as tanh(out / cap) * cap, no new tensors)
            out = out.div_(cap).tanh_().mul_(cap)
        return out.float()

    def _plain_head(self) -> nn.Linear | None:
        """The output head where torch.mm on its weight is the head (a bias-free float32 Linear), else None."""
        head = self.model.get_output_embeddings()
        plain = type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32
        return head if plain else None

    def scratch_logits(self, rows: int) -> torch.Tensor | None:
        """A [rows, vocab] float32 CPU buffer kept across calls: a fresh one of a few hundred MB costs page
        faults on every forward (measured: the head's matmul runs ~15-20% faster into a warm buffer).
        None where `logits` could not write into it (not on the CPU, or not a plain float32 head)."""
        head = self._plain_head()
        if self.device.type != "cpu" or head is None:
            return None
        vocab = head.weight.shape[0]
        if self.head_out is None or self.head_out.shape[0] < rows or self.head_out.shape[1] != vocab:
            self.head_out = None  # the old one is freed before the new one is made
            self.head_out = torch.empty((rows, vocab), dtype=torch.float32)
        return self.head_out[:rows]


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
    """torch dtype from its name: floating types only (residuals and log-probs are real numbers)."""
    dt = getattr(torch, str(name), None)
    if str(name) not in DTYPES or not isinstance(dt, torch.dtype):
        raise LacError(f"model.dtype={name!r} is not a float type lac runs in; allowed: {', '.join(DTYPES)}")
    return dt


def _has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _has_mps():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise LacError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LacError(f"device {name!r} asked for but torch sees no CUDA device")
    if name == "mps" and not _has_mps():
        raise LacError("device 'mps' asked for but torch sees no MPS device (Apple silicon with an MPS build of torch)")
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


def load_tokenizer(cfg):
    """The model's tokenizer alone: cheap, so prompt checks run before any weights load.

    An embedded model's saved tokenizer.json goes straight to the Rust backend
    (`TokenizersBackend`): transformers' Qwen2Tokenizer would parse it in Python and rebuild
    it from vocab and merges, ~1 s more per process. tests/test_prompts.py checks both give
    the same ids, offsets, specials and template on every shipped grid; hub models keep
    their own tokenizer class."""
    from transformers import AutoTokenizer

    src = model_source(cfg)
    if cfg.source == "embedded" and Path(src, "tokenizer.json").is_file():
        from transformers import TokenizersBackend

        return TokenizersBackend.from_pretrained(src)
    from lac.fingerprint import model_files, revision

    commit = revision(model_files(cfg))  # the commit the job is keyed by
    return AutoTokenizer.from_pretrained(src, **({"revision": commit} if commit else {}))


def load_model(cfg, tokenizer=None) -> LoadedModel:
    """Load a model config (conf/model/*.yaml) in eval mode on its device and dtype (`tokenizer`: one
    already loaded from the same source, e.g. for the checks before the weights)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        log.warning(
            "%s runs in %s on CPU as configured (about 4x slower than float32); "
            "override with model.dtype=float32 if you accept the numerical change",
            cfg.name, cfg.dtype,
        )
    from lac.fingerprint import model_files, revision

    src = model_source(cfg)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    files = model_files(cfg)
    commit = revision(files)  # a hub model loads at the commit its job is keyed by
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=dtype, attn_implementation=cfg.attn_implementation, **({"revision": commit} if commit else {})
    )
    model.to(device).eval()
    model.requires_grad_(False)
    linear = kernels.resolve(cfg.get("linear", "auto"), dtype, device)
    if linear == "onednn":
        kernels.use_onednn(model)
    lm = LoadedModel(cfg.name, str(cfg.id), model, tok, dtype, device, linear=linear, files=files)
    memo = _head_memo(lm)
    if not memo.is_file():  # two full forwards (0.7-1.6 s on CPU for 0.5B): once per model config and version
        from lac.io import atomic_write_bytes

        check_head(lm)
        try:
            atomic_write_bytes(memo, b"check_head passed\n")
        except OSError as e:  # a read-only cache: the check simply runs again next time
            log.debug("cannot remember check_head in %s: %s", memo, e)
    return lm


def _head_memo(lm: LoadedModel) -> Path:
    """Where a passed `check_head` is remembered: it depends on the model's class and config (its
    forward's post-processing), the library versions and the device type, not on its weights."""
    import hashlib

    import transformers

    from lac.embedded import cache_root

    blob = json.dumps([type(lm.model).__name__, lm.model.config.to_dict(), transformers.__version__,
                       torch.__version__, lm.device.type, str(lm.dtype), lm.linear], sort_keys=True, default=str)
    return cache_root() / "checks" / f"head-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?")
EMBEDDED_HINT = "models that work offline: model=qwen0.5, model=smollm2 (embedded)"


def local_config(cfg) -> dict | None:
    """The model's config.json read without weights or network: a local folder, the converted
    embedded folder, or the Hugging Face cache. None when there is none yet."""
    if cfg.source == "embedded":
        from lac.embedded import cache_root, get_spec

        spec = get_spec(cfg.embedded)
        found = sorted((cache_root() / "models").glob(f"{spec.name}-*/config.json"))
        path = found[-1] if found else None
    elif Path(str(cfg.id)).expanduser().is_dir():
        path = Path(str(cfg.id)).expanduser() / "config.json"
    elif not _HUB_ID.fullmatch(str(cfg.id)):  # no such folder, and no hub id either
        return None
    else:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(cfg.id), "config.json")
        path = Path(hit) if isinstance(hit, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LacError(f"{cfg.name}: cannot read {path} ({e}); delete it so it is fetched again") from e


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub be opened within `timeout` (DNS included)?"""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def check_model_available(cfg) -> None:
    """Fail in seconds, before any work, when a hub model can neither be read from disk nor
    fetched (instead of transformers' minute of retries and a traceback)."""
    if cfg.source != "hub":
        return
    mid = str(cfg.id)
    if Path(mid).expanduser().is_dir():
        if not (Path(mid).expanduser() / "config.json").is_file():
            raise LacError(f"model.id={mid!r} is a folder without config.json; give a Hugging Face model folder or a hub id")
        return
    if not _HUB_ID.fullmatch(mid):
        raise LacError(f"model.id={mid!r} is neither an existing folder nor a hub id (org/name); {EMBEDDED_HINT}")
    if local_config(cfg) is not None:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if offline:
        raise LacError(f"model {mid} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                       f"download it once where the hub is reachable, or use one of the {EMBEDDED_HINT}")
    if not _reachable(endpoint):
        raise LacError(f"model {mid} is not in the local Hugging Face cache and {endpoint} is unreachable "
                       f"(HF_HUB_OFFLINE is unset); download it once where the hub is reachable, "
                       f"or use one of the {EMBEDDED_HINT}")
