"""`--wandb`: the report's tables and figures in one W&B run (job_type report)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lac.report.loading import (
    read_summary,
)
from lac.report.tables import (
    Report,
)

# --------------------------------------------------------------------------- W&B


def wandb_group(job_dirs: Sequence[Path]) -> str:
    """The sweep's group: config.tracker.group of a summary.json, else the multirun dir name."""
    group = _tracker_config(job_dirs).get("group")
    if group:
        return str(group)
    for d in job_dirs:
        d = Path(d)
        sweep = d.parent if d.name.isdigit() else d
        if (sweep / "multirun.yaml").exists() or d.name.isdigit():
            if sweep.parent.parent.name == "multirun":  # multirun/DATE/TIME
                return f"{sweep.parent.name}_{sweep.name}"
            return sweep.name
    return Path(job_dirs[0]).name if job_dirs else "report"


def _tracker_config(job_dirs: Sequence[Path]) -> dict[str, Any]:
    """config.tracker of the first summary.json that has one."""
    for d in job_dirs:
        config = (read_summary(d) or {}).get("config")
        tracker = config.get("tracker") if isinstance(config, dict) else None
        if isinstance(tracker, dict):
            return tracker
    return {}


def wandb_mode() -> str | None:
    """None (let wandb decide) when WANDB_MODE or an API key is configured, else "offline".

    Never prompts for a login and never reaches the network without credentials.
    """
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlparse

    host = (
        urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        or "api.wandb.ai"
    )
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        if rc.authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def upload_to_wandb(
    report: Report,
    figures: dict[str, Path],
    *,
    group: str,
    out_dir: Path,
    tracker: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra_tables: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Tables (wandb.Table) and figures (wandb.Image) in one run, job_type "report"."""
    import wandb  # lazily: only --wandb pays for it

    from lac.tracking import wandb_dir

    tracker = tracker or {}
    kwargs: dict[str, Any] = {
        "project": os.environ.get("WANDB_PROJECT") or tracker.get("project") or "lac",
        "group": group,
        "job_type": "report",
        "name": f"report-{group}",
        "config": config or {},
    }
    if tracker.get("entity") and not os.environ.get("WANDB_ENTITY"):
        kwargs["entity"] = tracker["entity"]
    # always explicit: wandb reads WANDB_DIR once per process, so after an earlier run in this process
    # (a notebook's job with tracker.process=false) a changed or new WANDB_DIR would be ignored
    kwargs["dir"] = str(wandb_dir(out_dir))
    mode = wandb_mode()
    if mode:
        kwargs["mode"] = mode
    run = wandb.init(**kwargs)
    try:
        payload: dict[str, Any] = {}
        for t in report.tables():
            if not t.frame.empty:
                payload[f"tables/{t.key}"] = wandb.Table(dataframe=t.frame.astype(str))
        for name, df in (extra_tables or {}).items():
            if not df.empty:
                payload[f"data/{name}"] = wandb.Table(dataframe=df)
        for name, png in figures.items():
            payload[f"figures/{name}"] = wandb.Image(str(png))
        run.log(payload)
        run_dir = Path(run.settings.sync_dir)
    finally:
        run.finish()
    return run_dir
