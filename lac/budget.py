"""Size checks before the weights load: does the job fit in memory, and how long will it take?

Rough on purpose (within a factor of ~2): the point is to refuse a job that
cannot fit before it has cost anything, and to tell a user starting a long
job what to expect. Counts come from the model's config.json and the job's
prompts; nothing is measured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from lac.errors import LacError
from lac.models import local_config, resolve_device, resolve_dtype

log = logging.getLogger("lac")
LONG_JOB_S = 300.0  # jobs estimated above this say so at start
# effective rate (2 x block params x tokens over compute seconds; the prefix tree and early EOS
# do less work than that count): the embedded model's default, section-4, long-grid, knockout
# and markers jobs at 1 thread ran in about 0.5-1x the estimate this gives (d2c70bd)
_CPU_FLOPS_PER_THREAD = 100e9
_GPU_FLOPS = 20e12


def param_count(c: dict) -> tuple[int, int]:
    """(parameters per decoder block, embedding + head parameters) from a HF config dict."""
    c = {**c, **c.get("text_config", {})}
    d, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or d // heads
    block = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * c["intermediate_size"]
    embed = c["vocab_size"] * d * (1 if c.get("tie_word_embeddings") else 2)
    return block, embed


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the job runs: CUDA's free memory, else the OS's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate(cfg, spec, prompts: Sequence, extra: int) -> dict[str, float] | None:
    """Bytes (weights + kept traces + transient prefix-tree KV) and seconds of the job."""
    c = local_config(cfg.model)
    if not c:
        return None
    block, embed = param_count(c)
    t = {**c, **c.get("text_config", {})}
    n_layers, d = spec.n_layers, t["hidden_size"]
    kv_width = 2 * (t.get("num_key_value_heads") or t["num_attention_heads"]) * (
        t.get("head_dim") or d // t["num_attention_heads"])
    nbytes = torch.finfo(resolve_dtype(cfg.model.dtype)).bits // 8
    cells = len(spec.grid.cells())
    mean_len = sum(len(p.ids) for p in prompts) / max(len(prompts), 1) + extra
    kept = min(cells, 256) * 2 * mean_len * n_layers * (kv_width + d) * nbytes  # host traces in memory
    batch = min(cells, int(cfg.engine.capture_cells)) * 5
    transient = batch * mean_len * n_layers * kv_width * nbytes + 512 * t["vocab_size"] * 4
    weights = (n_layers * block + embed) * nbytes
    tokens = len(prompts) * mean_len
    if spec.mode == "markers":
        tokens += cells * len(spec.conditions) * spec.max_new_tokens
    else:
        tokens += cells * len(spec.jobs) * 11
    flops = 2 * n_layers * block * tokens
    device = resolve_device(cfg.model.device)
    rate = _GPU_FLOPS if device.type == "cuda" else _CPU_FLOPS_PER_THREAD * max(torch.get_num_threads(), 1)
    return {"weights": weights, "activations": kept + transient, "seconds": flops / rate}


def check_budget(cfg, spec, prompts: Sequence, extra: int, *, loaded: bool = False) -> None:
    """Refuse a job whose memory estimate exceeds what is free; announce one of over ~5 minutes."""
    est = estimate(cfg, spec, prompts, extra)
    if est is None:
        return
    need = est["activations"] + (0 if loaded else est["weights"])
    free = available_bytes(resolve_device(cfg.model.device))
    gib = 1 << 30
    if free is not None and need > free and not os.environ.get("LAC_SKIP_MEMORY_CHECK"):
        raise LacError(
            f"{cfg.model.name} job needs about {need / gib:.1f} GiB ({est['weights'] / gib:.1f} GiB weights in "
            f"{cfg.model.dtype}, {est['activations'] / gib:.1f} GiB activations for {len(spec.grid.cells())} cells) "
            f"but {free / gib:.1f} GiB is free; use a smaller grid or engine.capture_cells, another dtype or device "
            f"(LAC_SKIP_MEMORY_CHECK=1 skips this check)"
        )
    if est["seconds"] > LONG_JOB_S:
        log.warning("this job is estimated at ~%.0f min of compute (%s, %d cells; rough, from model size "
                    "and token counts)", est["seconds"] / 60, cfg.model.name, len(spec.grid.cells()))
