"""The paper's section-4 protocol written as a competent nnsight 0.8.1 user would, timed against lac.

    python benchmarks/peer_nnsight.py --compare --repeats 3              # timing table, short grid
    python benchmarks/peer_nnsight.py --compare --repeats 3 --grid long  # long grid (48 cells)
    python benchmarks/peer_nnsight.py --check                           # correctness only, one process
    python benchmarks/peer_nnsight.py --run-peer --out FILE             # the peer alone (what --compare times)

Needs the `bench` extra: pip install -e ".[bench]" (nnsight==0.8.1).

The peer (--run-peer), on the embedded Qwen2.5-Coder-0.5B-Instruct in float32 (eager attention,
loaded with nnsight's TransformersModel from the folder lac.embedded.embedded_path gives), with
prompts exactly as lac renders them (lac.prompts.PromptBook on conf/grid/<grid>.yaml):

  refs     one `model.generate(max_new_tokens=12, do_sample=False)` with one invoke per cell's XY
           prompt: the 12-token greedy reference of every cell.
  clean    per cell one trace of 4 invokes, BB/XB/BY/XY each teacher-forced on XY's ref[:11]:
           saves the block inputs (`model.model.layers[L].input`) at the sites p_last/g1/g2 for
           every layer, and XY's log-probs at its last 12 positions (`logits_to_keep=12`), which
           hold the three sites' clean KL windows.
  patched  per cell one trace of len(sites) x len(layers) invokes (15 on the short grid), each
           XY + ref[:w0+9] (w0 = the site's window start), writing h_BB + (h_XB - h_BB) +
           (h_BY - h_BB) into the input of block L at the site and reading the 10 window
           logits (`logits_to_keep=10`).
  metrics  KL with lac.metrics.kl_window, geometry with lac.metrics.geometry.

No prefix sharing, no KV reuse. nnsight left-pads the invokes of a trace and derives position
ids from the attention mask, so each invoke's numbers are those of its own one-prompt forward
(checked: bitwise on CPU with 1 thread); positions are therefore counted from the right, where
left padding does not move them. Every site of the transition sits at a fixed offset from the
end: -12 + w0 in prompt + ref[:11], and -10 (the first window position) in prompt + ref[:w0+9].

--compare runs, as whole fresh processes, alternating which goes first, (a) this script with
--run-peer and (b) `python -m lac.run tracker=wandb site=transition layer=paper|long` (W&B
offline, fresh results_root, hydra.run.dir and LAC_ACTIVATIONS_DIR, so lac starts cold), times
each wall-clock, checks each repeat's per-cell KL and geometry against each other and writes
benchmarks/results/peer_nnsight[_long].json (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()  # before torch, transformers and nnsight are imported

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # lac from this checkout, installed or not
    sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu, loadavg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROLES = ("BB", "XB", "BY", "XY")
SITES = ("p_last", "g1", "g2")
GEOMETRY = ("cos_xy_sum", "cos_x_y", "inter_ratio")
GRIDS = {"short": "paper_layers", "long": "long_layers"}  # grid -> the qwen0.5 layer list it is run at
LAC_LAYER = {"short": "paper", "long": "long"}
REFERENCE = {"short": "embedded-qwen0.5-v15.json", "long": "embedded-qwen0.5-v16.json"}
RTOL, ATOL = 1e-3, 1e-6  # pass criterion on KL: |peer - lac| <= ATOL + RTOL * |lac|


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "dirty": any(not line.startswith("??") for line in status.splitlines()),
            "status": status.splitlines()}


def protocol(grid_name: str) -> tuple:
    """(grid, layers) of a protocol: conf/grid/<name>.yaml and qwen0.5's paper or long layers."""
    import yaml

    from lac.grid import grid_from_mapping

    grid = grid_from_mapping(yaml.safe_load((REPO / "conf" / "grid" / f"{grid_name}.yaml").read_text()), grid_name)
    model_cfg = yaml.safe_load((REPO / "conf" / "model" / "qwen0.5.yaml").read_text())
    return grid, [int(L) for L in model_cfg[GRIDS[grid_name]]]


