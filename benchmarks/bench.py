"""lac's engine against the plain METHOD.md script, same model, same process.

    PYTHONPATH=. python benchmarks/bench.py --protocol section4
    PYTHONPATH=. python benchmarks/bench.py --protocol long --naive-cells 8
    PYTHONPATH=. python benchmarks/bench.py --protocol multirun
    PYTHONPATH=. python benchmarks/bench.py --protocol section4 --device cuda --random-gemma2

Protocols (see benchmarks/README.md for every column):
  section4  short grid (12 cells), sites p_user_last/p_last/g1/g2, the paper's
            5 layers, additive; decomposition at every layer.
  long      long grid (48 cells), transition sites, the 3 long layers, additive;
            decomposition at those layers. --naive-cells N runs the naive side on
            the first N cells and extrapolates its wall time linearly.
  multirun  a basic-launcher sweep `-m layer=range(4,14)` against one job with
            `layer=[4,...,13]`, in process (and as real `python -m lac.run`
            subprocesses unless --no-subprocess).

(a) naive: lac.naive.Naive, one prompt per forward, as the paper's script: the
    XY reference by `generate`; for each site, each of BB/XB/BY/XY one forward
    with output_hidden_states (16 capture forwards per cell on section4); for
    each site x layer a clean window forward and a patched window forward.
(b) lac: what a job runs, cold (no disk activation cache, lac.cache._MEMORY
    cleared): lac.runner.clean_phase (captures in batches of --capture-cells)
    then lac.runner.compute_cells in predict steps of --batch-cells cells.
Writes benchmarks/results/<protocol>.json (other models/devices get a suffix).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks.machine (and lac) from this checkout
    sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu, loadavg  # noqa: E402

CONF = REPO / "conf"
RESULTS = Path(__file__).resolve().parent / "results"
ROLES = ("BB", "XB", "BY", "XY")

PROTOCOLS = {
    "section4": {
        "overrides": ["grid=short", "site=all", "layer=paper", "geometry_layers=all"],
        "target_speedup": 20.0, "reference": "embedded-qwen0.5-v15.json",
    },
    "long": {
        "overrides": ["grid=long", "site=transition", "layer=long"],
        "target_speedup": 30.0, "reference": "embedded-qwen0.5-v16.json",
    },
}
# pass criterion on KL (the project's standard, as benchmarks/peer_nnsight.py): |KL_a - KL_b| <= ATOL +
# RTOL * |KL_a| for every cell x site x layer; a flat 1e-4 would pass a patch that writes nothing where KL is small
RTOL, ATOL = 1e-3, 1e-6
TARGET_MULTIRUN = 1.1  # issue 14: -m layer=range(4,14) costs at most 1.1x one job over the same layers
MULTIRUN_LAYERS = list(range(4, 14))


# ---------------------------------------------------------------- measurement


class Meter:
    """Wall time (device-synchronised), peak RSS of the span (VmHWM reset), peak GPU memory."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def span(self, out: dict):
        self._sync()
        _reset_hwm()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            self._sync()
            out["wall_s"] = time.perf_counter() - t0
            out["peak_rss_mib"] = _hwm_mib()
            if self.device.type == "cuda":
                out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20


def _reset_hwm() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each span gets its own RSS peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _hwm_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_max_rss_mib() -> float:
    """resource.getrusage's ru_maxrss: the whole process so far (kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """Best of a few square torch.mm: the machine's dense-matmul ceiling in this dtype."""
    n = 2048 if device.type == "cpu" else 8192
    reps = 5 if device.type == "cpu" else 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    meter = Meter(device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        with meter.span({}) as s:
            for _ in range(reps):
                torch.mm(a, b)
        best = min(best, s["wall_s"])
    return {"n": n, "reps": reps, "dtype": str(dtype).replace("torch.", ""),
            "gflops": 2 * n**3 * reps / best / 1e9}


def git_state() -> dict:
    """The commit measured, and whether lac/ or conf/ differ from it (others edit them)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "lac_conf_dirty": bool(git("status", "--porcelain", "--", "lac", "conf"))}


# ---------------------------------------------------------------- model and config


def compose(overrides: Sequence[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose("config", overrides=list(overrides))


def gemma2_config():
    """Gemma-2-2B's published shapes (google/gemma-2-2b config.json), eager attention."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
    )


