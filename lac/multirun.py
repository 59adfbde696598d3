"""lac's Hydra callback: a multirun is checked whole before its first job, and reports its failures.

Before any job starts, every job's config is composed and run through
`lac.config.preflight` (grid, layers against the model's depth, results_root,
tracker, hub availability): `-m 'layer=range(22,25)'` on a 24-layer model stops
at once, naming each bad job. A job that fails while the sweep runs says so in
one line and leaves a record in the sweep folder; the sweep goes on with the
other jobs and ends with the list of failed ones (exit code 2).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lac.errors import LacError

log = logging.getLogger("lac")
FAILED = ".lac-failed"  # per failed job: <sweep dir>/.lac-failed/<job num>.json


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override lists of every job of the multirun, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides([*params, *config.hydra.overrides.task])
    return [list(o) for batch in BasicSweeper.split_arguments(overrides, None) for o in batch]


def record_failure(hc: Any, error: BaseException) -> None:
    """One line now (job number, overrides, reason); a record for the sweep's closing list."""
    num, overrides = hc.job.num, " ".join(hc.overrides.task)
    reason = str(error) if isinstance(error, LacError) else f"{type(error).__name__}: {error}"
    print(f"lac: job {num} ({overrides}) failed: {reason}", file=sys.stderr, flush=True)
    if full_error() or not isinstance(error, LacError):
        traceback.print_exception(error)
    folder = Path(hc.sweep.dir) / FAILED
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{num}.json").write_text(json.dumps({"job": num, "overrides": overrides, "reason": reason}))


class LacCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from lac.config import preflight
        from lac.runner import plan_sweep_depth

        target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
            print("lac: hydra/launcher=slurm needs SLURM's srun on PATH (a cluster's login node); on this machine "
                  "use hydra/launcher=local or hydra/launcher=joblib; no job was started", file=sys.stderr)
            sys.exit(2)
        loader = GlobalHydra.instance().config_loader()
        jobs = job_overrides(config)
        bad = []
        for num, overrides in enumerate(jobs):
            try:
                cfg = loader.load_sweep_config(master_config=config, sweep_overrides=overrides)
                plan_sweep_depth(cfg.model.name, preflight(cfg))
            except LacError as e:
                bad.append(f"lac: job {num} ({' '.join(overrides)}): {e}")
        if bad:
            print("\n".join(bad), file=sys.stderr)
            print(f"lac: {len(bad)} of {len(jobs)} jobs cannot run; no job was started", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / FAILED
        records = sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda r: r["job"])
        if records:
            lines = [f"  job {r['job']} ({r['overrides']}): {r['reason']}" for r in records]
            print(f"lac: {len(records)} job(s) of this multirun failed:\n" + "\n".join(lines), file=sys.stderr)
            sys.exit(2)