# ---------------------------------------------------------------- the peer


def run_peer(grid_name: str = "short", *, device: str = "auto", n_cells: int = 0, threads: int = 0) -> dict:
    """The protocol in nnsight 0.8.1; returns refs, per-cell KL and geometry, and phase times."""
    phases: dict[str, float] = {}
    t = time.perf_counter()
    import nnsight
    import torch
    import transformers
    from nnsight import TransformersModel
    phases["import"] = time.perf_counter() - t
    if threads:
        torch.set_num_threads(threads)

    from lac.embedded import embedded_path
    from lac.metrics import geometry, kl_window
    from lac.prompts import PromptBook
    from lac.sites import REF_TOKENS, WINDOW, window_start

    t = time.perf_counter()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TransformersModel(
        str(embedded_path("qwen0.5")), task="text-generation", dispatch=True, device_map=device,
        dtype=torch.float32, attn_implementation="eager",
    )
    phases["model_load"] = time.perf_counter() - t

    grid, layers = protocol(grid_name)
    book = PromptBook(model.tokenizer, grid)
    cells = grid.cells()[: n_cells or None]
    prompts = {c.key: {r: list(book.get(c, r).ids) for r in ROLES} for c in cells}
    kls: dict = {}
    geo: dict = {}
    phases.update(refs=0.0, clean=0.0, patched=0.0, metrics=0.0)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        # refs: one generate, one invoke per cell (left-padded, greedy, 12 tokens)
        t = time.perf_counter()
        gen: dict = {}
        with model.generate(max_new_tokens=REF_TOKENS, do_sample=False) as tracer:
            for c in cells:
                with tracer.invoke(prompts[c.key]["XY"]):
                    pass
            with tracer.invoke():  # an empty invoke sees the whole batch
                gen["ids"] = tracer.result.save()
        width = max(len(prompts[c.key]["XY"]) for c in cells)
        if gen["ids"].shape[1] != width + REF_TOKENS:  # generate stops early once every row has emitted EOS
            raise RuntimeError(f"generate returned {gen['ids'].shape[1] - width} new tokens, not {REF_TOKENS}")
        refs = {c.key: gen["ids"][i, -REF_TOKENS:].tolist() for i, c in enumerate(cells)}
        sync()
        phases["refs"] = time.perf_counter() - t

        for c in cells:
            ref = refs[c.key]
            p = prompts[c.key]
            # clean: BB, XB, BY, XY on ref[:11]; sites p_last/g1/g2 are the 12th..10th positions from the end
            t = time.perf_counter()
            h: dict = {}
            clean: dict = {}
            with model.trace(logits_to_keep=REF_TOKENS) as tracer:
                for r in ROLES:
                    with tracer.invoke(p[r] + ref[: REF_TOKENS - 1]):
                        for L in layers:
                            h[r, L] = model.model.layers[L].input[0, -REF_TOKENS : -REF_TOKENS + len(SITES)].save()
                        if r == "XY":
                            clean["logp"] = model.output.logits[0].float().log_softmax(-1).save()
            sync()
            phases["clean"] += time.perf_counter() - t

            t = time.perf_counter()
            logp: dict = {}
            with model.trace(logits_to_keep=WINDOW) as tracer:
                for s in SITES:
                    w0 = window_start(s)
                    for L in layers:
                        with tracer.invoke(p["XY"] + ref[: w0 + WINDOW - 1]):
                            h_bb = h["BB", L][w0]
                            model.model.layers[L].input[0, -WINDOW] = h_bb + (h["XB", L][w0] - h_bb) + (h["BY", L][w0] - h_bb)
                            logp[s, L] = model.output.logits[0].float().log_softmax(-1).save()
            sync()
            phases["patched"] += time.perf_counter() - t

            t = time.perf_counter()
            for s in SITES:
                w0 = window_start(s)
                for L in layers:
                    kls[c.key, s, L] = kl_window(clean["logp"][w0 : w0 + WINDOW], logp[s, L])
                    for m, v in geometry(*(h[r, L][w0].float() for r in ROLES)).items():
                        geo[c.key, s, L, m] = v
            phases["metrics"] += time.perf_counter() - t

    return {
        "grid": grid_name, "cells": [c.key for c in cells], "sites": list(SITES), "layers": layers,
        "refs": refs, "kl": kls, "geometry": geo, "phases_s": phases,
        "machine": {"device": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "nnsight": nnsight.__version__, "python": platform.python_version()},
    }