def load(args):
    """(LoadedModel, base overrides): the embedded model, or a random full-size Gemma-2-2B."""
    from lac.models import LoadedModel, model_source, resolve_device, resolve_dtype
    from lac.runner import get_model

    base = ["tracker=none", f"model.device={args.device}"]
    if args.dtype:
        base.append(f"model.dtype={args.dtype}")
    if not args.random_gemma2:
        return get_model(compose(base).model), base

    from transformers import AutoTokenizer, Gemma2ForCausalLM

    qcfg = compose(base).model
    tok = AutoTokenizer.from_pretrained(args.tokenizer or model_source(qcfg))  # the embedded Qwen's prompts
    if len(tok) > 256000:
        raise ValueError("Qwen token ids would not fit Gemma's vocab")
    gbase = ["tracker=none", "model=gemma2", f"model.device={args.device}"]
    if args.dtype:
        gbase.append(f"model.dtype={args.dtype}")
    gcfg = compose(gbase).model
    device, dtype = resolve_device(gcfg.device), resolve_dtype(gcfg.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(gemma2_config())
    model.to(dtype=dtype).eval()
    model.requires_grad_(False)
    lm = LoadedModel("gemma2-random", "random-init Gemma2Config(gemma-2-2b shapes), seed 0", model, tok, dtype, device)
    return lm, gbase


def param_counts(lm) -> dict:
    model = lm.model
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters() if p is not emb and p is not head
               and "embed_tokens" not in n and "lm_head" not in n)
    return {"non_embedding": body, "d_model": int(emb.shape[1]), "vocab": int(head.shape[0]),
            "total": sum(p.numel() for p in model.parameters())}


def flops(params: dict, n_layers: int, block_tokens: int, logit_positions: int) -> float:
    """2 * non-embedding params per full-depth token + 2 * d_model * vocab per logit position.

    Attention scores (QK^T, AV) and norms are left out: at these lengths (< 150
    positions) they are < 2% of the projections.
    """
    return 2 * params["non_embedding"] * block_tokens / n_layers + 2 * params["d_model"] * params["vocab"] * logit_positions


# ---------------------------------------------------------------- (a) naive


def run_naive(lm, spec, cells, book, meter) -> dict:
    """The paper's script shape on lac.naive.Naive; returns KLs, geometry, counts, phase times."""
    from lac.metrics import geometry
    from lac.naive import Naive, kl
    from lac.sites import REF_TOKENS, site_position, window_start

    nv = Naive(lm.model, lm.tokenizer)
    kls, geo, refs, phases = {}, {}, {}, {"ref": 0.0, "capture": 0.0, "kl": 0.0}
    ref_tokens = 0  # tokens of generate (its logits: one position per step, logits_to_keep=1)
    out = {}
    with meter.span(out):
        for cell in cells:
            p = {r: book.get(cell, r) for r in ROLES}
            xy = list(p["XY"].ids)
            with meter.span({}) as s:
                ref = nv.ref(xy)
            ref_tokens += len(xy) + REF_TOKENS - 1
            refs[cell.key] = ref
            phases["ref"] += s["wall_s"]
            h = {}
            with meter.span({}) as s:
                for site in spec.sites:
                    w0 = window_start(site)
                    for r in ROLES:  # one forward per site and prompt, every layer at once
                        res = nv._forward(list(p[r].ids) + ref[:w0], output_hidden_states=True)
                        pos = site_position(site, len(p[r].ids), p[r].p_user_last)
                        h[site, r] = torch.stack([hs[0, pos] for hs in res.hidden_states]).float()
                    for L in spec.geometry_layers:
                        for m, v in geometry(*(h[site, r][L] for r in ROLES)).items():
                            geo[cell.key, site, L, m] = v
            phases["capture"] += s["wall_s"]
            with meter.span({}) as s:
                for job in spec.jobs:
                    (L,) = job.layers
                    h_bb = h[job.site, "BB"][L]
                    delta_x = h[job.site, "XB"][L] - h_bb
                    delta_y = h[job.site, "BY"][L] - h_bb
                    vec = h_bb + delta_x + delta_y
                    pos = site_position(job.site, len(xy), p["XY"].p_user_last)
                    clean = nv.window_logp(xy, ref, job.site)
                    patched = nv.window_logp(xy, ref, job.site, patch=(L, pos, vec))
                    kls[cell.key, job.site, L] = kl(clean, patched)
            phases["kl"] += s["wall_s"]
    # every other forward returns logits at all its positions (HF's default)
    logit_positions = nv.tokens - ref_tokens + REF_TOKENS * len(cells)
    return {**out, "phases_s": phases, "forwards": nv.forwards, "tokens": nv.tokens,
            "logit_positions": logit_positions,
            "kl": kls, "geometry": geo, "refs": refs, "cells": [c.key for c in cells]}


# ---------------------------------------------------------------- (b) lac


