"""Batched vs one-at-a-time greedy generation for the paper's marker protocol (24 cells x 4 conditions).

    python benchmarks/generation.py [--cells 24] [--tokens 80] [--device cpu]

Both sides start from the same clean captures (not timed) and generate the same tokens
(checked): one-at-a-time is HF `generate` on one prompt with a prompt-pass-only pre-hook,
as a hand-written script does it; batched is what `experiment=markers` runs
(lac.runner.marker_generations): every row continues a clean prompt trace, the prompt
pass is its last (patched) token, then one left-padded greedy decode over all cells and
conditions at once.
Prints a table and writes benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lac.cache import ActivationCache
from lac.config import build_spec
from lac.interventions import get_intervention
from lac.prompts import PromptBook
from lac.runner import capture, get_model, marker_generations

ROOT = Path(__file__).resolve().parent.parent


def items_for(caps, book, conditions, L):
    """(prompt ids, patches) per cell x condition, for the one-at-a-time side."""
    items = []
    for cap in caps:
        xy = list(cap.prompts["XY"].ids)
        for cond in conditions:
            if cond == "bare":
                items.append((list(book.get(cap.cell, "bare").ids), []))
                continue
            iv = get_intervention(cond)
            items.append((xy, [(L, len(xy) - 1, iv.vector(cap, "p_last", L))] if iv.writes else []))
    return items


def one_at_a_time(lm, items, n):
    out = []
    for ids, patches in items:
        handles = []
        for layer, pos, vec in patches:
            def hook(m, args, kwargs, pos=pos, vec=vec):
                if args[0].shape[1] == 1:
                    return None
                h = args[0].clone()
                h[0, pos] = vec.to(h.dtype)
                return (h, *args[1:]), kwargs
            handles.append(lm.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            g = lm.model.generate(torch.tensor([ids], device=lm.device), max_new_tokens=n, do_sample=False, num_beams=1)
        for h in handles:
            h.remove()
        out.append(g[0, len(ids):].tolist())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=96, help="rows per batched decode")
    ap.add_argument("--single-rows", type=int, default=0,
                    help="time one-at-a-time on the first N rows only and extrapolate (0: all rows)")
    args = ap.parse_args(argv)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=markers", "tracker=none", f"model.device={args.device}"])
    spec = build_spec(cfg)
    lm = get_model(cfg.model)
    book = PromptBook(lm.tokenizer, spec.grid)
    L = spec.layers[0]
    cache = ActivationCache(lm, spec.grid, disk=False)
    caps = capture(lm, spec, spec.grid.cells()[: args.cells], book=book, cache=cache, batch_cells=64)
    items = items_for(caps, book, spec.conditions, L)
    t0 = time.perf_counter()
    gens = marker_generations(lm, caps, spec.conditions, L, book=book, max_new_tokens=args.tokens,
                              batch_rows=args.batch)
    batched = [tk for *_, tk in gens]
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_single = args.single_rows or len(items)
    single = one_at_a_time(lm, items[:n_single], args.tokens)
    t_single = (time.perf_counter() - t0) * len(items) / n_single
    same = sum(b[: len(s)] == s for b, s in zip(batched, single, strict=False))
    res = {
        "rows": len(items), "tokens": args.tokens, "device": args.device, "threads": torch.get_num_threads(),
        "one_at_a_time_s": round(t_single, 2), "batched_s": round(t_batched, 2),
        "speedup": round(t_single / t_batched, 2), "identical_rows": f"{same}/{n_single}",
        "one_at_a_time_rows_timed": n_single, "extrapolated": n_single < len(items),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loadavg": os.getloadavg(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
    }
    print("| rows | tokens | one-at-a-time (s) | batched (s) | speedup | identical rows | target |")
    print("|---|---|---|---|---|---|---|")
    note = f" (extrapolated from {n_single} rows)" if n_single < len(items) else ""
    print(f"| {res['rows']} | {args.tokens} | {res['one_at_a_time_s']}{note} | {res['batched_s']} | {res['speedup']}x | "
          f"{res['identical_rows']} | >= 4x {'PASS' if res['speedup'] >= 4 else 'FAIL'} |")
    out = ROOT / "benchmarks" / "results" / "generation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