def flat(res: dict) -> dict:
    """JSON form: kl[cell][site][layer], geometry[cell][site][layer][metric]."""
    kl: dict = {}
    geo: dict = {}
    for (c, s, L), v in res["kl"].items():
        kl.setdefault(c, {}).setdefault(s, {})[str(L)] = v
    for (c, s, L, m), v in res["geometry"].items():
        geo.setdefault(c, {}).setdefault(s, {}).setdefault(str(L), {})[m] = v
    return {**res, "kl": kl, "geometry": geo}


def unflat(data: dict) -> tuple[dict, dict]:
    kl = {(c, s, int(L)): v for c, by_s in data["kl"].items() for s, by_l in by_s.items() for L, v in by_l.items()}
    geo = {(c, s, int(L), m): v for c, by_s in data["geometry"].items() for s, by_l in by_s.items()
           for L, by_m in by_l.items() for m, v in by_m.items()}
    return kl, geo


# ---------------------------------------------------------------- lac's numbers


def lac_in_process(grid_name: str, n_cells: int = 0, linear: str = "auto") -> tuple:
    """lac's KL and geometry of the same protocol, as a job computes them (cold, no disk cache)."""
    from hydra import compose, initialize_config_dir

    from lac.cache import ActivationCache
    from lac.config import build_spec
    from lac.prompts import PromptBook
    from lac.runner import clean_phase, compute_cells, get_model

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["tracker=none", f"grid={grid_name}", "site=transition",
                                           f"layer={LAC_LAYER[grid_name]}", f"model.linear={linear}"])
    spec = build_spec(cfg)
    lm = get_model(cfg.model)
    cells = spec.grid.cells()[: n_cells or None]
    book = PromptBook(lm.tokenizer, spec.grid)
    cache = ActivationCache(lm, spec.grid, disk=False)
    ctx = {"model": lm.name, "model_id": lm.model_id, "grid": spec.grid.name}
    eng = cfg.engine
    rows: list[dict] = []
    clean_phase(lm, spec, cells, book=book, cache=cache, capture_cells=eng.capture_cells)
    for i in range(0, len(cells), eng.batch_cells):
        rows += compute_cells(lm, spec, cells[i : i + eng.batch_cells], book=book, cache=cache,
                              max_rows=eng.max_rows, batch_cells=eng.batch_cells, ctx=ctx)[0]
    kl, geo = rows_to_dicts(rows)
    refs = {k: list(c.ref) for k, c in cache.get(list(cells), book).items()}  # the XY references lac decoded
    return kl, geo, refs, lm


def naive_numbers(lm, grid_name: str, n_cells: int) -> tuple[dict, dict, dict]:
    """The same numbers from lac.naive (one prompt per forward, no padding) on the first cells:
    what each nnsight invoke must equal, padding or not."""
    from lac.naive import Naive
    from lac.prompts import PromptBook

    grid, layers = protocol(grid_name)
    book = PromptBook(lm.tokenizer, grid)
    nv = Naive(lm.model, lm.tokenizer)
    kl, geo, refs = {}, {}, {}
    for c in grid.cells()[:n_cells]:
        p = {r: book.get(c, r) for r in ROLES}
        refs[c.key] = nv.ref(p["XY"].ids)
        for s in SITES:
            for L in layers:
                kl[c.key, s, L] = nv.intervention_kl(p, "additive", s, [L])
                for m, v in nv.geometry(p, s, L).items():
                    geo[c.key, s, L, m] = v
    return kl, geo, refs