@contextlib.contextmanager
def lac_phases(meter):
    """Times lac's capture and patched (KL) phases by wrapping the functions compute_cells calls."""
    import lac.patching as li
    import lac.runner as lr
    from lac import engine

    rec = {"capture_s": 0.0, "patched_s": 0.0, "patched_block_tokens": 0, "patched_tokens": 0,
           "patched_forwards": 0, "patched_logit_positions": 0, "refs": {}}
    import lac.capture as lcap

    rec["capture_logit_positions"] = 0
    import lac.prefix as lpre

    orig_cap, orig_kl, orig_rows = lr.capture, lr.kl_rows, li.run_rows
    orig_crows, orig_decode, orig_prows = lcap.run_rows, lcap.decode, lpre.run_rows

    def cap(*a, **k):
        with meter.span({}) as s:
            r = orig_cap(*a, **k)
        rec["capture_s"] += s["wall_s"]
        rec["refs"].update({c.cell.key: list(c.ref) for c in r})
        return r

    def klr(*a, **k):
        before = dict(engine.COUNTS)
        with meter.span({}) as s:
            r = orig_kl(*a, **k)
        rec["patched_s"] += s["wall_s"]
        rec["patched_block_tokens"] += engine.COUNTS["block_tokens"] - before["block_tokens"]
        rec["patched_tokens"] += engine.COUNTS["tokens"] - before["tokens"]
        rec["patched_forwards"] += engine.COUNTS["forwards"] - before["forwards"]
        return r

    def n_logits(k):
        return sum(len(cols) for cols in (k.get("logp_at") or ()))

    def rows(lm, rws, **k):
        rec["patched_logit_positions"] += n_logits(k)
        return orig_rows(lm, rws, **k)

    def crows(lm, rws, **k):
        rec["capture_logit_positions"] += n_logits(k)
        return orig_crows(lm, rws, **k)

    def prows(lm, rws, **k):
        rec["capture_logit_positions"] += n_logits(k)
        return orig_prows(lm, rws, **k)

    def decode(lm, traces, n_new, **k):
        rec["capture_logit_positions"] += len(traces) * (n_new - 1)
        return orig_decode(lm, traces, n_new, **k)

    lr.capture, lr.kl_rows, li.run_rows = cap, klr, rows
    lcap.run_rows, lcap.decode, lpre.run_rows = crows, decode, prows
    try:
        yield rec
    finally:
        lr.capture, lr.kl_rows, li.run_rows = orig_cap, orig_kl, orig_rows
        lcap.run_rows, lcap.decode, lpre.run_rows = orig_crows, orig_decode, orig_prows


def reset_lac() -> None:
    from lac import cache, engine, runner

    cache._MEMORY.clear()
    runner.CAPTURE_DEPTH.clear()
    for k in engine.COUNTS:
        engine.COUNTS[k] = 0


def run_lac(lm, spec, cells, meter, args, *, cache=None, phases=True) -> dict:
    from lac import engine
    from lac.cache import ActivationCache
    from lac.prompts import PromptBook
    from lac.runner import clean_phase, compute_cells

    ctx = {"model": lm.name, "model_id": lm.model_id, "grid": spec.grid.name}
    before = dict(engine.COUNTS)
    out = {}
    cache = cache or ActivationCache(lm, spec.grid, disk=False)
    book = PromptBook(lm.tokenizer, spec.grid)
    rows = []
    with (lac_phases(meter) if phases else contextlib.nullcontext({})) as rec, meter.span(out):
        clean_phase(lm, spec, cells, book=book, cache=cache, capture_cells=args.capture_cells)
        for i in range(0, len(cells), args.batch_cells):
            rows += compute_cells(
                lm, spec, cells[i : i + args.batch_cells], book=book, cache=cache,
                max_rows=args.max_rows, batch_cells=args.batch_cells, ctx=ctx,
            )[0]
    counts = {k: engine.COUNTS[k] - before[k] for k in engine.COUNTS}
    kls = {(r["cell"], r["site"], r["layer"]): r["value"] for r in rows if r["metric"] == "kl"}
    geo = {(r["cell"], r["site"], r["layer"], r["metric"]): r["value"] for r in rows
           if r["intervention"] == "decomposition"}
    return {**out, **counts, "phases": dict(rec), "kl": kls, "geometry": geo}


# ---------------------------------------------------------------- minimal work


