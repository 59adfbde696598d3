"""The joblib launcher end to end: two jobs at once in two processes, one results_root and one
activation cache shared between them, results equal to the basic launcher's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from lac.schema import COLUMNS
from tests.conftest import assert_same_results
from tests.subreaper import leftovers
from tests.test_run import lac_run
from tests.wandb_reader import find_runs

# every job log line carries the pid and time of the process that wrote it; the launcher's own
# lines (Hydra's logging, on stdout) carry its pid
LOG_FORMAT = "hydra.job_logging.formatters.simple.format='pid=%(process)d t=%(created)f [%(name)s] %(message)s'"
LAUNCHER_FORMAT = (
    "hydra.hydra_logging.formatters.simple.format='launcher pid=%(process)d [HYDRA] %(message)s'"
)
LINE = re.compile(r"^pid=(\d+) t=([0-9.]+) \[([^\]]*)\] (.*)$")
SWEEP = ["-m", "layer=6,10", "site=p_last", LOG_FORMAT, LAUNCHER_FORMAT]
CELLS = {"yoda__haiku", "yoda__recommend", "marx__haiku", "marx__recommend"}


def job_log(job: Path) -> list[tuple[int, float, str, str]]:
    """(pid, time, logger, message) of every line of the job's own Hydra log (run.log)."""
    logs = list(job.glob("*.log"))
    assert len(logs) == 1, logs
    lines = [LINE.match(line) for line in logs[0].read_text().splitlines()]
    return [(int(m[1]), float(m[2]), m[3], m[4]) for m in lines if m]


def running(pid: int) -> bool:
    """A live process (not gone, not a zombie left for init to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_sweep(root: Path, *extra: str, activations: Path) -> tuple[str, set[int], list[list], set[int]]:
    """(stdout+stderr, launcher pids, job logs, job pids still running once the command has exited)
    of the sweep run from `root`, under tests/subreaper.py."""
    root.mkdir(parents=True, exist_ok=True)
    proc = lac_run(root, *SWEEP, *extra, env={"LAC_ACTIVATIONS_DIR": str(activations)}, wait=False, subreaper=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()  # the pipe stays open while any process holding it lives (a joblib worker would)
    code = proc.wait(timeout=900)
    logs = [job_log(root / "multirun" / str(num)) for num in (0, 1)]
    alive = {pid for lines in logs for pid, *_ in lines if pid != proc.pid and running(pid)}
    reader.join(timeout=900)
    assert code == 0, out[0][-5000:]
    launcher = {int(pid) for pid in re.findall(r"^launcher pid=(\d+) ", out[0], re.M)}
    return out[0], launcher, logs, alive


@pytest.mark.slow
def test_joblib_two_jobs_in_two_processes_equal_basic_launcher(tmp_path: Path):
    shared = tmp_path / "activations"
    par_out, par_launcher, par_logs, alive = run_sweep(
        tmp_path / "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracker=wandb", activations=shared
    )
    assert "Joblib.Parallel(n_jobs=2" in par_out and "is launching 2 jobs" in par_out

    # two worker processes, neither of them the launcher, running at the same time
    pids = [{pid for pid, *_ in lines} for lines in par_logs]
    assert all(len(p) == 1 for p in pids), pids  # each job's log: one process
    (pid0,), (pid1,) = pids
    assert pid0 != pid1, "both jobs ran in the same process"
    assert len(par_launcher) == 1 and not par_launcher & {pid0, pid1}, (par_launcher, pids)
    for lines in par_logs:
        assert sum("loaded qwen0.5" in msg for *_, msg in lines) == 1  # each worker loads the model
    spans = [(lines[0][1], lines[-1][1]) for lines in par_logs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], f"jobs did not overlap: {spans}"
    # the workers (a model loaded in each, the command's output pipe held open) end with the sweep,
    # not 300 s later (loky's idle timeout)
    assert not alive, f"joblib workers {alive} outlived the sweep"
    # each worker's W&B child and wandb-core, killed with it, were reaped, and the resource trackers
    # (multiprocessing's, loky's) stopped and waited for: nothing is left for a PID 1 that never reaps
    assert leftovers(par_out) == []
    assert "leaked" not in par_out, par_out[-3000:]  # no resource tracker's warning ends the sweep
    assert sum(len(find_runs(tmp_path / "joblib" / "multirun" / str(num))) for num in (0, 1)) == 2

    # one results_root: two job stores, both finished
    store = tmp_path / "joblib" / "store"
    finished = sorted(p.parent.name for p in store.glob("*/results.parquet"))
    assert len(finished) == 2, finished
    # one activation cache: one entry per cell, whole (no temp files left by the two writers)
    entries = list(shared.rglob("*.safetensors"))
    assert {p.stem for p in entries} == CELLS and len(entries) == len(CELLS)
    assert not [p for p in shared.rglob("*") if p.name.endswith(".tmp")]

    # the same sweep, basic launcher (one process), its own results_root and activation cache
    _, seq_launcher, seq_logs, _ = run_sweep(
        tmp_path / "basic", "tracker=none", activations=tmp_path / "activations_basic"
    )
    assert {pid for lines in seq_logs for pid, *_ in lines} == seq_launcher  # the contrast
    for num, layer in ((0, 6), (1, 10)):
        a = pd.read_parquet(tmp_path / "joblib" / "multirun" / str(num) / "results.parquet")
        b = pd.read_parquet(tmp_path / "basic" / "multirun" / str(num) / "results.parquet")
        assert list(a.columns) == list(COLUMNS)
        assert set(a.cell) == CELLS and set(a[a.metric == "kl"].layer) == {layer}
        assert_same_results(a, b)


WORKERS_WITH_CHILDREN = """
import os
import subprocess