def rows_to_dicts(rows) -> tuple[dict, dict]:
    kl = {(r["cell"], r["site"], int(r["layer"])): float(r["value"]) for r in rows
          if r["metric"] == "kl" and r["intervention"] == "additive"}
    geo = {(r["cell"], r["site"], int(r["layer"]), r["metric"]): float(r["value"]) for r in rows
           if r["intervention"] == "decomposition" and r["metric"] in GEOMETRY}
    return kl, geo


def lac_parquet(path: Path) -> tuple[dict, dict]:
    import pandas as pd

    return rows_to_dicts(pd.read_parquet(path).to_dict("records"))


def reference_kls(grid_name: str) -> dict | None:
    """Per-cell KLs of the paper's own script on the embedded model (METHOD.md), if at hand."""
    path = Path(os.environ.get("LAC_REFERENCE_DIR", "/work/shared/reference")) / REFERENCE[grid_name]
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {(cell, site, int(L)): v for site, by_layer in data["causal"].items()
            for L, d in by_layer.items() for cell, v in d["per_cell"].items()}


def compare_numbers(peer_kl: dict, peer_geo: dict, lac_kl: dict, lac_geo: dict) -> dict:
    """max |dKL|, max |d geometry|, per-cell max |dKL| and the pass verdict (RTOL, ATOL on KL)."""
    keys = sorted(set(peer_kl) | set(lac_kl))
    missing = [k for k in keys if k not in peer_kl or k not in lac_kl]
    both = [k for k in keys if k in peer_kl and k in lac_kl]
    dkl = {k: abs(peer_kl[k] - lac_kl[k]) for k in both}
    bad = [k for k in both if not dkl[k] <= ATOL + RTOL * abs(lac_kl[k])]
    gkeys = [k for k in peer_geo if k in lac_geo]
    dgeo = {k: abs(peer_geo[k] - lac_geo[k]) for k in gkeys}
    per_cell: dict = {}
    for (c, _, _), v in dkl.items():
        per_cell[c] = max(per_cell.get(c, 0.0), v)
    worst = max(dkl, key=dkl.get) if dkl else None
    worst_g = max(dgeo, key=dgeo.get) if dgeo else None
    return {
        "n_kl": len(both), "n_geometry": len(gkeys), "missing": [list(k) for k in missing],
        "max_dkl": dkl[worst] if worst else float("nan"), "worst_kl": list(worst) if worst else None,
        "max_dgeometry": dgeo[worst_g] if worst_g else float("nan"),
        "worst_geometry": list(worst_g) if worst_g else None,
        "per_cell_max_dkl": per_cell, "failing": [list(k) for k in bad],
        "pass": bool(both) and not bad and not missing and len(gkeys) == len(peer_geo) == len(lac_geo),
        "criterion": f"|KL_peer - KL_lac| <= {ATOL:g} + {RTOL:g} * |KL_lac| for every cell x site x layer",
    }


def verdict(cmp: dict) -> str:
    return (f"max |dKL| {cmp['max_dkl']:.2e} (n={cmp['n_kl']}, worst {cmp['worst_kl']}), "
            f"max |d geometry| {cmp['max_dgeometry']:.2e} (n={cmp['n_geometry']}): "
            f"{'PASS' if cmp['pass'] else 'FAIL'}")


# ---------------------------------------------------------------- modes