def minimal_counts(lm, spec, cells, book, refs: dict[str, list[int]]) -> dict:
    """The least work any implementation must do (definition in benchmarks/README.md).

    Clean part: every distinct token prefix that must be run, once (a position's
    residuals depend only on its prefix, so the sequences form a trie; the shared
    chat-template head counts once). Sequences: XY prompt + ref[:11] (the greedy
    reference and every KL window; full depth); BB/XB/BY prompt + the ref tokens
    the sites need (up to ref[:2] for g2), which need blocks below the deepest
    decomposition/patch layer only. Patched part: per (cell, site, layer) the
    positions from the site to the last window position, from block `layer` up.
    """
    from lac.sites import REF_TOKENS, WINDOW, site_position, window_start

    n = lm.n_layers
    deepest = max([*spec.geometry_layers, *(L for j in spec.jobs for L in j.layers)])
    extra = max(window_start(s) for s in spec.sites)
    trie: dict[tuple[int, ...], int] = {}  # prefix -> blocks needed at its last position

    def add(seq, blocks):
        for i in range(1, len(seq) + 1):
            key = tuple(seq[:i])
            trie[key] = max(trie.get(key, 0), blocks)

    patched_tokens = patched_blocks = 0
    for c in cells:
        ref = refs[c.key]
        for r in ROLES:
            ids = list(book.get(c, r).ids)
            if r == "XY":
                add(ids + ref[: REF_TOKENS - 1], n)
            else:
                add(ids + ref[:extra], deepest)
        xy = book.get(c, "XY")
        for job in spec.jobs:
            q = site_position(job.site, len(xy.ids), xy.p_user_last)
            end = len(xy.ids) + window_start(job.site) + WINDOW - 1
            patched_tokens += end - q
            patched_blocks += (end - q) * (n - min(job.layers))
    clean_tokens, clean_blocks = len(trie), sum(trie.values())
    return {
        "tokens": clean_tokens + patched_tokens,
        "block_tokens": clean_blocks + patched_blocks,
        "full_depth_equiv": (clean_blocks + patched_blocks) / n,
        "clean_tokens": clean_tokens, "patched_tokens": patched_tokens,
        "patched_block_tokens": patched_blocks,
        "logit_positions": len(cells) * REF_TOKENS + len(cells) * len(spec.jobs) * WINDOW,
    }


# ---------------------------------------------------------------- comparisons


def kl_outside(a: dict, b: dict) -> list:
    """Keys both sides ran whose KLs differ by more than ATOL + RTOL * |a| (a: the reference side)."""
    return [k for k in a if k in b and not abs(a[k] - b[k]) <= ATOL + RTOL * abs(a[k])]


def max_diff(a: dict, b: dict) -> tuple[float, int, object]:
    keys = [k for k in a if k in b]
    if not keys:
        return float("nan"), 0, None
    worst = max(keys, key=lambda k: abs(a[k] - b[k]))
    return abs(a[worst] - b[worst]), len(keys), worst


def reference_kls(args, proto: str) -> dict | None:
    """Per-cell KLs of the paper's own script on the embedded model (METHOD.md), if at hand."""
    name = PROTOCOLS[proto]["reference"]
    path = Path(args.reference_dir) / name
    if args.random_gemma2 or not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {(cell, site, int(L)): v for site, by_layer in data["causal"].items()
            for L, d in by_layer.items() for cell, v in d["per_cell"].items()}


# ---------------------------------------------------------------- protocols


