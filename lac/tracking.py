"""Experiment tracking: one W&B run per Hydra job, or nothing (tracker=none).

The tracker config group (conf/tracker/*.yaml) picks the backend:

* ``tracker=none``: :class:`NoTracker`, whose methods do nothing. Neither this
  module nor that path imports wandb.
* ``tracker=wandb``: :class:`WandbTracker`. ``tracker.mode`` is ``online``,
  ``offline``, ``disabled`` or null (null: ``$WANDB_MODE``, else ``online`` when an
  API key is configured, else ``offline``). wandb is imported when the first
  run starts, never at module import.

Call :func:`check_tracker` before any work: it fails at once (no network, no
wandb import) on an unknown tracker or mode, and on ``online`` without an API
key. A job then does::

    tracker = start_tracker(cfg.tracker, run_id=run_id_for(key, cfg.tracker),
                            config=OmegaConf.to_container(cfg, resolve=True),
                            run_dir=job_dir, name=...)
    try:
        tracker.log_results(df, summarize(df))
        tracker.log_generations(records)      # mode=markers
    finally:
        tracker.finish()                      # or: with start_tracker(...) as tracker:

Runs and jobs
-------------
* Each job gets its own run, also when a Hydra basic-launcher multirun runs all
  jobs in one process (``reinit="create_new"``; each run is finished before the
  next starts).
* The run id is a function of the job's content key and the W&B group
  (:func:`run_id_for`), and runs start with ``resume="allow"``: a requeued job
  resumes its run instead of creating a twin; the same job in another sweep
  (group) gets a run of its own.
* Offline runs live under ``<run_dir>/wandb/offline-run-*``; after ``wandb.init``
  the log (logger ``lac.tracking``) names the folder and the exact
  ``wandb sync <folder>`` command that uploads it later.
* Guards against hanging: ``init_timeout`` (``tracker.init_timeout``, default 60 s),
  ``finish_timeout`` (``tracker.finish_timeout``, default 600 s: after that the
  data stays on disk for ``wandb sync``), system-metrics sampling off. If an
  online ``wandb.init`` fails (server unreachable), the job goes on with an
  offline run (logged as a warning, with its sync command), and later jobs in
  the same process go straight to offline.

What a run holds
----------------
* config: the job's whole resolved config, flattened with "/" (``model/name``,
  ``grid/personas/yoda``, ``intervention/layers`` ...), plus top-level keys to
  group and filter by: ``model`` (config name), ``model_id``, ``grid``, ``site``
  (the site config's name: transition, p_last ...), ``sites`` ("p_last,g1,g2"),
  ``layer`` (an int for a one-layer job, the deepest layer of a multi-layer
  set, else the list), ``layers`` ("10" / "10,12,14"), ``intervention``, ``mode``.
  The requested config value ``layer`` ("paper", a list ...) is kept as
  ``layer_requested`` when it differs.
* summary: :func:`lac.results.summary_keys` - ``kl/{site}/L{layers}/{intervention}/{stat}``,
  ``{geometry metric}/{site}/L{layer}/{stat}``, ``markers/{condition}/any_rate`` ... -
  and, for a job whose KL rows have a single layer (set), the same numbers
  without the layer: ``kl/{site}/{intervention}/{stat}`` and
  ``{geometry metric}/{site}/{stat}`` (stats: median, p25, p75; KL also min, max).
* tables: ``results`` (every tidy row, exactly the DataFrame's columns) and
  ``generations`` (mode=markers: cell, persona, task, condition, text,
  marker_any, marker_distinct, hits).

Dashboard recipe
----------------
KL against layer, one line per model (a sweep of single-layer jobs, e.g.
``python -m lac.run -m model=qwen0.5,smollm2 layer=6,10,13,17,20``):

1. Project page -> filter runs: ``group`` = the sweep name (``sweep_name=...``), and
   ``config.mode`` = kl; optionally ``config.intervention`` = additive.
2. Add panel -> **Scatter plot** (or a *Parallel coordinates* / *Run comparer*
   for a quick look): x = ``layer`` (config), y = ``kl/p_last/additive/median``
   (summary), color by ``model``. To get *lines*, use a custom chart (Vega-Lite,
   "Add panel -> Custom chart") over ``runs`` with ``config.layer`` on x,
   ``summary.kl/p_last/additive/median`` on y and ``config.model`` as the
   series, mark ``line``; or group the runs table by ``model`` and plot each
   group's scatter.
   Use the layer-free keys: a per-layer key such as ``kl/p_last/L6/additive/median``
   exists only in the runs of layer 6, so it cannot be a cross-run y axis.
   (The W&B *Line plot* panel plots history steps of each run, not runs
   against a config value; it is the wrong panel here.)
3. Spread: y = ``kl/p_last/additive/p25`` and ``.../p75`` as extra series;
   other sites: ``kl/g1/...``, ``kl/g2/...``, ``kl/p_user_last/...``; the floor:
   ``kl/p_last/bare/median``; geometry: ``cos_xy_sum/p_last/median``.
4. Multi-layer jobs (``layer=paper`` in one job, or ``intervention.layers=[...]``):
   their summary keys carry the layer (``kl/p_last/L13/additive/median``) and
   the ``results`` table has a ``layer`` column: plot from the table
   (Table panel -> group by model, layer; or ``python -m lac.report``).
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import netrc
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lac.errors import LacError

log = logging.getLogger("lac.tracking")

TRACKERS = ("wandb", "none")
MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # legacy WANDB_MODE values wandb accepts
DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_INIT_TIMEOUT = 60.0
DEFAULT_FINISH_TIMEOUT = 600.0
WRITE_TIMEOUT = 10.0  # offline: wait at most this long after finish() for the .wandb file
GENERATION_COLUMNS = ("cell", "persona", "task", "condition", "text", "marker_any", "marker_distinct", "hits")
_STATS_KL = ("median", "p25", "p75", "min", "max")
_STATS_GEO = ("median", "p25", "p75")

# set when an online wandb.init failed in this process: later jobs go straight to offline
_online_failed = False


class TrackerError(LacError):
    """A tracker config that cannot work; raised before any work starts."""


# --------------------------------------------------------------------------- config access


def _get(tcfg: Any, key: str, default: Any = None) -> Any:
    """tcfg[key] for a DictConfig, a dict or an attribute object; default when absent or null."""
    if isinstance(tcfg, Mapping) or hasattr(tcfg, "get"):
        try:
            value = tcfg.get(key, default)
        except Exception:  # a struct DictConfig without the key
            value = default
    else:
        value = getattr(tcfg, key, default)
    return default if value is None else value


def _plain(obj: Any) -> Any:
    """An OmegaConf container as plain dicts/lists; anything else as is."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return obj
    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


