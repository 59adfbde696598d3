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
  data stays on disk for ``wandb sync``), system-metrics sampling off; W&B's own
  process (``tracker.process``) silent for 60 s past these is killed, and the job
  ends with a TrackerError (its results safe, its run logged by the next run). If an
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
  ``{geometry metric}/{site}/L{layer}/{stat}``, ``markers/{condition}/any_rate`` (swap: also ``any_rate_partner``) ... -
  and, for a job whose KL rows have a single layer (set), the same numbers
  without the layer: ``kl/{site}/{intervention}/{stat}`` and
  ``{geometry metric}/{site}/{stat}`` (stats: median, p25, p75; KL also min, max).
* tables: ``results`` (every tidy row, exactly the DataFrame's columns) and
  ``generations`` (mode=markers: cell, persona, task, condition, text,
  marker_any, marker_distinct, hits).

* history: one row per layer (:func:`history_rows`): ``layer``, ``layer_frac`` and
  ``by_layer/kl/{site}/{intervention}/{median,p25,p75}``, ``by_layer/{geometry metric}/{site}/...``,
  ``by_layer/{attention metric}/{site}/...`` (attn_persona ... of the clean XY run), with ``layer``
  as their step metric (``define_metric``): a multi-layer job and a ``-m layer=...`` sweep of
  one-layer jobs draw the same line against ``layer``. A "from L" set (L..n_layers-1, the controls
  sweep's kv_persona / knockout_persona) is a point of the curve
  ``by_layer/kl/{site}/{intervention}_from/...`` at x = L, its first layer (:func:`from_layer`).

W&B's conventions
-----------------
``WANDB_DIR``, ``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``, ``WANDB_JOB_TYPE`` and
``WANDB_TAGS`` (comma list), when set, win over the tracker config (:func:`wandb_settings`,
:func:`wandb_dir`); without ``WANDB_DIR`` a job's run lands in its Hydra job folder.

Dashboard
---------
``python -m lac.dashboard --entity E --project P --group G`` builds the W&B workspace (KL and
geometry by layer, one line per model; markers; host injection; controls) from these keys;
see :mod:`lac.dashboard`.

Console
-------
:func:`configure_logging` (called by ``lac.run``) keeps one line per job phase: Lightning's
info lines and tips, deprecation/future warnings and wandb's banners are silenced unless
``hydra.verbose`` or ``LAC_DEBUG=1`` asks for them. :func:`progress_callback` is the patched
steps' progress bar (cells done), :func:`timing_line` the job's last line on where time went.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import logging
import netrc
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lac.errors import LacError
from lac.io import unwritable

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
    process = _get(tcfg, "process", True)
    if not isinstance(process, bool):
        raise TrackerError(f"tracker.process must be true or false (W&B in a process of its own, or in a "
                           f"thread of the job's); got {process!r}")
    tags = _get(tcfg, "tags", [])
    if isinstance(tags, (str, bytes)) or not isinstance(_plain(tags), Sequence):
        raise TrackerError(f"tracker.tags must be a list, e.g. tracker.tags=[a,b]; got {tags!r}")
    if mode != "disabled":
        _check_names(wandb_settings(tcfg))
    if mode == "online" and not api_key_source():
        raise TrackerError(
            f"tracker.mode resolved to 'online' but no W&B API key is configured for {_base_url()} "
            f"(looked at WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE and {_netrc_path()}). "
            "Set WANDB_API_KEY=<key> (https://wandb.ai/authorize) or run `wandb login`; "
            "or log locally with tracker.mode=offline (upload later with `wandb sync`), "
            "or turn tracking off with tracker=none"
        )


BAD_NAME_CHARS = "/\\#?%:"  # what W&B refuses in a project (and entity) name, found only at its init


def _check_names(settings: dict[str, Any]) -> None:
    """Project / entity W&B would refuse, and a WANDB_DIR it cannot write, named before the job computes
    (else the error came after the compute, and an offline run was marked logged that `wandb sync` refuses)."""
    for field in ("project", "entity"):
        value = settings.get(field)
        if value is None:  # W&B's default
            continue
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        bad = set(BAD_NAME_CHARS + (" " if field == "entity" else ""))
        if not text.strip() or text != text.strip() or len(text) > 128 or bad & set(text):
            via = ENV_OVERRIDES[field] if os.environ.get(ENV_OVERRIDES[field]) else f"tracker.{field}"
            raise TrackerError(f"{via}={value!r} is not a W&B {field} name: 1-128 characters without "
                               f"{' '.join(BAD_NAME_CHARS)}" + (" or spaces" if field == "entity" else ""))
    if (env := os.environ.get("WANDB_DIR")) and (why := unwritable(env)):
        raise TrackerError(f"WANDB_DIR={env!r}: {why}, so it is not a folder W&B can write its runs into; "
                           "set WANDB_DIR to one (or unset it)")


def use_process(tcfg: Any) -> bool:
    """W&B in a child process (lac.tracker_process): tracker.process (default true), on POSIX."""
    return _get(tcfg, "name") == "wandb" and bool(_get(tcfg, "process", True)) and os.name == "posix"


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
    group = str(wandb_settings(tcfg)["group"] or "")
    return f"lac-{key[:16]}-{hashlib.sha256(group.encode()).hexdigest()[:8]}"


ENV_OVERRIDES = {  # W&B's own variables, set by the user, win over the tracker config's values
    "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "group": "WANDB_RUN_GROUP",
    "job_type": "WANDB_JOB_TYPE", "tags": "WANDB_TAGS",
}


def wandb_settings(tcfg: Any) -> dict[str, Any]:
    """project, entity, group, job_type, tags of a job's run: W&B's environment variables
    (WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_JOB_TYPE, WANDB_TAGS as a comma list)
    where the user set them, else the tracker config (group defaults to sweep_name)."""
    out: dict[str, Any] = {}
    for field, var in ENV_OVERRIDES.items():
        env = os.environ.get(var)
        if field == "tags":
            out[field] = ([t.strip() for t in env.split(",") if t.strip()] if env
                          else [str(t) for t in _plain(_get(tcfg, "tags", []))])
        else:
            out[field] = env if env else _get(tcfg, field)
    return out


def wandb_dir(run_dir: Path | str) -> Path:
    """The ``dir`` of a job's run (wandb puts its run folders in ``<dir>/wandb/``): $WANDB_DIR
    when the user set it, else the job's own folder. Passed explicitly: wandb reads its
    environment once per process, and a multirun's later jobs must see the same rule. Absolute:
    wandb-core writes the run's files relative to its own working directory, the one its process
    (the first job's) started in."""
    return Path(os.environ.get("WANDB_DIR") or run_dir).expanduser().absolute()


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
    if model.get("n_layers") is not None:
        out["n_layers"] = int(model["n_layers"])
    named = {"paper": model.get("paper_layers"), "long": model.get("long_layers"),
             **(model.get("layer_sets") if isinstance(model.get("layer_sets"), Mapping) else {})}

    def resolve(value: Any) -> list[int] | None:  # 10, [6, 10], "paper", "m3" (model.layer_sets)
        return _int_list(named.get(value) if isinstance(value, str) else value)

    # the layer(s): a multi-layer set written at once, else the job's layer list
    layers = resolve(iv.get("layers"))
    if layers:
        out["layer"], out["layers"] = max(layers), ",".join(map(str, sorted(layers)))
        return out
    layers = resolve(config.get("layer"))
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


HISTORY_PREFIX = "by_layer"  # per-layer history keys: by_layer/kl/{site}/{intervention}/{stat} ...
STEP_METRIC = "layer"  # their x: the layer (also logged as layer_frac = layer / n_layers)
FROM_SUFFIX = "_from"  # by_layer/kl/{site}/{intervention}_from/...: the curve of "from L" sets, x = L


def layer_list(layers: Any) -> list[int]:
    """"10,11,12" (or 10, or [10, 11]) as ints; [] for no layer."""
    if layers is None or layers == "":
        return []
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str):
        return [int(p) for p in layers.split(",") if p.strip()]
    return [int(v) for v in layers]


def from_layer(layers: Any, n_layers: int | None = None) -> int | None:
    """L of a "from L" layer set (L, L+1, ..., n_layers-1, changed at once: ``intervention.layers=from``),
    else None. A set of two or more consecutive layers that ends at the model's last layer; without
    ``n_layers``, any run of two or more consecutive layers. A single layer is not a set here (at
    L = n_layers-1 it is the same change: callers that know a from-L curve add it, see
    :func:`history_rows`). The x of such a set on a by-layer curve is L, its FIRST layer, while the
    tidy rows' ``layer`` column holds the deepest."""
    ls = sorted(set(layer_list(layers)))
    if len(ls) < 2 or ls != list(range(ls[0], ls[-1] + 1)):
        return None
    if n_layers and ls[-1] != int(n_layers) - 1:
        return None
    return ls[0]


def history_rows(summary: Mapping[str, Any], n_layers: int | None = None) -> list[dict[str, float]]:
    """One W&B history row per layer: ``layer``, ``layer_frac`` (layer / n_layers, when known),
    ``by_layer/kl/{site}/{intervention}/{median,p25,p75}`` for the KL of single layers and
    ``by_layer/{geometry metric}/{site}/{median,p25,p75}``, ``by_layer/{attention metric}/{site}/...``.
    A multi-layer job and a sweep of one-layer jobs log the same rows, so their curves against
    ``layer`` are the same. A "from L" set (:func:`from_layer`) is the point x = L (its first
    layer) of ``by_layer/kl/{site}/{intervention}_from/...``. KL of other multi-layer sets and of
    interventions writing nothing has no layer: summary keys only."""
    rows: dict[int, dict[str, float]] = {}

    def row(layer: int) -> dict[str, float]:
        r = rows.setdefault(int(layer), {STEP_METRIC: int(layer)})
        if n_layers:
            r["layer_frac"] = int(layer) / int(n_layers)
        return r

    kl = [("kl", r) for r in summary.get("kl", [])] + [("kl_partner", r) for r in summary.get("kl_partner", [])]
    with_from = {(r["site"], r["intervention"]) for _, r in kl if from_layer(r.get("layers"), n_layers) is not None}
    for metric, r in kl:
        layers = str(r.get("layers") or "")
        base = f"{HISTORY_PREFIX}/{metric}/{r['site']}/{r['intervention']}"
        start = from_layer(layers, n_layers)
        if start is not None:
            row(start).update({f"{base}{FROM_SUFFIX}/{s}": r[s] for s in _STATS_GEO})
            continue
        if not layers or "," in layers:
            continue
        row(int(layers)).update({f"{base}/{s}": r[s] for s in _STATS_GEO})
        if n_layers and int(layers) == int(n_layers) - 1 and (r["site"], r["intervention"]) in with_from:
            row(int(layers)).update({f"{base}{FROM_SUFFIX}/{s}": r[s] for s in _STATS_GEO})  # from n-1 = at n-1
    for r in (*summary.get("geometry", []), *summary.get("attention", [])):
        factor = f"{r['factor']}/" if r.get("factor") else ""  # k-factor grids: cos_pair/persona+task/...
        base = f"{HISTORY_PREFIX}/{r['metric']}/{factor}{r['site']}"
        row(int(r["layer"])).update({f"{base}/{s}": r[s] for s in _STATS_GEO})
    return [rows[k] for k in sorted(rows)]


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


# --------------------------------------------------------------------------- console: quiet logs, progress, timing

_VERBOSE = False
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_PREDICT: dict[str, float] = {}  # the last patched-step loop of this process: seconds, cells


def verbose_requested(hydra_verbose: Any = False) -> bool:
    """``hydra.verbose`` (true or a logger list) or ``LAC_DEBUG=1`` ask for the full logs."""
    return bool(hydra_verbose) or os.environ.get("LAC_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def configure_logging(verbose: Any = False) -> bool:
    """lac's INFO lines (one per job phase); unless verbose: Lightning's info lines and tips
    (GPU available, litlogger), deprecation/future warnings (e.g. Lightning's _pytree LeafSpec),
    transformers' weight-loading bars and wandb's banners are silenced. Returns the verbosity."""
    global _VERBOSE

    bars_lock_in_process()
    _VERBOSE = verbose_requested(verbose)
    logging.getLogger("lac").setLevel(logging.DEBUG if _VERBOSE else logging.INFO)
    if _VERBOSE:
        return True
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_job_warnings()
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers is a dependency
        pass
    return False


def quiet_warnings() -> None:
    """Deprecation and future warnings off (a job's console unless verbose; also its W&B process's)."""
    import warnings

    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def quiet_job_warnings() -> None:
    """What a job's console leaves out unless verbose: deprecation and future warnings, and the
    warnings Lightning raises about how lac drives it (its own modules, DataLoader workers)."""
    import warnings

    quiet_warnings()
    warnings.filterwarnings("ignore", module=r"lightning(\.|_fabric|$).*")
    warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers).*")


def _quiet_lightning() -> None:
    """Lightning adds its own console handler when it is imported before any other: its lines
    then show twice (once plain, once through Hydra's handler). One copy, through the root's."""
    root_has = logging.getLogger().hasHandlers()
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        if root_has:
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = True
        if not _VERBOSE:
            lg.setLevel(logging.WARNING)


def _progress_enabled() -> bool:
    import sys

    env = os.environ.get("LAC_PROGRESS", "").strip().lower()
    return env in ("1", "true", "yes") or (env not in ("0", "false", "no") and sys.stderr.isatty())


_PHASES: dict[str, float] = {}  # seconds of this process's last clean-capture and generation phases
_BESIDE: dict[str, float] = {}  # CPU seconds of background threads beside the compute (note_beside)


def note_phase(phase: str, seconds: float) -> None:
    """Add to a fixed-cost phase of this process's job (start-up, model load, lightning set-up, writes)."""
    _PHASES[phase] = _PHASES.get(phase, 0.0) + seconds


def note_beside(work: str, seconds: float) -> None:
    """CPU seconds (`time.thread_time`) a background thread spent beside the compute (imports, W&B
    start): off the critical path, yet where torch already uses every core it slows the compute
    about as much, so the closing line names it."""
    _BESIDE[work] = _BESIDE.get(work, 0.0) + seconds


def bars_lock_in_process() -> None:
    """tqdm's bars, lac's and Lightning's, lock with a thread lock. tqdm's default adds a
    multiprocessing lock, a named semaphore that only processes forked after it share; a killed
    joblib worker leaves its own to the resource tracker, which reports it as "leaked"."""
    import threading

    from tqdm import std

    if "_lock" not in vars(std.tqdm):  # a lock tqdm already made (or was given) stays
        std.tqdm.set_lock(threading.RLock())


@contextlib.contextmanager
def phase_progress(phase: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """Progress of a phase outside Lightning's predict loop (clean captures, generation): a tqdm bar
    on a terminal or with LAC_PROGRESS=1 (lac's log lines otherwise), and its time for timing_line.
    Yields `advance(n)`."""
    from tqdm.auto import tqdm

    bars_lock_in_process()
    bar = tqdm(total=total, desc=phase, unit=unit, leave=False, disable=not _progress_enabled(), dynamic_ncols=True)
    t0 = time.monotonic()
    try:
        yield bar.update
    finally:
        bar.close()
        _PHASES[phase] = _PHASES.get(phase, 0.0) + time.monotonic() - t0


def progress_callback(total_cells: int, enabled: bool | None = None) -> Any:
    """Lightning callback for the patched steps: a progress bar in cells (Lightning's TQDM bar,
    on a terminal or with LAC_PROGRESS=1; LAC_PROGRESS=0 turns it off) and the loop's time for
    :func:`timing_line`."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    if enabled is None:
        enabled = _progress_enabled()

    class CellProgress(TQDMProgressBar):
        """Lightning's bar, counting cells (cells captured and patched per step) instead of batches."""

        def __init__(self) -> None:
            super().__init__(refresh_rate=1 if enabled else 0)
            self.cells = 0

        def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
            _PREDICT.clear()
            _PREDICT["t0"] = time.monotonic()
            self.cells = 0
            if enabled:
                super().on_predict_start(trainer, pl_module)

        def init_predict_tqdm(self) -> Any:
            """Lightning's bar in cells from its first line (it would first print an empty
            `Predicting: 0/?`, then one per dataloader, in batches)."""
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            return Tqdm(desc="lac: cells captured and patched", total=total_cells, unit="cell",
                        position=2 * self.process_position, disable=self.is_disabled, leave=True,
                        dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            pass  # the bar counts cells, set at its start: nothing to reset per dataloader

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.cells += len(batch)
            rows = len(outputs.get("rows", [])) if isinstance(outputs, Mapping) else 0
            _PREDICT["rows"] = _PREDICT.get("rows", 0) + rows
            if enabled:
                bar = self.predict_progress_bar
                bar.n = self.cells
                bar.set_postfix(rows=int(_PREDICT["rows"]), refresh=False)
                bar.refresh()

        def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
            _PREDICT.update(seconds=time.monotonic() - _PREDICT.pop("t0", time.monotonic()), cells=self.cells)
            if enabled:
                super().on_predict_end(trainer, pl_module)

    return CellProgress()


def trainer_options(total_cells: int) -> dict[str, Any]:
    """Keyword arguments of the job's ``lightning.Trainer`` beyond devices and callbacks of its
    own: progress in cells, no model summary or checkpoints, and Lightning quiet (see
    :func:`configure_logging`)."""
    _quiet_lightning()
    bar = progress_callback(total_cells)
    return {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
            "enable_progress_bar": True, "callbacks": [bar]}


def timing_line(compute_seconds: float | None, tracking_seconds: float) -> str:
    """The job's last line on where time went: the fixed costs (start-up of the process's first job,
    model load, Lightning set-up, result writes, W&B on the critical path), the compute (clean
    captures, patched steps), and the background work beside the compute (`note_beside`)."""
    done, phases, beside = dict(_PREDICT), dict(_PHASES), dict(_BESIDE)
    _PREDICT.clear()
    _PHASES.clear()
    _BESIDE.clear()
    if compute_seconds is None or "seconds" not in done:
        return f"time: results reused (nothing computed), W&B {tracking_seconds:.1f} s"
    steps = done["seconds"]
    fixed = {k: phases.get(k, 0.0) for k in ("model load", "lightning set-up", "writes")}
    clean = phases.get("clean captures", 0.0)
    other = max(float(compute_seconds) - steps - clean - fixed["model load"] - fixed["lightning set-up"], 0.0)
    startup = phases.get("start-up", 0.0)  # (compute_seconds runs from the job's start to its results)
    total = startup + float(compute_seconds) + fixed["writes"] + tracking_seconds
    gen = phases.get("generation")
    inside = f", generation {gen:.1f} s" if gen else ""
    head = f"start-up {startup:.1f} s + " if startup else ""
    return (f"time: {total:.1f} s = {head}model load {fixed['model load']:.1f} s + lightning set-up "
            f"{fixed['lightning set-up']:.1f} s + clean captures {clean:.1f} s + patched steps {steps:.1f} s "
            f"({int(done.get('cells', 0))} cells, {int(done.get('rows', 0))} rows{inside}) + writes "
            f"{fixed['writes']:.1f} s + other {other:.1f} s + W&B {tracking_seconds:.1f} s{_beside_note(beside)}")


def _beside_note(beside: dict[str, float]) -> str:
    """'; beside the compute: imports 1.4 s, W&B start 1.6 s' (background threads' CPU time: not in the
    sum, but where torch uses every core the compute phases above include about that much; 'W&B start
    (own process)' is the W&B process's, spent mostly while the model loads)."""
    parts = [f"{k} {v:.1f} s" for k, v in beside.items() if v >= 0.05]
    return f"; beside the compute: {', '.join(parts)}" if parts else ""


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

    def __init__(self, run: Any, mode: str, n_layers: int | None = None):
        self.run = run
        self.mode = mode
        self.n_layers = n_layers
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
        rows = history_rows(summary, self.n_layers)
        if rows:
            self.run.define_metric(STEP_METRIC)
            self.run.define_metric("layer_frac", step_metric=STEP_METRIC)
            self.run.define_metric(f"{HISTORY_PREFIX}/*", step_metric=STEP_METRIC)
            for r in rows:
                self.run.log(r)
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
        silent=not _VERBOSE,  # no "wandb: ..." banners unless hydra.verbose / LAC_DEBUG
        x_disable_stats=True,  # no system-metrics sampler
    )
    return wandb.init(
        **wandb_settings(tcfg),
        name=name,
        id=run_id,
        resume="allow",
        dir=str(wandb_dir(run_dir)),
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
    run_dir = wandb_dir(run_dir)
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
    tracker = WandbTracker(run, mode, n_layers=cfg.get("n_layers"))
    if mode == "offline":  # one line per phase: the sync command comes with finish()
        log.debug(
            "W&B offline run %s in %s (%.1fs); upload later with: %s",
            run_id, tracker.url_or_dir, time.monotonic() - t0, tracker.sync_command,
        )
    elif mode == "online":
        log.info("W&B run %s: %s", run_id, tracker.url_or_dir)
    return tracker


__all__ = [
    "NoTracker", "Tracker", "TrackerError", "WandbTracker", "api_key_source", "check_tracker",
    "configure_logging", "flatten", "from_layer", "group_keys", "history_rows", "layer_free_keys", "layer_list",
    "progress_callback", "quiet_warnings",
    "resolve_mode", "run_config", "run_id_for", "start_tracker", "timing_line", "trainer_options", "use_process",
    "wandb_dir", "wandb_settings",
]