def bench_kl(proto: str, lm, base, args, meter, peak) -> dict:
    from lac.config import build_spec
    from lac.prompts import PromptBook

    spec = build_spec(compose([*base, *PROTOCOLS[proto]["overrides"]]))
    cells = spec.grid.cells()[: args.cells or None]
    n_naive = min(args.naive_cells or len(cells), len(cells))
    params = param_counts(lm)
    res = {"protocol": proto, "cells": len(cells), "sites": list(spec.sites), "layers": list(spec.layers),
           "geometry_layers": list(spec.geometry_layers), "intervention": "additive",
           "loadavg_start": loadavg()}

    print(f"[{proto}] lac on {len(cells)} cells (cold) ...", flush=True)
    reset_lac()
    b = run_lac(lm, spec, cells, meter, args)
    ph = b["phases"]
    patched_flop = flops(params, lm.n_layers, ph["patched_block_tokens"], ph["patched_logit_positions"])
    b_flop = flops(params, lm.n_layers, b["block_tokens"],
                   ph["patched_logit_positions"] + ph["capture_logit_positions"])
    print(f"[{proto}] lac {b['wall_s']:.1f} s; naive on {n_naive} cells ...", flush=True)
    book = PromptBook(lm.tokenizer, spec.grid)
    a = run_naive(lm, spec, cells[:n_naive], book, meter)
    scale = len(cells) / n_naive
    a_wall = a["wall_s"] * scale

    refs = ph.pop("refs")  # the XY references lac decoded
    same_ref = sum(refs[k] == v for k, v in a["refs"].items())
    minimal = minimal_counts(lm, spec, cells, book, refs)
    a_flop = flops(params, lm.n_layers, a["tokens"] * lm.n_layers, a["logit_positions"]) * scale
    m_flop = flops(params, lm.n_layers, minimal["block_tokens"], minimal["logit_positions"])
    minimal["gflop_est"] = m_flop / 1e9

    dkl, n_kl, worst_kl = max_diff(a["kl"], b["kl"])
    dgeo, n_geo, worst_geo = max_diff(a["geometry"], b["geometry"])
    ref = reference_kls(args, proto)
    vs_ref = {}
    if ref is not None:
        vs_ref = {"naive": max_diff(a["kl"], ref)[:2], "lac": max_diff(b["kl"], ref)[:2]}

    res.update({
        "naive": {
            "cells_run": n_naive, "extrapolated": n_naive < len(cells),
            "wall_s_measured": a["wall_s"], "wall_s": a_wall, "phases_s": a["phases_s"],
            "forwards_measured": a["forwards"], "tokens_measured": a["tokens"],
            "forwards": a["forwards"] * scale, "tokens": a["tokens"] * scale,
            "full_depth_equiv": a["tokens"] * scale, "peak_rss_mib": a["peak_rss_mib"],
            "logit_positions": a["logit_positions"] * scale, "gflop_est": a_flop / 1e9,
            "gflops": a_flop / 1e9 / a_wall,
            "peak_gpu_mib": a.get("peak_gpu_mib"),
        },
        "lac": {
            "wall_s": b["wall_s"], "capture_s": ph["capture_s"], "patched_s": ph["patched_s"],
            "other_s": b["wall_s"] - ph["capture_s"] - ph["patched_s"],
            "forwards": b["forwards"], "tokens": b["tokens"], "block_tokens": b["block_tokens"],
            "full_depth_equiv": b["block_tokens"] / lm.n_layers,
            "patched_forwards": ph["patched_forwards"], "patched_tokens": ph["patched_tokens"],
            "patched_block_tokens": ph["patched_block_tokens"],
            "patched_logit_positions": ph["patched_logit_positions"],
            "patched_gflop": patched_flop / 1e9,
            "patched_gflops": patched_flop / 1e9 / max(ph["patched_s"], 1e-9),
            "capture_logit_positions": ph["capture_logit_positions"],
            "gflop_est": b_flop / 1e9, "gflops": b_flop / 1e9 / b["wall_s"],
            "peak_rss_mib": b["peak_rss_mib"], "peak_gpu_mib": b.get("peak_gpu_mib"),
        },
        "minimal": minimal,
        "speedup": a_wall / b["wall_s"],
        "work_ratio_naive_over_lac": a_flop / b_flop,
        "work_bound_speedup": a_flop / m_flop,
        "target_speedup": PROTOCOLS[proto]["target_speedup"],
        "ref_tokens_identical": f"{same_ref}/{len(a['refs'])}",
        "max_abs_dkl": dkl, "kl_compared": n_kl, "worst_kl": list(worst_kl or []),
        "max_abs_dgeometry": dgeo, "geometry_compared": n_geo, "worst_geometry": list(worst_geo or []),
        "kl_criterion": f"|KL_a - KL_b| <= {ATOL:g} + {RTOL:g} * |KL_a|",
        "kl_outside": [list(k) for k in kl_outside(a["kl"], b["kl"])],
        "vs_reference_json": {k: {"max_abs_dkl": v[0], "n": v[1]} for k, v in vs_ref.items()},
        "per_cell_kl": [
            {"cell": k[0], "site": k[1], "layer": k[2], "lac": v, "naive": a["kl"].get(k)}
            for k, v in sorted(b["kl"].items())
        ],
        "matmul_peak": peak,
        "params": params,
        "loadavg_end": loadavg(),
    })
    return res


