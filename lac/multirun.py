"""lac's Hydra callback: a multirun is checked whole before its first job, and reports its failures.

Before any job starts, every job's config is composed and run through
`lac.config.preflight` (grid, layers against the model's depth, results_root,
tracker, hub availability): `-m 'layer=range(22,25)'` on a 24-layer model stops
at once, naming each bad job. A job that fails while the sweep runs says so in
one line and leaves a record in the sweep folder; the sweep goes on with the
other jobs and ends with the list of failed ones (exit code 2).
"""

from __future__ import annotations

import copy
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
    jobs = [list(o) for batch in BasicSweeper.split_arguments(overrides, None) for o in batch]
    if not jobs:  # Hydra itself would launch 0 jobs and exit 0: a typo'd range looks like a finished sweep
        from lac.config import ConfigError

        empty = [o.input_line for o in overrides if o.is_discrete_sweep() and not list(o.sweep_string_iterator())]
        raise ConfigError(f"the sweep has no jobs: {', '.join(empty)} gives no value (range(a,b) counts a..b-1, "
                          "so b must be above a, e.g. layer=range(4,14) for layers 4..13)")
    return jobs


def check_job(cfg: DictConfig) -> str | None:
    """A sweep's job before any job starts: lac's checks, and its capture depth in the sweep's plan,
    so the first job captures as deep as the deepest needs. Why it cannot run, if it cannot."""
    from lac.config import preflight
    from lac.runner import plan_sweep_depth

    try:
        plan_sweep_depth(cfg.model.name, preflight(cfg))
    except LacError as e:
        return str(e)
    return None


def refusal(bad: list[tuple[int, tuple[str, ...] | list[str], str]], jobs: int) -> list[str]:
    """The lines of a refused sweep: a job's number, overrides and reason; jobs refused for the same
    reason (ten layers of a model the hub cannot give) share one line with the overrides they share."""
    by_reason: dict[str, list[tuple[int, tuple[str, ...] | list[str]]]] = {}
    for num, overrides, reason in bad:
        by_reason.setdefault(reason, []).append((num, overrides))
    lines = []
    for reason, group in by_reason.items():
        if len(group) == 1:
            num, overrides = group[0]
            lines.append(f"job {num} ({' '.join(overrides)}): {reason}")
            continue
        shared = [o for o in group[0][1] if all(o in over for _, over in group)]
        lines.append(f"jobs {_spans([n for n, _ in group])} ({' '.join(shared) or 'overrides of their own'}): {reason}")
    return [*lines, f"{len(bad)} of {jobs} jobs cannot run; no job was started"]


def _spans(nums: list[int]) -> str:
    """0, 1, 2, 5 -> '0-2, 5'."""
    spans: list[list[int]] = []
    for n in sorted(nums):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def failure_reason(error: BaseException) -> str:
    """How a failed job's error reads in a sweep's lines: a user error as its message, else with its type."""
    return str(error) if isinstance(error, LacError) else f"{type(error).__name__}: {error}"


def reuse_compositions(loader: Any, master: DictConfig, composed: dict[tuple[str, ...], DictConfig]) -> None:
    """Hydra composes every job's config twice more, in its sweeper's own check and in its launcher
    (~0.1 s each: ~2 s of a 10-job sweep). From here on the loader answers those calls (same master
    config, same overrides) with a copy of lac's composition, given the master's resolver cache as
    `load_sweep_config` itself does at its end (timestamps); any other call composes as before."""
    compose = loader.load_sweep_config

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        hit = composed.get(tuple(sweep_overrides)) if master_config is master else None
        if hit is None:
            return compose(master_config=master_config, sweep_overrides=sweep_overrides)
        cfg = copy.deepcopy(hit)
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg

    loader.load_sweep_config = load_sweep_config


def record_failure(hc: Any, error: BaseException) -> None:
    """One line now (job number, overrides, reason); a record for the sweep's closing list."""
    num, overrides = hc.job.num, " ".join(hc.overrides.task)
    reason = failure_reason(error)
    print(f"lac: job {num} ({overrides}) failed: {reason}", file=sys.stderr, flush=True)
    if full_error() or not isinstance(error, LacError):
        traceback.print_exception(error)
    folder = Path(hc.sweep.dir) / FAILED
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{num}.json").write_text(json.dumps({"job": num, "overrides": overrides, "reason": reason}))


class LacCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from lac.leave import become_subreaper

        target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
            print("lac: hydra/launcher=slurm needs SLURM's srun on PATH (a cluster's login node); on this machine "
                  "use hydra/launcher=local or hydra/launcher=joblib; no job was started", file=sys.stderr)
            sys.exit(2)
        if target.endswith("JoblibLauncher"):
            become_subreaper()  # joblib kills its workers itself on Ctrl-C: their W&B processes come here
        loader = GlobalHydra.instance().config_loader()
        try:
            jobs = job_overrides(config)
        except LacError as e:
            print(f"lac: {e}", file=sys.stderr)
            sys.exit(2)
        bad, composed = [], {}
        for num, overrides in enumerate(jobs):  # (composing runs no lac code: no LacError there)
            cfg = loader.load_sweep_config(master_config=config, sweep_overrides=overrides)
            composed[tuple(overrides)] = copy.deepcopy(cfg)  # as composed, before preflight resolves anything
            if reason := check_job(cfg):
                bad.append((num, overrides, reason))
        if bad:
            print("\n".join(f"lac: {line}" for line in refusal(bad, len(jobs))), file=sys.stderr)
            sys.exit(2)
        # a failure recorded by an earlier attempt of this sweep folder is not this attempt's: its job
        # runs again now and records itself if it fails again (else a fixed sweep still exits 2)
        if sweep_dir := OmegaConf.select(config, "hydra.sweep.dir"):
            shutil.rmtree(Path(sweep_dir) / FAILED, ignore_errors=True)
        reuse_compositions(loader, config, composed)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / FAILED
        records = sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda r: r["job"])
        if records:
            lines = [f"  job {r['job']} ({r['overrides']}): {r['reason']}" for r in records]
            print(f"lac: {len(records)} job(s) of this multirun failed:\n" + "\n".join(lines), file=sys.stderr)
            sys.exit(2)