def main_run_peer(args) -> int:
    res = run_peer(args.grid, device=args.device, n_cells=args.cells, threads=args.threads)
    res["phases_s"]["total_in_process"] = time.perf_counter() - T_START
    res["loadavg_end"] = loadavg()
    out = flat(res)
    text = json.dumps(out, indent=1) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    ph = res["phases_s"]
    mach = res["machine"]
    print(f"peer (nnsight {mach['nnsight']}, {len(res['cells'])} cells, {mach['device']}, "
          f"{mach['torch_threads']} threads): " + ", ".join(f"{k} {v:.1f} s" for k, v in ph.items()), flush=True)
    return 0


def main_check(args) -> int:
    """Peer and lac in one process, same protocol; prints max |dKL|, max |d geometry|, PASS/FAIL."""
    t0 = time.perf_counter()
    res = run_peer(args.grid, device=args.device, n_cells=args.cells, threads=args.threads)
    peer_s = time.perf_counter() - t0
    print(f"peer done in {peer_s:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in res["phases_s"].items()),
          flush=True)
    t0 = time.perf_counter()
    lac_kl, lac_geo, lac_refs, lm = lac_in_process(args.grid, args.cells, args.lac_linear)
    print(f"lac ({lm.linear} Linears) done in {time.perf_counter() - t0:.1f} s", flush=True)
    cmp = compare_numbers(res["kl"], res["geometry"], lac_kl, lac_geo)
    same_refs = sum(res["refs"][k] == lac_refs.get(k) for k in res["refs"])
    print(f"XY references identical: {same_refs}/{len(res['refs'])} cells")
    naive = None
    if args.naive_cells:
        t0 = time.perf_counter()
        nkl, ngeo, nrefs = naive_numbers(lm, args.grid, args.naive_cells)
        pkl = {k: v for k, v in res["kl"].items() if k in nkl}
        pgeo = {k: v for k, v in res["geometry"].items() if k in ngeo}
        naive = compare_numbers(pkl, pgeo, nkl, ngeo)
        naive["same_refs"] = sum(res["refs"][k] == v for k, v in nrefs.items())
        print(f"peer vs lac.naive (one prompt per forward, no padding) on {args.naive_cells} cell(s), "
              f"{time.perf_counter() - t0:.1f} s: {verdict(naive)}; refs identical {naive['same_refs']}/{len(nrefs)}")
    ref = reference_kls(args.grid)
    if ref is not None:
        keys = [k for k in res["kl"] if k in ref]
        if keys:
            print(f"max |KL_peer - paper script JSON| {max(abs(res['kl'][k] - ref[k]) for k in keys):.2e} (n={len(keys)})")
    print(verdict(cmp))
    if args.out:
        Path(args.out).write_text(json.dumps({"peer": flat(res), "compare": cmp, "same_refs": same_refs,
                                              "vs_naive": naive, "peer_s": peer_s}, indent=1, default=str) + "\n")
    ok = cmp["pass"] and same_refs == len(res["refs"]) and (naive is None or naive["pass"])
    return 0 if ok else 1


_LAC_TIME = re.compile(r"time: (?P<total>[\d.]+) s = (?P<terms>.*)$", re.M)
_LAC_TERM = re.compile(r"^(?P<name>.+?) (?P<value>[\d.]+) s\b")
_LAC_LINEAR = re.compile(r"loaded \S+ \(.*, (?P<linear>\w+) Linears\) in")
_LAC_LOAD = re.compile(r"loaded \S+ \(.*\) in (?P<load>[\d.]+) s")


