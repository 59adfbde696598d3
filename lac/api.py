"""lac from Python (a notebook, a script): a job (or a sweep) by the same overrides `python -m lac.run`
takes, and the clean captures behind a job (h_BB, delta_x, delta_y at any site and layer) for analyses
of your own.

    from lac import api
    res = api.job("site=p_last", "layer=[6,10]", "tracker=none")
    res.rows                                        # the tidy results, as results.parquet
    runs = api.sweep("site=p_last", "layer=range(4,14)", "tracker=none")   # as python -m lac.run -m
    caps = api.captures("site=p_last", "layer=10")
    caps["yoda__haiku"].delta_x("p_last", 10)       # h_XB - h_BB, float32 [d_model]

The same job keys, results store, resume, activation cache and W&B as the command line, and the
same errors (lac.errors.LacError: ConfigError, GridError), raised before any weights load. The model
stays loaded between calls of one process (one model at a time).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lac.capture import CellCapture
from lac.config import ConfigError
from lac.grid import Grid


def _as_overrides(overrides: tuple[Any, ...]) -> tuple[str, ...]:
    """Overrides as the command line has them; a list of them (`api.job(["layer=10", "site=g1"])`) too."""
    flat = [o for item in overrides for o in (item if isinstance(item, (list, tuple)) else [item])]
    for o in flat:
        if not isinstance(o, str):
            raise ConfigError(f"override {o!r} ({type(o).__name__}): overrides are strings as on the command "
                              "line, e.g. api.job('layer=10', 'site=g1')")
    return tuple(flat)


def compose(*overrides: str) -> DictConfig:
    """The job config `python -m lac.run <overrides>` would run (conf/ of this checkout or wheel)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lac.paths import conf_dir

    overrides = _as_overrides(overrides)
    with _config_errors(overrides), initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@contextlib.contextmanager
def _config_errors(overrides: Iterable[str]) -> Iterator[None]:
    """Overrides Hydra cannot compose raise ConfigError (a LacError) in one line, as every other bad input
    does: an unknown group option names the group's options; a sweep given to api.job names api.sweep."""
    import re

    from hydra.errors import ConfigCompositionException, OverrideParseException

    from lac.config import check_group_choices
    from lac.paths import conf_dir

    check_group_choices(list(overrides), conf_dir())
    try:
        yield
    except (ConfigCompositionException, OverrideParseException) as e:
        msg = str(e)
        quoted = re.search(r"'([^']+)'", msg)
        what = quoted.group(1) if quoted else " ".join(overrides)
        if "--multirun" in msg:
            raise ConfigError(f"{what} is a sweep: api.sweep runs it (api.job and api.captures take one job's "
                              "overrides; a list value is key=[a,b])") from None
        if msg.startswith("Could not override"):
            parent = what.rpartition(".")[0]
            keys = _keys_of(parent, [o for o in overrides if o.lstrip("+~").split("=")[0] != what])
            raise ConfigError(f"no key {what!r} in this job's config; {parent or 'its top level'} has: "
                              f"{keys or '?'} (a key of your own is added with +{what}=...)") from None
        raise ConfigError(f"cannot use the overrides {' '.join(overrides)}: {' '.join(msg.split())}") from None


def _keys_of(node: str, overrides: list[str]) -> str | None:
    """The keys a config node has without the override that failed (None: it cannot be composed)."""
    from omegaconf import OmegaConf

    try:
        found = OmegaConf.select(compose(*overrides), node) if node else compose(*overrides)
    except Exception:
        return None
    return ", ".join(sorted(map(str, found.keys()))) if isinstance(found, DictConfig) else None


@dataclass(frozen=True)
class JobResult:
    summary: dict[str, Any]  # summary.json: the console table's numbers, seconds, provenance
    rows: Any  # pandas.DataFrame, one row per (cell, site, layer(s), intervention, metric)
    generations: list[dict[str, Any]]  # markers mode: every generated text
    dir: Path  # where results.parquet / summary.json were copied (the CLI's outputs/DATE/TIME)
    overrides: tuple[str, ...] = ()  # the job's overrides (a sweep's job: as Hydra lists them, e.g. (..., "layer=6"))


class SweepFailed(RuntimeError):
    """Some jobs of `api.sweep` failed; the others ran to the end, as on the command line.

    `results`: the finished jobs' JobResults; `failed`: (job number, overrides, exception) per failed
    job. Their written cells stay in the results store: calling again resumes them."""

    def __init__(self, results: list[JobResult], failed: list[tuple[int, tuple[str, ...], Exception]]):
        from lac.multirun import failure_reason

        self.results, self.failed = results, failed
        lines = [f"  job {num} ({' '.join(over)}): {failure_reason(e)}" for num, over, e in failed]
        super().__init__(f"{len(failed)} of {len(results) + len(failed)} jobs of the sweep failed (the finished "
                         "ones are on this error's .results):\n" + "\n".join(lines))