# --------------------------------------------------------------------------- credentials and mode


def _base_url() -> str:
    """$WANDB_BASE_URL, else base_url of wandb's global settings file, else api.wandb.ai."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    cfg_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".config", "wandb"
    )
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(cfg_dir, "settings"))
        url = parser.get("default", "base_url", fallback=None)
    except (configparser.Error, OSError):
        url = None
    return url or DEFAULT_BASE_URL


def _netrc_path() -> Path:
    """As wandb: $NETRC, else ~/.netrc, else ~/_netrc."""
    if env := os.environ.get("NETRC"):
        return Path(env).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def api_key_source() -> str | None:
    """Where a W&B credential is configured, or None. Local files and env only: never the network.

    Mirrors what ``wandb.init`` looks at: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``,
    then a netrc entry for the host of the base URL. (``wandb.api.api_key`` is
    deprecated in wandb 0.31 and needs the ~1 s wandb import; it is not used.)
    """
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    host = urlsplit(_base_url()).netloc
    path = _netrc_path()
    if host and path.is_file():
        try:
            creds = netrc.netrc(str(path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            creds = None
        if creds and creds[2]:
            return f"{path} (machine {host})"
    return None


def resolve_mode(tcfg: Any) -> str:
    """tracker.mode if set; else $WANDB_MODE; else online with an API key, offline without."""
    mode = _get(tcfg, "mode")
    if mode is None:
        mode = os.environ.get("WANDB_MODE") or None
    if mode is None:
        return "online" if api_key_source() else "offline"
    mode = str(mode).strip().lower()
    return _MODE_ALIASES.get(mode, mode)


def check_tracker(tcfg: Any) -> None:
    """Refuse, at once, a tracker config that cannot work. No network, no wandb import."""
    name = _get(tcfg, "name")
    if name not in TRACKERS:
        raise TrackerError(
            f"tracker.name={name!r} is not a tracker; choose one of {', '.join(TRACKERS)} "
            "(e.g. tracker=wandb or tracker=none)"
        )
    if name == "none":
        return
    raw = _get(tcfg, "mode")
    if raw is not None and raw not in MODES:
        raise TrackerError(
            f"tracker.mode={raw!r} is not a W&B mode; choose one of {', '.join(MODES)}, "
            "or null (follow $WANDB_MODE, else online with an API key, offline without)"
        )
    mode = resolve_mode(tcfg)
    if mode not in MODES:
        raise TrackerError(
            f"WANDB_MODE={os.environ.get('WANDB_MODE')!r} is not a W&B mode; "
            f"set it to one of {', '.join(MODES)} or unset it"
        )
    tags = _get(tcfg, "tags", [])
    if isinstance(tags, (str, bytes)) or not isinstance(_plain(tags), Sequence):
        raise TrackerError(f"tracker.tags must be a list, e.g. tracker.tags=[a,b]; got {tags!r}")
    if mode == "online" and not api_key_source():
        raise TrackerError(
            f"tracker.mode resolved to 'online' but no W&B API key is configured for {_base_url()} "
            f"(looked at WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE and {_netrc_path()}). "
            "Set WANDB_API_KEY=<key> (https://wandb.ai/authorize) or run `wandb login`; "
            "or log locally with tracker.mode=offline (upload later with `wandb sync`), "
            "or turn tracking off with tracker=none"
        )


# --------------------------------------------------------------------------- run identity and config


def run_id_for(key: str, tcfg: Any) -> str:
    """The W&B run id of a job: its content key plus a hash of the W&B group.

    Deterministic: a requeued job (same key, same sweep) resumes its run; the
    same job in another sweep/group gets its own run instead of being moved
    out of the first sweep's group.
    """
    key = str(key)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", key):
        key = hashlib.sha256(key.encode()).hexdigest()
    group = str(_get(tcfg, "group", ""))
    return f"lac-{key[:16]}-{hashlib.sha256(group.encode()).hexdigest()[:8]}"


def flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level: {"model": {"name": "q"}} -> {"model/name": "q"}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            if v:
                out.update(flatten(v, sep, name))
            else:
                out[name] = {}
        else:
            out[name] = v
    return out


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            return None
    return None


def group_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level config keys to group runs by: model, model_id, grid, site, layer, intervention ..."""
    model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    site = config.get("site") if isinstance(config.get("site"), Mapping) else {}
    grid = config.get("grid") if isinstance(config.get("grid"), Mapping) else {}
    iv = config.get("intervention") if isinstance(config.get("intervention"), Mapping) else {}
    out: dict[str, Any] = {}
    if model.get("name") is not None:
        out["model"] = model["name"]
    if model.get("id") is not None:
        out["model_id"] = model["id"]
    if grid.get("name") is not None:
        out["grid"] = grid["name"]
    if site.get("name") is not None:
        out["site"] = site["name"]
    if site.get("sites") is not None:
        sites = site["sites"]
        out["sites"] = ",".join(map(str, sites)) if not isinstance(sites, str) else sites
    if iv.get("name") is not None:
        out["intervention"] = iv["name"]
    if config.get("mode") is not None:
        out["mode"] = config["mode"]
    # the layer(s): a multi-layer set written at once, else the job's layer list
    layers = _int_list(iv.get("layers"))
    if layers:
        out["layer"], out["layers"] = max(layers), ",".join(map(str, sorted(layers)))
        return out
    raw = config.get("layer")
    if isinstance(raw, str) and raw in ("paper", "long"):
        raw = model.get(f"{raw}_layers")
    layers = _int_list(raw)
    if layers:
        out["layer"] = layers[0] if len(layers) == 1 else layers
        out["layers"] = ",".join(map(str, layers))
    return out