def bench_multirun(lm, base, args, meter) -> dict:
    from lac.cache import ActivationCache
    from lac.config import build_spec

    site = ["grid=short", "site=transition"]
    res = {"protocol": "multirun", "layers": MULTIRUN_LAYERS, "n_layers": lm.n_layers, "loadavg_start": loadavg()}
    spec_one = build_spec(compose([*base, *site, f"layer=[{','.join(map(str, MULTIRUN_LAYERS))}]"]))
    cells = spec_one.grid.cells()[: args.cells or None]

    print("[multirun] (i) one job, layer=[4..13], cold ...", flush=True)
    reset_lac()
    one = run_lac(lm, spec_one, cells, meter, args)

    print("[multirun] (ii) ten jobs layer=4..13, in-memory activation cache ...", flush=True)
    reset_lac()
    from lac.runner import plan_sweep_depth

    specs = {L: build_spec(compose([*base, *site, f"layer={L}"])) for L in MULTIRUN_LAYERS}
    for spec in specs.values():  # what lac's multirun callback does before the first job
        plan_sweep_depth(lm.name, spec)
    jobs, kl_multi = [], {}
    total = {}
    with meter.span(total):
        for L in MULTIRUN_LAYERS:
            spec = specs[L]
            # the runner makes one ActivationCache per job; the in-memory level is process-wide
            cache = ActivationCache(lm, spec.grid, disk=False)
            r = run_lac(lm, spec, cells, meter, args, cache=cache)
            jobs.append({"layer": L, "wall_s": r["wall_s"], "capture_s": r["phases"]["capture_s"],
                         "patched_s": r["phases"]["patched_s"], "tokens": r["tokens"],
                         "block_tokens": r["block_tokens"], "cache_hits": dict(cache.hits)})
            kl_multi.update(r["kl"])
    multi_counts = {k: sum(j[k] for j in jobs) for k in ("tokens", "block_tokens")}
    dkl, n_kl, _ = max_diff(one["kl"], kl_multi)
    res.update({
        "in_process": {
            "one_job": {"wall_s": one["wall_s"], "capture_s": one["phases"]["capture_s"],
                        "patched_s": one["phases"]["patched_s"], "tokens": one["tokens"],
                        "block_tokens": one["block_tokens"], "peak_rss_mib": one["peak_rss_mib"]},
            "multirun": {"wall_s": total["wall_s"], **multi_counts, "peak_rss_mib": total["peak_rss_mib"],
                         "jobs": jobs},
            "ratio": total["wall_s"] / one["wall_s"],
            "block_token_ratio": multi_counts["block_tokens"] / one["block_tokens"],
            "max_abs_dkl_multirun_vs_one": dkl, "kl_compared": n_kl,
            "kl_outside": [list(k) for k in kl_outside(one["kl"], kl_multi)],
        },
        "target_ratio": TARGET_MULTIRUN,
    })
    if not args.no_subprocess and not args.random_gemma2 and not args.cells:
        res["subprocess"] = multirun_subprocess(args)
    res["loadavg_end"] = loadavg()
    return res


