"""`python -m lac.run` end to end on the embedded model: multirun, W&B records, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lac.schema import COLUMNS
from tests.conftest import assert_same_results
from tests.subreaper import command as under_subreaper
from tests.subreaper import leftovers
from tests.wandb_reader import find_runs, read_run

pytestmark = pytest.mark.slow  # every test runs `python -m lac.run` on the embedded model

REPO = Path(__file__).resolve().parent.parent
GRID = """baseline: {persona: a thoughtful person, task: Give advice to someone facing a difficult decision.}
personas: {yoda: Yoda, marx: Karl Marx}
tasks: {haiku: Write a haiku about Monday mornings., recommend: Recommend a book worth reading and explain why.}
"""


def lac_run(tmp_path, *args, env=None, wait=True, subreaper=False):
    """`python -m lac.run` on GRID; `subreaper`: under tests/subreaper.py (its output's last line
    lists the processes the command left behind)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    flags = [a for a in args if a.startswith("-")]  # argparse wants -m before the overrides
    cmd = [sys.executable, "-m", "lac.run", *flags, "grid=custom", f"grid.path={grid}", "model.device=cpu",
           f"results_root={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
           f"hydra.run.dir={tmp_path / 'run'}", *[a for a in args if not a.startswith("-")]]
    if subreaper:
        cmd = under_subreaper(*cmd)
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:  # in a process group of its own, as a terminal's foreground job
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    out = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


