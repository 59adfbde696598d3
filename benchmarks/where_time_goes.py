"""Where a job's compute goes: attention, MLP, norms, LM head, and the Python around them.

    PYTHONPATH=. python benchmarks/where_time_goes.py --protocol section4 [--threads 2]
    PYTHONPATH=. python benchmarks/where_time_goes.py --protocol long

Runs what a job runs from model loaded to cells done (lac.runner.clean_phase, then
compute_cells per predict step; no disk activation cache), with wall-clock forward hooks
on every decoder block's attention and MLP, the norms and the LM head (CPU forwards are
synchronous, so a hook pair times its module). "python + rest" = the whole minus the timed
modules: embedding lookups, residual adds, the engine's batching, KL and geometry.
Also the matmul FLOPs each part did (2 x tokens x Linear weights; attention scores not counted)
and the floor they set at this machine's large-matmul rate, measured before and after the job
(the VM drifts). Prints a table; writes benchmarks/results/where_time_goes-<protocol>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import compose, git_state, loadavg, reset_lac  # noqa: E402

PROTOCOLS = {
    "section4": ["grid=short", "site=transition", "layer=paper"],
    "long": ["grid=long", "site=transition", "layer=long"],
}


def kind(name: str, module: torch.nn.Module, head: torch.nn.Module) -> str | None:
    if module is head:
        return "lm head"
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "self_attn":
        return "attention"
    if leaf == "mlp":
        return "mlp"
    if "norm" in leaf and ".layers." in name:
        return "norms"
    return None


def matmul_weights(module: torch.nn.Module) -> int:
    """Weights a token multiplies through in this module: its Linear layers (attention scores not counted)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def timed(model) -> tuple[dict[str, float], dict[str, float], list]:
    """Forward pre/post hooks adding each timed module's wall time, and its matmul FLOPs
    (2 x tokens x weights), into dicts."""
    spent: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    handles, head = [], model.get_output_embeddings()
    for name, module in model.named_modules():
        k = kind(name, module, head)
        if k is None:
            continue
        weights = matmul_weights(module)

        def pre(mod, args, kwargs, k=k, weights=weights):
            if getattr(mod, "_lac_inside", False):  # the head inside lm.logits: timed there
                return
            x = args[0] if args else kwargs["hidden_states"]
            flops[k] += 2.0 * (x.numel() // x.shape[-1]) * weights
            mod._lac_t0 = time.perf_counter()

        def post(mod, args, out, k=k):
            if not getattr(mod, "_lac_inside", False):
                spent[k] += time.perf_counter() - mod._lac_t0

        handles += [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    return spent, flops, handles


def time_logits(lm, spent: dict, flops: dict) -> None:
    """The engine's own head calls (lm.logits) count as "lm head" too: with `into=` they run torch.mm
    on the head's weight, which no module hook sees (the decode's head runs inside HF's forward)."""
    head, own = lm.model.get_output_embeddings(), lm.logits

    def logits(h, into=None):
        head._lac_inside = True
        t = time.perf_counter()
        try:
            return own(h, into=into)
        finally:
            spent["lm head"] += time.perf_counter() - t
            flops["lm head"] += 2.0 * (h.numel() // h.shape[-1]) * head.weight.numel()
            head._lac_inside = False

    lm.logits = logits


def matmul_peak(seconds: float = 2.0, n: int = 2048) -> float:
    """This machine's float32 GFLOP/s on a large square matmul right now (it drifts: measured
    before and after the job)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default="section4")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lac.cache import ActivationCache
    from lac.config import build_spec
    from lac.prompts import PromptBook
    from lac.runner import clean_phase, compute_cells, get_model

    base = ["tracker=none", "model.device=cpu", *PROTOCOLS[args.protocol]]
    cfg = compose(base)
    lm = get_model(cfg.model)
    spec = build_spec(cfg)
    cells = spec.grid.cells()
    reset_lac()
    peak0 = matmul_peak()
    spent, flops, handles = timed(lm.model)
    time_logits(lm, spent, flops)
    load0 = loadavg()
    t0 = time.perf_counter()
    book = PromptBook(lm.tokenizer, spec.grid)
    cache = ActivationCache(lm, spec.grid, disk=False)
    clean_phase(lm, spec, cells, book=book, cache=cache, capture_cells=int(cfg.engine.capture_cells))
    t_clean = time.perf_counter() - t0
    ctx = {"model": lm.name, "model_id": lm.model_id, "grid": spec.grid.name}
    step = int(cfg.engine.batch_cells)
    for i in range(0, len(cells), step):
        compute_cells(lm, spec, cells[i : i + step], book=book, cache=cache, max_rows=int(cfg.engine.max_rows),
                      batch_cells=step, ctx=ctx)
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    peak = max(peak0, matmul_peak())
    parts = dict(spent)
    parts["python + rest"] = total - sum(spent.values())
    floor = sum(flops.values()) / 1e9 / peak
    res = {"protocol": args.protocol, **git_state(), "threads": torch.get_num_threads(),
           "loadavg_start": load0, "loadavg_end": loadavg(), "cells": len(cells),
           "total_s": total, "clean_phase_s": t_clean, "parts_s": parts,
           "matmul_gflop": {k: v / 1e9 for k, v in flops.items()}, "matmul_peak_gflops": peak,
           "matmul_floor_s": floor}
    print(f"{args.protocol}: {len(cells)} cells, {total:.1f} s from model loaded to cells done "
          f"(clean phase {t_clean:.1f} s), {torch.get_num_threads()} threads, load {load0}")
    print(f"{'part':<16} {'seconds':>8} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        g = flops.get(k, 0.0) / 1e9
        rate = f"{g / v:>8.0f}" if g and v > 0 else f"{'':>8}"
        print(f"{k:<16} {v:>8.2f} {v / total:>6.1%} {g:>8.0f} {rate}")
    print(f"matmul floor: {sum(flops.values()) / 1e9:.0f} GFLOP at this machine's {peak:.0f} GFLOP/s "
          f"(2048^2 matmul, best of before/after) = {floor:.1f} s; the job took {total / floor:.2f}x that")
    out = Path(__file__).resolve().parent / "results" / f"where_time_goes-{args.protocol}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
