"""Every intervention and mode on a GPU against the same job on the CPU: same rows, same numbers.

    python benchmarks/device_check.py --device cuda [--out DIR] [--tokenizer DIR]

Builds a randomly initialised model with the embedded Qwen2.5-0.5B's config (24 layers, so every
layer set of conf/model/qwen0.5.yaml applies; seed 0) and saves it once, with the embedded model's
tokenizer (or the one in --tokenizer DIR: a folder with tokenizer.json, tokenizer_config.json,
chat_template.jinja and config.json, for a machine without the 2.4 GB weights). Then runs one
`python -m lac.run` per job and device (model.device=cpu, then --device) over the jobs in JOBS and
compares the two `results.parquet` of each job: the same rows, KL within METHOD.md's float32
tolerance (rtol 1e-3) with the cross-device noise floor as atol (1e-5, KL_ATOL), geometry
within 1e-4, identical marker generations. Prints a table and writes `<out>/device_check.json`. Random weights: the numbers mean nothing beyond
agreeing; what this checks is that lac's tensors meet on the right device in every code path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
# Across devices no two float32 kernels round alike: log-probs differ by ~5e-7 per vocab entry on both
# sides (cuBLAS vs MKL), so a 10-position window KL by up to ~10 x that. METHOD.md's atol 1e-6 is for
# one device (batched vs plain); across devices the atol is the window's noise floor, 1e-5.
KL_ATOL = 1e-5
JOBS = {  # name -> overrides (grid short, site p_last, the model's default layer unless set)
    "additive": ["intervention=additive", "site=transition"],
    "remove_x": ["intervention=remove_x"],
    "host_none": ["intervention=host_none"],
    "host_oracle_span": ["intervention=host_oracle_span"],
    "host_none_lm": ["intervention=host_none_lm"],
    "kv_persona_from": ["intervention=kv_persona_from"],
    "knockout_persona_from": ["intervention=knockout_persona_from", "attn_persona=true"],
    "steer": ["intervention=steer", "intervention.alpha=2"],
    "swap": ["intervention=swap"],
    "three_factors": ["grid=persona_task_format", "intervention=remove", "intervention.factor=task"],
    "markers": ["experiment=markers", "markers.max_new_tokens=12"],
}


def build_model(folder: Path, tokenizer: str | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lac.embedded import embedded_path

    src = Path(tokenizer) if tokenizer else embedded_path("qwen0.5")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    cfg = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)


def sweep(device: str, model_dir: Path, out: Path, jobs: list[str], parallel: int) -> tuple[dict[str, Path], float]:
    """The jobs on `device`, one `python -m lac.run` each (a failure names its job), `parallel` at a time;
    returns each finished job's results.parquet and the wall time."""
    root = out / device
    common = ["tracker=none", "model.source=hub", f"model.id={model_dir}", f"model.device={device}",
              "site=p_last", "engine.activation_cache=false", "rerun=true"]
    threads = max((os.cpu_count() or 2) // parallel, 1)
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": str(threads)}
    found: dict[str, Path] = {}
    running: list[tuple[str, subprocess.Popen]] = []
    t0 = time.perf_counter()

    def reap(block: bool) -> None:
        for name, proc in list(running):
            if block or proc.poll() is not None:
                proc.wait()
                running.remove((name, proc))
                log = (root / f"{name}.log").read_text()
                if proc.returncode == 0:
                    found[name] = root / name / "results.parquet"
                else:
                    print(f"[{device}] {name} FAILED (exit {proc.returncode}):\n{log[-3000:]}", flush=True)
                if block:
                    return

    root.mkdir(parents=True, exist_ok=True)
    for name in jobs:
        while len(running) >= parallel:
            reap(block=False)
            time.sleep(0.2)
        cmd = [sys.executable, "-m", "lac.run", *common, *JOBS[name], f"results_root={root / 'results' / name}",
               f"hydra.run.dir={root / name}"]
        print(f"[{device}] {name}: {' '.join(JOBS[name])}", flush=True)
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        running.append((name, subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)))
    while running:
        reap(block=True)
    return found, time.perf_counter() - t0