def test_multirun_of_two_layers_writes_two_jobs_and_wandb_runs(tmp_path):
    log = lac_run(tmp_path, "-m", "layer=6,10", "site=transition", subreaper=True)
    # the shared W&B child and its wandb-core were stopped and waited for: a container's PID 1 that
    # never reaps keeps nothing (before lac.leave: the child and wandb-core, as zombies)
    assert leftovers(log) == []
    for num, layer in ((0, 6), (1, 10)):
        job = tmp_path / "multirun" / str(num)
        df = pd.read_parquet(job / "results.parquet")
        assert list(df.columns) == list(COLUMNS)
        kl = df[df.metric == "kl"]
        assert set(kl.layer) == {layer} and set(kl.site) == {"p_last", "g1", "g2"}
        assert len(kl) == 4 * 3 and np.isfinite(kl.value).all() and (kl.value >= 0).all()
        geo = df[df.intervention == "decomposition"]
        assert set(geo.metric) == {"cos_xy_sum", "cos_x_y", "inter_ratio"} and len(geo) == 4 * 3 * 3
        summary = json.loads((job / "summary.json").read_text())
        assert summary["config"]["layer"] == layer
        med = next(r for r in summary["summary"]["kl"] if r["site"] == "g1")["median"]
        assert med == pytest.approx(np.median(kl[kl.site == "g1"].value))

        # W&B (offline): read the run's own .wandb records back
        runs = find_runs(job)
        assert len(runs) == 1
        rec = read_run(runs[0])
        assert rec.config["layer"] == layer and rec.config["model"] == "qwen0.5"
        assert rec.config["intervention"] == "additive"
        key = f"kl/p_last/L{layer}/additive/median"
        assert rec.summary[key] == pytest.approx(np.median(kl[kl.site == "p_last"].value), abs=0)
        table = rec.tables["results"]
        assert table["columns"] == list(COLUMNS)
        got = pd.DataFrame(table["data"], columns=table["columns"])
        assert len(got) == len(df)
        assert np.array_equal(got.value.to_numpy(float), df.value.to_numpy(float))
    assert log.count("loaded qwen0.5") == 1  # one process, one model load for both jobs
    assert "activation cache" in log
    # what benchmarks/peer_nnsight.py reads from a job's log: the kernel and the closing line's phases
    import torch

    from benchmarks.peer_nnsight import _LAC_LINEAR, lac_phases
    from lac.kernels import resolve

    assert _LAC_LINEAR.search(log)["linear"] == resolve("auto", torch.float32, torch.device("cpu"))
    phases = lac_phases(log)
    assert {"total", "model_load", "clean_captures", "patched_steps"} <= set(phases)
    assert 0 < phases["patched_steps"] < phases["total"]

    # the report of this real (tiny) sweep, end to end
    from lac.report import main as report

    assert report([str(tmp_path / "multirun")]) == 0
    out = tmp_path / "multirun" / "report"
    assert len(pd.read_parquet(out / "results.parquet")) == 2 * len(df)
    tables = (out / "tables.md").read_text()
    assert "qwen0.5" in tables and "no published values" in tables
    for fig in ("kl_by_layer", "geometry_by_layer"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000


def test_rerun_of_a_finished_job_loads_no_model(tmp_path):
    lac_run(tmp_path, "layer=6", "site=p_last", "tracker=none")
    t0 = time.monotonic()
    log = lac_run(tmp_path, "layer=6", "site=p_last", "tracker=none")
    assert "already finished" in log and "loaded qwen0.5" not in log
    assert time.monotonic() - t0 < 60


def test_a_rerun_is_a_w_and_b_run_of_its_own(tmp_path):
    """rerun=true of a logged job logs under `<run id>-r1`: under the first run's id (resume="allow")
    W&B would append the rerun's history to the old run's. A later plain run reuses the rerun and logs
    nothing more."""
    lac_run(tmp_path, "layer=6", "site=p_last")
    first = find_runs(tmp_path)
    assert len(first) == 1
    lac_run(tmp_path, "layer=6", "site=p_last", "rerun=true")
    log = lac_run(tmp_path, "layer=6", "site=p_last")
    assert "already finished" in log
    runs = [read_run(r) for r in find_runs(tmp_path)]
    assert len(runs) == 2
    old, new = sorted(runs, key=lambda r: len(r.run["id"]))
    assert new.run["id"] == old.run["id"] + "-r1" and new.run["name"] == old.run["name"] + "-rerun1"
    assert len(new.history) == len(old.history) > 0 and new.exit_code == old.exit_code == 0
    (store,) = [p for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")]
    assert json.loads((store / "rerun.json").read_text()) == {"reruns": 1}
    assert [p.stem for p in (store / "tracked").glob("*.json")] == [new.run["id"]]


def _part_cells(store: Path) -> list[tuple[str, str]]:
    """(job key, cell) of every result part written so far."""
    cells = []
    for meta in store.glob("*/parts/*.json"):
        cells += [(meta.parent.parent.name, c) for c in json.loads(meta.read_text())["cells"]]
    return cells


def test_sigkill_mid_sweep_then_rerun_resumes_without_recomputing(tmp_path):
    args = ["-m", "layer=6,13", "site=p_last", "tracker=none", "engine.batch_cells=1"]
    proc = lac_run(tmp_path, *args, wait=False)
    store = tmp_path / "store"
    deadline = time.monotonic() + 600
    while len(_part_cells(store)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _part_cells(store)
    assert 2 <= len(before) < 8, "the kill must land mid-sweep"
    assert not (tmp_path / "multirun" / "1" / "results.parquet").exists()

    lac_run(tmp_path, *args)
    after = _part_cells(store)
    assert len(after) == len(set(after)) == 8, "every cell written exactly once: none recomputed"
    assert set(before) <= set(after)

    # the same sweep uninterrupted, elsewhere
    clean = tmp_path / "clean"
    clean.mkdir()
    lac_run(clean, *args)
    for num in (0, 1):
        a = pd.read_parquet(tmp_path / "multirun" / str(num) / "results.parquet")
        b = pd.read_parquet(clean / "multirun" / str(num) / "results.parquet")
        # the resumed job captured fewer cells per prefix tree: float32 batch-shape noise only
        assert_same_results(a, b)


@pytest.mark.parametrize(("sig", "when"), [(signal.SIGINT, "clean captures"), (signal.SIGINT, "patched steps"),
                                         (signal.SIGTERM, "patched steps")])
def test_ctrl_c_ends_with_one_line_and_the_same_command_resumes(tmp_path, sig, when):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it) in the clean captures (lac's
    own forwards) or in the patched steps (Lightning's predict loop, which turns it into exit code 1):
    one line, not a traceback, exit code 130, the W&B run ended as failed, no process left behind;
    the same command then finishes the job without recomputing the written cells. SIGTERM to the
    group (`timeout`, `docker stop`, a preempting scheduler) stops the same way, exit code 143:
    Lightning's own SIGTERM handler only sets a flag its predict loop never reads."""
    args = ["layer=6", "site=p_last", "engine.batch_cells=1"]
    proc = lac_run(tmp_path, *args, wait=False, subreaper=True)
    store, head = tmp_path / "store", []
    if when == "clean captures":
        for line in proc.stdout:  # the clean captures start once the model is loaded (~6 s of them)
            head.append(line)
            if "loaded qwen0.5" in line:
                break
    else:
        deadline = time.monotonic() + 600
        while not _part_cells(store) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    os.killpg(proc.pid, sig)
    out = "".join(head) + proc.communicate(timeout=300)[0]
    before = _part_cells(store)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), out[-3000:]
    assert "clean captures: 4/4" not in out if when == "clean captures" else 1 <= len(before) < 4
    what = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert f"lac: {what}; finished jobs and the cells written so far are kept" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "Terminated" not in out
    assert leftovers(out) == []
    (run,) = find_runs(tmp_path / "run")
    assert read_run(run).exit_code == 1  # ended as failed, not left open

    log = lac_run(tmp_path, *args)
    after = _part_cells(store)
    assert len(after) == len(set(after)) == 4 and set(before) <= set(after)  # none recomputed
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert len(df[df.metric == "kl"]) == 4 and "cells done" in log


def _submitit_workers() -> list[int]:
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"submitit.core._submit" in c for c in cmd):
            pids.append(int(p.name))
    return pids


def test_submitit_local_requeue_resumes_and_completes(tmp_path):
    """USR2 is the timeout/preemption signal: submitit checkpoints, requeues, and the job resumes."""
    args = ["-m", "hydra/launcher=local", "layer=6", "site=p_last", "tracker=none", "engine.batch_cells=1"]
    proc = lac_run(tmp_path, *args, wait=False)
    store = tmp_path / "store"
    deadline = time.monotonic() + 600
    while len(_part_cells(store)) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    workers = _submitit_workers()
    assert workers, "the job runs in a submitit worker process"
    first = set(_part_cells(store))
    assert 1 <= len(first) < 4
    for pid in workers:
        os.kill(pid, signal.SIGUSR2)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    cells = _part_cells(store)
    assert len(cells) == len(set(cells)) == 4 and first <= set(cells)
    df = pd.read_parquet(tmp_path / "multirun" / "0" / "results.parquet")
    assert set(df.cell) == {"yoda__haiku", "yoda__recommend", "marx__haiku", "marx__recommend"}
    assert {c for _, c in cells} == set(df.cell)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "multirun").rglob("*.err"))
    assert "Caught signal SIGUSR2" in logs and "preempted" in logs
    outs = "".join(p.read_text(errors="replace") for ext in ("*.out", "*.err") for p in (tmp_path / "multirun").rglob(ext))
    assert outs.count("loaded qwen0.5") == 2  # the requeued process started over and resumed