def job(*overrides: str, job_dir: str | Path | None = None) -> JobResult:
    """Run (or resume, or reuse) one job, as `python -m lac.run <overrides>` would. `job_dir`: where
    its files are copied and its W&B run writes; default outputs/DATE/TIME-N under the current folder."""
    overrides = _as_overrides(overrides)
    cfg = compose(*overrides)
    out = Path(job_dir) if job_dir is not None else _new_job_dir()  # made by the job (bad input: none)
    return _run(cfg, out, overrides)


def compose_sweep(*overrides: str) -> list[tuple[tuple[str, ...], DictConfig]]:
    """Every job of `python -m lac.run -m <overrides>`, as Hydra's basic sweeper expands them
    (`layer=range(4,14)`, `model=qwen0.5,smollm2`, a preset's `+sweep=controls`): each job's own
    overrides with its config, the config that job runs with on the command line. Another launcher
    (joblib, slurm, local) raises: lac.api runs the jobs in this process."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    from lac.multirun import job_overrides
    from lac.paths import conf_dir

    overrides = _as_overrides(overrides)
    jobs = []
    with _config_errors(overrides), initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        hydra = GlobalHydra.instance()
        master = hydra.hydra.compose_config("config", list(overrides), run_mode=RunMode.MULTIRUN,
                                            with_log_configuration=False)
        launcher = str(master.hydra.launcher.get("_target_", ""))
        if not launcher.endswith(".BasicLauncher"):
            raise ConfigError(f"hydra/launcher: {launcher.rsplit('.', 1)[-1]}; lac.api runs a sweep's jobs in this "
                              "process, one after another (the basic launcher): leave hydra/launcher out, or run "
                              "python -m lac.run -m with it")
        for job_over in job_overrides(master):
            cfg = hydra.config_loader().load_sweep_config(master_config=master, sweep_overrides=job_over)
            with open_dict(cfg):
                del cfg["hydra"]  # as Hydra hands a job its config
            jobs.append((tuple(job_over), cfg))
    return jobs


def sweep(*overrides: str, sweep_dir: str | Path | None = None) -> list[JobResult]:
    """`python -m lac.run -m <overrides>` in this process, one job after another: every job is checked
    before the first starts (one ConfigError naming each bad job), and the first captures as deep as
    the deepest job needs, so `layer=range(4,14)` captures once, not ten times one layer deeper.
    `sweep_dir`: job N's files go to `<sweep_dir>/N`; default outputs/multirun/DATE/TIME-N. A job
    that fails is logged and the sweep goes on, as on the command line; at the end `SweepFailed`
    names the failed jobs and carries the finished ones (calling again reuses and resumes them)."""
    import logging

    from lac import runner
    from lac.multirun import check_job, failure_reason, refusal

    jobs = compose_sweep(*overrides)
    depth_before = dict(runner.CAPTURE_DEPTH)
    try:
        bad = [(num, job_over, why) for num, (job_over, cfg) in enumerate(jobs) if (why := check_job(cfg))]
        if bad:
            raise ConfigError("\n".join(refusal(bad, len(jobs))))
        base = Path(sweep_dir) if sweep_dir is not None else _new_job_dir(Path("outputs") / "multirun")
        results, failed = [], []
        for num, (job_over, cfg) in enumerate(jobs):
            try:
                results.append(_run(cfg, base / str(num), job_over))
            except Exception as e:  # Ctrl-C (KeyboardInterrupt) still stops the sweep at once
                logging.getLogger("lac").error("job %d (%s) failed: %s", num, " ".join(job_over), failure_reason(e))
                failed.append((num, job_over, e))
        if failed:
            raise SweepFailed(results, failed) from failed[0][2]
        return results
    finally:  # a later job of this process plans its own depth again
        runner.CAPTURE_DEPTH.clear()
        runner.CAPTURE_DEPTH.update(depth_before)


def _run(cfg: DictConfig, out: Path, overrides: tuple[str, ...]) -> JobResult:
    import pandas as pd

    from lac import runner
    from lac.results import current_schema

    runner._STARTED_UP = True  # a notebook's time since `import lac` is no job's start-up
    with _quiet():
        summary = runner.run(cfg, job_dir=out)
    gens = out / "generations.jsonl"  # markers mode only: another job's file in a reused job_dir is not this one's
    markers = cfg.get("mode") == "markers" and gens.is_file()
    return JobResult(
        summary=summary,
        rows=current_schema(pd.read_parquet(out / "results.parquet")),  # a reused older job: today's columns
        generations=[json.loads(line) for line in gens.read_text().splitlines()] if markers else [],
        dir=out,
        overrides=overrides,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The warnings lac's own calls raise upstream (Lightning's) and transformers' weight-loading bar
    stay out of a notebook, as they stay off the command line's console; the caller's warning
    filters and bar setting come back after."""
    import warnings

    from transformers.utils import logging as hf_logging

    from lac.tracking import quiet_job_warnings

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            quiet_job_warnings()
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _new_job_dir(root: Path = Path("outputs")) -> Path:
    base = root / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    n = 0
    while (base.parent / f"{base.name}-{n}").exists():  # two calls within a second
        n += 1
    return base.parent / f"{base.name}-{n}"