import numpy as np
from joblib import Parallel, delayed

from lac.leave import stop_joblib_workers
from lac.tracking import phase_progress


def start_child(weights):
    global child  # a child of the worker's own, as a job's W&B child is
    child = subprocess.Popen(["sleep", "120"])
    with phase_progress("clean captures", 1, "cell") as advance:  # a job's bar, as in a worker
        advance(1)
    return child.pid


weights = np.zeros(2**20)  # 8 MB: joblib memory-maps it through a folder in /dev/shm
print("children", Parallel(n_jobs=2, backend="loky")(delayed(start_child)(weights) for _ in range(2)), flush=True)
stop_joblib_workers()
os._exit(0)  # as `python -m lac.run` leaves
"""

# The race a loaded machine runs now and then (CI, 1 run in 4), made certain: a queue's feeder
# thread ends while the exit handlers run, and is held between removing its queue's write lock and
# unregistering it. os._exit in between left the tracker to report that semaphore as "leaked".
HELD_FEEDER = """
import atexit
import importlib
import threading
import time

# by name: `from joblib.externals.loky.backend import synchronize` gives the stdlib's module
queues = importlib.import_module("joblib.externals.loky.backend.queues")
synchronize = importlib.import_module("joblib.externals.loky.backend.synchronize")
feed, unlink_and_unregister, run_exitfuncs = queues.Queue._feed, synchronize.SemLock._cleanup, atexit._run_exitfuncs
exiting = threading.Event()


def feed_until_exit(*args):
    feed(*args)
    exiting.wait(10)  # then its thread drops the write lock, the lock's last holder


def held_in_feeder(name):
    if threading.current_thread().name == "QueueFeederThread":
        print("held", name, flush=True)
        synchronize.sem_unlink(name)
        time.sleep(0.5)
    unlink_and_unregister(name)


def exitfuncs():
    exiting.set()
    time.sleep(0.2)
    run_exitfuncs()


queues.Queue._feed = staticmethod(feed_until_exit)
synchronize.SemLock._cleanup = staticmethod(held_in_feeder)
atexit._run_exitfuncs = exitfuncs
"""


@pytest.mark.parametrize("feeder", ["free", "held"])
def test_stopped_joblib_workers_leave_no_children_behind(tmp_path, feeder):
    """lac.leave.stop_joblib_workers kills loky's workers with their descendants and reaps those:
    under a PID 1 that never reaps, none is left (before: each a zombie). Nothing is left to the
    resource trackers either, which would warn of "leaked" semaphores (the workers' bars, loky's
    queues) and joblib's memmapping folder at the end of every joblib sweep. "held": a queue's
    feeder thread still ending at the exit (HELD_FEEDER) is waited for."""
    from tests.subreaper import command

    repo = Path(__file__).resolve().parents[1]
    script = (HELD_FEEDER if feeder == "held" else "") + WORKERS_WITH_CHILDREN
    out = subprocess.run(command(sys.executable, "-c", script), cwd=repo, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-3000:]
    children = [int(pid) for pid in re.findall(r"\d+", out.stdout.split("children", 1)[1].splitlines()[0])]
    assert len(children) == 2
    assert leftovers(out.stdout) == []  # the resource trackers too
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # killed and reaped
    assert "leaked" not in out.stderr, out.stderr[-3000:]
    assert ("held /loky-" in out.stdout) == (feeder == "held")  # the race was run


@pytest.mark.slow
def test_ctrl_c_of_a_joblib_sweep_leaves_nothing_of_lacs_behind(tmp_path):
    """Ctrl-C (SIGINT to the sweep's process group) once a batch is written: joblib kills its workers
    itself, before lac's exit; as the sweep's subreaper lac reaps their W&B processes and wandb-cores,
    which a PID 1 that never reaps would keep. One line, exit code 130. (A worker's run may still end
    without its exit record: joblib kills it mid-finish.)"""
    from tests.test_run import _part_cells

    proc = lac_run(tmp_path, "-m", "layer=6,10", "site=p_last", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "engine.batch_cells=1", wait=False, subreaper=True,
                   env={"LAC_ACTIVATIONS_DIR": str(tmp_path / "activations")})
    deadline = time.monotonic() + 600
    while not _part_cells(tmp_path / "store") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "lac: interrupted; finished jobs and the cells written so far are kept" in out
    assert "leaked" not in out, out[-3000:]
    assert leftovers(out) == []
    assert len(find_runs(tmp_path / "multirun")) == 2  # both jobs had begun their runs
