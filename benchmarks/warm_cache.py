"""A second `python -m lac.run` on cells the activation cache already holds: with the traces patched
rows continue kept on disk (`engine.cache_traces=auto`, on a CPU) against without (`false`, the
behaviour before: the XY trace rebuilt by a prefix tree and a teacher-forced pass).

    PYTHONPATH=. python benchmarks/warm_cache.py --rounds 3

What a researcher does all day: the same grid and model, then another intervention, site or layer
in a new process (or a joblib/submitit sweep, one process per job). Per protocol, each mode first
fills its own activation cache with one cold run; then every round runs both modes warm, alternating,
each a whole process with a fresh results folder, tracker=none. Every warm run's KL and geometry are
compared with its mode's cold run (`traces` must be bitwise equal: it continues the same trace).
Writes benchmarks/results/warm_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench import git_state  # noqa: E402
from benchmarks.machine import cpu, loadavg  # noqa: E402
from benchmarks.peer_nnsight import lac_phases, timed  # noqa: E402

PROTOCOLS = {"default": [], "section4": ["site=transition", "layer=paper"]}
MODES = {"rebuilt": "false", "traces": "auto"}  # engine.cache_traces


def run(work: Path, protocol: str, mode: str, tag: str, env: dict) -> dict:
    out = work / protocol / tag
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "lac.run", "tracker=none", *PROTOCOLS[protocol],
           f"engine.cache_traces={MODES[mode]}", f"results_root={out / 'store'}", f"hydra.run.dir={out / 'job'}"]
    env = {**env, "LAC_ACTIVATIONS_DIR": str(work / protocol / f"activations-{mode}")}
    r = timed(cmd, env, work / protocol / f"{tag}.log")
    r["phases_s"] = lac_phases(r.pop("log"))
    r["results"] = str(out / "job" / "results.parquet")
    return r


def max_abs_diff(a: str, b: str) -> float:
    import pandas as pd

    x, y = pd.read_parquet(a), pd.read_parquet(b)
    keys = [c for c in x.columns if c != "value"]
    m = x.merge(y, on=keys, suffixes=("", "_b"), validate="one_to_one")
    assert len(m) == len(x) == len(y), (len(m), len(x), len(y))
    return float((m.value - m.value_b).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "warm_cache.json")
    args = ap.parse_args()
    env = {**os.environ, "WANDB_MODE": "offline"}
    report = {**git_state(), **cpu(), "cores": os.cpu_count(), "loadavg_start": loadavg(), "protocols": {}}
    with tempfile.TemporaryDirectory(prefix="lac-warm-") as tmp:
        work = Path(tmp)
        for protocol in args.protocols:
            cold = {mode: run(work, protocol, mode, f"cold-{mode}", env) for mode in MODES}
            warm: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for i in range(args.rounds):
                for mode in (list(MODES) if i % 2 == 0 else list(MODES)[::-1]):
                    r = run(work, protocol, mode, f"warm-{mode}-{i}", env)
                    r["max_abs_diff_to_cold"] = max_abs_diff(cold[mode]["results"], r["results"])
                    warm[mode].append(r)
            cross = max_abs_diff(cold["rebuilt"]["results"], cold["traces"]["results"])
            report["protocols"][protocol] = {"cold": cold, "warm": warm, "cold_modes_max_abs_diff": cross}
    report["loadavg_end"] = loadavg()

    print(f"\n{report['cpu_model']} ({report['isa']}), commit {report['commit'][:7]}"
          f"{' (lac/conf dirty)' if report['lac_conf_dirty'] else ''}, {args.rounds} rounds\n")
    print("| protocol | mode | warm run, median (s) | runs (s) | clean captures (s) | lightning set-up (s) "
          "| patched steps (s) | max abs diff to its cold run |")
    print("|---|---|---|---|---|---|---|---|")
    for protocol, data in report["protocols"].items():
        for mode, runs in data["warm"].items():
            med = {k: statistics.median(r["phases_s"].get(k, 0.0) for r in runs)
                   for k in ("clean_captures", "lightning_set_up", "patched_steps")}
            data.setdefault("median_wall_s", {})[mode] = statistics.median(r["wall_s"] for r in runs)
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
            print(f"| {protocol} | {mode} | {data['median_wall_s'][mode]:.1f} | {walls} | {med['clean_captures']:.1f} | "
                  f"{med['lightning_set_up']:.1f} | {med['patched_steps']:.1f} | "
                  f"{max(r['max_abs_diff_to_cold'] for r in runs):.2g} |")
        m = data["median_wall_s"]
        data["ratio_rebuilt_to_traces"] = m["rebuilt"] / m["traces"]
        print(f"| {protocol} | ratio | **{data['ratio_rebuilt_to_traces']:.2f}x** | | | | | cold runs of the two "
              f"modes differ by {data['cold_modes_max_abs_diff']:.2g} |")
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