def run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What goes into wandb.config: the flattened config plus :func:`group_keys`."""
    config = _plain(config)
    flat = flatten(config)
    keys = group_keys(config)
    if "layer" in flat and "layer" in keys and flat["layer"] != keys["layer"]:
        flat["layer_requested"] = flat.pop("layer")
    flat.update(keys)
    return flat


def layer_free_keys(summary: Mapping[str, Any]) -> dict[str, float]:
    """``kl/{site}/{intervention}/{stat}`` (and geometry) for a job with a single layer (set).

    Empty when the KL rows span several layers: the per-layer keys of
    :func:`lac.results.summary_keys` are the only names then.
    """
    kl = summary.get("kl", [])
    geo = summary.get("geometry", [])
    kl_layers = {r["layers"] for r in kl if r["layers"]}
    geo_layers = {int(r["layer"]) for r in geo}
    out: dict[str, float] = {}
    if len(kl_layers) == 1:
        seen: set[str] = set()
        for r in kl:
            base = f"kl/{r['site']}/{r['intervention']}"
            if base in seen:  # two layer sets of one site x intervention: ambiguous
                return {}
            seen.add(base)
            out.update({f"{base}/{s}": r[s] for s in _STATS_KL})
    elif kl_layers:
        return {}
    if len(geo_layers) == 1 and (not kl_layers or kl_layers == {str(next(iter(geo_layers)))}):
        for r in geo:
            out.update({f"{r['metric']}/{r['site']}/{s}": r[s] for s in _STATS_GEO})
    return out


def _native(v: Any) -> Any:
    """A table cell as a JSON-friendly Python value (pd.NA -> None, numpy scalars -> Python)."""
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            pass
    try:
        import pandas as pd

        if v is pd.NA:
            return None
    except ImportError:  # pragma: no cover
        pass
    return v


# --------------------------------------------------------------------------- trackers


class Tracker:
    """What a job logs to. Subclasses: :class:`NoTracker`, :class:`WandbTracker`."""

    mode: str = "none"
    url_or_dir: str | None = None

    def log_results(self, df: Any, summary: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_generations(self, records: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def finish(self, exit_code: int | None = None) -> None:
        raise NotImplementedError

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


class NoTracker(Tracker):
    """tracker=none: every method does nothing."""

    def log_results(self, df: Any, summary: dict[str, Any]) -> None:
        pass

    def log_generations(self, records: list[dict[str, Any]]) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        pass


class WandbTracker(Tracker):
    """One W&B run. Build it with :func:`start_tracker`."""

    def __init__(self, run: Any, mode: str):
        self.run = run
        self.mode = mode
        self._finished = False
        if mode == "offline":
            self.url_or_dir = str(run.settings.sync_dir)
        elif mode == "online":
            self.url_or_dir = run.url
        else:
            self.url_or_dir = None

    @property
    def sync_command(self) -> str | None:
        return f"wandb sync {self.url_or_dir}" if self.mode == "offline" else None

    def log_results(self, df: Any, summary: dict[str, Any]) -> None:
        """Table ``results`` (every row, the DataFrame's columns) and the summary keys."""
        from lac.results import summary_keys

        columns = [str(c) for c in df.columns]
        data = [[_native(v) for v in row] for row in df.itertuples(index=False, name=None)]
        self._log_table("results", columns, data)
        self.run.summary.update({**summary_keys(summary), **layer_free_keys(summary)})

    def log_generations(self, records: list[dict[str, Any]]) -> None:
        """Table ``generations``: one row per (cell, condition); hits joined with ", "."""
        data = []
        for r in records:
            row = [_native(r.get(c)) for c in GENERATION_COLUMNS]
            hits = r.get("hits")
            row[-1] = ", ".join(map(str, hits)) if isinstance(hits, (list, tuple)) else (hits or "")
            data.append(row)
        self._log_table("generations", list(GENERATION_COLUMNS), data)

    def _log_table(self, key: str, columns: list[str], data: list[list[Any]]) -> None:
        import wandb

        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        # the run's file copy of a table is cut at Table.MAX_ROWS (10,000) rows; lift it for this table
        old = wandb.Table.MAX_ROWS
        limit = wandb.Table.MAX_ARTIFACT_ROWS
        if len(data) > limit:
            log.warning(
                "W&B table %r: %d rows, more than wandb's limit %d; the table is cut there "
                "(all rows are in the job's results.parquet)", key, len(data), limit,
            )
        wandb.Table.MAX_ROWS = max(old, min(len(data), limit))
        try:
            self.run.log({key: table})
        finally:
            wandb.Table.MAX_ROWS = old

    def finish(self, exit_code: int | None = None) -> None:
        """Finish the run (idempotent); offline, wait (bounded) until its .wandb file is written."""
        if self._finished:
            return
        self._finished = True
        self.run.finish(exit_code=exit_code)
        if self.mode == "offline":
            if not _wait_written(Path(self.url_or_dir)):
                log.warning("W&B: %s still being written after finish()", self.url_or_dir)
            log.info("W&B offline run finished: %s; upload with: %s", self.url_or_dir, self.sync_command)


def _wait_written(sync_dir: Path, timeout: float = WRITE_TIMEOUT) -> bool:
    """True once wandb-core has closed the run's .wandb file, False on timeout.

    wandb 0.31's run.finish() returns before wandb-core closes the stream (the
    finish is published, not awaited) and the .wandb file may still hold only
    its 7-byte header. Done: wandb-core logged "stream: all finished" for the
    run, or (other wandb versions) the file is past its header and its size
    has held still for 0.2 s.
    """
    deadline = time.monotonic() + timeout
    internal = sync_dir / "logs" / "debug-internal.log"
    last, still = -1, 0
    while time.monotonic() < deadline:
        try:
            if "stream: all finished" in internal.read_text(errors="replace"):
                return True
        except OSError:
            pass
        size = sum(f.stat().st_size for f in sync_dir.glob("*.wandb"))
        still = still + 1 if size == last and size > 7 else 0
        if still >= 4:
            return True
        last = size
        time.sleep(0.05)
    return False


def _wandb_init(tcfg: Any, *, run_id: str, config: dict[str, Any], run_dir: Path, name: str, mode: str) -> Any:
    import wandb

    settings = wandb.Settings(
        init_timeout=float(_get(tcfg, "init_timeout", DEFAULT_INIT_TIMEOUT)),
        finish_timeout=float(_get(tcfg, "finish_timeout", DEFAULT_FINISH_TIMEOUT)),
        quiet=True,  # lac logs the run folder / URL itself
        x_disable_stats=True,  # no system-metrics sampler
    )
    return wandb.init(
        project=_get(tcfg, "project"),
        entity=_get(tcfg, "entity"),
        group=_get(tcfg, "group"),
        job_type=_get(tcfg, "job_type"),
        tags=[str(t) for t in _plain(_get(tcfg, "tags", []))],
        name=name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=config,
        reinit="create_new",
        settings=settings,
    )


def start_tracker(tcfg: Any, *, run_id: str, config: Mapping[str, Any], run_dir: Path, name: str) -> Tracker:
    """A started tracker for one job: NoTracker for tracker=none, else a W&B run."""
    global _online_failed
    check_tracker(tcfg)
    if _get(tcfg, "name") == "none":
        return NoTracker()
    mode = resolve_mode(tcfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config(config)
    if mode == "online" and _online_failed:
        log.warning("W&B: an earlier online run of this process could not start; logging offline")
        mode = "offline"
    t0 = time.monotonic()
    try:
        run = _wandb_init(tcfg, run_id=run_id, config=cfg, run_dir=run_dir, name=name, mode=mode)
    except Exception as e:
        if mode != "online":
            raise
        _online_failed = True
        log.warning("W&B: online run could not start (%s: %s); logging offline instead", type(e).__name__, e)
        mode = "offline"
        run = _wandb_init(tcfg, run_id=run_id, config=cfg, run_dir=run_dir, name=name, mode=mode)
    tracker = WandbTracker(run, mode)
    if mode == "offline":
        log.info(
            "W&B offline run %s in %s (%.1fs); upload later with: %s",
            run_id, tracker.url_or_dir, time.monotonic() - t0, tracker.sync_command,
        )
    elif mode == "online":
        log.info("W&B run %s: %s", run_id, tracker.url_or_dir)
    return tracker


__all__ = [
    "NoTracker", "Tracker", "TrackerError", "WandbTracker", "api_key_source", "check_tracker",
    "flatten", "group_keys", "layer_free_keys", "resolve_mode", "run_config", "run_id_for",
    "start_tracker",
]