def lac_phases(log: str) -> dict:
    """lac's closing line "time: T s = start-up a s + model load b s + ... + W&B z s; beside the
    compute: imports c s, ..." as {"total": T, "start_up": a, "model_load": b, ..., "beside_imports": c}
    (any names it has; parenthesised notes dropped), and model_load from its "loaded ... in X s" line
    if the closing line has none."""
    out: dict = {}
    if m := _LAC_LOAD.search(log):
        out["model_load"] = float(m["load"])
    if m := _LAC_TIME.search(log):
        out["total"] = float(m["total"])
        terms, _, beside = re.sub(r"\([^)]*\)", "", m["terms"]).partition("; beside the compute:")
        named = [("", t) for t in terms.split(" + ")] + [("beside_", t) for t in beside.split(",") if beside]
        for prefix, term in named:
            if t := _LAC_TERM.match(term.strip()):
                name = re.sub(r"[^a-z0-9]+", "_", t["name"].lower().replace("&", "and")).strip("_")
                out[prefix + name] = float(t["value"])
    return out


def timed(cmd: list[str], env: dict, log_path: Path) -> dict:
    """One whole process, wall-clock; its own CPU time and peak RSS (os.wait4's rusage of that child)."""
    load0 = loadavg()
    with log_path.open("w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}:\n{text[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mib": usage.ru_maxrss / 1024,
            "loadavg_before": load0, "loadavg_after": loadavg(), "log": text}


