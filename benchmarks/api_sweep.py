"""A layer sweep from a notebook: `lac.api.sweep` against one job over the same layers, and against
the loop of `lac.api.job` calls a user would write without it.

    PYTHONPATH=. python benchmarks/api_sweep.py --rounds 2

Each mode runs in its own process (fresh results store and activation cache, model loaded before
the clock starts, tracker=none), the three modes alternating within a round. The short grid,
transition sites, layers 4..13, additive: the `multirun` protocol of bench.py, from Python. The
sweep's and the loop's KL must equal the one job's per layer. Writes
benchmarks/results/api_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench import git_state  # noqa: E402
from benchmarks.machine import cpu, loadavg  # noqa: E402

LAYERS = range(4, 14)
COMMON = ["tracker=none", "site=transition"]
MODES = ("one", "sweep", "loop")


def child(mode: str, root: Path) -> None:
    """One mode in this process: the seconds from model loaded to every job's results."""
    os.environ["LAC_ACTIVATIONS_DIR"] = str(root / "activations")
    from lac import api, runner

    common = [*COMMON, f"results_root={root / 'store'}"]
    runner.get_model(api.compose(*common).model)
    t0 = time.perf_counter()
    if mode == "one":
        dirs = [api.job(*common, f"layer=[{','.join(map(str, LAYERS))}]", job_dir=root / "one").dir]
    elif mode == "sweep":
        dirs = [r.dir for r in api.sweep(*common, f"layer=range({LAYERS.start},{LAYERS.stop})", sweep_dir=root / "sweep")]
    else:
        dirs = [api.job(*common, f"layer={layer}", job_dir=root / f"loop{layer}").dir for layer in LAYERS]
    print(json.dumps({"seconds": time.perf_counter() - t0, "dirs": [str(d) for d in dirs]}), flush=True)
    os._exit(0)  # skip the interpreter's teardown: not what is timed


def kl(dirs: list[str]) -> dict[tuple, float]:
    import pandas as pd

    rows = pd.concat([pd.read_parquet(Path(d) / "results.parquet") for d in dirs])
    rows = rows[rows.metric == "kl"]
    return {(r.cell, r.site, int(r.layer)): float(r.value) for r in rows.itertuples()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--root", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root)

    load_before, seconds, dkl = loadavg(), {m: [] for m in MODES}, {}
    for rnd in range(args.rounds):
        order = MODES if rnd % 2 == 0 else MODES[::-1]
        got = {}
        for mode in order:
            root = Path(tempfile.mkdtemp(prefix=f"lac-api-sweep-{mode}-"))
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root)], cwd=REPO,
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            seconds[mode].append(round(got[mode]["seconds"], 2))
            print(f"round {rnd + 1} {mode:5s} {got[mode]['seconds']:6.1f} s", flush=True)
        want = kl(got["one"]["dirs"])
        for mode in ("sweep", "loop"):
            have = kl(got[mode]["dirs"])
            assert have.keys() == want.keys(), (mode, len(have), len(want))
            dkl[mode] = max(dkl.get(mode, 0.0), max(abs(have[k] - want[k]) for k in want))
    med = {m: statistics.median(v) for m, v in seconds.items()}
    ratio = {m: med[m] / med["one"] for m in MODES}
    print(f"\n| mode (layers {LAYERS.start}..{LAYERS.stop - 1}, model loaded) | seconds per round | median | / one job | max |dKL| vs one job |")
    print("|---|---|---|---|---|")
    names = {"one": "one api.job, layer=[4..13]", "sweep": "api.sweep, layer=range(4,14)", "loop": "ten api.job calls, layer=L"}
    for m in MODES:
        rounds, diff = ", ".join(f"{s:.1f}" for s in seconds[m]), f"{dkl[m]:.2e}" if m in dkl else "-"
        print(f"| {names[m]} | {rounds} | {med[m]:.1f} | {ratio[m]:.2f} | {diff} |")
    result = {"protocol": "api_sweep", **git_state(), **cpu(), "threads": os.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": loadavg(), "layers": list(LAYERS), "seconds": seconds, "median": med,
              "ratio_to_one_job": ratio, "max_dkl_vs_one_job": dkl}
    path = REPO / "benchmarks" / "results" / "api_sweep.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