@dataclass(frozen=True)
class Captured:
    """One cell's clean captures, in the paper's names; vectors are float32 [d_model] on the CPU.
    Roles: one letter per factor, the factor's letter at the cell's level, B at baseline (BB, XB,
    BY, XY in the paper's 2x2)."""

    capture: CellCapture
    grid: Grid

    @property
    def ref(self) -> list[int]:
        """The clean XY reference: 12 greedy tokens after the XY prompt."""
        return list(self.capture.ref)

    @property
    def layers(self) -> range:
        """The layers held (block inputs 0..depth-1; `geometry_layers=all` captures every one)."""
        return range(self.capture.depth(self.grid.empty))

    def h(self, role: str, site: str, layer: int) -> torch.Tensor:
        """The residual (block `layer`'s input) of a role's sequence at a site."""
        from lac.sites import SITES

        if role not in self.capture.site_h:
            raise ConfigError(f"role {role!r} was not captured; captured: {', '.join(sorted(self.capture.site_h))}")
        if site not in SITES:
            raise ConfigError(f"site {site!r}; allowed: {', '.join(SITES)}")
        depth = self.capture.depth(role)
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ConfigError(f"layer={layer!r}: an int in 0..{depth - 1} (the captured block inputs)")
        if not 0 <= layer < depth:
            raise ConfigError(f"layer {layer} was not captured for {role}: layers 0..{depth - 1} were "
                              "(capture deeper with a larger layer=, or geometry_layers=all)")
        return self.capture.h(role, site, layer)

    def h_bb(self, site: str, layer: int) -> torch.Tensor:
        return self.h(self.grid.empty, site, layer)

    def h_xy(self, site: str, layer: int) -> torch.Tensor:
        return self.h(self.grid.full, site, layer)

    def delta(self, factor: str, site: str, layer: int) -> torch.Tensor:
        """A factor's main effect: its level alone against the baseline (persona: h_XB - h_BB)."""
        self.grid.factor(factor)  # a GridError naming the design's factors
        return self.h(self.grid.role([factor]), site, layer) - self.h_bb(site, layer)

    def delta_x(self, site: str, layer: int) -> torch.Tensor:
        return self.delta("persona", site, layer)

    def delta_y(self, site: str, layer: int) -> torch.Tensor:
        return self.delta("task", site, layer)

    def inter(self, site: str, layer: int) -> torch.Tensor:
        """The 2x2's interaction I = h_XY - h_BB - delta_x - delta_y."""
        return self.h_xy(site, layer) - self.h_bb(site, layer) - self.delta_x(site, layer) - self.delta_y(site, layer)


def captures(*overrides: str, cells: Iterable[str] | None = None) -> dict[str, Captured]:
    """Clean captures of a job's cells (`cells`: their keys, e.g. "yoda__haiku"; default all), down to
    the job's deepest layer (`geometry_layers=all`: every layer), from the activation cache where it
    has them. Nothing is patched and no results are written."""
    from lac.config import preflight
    from lac.prompts import PromptBook
    from lac.runner import activation_cache, capture, prepare_model

    cfg = compose(*overrides)
    spec = preflight(cfg)
    every = {c.key: c for c in spec.grid.cells()}
    wanted = list(every) if cells is None else [cells] if isinstance(cells, str) else list(cells)
    unknown = [k for k in wanted if k not in every]
    if unknown:
        raise ConfigError(f"cells {unknown} are not in grid {spec.grid.name!r}; its cells: {', '.join(every)}")
    with _quiet():
        lm = prepare_model(cfg, spec)
        book = PromptBook(lm.tokenizer, spec.grid)
        cache = activation_cache(cfg, lm, spec)
        caps = capture(lm, spec, [every[k] for k in wanted], book=book, cache=cache,
                       batch_cells=int(cfg.engine.capture_cells))
    return {c.cell.key: Captured(c, spec.grid) for c in caps}
