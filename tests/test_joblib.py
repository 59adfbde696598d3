"""The joblib launcher end to end: two jobs at once in two processes, one results_root and one
activation cache shared between them, results equal to the basic launcher's."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from lac.schema import COLUMNS
from tests.conftest import assert_same_results
from tests.test_run import lac_run

# every job log line carries the pid and time of the process that wrote it; the launcher's own
# lines (Hydra's logging, on stdout) carry its pid
LOG_FORMAT = "hydra.job_logging.formatters.simple.format='pid=%(process)d t=%(created)f [%(name)s] %(message)s'"
LAUNCHER_FORMAT = (
    "hydra.hydra_logging.formatters.simple.format='launcher pid=%(process)d [HYDRA] %(message)s'"
)
LINE = re.compile(r"^pid=(\d+) t=([0-9.]+) \[([^\]]*)\] (.*)$")
SWEEP = ["-m", "layer=6,10", "site=p_last", "tracker=none", LOG_FORMAT, LAUNCHER_FORMAT]
CELLS = {"yoda__haiku", "yoda__recommend", "marx__haiku", "marx__recommend"}


def job_log(job: Path) -> list[tuple[int, float, str, str]]:
    """(pid, time, logger, message) of every line of the job's own Hydra log (run.log)."""
    logs = list(job.glob("*.log"))
    assert len(logs) == 1, logs
    lines = [LINE.match(line) for line in logs[0].read_text().splitlines()]
    return [(int(m[1]), float(m[2]), m[3], m[4]) for m in lines if m]


def run_sweep(root: Path, *extra: str, activations: Path) -> tuple[str, set[int], list[list]]:
    """(stdout+stderr, launcher pids, job logs) of the sweep run from `root`."""
    root.mkdir(parents=True, exist_ok=True)
    out = lac_run(root, *SWEEP, *extra, env={"LAC_ACTIVATIONS_DIR": str(activations)})
    launcher = {int(pid) for pid in re.findall(r"^launcher pid=(\d+) ", out, re.M)}
    logs = [job_log(root / "multirun" / str(num)) for num in (0, 1)]
    return out, launcher, logs


@pytest.mark.slow
def test_joblib_two_jobs_in_two_processes_equal_basic_launcher(tmp_path: Path):
    shared = tmp_path / "activations"
    par_out, par_launcher, par_logs = run_sweep(
        tmp_path / "joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", activations=shared
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

    # one results_root: two job stores, both finished
    store = tmp_path / "joblib" / "store"
    finished = sorted(p.parent.name for p in store.glob("*/results.parquet"))
    assert len(finished) == 2, finished
    # one activation cache: one entry per cell, whole (no temp files left by the two writers)
    entries = list(shared.rglob("*.safetensors"))
    assert {p.stem for p in entries} == CELLS and len(entries) == len(CELLS)
    assert not [p for p in shared.rglob("*") if p.name.endswith(".tmp")]

    # the same sweep, basic launcher (one process), its own results_root and activation cache
    _, seq_launcher, seq_logs = run_sweep(
        tmp_path / "basic", activations=tmp_path / "activations_basic"
    )
    assert {pid for lines in seq_logs for pid, *_ in lines} == seq_launcher  # the contrast
    for num, layer in ((0, 6), (1, 10)):
        a = pd.read_parquet(tmp_path / "joblib" / "multirun" / str(num) / "results.parquet")
        b = pd.read_parquet(tmp_path / "basic" / "multirun" / str(num) / "results.parquet")
        assert list(a.columns) == list(COLUMNS)
        assert set(a.cell) == CELLS and set(a[a.metric == "kl"].layer) == {layer}
        assert_same_results(a, b)