def main_compare(args) -> int:
    grid = args.grid
    suffix = "" if grid == "short" else f"_{grid}"
    out_path = Path(args.out) if args.out else RESULTS / f"peer_nnsight{suffix}.json"
    base_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.threads:
        base_env["OMP_NUM_THREADS"] = str(args.threads)
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             env=base_env, capture_output=True, text=True).stdout.strip()
    runs: dict[str, list] = {"peer": [], "lac": []}
    checks = []
    work = Path(tempfile.mkdtemp(prefix="peer_nnsight_"))
    print(f"grid {grid}: {args.repeats} repeats of peer and lac, alternating; torch threads {threads}; "
          f"loadavg {loadavg()}; logs in {work}", flush=True)
    for i in range(args.repeats):
        rep = work / f"rep{i}"
        rep.mkdir()
        peer_json = rep / "peer.json"
        peer_cmd = [sys.executable, str(Path(__file__).resolve()), "--run-peer", "--grid", grid,
                    "--out", str(peer_json), "--device", args.device]
        if args.threads:
            peer_cmd += ["--threads", str(args.threads)]
        lac_cmd = [sys.executable, "-m", "lac.run", "tracker=wandb", f"grid={grid}", "site=transition",
                   f"layer={LAC_LAYER[grid]}", f"model.device={args.device}", f"model.linear={args.lac_linear}",
                   f"results_root={rep / 'results'}", f"hydra.run.dir={rep / 'job'}"]
        lac_env = {**base_env, "LAC_ACTIVATIONS_DIR": str(rep / "activations"), "WANDB_DIR": str(rep)}
        order = ["peer", "lac"] if i % 2 == 0 else ["lac", "peer"]
        for side in order:
            if side == "peer":
                r = timed(peer_cmd, base_env, rep / "peer.log")
                data = json.loads(peer_json.read_text())
                r["phases_s"] = data["phases_s"]
                r["machine"] = data["machine"]
                peer_data = data
            else:
                r = timed(lac_cmd, lac_env, rep / "lac.log")
                r["phases_s"] = lac_phases(r["log"])
                r["linear"] = m["linear"] if (m := _LAC_LINEAR.search(r["log"])) else None
            r.pop("log")
            r["order"] = order.index(side)
            runs[side].append(r)
            print(f"  repeat {i + 1}/{args.repeats} {side}: {r['wall_s']:.1f} s (loadavg {r['loadavg_before']} -> "
                  f"{r['loadavg_after']})", flush=True)
        pk, pg = unflat(peer_data)
        lk, lg = lac_parquet(rep / "job" / "results.parquet")
        cmp = compare_numbers(pk, pg, lk, lg)
        checks.append(cmp)
        print(f"  repeat {i + 1}: {verdict(cmp)}", flush=True)

    res = summarize(grid, runs, checks, threads, peer_data)
    res["work_dir"] = str(work)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    table = format_table(res)
    res["table"] = table
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print("\n" + table + f"\n-> {out_path}", flush=True)
    return 0 if all(c["pass"] for c in checks) else 1


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(grid: str, runs: dict, checks: list, threads: str, peer_data: dict) -> dict:
    med = {side: _median([r["wall_s"] for r in rs]) for side, rs in runs.items()}
    phase_med = {side: {k: _median([r["phases_s"].get(k) for r in rs])
                        for k in dict.fromkeys(k for r in rs for k in r["phases_s"])}
                 for side, rs in runs.items()}
    ref = reference_kls(grid)
    vs_paper = None
    if ref is not None:
        pk, _ = unflat(peer_data)
        keys = [k for k in pk if k in ref]
        vs_paper = {"max_dkl": max(abs(pk[k] - ref[k]) for k in keys), "n": len(keys)} if keys else None
    per_cell: dict = {}
    for c in checks:
        for cell, v in c["per_cell_max_dkl"].items():
            per_cell[cell] = max(per_cell.get(cell, 0.0), v)
    return {
        "grid": grid, "cells": len(peer_data["cells"]), "sites": peer_data["sites"], "layers": peer_data["layers"],
        "intervention": "additive", "repeats": len(checks), "torch_threads": threads,
        "machine": {**peer_data["machine"], "platform": platform.platform(), **cpu(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "git": git_state(), "argv": sys.argv[1:], "refs": peer_data["refs"],
        "lac_linear": sorted({str(r.get("linear")) for r in runs["lac"]}),  # the peer runs torch's nn.Linear
        "median_wall_s": med, "ratio_peer_over_lac": med["peer"] / med["lac"] if med["lac"] else None,
        "median_phases_s": phase_med, "runs": runs,
        "correctness": {"pass": all(c["pass"] for c in checks),
                        "max_dkl": max(c["max_dkl"] for c in checks),
                        "max_dgeometry": max(c["max_dgeometry"] for c in checks),
                        "per_cell_max_dkl": per_cell, "per_repeat": checks,
                        "criterion": checks[0]["criterion"] if checks else None,
                        "max_dkl_peer_vs_paper_script": vs_paper},
    }


def format_table(res: dict) -> str:
    p, lac = res["median_phases_s"]["peer"], res["median_phases_s"]["lac"]

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    def runs(side):
        return ", ".join(f"{r['wall_s']:.1f}" for r in res["runs"][side])

    def load(side):
        return "; ".join(f"{r['loadavg_before'][0] if r['loadavg_before'] else '?'}->"
                         f"{r['loadavg_after'][0] if r['loadavg_after'] else '?'}" for r in res["runs"][side])

    c = res["correctness"]
    ratio = res["ratio_peer_over_lac"]
    rows = [
        ("wall time, whole process (median, s)", f(res["median_wall_s"]["peer"]), f(res["median_wall_s"]["lac"])),
        ("runs (s)", runs("peer"), runs("lac")),
        ("peer / lac", "", f"{ratio:.2f}x" if ratio else "-"),
        ("in-process total (s)", f(p.get("total_in_process")), f(lac.get("total"))),
        ("imports / start-up (s)", f(p.get("import")), f(lac.get("start_up"))),
        ("model load (s)", f(p.get("model_load")), f(lac.get("model_load"))),
        ("XY references: generate (s)", f(p.get("refs")), "in clean captures"),
        ("clean traces / clean captures (s)", f(p.get("clean")), f(lac.get("clean_captures"))),
        ("patched traces / patched steps (s)", f(p.get("patched")), f(lac.get("patched_steps"))),
        ("KL + geometry (s)", f(p.get("metrics")), "in patched steps"),
    ]
    shown = {"total", "start_up", "model_load", "clean_captures", "patched_steps"}
    rows += [(f"lac: {k.replace('_', ' ')} (s)", "-", f(v)) for k, v in lac.items() if k not in shown]
    rows += [
        ("CPU time, user + sys (median, s)", f(_median([r["cpu_s"] for r in res["runs"]["peer"]])),
         f(_median([r["cpu_s"] for r in res["runs"]["lac"]]))),
        ("peak RSS (median, MiB)", f(_median([r["max_rss_mib"] for r in res["runs"]["peer"]])),
         f(_median([r["max_rss_mib"] for r in res["runs"]["lac"]]))),
        ("loadavg (1 min) before->after", load("peer"), load("lac")),
        ("max |dKL| peer vs lac", "", f"{c['max_dkl']:.2e} ({'PASS' if c['pass'] else 'FAIL'}"
         + ("" if c["pass"] else f": {max(len(r['failing']) for r in c['per_repeat'])} of "
            f"{c['per_repeat'][0]['n_kl']} KLs outside") + ")"),
        ("max |d geometry| peer vs lac", "", f"{c['max_dgeometry']:.2e}"),
    ]
    if c.get("max_dkl_peer_vs_paper_script"):
        rows.append(("max |KL_peer - paper script JSON|", f"{c['max_dkl_peer_vs_paper_script']['max_dkl']:.2e}", ""))
    head = (f"grid {res['grid']} ({res['cells']} cells), sites {'/'.join(res['sites'])}, layers "
            f"{','.join(map(str, res['layers']))}, additive; {res['repeats']} repeats, torch threads "
            f"{res['torch_threads']}, {res['machine']['device']}; lac's Linears "
            f"{'/'.join(res.get('lac_linear', ['?']))}, the peer's torch; commit {res['git']['commit'][:7]}"
            f"{' (dirty)' if res['git']['dirty'] else ''}")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("(a) nnsight " + res["machine"]["nnsight"]), *(len(r[1]) for r in rows))
    w2 = max(len("(b) lac"), *(len(r[2]) for r in rows))
    lines = [head, "", f"| {'':<{w0}} | {'(a) nnsight ' + res['machine']['nnsight']:<{w1}} | {'(b) lac':<{w2}} |",
             f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|{'-' * (w2 + 2)}|"]
    lines += [f"| {a:<{w0}} | {b:<{w1}} | {d:<{w2}} |" for a, b, d in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compare", action="store_true", help="timed comparison, fresh processes, alternating")
    mode.add_argument("--run-peer", action="store_true", help="run the nnsight peer alone (what --compare times)")
    mode.add_argument("--check", action="store_true", help="peer and lac in one process: max |dKL|, PASS/FAIL")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="short",
                    help="short: 12 cells, layers 6,10,13,17,20; long: 48 cells, layers 6,13,17")
    ap.add_argument("--repeats", type=int, default=3, help="--compare: runs of each side (median reported)")
    ap.add_argument("--out", default=None, help="--run-peer/--check: JSON path; --compare: instead of "
                    "benchmarks/results/peer_nnsight[_long].json")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (sets OMP_NUM_THREADS for both sides under --compare); default torch's choice")
    ap.add_argument("--cells", type=int, default=0, help="--run-peer/--check: first N cells only (smoke tests)")
    ap.add_argument("--naive-cells", type=int, default=1,
                    help="--check: also compare the first N cells with lac.naive (one prompt per forward)")
    ap.add_argument("--lac-linear", choices=("auto", "onednn", "torch"), default="auto",
                    help="lac's model.linear: auto (oneDNN on x86-64 float32, lac's default) or torch (HF's own "
                         "kernel, as the peer runs: bitwise the peer's numbers)")
    ap.add_argument("--keep", action="store_true", help="--compare: keep the runs' logs, JSONs and job dirs")
    args = ap.parse_args(argv)
    if args.run_peer:
        return main_run_peer(args)
    if args.check:
        return main_check(args)
    return main_compare(args)


if __name__ == "__main__":
    sys.exit(main())