def compare(a: Path, b: Path) -> dict:
    """Rows of two results.parquet files: same keys; KL to METHOD.md's tolerance, the rest to 1e-4."""
    keys = ["cell", "site", "layers", "intervention", "metric", "factor", "alpha"]
    da, db = pd.read_parquet(a), pd.read_parquet(b)
    m = da.merge(db, on=keys, how="outer", suffixes=("_cpu", "_dev"), indicator=True)
    unmatched = int((m["_merge"] != "both").sum())
    m = m[m["_merge"] == "both"]
    diff = (m["value_cpu"] - m["value_dev"]).abs()
    is_kl = m["metric"].str.startswith("kl")
    tol = (KL_ATOL + 1e-3 * m["value_cpu"].abs()).where(is_kl, 1e-4)
    bad = m[(diff > tol) | (m["value_cpu"].isna() != m["value_dev"].isna())]
    worst = bad.assign(diff=diff[bad.index]).sort_values("diff", ascending=False).head(10)
    gens = {}
    for side, path in (("cpu", a), ("dev", b)):
        f = path.parent / "generations.jsonl"
        gens[side] = f.read_text() if f.is_file() else ""
    return {
        "rows": len(m), "unmatched_rows": unmatched,
        "max_dkl": float(diff[is_kl].max()) if is_kl.any() else None,
        "max_dother": float(diff[~is_kl].max()) if (~is_kl).any() else None,
        "out_of_tolerance": len(bad), "generations_identical": gens["cpu"] == gens["dev"],
        "worst_out_of_tolerance": worst[[*keys, "value_cpu", "value_dev", "diff"]].to_dict("records"),
        "pass": unmatched == 0 and len(bad) == 0 and len(m) > 0 and gens["cpu"] == gens["dev"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(REPO / "outputs" / "device_check"),
                    help="work folder: the random model, job folders, device_check.json (default outputs/device_check)")
    ap.add_argument("--tokenizer", default=None, help="folder with the Qwen tokenizer files (default: embedded)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    ap.add_argument("--parallel", type=int, default=1, help="jobs at a time (CPU threads split between them)")
    args = ap.parse_args()
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        ap.error(f"unknown jobs {unknown}; allowed: {', '.join(JOBS)}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device (the CPU half alone proves nothing)")
    out = Path(args.out)
    model_dir = out / "random-qwen0.5"
    if not (model_dir / "model.safetensors").is_file():
        build_model(model_dir, args.tokenizer)
    cpu, t_cpu = sweep("cpu", model_dir, out, jobs, args.parallel)
    dev, t_dev = sweep(args.device, model_dir, out, jobs, args.parallel)
    result = {"criterion": f"|dKL| <= {KL_ATOL:g} + 1e-3 |KL_cpu|; other metrics |d| <= 1e-4; same rows and generations",
              "device": args.device, "wall_s": {"cpu": round(t_cpu, 1), args.device: round(t_dev, 1)}, "jobs": {}}
    print(f"\n| job | rows | max dKL | max d(other) | generations | {args.device} vs cpu |\n|---|---|---|---|---|---|")
    for name in jobs:
        if name not in cpu or name not in dev:
            r = {"pass": False, "failed_on": [d for d, got in (("cpu", cpu), (args.device, dev)) if name not in got]}
        else:
            r = compare(cpu[name], dev[name])
        result["jobs"][name] = r
        fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        print(f"| {name} | {r.get('rows', '-')} | {fmt(r.get('max_dkl'))} | {fmt(r.get('max_dother'))} | "
              f"{'same' if r.get('generations_identical') else 'DIFFER' if 'rows' in r else '-'} | "
              f"{'PASS' if r['pass'] else 'FAIL ' + str(r.get('failed_on', ''))} |")
    result["pass"] = all(r["pass"] for r in result["jobs"].values())
    try:
        result["machine"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except Exception:  # noqa: BLE001 - the record is best effort
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(result, indent=2))
    print(f"\n{'PASS' if result['pass'] else 'FAIL'}; wall: cpu {t_cpu:.0f} s, {args.device} {t_dev:.0f} s; "
          f"{out / 'device_check.json'}")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
