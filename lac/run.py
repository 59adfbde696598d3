"""Hydra entry point: `python -m lac.run [overrides]`, `-m` for a multirun sweep.

Thin by design: compose the config, hand it to lac.runner.run. A user error
(lac.errors.LacError) prints as one line, `lac: <message>`, exit code 2
(HYDRA_FULL_ERROR=1 shows the traceback); in a multirun the failed job is
reported and the sweep goes on (lac.multirun).
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from lac.config import check_group_choices
from lac.errors import LacError
from lac.leave import exit_now
from lac.multirun import full_error, record_failure
from lac.paths import conf_dir
from lac.runner import run
from lac.tracking import configure_logging

CONF = conf_dir()  # the repo's conf/ in a checkout, the packaged lac/conf in a wheel
_CLAIMED: dict[str, str] = {}


def free_dir(path: str) -> str:
    """`path`, or `path-1`, `path-2` ... if another run made it first: made here (mkdir is atomic), so two
    runs started in the same second get a folder each (conf/config.yaml's hydra.run.dir); before, both
    wrote outputs/DATE/TIME and one job's results.parquet replaced the other's."""
    if path not in _CLAIMED:
        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
            try:
                candidate.mkdir()
                break
            except FileExistsError:
                continue
        _CLAIMED[path] = str(candidate)
    return _CLAIMED[path]


OmegaConf.register_new_resolver("lac_free_dir", free_dir, replace=True)


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    configure_logging(hc.verbose)  # lac INFO; Lightning/warnings/wandb banners quiet unless verbose
    try:
        anchor_paths(cfg, Path(hc.runtime.cwd))
        run(cfg, job_dir=hc.runtime.output_dir)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            record_failure(hc, e)
            return
        if isinstance(e, LacError):
            drop_if_empty(Path(hc.runtime.output_dir), f"{hc.job.name}.log")
        if isinstance(e, LacError) and not full_error():
            print(f"lac: {e}", file=sys.stderr)
            sys.exit(2)
        raise


def anchor_paths(cfg: DictConfig, launch_dir: Path) -> None:
    """Relative paths of the command line mean the launch dir, also where Hydra changed into the job's
    folder (hydra.job.chdir=true): else results_root=outputs/results would land inside each job's
    folder, and every launch recompute its jobs, never resuming."""
    if Path.cwd().resolve() == launch_dir.resolve():
        return
    with open_dict(cfg):
        for key in ("results_root", "grid.path", "model.id"):
            value = OmegaConf.select(cfg, key)
            if not isinstance(value, str) or value in ("", "???") or Path(value).is_absolute():
                continue
            if key != "model.id" or (launch_dir / value).exists():  # model.id: a folder, not a hub id
                OmegaConf.update(cfg, key, str(launch_dir / value))


def check_command_line(argv: list[str]) -> None:
    """Group options checked before Hydra composes (lac.config.check_group_choices); a command
    line Hydra's own parser refuses, or one with a config dir or path of the user's, is left to Hydra."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, extra = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return
    modes = [flag for flag, on in (("-m/--multirun", args.multirun), ("--cfg", args.cfg), ("--info", args.info),
                                   ("--run", args.run)) if on]
    if len(modes) > 1:  # Hydra's own refusal is a ValueError traceback
        raise LacError(f"{' and '.join(modes)} cannot be given together (Hydra runs one of them); to see the config "
                       "of a sweep's job, drop -m: python -m lac.run --cfg job <one value per override>")
    if args.config_dir or args.config_path or args.config_name:
        return
    check_group_choices([*args.overrides, *(a for a in extra if not a.startswith("-"))], CONF)


def drop_if_empty(job_dir: Path, log_name: str) -> None:
    """A run refused before it logged a line leaves no outputs/DATE/TIME folder. Only a folder
    holding nothing but Hydra's .hydra/ and an empty job log goes; anything else stays."""
    try:
        names = {p.name for p in job_dir.iterdir()}
        if names <= {".hydra", log_name} and (job_dir / log_name).stat().st_size == 0:
            shutil.rmtree(job_dir)
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", job_dir.parent.name):  # Hydra's outputs/DATE, if now empty
                job_dir.parent.rmdir()
    except OSError:
        pass  # a folder it cannot read or remove (or a DATE folder holding other runs) stays, as before


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, `docker stop`, a scheduler preempting the job): stop as Ctrl-C
    stops, at once, with the written cells kept. Left to Lightning, SIGTERM would only set a flag
    its predict loop never reads: the job ran on, deaf, until the scheduler's SIGKILL."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def interrupted(how: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM: one line, not a traceback through torch's forward (HYDRA_FULL_ERROR=1 shows
    it); the job's W&B run has ended as failed by now, and its written batches stay for the rerun."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the exit short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    what = "terminated (SIGTERM)" if isinstance(how, Terminated) else "interrupted"
    print(f"lac: {what}; finished jobs and the cells written so far are kept: the same command "
          "resumes from them", file=sys.stderr)
    exit_now(143 if isinstance(how, Terminated) else 130)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        check_command_line(sys.argv[1:])
        main()
    except SystemExit as e:  # Hydra and lac end with sys.exit(code); other exceptions keep Python's own exit
        exit_now(e.code)
    except LacError as e:  # check_command_line's
        if full_error():
            raise
        print(f"lac: {e}", file=sys.stderr)
        exit_now(2)
    except KeyboardInterrupt as e:
        if full_error():
            raise
        interrupted(e)
    exit_now(0)