def multirun_subprocess(args) -> dict:
    """`python -m lac.run -m layer=range(4,14)` vs one job with the layer list, model load included,
    per tracker (--multirun-trackers; wandb runs offline: one W&B run per job, as a user's sweep),
    --pairs alternating pairs; the ratio is the median of the pairs' ratios.

    engine.activation_cache=false keeps both cold (no disk cache from earlier runs);
    the in-memory cache still serves the later jobs of the sweep, as in real use.
    """
    out = {}
    for tracker in args.multirun_trackers:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "WANDB_MODE": "offline" if tracker == "wandb" else "disabled", "HYDRA_FULL_ERROR": "1"}
        env.pop("WANDB_DIR", None)  # runs in the jobs' folders, under the temporary folder
        common = [f"tracker={tracker}", "engine.activation_cache=false", f"model.device={args.device}"]
        if args.dtype:
            common.append(f"model.dtype={args.dtype}")
        res: dict = {"one_job": {"wall_s": []}, "multirun": {"wall_s": []}, "pair_ratios": []}
        for pair in range(args.pairs):
            with tempfile.TemporaryDirectory(prefix="lac-bench-") as tmp:
                cmds = {
                    "one_job": [sys.executable, "-m", "lac.run", f"layer=[{','.join(map(str, MULTIRUN_LAYERS))}]",
                                *common, f"results_root={tmp}/one/results", f"hydra.run.dir={tmp}/one/run"],
                    "multirun": [sys.executable, "-m", "lac.run", "-m", "layer=range(4,14)", *common,
                                 f"results_root={tmp}/multi/results", f"hydra.sweep.dir={tmp}/multi/sweep"],
                }
                for name, cmd in cmds.items():
                    print(f"[multirun] {tracker} pair {pair + 1}/{args.pairs} {name}: {' '.join(cmd[1:])}", flush=True)
                    t0 = time.perf_counter()
                    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
                    wall = time.perf_counter() - t0
                    r = res[name]
                    r.update(cmd=" ".join(cmd[1:]).replace(tmp, "<tmp>"), rc=max(r.get("rc", 0), p.returncode),
                             children_max_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
                    r["wall_s"].append(wall)
                    if p.returncode:
                        r["stderr_tail"] = p.stderr[-3000:]
                        print(p.stderr[-3000:], file=sys.stderr)
                    print(f"[multirun] {wall:.1f} s (rc {p.returncode})", flush=True)
                if tracker == "wandb":  # every job logged its run
                    res.setdefault("wandb_runs", []).append(
                        {k: len(list(Path(tmp, k).rglob("*.wandb"))) for k in ("one", "multi")})
            res["pair_ratios"].append(res["multirun"]["wall_s"][-1] / res["one_job"]["wall_s"][-1])
        if all(res[k]["rc"] == 0 for k in ("one_job", "multirun")):
            for k in ("one_job", "multirun"):
                res[k]["median_wall_s"] = statistics.median(res[k]["wall_s"])
            res["ratio"] = statistics.median(res["pair_ratios"])
        out[tracker] = res
    return out


# ---------------------------------------------------------------- report


def ok(cond: bool) -> str:
    return "PASS" if cond else "FAIL"


def _f(x, fmt="{:.1f}"):
    if x is None or x == "":
        return "-"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def table_kl(r: dict) -> str:
    a, b, m = r["naive"], r["lac"], r["minimal"]
    ext = f" (extrapolated from {a['cells_run']} cells)" if a["extrapolated"] else ""
    peak = r["matmul_peak"]["gflops"]
    rows = [
        ("", f"(a) naive{ext}", "(b) lac", "minimal", "target"),
        ("wall time (s)", _f(a["wall_s"]) + (f" [measured {a['wall_s_measured']:.1f}]" if a["extrapolated"] else ""),
         _f(b["wall_s"]) + f" [capture {b['capture_s']:.1f}, patched {b['patched_s']:.1f}]", "-", "-"),
        ("speedup (a)/(b)", "", f"{r['speedup']:.1f}x", "",
         f">= {r['target_speedup']:.0f}x {ok(r['speedup'] >= r['target_speedup'])}"),
        ("forwards", _f(a["forwards"], "{:.0f}"), _f(b["forwards"], "{:.0f}"), "-", "-"),
        ("token positions fed", _f(a["tokens"], "{:.0f}"), _f(b["tokens"], "{:.0f}"), _f(m["tokens"], "{:.0f}"), "-"),
        ("full-depth token equivalents", _f(a["full_depth_equiv"], "{:.0f}"), _f(b["full_depth_equiv"], "{:.0f}"),
         _f(m["full_depth_equiv"], "{:.0f}"), "-"),
        ("estimated GFLOP", _f(a["gflop_est"], "{:.0f}"), _f(b["gflop_est"], "{:.0f}"),
         _f(m["gflop_est"], "{:.0f}"), "-"),
        ("speedup at equal GFLOP/s (a)/x", "1.0x", f"{r['work_ratio_naive_over_lac']:.1f}x",
         f"{r['work_bound_speedup']:.1f}x", "-"),
        ("achieved GFLOP/s, whole run", _f(a["gflops"]), _f(b["gflops"]), "-", "-"),
        ("patched phase GFLOP/s (% of mm peak)", "-",
         f"{b['patched_gflops']:.1f} ({100 * b['patched_gflops'] / peak:.0f}% of {peak:.1f})", "-", "-"),
        ("peak RSS of the phase (MiB)", _f(a["peak_rss_mib"], "{:.0f}"), _f(b["peak_rss_mib"], "{:.0f}"), "-", "-"),
        ("max |KL_a - KL_b|", "", f"{r['max_abs_dkl']:.2e} (n={r['kl_compared']})", "", "-"),
        ("KLs within 1e-6 + 1e-3 |KL_a|", "", f"{r['kl_compared'] - len(r['kl_outside'])}/{r['kl_compared']}", "",
         f"all {ok(r['kl_compared'] > 0 and not r['kl_outside'])}"),
        ("max |geometry_a - geometry_b|", "", f"{r['max_abs_dgeometry']:.2e} (n={r['geometry_compared']})", "", "-"),
        ("XY reference tokens identical (cells)", "", r["ref_tokens_identical"], "", "-"),
    ]
    if a.get("peak_gpu_mib") is not None:
        rows.insert(8, ("peak GPU memory (MiB)", _f(a["peak_gpu_mib"], "{:.0f}"), _f(b["peak_gpu_mib"], "{:.0f}"), "-", "-"))
    for who, v in r.get("vs_reference_json", {}).items():
        rows.append((f"max |KL_{who} - paper script JSON|", "", f"{v['max_abs_dkl']:.2e} (n={v['n']})", "", "-"))
    return _grid(rows)


def table_multirun(r: dict) -> str:
    ip, n = r["in_process"], r["n_layers"]
    rows = [
        ("", "(i) one job layer=[4..13]", "(ii) -m layer=range(4,14)", "(ii)/(i)", "target"),
        ("in process: wall (s)", _f(ip["one_job"]["wall_s"]), _f(ip["multirun"]["wall_s"]),
         f"{ip['ratio']:.2f}", f"<= {TARGET_MULTIRUN:g} {ok(ip['ratio'] <= TARGET_MULTIRUN)}"),
        ("in process: full-depth token equivalents", _f(ip["one_job"]["block_tokens"] / n, "{:.0f}"),
         _f(ip["multirun"]["block_tokens"] / n, "{:.0f}"), f"{ip['block_token_ratio']:.2f}", "-"),
        ("in process: max |KL_(i) - KL_(ii)|", "", f"{ip['max_abs_dkl_multirun_vs_one']:.2e} (n={ip['kl_compared']})", "",
         f"all within 1e-6 + 1e-3 |KL| {ok(ip['kl_compared'] > 0 and not ip.get('kl_outside'))}"),
    ]
    for tracker, sp in (r.get("subprocess") or {}).items():
        what = f"python -m lac.run tracker={tracker}: median wall (s) of {len(sp['pair_ratios'])} pairs"
        if "ratio" in sp:
            rows.append((what, _f(sp["one_job"]["median_wall_s"]), _f(sp["multirun"]["median_wall_s"]),
                         f"{sp['ratio']:.2f} (pairs {', '.join(f'{x:.2f}' for x in sp['pair_ratios'])})",
                         f"<= {TARGET_MULTIRUN:g} {ok(sp['ratio'] <= TARGET_MULTIRUN)}"))
        else:
            rows.append((what, *(f"rc={sp[k]['rc']}" for k in ("one_job", "multirun")), "-", "-"))
    return _grid(rows)


def _grid(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=["section4", "long", "multirun", "all"], default="section4")
    ap.add_argument("--naive-cells", type=int, default=0,
                    help="run the naive side on the first N cells only and extrapolate its time (default: all)")
    ap.add_argument("--cells", type=int, default=0, help="restrict the grid to its first N cells, both sides (smoke tests)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (model.device)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (default: torch's choice); 1 is far faster on an oversubscribed CPU")
    ap.add_argument("--dtype", default=None, help="override model.dtype (default: the model config's)")
    ap.add_argument("--random-gemma2", action="store_true",
                    help="a randomly initialised full-size Gemma-2-2B (timing only; prompts from the Qwen tokenizer)")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="with --random-gemma2: load the Qwen tokenizer from DIR (its tokenizer.json, tokenizer_config.json, "
                         "chat_template.jinja) instead of the embedded model's folder, so no weights are needed")
    ap.add_argument("--max-rows", type=int, default=64, help="engine.max_rows")
    ap.add_argument("--batch-cells", type=int, default=12, help="engine.batch_cells")
    ap.add_argument("--capture-cells", type=int, default=64, help="engine.capture_cells")
    ap.add_argument("--no-subprocess", action="store_true", help="multirun: skip the python -m lac.run timing")
    ap.add_argument("--pairs", type=int, default=3, help="multirun: alternating (one job, sweep) pairs per tracker")
    ap.add_argument("--multirun-trackers", type=lambda v: v.split(","), default=["none", "wandb"],
                    help="multirun: the trackers timed as python -m lac.run, comma-separated (none,wandb)")
    ap.add_argument("--reference-dir", default=os.environ.get("LAC_REFERENCE_DIR", "/work/shared/reference"),
                    help="where embedded-qwen0.5-v15/v16.json live (optional check)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.tokenizer and not args.random_gemma2:
        ap.error("--tokenizer is only used with --random-gemma2")

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the lac.run subprocesses
    t0 = time.perf_counter()
    lm, base = load(args)
    load_s = time.perf_counter() - t0
    meter = Meter(lm.device)
    peak = matmul_peak(lm.device, lm.dtype)
    with torch.inference_mode():  # one warm-up forward, so neither side pays first-call costs
        lm.model(torch.tensor([[1, 2, 3, 4]], device=lm.device))
    machine = {
        "device": str(lm.device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), **cpu(),
        "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
        "model": lm.name, "model_id": lm.model_id, "dtype": str(lm.dtype).replace("torch.", ""),
        "n_layers": lm.n_layers, "model_load_s": load_s, "git": git_state(),
    }
    print(f"model {lm.name} {machine['dtype']} on {lm.device}; load {load_s:.1f} s; "
          f"matmul peak {peak['gflops']:.1f} GFLOP/s; loadavg {loadavg()}", flush=True)

    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if (not args.random_gemma2 and lm.device.type == "cpu" and not args.cells and not args.dtype) else \
        f"-{lm.name}-{lm.device.type}" + (f"-{machine['dtype']}" if args.dtype else "") + \
        (f"-{args.cells}cells" if args.cells else "")
    protos = ["section4", "long", "multirun"] if args.protocol == "all" else [args.protocol]
    for proto in protos:
        if proto == "multirun":
            res = bench_multirun(lm, base, args, meter)
            table = table_multirun(res)
        else:
            res = bench_kl(proto, lm, base, args, meter, peak)
            table = table_kl(res)
        res.update({"machine": machine, "matmul_peak": peak, "process_max_rss_mib": process_max_rss_mib(),
                    "argv": sys.argv[1:], "table": table})
        path = out_dir / f"{proto}{suffix}.json"
        path.write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"\n## {proto}: {lm.name} {machine['dtype']} {lm.device} "
              f"(loadavg {res['loadavg_start']} -> {res['loadavg_end']})\n{table}\n-> {path}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
